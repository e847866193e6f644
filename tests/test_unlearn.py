"""The training entry point on the tiny zoo: guarantees, history, stop rules, bad input."""


import math

import pytest
import torch

from uoe_nb.moe import changed_parameters, find_moe_layers
from uoe_nb.unlearn import UnlearnConfig, unlearn, world_evaluator
from uoe_nb.world import build_world
from uoe_nb.zoo import load_zoo_model


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def _fresh(name="tiny-qwen2moe"):
    return load_zoo_model(name)


def _run(world, method="ga", scope="uoe", steps=30, evaluate=True, **kw):
    model, tok = _fresh(kw.pop("model_name", "tiny-qwen2moe"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method=method, scope=scope, steps=steps, eval_every=10, monitor_docs=16, **kw)
    result = unlearn(
        model,
        world.forget_corpus,
        world.retain_corpus[:64],
        cfg,
        tokenizer=tok,
        evaluate=world_evaluator(tok, world) if evaluate else None,
    )
    return result, before, tok


def test_uoe_changes_only_target_slice_and_router(world):
    result, before, _ = _run(world, "ga", "uoe", steps=20, lr=1e-3, evaluate=False)
    layer, expert = result.target
    changed = changed_parameters(result.model, before)
    lay = next(m for m in find_moe_layers(result.model) if m.layer_index == layer)
    allowed = set(lay.expert_parameters()) | set(lay.router_parameters())
    assert changed, "nothing changed"
    assert set(changed) <= allowed
    for name in lay.expert_parameters():
        if name in changed:
            assert changed[name].nonzero().flatten().tolist() == [expert]
    assert result.scope.num_trainable == lay.expert_numel() + sum(
        p.numel() for p in lay.router_parameters().values()
    )


@pytest.mark.parametrize("scope, lr", [("full", 3e-4), ("uoe", 3e-3)])
def test_ga_runs_to_target_with_complete_history(world, scope, lr):
    """Full GA and GA+UOE both run to the same forget accuracy; the history is sound."""
    result, _, tok = _run(world, "ga", scope, steps=80, lr=lr, stop_forget_accuracy=0.5)
    h = result.history
    assert "forget accuracy" in result.stopped
    assert h[-1].metrics["forget_accuracy"] <= 0.5 < h[0].metrics["forget_accuracy"]
    assert [r.step for r in h] == list(range(0, h[-1].step + 1, 10))
    first = h[0]
    assert first.overlap_forget and first.overlap_retain
    assert all(v == 1.0 for v in first.overlap_forget.values())
    assert all(v == 1.0 for v in first.overlap_retain.values())
    assert all(v == 0.0 for v in first.proportions_shift.values())
    for r in h:
        for v in list(r.overlap_forget.values()) + list(r.overlap_retain.values()):
            assert 0.0 <= v <= 1.0
        assert set(r.metrics) == {"forget_accuracy", "utility_accuracy"}
        assert r.step == 0 or r.forget_loss is not None
    # Forget accuracy falls over the run (ends lower than any earlier checkpoint).
    fas = [r.metrics["forget_accuracy"] for r in h]
    assert fas[-1] == min(fas) and fas[-1] < fas[0]
    # The kept checkpoint is one that reached the target, and evaluating the returned
    # model reproduces its metrics.
    assert result.best.metrics["forget_accuracy"] <= 0.5
    # Early stop: the steps taken are those up to the last checkpoint, each timed.
    assert result.steps_run == h[-1].step < 80
    assert result.train_seconds > 0 and result.seconds_per_step == result.train_seconds / result.steps_run
    again = world_evaluator(tok, world)(result.model)
    assert again == pytest.approx(result.best.metrics)


def test_deterministic_for_a_seed(world):
    a, _, _ = _run(world, "ga", "uoe", steps=10, lr=1e-3, evaluate=False)
    b, _, _ = _run(world, "ga", "uoe", steps=10, lr=1e-3, evaluate=False)
    assert [r.row() for r in a.history] == [r.row() for r in b.history]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_npo_reference_does_not_move(world, monkeypatch):
    from uoe_nb import objectives

    seen = []
    real = objectives.npo_loss

    def spy(cur, ref, beta, *a, **k):
        seen.append((cur.detach().clone(), ref.detach().clone()))
        return real(cur, ref, beta, *a, **k)

    monkeypatch.setattr(objectives, "npo_loss", spy)
    model, tok = _fresh()
    forget = world.forget_corpus[:16]  # 4 batches of 4: batch 0 comes back at step 4
    unlearn(model, forget, world.retain_corpus[:16], UnlearnConfig(method="npo", steps=5, lr=1e-2),
            tokenizer=tok)  # fmt: skip
    (cur0, ref0), (cur4, ref4) = seen[0], seen[4]
    # Step 0: the model is still the original, so its NLL is the reference's.
    torch.testing.assert_close(cur0, ref0)
    # Later, the reference for the same batch is unchanged while the model has moved.
    assert torch.equal(ref0, ref4)
    assert not torch.allclose(cur4, ref4)


def test_npo_default_is_the_papers_summed_nll(world, monkeypatch):
    """NPO as the paper and open-unlearning define it: per-sequence summed NLL, beta 0.001."""
    from uoe_nb import objectives

    calls = []
    real = objectives.npo_loss

    def spy(cur, ref, beta, *a, **k):
        calls.append((cur.detach().clone(), beta, k))
        return real(cur, ref, beta, *a, **k)

    monkeypatch.setattr(objectives, "npo_loss", spy)
    config = UnlearnConfig(method="npo", steps=2, lr=1e-3)
    assert (config.npo_beta, config.npo_per_token) == (0.001, False)
    model, tok = _fresh()
    forget = world.forget_corpus[:4]  # one batch of 4: the first step sees every document
    sums = []
    with torch.no_grad():
        for doc in forget:  # each document's summed next-token NLL under the original model
            ids = tok(doc, return_tensors="pt", add_special_tokens=True)["input_ids"]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            sums.append(-logp.gather(1, ids[0, 1:, None]).sum().item())
    unlearn(model, forget, world.retain_corpus[:8], config, tokenizer=tok)
    cur, beta, kwargs = calls[0]
    assert beta == 0.001 and kwargs["per_token"] is False and kwargs["n_tokens"] is None
    torch.testing.assert_close(sorted(cur.tolist()), sorted(sums), rtol=1e-3, atol=1e-3)
    # the per-token variant divides by the token counts
    calls.clear()
    model, tok = _fresh()
    unlearn(model, forget, world.retain_corpus[:8],
            UnlearnConfig(method="npo", steps=1, lr=1e-3, npo_per_token=True), tokenizer=tok)  # fmt: skip
    assert calls[0][2]["per_token"] is True and calls[0][2]["n_tokens"] is not None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"forget": []}, ValueError, "forget set is empty"),
        ({"config": UnlearnConfig(method="nope")}, ValueError, "unknown method"),
        ({"config": UnlearnConfig(target=(9, 0))}, IndexError, "layer"),
        ({"config": UnlearnConfig(target=(1, 99))}, IndexError, "out of range"),
        ({"forget": "one long forget document"}, TypeError, "forget set is one string"),
        ({"retain": "one long retain document"}, TypeError, "retain set is one string"),
        ({"forget": ["fine text here", 3]}, TypeError, "must hold strings"),
        ({"forget": ["", "a"]}, ValueError, "fewer than two tokens"),
        ({"config": UnlearnConfig(max_length=1)}, ValueError, "max_length must be an int >= 2"),
        ({"config": UnlearnConfig(anchor_weight=-1.0)}, ValueError, "anchor_weight must be a finite number >= 0"),
        ({"config": UnlearnConfig(retain_weight=-0.5)}, ValueError, "retain_weight"),
        ({"config": UnlearnConfig(retain_router_weight=float("nan"))}, ValueError, "retain_router_weight"),
        ({"config": UnlearnConfig(stop_forget_accuracy=1.5)}, ValueError, r"stop_forget_accuracy must be .* \[0, 1\]"),
        ({"config": UnlearnConfig(stop_forget_accuracy=-0.1)}, ValueError, "stop_forget_accuracy"),
    ],
)
def test_bad_input(world, kwargs, error, match):
    model, tok = _fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"forget": world.forget_corpus[:8], "retain": world.retain_corpus[:8], "config": UnlearnConfig(steps=1)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        unlearn(model, args["forget"], args["retain"], args["config"], tokenizer=tok)
    # a refused run leaves the model as it was: the same tensors (no trained rows), bitwise
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_documents_too_short_to_learn_from_are_dropped_with_a_count(world, caplog):
    import logging

    model, tok = _fresh()
    with caplog.at_level(logging.WARNING, logger="uoe_nb.unlearn"):
        result = unlearn(model, ["", *world.forget_corpus[:4]], world.retain_corpus[:4], UnlearnConfig(steps=1),
                         tokenizer=tok)  # fmt: skip
    assert "dropped 1 of 5 forget documents" in caplog.text and result.steps_run == 1


def test_moe_scope_on_dense_model_refused(world):
    model, tok = _fresh("tiny-dense")
    with pytest.raises(Exception, match="(?i)moe|expert"):
        unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], UnlearnConfig(steps=1, target=(0, 0)),
                tokenizer=tok)  # fmt: skip


def test_nan_loss_stops_cleanly(world, monkeypatch):
    from uoe_nb import objectives

    calls = {"n": 0}
    real = objectives.ga_loss

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(objectives, "ga_loss", flaky)
    model, tok = _fresh()
    result = unlearn(model, world.forget_corpus, world.retain_corpus[:16],
                     UnlearnConfig(steps=10, lr=1e-3, eval_every=1), tokenizer=tok)  # fmt: skip
    assert "non-finite" in result.stopped
    for p in result.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "method, extra",
    [
        ("graddiff", {}),
        ("graddiff", {"retain_loss": "kl"}),
        ("npo", {}),
        ("simnpo", {}),
        ("rmu", {}),
        ("ga", {"retain_router_weight": 1.0}),
    ],
)
def test_every_method_keeps_the_uoe_guarantee(world, method, extra):
    result, before, _ = _run(world, method, "uoe", steps=4, lr=1e-3, evaluate=False, **extra)
    layer, expert = result.target
    lay = next(m for m in find_moe_layers(result.model) if m.layer_index == layer)
    changed = changed_parameters(result.model, before)
    assert changed and set(changed) <= set(lay.expert_parameters()) | set(lay.router_parameters())
    for name in lay.expert_parameters():
        if name in changed:
            assert changed[name].nonzero().flatten().tolist() == [expert]
    assert all(r.forget_loss is None or math.isfinite(r.forget_loss) for r in result.history)


def test_layer_cache_gives_the_same_run(world):
    runs = []
    for cached in (True, False):
        result, _, _ = _run(world, "npo", "uoe", steps=6, lr=1e-3, evaluate=False, target=(2, 5),
                            use_layer_cache=cached, retain_router_weight=0.5)  # fmt: skip
        runs.append(result)
    a, b = (r.model.state_dict() for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_esft_scope_runs_attribution(world):
    result, before, _ = _run(world, "ga", "esft", steps=3, lr=1e-3, evaluate=False)
    assert result.affinity is not None
    changed = changed_parameters(result.model, before)
    experts = result.scope.experts
    assert experts and changed
    for lay in find_moe_layers(result.model):
        for name in lay.expert_parameters():
            if name in changed:
                assert set(changed[name].nonzero().flatten().tolist()) <= set(experts[lay.layer_index])


def test_anchor_follows_the_trained_expert(world, monkeypatch):
    from uoe_nb import objectives, scopes

    anchored = []
    real = objectives.anchor_loss

    def spy(scores, mask, expert, **k):
        anchored.append(expert)
        return real(scores, mask, expert, **k)

    monkeypatch.setattr(objectives, "anchor_loss", spy)
    result, _, _ = _run(world, "ga", scopes.random_expert(), steps=2, lr=1e-3, evaluate=False)
    layer, expert = result.target
    assert result.scope.experts == {layer: [expert]}
    assert result.affinity.target != (layer, expert)  # the random expert, not the attributed one
    assert anchored and set(anchored) == {expert}


def test_bf16_uoe_at_the_papers_learning_rate_moves_the_target_expert(world):
    """fp32 master copies: at lr 1e-5 most bf16 AdamW updates would round away (Chapter 8)."""
    model, tok = _fresh()
    model = model.to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method="ga", scope="uoe", lr=1e-5, steps=40, monitor_docs=8)
    result = unlearn(model, world.forget_corpus, world.retain_corpus[:16], cfg, tokenizer=tok)
    layer, expert = result.target
    lay = next(m for m in find_moe_layers(model) if m.layer_index == layer)
    changed = changed_parameters(model, before)
    assert set(changed) == set(lay.expert_parameters()) | set(lay.router_parameters())
    for name in lay.expert_parameters():
        assert changed[name].tolist() == [e == expert for e in range(lay.num_experts)]
        moved = (model.get_parameter(name)[expert] != before[name][expert]).float().mean()
        assert moved > 1 / 3, (name, float(moved))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_finished_run_holds_no_gradients_no_wrappers_and_can_release_its_model(world):
    import gc
    import weakref

    result, _, _ = _run(world, "npo", "uoe", steps=4, lr=1e-3, evaluate=False)
    model = result.model
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not [n for n, _ in model.named_parameters() if ".trained." in n]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    ref = weakref.ref(model)
    del model
    result.release()
    gc.collect()
    assert ref() is None and result.model is None and result.summary()["step"] == 4


def test_utility_only_where_the_target_was_reached_and_at_the_end(world):
    calls = []

    def evaluate(model, parts=("forget", "utility")):
        calls.append(tuple(parts))
        fa = 0.9 - 0.1 * sum("forget" in c for c in calls)
        return {k: v for k, v in (("forget_accuracy", fa), ("utility_accuracy", 0.8)) if k.split("_")[0] in parts}

    model, tok = _fresh()
    cfg = UnlearnConfig(steps=6, lr=1e-3, eval_every=1, stop_forget_accuracy=0.45, utility_eval="target",
                        monitor_docs=4)  # fmt: skip
    result = unlearn(model, world.forget_corpus, world.retain_corpus[:16], cfg, tokenizer=tok, evaluate=evaluate)
    # step 0 in full; steps 1-4 forget only (FA .7 .6 .5 .4 -> reached at step 4: then utility too)
    assert calls == [("forget", "utility")] + [("forget",)] * 4 + [("utility",)]
    assert result.best_step == 4 and result.best.metrics["utility_accuracy"] == 0.8
    assert "utility_accuracy" not in result.history[1].metrics
    with pytest.raises(ValueError, match="needs stop_forget_accuracy"):
        UnlearnConfig(utility_eval="target").validate()


def test_a_worse_later_state_is_replaced_by_the_kept_checkpoint(world):
    scores = iter([0.9, 0.5, 0.8])  # step 0, step 1 (best), step 2

    def evaluate(model):
        return {"forget_accuracy": next(scores), "utility_accuracy": 1.0}

    model, tok = _fresh()
    seen = {}
    cfg = UnlearnConfig(steps=2, lr=1e-2, eval_every=1, monitor_docs=4)
    result = unlearn(model, world.forget_corpus, world.retain_corpus[:16], cfg, tokenizer=tok,
                     evaluate=lambda m: seen.setdefault(len(seen), {k: v.clone() for k, v in m.state_dict().items()})
                     and evaluate(m))  # fmt: skip
    assert result.best_step == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k


def test_rmu_with_uoe_anchors_the_router(world):
    """The anchor (Eq. 3) acts in RMU+UOE too: anchor weights 0 and 1000 train different routers."""
    routers = []
    for alpha in (0.0, 1000.0):
        model, tok = _fresh()
        cfg = UnlearnConfig(method="rmu", scope="uoe", lr=1e-3, steps=3, anchor_weight=alpha, monitor_docs=4)
        result = unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], cfg, tokenizer=tok)
        layer = result.target[0]
        lay = next(m for m in find_moe_layers(model) if m.layer_index == layer)
        routers.append(lay.router.weight.detach().clone())
    assert not torch.equal(routers[0], routers[1])


def test_rmu_refuses_an_anchored_router_above_its_layer(world):
    model, tok = _fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method="rmu", scope="uoe", target=(2, 3), rmu_layer=1, steps=1)
    with pytest.raises(ValueError, match="router of layer"):
        unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], cfg, tokenizer=tok)
    assert list(model.state_dict()) == list(state)  # the trained rows were dropped again


def test_balance_counts_forgetting_only_down_to_chance():
    from uoe_nb.unlearn import _balance

    base = {"forget_accuracy": 0.9, "utility_accuracy": 0.8}
    at_chance = _balance({"forget_accuracy": 0.25, "utility_accuracy": 0.8}, base, 0.25)
    below = _balance({"forget_accuracy": 0.05, "utility_accuracy": 0.8}, base, 0.25)
    assert at_chance == below == pytest.approx(0.65)
    # so a checkpoint below chance with lower utility no longer wins over one at chance
    worse = _balance({"forget_accuracy": 0.05, "utility_accuracy": 0.7}, base, 0.25)
    assert worse < at_chance


def test_simnpo_has_a_retain_term_and_top_k_kl_runs(world, monkeypatch):
    from uoe_nb import objectives

    seen = []
    real = objectives.retain_nll_loss
    monkeypatch.setattr(objectives, "retain_nll_loss", lambda *a: seen.append(1) or real(*a))
    _run(world, "simnpo", "uoe", steps=2, lr=1e-3, evaluate=False)
    assert len(seen) == 2  # one retain term per step, as in open-unlearning's SimNPO
    result, _, _ = _run(world, "graddiff", "uoe", steps=2, lr=1e-3, evaluate=False, retain_loss="kl", kl_top_k=16)
    assert result.steps_run == 2 and math.isfinite(result.history[-1].loss)


def test_full_vocabulary_kl_cache_beyond_the_limit_is_refused(world, monkeypatch):
    from uoe_nb import unlearn as U

    monkeypatch.setattr(U, "_KL_CACHE_LIMIT", 1024)
    model, tok = _fresh()
    cfg = UnlearnConfig(method="graddiff", retain_loss="kl", steps=2)
    with pytest.raises(ValueError, match="set kl_top_k"):
        unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], cfg, tokenizer=tok)


def test_stochastic_routing_switches_the_layer_cache_off(world, caplog):
    import logging

    model, tok = _fresh()
    model.config.router_jitter_noise = 0.01  # as PhiMoE trains
    with caplog.at_level(logging.WARNING, logger="uoe_nb.unlearn"):
        unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], UnlearnConfig(steps=1), tokenizer=tok)
    assert "routes stochastically in training (router_jitter_noise=0.01)" in caplog.text


def test_frozen_references_are_computed_in_eval_mode(world, monkeypatch):
    """With dropout on in training, NPO's reference must still be the deterministic original."""
    from uoe_nb import objectives
    from uoe_nb.routing import batches

    seen = []
    real = objectives.npo_loss
    monkeypatch.setattr(objectives, "npo_loss", lambda cur, ref, *a, **k: seen.append(ref.clone()) or real(cur, ref, *a, **k))
    model, tok = _fresh()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5  # random in train mode only
    forget = world.forget_corpus[:4]
    cfg = UnlearnConfig(method="npo", steps=1, batch_size=4, lr=1e-3, monitor_docs=4, use_layer_cache=False)
    # the batch the run sees first, scored by the original model in eval mode
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    batch = next(batches(tok, [forget[i] for i in order], batch_size=4, max_length=cfg.max_length))
    with torch.no_grad():
        expected, _ = objectives.per_sequence_nll(model.eval()(**batch).logits, batch["input_ids"], batch["attention_mask"])
    unlearn(model, forget, world.retain_corpus[:4], cfg, tokenizer=tok)
    torch.testing.assert_close(seen[0], expected)


def test_rmu_on_its_published_parameter_set_steers_the_scopes_layer(world):
    from uoe_nb.scopes import rmu_mlps

    result, before, _ = _run(world, "rmu", rmu_mlps(2), steps=2, lr=1e-3, evaluate=False)
    changed = changed_parameters(result.model, before)
    assert changed and all(int(n.split(".")[2]) <= 2 and ".mlp." in n for n in changed)
    assert result.scope.target_layer == 2


def test_a_run_that_keeps_the_original_still_makes_a_patch(world):
    model, tok = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    utilities = iter([1.0, 0.5, 0.5])  # every later checkpoint looks worse: the original (step 0) is kept

    def evaluate(m):
        return {"forget_accuracy": 0.9, "utility_accuracy": next(utilities)}

    cfg = UnlearnConfig(steps=2, lr=1e-2, eval_every=1, monitor_docs=4)
    result = unlearn(model, world.forget_corpus[:8], world.retain_corpus[:8], cfg, tokenizer=tok,
                     evaluate=evaluate, keep_original=True)  # fmt: skip
    assert result.best_step == 0 and not changed_parameters(model, before)
    patch = result.make_patch("tiny-qwen2moe")
    layer, expert = result.target
    assert patch.info.experts == {layer: [expert]} and any("gate.weight" in n for n in patch.names)
    assert all(torch.equal(e.new, e.old) for e in patch.entries.values())


def test_the_published_baselines_train_without_the_anchor(world, monkeypatch):
    """Eq. 3 is UOE's loss: a whole-model run given the attributed target is not anchored."""
    from uoe_nb import objectives

    calls = []
    real = objectives.anchor_loss
    monkeypatch.setattr(objectives, "anchor_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for scope in ("full", "experts_and_routers", "routers"):
        _run(world, "ga", scope, steps=1, lr=1e-4, evaluate=False, target=(0, 2))
    assert calls == []
    _run(world, "ga", "uoe", steps=1, lr=1e-4, evaluate=False, target=(0, 2))
    assert calls == [1]


def test_rmu_scope_without_a_layer_takes_rmu_layer(world):
    from uoe_nb.scopes import rmu_mlps

    model, tok = _fresh()
    forget, retain = world.forget_corpus[:4], world.retain_corpus[:4]
    with pytest.raises(ValueError, match="set rmu_layer"):
        unlearn(model, forget, retain, UnlearnConfig(method="rmu", scope=rmu_mlps(), steps=1), tokenizer=tok)
    result = unlearn(model, forget, retain, UnlearnConfig(method="rmu", scope=rmu_mlps(), rmu_layer=1, steps=1),
                     tokenizer=tok)  # fmt: skip
    assert result.scope.name == "RMU's MLPs (layers 0-1, all experts)" and result.scope.scope.layer == 1
