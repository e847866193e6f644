"""What the router anchor (Eq. 3-4) does to routing and to forgetting (Chapter 4).

Two small readers of an :class:`uoe_nb.unlearn.UnlearnResult`:

* :func:`target_trace`: per evaluated step, forget accuracy, utility, the
  expert-selection overlap with the original model at the *target layer* on forget and
  retain text, and the target expert's share of the forget tokens' top-K assignments
  (the quantity the anchor pushes up).
* :func:`kept_row`: the kept checkpoint as one table row, plus the router-restored check
  of :mod:`uoe_nb.diagnostics` (how much of the forgetting lives in the routing).

and two that sum them up: :func:`mean_sd` (a table of mean ± sd over seeds per setting)
and :func:`plot_traces` (the routing at the target layer over the steps of each setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from .diagnostics import router_restored_check

__all__ = ["PAPER_TABLE10", "beside_table2", "kept_row", "mean_sd", "plot_traces", "table10", "target_trace"]


# Table 10 (GA+UOE on RWKU, DeepSeek-V2-Lite): forget accuracy and utility by the anchor
# weight alpha of Eq. 4.
PAPER_TABLE10: dict[float, dict[str, float]] = {0.0: {"FA": 0.0, "UT": 0.5435}, 1.0: {"FA": 0.0, "UT": 0.5485},
                                                100.0: {"FA": 0.0, "UT": 0.5471},
                                                1000.0: {"FA": 0.0, "UT": 0.5468}}  # fmt: skip


def _target(result: Any) -> tuple[int, int]:
    if result.target is None or result.target[1] is None:
        raise ValueError(
            "the run has no target (layer, expert): use a scope with one target expert, e.g. scope='uoe'"
        )
    return int(result.target[0]), int(result.target[1])


def target_trace(result: Any) -> list[dict[str, Any]]:
    """One row per evaluated step of ``result.history``, at the run's target (layer, expert).

    Columns: ``step``, ``forget_accuracy`` and ``utility_accuracy`` (when the run was
    evaluated), ``overlap_forget`` / ``overlap_retain`` (top-K overlap with the original
    model at the target layer, Fig. 3a/4/5) and ``target_share`` (the target expert's
    share of the forget tokens' top-K assignments at that layer; at most 1/K).
    """
    layer, expert = _target(result)
    rows = []
    for rec in result.history:
        row: dict[str, Any] = {"step": rec.step}
        row.update(rec.metrics)
        row["overlap_forget"] = rec.overlap_forget.get(layer, float("nan"))
        row["overlap_retain"] = rec.overlap_retain.get(layer, float("nan"))
        props = rec.proportions_forget.get(layer)
        row["target_share"] = float(props[expert]) if props is not None else float("nan")
        rows.append(row)
    return rows


def kept_row(
    result: Any,
    original_state: Mapping[str, torch.Tensor],
    forget_accuracy: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """The kept checkpoint as a table row, with the router-restored check (Chapter 4).

    ``original_state`` is a ``state_dict()`` snapshot taken before unlearning.
    ``forget_accuracy(model) -> float`` re-measures forget accuracy; with it the row gains
    ``FA, routers restored`` (the unlearned model with its original routers) and
    ``routing share``: the share of the forgetting that vanishes when the routers come
    back (1: all routing, 0: all erased from the expert weights).
    """
    layer, expert = _target(result)
    kept = next(r for r in target_trace(result) if r["step"] == result.best_step)
    base = result.history[0].metrics
    row: dict[str, Any] = {
        "target": f"L{layer}/E{expert}",
        "kept step": result.best_step,
        "FA": kept.get("forget_accuracy"),
        "UT": kept.get("utility_accuracy"),
        "overlap forget": kept["overlap_forget"],
        "overlap retain": kept["overlap_retain"],
        "target share": kept["target_share"],
    }
    if forget_accuracy is not None:
        check = router_restored_check(
            result.model,
            original_state,
            forget_accuracy,
            original=base.get("forget_accuracy"),
            layers=[layer],
        )
        if base.get("forget_accuracy") is None:
            row["FA"] = check.unlearned
        row["FA, routers restored"] = check.restored
        row["routing share"] = check.routing_share
    return row


def mean_sd(runs: pd.DataFrame, columns: Sequence[str], by: str = "setting", digits: int = 3) -> pd.DataFrame:
    """``mean ± sd`` of ``columns`` over the rows of each ``by`` group, as text (groups in first-seen order).

    The sd is the population sd (``ddof=0``), so one seed shows ``± 0.0``.
    """
    missing = [c for c in [by, *columns] if c not in runs.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the runs; they have {list(runs.columns)}")
    groups = runs.groupby(by, sort=False)[list(columns)]
    return groups.mean().round(digits).astype(str) + " ± " + groups.std(ddof=0).round(digits).astype(str)


TRACE_PANELS = (("overlap_forget", "forget text", "top-K overlap with original"),
                ("overlap_retain", "retain text", "top-K overlap with original"),
                ("target_share", "target expert, forget text", "share of top-K assignments"))  # fmt: skip


def plot_traces(traces: Mapping[str, Iterable[Mapping[str, Any]] | pd.DataFrame], layer: int, top_k: int):
    """Three panels over the unlearning steps, one line per setting (``traces``: label ->
    :func:`target_trace` rows): the target layer's overlap with the original routing on
    forget and on retain text, and the target expert's share of the forget tokens'
    assignments, with its ceiling 1/``top_k`` dotted. Returns the figure.
    """
    import matplotlib.pyplot as plt

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not traces:
        raise ValueError("no traces to draw")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for label, rows in traces.items():
        trace = pd.DataFrame(rows)
        for ax, (column, _, _) in zip(axes, TRACE_PANELS, strict=True):
            ax.plot(trace["step"].tolist(), trace[column].tolist(), marker="o", label=label)
    for ax, (_, title, ylabel) in zip(axes, TRACE_PANELS, strict=True):
        ax.set_title(f"layer {layer}: {title}")
        ax.set_xlabel("unlearning step")
        ax.set_ylabel(ylabel)
    axes[2].axhline(1 / top_k, color="grey", ls=":", label="1/K (every token)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def table10(sweep: pd.DataFrame, *, label: str, num_experts: int | None = None) -> pd.DataFrame:
    """Table 10 beside ours: ``sweep`` holds one :func:`kept_row` per anchor weight, indexed
    by the paper's alpha; the result has the paper's FA and UT where it reports the alpha,
    then ours (``<label> FA``, UT, kept step, target share, overlap retain), and, given
    ``num_experts``, the same alpha in the released code's units (alpha x experts)."""
    from .layer_study import beside_paper

    columns = ["FA", "UT", "kept step", "target share", "overlap retain"]
    rows = {alpha: sweep.loc[alpha] for alpha in sweep.index}
    table = beside_paper(rows, PAPER_TABLE10, index="α (paper)", source="DeepSeek-V2-Lite, RWKU", label=label,
                         columns=columns)  # fmt: skip
    if num_experts is not None:
        table.insert(2, "α (released code)", [alpha * num_experts for alpha in table.index])
    return table


def beside_table2(
    runs: pd.DataFrame, *, label: str, models: Sequence[str] = ("Qwen1.5-MoE", "DeepSeek-V2-Lite")
) -> pd.DataFrame:
    """Each setting's mean over seeds beside the paper's GA+UOE of Table 2 (WMDP).

    ``runs`` has one row per run with ``setting``, ``original FA`` / ``original UT`` and the
    kept checkpoint's ``FA`` / ``UT``. Rows: original FA, original UT, GA+UOE FA, GA+UOE
    UT; one column per paper model (``paper (<model>)``), then ``<label>: <setting>``.
    """
    from .baselines import paper_result

    missing = [c for c in ("setting", "original FA", "original UT", "FA", "UT") if c not in runs.columns]
    if missing:
        raise KeyError(f"runs lack {missing}")
    index = ["original FA", "original UT", "GA+UOE FA", "GA+UOE UT"]
    columns = {f"paper ({m})": [*paper_result(m, "original", "none"), *paper_result(m, "ga", "uoe")] for m in models}
    for name, sel in runs.groupby("setting", sort=False):
        columns[f"{label}: {name}"] = [sel[c].mean() for c in ("original FA", "original UT", "FA", "UT")]
    return pd.DataFrame(columns, index=index)
