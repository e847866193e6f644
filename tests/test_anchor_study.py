"""anchor_study: target-layer traces and the kept row with the router-restored check."""

import math
from types import SimpleNamespace

import pytest
import torch

from uoe_nb.anchor_study import kept_row, target_trace
from uoe_nb.moe import find_moe_layers
from uoe_nb.unlearn import StepRecord
from uoe_nb.zoo import load_zoo_model


def fake_result(model=None, target=(1, 2), best_step=10):
    history = [
        StepRecord(step=0, metrics={"forget_accuracy": 0.9, "utility_accuracy": 1.0},
                   overlap_forget={1: 1.0}, overlap_retain={1: 1.0},
                   proportions_forget={1: [0.1, 0.1, 0.3, 0.0]}),  # fmt: skip
        StepRecord(step=10, metrics={"forget_accuracy": 0.3, "utility_accuracy": 0.8},
                   overlap_forget={1: 0.6, 0: 1.0}, overlap_retain={1: 0.7},
                   proportions_forget={1: [0.05, 0.05, 0.45, 0.0]}),  # fmt: skip
    ]
    return SimpleNamespace(target=target, history=history, best_step=best_step, model=model)


def test_target_trace_reads_the_target_layer_and_expert():
    rows = target_trace(fake_result())
    assert [r["step"] for r in rows] == [0, 10]
    assert rows[1]["overlap_forget"] == 0.6 and rows[1]["overlap_retain"] == 0.7
    assert rows[0]["target_share"] == 0.3 and rows[1]["target_share"] == 0.45
    assert rows[1]["forget_accuracy"] == 0.3


def test_missing_layer_gives_nan_and_no_target_raises():
    rows = target_trace(fake_result(target=(3, 0)))
    assert math.isnan(rows[0]["overlap_forget"]) and math.isnan(rows[0]["target_share"])
    with pytest.raises(ValueError, match="no target"):
        target_trace(fake_result(target=None))


def test_kept_row_without_evaluator():
    row = kept_row(fake_result(), {})
    assert row["target"] == "L1/E2" and row["kept step"] == 10
    assert row["FA"] == 0.3 and row["UT"] == 0.8 and row["target share"] == 0.45
    assert "routing share" not in row


def test_kept_row_router_restored_check_on_a_real_model():
    model, _ = load_zoo_model("tiny-qwen2moe")
    layer = find_moe_layers(model)[1]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        layer.router.weight.add_(1.0)
    changed = layer.router.weight.detach().clone()

    def fake_fa(m):  # "forgets" exactly as far as the router moved
        return 0.9 - 0.6 * float((layer.router.weight.detach() - original[f"{layer.router_name}.weight"]).abs().mean())

    result = fake_result(model=model, target=(layer.layer_index, 0))
    result.history[0].overlap_forget = {layer.layer_index: 1.0}
    row = kept_row(result, original, fake_fa)
    assert row["FA, routers restored"] == pytest.approx(0.9)
    assert row["FA"] == 0.3 and row["routing share"] == pytest.approx(1.0)
    assert torch.equal(layer.router.weight, changed)  # the model is left as it was
