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


def test_mean_sd_per_setting_in_first_seen_order():
    import pandas as pd

    from uoe_nb.anchor_study import mean_sd

    runs = pd.DataFrame({"setting": ["b", "a", "b", "a"], "FA": [0.2, 0.5, 0.4, 0.5], "UT": [1.0, 0.25, 0.5, 0.75]})
    table = mean_sd(runs, ["FA", "UT"])
    assert list(table.index) == ["b", "a"]
    assert table.loc["b", "FA"] == "0.3 ± 0.1" and table.loc["a", "UT"] == "0.5 ± 0.25"
    assert table.loc["a", "FA"] == "0.5 ± 0.0"
    with pytest.raises(KeyError, match="overlap"):
        mean_sd(runs, ["FA", "overlap"])


def test_plot_traces_one_line_per_setting_in_each_panel():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.anchor_study import plot_traces

    traces = {"no anchor": target_trace(fake_result()), "anchor": target_trace(fake_result())}
    fig = plot_traces(traces, layer=1, top_k=4)
    assert len(fig.axes) == 3
    for ax in fig.axes[:2]:
        assert len(ax.get_lines()) == 2
    share = fig.axes[2].get_lines()
    assert len(share) == 3 and share[0].get_ydata().tolist() == [0.3, 0.45]
    assert list(share[2].get_ydata()) == [0.25, 0.25]  # the 1/K ceiling
    assert fig.axes[0].get_title() == "layer 1: forget text"
    with pytest.raises(ValueError, match="top_k"):
        plot_traces(traces, layer=1, top_k=0)


def test_table10_by_alpha_with_the_released_codes_units():
    import pandas as pd

    from uoe_nb.anchor_study import table10

    sweep = pd.DataFrame({"FA": [0.3, 0.25], "UT": [0.8, 0.7], "kept step": [20, 30], "target share": [0.2, 0.24],
                          "overlap retain": [0.9, 0.8], "seed": [0, 0]}, index=[0.0, 10.0])  # fmt: skip
    table = table10(sweep, label="ours (tiny)", num_experts=8)
    assert list(table.index) == [0.0, 10.0] and table.index.name == "α (paper)"
    assert table.loc[0.0, "paper UT (DeepSeek-V2-Lite, RWKU)"] == 0.5435
    assert math.isnan(table.loc[10.0, "paper FA (DeepSeek-V2-Lite, RWKU)"])  # the paper has no alpha 10
    assert table.loc[10.0, "α (released code)"] == 80.0 and table.loc[10.0, "ours (tiny) kept step"] == 30
    assert "seed" not in " ".join(table.columns)
    assert "α (released code)" not in table10(sweep, label="ours").columns


def test_beside_table2_means_over_seeds_next_to_the_papers_ga_uoe():
    import pandas as pd

    from uoe_nb.anchor_study import beside_table2

    runs = pd.DataFrame({"setting": ["b", "a", "b", "a"], "original FA": [0.9] * 4, "original UT": [1.0] * 4,
                         "FA": [0.2, 0.5, 0.4, 0.5], "UT": [1.0, 0.25, 0.5, 0.75]})  # fmt: skip
    table = beside_table2(runs, label="ours")
    assert list(table.columns) == ["paper (Qwen1.5-MoE)", "paper (DeepSeek-V2-Lite)", "ours: b", "ours: a"]
    assert table.loc["GA+UOE UT", "paper (Qwen1.5-MoE)"] == 0.5012
    assert table.loc["original FA", "paper (DeepSeek-V2-Lite)"] == 0.3804
    assert table.loc["GA+UOE FA", "ours: b"] == pytest.approx(0.3) and table.loc["GA+UOE UT", "ours: a"] == 0.5
    with pytest.raises(KeyError, match="original UT"):
        beside_table2(runs.drop(columns=["original UT"]), label="ours")
