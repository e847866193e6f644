"""Scopes: after a few AdamW steps exactly the parameters a scope names have changed."""

import copy
import io
import re

import pytest
import torch
from torch import nn

from uoe_nb import scopes as S
from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import NoMoELayersError, changed_parameters, find_moe_layers
from uoe_nb.trainable import make_trainable, trained_rows

FAMILIES = ["qwen2_moe", "deepseek_v2", "mixtral"]  # shared expert / first layer dense / plain


def _model(family="qwen2_moe", seed=0):
    return random_model(tiny_config(family, experts=8, top_k=2), seed=seed)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".trained." not in n}


def _train(result, steps=3, weight_decay=0.1, seed=0):
    """A few AdamW steps of next-token NLL on random tokens: every parameter gets gradient."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (4, 24), generator=g)
    opt = torch.optim.AdamW(result.param_groups(weight_decay), lr=1e-2)
    result.model.train()
    for _ in range(steps):
        opt.zero_grad()
        result.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        result.write_back()
    result.model.eval()


def _expected(model, experts=None, routers=(), shared=()):
    """What changed_parameters should report: expert rows, whole routers, whole shared experts."""
    out = {}
    for lay in find_moe_layers(model):
        rows = (experts or {}).get(lay.layer_index, [])
        if rows:
            for name, p in lay.expert_parameters().items():
                keep = torch.zeros(p.shape[0], dtype=torch.bool)
                keep[list(rows)] = True
                out[name] = keep
        if lay.layer_index in routers:
            out.update(dict.fromkeys(lay.router_parameters(), True))
        if lay.layer_index in shared:
            out.update(dict.fromkeys(lay.shared_parameters(), True))
    return out


def _assert_changed(model, reference, expected):
    changed = changed_parameters(model, reference)
    assert set(changed) == set(expected), set(changed) ^ set(expected)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(changed[name], value), (name, changed[name], value)
    return changed


def _observed_count(model, changed):
    """Parameters in the tensors / expert rows that actually moved."""
    params = dict(model.named_parameters())
    total = 0
    for name, value in changed.items():
        p = params[name]
        total += int(value.sum()) * p[0].numel() if isinstance(value, torch.Tensor) else p.numel()
    return total


def _all_experts(model):
    return {lay.layer_index: list(range(lay.num_experts)) for lay in find_moe_layers(model)}


# --------------------------------------------------------------------------------------
# UOE and its variants
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_uoe_from_target_changes_one_expert_and_its_router(family):
    model = _model(family)
    ref = _snapshot(model)
    result = S.apply_scope(model, S.uoe(), target=(2, 5))
    assert result.name == "UOE (layer 2, expert 5)"
    assert (result.target_layer, result.experts, result.routers) == (2, {2: [5]}, [2])
    assert result.model is model
    _train(result)
    changed = _assert_changed(model, ref, _expected(model, {2: [5]}, routers=[2]))
    assert result.num_trainable == _observed_count(model, changed)
    lay = find_moe_layers(model)[-1]
    by_hand = sum(p.shape[1:].numel() for p in lay.expert_parameters().values())
    by_hand += sum(p.numel() for p in lay.router_parameters().values())
    assert result.num_trainable == by_hand
    assert result.num_total == sum(p.numel() for p in _snapshot(model).values())  # the model, not its split rows
    assert result.fraction == pytest.approx(by_hand / result.num_total)


def test_uoe_explicit_without_router_and_with_shared():
    model = _model("qwen2_moe")
    ref = _snapshot(model)
    result = S.apply_scope(model, S.uoe(1, 3, include_router=False))
    assert result.name == "UOE (layer 1, expert 3, router frozen)" and result.routers == []
    _train(result)
    _assert_changed(model, ref, _expected(model, {1: [3]}))

    model = _model("qwen2_moe")
    ref = _snapshot(model)
    result = S.apply_scope(model, S.uoe(include_shared=True), target=(0, 1))
    _train(result)
    changed = _assert_changed(model, ref, _expected(model, {0: [1]}, routers=[0], shared=[0]))
    assert result.num_trainable == _observed_count(model, changed)


def test_uoe_target_from_attribution_like_object():
    class Attribution:
        target = (1, 6)
        scores = {1: torch.ones(8)}

    result = S.apply_scope(_model("mixtral"), S.uoe(), target=Attribution(), affinity=Attribution())
    assert result.experts == {1: [6]}


def test_k_experts_top_k_by_affinity_and_explicit():
    model = _model("deepseek_v2")
    affinity = {2: torch.tensor([0.1, 0.5, 0.05, 0.3, 0.2, 0.0, 0.0, 0.15])}
    ref = _snapshot(model)
    result = S.apply_scope(model, S.k_experts(2, 3), affinity=affinity)
    assert result.experts == {2: [1, 3, 4]} and result.routers == [2] and result.target_layer == 2
    assert result.name.startswith("Top-3 experts (layer 2, experts 1, 3, 4")
    _train(result)
    changed = _assert_changed(model, ref, _expected(model, {2: [1, 3, 4]}, routers=[2]))
    assert result.num_trainable == _observed_count(model, changed)

    model = _model("deepseek_v2")
    ref = _snapshot(model)
    result = S.apply_scope(model, S.k_experts(1, [6, 0, 6], include_router=False))
    _train(result)
    _assert_changed(model, ref, _expected(model, {1: [0, 6]}))


def test_per_layer_experts_takes_each_layers_top_expert():
    model = _model("qwen2_moe")
    affinity = {
        0: torch.tensor([0.0, 0.1, 0.9, 0, 0, 0, 0, 0]),
        1: torch.tensor([0.3, 0, 0, 0, 0, 0, 0, 0.7]),
        2: torch.tensor([0, 0, 0, 0, 1.0, 0, 0, 0]),
    }
    ref = _snapshot(model)
    result = S.apply_scope(model, S.per_layer_experts(), affinity=affinity)
    assert result.experts == {0: [2], 1: [7], 2: [4]} and result.routers == [0, 1, 2]
    _train(result)
    changed = _assert_changed(model, ref, _expected(model, {0: [2], 1: [7], 2: [4]}, routers=[0, 1, 2]))
    assert result.num_trainable == _observed_count(model, changed)
    picked = S.apply_scope(_model("qwen2_moe"), S.per_layer_experts([2, 0]), affinity=affinity)
    assert picked.experts == {0: [2], 2: [4]} and picked.routers == [0, 2]


def test_random_expert_is_seeded_and_never_the_target():
    picks = set()
    model = _model()
    for seed in range(12):
        a = S.apply_scope(model, S.random_expert(), target=(1, 4), seed=seed)
        b = S.apply_scope(model, S.random_expert(), target=(1, 4), seed=seed)
        assert a.experts == b.experts and a.target_layer == 1 and a.routers == [1]
        (expert,) = a.experts[1]
        assert expert != 4
        picks.add(expert)
    assert len(picks) > 2
    model = _model()
    ref = _snapshot(model)
    result = S.apply_scope(model, S.random_expert(layer=2), target=(1, 4), seed=3)
    (expert,) = result.experts[2]
    assert result.name == f"Random expert (layer 2, expert {expert})"
    _train(result)
    _assert_changed(model, ref, _expected(model, {2: [expert]}, routers=[2]))


# --------------------------------------------------------------------------------------
# Broad scopes (Table 1) and ESFT
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_broad_scopes(family):
    cases = {
        "experts": (S.experts_only(), True, False, True),
        "experts_no_shared": (S.experts_only(include_shared=False), True, False, False),
        "routers": (S.routers_only(), False, True, False),
        "experts_and_routers": (S.experts_and_routers(), True, True, True),
    }
    for label, (scope, experts, routers, shared) in cases.items():
        model = _model(family)
        ref = _snapshot(model)
        result = S.apply_scope(model, scope)
        _train(result)
        moe = [lay.layer_index for lay in find_moe_layers(model)]
        with_shared = [i for i, lay in zip(moe, find_moe_layers(model), strict=True) if lay.shared_parameters()]
        expected = _expected(
            model,
            _all_experts(model) if experts else None,
            routers=moe if routers else (),
            shared=with_shared if shared else (),
        )
        changed = _assert_changed(model, ref, expected)
        assert result.num_trainable == _observed_count(model, changed), label


def test_full_scope_changes_every_parameter():
    model = _model("deepseek_v2")
    ref = _snapshot(model)
    result = S.apply_scope(model, S.full())
    assert result.num_trainable == result.num_total == sum(p.numel() for p in model.parameters())
    assert result.fraction == 1.0 and result.routers == [1, 2]
    _train(result)
    changed = changed_parameters(model, ref)
    assert set(changed) == {n for n, _ in model.named_parameters()}
    assert all(bool(v.all()) if isinstance(v, torch.Tensor) else v for v in changed.values())


def test_param_groups_hold_only_what_trains():
    model = _model()
    fused = {id(p) for lay in find_moe_layers(model) for p in lay.expert_parameters().values()}
    groups = S.apply_scope(model, S.uoe(1, 2)).param_groups(0.1)
    owned = {id(p) for g in groups for p in g["params"]}
    assert not owned & fused  # the trained expert is its own parameter; fused tensors stay frozen
    rows = trained_rows(find_moe_layers(model)[1].experts)
    assert {id(p) for p in rows.parameters()} <= owned and rows.experts == (2,)
    # every row of every fused tensor trains: the fused tensors themselves are optimised
    groups = S.apply_scope(model, S.experts_only()).param_groups(0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert fused <= decayed


def test_esft_picks_experts_until_the_cumulative_share_reaches_top_p():
    model = _model("deepseek_v2")
    affinity = {
        1: torch.tensor([5.0, 3.0, 2.0, 0, 0, 0, 0, 0]),  # shares 0.5, 0.3, 0.2
        2: torch.tensor([0.0, 0.0, 0.0, 0.2, 0.0, 0.3, 0.0, 0.5]) * 1e-3,  # same shares, tiny scale
    }
    picks = {p: S.apply_scope(_model("deepseek_v2"), S.esft(p), affinity=affinity).experts for p in (0.6, 0.5, 0.81)}
    assert picks[0.6] == {1: [0, 1], 2: [5, 7]}
    assert picks[0.5] == {1: [0], 2: [7]}
    assert picks[0.81] == {1: [0, 1, 2], 2: [3, 5, 7]}
    uniform = S.apply_scope(_model("deepseek_v2"), S.esft(0.15), affinity={1: torch.ones(8), 2: torch.ones(8)})
    assert uniform.experts == {1: [0, 1], 2: [0, 1]}  # 1/8 < 0.15 <= 2/8; ties to the lower index
    # Per-layer normalisation: a layer whose affinities are 1000x smaller still gets its own
    # experts; normalising across layers (the public script) would give layer 2 a share < top_p.
    ref = _snapshot(model)
    result = S.apply_scope(model, S.esft(0.6), affinity=affinity)
    assert result.routers == [] and result.name == "ESFT (top-p 0.6, 4 experts)"
    _train(result)
    changed = _assert_changed(model, ref, _expected(model, {1: [0, 1], 2: [5, 7]}))
    assert result.num_trainable == _observed_count(model, changed)
    with_router = S.apply_scope(_model("deepseek_v2"), S.esft(0.6, include_router=True), affinity=affinity)
    assert with_router.routers == [1, 2]


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def _lora_count_by_hand(model, rank, experts=True):
    """r * (in + out) per linear layer (no head, no router); r * E * (d1 + d2) per fused tensor."""
    routers = {lay.router_name for lay in find_moe_layers(model)} if experts is not None else set()
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and name not in routers:
            count += rank * (module.in_features + module.out_features)
    if experts:
        for lay in find_moe_layers(model):
            for p in lay.expert_parameters().values():
                if p.dim() == 3:
                    count += rank * p.shape[0] * (p.shape[1] + p.shape[2])
    return count


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_lora_trains_adapters_only_and_leaves_base_weights_bitwise(family):
    model = _model(family)
    routers = {lay.router_name: lay.router for lay in find_moe_layers(model)}
    by_hand = _lora_count_by_hand(model, rank=4)
    num_total = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ref = _snapshot(model)
    result = S.apply_scope(model, S.lora(rank=4, alpha=8))
    assert result.model is not model and result.routers == [] and result.num_total == num_total
    assert result.num_trainable == by_hand
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".experts." in n for n in trainable)  # adapters on the fused expert tensors
    assert any("shared_expert" in n for n in trainable)  # shared experts are linear layers too
    if family == "deepseek_v2":  # the dense first layer's MLP is adapted as well
        assert any("layers.0.mlp.gate_proj" in n for n in trainable)
    for name, router in routers.items():  # routers stay plain, frozen modules
        assert model.get_submodule(name) is router
    _train(result, steps=3)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    for name, value in ref.items():
        key = next(k for k in base if k.replace(".base_layer", "") == name)
        assert torch.equal(base[key], value), name
    with torch.no_grad():
        adapted = result.model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    merged = result.model.merge_and_unload()
    assert [n for n, _ in merged.named_parameters()] == list(ref)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)
    assert any(not torch.equal(p, ref[n]) for n, p in merged.named_parameters() if ".experts." in n)


def test_lora_options_and_dense_model():
    model = _model("mixtral")
    by_hand = _lora_count_by_hand(model, rank=2, experts=False)
    no_experts = S.apply_scope(model, S.lora(rank=2, include_experts=False))
    names = [n for n, p in no_experts.model.named_parameters() if p.requires_grad]
    assert not any(".experts." in n for n in names)
    assert no_experts.num_trainable == by_hand
    experts_only = S.apply_scope(_model("mixtral"), S.lora(rank=2, target_modules=[]))
    assert all(".experts." in n for n, p in experts_only.model.named_parameters() if p.requires_grad)
    dense = _model("dense")
    by_hand = _lora_count_by_hand(dense, rank=2, experts=None)
    result = S.apply_scope(dense, S.lora(rank=2))
    assert result.num_trainable == by_hand and result.experts == {}
    assert result.param_groups(0.1)[0]["weight_decay"] == 0.1


# --------------------------------------------------------------------------------------
# Applying scopes in turn, Table 3
# --------------------------------------------------------------------------------------


def test_a_new_scope_replaces_the_previous_one():
    model = _model()
    S.apply_scope(model, S.uoe(2, 5))
    ref = _snapshot(model)
    result = S.apply_scope(model, S.uoe(2, 3))  # expert 5's rows are written back and dropped
    _train(result)
    _assert_changed(model, ref, _expected(model, {2: [3]}, routers=[2]))


def test_scoped_model_still_copies_and_saves():
    model = _model()
    S.apply_scope(model, S.uoe(1, 2))
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    ref = _snapshot(clone)
    _train(S.apply_scope(clone, S.uoe(1, 5)))  # the clone's own scope; the original's masks stay
    _assert_changed(clone, ref, _expected(clone, {1: [5]}, routers=[1]))
    ids = torch.randint(3, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_parameter("model.layers.1.mlp.experts.down_proj").grad is None  # frozen fused tensor
    assert trained_rows(find_moe_layers(model)[1].experts).experts == (2,)  # the original's rows stay
    assert model.get_parameter("model.layers.1.mlp.experts.trained.down_proj").grad is not None


def test_describe_scopes_rows_and_leaves_model_as_it_was():
    model = _model("deepseek_v2")
    affinity = {1: torch.arange(8.0), 2: torch.arange(8.0).flip(0)}
    scopes = [S.full(), S.uoe(), S.esft(), "lora", S.k_experts(2, 3)]
    expected = []
    for scope in scopes:
        result = S.apply_scope(_model("deepseek_v2"), scope, target=(2, 0), affinity=affinity)
        expected.append((result.name, result.num_trainable, result.fraction))
    previous = S.apply_scope(model, S.uoe(1, 2))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    rows = S.describe_scopes(model, scopes, target=(2, 0), affinity=affinity)
    assert [(r["name"], r["trainable"], r["fraction"]) for r in rows] == expected
    assert rows[1]["name"] == "UOE (layer 2, expert 0)" and rows[0]["fraction"] == 1.0
    assert all(r["total"] == sum(p.numel() for p in _snapshot(model).values()) for r in rows)
    assert [n for n, _ in model.named_parameters()] == names  # LoRA unloaded
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    ref = _snapshot(model)
    _train(previous)  # the earlier scope's masks work again
    _assert_changed(model, ref, _expected(model, {1: [2]}, routers=[1]))


def test_from_name_and_flags():
    assert S.Scope.from_name("uoe") == S.uoe()
    assert S.Scope.from_name("experts_only") == S.experts_only()
    assert S.Scope.from_name("per_layer").layers == "all"
    assert S.uoe().needs_target and not S.uoe(1, 2).needs_target
    assert S.esft().needs_affinity and S.k_experts(1, 3).needs_affinity and not S.k_experts(1, [3]).needs_affinity
    assert not S.full().moe_only and not S.lora().moe_only and S.routers_only().moe_only
    result = S.apply_scope(_model(), "routers")
    assert result.name == "Routers only" and result.experts == {}


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [S.uoe(0, 0), S.experts_only(), S.routers_only(), S.experts_and_routers(), S.esft(), S.random_expert(0)],
    ids=lambda s: s.kind,
)
def test_moe_scopes_refuse_a_dense_model(scope):
    with pytest.raises(NoMoELayersError, match=f"scope {re.escape(repr(scope.label))}.*no MoE layers"):
        S.apply_scope(_model("dense"), scope, affinity={0: torch.ones(8)})


def test_full_scope_on_a_dense_model():
    result = S.apply_scope(_model("dense"), S.full())
    assert result.fraction == 1.0 and result.experts == {} and result.routers == []


def test_bad_layers_experts_and_targets():
    model = _model("deepseek_v2")
    cases = [
        (S.uoe(), {}, ValueError, "needs a target"),
        (S.uoe(7, 0), {}, IndexError, "layer 7 has no routed experts"),
        (S.uoe(0, 0), {}, IndexError, "layer 0 has no routed experts"),  # dense first layer
        (S.uoe(2, 8), {}, IndexError, "expert 8 is out of range"),
        (S.uoe(), {"target": (2, 99)}, IndexError, "expert 99 is out of range"),
        (S.uoe(), {"target": (2,)}, ValueError, "pair"),
        (S.random_expert(), {}, ValueError, "needs a layer"),
        (S.random_expert(), {"target": (1, 8)}, IndexError, "out of range"),
        (S.per_layer_experts([0]), {"affinity": {1: torch.ones(8)}}, IndexError, "layer 0"),
        (S.uoe(1, 0, include_shared=False), {"affinity": {0: torch.ones(8)}}, ValueError, "decoder-layer index"),
    ]
    for scope, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            S.apply_scope(model, scope, **kwargs)
    with pytest.raises(ValueError, match="no shared experts"):
        S.apply_scope(_model("mixtral"), S.uoe(1, 1, include_shared=True))


def test_bad_affinity_and_k():
    model = _model("qwen2_moe")
    cases = [
        (S.k_experts(1, 9), {1: torch.ones(8)}, "larger than the 8 experts"),
        (S.k_experts(1, 3), None, "ranks experts by affinity"),
        (S.k_experts(1, 3), {2: torch.ones(8)}, "no entry for layer 1"),
        (S.k_experts(1, 3), {1: torch.ones(7)}, r"shape \(7,\)"),
        (S.k_experts(1, 3), {1: torch.tensor([float("nan")] * 8)}, "NaN"),
        (S.per_layer_experts(), {0: torch.ones(8)}, "no entry for layer 1"),
        (S.esft(), None, "ranks experts by affinity"),
        (S.esft(), {i: -torch.ones(8) for i in range(3)}, "non-negative"),
        (S.esft(), {i: torch.zeros(8) for i in range(3)}, "positive sum"),
    ]
    for scope, affinity, match in cases:
        with pytest.raises(ValueError, match=match):
            S.apply_scope(model, scope, affinity=affinity)
    with pytest.raises(ValueError, match="map decoder-layer index"):
        S.apply_scope(model, S.esft(), affinity=torch.ones(3, 8))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: S.esft(0.0), r"top_p must be in \(0, 1\]"),
        (lambda: S.esft(1.5), r"top_p must be in \(0, 1\]"),
        (lambda: S.esft(-0.1), r"top_p must be in \(0, 1\]"),
        (lambda: S.k_experts(1, 0), "k >= 1"),
        (lambda: S.k_experts(1, []), "empty expert list"),
        (lambda: S.k_experts(1, [-1]), "non-negative"),
        (lambda: S.per_layer_experts([]), "no layers"),
        (lambda: S.per_layer_experts("first"), "'all'"),
        (lambda: S.lora(rank=0), "rank must be a positive"),
        (lambda: S.lora(target_modules=[], include_experts=False), "matches no parameter"),
        (lambda: S.uoe(-1, 0), "non-negative"),
        (lambda: S.Scope("everything"), "unknown scope kind"),
        (lambda: S.Scope.from_name("everything"), "unknown scope"),
    ],
)
def test_bad_scope_settings(build, match):
    with pytest.raises(ValueError, match=match):
        build()
    assert S.esft(1.0).top_p == 1.0


def test_lora_scopes_that_match_nothing_and_double_wrapping():
    with pytest.raises(ValueError, match="matches no parameter"):
        S.apply_scope(_model("mixtral"), S.lora(target_modules=["no_such_module"], include_experts=False))
    with pytest.raises(ValueError, match="no fused expert tensors"):
        S.apply_scope(_model("dense"), S.lora(target_modules=[]))
    model = _model("mixtral")
    S.apply_scope(model, S.lora(rank=2))
    with pytest.raises(ValueError, match="already carries LoRA"):
        S.apply_scope(model, S.uoe(0, 0))


def test_a_failed_scope_keeps_the_previous_one():
    model = _model()
    previous = S.apply_scope(model, S.uoe(1, 2))
    with pytest.raises(ValueError, match="affinity"):
        S.apply_scope(model, S.k_experts(1, 3))
    with pytest.raises(IndexError, match="out of range"):
        S.apply_scope(model, S.uoe(1, 8))
    ref = _snapshot(model)
    _train(previous)
    _assert_changed(model, ref, _expected(model, {1: [2]}, routers=[1]))


def test_trained_rows_from_elsewhere_are_written_back_and_replaced():
    model = _model()
    make_trainable(model, {0: [1]})
    S.apply_scope(model, S.uoe(0, 2))
    assert trained_rows(find_moe_layers(model)[0].experts).experts == (2,)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_rmu_mlps_trains_the_mlps_of_the_steered_layer_and_the_two_below(family):
    model = random_model(tiny_config(family, experts=8, top_k=2, layers=4), seed=0)
    ref = _snapshot(model)
    result = S.apply_scope(model, S.rmu_mlps(2))
    assert result.name == "RMU's MLPs (layers 0-2, all experts)" and result.routers == []
    _train(result)
    changed = changed_parameters(model, ref)
    moe = {lay.layer_index: lay for lay in find_moe_layers(model)}
    for name in changed:
        layer = int(name.split(".")[2])
        assert layer <= 2 and ".mlp." in name and ".gate.weight" not in name.replace("gate_up", "")
    for i in (0, 1, 2):
        if i in moe:
            assert set(moe[i].expert_parameters()) <= set(changed)  # every expert of the layer
            assert all(n in changed for n in moe[i].shared_parameters())
        else:  # DeepSeek's dense first layer: its MLP
            assert any(n.startswith(f"model.layers.{i}.mlp.") for n in changed)
    assert not any(n.startswith("model.layers.3.") for n in changed)
    assert not any("self_attn" in n or "embed" in n for n in changed)
    with pytest.raises(IndexError, match="out of range"):
        S.apply_scope(model, S.rmu_mlps(7))
    with pytest.raises(ValueError, match="non-negative int"):
        S.rmu_mlps(-1)


def test_rmu_mlps_on_a_dense_model_trains_its_mlps_and_needs_a_layer():
    from uoe_nb.zoo import load_zoo_model

    model, _ = load_zoo_model("tiny-dense")
    ref = _snapshot(model)
    result = S.apply_scope(model, S.rmu_mlps(1))
    assert result.name == "RMU's MLPs (layers 0-1, MLPs)"
    _train(result)
    changed = changed_parameters(model, ref)
    assert changed and all(".mlp." in n and int(n.split(".")[2]) <= 1 for n in changed)
    assert {int(n.split(".")[2]) for n in changed} == {0, 1}
    with pytest.raises(ValueError, match="no steered layer"):
        S.apply_scope(model, S.rmu_mlps())
