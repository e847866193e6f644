"""Train only what trains: trained experts as parameters of their own, fp32 master weights."""

import copy
import pickle

import pytest
import torch
from toy_moe import random_batch

from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import changed_parameters, find_moe_layers
from uoe_nb.trainable import MasterWeights, TrainedRows, make_trainable, remove_trained_rows, trained_rows

FAMILIES = ["qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "granitemoe",
            "phimoe", "gpt_oss", "llama4_text"]  # fmt: skip




def _model(family, **kw):
    return random_model(tiny_config(family, experts=8, top_k=2, **kw), seed=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_forward_equals_fused_forward_and_only_the_slice_gets_gradients(family):
    model = _model(family)
    batch = random_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    lay = find_moe_layers(model)[-1]
    sel = make_trainable(model, {lay.layer_index: [1, 5]}, routers=[lay.layer_index])
    assert isinstance(trained_rows(lay.experts), TrainedRows)
    with torch.no_grad():
        split = model(**batch).logits
    torch.testing.assert_close(split, reference, atol=1e-5, rtol=1e-5)
    # Fused tensors do not require grad, so autograd builds no gradient for them.
    assert not any(p.requires_grad for p in lay.experts.parameters(recurse=False))
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= set(sel.names) and with_grad
    rows = trained_rows(lay.experts)
    for name, p in lay.experts.named_parameters(recurse=False):
        assert getattr(rows, name).shape == (2, *p.shape[1:])
    sel.remove()
    assert trained_rows(lay.experts) is None and type(lay.experts).__name__.endswith("Experts")


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral", "olmoe", "gpt_oss", "llama4_text"])
def test_training_a_slice_leaves_everything_else_bitwise_unchanged(family):
    model = _model(family).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target_layer = find_moe_layers(model)[-1].layer_index
    sel = make_trainable(model, {target_layer: [5]}, routers=[target_layer])
    # Weight decay acts on the trained rows only: nothing else is a parameter of the optimizer.
    opt = torch.optim.AdamW(sel.param_groups(weight_decay=0.1), lr=1e-2)
    for step in range(4):
        batch = random_batch(seed=step)
        loss = -model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sel.write_back()
    sel.remove()
    changed = changed_parameters(model, before)
    lay = find_moe_layers(model)[-1]
    assert set(changed) == set(lay.expert_parameters()) | set(lay.router_parameters())
    for name in lay.expert_parameters():
        assert changed[name].tolist() == [e == 5 for e in range(8)]
    one_expert = sum(p[0].numel() for p in lay.expert_parameters().values())
    router = sum(p.numel() for p in lay.router_parameters().values())
    assert sel.num_trainable == one_expert + router == lay.expert_numel() + router
    assert sel.num_total == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())  # remove() freezes


def test_write_back_makes_the_plain_model_equal_to_the_split_one():
    model = _model("qwen2_moe").train()
    sel = make_trainable(model, {1: [0, 3]})
    opt = torch.optim.SGD(sel.parameters(), lr=0.5)
    batch = random_batch()
    (-model(**batch, labels=batch["input_ids"]).loss).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        split = model(**batch).logits
    sel.remove()
    with torch.no_grad():
        plain = model(**batch).logits
    torch.testing.assert_close(plain, split, atol=1e-5, rtol=1e-5)


def test_every_expert_of_a_layer_trains_the_fused_tensors_themselves():
    model = _model("mixtral")
    lay = find_moe_layers(model)[0]
    sel = make_trainable(model, {0: list(range(8))})
    assert sel.split == [] and trained_rows(lay.experts) is None
    assert set(sel.names) == set(lay.expert_parameters())


def test_counts_several_experts_and_shared():
    model = random_model(tiny_config("qwen2_moe", experts=8), seed=0)
    lay = find_moe_layers(model)[1]
    sel = make_trainable(model, {1: [0, 3, 3, 7]}, shared_experts=[1])
    shared = sum(p.numel() for p in lay.shared_parameters().values())
    assert sel.experts == {1: [0, 3, 7]}
    assert trained_rows(lay.experts).experts == (0, 3, 7)
    assert sel.num_trainable == 3 * lay.expert_numel() + shared
    assert sel.fraction == pytest.approx(sel.num_trainable / sel.num_total)


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
    assert remove_trained_rows(model) == 0  # a refused call leaves nothing behind


def test_a_second_split_of_the_same_layer_is_refused():
    model = _model("olmoe")
    make_trainable(model, {0: [1]})
    with pytest.raises(RuntimeError, match="already has trained rows"):
        make_trainable(model, {0: [2]})


def test_deepcopy_and_pickle_of_a_prepared_model_keep_its_own_trained_rows():
    model = _model("olmoe")
    make_trainable(model, {1: [4]}, routers=[1])
    rows = trained_rows(find_moe_layers(model)[1].experts)
    with torch.no_grad():
        rows.down_proj.add_(0.5)  # a trained state that the fused tensor does not hold yet
    batch = random_batch()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin_rows = trained_rows(find_moe_layers(twin)[1].experts)
        assert twin_rows is not rows and torch.equal(twin_rows.down_proj, rows.down_proj)
        with torch.no_grad():
            torch.testing.assert_close(twin(**batch).logits, model(**batch).logits)
    assert remove_trained_rows(model) == 1


def test_master_weights_keep_small_updates_in_a_bf16_model():
    half = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    with_master = MasterWeights([half], lr=3e-4, enabled=True)
    without = MasterWeights([plain], lr=3e-4, enabled=False)
    for _ in range(20):
        for p, opt in ((half, with_master), (plain, without)):
            opt.zero_grad()
            opt.backward(p.float().sum())
            assert opt.step() == "ok"
    # AdamW moves each weight by about lr per step, below half the bf16 spacing under 1.0
    # (2**-9): in bf16 every update rounds away; the fp32 master adds them up (20 x 3e-4).
    assert torch.equal(plain, torch.ones_like(plain))
    assert (half < 1).all()
    assert with_master.masters[0].dtype == torch.float32 and without.masters == [None]
    assert float(with_master.masters[0].mean()) == pytest.approx(1 - 20 * 3e-4, rel=1e-3)


def test_master_weights_refuse_non_finite_gradients_and_skip_fp16_overflow():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeights([p], lr=0.1)
    opt.backward((p.float() * float("nan")).sum())
    assert opt.step() == "nonfinite" and torch.equal(p, torch.ones(4, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt16 = MasterWeights([q], lr=0.1)
    scale = opt16.scale
    assert scale > 1
    opt16.backward((q.float() * 1e4).sum())  # 1e4 * 65536 overflows fp16
    assert opt16.step() == "skipped" and opt16.scale == scale / 2 and torch.equal(q, torch.ones(4, dtype=torch.float16))
    opt16.backward(q.float().sum())
    assert opt16.step() == "ok" and not torch.equal(q, torch.ones(4, dtype=torch.float16))
