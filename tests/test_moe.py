"""The MoE adapter layer on tiny random models of every supported family."""

import pytest
import torch
from toy_moe import RemoteStyleModel, random_batch

from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import (
    SUPPORTED_FAMILIES,
    NoMoELayersError,
    capture_routing,
    find_moe_layers,
    parameter_counts,
)
from uoe_nb.trainable import make_trainable

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
    batch = random_batch()
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
    batch = random_batch(seed=5)
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
        model(**random_batch())
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
    sel = make_trainable(model, {2: [3]})  # one module per expert: nothing to split
    assert sel.split == [] and sel.num_trainable == sum(p.numel() for p in model.layers[2].experts[3].parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(sel.param_groups(0.1), lr=0.1)
    model(input_ids=ids).pow(2).mean().backward()
    opt.step()
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and all(k.startswith("layers.2.experts.3.") for k in changed)
