"""What the router anchor (Eq. 3-4) does to routing and to forgetting (Chapter 4).

Two small readers of an :class:`uoe_nb.unlearn.UnlearnResult`:

* :func:`target_trace`: per evaluated step, forget accuracy, utility, the
  expert-selection overlap with the original model at the *target layer* on forget and
  retain text, and the target expert's share of the forget tokens' top-K assignments
  (the quantity the anchor pushes up).
* :func:`kept_row`: the kept checkpoint as one table row, plus the router-restored check
  of :mod:`uoe_nb.diagnostics` (how much of the forgetting lives in the routing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .diagnostics import router_restored_check

__all__ = ["kept_row", "target_trace"]


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
