"""Comparing unlearning runs at matched forgetting (Chapters 2 and 6).

A single forget target compares runs at one point of their forget-utility trade-off, and
a lax target (FA 0.5 on a 4-way test) is where every method still keeps most of its
utility. The paper's Table 2 runs end near chance (WMDP FA 0.25-0.30). This module
compares along the whole path instead:

* :func:`path` -- a run's (step, FA, UT) path from its evaluated checkpoints;
* :func:`utility_at` -- utility where a path first reaches a forget accuracy, linearly
  interpolated between the two checkpoints around the crossing;
* :func:`operating_point` -- utility at the paper's operating point (the first checkpoint
  with FA <= 0.30), or at the lowest FA the run reached, flagged as such;
* :func:`tradeoff_table` -- those numbers for a set of runs (FA = 0.5, 0.4, 0.3 and the lowest);
* :func:`choose_learning_rate` -- one procedure for every cell: a short sweep over a fixed
  grid, keeping the rate whose run reaches the operating point with the best utility (the
  paper tuned each pair and kept its best balance); without any run reaching it, the rate
  that forgot most;
* :func:`plot_tradeoff` -- the paths as curves, with the paper's points beside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

__all__ = [
    "LEVELS",
    "OPERATING_POINT",
    "LearningRateChoice",
    "choose_learning_rate",
    "operating_point",
    "path",
    "plot_tradeoff",
    "seeds_at_chosen_rate",
    "tradeoff_table",
    "utility_at",
]

LEVELS = (0.5, 0.4, 0.3)  # forget accuracies at which utility is compared
OPERATING_POINT = 0.30  # the paper's Table 2 runs end at WMDP FA 0.25-0.30

Point = tuple[int, float, float]  # (step, forget accuracy, utility)


def path(run: Any) -> list[Point]:
    """The (step, FA, UT) points of a run's evaluated checkpoints, in step order.

    ``run`` is an :class:`uoe_nb.unlearn.UnlearnResult` (its ``history``) or a sequence of
    points already. Checkpoints without both accuracies (``utility_eval="target"``) are left out.
    """
    if hasattr(run, "history"):
        points = [
            (r.step, float(r.metrics["forget_accuracy"]), float(r.metrics["utility_accuracy"]))
            for r in run.history
            if "forget_accuracy" in r.metrics and "utility_accuracy" in r.metrics
        ]
    else:
        points = [(int(s), float(f), float(u)) for s, f, u in run]
    if not points:
        raise ValueError("the run has no checkpoint with both forget accuracy and utility: evaluate it")
    return sorted(points)


def _check_level(level: float) -> None:
    if not (isinstance(level, int | float) and 0.0 <= level <= 1.0):
        raise ValueError(f"a forget-accuracy level must be in [0, 1], got {level!r}")


def utility_at(points: Sequence[Point] | Any, level: float) -> float:
    """Utility where the path first reaches forget accuracy ``level`` (``nan`` if it never does).

    Between the last checkpoint above ``level`` and the first at or below it, utility is
    interpolated linearly in forget accuracy; a path that starts at or below ``level``
    gives its first checkpoint's utility.
    """
    _check_level(level)
    pts = path(points)
    if pts[0][1] <= level:
        return pts[0][2]
    for (_, fa0, ut0), (_, fa1, ut1) in zip(pts, pts[1:], strict=False):
        if fa1 <= level:
            if fa0 == fa1:
                return ut1
            share = (fa0 - level) / (fa0 - fa1)
            return ut0 + share * (ut1 - ut0)
    return math.nan


def operating_point(points: Sequence[Point] | Any, target: float = OPERATING_POINT) -> dict[str, Any]:
    """The run at the paper's operating point: its first checkpoint with FA <= ``target``.

    Returns ``{"step", "FA", "UT", "reached"}``; when no checkpoint reached ``target`` it is
    the checkpoint with the lowest FA (ties: higher utility) and ``reached`` is False.
    """
    _check_level(target)
    pts = path(points)
    for step, fa, ut in pts:
        if fa <= target:
            return {"step": step, "FA": fa, "UT": ut, "reached": True}
    step, fa, ut = min(pts, key=lambda p: (p[1], -p[2]))
    return {"step": step, "FA": fa, "UT": ut, "reached": False}


def tradeoff_table(
    runs: Mapping[Any, Sequence[Point] | Any],
    levels: Sequence[float] = LEVELS,
    target: float = OPERATING_POINT,
) -> pd.DataFrame:
    """One row per run: utility at each forget ``level``, at the lowest FA reached, and at ``target``.

    Columns ``UT@FA<=0.5`` ... (interpolated, ``nan`` where the run never got there),
    ``lowest FA``, ``UT@lowest``, ``FA@op`` and ``UT@op`` (the operating point's checkpoint)
    and ``reached op``. Keys of ``runs`` become the index.
    """
    rows = {}
    for label, run in runs.items():
        pts = path(run)
        low = min(pts, key=lambda p: (p[1], -p[2]))
        op = operating_point(pts, target)
        row = {f"UT@FA<={lv:g}": utility_at(pts, lv) for lv in levels}
        row.update({"lowest FA": low[1], "UT@lowest": low[2], "FA@op": op["FA"], "UT@op": op["UT"],
                    "reached op": op["reached"]})  # fmt: skip
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


@dataclass
class LearningRateChoice:
    """What :func:`choose_learning_rate` tried and kept."""

    lr: float
    reached: bool
    table: pd.DataFrame  # one row per tried rate: FA, UT at the operating point, reached
    runs: dict[float, Any]

    def as_row(self) -> dict[str, Any]:
        row = self.table.loc[self.lr]
        return {"lr": self.lr, "FA": row["FA"], "UT": row["UT"], "reached op": bool(row["reached"])}


def choose_learning_rate(
    run: Callable[[float], Any], grid: Sequence[float], *, target: float = OPERATING_POINT
) -> LearningRateChoice:
    """One learning-rate procedure for every (method, scope, model) cell (Chapters 2 and 6).

    ``run(lr)`` unlearns with that rate and returns a result with a history (or its path).
    Every rate of ``grid`` is tried; among the runs whose path reaches ``target`` the one with
    the highest utility at its operating point wins (ties: the smaller rate); when none reaches
    it, the run with the lowest forget accuracy wins (ties: higher utility). Returns the rate,
    whether it reached the operating point, and the table of every try.
    """
    grid = [float(lr) for lr in grid]
    if not grid:
        raise ValueError("the learning-rate grid is empty: give at least one rate")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"learning rates must be distinct positive numbers, got {grid}")
    runs, rows = {}, {}
    for lr in sorted(grid):
        runs[lr] = run(lr)
        rows[lr] = operating_point(runs[lr], target)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "lr"
    reached = [lr for lr in sorted(grid) if rows[lr]["reached"]]
    if reached:
        best = max(reached, key=lambda lr: (rows[lr]["UT"], -lr))
    else:
        best = min(sorted(grid), key=lambda lr: (rows[lr]["FA"], -rows[lr]["UT"], lr))
    return LearningRateChoice(lr=best, reached=bool(rows[best]["reached"]), table=table, runs=runs)


def seeds_at_chosen_rate(
    run: Callable[[int, float | None], tuple[Any, Any]],
    seeds: Sequence[int],
    grid: Sequence[float] | None,
    *,
    target: float = OPERATING_POINT,
) -> tuple[list[tuple[Any, Any]], LearningRateChoice | None]:
    """Every seed of one cell, its learning rate from :func:`choose_learning_rate`.

    ``run(seed, lr)`` returns ``(row, result)``, the result with a history. With a ``grid``
    the first seed sweeps it and the chosen rate's run is kept as that seed's; the other
    seeds run at the chosen rate. Without one (``None``) every seed runs with ``lr=None``
    (the caller's own rate). Returns one ``(row, result)`` per seed, in order, and the
    choice (``None`` without a grid).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given")
    if grid is None:
        return [run(seed, None) for seed in seeds], None
    tried: dict[float, tuple[Any, Any]] = {}

    def run_at(rate: float) -> Any:
        tried[rate] = run(seeds[0], rate)
        return tried[rate][1]

    choice = choose_learning_rate(run_at, grid, target=target)
    first = tried[choice.lr] if choice.lr in tried else run(seeds[0], choice.lr)
    return [first, *(run(seed, choice.lr) for seed in seeds[1:])], choice


def plot_tradeoff(
    runs: Mapping[str, Sequence[Point] | Any],
    *,
    paper: Mapping[str, tuple[float, float]] | None = None,
    chance: float | None = 0.25,
    target: float | None = OPERATING_POINT,
    ax: Any = None,
    title: str | None = None,
):
    """Forget accuracy (x, falling to the right) against utility (y) along each run's path.

    ``paper`` maps a label to the paper's (FA, UT) point, drawn as a star in the same colour
    when the label is also a run. Dotted lines mark chance and the operating point.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for label, run in runs.items():
        pts = path(run)
        (line,) = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=str(label))
        colours[label] = line.get_color()
    for label, (fa, ut) in (paper or {}).items():
        ax.scatter([fa], [ut], marker="*", s=120, color=colours.get(label, "black"), edgecolor="black",
                   zorder=3, label=f"{label} (paper)")  # fmt: skip
    if chance is not None:
        ax.axvline(chance, color="grey", ls=":", lw=1)
    if target is not None:
        ax.axvline(target, color="black", ls="--", lw=1)
    ax.invert_xaxis()
    ax.set_xlabel("forget accuracy (lower = more forgotten)")
    ax.set_ylabel("utility accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return ax
