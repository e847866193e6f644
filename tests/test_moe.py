"""The MoE adapter layer on tiny random models of every supported family."""

import pytest
import torch
from toy_moe import RemoteStyleModel

from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import (
    SUPPORTED_FAMILIES,
    NoMoELayersError,
    capture_routing,
    changed_parameters,
    find_moe_layers,
    make_trainable,
    parameter_counts,
)

# family -> (MoE layer indices for 3 decoder layers, has shared experts, scoring)
EXPECTED = {
    "qwen2_moe": ([0, 1, 2], True, "softmax"),
    "qwen3_moe": ([0, 1, 2], False, "softmax"),
    "deepseek_v2": ([1, 2], True, "softmax"),  # first layer dense
    "deepseek_v3": ([1, 2], True, "sigmoid"),
    "mixtral": ([0, 1, 2], False, "softmax"),
    "olmoe": ([0, 1, 2], False, "softmax"),
    "granitemoe": ([0, 1, 2], False, "softmax"),
    "phimoe": ([0, 1, 2], False, "softmax"),
    "gpt_oss": ([0, 1, 2], False, "softmax"),
    "llama4_text": ([0, 1, 2], True, "sigmoid"),
}


def _batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family_model(request):
    return request.param, random_model(tiny_config(request.param, experts=8, top_k=2), seed=1)


def test_supported_families_listed():
    assert set(EXPECTED) == set(SUPPORTED_FAMILIES)


def test_find_moe_layers(family_model):
    family, model = family_model
    indices, has_shared, scoring = EXPECTED[family]
    layers = find_moe_layers(model)
    assert [lay.layer_index for lay in layers] == indices
    for lay in layers:
        assert lay.num_experts == 8
        assert lay.top_k == (1 if family == "llama4_text" else 2)
        assert lay.scoring == scoring
        assert (lay.shared_experts is not None) == has_shared
        assert lay.fused
        for p in lay.expert_parameters().values():
            assert p.shape[0] == 8
        assert lay.router is model.get_submodule(lay.router_name)
        assert lay.experts is model.get_submodule(lay.experts_name)


def test_capture_shapes_and_padding(family_model):
    family, model = family_model
    batch = _batch()
    with capture_routing(model) as cap:
        with torch.no_grad():
            model(**batch)
    for lay in find_moe_layers(model):
        (rec,) = cap[lay.layer_index]
        assert rec.scores.shape == (3, 9, 8)
        assert rec.weights.shape == (3, 9, 8)
        assert rec.top_k_index.shape == (3, 9, lay.top_k)
        pad = batch["attention_mask"] == 0
        assert torch.all(rec.scores[pad] == 0) and torch.all(rec.weights[pad] == 0)
        real = ~pad
        # Exactly top_k experts get a non-zero weight on every real token.
        assert torch.all((rec.weights[real] != 0).sum(-1) <= lay.top_k)
        assert torch.all(rec.selected()[real].sum(-1) == lay.top_k)
        if lay.scoring == "softmax":
            torch.testing.assert_close(rec.scores[real].sum(-1), torch.ones(int(real.sum())))
        assert cap.tokens(lay.layer_index).shape == (int(real.sum()), 8)


def _hand_routing(family, router, hidden, top_k, config):
    """The paper's g recomputed from the router's weight and its input."""
    logits = hidden @ router.weight.T
    scores = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(scores, top_k, dim=-1)
    values = top.values
    if family == "mixtral":
        values = values / values.sum(-1, keepdim=True)
    if family == "deepseek_v2":
        values = values * config.routed_scaling_factor
    g = torch.zeros_like(scores).scatter(-1, top.indices, values)
    return scores, g


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral", "olmoe"])
def test_captured_weights_match_hand_computation(family):
    config = tiny_config(family, experts=8, top_k=2)
    model = random_model(config, seed=3)
    # Make routing decisive so ties cannot flip the top-k between computations.
    for lay in find_moe_layers(model):
        with torch.no_grad():
            lay.router.weight.normal_(0, 1.0)
    inputs = {}
    hooks = []
    for lay in find_moe_layers(model):
        hooks.append(
            lay.router.register_forward_pre_hook(
                lambda m, a, i=lay.layer_index: inputs.__setitem__(
                    i, a[0].detach().reshape(-1, a[0].shape[-1])
                )
            )
        )
    batch = _batch(seed=5)
    with capture_routing(model) as cap, torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].bool().reshape(-1)
    for lay in find_moe_layers(model):
        scores, g = _hand_routing(family, lay.router, inputs[lay.layer_index], lay.top_k, config)
        rec = cap[lay.layer_index][0]
        torch.testing.assert_close(rec.scores.reshape(-1, 8)[real], scores[real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec.weights.reshape(-1, 8)[real], g[real], rtol=1e-5, atol=1e-6)


def test_capture_keeps_graph_when_asked():
    model = random_model(tiny_config("qwen2_moe"), seed=0)
    with capture_routing(model, layers=[1], detach=False) as cap:
        model(**_batch())
    rec = cap[1][0]
    assert rec.scores.requires_grad
    rec.scores.sum().backward()
    assert find_moe_layers(model)[1].router.weight.grad is not None


def test_capture_rejects_dense_layer_index():
    model = random_model(tiny_config("deepseek_v2"), seed=0)
    with pytest.raises(IndexError, match="no routed experts"):
        with capture_routing(model, layers=[0]):
            pass


def test_dense_model_raises_clear_error():
    model = random_model(tiny_config("dense"), seed=0)
    with pytest.raises(NoMoELayersError, match="no MoE layers.*supported families"):
        find_moe_layers(model)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral", "olmoe", "gpt_oss"])
def test_trainable_slice_leaves_everything_else_bitwise_unchanged(family):
    model = random_model(tiny_config(family, experts=8, top_k=2), seed=2).train()
    target_layer = find_moe_layers(model)[-1].layer_index
    sel = make_trainable(model, {target_layer: [5]}, routers=[target_layer])
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Weight decay on the plain group must not leak into the fused expert tensors.
    opt = torch.optim.AdamW(sel.param_groups(weight_decay=0.1), lr=1e-2)
    for step in range(4):
        batch = _batch(seed=step)
        loss = -model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = changed_parameters(model, before)
    lay = find_moe_layers(model)[-1]
    expected_names = set(lay.expert_parameters()) | set(lay.router_parameters())
    assert set(changed) == expected_names
    for name in lay.expert_parameters():
        rows = changed[name]
        assert rows.tolist() == [e == 5 for e in range(8)]
    # Exact count: one expert's slice of every fused tensor plus the whole router.
    one_expert = sum(p[0].numel() for p in lay.expert_parameters().values())
    router = sum(p.numel() for p in lay.router_parameters().values())
    assert sel.num_trainable == one_expert + router
    assert sel.num_trainable == lay.expert_numel() + router
    assert sel.fraction == pytest.approx(sel.num_trainable / sum(p.numel() for p in model.parameters()))
    # Every parameter the optimizer did not own is frozen.
    owned = set(sel.names)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in owned)


def test_trainable_selection_counts_several_experts_and_shared():
    model = random_model(tiny_config("qwen2_moe", experts=8), seed=0)
    lay = find_moe_layers(model)[1]
    sel = make_trainable(model, {1: [0, 3, 3, 7]}, shared_experts=[1])
    shared = sum(p.numel() for p in lay.shared_parameters().values())
    assert sel.experts == {1: [0, 3, 7]}
    assert sel.num_trainable == 3 * lay.expert_numel() + shared


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"experts": {1: [8]}}, IndexError, "out of range"),
        ({"experts": {9: [0]}}, IndexError, "no routed experts"),
        ({"experts": {1: []}}, ValueError, "empty expert list"),
        ({"experts": None}, ValueError, "nothing to train"),
        ({"experts": None, "shared_experts": [1]}, ValueError, "no shared experts"),
    ],
)
def test_make_trainable_bad_input(kwargs, error, match):
    model = random_model(tiny_config("mixtral", experts=8), seed=0)
    with pytest.raises(error, match=match):
        make_trainable(model, **kwargs)


def test_remove_drops_gradient_masks():
    model = random_model(tiny_config("olmoe"), seed=0)
    sel = make_trainable(model, {0: [1]})
    sel.remove()
    batch = _batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grad = find_moe_layers(model)[0].experts.gate_up_proj.grad
    assert grad[0].abs().sum() > 0 or grad[2].abs().sum() > 0


def test_parameter_counts_active_vs_total():
    moe = random_model(tiny_config("mixtral", experts=8, top_k=2), seed=0)
    counts = parameter_counts(moe)
    lay = find_moe_layers(moe)[0]
    assert counts["total"] == sum(p.numel() for p in moe.parameters())
    assert counts["total"] - counts["active"] == 3 * 6 * lay.expert_numel()
    dense = random_model(tiny_config("dense"), seed=0)
    assert parameter_counts(dense)["active"] == parameter_counts(dense)["total"]


def test_remote_code_style_per_expert_modules():
    torch.manual_seed(0)
    model = RemoteStyleModel()
    layers = find_moe_layers(model)
    assert [lay.layer_index for lay in layers] == [1, 2]
    assert all(not lay.fused and lay.num_experts == 4 and lay.top_k == 2 for lay in layers)
    ids = torch.randint(0, 50, (2, 5))
    with capture_routing(model) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    rec = cap[1][0]
    assert torch.all(rec.selected().sum(-1) == 2)
    # Applied weights are the top-2 softmax scores, as the block computes them.
    top = torch.topk(rec.scores, 2, -1)
    torch.testing.assert_close(rec.weights.gather(-1, top.indices), top.values)
    sel = make_trainable(model, {2: [3]})
    assert sel.num_trainable == sum(p.numel() for p in model.layers[2].experts[3].parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(sel.param_groups(0.1), lr=0.1)
    model(input_ids=ids).pow(2).mean().backward()
    opt.step()
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and all(k.startswith("layers.2.experts.3.") for k in changed)
