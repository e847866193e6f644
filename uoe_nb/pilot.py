"""The pilot study: tables and curves from unlearning runs on the whole model (Chapter 2).

Section 3 of the paper runs GA, GradDiff, NPO and RMU on MoE and dense LLMs and plots the
forget-accuracy drop against the utility drop (Fig. 1a), ablates which modules are tunable
(Table 1), follows the expert-selection overlap and the forget loss over the iterations
(Fig. 3) and the forget text's token proportions over the experts of one layer (Fig. 6).
These helpers turn :class:`uoe_nb.unlearn.UnlearnResult` objects into those tables; the
runs themselves are ordinary :func:`uoe_nb.unlearn.unlearn` calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

__all__ = [
    "PAPER_BASELINES",
    "PAPER_TABLE1",
    "drop_row",
    "drop_table",
    "history_frame",
    "paper_frame",
    "proportion_shift",
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
