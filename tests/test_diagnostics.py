"""Diagnostics beyond the paper: restored routers, output KL, routing overlap, oracle distance."""

import copy
import math

import numpy as np
import pytest
import torch

from uoe_nb.diagnostics import (
    OracleDistance,
    RouterRestored,
    oracle_distance,
    output_kl,
    restore_routers,
    router_restored_check,
    routing_overlap,
)
from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import moe_layer

VOCAB = 128


def _model(family="qwen2_moe", seed=0, **kw):
    return random_model(tiny_config(family, experts=8, top_k=2, vocab_size=VOCAB, **kw), seed=seed)


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding
        mask[2, -3:] = 0  # right padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _router_inputs(model, layer_index, batch):
    """The hidden states each router sees, captured with a plain forward pre-hook."""
    router = moe_layer(model, layer_index).router
    seen = []
    handle = router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    (x,) = seen
    return x.reshape(batch["input_ids"].shape[0], batch["input_ids"].shape[1], -1)


# --------------------------------------------------------------------------------------
# Routing overlap
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_overlap_with_itself_is_one(family):
    model = _model(family)
    overlap = routing_overlap(model, model, _batches())
    expected_layers = [1, 2] if family == "deepseek_v2" else [0, 1, 2]
    assert sorted(overlap) == expected_layers
    assert all(v == 1.0 for v in overlap.values())


def test_overlap_with_permuted_router_matches_hand_count():
    a = _model()
    b = copy.deepcopy(a)
    layer = 1
    perm = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])  # swap expert pairs
    with torch.no_grad():
        w = moe_layer(b, layer).router.weight
        w.copy_(w[perm].clone())
    batches = _batches()
    overlap = routing_overlap(a, b, batches)
    # By hand: top-2 of x @ W^T for both routers on the same router input, real tokens only.
    w_a = moe_layer(a, layer).router.weight.detach().double()
    w_b = moe_layer(b, layer).router.weight.detach().double()
    shared, tokens = 0, 0
    for batch in batches:
        x = _router_inputs(a, layer, batch).double()
        top_a = (x @ w_a.T).topk(2, dim=-1).indices
        top_b = (x @ w_b.T).topk(2, dim=-1).indices
        for i, j in batch["attention_mask"].nonzero().tolist():
            shared += len(set(top_a[i, j].tolist()) & set(top_b[i, j].tolist()))
            tokens += 1
    hand = shared / (2 * tokens)
    assert overlap[0] == 1.0  # layers before the permuted one are untouched
    assert overlap[layer] == pytest.approx(hand, abs=1e-12)
    assert overlap[layer] < 1.0
    assert 0.0 <= overlap[2] <= 1.0


def test_overlap_refuses_different_structure():
    with pytest.raises(ValueError, match="different MoE layers"):
        routing_overlap(_model(), random_model(tiny_config("qwen2_moe", experts=4, top_k=2)), _batches(1))
    with pytest.raises(ValueError, match="different MoE layers"):
        routing_overlap(_model(), random_model(tiny_config("qwen2_moe", experts=8, top_k=1)), _batches(1))


# --------------------------------------------------------------------------------------
# Output KL
# --------------------------------------------------------------------------------------


def _hand_kl(a, b, batches):
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            la = a(**batch).logits.double().numpy()
            lb = b(**batch).logits.double().numpy()
        for i, j in batch["attention_mask"].nonzero().tolist():
            p = np.exp(la[i, j] - la[i, j].max())
            p /= p.sum()
            q = np.exp(lb[i, j] - lb[i, j].max())
            q /= q.sum()
            total += float(np.sum(p * (np.log(p) - np.log(q))))
            count += 1
    return total / count


def test_kl_zero_for_itself_and_hand_computed_for_perturbed():
    a = _model()
    assert output_kl(a, a, _batches()) == 0.0
    b = copy.deepcopy(a)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        b.lm_head.weight.add_(0.05 * torch.randn(b.lm_head.weight.shape, generator=g))
    batches = _batches(1)
    kl = output_kl(a, b, batches)
    assert kl > 0
    assert kl == pytest.approx(_hand_kl(a, b, batches), rel=1e-4)
    # KL is not symmetric, and the direction follows the argument order.
    assert output_kl(b, a, batches) == pytest.approx(_hand_kl(b, a, batches), rel=1e-4)


def test_kl_ignores_padding():
    a, b = _model(), _model(seed=3)
    batch = _batches(1)[0]
    garbage = dict(batch, input_ids=batch["input_ids"].clone())
    pad = batch["attention_mask"] == 0
    garbage["input_ids"][pad] = 5  # only padded positions differ
    # Right padding cannot influence earlier tokens; left-padded rows are masked in attention.
    assert output_kl(a, b, [garbage]) == pytest.approx(output_kl(a, b, [batch]), rel=1e-5)


def test_kl_bad_input():
    a = _model()
    other_vocab = random_model(tiny_config("qwen2_moe", experts=8, top_k=2, vocab_size=100))
    with pytest.raises(ValueError, match="vocabular"):
        output_kl(a, other_vocab, _batches(1))
    with pytest.raises(ValueError, match="no input batches"):
        output_kl(a, a, [])
    batch = _batches(1)[0]
    with pytest.raises(ValueError, match="no real tokens"):
        output_kl(a, a, [dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"]))])
    with pytest.raises(ValueError, match="input_ids"):
        output_kl(a, a, [{"attention_mask": batch["attention_mask"]}])


# --------------------------------------------------------------------------------------
# Restored routers
# --------------------------------------------------------------------------------------


def _sabotage(model, layer=1, expert=2):
    """Change one router and one expert row, as a UOE run would."""
    lay = moe_layer(model, layer)
    with torch.no_grad():
        lay.router.weight.mul_(0.5).add_(0.01)
        lay.experts.gate_up_proj[expert].mul_(0.5)


def test_restore_routers_swaps_and_restores_bitwise():
    model = _model()
    original = _snapshot(model)
    _sabotage(model)
    unlearned = _snapshot(model)
    router_name = moe_layer(model, 1).router_name + ".weight"
    experts_name = moe_layer(model, 1).experts_name + ".gate_up_proj"
    with restore_routers(model, original) as layers:
        assert layers == [0, 1, 2]
        state = model.state_dict()
        assert torch.equal(state[router_name], original[router_name])
        assert torch.equal(state[experts_name], unlearned[experts_name])  # experts stay unlearned
    for name, value in model.state_dict().items():
        assert torch.equal(value, unlearned[name]), name
    with pytest.raises(RuntimeError, match="boom"):
        with restore_routers(model, original, layers=[1]):
            assert torch.equal(model.state_dict()[router_name], original[router_name])
            raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, unlearned[name]), name


def test_restore_routers_bad_input():
    model = _model("deepseek_v2")
    original = _snapshot(model)
    with pytest.raises(IndexError, match="no routed experts"):
        with restore_routers(model, original, layers=[0]):  # DeepSeek's first layer is dense
            pass
    router_name = moe_layer(model, 1).router_name + ".weight"
    partial = {k: v for k, v in original.items() if k != router_name}
    before = _snapshot(model)
    with pytest.raises(KeyError, match="lacks"):
        with restore_routers(model, partial):
            pass
    wrong = dict(original, **{router_name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="in the original state"):
        with restore_routers(model, wrong):
            pass
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_router_restored_check_numbers():
    layer = 1

    def evaluate(m):
        lay = moe_layer(m, layer)
        return float(lay.router.weight.detach().norm() + lay.experts.gate_up_proj.detach().norm())

    model = _model()
    original = _snapshot(model)
    _sabotage(model, layer)
    unlearned_state = _snapshot(model)
    router = moe_layer(model, layer).router_name + ".weight"
    experts = moe_layer(model, layer).experts_name + ".gate_up_proj"
    # By hand, from the two snapshots: R = router norm, X = expert norm.
    r0, r1 = float(original[router].norm()), float(unlearned_state[router].norm())
    x0, x1 = float(original[experts].norm()), float(unlearned_state[experts].norm())

    result = router_restored_check(model, original, evaluate, measure_original=True)
    assert result.unlearned == pytest.approx(r1 + x1, rel=1e-6)
    assert result.restored == pytest.approx(r0 + x1, rel=1e-6)
    assert result.original == pytest.approx(r0 + x0, rel=1e-6)
    assert result.routing_share == pytest.approx((r0 - r1) / ((r0 - r1) + (x0 - x1)), rel=1e-5)
    assert 0 < result.routing_share < 1 and result.routing_share_clipped == result.routing_share
    assert result.layers == [0, 1, 2]
    for name, value in model.state_dict().items():  # the model is left as it was
        assert torch.equal(value, unlearned_state[name]), name

    given = router_restored_check(model, original, evaluate, original=5.0, layers=[0])
    assert given.original == 5.0 and given.layers == [0]
    assert given.restored == pytest.approx(given.unlearned)  # layer 0's router did not change
    assert given.routing_share == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="not both"):
        router_restored_check(model, original, evaluate, original=1.0, measure_original=True)


def test_routing_share_raw_and_clipped():
    over = RouterRestored(unlearned=0.2, restored=0.9, original=0.8)
    assert over.routing_share == pytest.approx(0.7 / 0.6)
    assert over.routing_share_clipped == 1.0
    under = RouterRestored(unlearned=0.3, restored=0.25, original=0.8)
    assert under.routing_share == pytest.approx(-0.1) and under.routing_share_clipped == 0.0
    assert RouterRestored(unlearned=0.5, restored=0.6).routing_share is None
    assert RouterRestored(unlearned=0.5, restored=0.6, original=0.5).routing_share is None
    row = over.as_row()
    assert row["routing share"] == over.routing_share and row["routing share (clipped)"] == 1.0


# --------------------------------------------------------------------------------------
# Oracle distance
# --------------------------------------------------------------------------------------


def test_oracle_distance_on_random_models_matches_parts():
    model, oracle = _model(), _model(seed=5)
    forget, retain = _batches(1, seed=1), _batches(2, seed=2)
    d = oracle_distance(model, oracle, iter(forget), (b for b in retain))  # generators are fine
    assert d.kl_forget == pytest.approx(output_kl(oracle, model, forget), rel=1e-9)
    assert d.kl_retain == pytest.approx(output_kl(oracle, model, retain), rel=1e-9)
    assert d.overlap_forget == routing_overlap(oracle, model, forget)
    assert d.overlap_retain == routing_overlap(oracle, model, retain)
    assert d.tokens_forget == int(forget[0]["attention_mask"].sum())
    row = d.as_row()
    assert row["overlap with oracle (forget)"] == pytest.approx(sum(d.overlap_forget.values()) / 3)
    no_routing = oracle_distance(model, oracle, forget, retain, routing=False)
    assert no_routing.overlap_forget == {} and math.isnan(no_routing.as_row()["overlap with oracle (retain)"])
    assert isinstance(no_routing, OracleDistance)
    with pytest.raises(ValueError, match="no forget batches"):
        oracle_distance(model, oracle, [], retain)


def test_oracle_distance_zoo_forget_further_than_retain():
    from uoe_nb.routing import batches
    from uoe_nb.world import build_world
    from uoe_nb.zoo import load_zoo_model

    world = build_world(0)
    model, tok = load_zoo_model("tiny-qwen2moe")
    oracle, _ = load_zoo_model("tiny-qwen2moe-oracle")
    forget = list(batches(tok, world.forget_corpus[:32], batch_size=16))
    retain = list(batches(tok, world.retain_corpus[:32], batch_size=16))
    d = oracle_distance(model, oracle, forget, retain)
    # The oracle never saw the forget domain: the model's predictions differ from it far
    # more on forget text than on retain text.
    assert d.kl_forget > 10 * d.kl_retain > 0
    assert sorted(d.overlap_forget) == [0, 1, 2, 3]
    assert all(0.0 <= v <= 1.0 for v in [*d.overlap_forget.values(), *d.overlap_retain.values()])
