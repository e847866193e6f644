"""The pilot study: tables and curves from unlearning runs on the whole model (Chapter 2).

Section 3 of the paper runs GA, GradDiff, NPO and RMU on MoE and dense LLMs and plots the
forget-accuracy drop against the utility drop (Fig. 1a), ablates which modules are tunable
(Table 1), follows the expert-selection overlap and the forget loss over the iterations
(Fig. 3) and the forget text's token proportions over the experts of one layer (Fig. 6).
These helpers turn :class:`uoe_nb.unlearn.UnlearnResult` objects into those tables and
figures; the runs themselves are ordinary :func:`uoe_nb.unlearn.unlearn` calls, each
cell's learning rate from :func:`uoe_nb.tradeoff.choose_learning_rate`, and runs are
compared at the paper's operating point (:func:`sweep_table`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from .tradeoff import LEVELS, OPERATING_POINT, operating_point, path, utility_at

__all__ = [
    "PAPER_BASELINES",
    "PAPER_TABLE1",
    "METHOD_COLOURS",
    "drop_row",
    "drop_table",
    "history_frame",
    "paper_frame",
    "plot_fig1a",
    "plot_fig3",
    "plot_fig6",
    "proportion_shift",
    "sweep_row",
    "sweep_table",
]

# Table 1 of the paper: GA on WMDP with different tunable modules (FA = forget accuracy,
# UT = MMLU accuracy) at the kept checkpoint.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "Qwen1.5-MoE": {
        "original": (0.4192, 0.5979),
        "experts_and_routers": (0.2953, 0.3393),
        "routers": (0.2526, 0.2977),
        "experts": (0.2536, 0.3242),
    },
    "DeepSeek-V2-Lite": {
        "original": (0.3804, 0.5500),
        "experts_and_routers": (0.2457, 0.3145),
        "routers": (0.2375, 0.3315),
        "experts": (0.2601, 0.3435),
    },
}

# Table 2 of the paper (WMDP): (FA, UT) of the pretrained model and of whole-model GA and RMU.
PAPER_BASELINES: dict[str, dict[str, tuple[float, float]]] = {
    "Qwen1.5-MoE": {"original": (0.419, 0.598), "ga": (0.295, 0.339), "rmu": (0.261, 0.356)},
    "DeepSeek-V2-Lite": {"original": (0.380, 0.555), "ga": (0.246, 0.315), "rmu": (0.253, 0.454)},
}


def paper_frame(table: dict[str, dict[str, tuple[float, float]]]) -> pd.DataFrame:
    """One of the paper tables above as a frame indexed by (model, row) with FA and UT columns."""
    rows = [
        {"model": model, "row": row, "FA": fa, "UT": ut}
        for model, entries in table.items()
        for row, (fa, ut) in entries.items()
    ]
    return pd.DataFrame(rows).set_index(["model", "row"])


def drop_row(result: Any, **labels: Any) -> dict[str, Any]:
    """FA and UT before (step 0) and at the kept checkpoint, and their drops (Fig. 1a's axes).

    ``forget_drop = FA_0 - FA`` (higher is better) and ``utility_drop = UT_0 - UT`` (lower is
    better), both from the run's own evaluations. ``labels`` (e.g. ``model="tiny-dense"``)
    come first in the row. Raises if the run was not evaluated.
    """
    start, kept = result.history[0], result.best
    for rec in (start, kept):
        if "forget_accuracy" not in rec.metrics or "utility_accuracy" not in rec.metrics:
            raise ValueError("the run has no forget/utility accuracy: pass evaluate= to unlearn()")
    fa0, ut0 = start.metrics["forget_accuracy"], start.metrics["utility_accuracy"]
    fa, ut = kept.metrics["forget_accuracy"], kept.metrics["utility_accuracy"]
    return {
        **labels,
        "method": result.config.method,
        "scope": result.scope.name,
        "trainable": result.scope.num_trainable,
        "step": kept.step,
        "FA_0": fa0,
        "UT_0": ut0,
        "FA": fa,
        "UT": ut,
        "forget_drop": fa0 - fa,
        "utility_drop": ut0 - ut,
    }


def drop_table(results: Iterable[tuple[dict[str, Any], Any]]) -> pd.DataFrame:
    """:func:`drop_row` for each ``(labels, result)`` pair, as one frame."""
    return pd.DataFrame([drop_row(result, **labels) for labels, result in results])


def history_frame(result: Any) -> pd.DataFrame:
    """The monitored history of a run, one row per evaluated step (Fig. 3a/3b).

    Columns: ``forget_loss`` (the forget-set loss of the last step's batch; empty at step 0),
    ``FA``, ``UT`` and ``overlap L<l>``: the share of the original model's top-K expert choices
    on forget text that the model still makes at MoE layer ``l``.
    """
    rows = []
    for rec in result.history:
        row: dict[str, Any] = {"step": rec.step, "forget_loss": rec.forget_loss}
        row["FA"] = rec.metrics.get("forget_accuracy")
        row["UT"] = rec.metrics.get("utility_accuracy")
        for layer, value in sorted(rec.overlap_forget.items()):
            row[f"overlap L{layer}"] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("step")


def proportion_shift(result: Any, layer: int, step: int | None = None) -> pd.DataFrame:
    """Forget-text token proportions over the experts of ``layer``, before vs after (Fig. 6).

    ``before`` is step 0 (the original model), ``after`` the kept checkpoint (or ``step``).
    Rows are sorted by ``before``, largest first, as in the paper's figure, so a shift of
    tokens from the original favourites to other experts shows as mass moving right.
    """
    before = result.history[0].proportions_forget
    if layer not in before:
        raise KeyError(f"layer {layer} was not monitored; MoE layers with proportions: {sorted(before)}")
    rec = result.best if step is None else next((r for r in result.history if r.step == step), None)
    if rec is None:
        raise KeyError(f"step {step} was not evaluated; evaluated steps: {[r.step for r in result.history]}")
    frame = pd.DataFrame({"before": before[layer], "after": rec.proportions_forget[layer]})
    frame.index.name = "expert"
    return frame.sort_values("before", ascending=False, kind="stable")


# --------------------------------------------------------------------------------------
# Runs compared at the operating point (the learning-rate sweep of Chapter 2)
# --------------------------------------------------------------------------------------


def sweep_row(choice: Any, target: float = OPERATING_POINT, **labels: Any) -> dict[str, Any]:
    """The chosen run of a :class:`uoe_nb.tradeoff.LearningRateChoice` at the operating point.

    ``FA`` and ``UT`` are read where the run first reached FA <= ``target`` (or at the
    lowest FA it reached, ``reached op`` False); the drops are from step 0, as in Fig. 1a;
    ``UT@FA<=l`` is utility where the path crossed each level of
    :data:`uoe_nb.tradeoff.LEVELS` (interpolated, ``nan`` if it never did). ``lr`` is the chosen
    rate as text, so that rounding the table keeps it.
    """
    points = path(choice.runs[choice.lr])
    op = operating_point(points, target)
    fa0, ut0 = points[0][1], points[0][2]
    row = {**labels, "lr": f"{choice.lr:g}", "reached op": op["reached"], "step": op["step"], "FA_0": fa0,
           "UT_0": ut0, "FA": op["FA"], "UT": op["UT"], "forget_drop": fa0 - op["FA"],
           "utility_drop": ut0 - op["UT"]}  # fmt: skip
    row.update({f"UT@FA<={lv:g}": utility_at(points, lv) for lv in LEVELS})
    return row


def sweep_table(choices: Iterable[tuple[dict[str, Any], Any]], target: float = OPERATING_POINT) -> pd.DataFrame:
    """:func:`sweep_row` for each ``(labels, choice)`` pair, as one frame."""
    return pd.DataFrame([sweep_row(choice, target, **labels) for labels, choice in choices])


METHOD_COLOURS = {"ga": "tab:blue", "graddiff": "tab:orange", "npo": "tab:green", "rmu": "tab:red",
                  "simnpo": "tab:purple"}  # fmt: skip


def plot_fig1a(
    runs: Mapping[tuple[str, str], Any],
    dense: Sequence[str] = (),
    *,
    paper: Mapping[str, Mapping[str, tuple[float, float]]] = PAPER_BASELINES,
    target: float = OPERATING_POINT,
    chance: float = 0.25,
    title: str = "ours",
):
    """Fig. 1a as trade-off curves: utility against forget accuracy along each run's path.

    ``runs`` maps ``(model, method)`` to a run (its history, or its path); colour is the
    method, the marker the model, models listed in ``dense`` are dashed, MoE models solid. The first panel holds the
    paper's whole-model points (Table 2: pretrained as x, GA and RMU) on the same axes.
    Dashed vertical line: the operating point; dotted: chance. Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, (ax_paper, ax_ours) = plt.subplots(1, 2, figsize=(10, 4))
    methods = []
    for i, (model, entries) in enumerate(paper.items()):
        marker = "os^D"[i % 4]
        for row, (fa, ut) in entries.items():
            colour = "k" if row == "original" else METHOD_COLOURS.get(row, "grey")
            ax_paper.scatter(fa, ut, color=colour, marker="x" if row == "original" else marker, s=60)
            if row != "original" and row not in methods:
                methods.append(row)
        ax_paper.scatter([], [], color="grey", marker=marker, label=model)
    for method in methods:
        ax_paper.scatter([], [], color=METHOD_COLOURS.get(method, "grey"), marker="o", label=method.upper())
    ax_paper.set_title("paper, whole model (x pretrained)", fontsize=9)
    ax_paper.legend(fontsize=7)
    models = list(dict.fromkeys(model for model, _ in runs))
    for (model, method), run in runs.items():
        points = path(run)
        ax_ours.plot([p[1] for p in points], [p[2] for p in points], marker="os^D"[models.index(model) % 4],
                     ms=4, ls="--" if model in dense else "-", color=METHOD_COLOURS.get(method, "grey"),
                     label=f"{model.replace('tiny-', '')} {method.upper()}")  # fmt: skip
    ax_ours.set_title(f"{title} (dense dashed; marker: model)", fontsize=9)
    ax_ours.legend(fontsize=6, ncol=2)
    for ax in (ax_paper, ax_ours):
        ax.axvline(chance, color="grey", ls=":", lw=1)
        ax.axvline(target, color="k", ls="--", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("forget accuracy (lower: more forgotten)")
        ax.set_ylabel("utility accuracy")
    fig.tight_layout()
    return fig


def plot_fig3(run: Any, scope_runs: Mapping[str, Any], title: str = ""):
    """Fig. 3: (a) the expert-selection overlap per MoE layer over the iterations of ``run``;
    (b) the forget-set loss of each run in ``scope_runs`` (label -> run). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 3.8))
    history = history_frame(run)
    history[[c for c in history.columns if c.startswith("overlap")]].plot(ax=ax_a, marker="o")
    ax_a.set_xlabel("unlearning step")
    ax_a.set_ylabel("expert-selection overlap with the original")
    ax_a.set_title(f"(a) {title}: overlap per MoE layer", fontsize=9)
    for label, result in scope_runs.items():
        h = history_frame(result)
        ax_b.plot(h.index[1:], h.forget_loss.iloc[1:], marker="o", label=label)
    ax_b.set_xlabel("unlearning step")
    ax_b.set_ylabel("forget-set NLL (GA pushes it up)")
    ax_b.set_title("(b) forget loss by tunable module", fontsize=9)
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fig6(props: pd.DataFrame, layer: int, after: str = "after"):
    """Fig. 6: the forget tokens' shares over the experts of ``layer``, before and after
    (:func:`proportion_shift`'s frame, sorted by the original share). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    pos = range(len(props))
    ax.bar([p - 0.2 for p in pos], props.before, width=0.4, label="original")
    ax.bar([p + 0.2 for p in pos], props.after, width=0.4, label=after)
    ax.set_xticks(list(pos), [str(e) for e in props.index], fontsize=7)
    ax.set_xlabel(f"expert of layer {layer} (sorted by original share)")
    ax.set_ylabel("share of forget-token assignments")
    ax.legend()
    fig.tight_layout()
    return fig
