"""Tables of the pilot study (uoe_nb.pilot) from hand-made run histories."""

import math
from types import SimpleNamespace

import pytest

from uoe_nb.pilot import PAPER_TABLE1, drop_row, drop_table, history_frame, paper_frame, proportion_shift
from uoe_nb.unlearn import StepRecord, UnlearnConfig


def fake_result(best_step=10, metrics=True):
    def rec(step, fa, ut, props, overlap):
        return StepRecord(
            step=step,
            forget_loss=None if step == 0 else -float(step),
            metrics={"forget_accuracy": fa, "utility_accuracy": ut} if metrics else {},
            overlap_forget={1: overlap, 3: overlap / 2},
            proportions_forget={1: props},
        )

    history = [
        rec(0, 0.9, 0.95, [0.1, 0.6, 0.3], 1.0),
        rec(10, 0.5, 0.85, [0.2, 0.2, 0.6], 0.8),
        rec(20, 0.3, 0.40, [0.5, 0.0, 0.5], 0.6),
    ]
    return SimpleNamespace(
        history=history,
        best=next(r for r in history if r.step == best_step),
        config=UnlearnConfig(method="ga", scope="full"),
        scope=SimpleNamespace(name="full", num_trainable=123),
    )


def test_drop_row_uses_step_zero_and_kept_checkpoint():
    row = drop_row(fake_result(best_step=10), model="m")
    assert list(row)[0] == "model" and row["model"] == "m"
    assert row["FA_0"] == 0.9 and row["UT"] == 0.85 and row["step"] == 10
    assert row["forget_drop"] == pytest.approx(0.4)
    assert row["utility_drop"] == pytest.approx(0.1)
    assert row["method"] == "ga" and row["trainable"] == 123


def test_drop_row_needs_evaluation():
    with pytest.raises(ValueError, match="evaluate="):
        drop_row(fake_result(metrics=False))


def test_drop_table_one_row_per_run():
    table = drop_table([({"model": "a"}, fake_result(10)), ({"model": "b"}, fake_result(20))])
    assert list(table["model"]) == ["a", "b"]
    assert table["utility_drop"].tolist() == pytest.approx([0.1, 0.55])


def test_history_frame_columns():
    frame = history_frame(fake_result())
    assert list(frame.index) == [0, 10, 20]
    assert {"forget_loss", "FA", "UT", "overlap L1", "overlap L3"} <= set(frame.columns)
    assert frame.loc[20, "overlap L3"] == pytest.approx(0.3)


def test_proportion_shift_sorted_by_original():
    frame = proportion_shift(fake_result(best_step=10), layer=1)
    assert list(frame.index) == [1, 2, 0]
    assert frame["before"].tolist() == [0.6, 0.3, 0.1]
    assert frame["after"].tolist() == [0.2, 0.6, 0.2]
    assert proportion_shift(fake_result(), layer=1, step=20)["after"].tolist() == [0.0, 0.5, 0.5]


def test_proportion_shift_bad_layer_or_step():
    with pytest.raises(KeyError, match="not monitored"):
        proportion_shift(fake_result(), layer=0)
    with pytest.raises(KeyError, match="not evaluated"):
        proportion_shift(fake_result(), layer=1, step=5)


def test_paper_frame():
    frame = paper_frame(PAPER_TABLE1)
    assert frame.loc[("Qwen1.5-MoE", "original"), "UT"] == pytest.approx(0.5979)
    assert len(frame) == 8


def test_sweep_row_reads_the_chosen_run_at_the_operating_point():
    from uoe_nb.pilot import sweep_table
    from uoe_nb.tradeoff import LearningRateChoice

    chosen = fake_result()  # FA 0.9 -> 0.5 -> 0.3, UT 0.95 -> 0.85 -> 0.40
    slow = [(0, 0.9, 0.95), (10, 0.6, 0.9)]
    choice = LearningRateChoice(lr=1e-3, reached=True, table=None, runs={1e-3: chosen, 1e-4: slow})
    table = sweep_table([({"model": "m", "method": "ga"}, choice),
                         ({"model": "m", "method": "npo"}, LearningRateChoice(1e-4, False, None, {1e-4: slow}))])
    first, second = table.iloc[0], table.iloc[1]
    assert (first["model"], first["lr"], first["step"], first["FA"], first["UT"]) == ("m", "0.001", 20, 0.3, 0.4)
    assert first["reached op"] and first["forget_drop"] == pytest.approx(0.6)
    assert first["utility_drop"] == pytest.approx(0.55)
    assert first["UT@FA<=0.5"] == pytest.approx(0.85) and first["UT@FA<=0.4"] == pytest.approx(0.625)
    assert not second["reached op"] and second["FA"] == 0.6 and math.isnan(second["UT@FA<=0.5"])


def test_pilot_figures_draw_each_run():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.pilot import plot_fig1a, plot_fig3, plot_fig6

    run = fake_result()
    fig = plot_fig1a({("tiny-qwen2moe", "ga"): run, ("tiny-dense", "ga"): run}, dense=["tiny-dense"])
    ours = fig.axes[1]
    styles = [line.get_linestyle() for line in ours.get_lines() if not line.get_label().startswith("_")]
    assert styles == ["-", "--"] and ours.xaxis_inverted()
    markers = [line.get_marker() for line in ours.get_lines() if not line.get_label().startswith("_")]
    assert markers == ["o", "s"]  # one marker per model
    assert len(fig.axes[0].collections) >= 6  # the paper's points: 2 models x 3 rows
    fig3 = plot_fig3(run, {"full": run, "routers": run})
    assert len(fig3.axes[0].get_lines()) == 2  # overlap of MoE layers 1 and 3
    assert len([ln for ln in fig3.axes[1].get_lines()]) == 2
    fig6 = plot_fig6(proportion_shift(run, 1), 1)
    assert len(fig6.axes[0].patches) == 6  # 3 experts x before/after
