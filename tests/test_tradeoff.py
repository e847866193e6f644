"""Matched-forgetting comparison: paths, interpolated utility, the operating point, one lr procedure."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest

from uoe_nb import tradeoff as T
from uoe_nb.unlearn import StepRecord

# (step, FA, UT): forgetting falls, utility falls with it
A = [(0, 0.9, 0.8), (10, 0.6, 0.75), (20, 0.4, 0.6), (30, 0.2, 0.3)]
B = [(0, 0.9, 0.8), (10, 0.7, 0.78), (20, 0.55, 0.7)]  # never gets below 0.55


def test_utility_at_interpolates_between_the_checkpoints_around_the_crossing():
    assert T.utility_at(A, 0.5) == pytest.approx(0.75 + (0.6 - 0.5) / (0.6 - 0.4) * (0.6 - 0.75))
    assert T.utility_at(A, 0.4) == pytest.approx(0.6)  # a checkpoint exactly at the level
    assert T.utility_at(A, 0.3) == pytest.approx(0.45)
    assert T.utility_at(A, 0.95) == pytest.approx(0.8)  # the start is already below the level
    assert math.isnan(T.utility_at(B, 0.5))  # never reached
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        T.utility_at(A, 1.5)


def test_operating_point_is_the_first_checkpoint_at_target_or_the_lowest_reached():
    assert T.operating_point(A) == {"step": 30, "FA": 0.2, "UT": 0.3, "reached": True}
    assert T.operating_point(A, 0.4) == {"step": 20, "FA": 0.4, "UT": 0.6, "reached": True}
    assert T.operating_point(B) == {"step": 20, "FA": 0.55, "UT": 0.7, "reached": False}


def test_path_reads_a_results_history_and_skips_partial_checkpoints():
    class Result:
        history = [
            StepRecord(0, metrics={"forget_accuracy": 0.9, "utility_accuracy": 0.8}),
            StepRecord(5, metrics={"forget_accuracy": 0.7}),  # forget part only
            StepRecord(10, metrics={"forget_accuracy": 0.3, "utility_accuracy": 0.6}),
        ]

    assert T.path(Result()) == [(0, 0.9, 0.8), (10, 0.3, 0.6)]
    with pytest.raises(ValueError, match="no checkpoint"):
        T.path([])


def test_tradeoff_table_rows():
    table = T.tradeoff_table({"A": A, "B": B})
    assert list(table.index) == ["A", "B"]
    assert table.loc["A", "UT@FA<=0.4"] == pytest.approx(0.6) and math.isnan(table.loc["B", "UT@FA<=0.5"])
    assert table.loc["B", "lowest FA"] == 0.55 and not table.loc["B", "reached op"]
    assert table.loc["A", "UT@op"] == 0.3 and table.loc["A", "reached op"]


def test_choose_learning_rate_prefers_reaching_the_operating_point_then_utility():
    paths = {
        1e-4: [(0, 0.9, 0.8), (10, 0.5, 0.78)],  # too slow: never reaches 0.30
        1e-3: [(0, 0.9, 0.8), (10, 0.28, 0.7)],  # reaches it, utility 0.7
        1e-2: [(0, 0.9, 0.8), (10, 0.1, 0.4)],  # reaches it, utility 0.4
    }
    tried = []
    choice = T.choose_learning_rate(lambda lr: tried.append(lr) or paths[lr], [1e-2, 1e-4, 1e-3])
    assert tried == [1e-4, 1e-3, 1e-2] and choice.lr == 1e-3 and choice.reached
    assert choice.as_row() == {"lr": 1e-3, "FA": 0.28, "UT": 0.7, "reached op": True}
    # when none reaches it: the rate that forgot most
    slow = {lr: [(0, 0.9, 0.8), (10, fa, 0.7)] for lr, fa in ((1e-4, 0.6), (1e-3, 0.45))}
    fallback = T.choose_learning_rate(lambda lr: slow[lr], [1e-4, 1e-3])
    assert fallback.lr == 1e-3 and not fallback.reached
    with pytest.raises(ValueError, match="empty"):
        T.choose_learning_rate(lambda lr: A, [])
    with pytest.raises(ValueError, match="distinct positive"):
        T.choose_learning_rate(lambda lr: A, [1e-3, 1e-3])


def test_plot_tradeoff_draws_one_line_per_run_and_the_papers_points():
    ax = T.plot_tradeoff({"A": A, "B": B}, paper={"A": (0.3, 0.5)}, title="t")
    assert len(ax.get_lines()) == 2 + 2  # two paths, chance and operating-point lines
    assert ax.get_xlabel().startswith("forget accuracy") and ax.xaxis_inverted()


def test_seeds_at_chosen_rate_keeps_the_first_seeds_sweep_run_and_runs_the_rest_at_its_rate():
    from types import SimpleNamespace

    from uoe_nb.tradeoff import seeds_at_chosen_rate

    calls = []

    def run(seed, lr):
        calls.append((seed, lr))
        # the larger rate reaches FA 0.3 with more utility
        ut = 0.8 if lr == 0.01 else 0.6
        result = SimpleNamespace(history=[SimpleNamespace(step=0, metrics={"forget_accuracy": 0.9, "utility_accuracy": 1.0}),
                                          SimpleNamespace(step=10, metrics={"forget_accuracy": 0.25, "utility_accuracy": ut})])  # fmt: skip
        return (seed, lr), result

    done, choice = seeds_at_chosen_rate(run, [3, 4, 5], [0.001, 0.01])
    assert choice.lr == 0.01 and choice.reached
    assert [row for row, _ in done] == [(3, 0.01), (4, 0.01), (5, 0.01)]
    assert calls == [(3, 0.001), (3, 0.01), (4, 0.01), (5, 0.01)]  # seed 3's sweep run is reused
    calls.clear()
    done, choice = seeds_at_chosen_rate(run, [3, 4], None)
    assert choice is None and calls == [(3, None), (4, None)]
    with pytest.raises(ValueError, match="no seeds"):
        seeds_at_chosen_rate(run, [], [0.01])
