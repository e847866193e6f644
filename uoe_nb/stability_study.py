"""Four ways to keep routing stable, compared at the paper's operating point (Chapter 9).

A :class:`Stabiliser` is a label and the :class:`uoe_nb.unlearn.UnlearnConfig` options that
switch it on: UOE's router anchor (Eq. 3), GRIP's null-space projection, TRACE's retain
reweighting, our retain-router term, or nothing. :func:`run_stabilisers` runs each with UOE's
scope, picks each one's learning rate by one procedure
(:func:`uoe_nb.tradeoff.choose_learning_rate`: the rate that reaches FA <= 0.30 with the best
utility), and measures, at the kept checkpoint, utility, the expert-selection overlap with the
original model on forget and retain text, the router-restored check
(:func:`uoe_nb.diagnostics.router_restored_check`) and, where a retrain oracle is given, the
distance to it (:func:`uoe_nb.diagnostics.oracle_distance`). :func:`study_frame` and
:func:`plot_study` turn the runs into the chapter's table and figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from .diagnostics import oracle_distance, router_restored_check
from .layer_study import Variant, run_variant, starting_from
from .scopes import uoe
from .tradeoff import OPERATING_POINT, operating_point, seeds_at_chosen_rate
from .tradeoff import path as run_path
from .unlearn import UnlearnConfig

__all__ = ["STUDY_COLUMNS", "Stabiliser", "StabilityRun", "plot_study", "run_stabilisers", "stabilisers",
           "study_frame"]  # fmt: skip


@dataclass(frozen=True)
class Stabiliser:
    """One way of keeping routing stable: a label and the config options that switch it on."""

    label: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def config(self, base: UnlearnConfig, seed: int, lr: float) -> UnlearnConfig:
        return dataclasses.replace(base, seed=int(seed), lr=float(lr), **dict(self.options))


def stabilisers(alpha: float = 1.0, retain_router_weight: float = 10.0) -> list[Stabiliser]:
    """The chapter's five settings, each alone (the anchor off unless it is the one compared)."""
    return [
        Stabiliser("none", {"anchor_weight": 0.0}),
        Stabiliser(f"anchor (α={alpha:g})", {"anchor_weight": float(alpha)}),
        Stabiliser("GRIP", {"anchor_weight": 0.0, "grip": True}),
        Stabiliser("TRACE", {"anchor_weight": 0.0, "trace": True}),
        Stabiliser(f"retain-router ({retain_router_weight:g})",
                   {"anchor_weight": 0.0, "retain_router_weight": float(retain_router_weight)}),
    ]  # fmt: skip


@dataclass
class StabilityRun:
    """One run's numbers at its kept checkpoint (the operating point when it was reached)."""

    model: str
    label: str
    seed: int
    lr: float
    row: dict[str, Any]
    path: list[tuple[int, float, float]]
    stability: dict[str, Any] = field(default_factory=dict)


def run_stabilisers(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[str],
    retain: Sequence[str],
    settings: Sequence[Stabiliser],
    config: UnlearnConfig,
    *,
    seeds: Sequence[int],
    lr_grid: Sequence[float],
    evaluate: Callable,
    forget_accuracy: Callable[[nn.Module], float],
    original_routers: Mapping[str, Any],
    affinity: Any,
    before: Mapping[str, float],
    oracle: nn.Module | None = None,
    oracle_batches: tuple[list, list] | None = None,
    model_name: str = "",
    target: float = OPERATING_POINT,
) -> tuple[list[StabilityRun], dict[str, pd.DataFrame]]:
    """Every setting with UOE's scope on ``model`` (trained in place, given back bitwise).

    Each setting's rate comes from ``lr_grid`` on the first seed
    (:func:`~uoe_nb.tradeoff.choose_learning_rate`); the other seeds run at that rate. Every
    run measures, on its kept checkpoint, the router-restored check at the target layer
    (``forget_accuracy`` twice: as unlearned, and with the original router) and, with an
    ``oracle``, the KL to it on ``oracle_batches = (forget, retain)``. Returns the kept runs
    and each setting's learning-rate sweep.
    """
    layer = affinity.target[0]

    def one(setting: Stabiliser, seed: int, lr: float) -> tuple[StabilityRun, Any]:
        cfg = setting.config(config, seed, lr)

        def inspect(result):
            check = router_restored_check(result.model, original_routers, forget_accuracy,
                                          original=before["forget_accuracy"], layers=[layer])  # fmt: skip
            out = {"FA, router restored": check.restored, "routing share": check.routing_share}
            if oracle is not None:
                distance = oracle_distance(result.model, oracle, *oracle_batches, routing=False)
                out.update({"KL forget": distance.kl_forget, "KL retain": distance.kl_retain})
            return out

        variant = Variant(setting.label, uoe(), None, group="stabiliser")
        row, result = run_variant(model, tokenizer, forget, retain, variant, cfg,
                                  evaluate=starting_from(before, evaluate), affinity=affinity,
                                  inspect=inspect, base_name=model_name)  # fmt: skip
        pts = run_path(result)
        op = operating_point(pts, target)
        row = {"FA": row["FA"], "UT": row["UT"], "reached": bool(op["reached"]), "step": row["step"],
               "overlap forget": row["overlap forget"], "overlap retain": row["overlap retain"],
               **result.inspected}  # fmt: skip
        stab = {}
        if "grip" in result.stability:
            stab["GRIP rank"] = result.stability["grip"].ranks()
        if "trace" in result.stability:
            stab["TRACE critical"] = result.stability["trace"].rows()
            stab["TRACE max weight"] = result.stability["trace"].max_weight()
        return StabilityRun(model_name, setting.label, int(seed), float(lr), row, pts, stab), result

    runs: list[StabilityRun] = []
    sweeps: dict[str, pd.DataFrame] = {}
    if lr_grid is None:
        raise ValueError("give lr_grid: every setting's rate comes from the one learning-rate procedure")
    for setting in settings:
        done, choice = seeds_at_chosen_rate(lambda seed, rate, s=setting: one(s, seed, rate), seeds, lr_grid,
                                            target=target)  # fmt: skip
        sweeps[setting.label] = choice.table
        runs.extend(run for run, _ in done)
    return runs, sweeps


STUDY_COLUMNS = ["lr", "FA", "UT", "reached", "overlap forget", "overlap retain", "FA, router restored",
                 "routing share", "KL forget", "KL retain"]  # fmt: skip


def study_frame(runs: Sequence[StabilityRun], references: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None
                ) -> pd.DataFrame:  # fmt: skip
    """One row per (model, setting): mean over seeds of the kept checkpoint's numbers.

    ``references`` maps a model to reference rows, e.g. ``{"before": {...}, "oracle": {...}}``
    with ``FA``, ``UT``, ``KL forget``, ``KL retain``; they come first in that model's block.
    ``reached`` counts the seeds at the operating point; ``routing share`` is the share of the
    forgetting that the original router undoes (1: all rerouting, 0: none).
    """
    frame = pd.DataFrame([{"model": r.model, "setting": r.label, "lr": r.lr, **r.row} for r in runs])
    numeric = [c for c in STUDY_COLUMNS if c in frame.columns and c != "reached"]
    grouped = frame.groupby(["model", "setting"], sort=False)
    out = grouped[numeric].mean()
    out["reached"] = grouped["reached"].sum().astype(int).astype(str) + "/" + grouped.size().astype(str)
    blocks = []
    for name in dict.fromkeys(frame["model"]):
        refs = (references or {}).get(name, {})
        if refs:
            blocks.append(pd.DataFrame([{"model": name, "setting": k, **v} for k, v in refs.items()])
                          .set_index(["model", "setting"]))  # fmt: skip
        blocks.append(out.loc[[name]])
    out = pd.concat(blocks)
    return out.reindex(columns=[c for c in STUDY_COLUMNS if c in out.columns])


def plot_study(runs: Sequence[StabilityRun], *, target: float = OPERATING_POINT, chance: float = 0.25):
    """Per model: the first seed's forget-utility paths (left), and the kept checkpoints' overlap with
    the original routing on forget and retain text (right)."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in runs))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (ax_path, ax_bar), name in zip(axes, models, strict=True):
        mine = [r for r in runs if r.model == name]
        first = mine[0].seed
        for r in (r for r in mine if r.seed == first):
            ax_path.plot([p[1] for p in r.path], [p[2] for p in r.path], marker="o", ms=3, label=r.label)
        ax_path.axvline(target, color="black", ls="--", lw=1)
        ax_path.axvline(chance, color="grey", ls=":", lw=1)
        ax_path.invert_xaxis()
        ax_path.set(xlabel="forget accuracy (lower = more forgotten)", ylabel="utility accuracy",
                    title=f"{name}: paths (seed {first})")  # fmt: skip
        ax_path.legend(fontsize=7)
        frame = study_frame(mine).loc[name]
        x = range(len(frame))
        ax_bar.bar([i - 0.2 for i in x], frame["overlap forget"], width=0.4, label="forget text")
        ax_bar.bar([i + 0.2 for i in x], frame["overlap retain"], width=0.4, label="retain text")
        ax_bar.set_xticks(list(x), list(frame.index), rotation=20, fontsize=8)
        ax_bar.set(ylim=(0, 1.05), ylabel="top-K overlap with original (mean over layers)",
                   title=f"{name}: routing at the kept checkpoint")  # fmt: skip
        ax_bar.legend(fontsize=7)
    fig.tight_layout()
    return fig
