"""Attacks beyond GCG (uoe_nb.robustness, Chapter 7): relearning, quantization, routing, probing."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from toy_moe import RemoteStyleModel, random_batch

from uoe_nb import robustness as R
from uoe_nb.evaluation import MC_PROMPT, multiple_choice_accuracy
from uoe_nb.families import random_model, tiny_config
from uoe_nb.fastpath import hidden_after_layer
from uoe_nb.moe import SUPPORTED_FAMILIES, capture_routing, find_moe_layers
from uoe_nb.routing import batches
from uoe_nb.world import build_world
from uoe_nb.zoo import WORLD_SEED, load_zoo_model

ZOO_MOE = ("tiny-qwen2moe", "tiny-deepseek", "tiny-mixtral")


@pytest.fixture(scope="module")
def world():
    return build_world(WORLD_SEED)


@pytest.fixture(scope="module")
def zoo():
    model, tok = load_zoo_model("tiny-qwen2moe")
    return model, tok


@pytest.fixture(scope="module")
def split(world):
    return R.split_forget_facts(world, seed=0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    changed = [k for k, v in state.items() if not torch.equal(v, snapshot[k])]
    assert not changed, f"changed: {changed[:5]}"


def _fa(model, tok, items):
    return multiple_choice_accuracy(model, tok, items, progress=False).accuracy


# ----------------------------------------------------------------------------- 1. relearning


def test_split_is_by_crystal_disjoint_complete_and_seeded(world, split):
    names = [c["name"] for c in world.crystals]
    assert len(split.held_in) == len(split.held_out) == len(names) // 2
    assert set(split.held_in).isdisjoint(split.held_out)
    assert set(split.held_in) | set(split.held_out) == set(names)
    # Every passage of a held-in crystal is trained on, none that mentions a held-out one.
    for text in split.train_texts + split.train_qa:
        words = set(text.replace("?", " ").replace(".", " ").split())
        assert not words & set(split.held_out), text
    per_crystal = {n: sum(n in set(t.split()) for t in split.train_texts) for n in split.held_in}
    assert set(per_crystal.values()) == {2}  # the world writes two passages per crystal
    assert {q["entity"] for q in split.held_in_items} == set(split.held_in)
    assert {q["entity"] for q in split.held_out_items} == set(split.held_out)
    assert len(split.held_in_items) + len(split.held_out_items) == len(world.forget_questions)
    assert len(split.train_qa) == len(split.held_in_items)
    for line, q in zip(split.train_qa, split.held_in_items, strict=True):
        assert q["question"] in line and line.endswith(" " + q["choices"][q["answer"]])

    again = R.split_forget_facts(world, seed=0)
    assert again.held_out == split.held_out and again.train_texts == split.train_texts
    assert R.split_forget_facts(world, seed=1).held_out != split.held_out
    assert len(R.split_forget_facts(world, held_out_fraction=0.25).held_out) == 8


def test_split_rejects_bad_arguments(world):
    for fraction in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError, match="held_out_fraction"):
            R.split_forget_facts(world, held_out_fraction=fraction)
    with pytest.raises(TypeError, match="TinyWorld"):
        R.split_forget_facts({"crystals": []})


def test_first_relearning_loss_is_the_plain_next_token_nll(zoo, split):
    model, tok = zoo
    texts = split.train_texts[:3]
    # batch_size = len(texts): the first batch is all of them (in some order) and the mean over tokens is the same.
    result = R.relearn_attack(
        model, tok, texts, split.held_out_items[:4], config=R.RelearnConfig(steps=1, batch_size=3, lr=1e-4)
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            total += float(-logprobs.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert result.losses[0] == pytest.approx(total / count, rel=1e-4)


def test_relearning_measures_the_relearned_weights_then_restores_the_model_bitwise(zoo, split):
    model, tok = zoo
    items_out, items_in = split.held_out_items[:16], split.held_in_items[:16]
    before = _snapshot(model)
    model.model.embed_tokens.weight.requires_grad_(False)  # flags and mode must come back as they were
    model.train()
    try:
        # A destructive learning rate: if FA "after" is measured on the relearned weights, it collapses.
        config = R.RelearnConfig(lr=0.01, steps=3, batch_size=2, seed=0)
        result = R.relearn_attack(
            model, tok, split.train_texts[:8], items_out, held_in_items=items_in, config=config
        )
        assert model.training
        assert not model.model.embed_tokens.weight.requires_grad
        assert model.lm_head.weight.requires_grad
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.model.embed_tokens.weight.requires_grad_(True)
        model.eval()
    _assert_bitwise(model, before)
    assert result.held_out_before == _fa(model, tok, items_out)  # measured on the restored model
    assert result.held_in_before == _fa(model, tok, items_in)
    assert result.held_out_after < result.held_out_before - 0.3
    assert len(result.losses) == 3 and result.losses[-1] > result.losses[0]
    row = result.as_row(model="original")
    assert row["model"] == "original"
    assert row["relearn: FA held-out change"] == pytest.approx(result.held_out_after - result.held_out_before)
    assert row["relearn: FA held-in after"] == result.held_in_after


def test_relearning_lowers_the_training_loss_and_is_deterministic(zoo, split):
    model, tok = zoo
    texts, items = split.train_texts[:4], split.held_out_items[:4]
    config = R.RelearnConfig(lr=1e-3, steps=4, batch_size=2, seed=3)
    first = R.relearn_attack(model, tok, texts, items, config=config)
    second = R.relearn_attack(model, tok, texts, items, config=config)
    assert first.losses == second.losses
    assert first.held_in_after is None and "relearn: FA held-in after" not in first.as_row()
    other = R.relearn_attack(
        model, tok, texts, items, config=R.RelearnConfig(lr=1e-3, steps=4, batch_size=2, seed=4)
    )
    assert other.losses != first.losses  # another seed, another batch order
    same_batch = R.relearn_attack(
        model, tok, texts[:2], items, config=R.RelearnConfig(lr=1e-3, steps=4, batch_size=2)
    )
    assert same_batch.losses[-1] < same_batch.losses[0]  # one batch, four steps: its loss falls


def test_relearning_rejects_bad_arguments_before_training(zoo, split):
    model, tok = zoo
    items = split.held_out_items[:2]
    with pytest.raises(TypeError, match="one string"):
        R.relearn_attack(model, tok, "a passage", items)
    with pytest.raises(ValueError, match="empty"):
        R.relearn_attack(model, tok, [], items)
    with pytest.raises(ValueError, match="non-empty strings"):
        R.relearn_attack(model, tok, ["fine", "  "], items)
    with pytest.raises(ValueError, match="held_out_items"):
        R.relearn_attack(model, tok, ["text"], [])
    for bad in (dict(steps=0), dict(lr=0.0), dict(lr=math.nan), dict(batch_size=True), dict(grad_clip=0.0)):
        with pytest.raises(ValueError, match="RelearnConfig"):
            R.relearn_attack(model, tok, ["text"], items, config=R.RelearnConfig(**bad))


# ----------------------------------------------------------------------------- 2. quantization


def test_quantize_dequantize_matches_a_hand_computed_row():
    w = torch.tensor([[1.0, -0.4, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = R.quantize_dequantize(w, 4)  # qmax 7, scale 1/7: 7, -2.8 -> -3, 2.1 -> 2, 0
    torch.testing.assert_close(q[0], torch.tensor([1.0, -3 / 7, 2 / 7, 0.0]))
    assert torch.equal(q[1], torch.zeros(4))  # an all-zero row stays zero


@pytest.mark.parametrize("bits", R.QUANT_BITS)
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantize_dequantize_error_bound_and_levels(bits, dim):
    g = torch.Generator().manual_seed(bits)
    w = (
        torch.randn(3, 5, 40, generator=g) * torch.logspace(-3, 1, 5)[None, :, None]
    )  # rows of different scales
    if dim == -2:
        w = w.transpose(1, 2).contiguous()
    original = w.clone()
    q = R.quantize_dequantize(w, bits, dim=dim)
    assert torch.equal(w, original) and q.dtype == w.dtype and q.shape == w.shape
    scale = w.abs().amax(dim=dim, keepdim=True) / (2 ** (bits - 1) - 1)
    assert bool(((q - w).abs() <= scale / 2 * (1 + 1e-5)).all())
    assert not torch.equal(q, w)
    rows = q.movedim(dim, -1).reshape(-1, q.shape[dim])
    for row in rows:
        assert row.unique().numel() <= 2**bits
    # the largest value of each slice is represented exactly (up to float rounding)
    torch.testing.assert_close(q.abs().amax(dim=dim), w.abs().amax(dim=dim))


def test_quantize_dequantize_in_half_precision_keeps_the_dtype():
    w = torch.randn(4, 16, dtype=torch.bfloat16)
    q = R.quantize_dequantize(w, 8)
    assert q.dtype == torch.bfloat16
    scale = w.float().abs().amax(-1, keepdim=True) / 127
    assert bool(((q.float() - w.float()).abs() <= scale / 2 + w.float().abs() * 2**-7).all())


@pytest.mark.parametrize("bits", [3, 16, 2, 0, True, 8.5, "8"])
def test_unsupported_bit_widths_are_refused(zoo, bits):
    model, _ = zoo
    with pytest.raises(ValueError, match="bits must be one of"):
        R.quantize_dequantize(torch.ones(2, 2), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        with R.quantized(model, bits):
            pass


@pytest.mark.parametrize("what", [(), ("experts", "weights"), ("norms",)])
def test_unknown_or_empty_groups_are_refused(zoo, what):
    model, _ = zoo
    with pytest.raises(ValueError, match="what must be a non-empty tuple"):
        R.quantization_targets(model, what)


def test_quantization_groups_of_the_zoo_model(zoo):
    model, _ = zoo
    groups = {g: R.quantization_targets(model, (g,)) for g in R.QUANT_GROUPS}
    params = dict(model.named_parameters())
    layers = find_moe_layers(model)
    fused = {n for lay in layers for n in lay.expert_parameters()}
    assert set(groups["experts"]) == fused and len(fused) == 2 * len(layers)
    assert all(params[n].dim() == 3 and d == -1 for n, d in groups["experts"].items())
    assert set(groups["routers"]) == {f"{lay.router_name}.weight" for lay in layers}
    assert set(groups["embeddings"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    rest = set(groups["rest"])
    assert "model.layers.0.self_attn.q_proj.weight" in rest
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in rest
    assert "model.layers.0.mlp.shared_expert_gate.weight" in rest
    names = [set(v) for v in groups.values()]
    assert sum(map(len, names)) == len(set().union(*names))  # the groups are disjoint
    every = set().union(*names)
    assert not any(n.endswith("bias") or "norm" in n for n in every)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert (
        linear | fused | {f"{lay.router_name}.weight" for lay in layers} | {"model.embed_tokens.weight"}
        == every
    )
    assert set(R.quantization_targets(model, ("experts", "rest"))) == fused | rest


def test_experts_of_a_transposed_family_are_scaled_per_output_column():
    model = random_model(tiny_config("gpt_oss", experts=4, top_k=2, intermediate=24), seed=0)
    hidden = model.config.hidden_size
    params = dict(model.named_parameters())
    targets = R.quantization_targets(model, ("experts",))
    assert targets and all(d == -2 for d in targets.values())
    for name, dim in targets.items():
        assert params[name].dim() == 3
        # the scale runs over the input dimension: hidden for gate-up, intermediate for down
        assert params[name].shape[dim] == (hidden if "gate_up" in name else 24)


def test_quantized_rounds_only_the_selected_groups_and_restores_bitwise(zoo):
    model, _ = zoo
    before = _snapshot(model)
    experts = set(R.quantization_targets(model, ("experts",)))
    with R.quantized(model, 4, ("experts",)) as names:
        assert set(names) == experts
        state = model.state_dict()
        for name in experts:
            w = state[name]
            assert not torch.equal(w, before[name])
            levels = [
                row.unique().numel() for row in w.reshape(-1, w.shape[-1])
            ]  # per expert, per output row
            assert max(levels) <= 16
            torch.testing.assert_close(w, R.quantize_dequantize(before[name], 4), rtol=0, atol=0)
        untouched = [k for k in state if k not in experts and not torch.equal(state[k], before[k])]
        assert not untouched
    _assert_bitwise(model, before)

    rest = set(R.quantization_targets(model, ("rest",)))
    with pytest.raises(RuntimeError, match="inside"):
        with R.quantized(model, 8, ("rest",)):
            state = model.state_dict()
            assert all(not torch.equal(state[k], before[k]) for k in rest)
            assert all(torch.equal(state[k], before[k]) for k in state if k not in rest)
            raise RuntimeError("inside")
    _assert_bitwise(model, before)


def test_quantization_attack_scores_the_rounded_model_and_restores_it(zoo, world):
    model, tok = zoo
    forget, utility = world.forget_questions[:32], world.utility_questions[:16]
    before = _snapshot(model)
    every = R.QUANT_GROUPS
    result = R.quantization_attack(model, tok, forget, utility, what=every, name="q")
    _assert_bitwise(model, before)
    assert result.forget_full == _fa(model, tok, forget)
    assert result.utility_full == _fa(model, tok, utility)
    with R.quantized(model, 4, every):
        fa4 = _fa(model, tok, forget)
    assert (
        result.forget[4] == fa4 and fa4 != result.forget_full
    )  # 4 bits everywhere changes this model's answers
    assert set(result.forget) == set(result.utility) == set(R.QUANT_BITS)
    assert result.tensors == len(R.quantization_targets(model, every))
    assert 0 < result.relative_error[8] < result.relative_error[4] / 8  # each bit halves the step
    row = result.as_row()
    assert {"q: FA full", "q: FA 8-bit", "q: FA 4-bit", "q: UT full", "q: UT 8-bit", "q: UT 4-bit"} == set(
        row
    )
    only_fa = R.quantization_attack(model, tok, forget, bits=8, what="experts")
    assert only_fa.utility_full is None and set(only_fa.as_row()) == {"quant: FA full", "quant: FA 8-bit"}
    with pytest.raises(ValueError, match="bits is empty"):
        R.quantization_attack(model, tok, forget, bits=())


def test_quantization_refuses_experts_of_a_dense_model():
    model = random_model(tiny_config("dense"), seed=0)
    with pytest.raises(ValueError, match="no routed experts"):
        R.quantization_targets(model, ("experts",))
    assert R.quantization_targets(model, ("rest",))  # the dense model's linear layers


# ----------------------------------------------------------------------------- 3. routing


def _forget_batch(tok, world, n=6):
    prompts = [MC_PROMPT.format(question=q["question"]) for q in world.forget_questions[:n]]
    return next(batches(tok, prompts, batch_size=n))


def _route(model, batch, layer):
    with torch.no_grad(), capture_routing(model, [layer]) as cap:
        out = model(**batch).logits
    rec = cap[layer][0]
    real = rec.mask.bool()
    return rec.logits[real], rec.selected()[real], out


@pytest.fixture(scope="module", params=ZOO_MOE)
def family(request, world):
    model, tok = load_zoo_model(request.param)
    return request.param, model, tok, _forget_batch(tok, world)


def test_routing_patch_forces_and_avoids_exactly_as_specified(family):
    name, model, tok, batch = family
    for lay in find_moe_layers(model)[:2]:
        layer, k = lay.layer_index, lay.top_k
        logits, selected, _ = _route(model, batch, layer)
        expert = int(selected.sum(0).argmax())  # the expert these tokens use most
        others = logits.clone()
        others[:, expert] = -math.inf
        with R.routing_patch(model, layer, expert, "force") as patched:
            assert patched.layer_index == layer
            _, forced, _ = _route(model, batch, layer)
        expected = torch.zeros_like(forced)
        expected.scatter_(1, others.topk(k - 1, dim=1).indices, True)
        expected[:, expert] = True  # the expert, plus the k-1 best of the others
        assert torch.equal(forced, expected), name
        with R.routing_patch(model, layer, expert, "avoid"):
            _, avoided, _ = _route(model, batch, layer)
        expected = torch.zeros_like(avoided).scatter_(1, others.topk(k, dim=1).indices, True)
        assert torch.equal(avoided, expected), name
        assert not avoided[:, expert].any() and forced[:, expert].all()
        assert selected[:, expert].any() and not selected[:, expert].all()  # the patch made a difference
        again_logits, again, _ = _route(model, batch, layer)
        assert torch.equal(again, selected) and torch.equal(again_logits, logits)  # routing as before
        assert "forward" not in vars(lay.router)


def test_an_avoided_expert_no_longer_matters(family):
    name, model, tok, batch = family
    lay = find_moe_layers(model)[0]
    _, selected, _ = _route(model, batch, lay.layer_index)
    expert = int(selected.sum(0).argmax())
    with R.routing_patch(model, lay.layer_index, expert, "avoid"):
        _, _, out = _route(model, batch, lay.layer_index)
    with R.preserved(model):
        with torch.no_grad():
            for p in lay.single_expert_parameters(expert).values():
                p.mul_(-3.0).add_(0.5)
        with R.routing_patch(model, lay.layer_index, expert, "avoid"):
            _, _, perturbed = _route(model, batch, lay.layer_index)
        _, _, unpatched = _route(model, batch, lay.layer_index)
    torch.testing.assert_close(perturbed, out, rtol=0, atol=1e-6)
    assert (unpatched - out).abs().max() > 1e-3, name  # without the patch the expert's weights count


def test_routing_patch_errors_are_clear(family):
    name, model, _, batch = family
    lay = find_moe_layers(model)[0]
    layer, n = lay.layer_index, lay.num_experts
    for expert in (-1, n, 2.0, True):
        with pytest.raises(IndexError, match="out of range"):
            with R.routing_patch(model, layer, expert, "force"):
                pass
    with pytest.raises(IndexError, match="no routed experts"):
        with R.routing_patch(model, 99, 0, "force"):
            pass
    if name == "tiny-deepseek":  # its first layer is dense
        with pytest.raises(IndexError, match="no routed experts"):
            with R.routing_patch(model, 0, 0, "avoid"):
                pass
    with pytest.raises(ValueError, match="mode must be one of"):
        with R.routing_patch(model, layer, 0, "prefer"):
            pass
    for margin in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="margin"):
            with R.routing_patch(model, layer, 0, "force", margin=margin):
                pass
    with R.routing_patch(model, layer, 0, "force"):
        with pytest.raises(RuntimeError, match="already patched"):
            with R.routing_patch(model, layer, 1, "avoid"):
                pass
    _, before, _ = _route(model, batch, layer)
    with pytest.raises(KeyError):
        with R.routing_patch(model, layer, 0, "force"):
            raise KeyError("inside")
    assert "forward" not in vars(lay.router)
    _, after, _ = _route(model, batch, layer)
    assert torch.equal(before, after)


def test_avoid_needs_more_experts_than_top_k():
    model = random_model(tiny_config("mixtral", experts=2, top_k=2), seed=0)
    with pytest.raises(ValueError, match="no expert can be avoided"):
        with R.routing_patch(model, 0, 1, "avoid"):
            pass


@pytest.mark.parametrize("family_name", SUPPORTED_FAMILIES)
def test_routing_patch_on_every_supported_family(family_name):
    model = random_model(tiny_config(family_name, experts=8, top_k=2), seed=1)
    batch = random_batch()
    lay = find_moe_layers(model)[-1]
    with R.routing_patch(model, lay.layer_index, 3, "avoid"):
        _, avoided, _ = _route(model, batch, lay.layer_index)
    assert not avoided[:, 3].any()
    if family_name == "deepseek_v3":  # group-limited routing can refuse: the patch says so
        with pytest.raises(RuntimeError, match="did not select expert 3"):
            with R.routing_patch(model, lay.layer_index, 3, "force"):
                model(**batch)
        return
    with R.routing_patch(model, lay.layer_index, 3, "force"):
        _, forced, _ = _route(model, batch, lay.layer_index)
    assert forced[:, 3].all()


def test_routing_patch_on_a_router_that_returns_logits_only():
    model = RemoteStyleModel(dense_first=False).eval()
    batch = random_batch(vocab=50)
    lay = find_moe_layers(model)[0]
    with torch.no_grad():
        with R.routing_patch(model, lay.layer_index, 2, "avoid"):
            out = model(**batch)
        with R.preserved(model):
            lay.experts[2].weight.mul_(5.0)
            with R.routing_patch(model, lay.layer_index, 2, "avoid"):
                perturbed = model(**batch)
            unpatched = model(**batch)
        with R.routing_patch(model, lay.layer_index, 2, "force"), capture_routing(model, [0]) as cap:
            model(**batch)
    torch.testing.assert_close(perturbed, out, rtol=0, atol=1e-6)  # the block's own top-k obeyed the patch
    assert (unpatched - out).abs().max() > 1e-3
    assert cap[0][0].selected()[..., 2][batch["attention_mask"].bool()].all()


def test_routing_attack_measures_each_mode_and_changes_nothing(zoo, world):
    model, tok = zoo
    items = world.forget_questions[:24]
    before = _snapshot(model)
    lay = find_moe_layers(model)[1]
    result = R.routing_attack(model, tok, items, layer=lay.layer_index, expert=5, utility_items=items[:8])
    _assert_bitwise(model, before)
    assert set(result.forget) == set(result.utility) == set(result.selected) == {"none", "force", "avoid"}
    assert result.forget["none"] == _fa(model, tok, items)
    with R.routing_patch(model, lay.layer_index, 5, "avoid"):
        assert result.forget["avoid"] == _fa(model, tok, items)
    assert result.selected["force"] == 1.0 and result.selected["avoid"] == 0.0
    assert 0.0 < result.selected["none"] < 1.0
    row = result.as_row()
    assert row["routing: FA force"] == result.forget["force"]
    assert row["routing: expert share none"] == result.selected["none"]
    only = R.routing_attack(model, tok, items[:4], layer=lay.layer_index, expert=5, modes="avoid", name="r")
    assert set(only.forget) == {"none", "avoid"} and not only.utility and "r: FA avoid" in only.as_row()
    for bad in ((), ("force", "both")):
        with pytest.raises(ValueError, match="modes"):
            R.routing_attack(model, tok, items, layer=lay.layer_index, expert=5, modes=bad)
    with pytest.raises(IndexError):
        R.routing_attack(model, tok, items, layer=lay.layer_index, expert=16)


# ----------------------------------------------------------------------------- 4. probing


def test_probe_data_trains_on_neighbours_and_tests_on_targets(world):
    data = R.probe_data(world)
    targets, neighbours = world.forget_targets, world.neighbors
    assert len(data.train_prompts) == len(data.test_prompts) == 8 * 4 * 2  # people x attributes x levels
    for prompt in data.train_prompts:
        assert any(n in prompt for n in neighbours) and not any(t in prompt for t in targets)
    for prompt in data.test_prompts:
        assert any(t in prompt for t in targets) and not any(n in prompt for n in neighbours)
    assert all(p.endswith("Answer:") for p in data.train_prompts + data.test_prompts)
    people = {p["name"]: p for p in world.people}
    for prompt, label, attr in zip(data.test_prompts, data.test_labels, data.test_attributes, strict=True):
        person = next(p for n, p in people.items() if n in prompt)
        assert person[attr] == label and label in data.candidates[attr]
    one = R.probe_data(world, attributes="pet")
    assert set(one.train_attributes) == {"pet"} and set(one.candidates) == {"pet"}


def test_probe_data_on_crystals_uses_the_split(world, split):
    data = R.probe_data(world, domain="crystals", attributes=("colour", "mine"), seed=0)
    assert (
        len(data.train_prompts) == len(split.held_in) * 2
        and len(data.test_prompts) == len(split.held_out) * 2
    )
    for prompt in data.test_prompts:
        assert any(f" {n} " in prompt for n in split.held_out)
    assert set(data.candidates["colour"]) == {c["colour"] for c in world.crystals}
    with pytest.raises(ValueError, match="domain must be one of"):
        R.probe_data(world, domain="planets")
    with pytest.raises(ValueError, match="attributes"):
        R.probe_data(world, attributes=("colour",))  # a crystal attribute in the people domain
    with pytest.raises(ValueError, match="attributes"):
        R.probe_data(world, attributes=())


@pytest.mark.parametrize("side", ["left", "right"])
def test_hidden_features_do_not_depend_on_padding(zoo, side):
    model, tok = zoo
    prompts = ["Question: what colour is it ?\nAnswer:", "a short one", "the vorn crystal grows a lattice"]
    old = tok.padding_side
    tok.padding_side = side
    try:
        last = R.hidden_features(model, tok, prompts, layer=1, pooling="last")
        mean = R.hidden_features(model, tok, prompts, layer=-1, pooling="mean")
    finally:
        tok.padding_side = old
    n_layers = len(model.model.layers)
    for i, prompt in enumerate(prompts):
        single = dict(tok([prompt], return_tensors="pt"))
        with torch.no_grad():
            h1 = hidden_after_layer(model, single, 1)[0]
            h_last = hidden_after_layer(model, single, n_layers - 1)[0]
        torch.testing.assert_close(last[i], h1[-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mean[i], h_last.mean(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(IndexError, match="out of range"):
        R.hidden_features(model, tok, prompts, layer=n_layers)
    with pytest.raises(ValueError, match="pooling"):
        R.hidden_features(model, tok, prompts, pooling="max")


def _planted(data, signal: bool, seed=0):
    """Features where each example's label is (or is not) written along its own direction."""
    classes = [(a, v) for a in sorted(data.candidates) for v in data.candidates[a]]
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(classes), 48, generator=g)

    def features(prompts, labels, attrs):
        noise = torch.randn(len(prompts), 48, generator=g)
        if not signal:
            return noise
        return noise * 0.3 + directions[[classes.index((a, v)) for a, v in zip(attrs, labels, strict=True)]]

    table = {
        id(data.train_prompts): features(data.train_prompts, data.train_labels, data.train_attributes),
        id(data.test_prompts): features(data.test_prompts, data.test_labels, data.test_attributes),
    }
    return lambda model, tok, prompts, **kw: table[id(prompts)]


def test_probe_training_reads_a_planted_signal_and_not_noise(world, monkeypatch):
    data = R.probe_data(world, domain="crystals")  # most test values occur in training here
    model = RemoteStyleModel()  # never called: the features are planted
    monkeypatch.setattr(R, "hidden_features", _planted(data, signal=True))
    planted = R.probe_attack(model, None, data, layer=0, steps=200)
    assert planted.train_accuracy == 1.0
    assert planted.test_accuracy == pytest.approx(planted.coverage)  # everything it can know, it gets
    monkeypatch.setattr(R, "hidden_features", _planted(data, signal=False))
    noise = R.probe_attack(model, None, data, layer=0, steps=200)
    assert noise.train_accuracy > 0.9  # 64 points in 48 dimensions: it memorises them
    assert noise.test_accuracy < 0.35  # and learns nothing that transfers (chance 0.125)
    # whatever it reads, each answer is a value of the example's own attribute
    for result in (planted, noise):
        for attr, value in zip(data.test_attributes, result.test_predictions, strict=True):
            assert value in data.candidates[attr]
    assert planted.test_accuracy == pytest.approx(
        sum(p == v for p, v in zip(planted.test_predictions, data.test_labels, strict=True))
        / len(data.test_labels)
    )


def test_probe_baselines_are_computed_from_the_data(world, zoo):
    model, tok = zoo
    data = R.probe_data(world, attributes=("city", "pet"))
    result = R.probe_attack(model, tok, data, steps=50)
    pairs = list(zip(data.test_attributes, data.test_labels, strict=True))
    train = list(zip(data.train_attributes, data.train_labels, strict=True))
    assert result.chance == pytest.approx(sum(1 / len(data.candidates[a]) for a, _ in pairs) / len(pairs))
    assert result.coverage == pytest.approx(sum(p in train for p in pairs) / len(pairs))
    majority = {}
    for a in data.candidates:
        counts = {v: train.count((a, v)) for v in data.candidates[a]}
        majority[a] = max(sorted(counts), key=lambda v: counts[v])
    assert result.majority == pytest.approx(sum(majority[a] == v for a, v in pairs) / len(pairs))
    assert result.n_train == len(train) and result.n_test == len(pairs)
    assert result.test_accuracy <= result.coverage
    assert set(result.test_by_attribute) == {"city", "pet"}
    assert result.layer == len(model.model.layers) - 1 and result.pooling == "last"


def test_probe_finds_the_targets_facts_in_the_original_but_not_in_the_oracle(world, zoo):
    model, tok = zoo
    oracle, _ = load_zoo_model("tiny-qwen2moe-oracle")
    data = R.probe_data(world)
    before = _snapshot(model)
    original = R.probe_attack(model, tok, data)
    again = R.probe_attack(model, tok, data)
    retrained = R.probe_attack(oracle, tok, data)
    _assert_bitwise(model, before)
    assert original == again  # deterministic
    assert original.train_accuracy == retrained.train_accuracy == 1.0
    assert original.test_accuracy > retrained.test_accuracy + 0.2  # the oracle never saw the targets
    assert retrained.test_accuracy < 0.35
    with pytest.raises(TypeError, match="ProbeData"):
        R.probe_attack(model, tok, {"train_prompts": []})
    with pytest.raises(ValueError, match="steps"):
        R.probe_attack(model, tok, data, steps=0)


# ----------------------------------------------------------------------------- running attacks


def test_run_attacks_builds_one_row_per_model(zoo, world):
    model, tok = zoo
    other = RemoteStyleModel()
    events = []

    @contextlib.contextmanager
    def patched():
        events.append("enter")
        try:
            yield model
        finally:
            events.append("exit")

    def size(m):
        return {"parameters": sum(p.numel() for p in m.parameters())}

    def training(m):
        return R.RoutingResult(0, 0, {"none": float(m.training)}, {}, {"none": 0.5}, name="mode")

    table = R.run_attacks({"original": model, "patched": patched, "toy": other}, [size, training])
    assert list(table.index) == ["original", "patched", "toy"] and table.index.name == "model"
    assert list(table.columns) == ["parameters", "mode: FA none", "mode: expert share none"]
    assert table.loc["toy", "parameters"] == sum(p.numel() for p in other.parameters())
    assert table.loc["patched", "parameters"] == table.loc["original", "parameters"]
    assert events == ["enter", "exit"]

    probe = functools.partial(
        R.probe_attack, tokenizer=tok, data=R.probe_data(world, attributes="pet"), steps=20
    )
    real = R.run_attacks({"original": model}, [probe])
    assert real.loc["original", "probe: chance"] == pytest.approx(probe(model).chance)

    with pytest.raises(ValueError, match="different name"):
        R.run_attacks({"original": model}, [size, size])
    with pytest.raises(ValueError, match="models"):
        R.run_attacks({}, [size])
    with pytest.raises(ValueError, match="attacks"):
        R.run_attacks({"original": model}, [])
    with pytest.raises(TypeError, match="as_row"):
        R.run_attacks({"original": model}, [lambda m: 3.0])


# ----------------------------------------------------------------------------- tables and figures


def _result_table():
    """A run_attacks-style table built from the results' own rows (no model involved)."""
    import pandas as pd

    cfg = R.RelearnConfig()
    rows = {
        "original": (
            R.QuantizationResult(("experts", "rest"), 0.9, {8: 0.89, 4: 0.8}, 1.0, {8: 1.0, 4: 0.95}, {}, 3),
            R.RoutingResult(
                0, 2, {"none": 0.9, "force": 0.85, "avoid": 0.88}, {"none": 1.0, "avoid": 0.97}, {"none": 0.4}
            ),
            R.RelearnResult(0.92, 0.7, 0.9, 1.0, [2.0, 1.0], cfg),
            R.LinearProbeResult(1.0, 0.5, {}, 0.125, 0.1, 0.9, 10, 8, 3, "last"),
        ),
        "unlearned": (
            R.QuantizationResult(("experts", "rest"), 0.3, {8: 0.31, 4: 0.35}, 0.8, {8: 0.8, 4: 0.7}, {}, 3),
            R.RoutingResult(
                0,
                2,
                {"none": 0.3, "force": 0.28, "avoid": 0.84},
                {"none": 0.8, "avoid": 0.99},
                {"none": 0.97},
            ),
            R.RelearnResult(0.33, 0.6, 0.3, 0.9, [3.0, 1.5], cfg),
            R.LinearProbeResult(0.9, 0.2, {}, 0.125, 0.1, 0.9, 10, 8, 3, "last"),
        ),
    }
    data = []
    for model, results in rows.items():
        row = {"model": model}
        for result in results:
            row.update(result.as_row())
        data.append(row)
    return pd.DataFrame(data).set_index("model")


def test_attack_columns_and_tables_split_the_table_by_attack():
    table = _result_table()
    routing = R.attack_columns(table, "routing")
    assert list(routing.columns) == [
        "FA none", "FA force", "FA avoid", "UT none", "UT avoid", "expert share none"
    ]  # fmt: skip
    assert routing.loc["unlearned", "FA avoid"] == 0.84 and list(routing.index) == ["original", "unlearned"]
    with pytest.raises(
        KeyError, match=r"no columns of attack 'rout'.*'probe', 'quant', 'relearn', 'routing'"
    ):
        R.attack_columns(table, "rout")  # a prefix of a name is not the name

    table["parameters"] = 7  # a plain column belongs to no attack
    tables = R.attack_tables(table)
    assert list(tables) == ["quant", "routing", "relearn", "probe"]
    assert tables["probe"].loc["original", "test acc"] == 0.5
    assert sum(len(t.columns) for t in tables.values()) == len(table.columns) - 1


def test_forget_accuracy_table_takes_each_setting_from_its_attack():
    table = _result_table()
    fa = R.forget_accuracy_table(table)
    assert list(fa.columns) == [
        "no attack", "8-bit", "4-bit", "expert forced", "expert avoided", "held-out", "held-out, relearned"
    ]  # fmt: skip
    assert fa.loc["unlearned"].tolist() == [0.3, 0.31, 0.35, 0.28, 0.84, 0.33, 0.6]
    assert fa.loc["original"].tolist() == [0.9, 0.89, 0.8, 0.85, 0.88, 0.92, 0.7]

    routing_only = table[[c for c in table.columns if c.startswith("routing: ")]]
    fa = R.forget_accuracy_table(routing_only)  # "no attack" falls back to the unpatched routing FA
    assert list(fa.columns) == ["no attack", "expert forced", "expert avoided"]
    assert fa["no attack"].tolist() == [0.9, 0.3]
    renamed = routing_only.rename(columns=lambda c: c.replace("routing: ", "r: "))
    assert R.forget_accuracy_table(renamed, routing="r").equals(fa)
    with pytest.raises(KeyError, match="no columns of the attacks"):
        R.forget_accuracy_table(renamed)


def test_plot_attacks_draws_every_setting_of_every_model_and_the_probe():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _result_table()
    fig = R.plot_attacks(table, title="t")
    fa_ax, probe_ax = fig.axes
    bars = [p for p in fa_ax.patches]
    assert len(bars) == 2 * 7  # two models, seven settings
    assert sorted(round(b.get_height(), 2) for b in bars) == sorted(
        R.forget_accuracy_table(table).to_numpy().ravel().round(2).tolist()
    )
    assert [t.get_text() for t in fa_ax.get_xticklabels()][-1] == "held-out, relearned"
    assert fa_ax.get_ylabel().startswith("forget accuracy") and fa_ax.get_title() == "t"
    assert [round(b.get_height(), 2) for b in probe_ax.patches] == [0.5, 0.2]
    assert probe_ax.get_ylabel().startswith("probe accuracy")
    plt.close(fig)

    no_probe = table[[c for c in table.columns if not c.startswith("probe: ")]]
    fig = R.plot_attacks(no_probe, chance=None)
    assert len(fig.axes) == 1 and not fig.axes[0].get_lines()  # no chance line either
    plt.close(fig)
