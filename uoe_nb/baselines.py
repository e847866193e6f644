"""Baselines side by side: the paper's Tables 2, 3 and 4 (Chapter 6).

Table 2 of the paper runs four unlearning methods (GA, GradDiff, NPO, RMU) with and
without UOE; Table 4 compares GA with UOE against GA with the parameter-efficient
alternatives LoRA and ESFT; Table 3 lists what share of the parameters each of those
scopes trains. This module runs such a grid of (method x scope) cells over several
seeds, each on one base model trained in place and given back, and (where the configuration says so)
to the same forget-accuracy target, and turns the runs into tables:

* :class:`Baseline` names one cell (method, scope, learning rate, other settings);
* :func:`run_grid` unlearns the base model for every cell and seed through
  :func:`uoe_nb.layer_study.run_variant`, optionally measures each unlearned model's
  distance to a retrain oracle (:func:`uoe_nb.diagnostics.oracle_distance`), and
  returns a :class:`BaselineGrid` of :class:`RunRecord` objects;
* :func:`aggregate` gives one :class:`BaselineSummary` per cell: mean and sample
  standard deviation over seeds (:class:`Stat`);
* :func:`parameter_ratios` is Table 3 for a model (through
  :func:`uoe_nb.scopes.describe_scopes`);
* :data:`PAPER_RESULTS` and :data:`PAPER_PARAMETER_RATIOS` hold the paper's numbers,
  :func:`paper_result` looks one up, so a chapter can print them beside ours.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from .diagnostics import OracleDistance, oracle_distance
from .layer_study import Variant, run_variant, starting_from
from .routing import batches as make_batches
from .scopes import Scope, describe_scopes, rmu_mlps
from .tradeoff import LEVELS, OPERATING_POINT, LearningRateChoice, seeds_at_chosen_rate, tradeoff_table
from .tradeoff import path as run_path
from .unlearn import METHODS, UnlearnConfig, UnlearnResult

__all__ = [
    "BASELINE_SCOPES",
    "PAPER_MODELS",
    "PAPER_PARAMETER_RATIOS",
    "PAPER_RESULTS",
    "PAPER_TWIN",
    "Baseline",
    "BaselineGrid",
    "BaselineSummary",
    "RunRecord",
    "Stat",
    "aggregate",
    "baseline_label",
    "paper_frame",
    "paper_result",
    "parameter_ratios",
    "COMPARISON_COLUMNS",
    "comparison_frame",
    "oracle_frame",
    "plot_tradeoffs",
    "run_grid",
    "summary_frame",
    "uoe_gains",
]

log = logging.getLogger(__name__)

# The scopes the paper's Tables 2-4 compare: the whole model, UOE, and the two PEFT baselines.
BASELINE_SCOPES = ("full", "uoe", "lora", "esft")
_METHOD_LABELS = {"ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU"}
_SCOPE_SUFFIX = {"full": "", "uoe": "+UOE", "lora": "+LoRA", "esft": "+ESFT"}
# Settings a Baseline may not override: they come from the cell itself or from the grid.
_RESERVED = {"method", "scope", "lr", "seed", "target"}

# --------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------

PAPER_MODELS = ("Qwen1.5-MoE", "DeepSeek-V2-Lite", "Mixtral-8x7B")
# The zoo model that mirrors each of the paper's models (same family, toy size).
PAPER_TWIN = {
    "tiny-qwen2moe": "Qwen1.5-MoE",
    "tiny-qwen2moe-deep": "Qwen1.5-MoE",  # the 8-layer twin of the same recipe
    "tiny-deepseek": "DeepSeek-V2-Lite",
    "tiny-mixtral": "Mixtral-8x7B",
}

# (FA, UT) at the kept checkpoint: PAPER_RESULTS[benchmark][model][(method, scope)].
# Table 2 (four methods, whole model vs UOE, Qwen and DeepSeek) and Table 4 (GA with
# LoRA, ESFT and UOE; Mixtral only there). Table 4's UOE row repeats Table 2's GA+UOE.
# FA: WMDP-cyber accuracy (chance 0.25) or RWKU ROUGE-L recall (ideal 0); UT: MMLU.
# ("original", "none") is the pretrained model.
PAPER_RESULTS: dict[str, dict[str, dict[tuple[str, str], tuple[float, float]]]] = {
    "WMDP": {
        "Qwen1.5-MoE": {
            ("original", "none"): (0.4192, 0.5979),
            ("ga", "full"): (0.2953, 0.3393),
            ("ga", "uoe"): (0.2987, 0.5012),
            ("graddiff", "full"): (0.2964, 0.2965),
            ("graddiff", "uoe"): (0.2445, 0.5295),
            ("npo", "full"): (0.3447, 0.4612),
            ("npo", "uoe"): (0.3200, 0.5468),
            ("rmu", "full"): (0.2612, 0.3560),
            ("rmu", "uoe"): (0.2536, 0.5351),
            ("ga", "lora"): (0.2459, 0.2689),
            ("ga", "esft"): (0.3145, 0.4514),
        },
        "DeepSeek-V2-Lite": {
            ("original", "none"): (0.3804, 0.5548),
            ("ga", "full"): (0.2457, 0.3145),
            ("ga", "uoe"): (0.2700, 0.5100),
            ("graddiff", "full"): (0.2898, 0.3929),
            ("graddiff", "uoe"): (0.2677, 0.4895),
            ("npo", "full"): (0.3200, 0.4700),
            ("npo", "uoe"): (0.2898, 0.4790),
            ("rmu", "full"): (0.2530, 0.4540),
            ("rmu", "uoe"): (0.2859, 0.5424),
            ("ga", "lora"): (0.2657, 0.2295),
            ("ga", "esft"): (0.2737, 0.5108),
        },
        "Mixtral-8x7B": {
            ("original", "none"): (0.5229, 0.6885),
            ("ga", "lora"): (0.2658, 0.2597),
            ("ga", "esft"): (0.2547, 0.6386),
            ("ga", "uoe"): (0.2608, 0.6364),
        },
    },
    "RWKU": {
        "Qwen1.5-MoE": {
            ("original", "none"): (0.4243, 0.5979),
            ("ga", "full"): (0.0078, 0.4849),
            ("ga", "uoe"): (0.0060, 0.5709),
            ("graddiff", "full"): (0.0700, 0.5296),
            ("graddiff", "uoe"): (0.0010, 0.5987),
            ("npo", "full"): (0.0000, 0.3718),
            ("npo", "uoe"): (0.0020, 0.5428),
            ("rmu", "full"): (0.0200, 0.2420),
            ("rmu", "uoe"): (0.0723, 0.5975),
            ("ga", "lora"): (0.0000, 0.2689),
            ("ga", "esft"): (0.0010, 0.4433),
        },
        "DeepSeek-V2-Lite": {
            ("original", "none"): (0.5376, 0.5548),
            ("ga", "full"): (0.0839, 0.5195),
            ("ga", "uoe"): (0.0000, 0.5485),
            ("graddiff", "full"): (0.1901, 0.3495),
            ("graddiff", "uoe"): (0.0000, 0.5253),
            ("npo", "full"): (0.0970, 0.5388),
            ("npo", "uoe"): (0.0000, 0.5479),
            ("rmu", "full"): (0.0010, 0.5109),
            ("rmu", "uoe"): (0.0130, 0.5388),
            ("ga", "lora"): (0.0000, 0.2302),
            ("ga", "esft"): (0.0200, 0.5001),
        },
        "Mixtral-8x7B": {
            ("original", "none"): (0.5820, 0.6885),
            ("ga", "lora"): (0.0000, 0.2295),
            ("ga", "esft"): (0.0542, 0.6743),
            ("ga", "uoe"): (0.0455, 0.6713),
        },
    },
}

# Table 3: trainable parameters as a percentage of all parameters.
PAPER_PARAMETER_RATIOS: dict[str, dict[str, float]] = {
    "Qwen1.5-MoE": {"lora": 0.87, "esft": 3.13, "uoe": 0.06},
    "DeepSeek-V2-Lite": {"lora": 0.92, "esft": 2.86, "uoe": 0.06},
    "Mixtral-8x7B": {"lora": 0.26, "esft": 14.0, "uoe": 0.41},
}


def _paper_model(model: str) -> str:
    name = PAPER_TWIN.get(model, model)
    if name not in PAPER_MODELS:
        raise KeyError(
            f"no paper numbers for model {model!r}: use one of {list(PAPER_MODELS)} or a zoo twin "
            f"{list(PAPER_TWIN)}"
        )
    return name


def paper_result(model: str, method: str, scope: str, benchmark: str = "WMDP") -> tuple[float, float]:
    """The paper's ``(FA, UT)`` for ``method`` over ``scope`` on ``model`` (Tables 2 and 4).

    ``model`` is a paper model (``"Qwen1.5-MoE"``) or its zoo twin (``"tiny-qwen2moe"``);
    ``("original", "none")`` is the pretrained model. Raises ``KeyError`` naming the cells
    the paper has when it did not run this one.
    """
    if benchmark not in PAPER_RESULTS:
        raise KeyError(f"unknown benchmark {benchmark!r}; the paper reports {list(PAPER_RESULTS)}")
    name = _paper_model(model)
    table = PAPER_RESULTS[benchmark][name]
    key = (method, scope)
    if key not in table:
        raise KeyError(
            f"the paper reports no {method}/{scope} result for {name} on {benchmark}; it has {list(table)}"
        )
    return table[key]


def paper_frame(benchmark: str = "WMDP") -> pd.DataFrame:
    """The paper's Table 2 and 4 cells for ``benchmark`` as a frame indexed by (model, method, scope)."""
    if benchmark not in PAPER_RESULTS:
        raise KeyError(f"unknown benchmark {benchmark!r}; the paper reports {list(PAPER_RESULTS)}")
    rows = [
        {
            "model": model,
            "method": method,
            "scope": scope,
            "label": baseline_label(method, scope),
            "FA": fa,
            "UT": ut,
        }
        for model, cells in PAPER_RESULTS[benchmark].items()
        for (method, scope), (fa, ut) in cells.items()
    ]
    return pd.DataFrame(rows).set_index(["model", "method", "scope"])


# --------------------------------------------------------------------------------------
# One cell of the grid
# --------------------------------------------------------------------------------------


def baseline_label(method: str, scope: str) -> str:
    """The paper's name of a cell: ``GA`` (whole model), ``GA+UOE``, ``GA+LoRA``, ``GA+ESFT``."""
    if method == "original":
        return "pretrained"
    return f"{_METHOD_LABELS.get(method, method)}{_SCOPE_SUFFIX.get(scope, '+' + scope)}"


@dataclass(frozen=True)
class Baseline:
    """One cell of the comparison: an unlearning ``method`` over a ``scope``.

    ``method`` is one of :data:`uoe_nb.unlearn.METHODS`; ``scope`` one of
    :data:`BASELINE_SCOPES` (``"full"`` is the method as published: every parameter, except for
    RMU, whose published set is the MLPs of the three layers up to the steered one).
    ``lr`` overrides the grid config's learning rate; ``options`` overrides any other
    :class:`~uoe_nb.unlearn.UnlearnConfig` field (e.g. ``{"rmu_layer": 1}``), except the
    method, scope, learning rate, seed and anchor target, which the cell and the grid set.
    """

    method: str
    scope: str = "full"
    lr: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.scope not in BASELINE_SCOPES:
            raise ValueError(
                f"unknown baseline scope {self.scope!r}; choose one of {list(BASELINE_SCOPES)} "
                "(other scopes: uoe_nb.layer_study.run_variant)"
            )
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"learning rate must be positive, got {self.lr!r}")
        known = {f.name for f in dataclasses.fields(UnlearnConfig)}
        for key in self.options:
            if key in _RESERVED:
                raise ValueError(f"option {key!r} is set by the baseline or the grid, not by options")
            if key not in known:
                raise ValueError(f"unknown UnlearnConfig option {key!r}; known: {sorted(known - _RESERVED)}")
        if self.method == "rmu" and self.scope == "full" and self.options.get("rmu_layer") is None:
            raise ValueError(
                "whole-model RMU trains RMU's published set, the MLPs of layers l-2..l below the steered "
                "layer l: give it as options={'rmu_layer': l}"
            )

    @property
    def label(self) -> str:
        return baseline_label(self.method, self.scope)

    def config(self, base: UnlearnConfig, seed: int) -> UnlearnConfig:
        """``base`` with this cell's method, learning rate and options, and ``seed``."""
        lr = base.lr if self.lr is None else float(self.lr)
        return dataclasses.replace(base, method=self.method, lr=lr, seed=int(seed), **dict(self.options))

    def variant(self) -> Variant:
        """The :class:`~uoe_nb.layer_study.Variant` that :func:`run_grid` unlearns with; UOE
        uses the attributed target (anchor included). Whole-model RMU trains RMU's published
        set, the MLPs of layers ``rmu_layer - 2 .. rmu_layer`` (:func:`uoe_nb.scopes.rmu_mlps`),
        so it needs ``options={"rmu_layer": l}``."""
        if self.method == "rmu" and self.scope == "full":
            return Variant(self.label, rmu_mlps(), None, group=self.scope)
        return Variant(self.label, Scope.from_name(self.scope), None, group=self.scope)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One seed of one cell, at the kept checkpoint.

    ``forget_accuracy`` (FA) and ``utility_accuracy`` (UT) with their values before
    unlearning; ``reached`` says whether FA reached the config's target (``None``
    without a target); ``overlap_forget`` is the mean over MoE layers of the
    expert-selection overlap with the original model on forget text (the paper's
    routing metric); ``oracle`` the distance to the retrain oracle, where one was given.
    """

    model: str
    method: str
    scope: str
    seed: int
    step: int
    forget_accuracy: float
    utility_accuracy: float
    forget_accuracy_before: float
    utility_accuracy_before: float
    trainable: int
    fraction: float
    reached: bool | None
    stopped: str
    overlap_forget: float = math.nan
    oracle: OracleDistance | None = None
    lr: float = math.nan
    path: list[tuple[int, float, float]] = field(default_factory=list)  # (step, FA, UT) of evaluated checkpoints

    @property
    def label(self) -> str:
        return baseline_label(self.method, self.scope)

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "model": self.model,
            "label": self.label,
            "method": self.method,
            "scope": self.scope,
            "seed": self.seed,
            "step": self.step,
            "FA": self.forget_accuracy,
            "UT": self.utility_accuracy,
            "FA_0": self.forget_accuracy_before,
            "UT_0": self.utility_accuracy_before,
            "trainable": self.trainable,
            "fraction": self.fraction,
            "reached": self.reached,
            "overlap forget": self.overlap_forget,
            "lr": self.lr,
            "stopped": self.stopped,
        }
        if self.oracle is not None:
            row["KL to oracle (forget)"] = self.oracle.kl_forget
            row["KL to oracle (retain)"] = self.oracle.kl_retain
        return row


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``n - 1`` in the denominator; ``nan`` for one value)."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError("no values to summarise")
        if any(math.isnan(v) for v in vals):
            return cls(math.nan, math.nan, len(vals))
        sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
        return cls(statistics.fmean(vals), sd, len(vals))

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:.3f}" if math.isnan(self.sd) else f"{self.mean:.3f} ± {self.sd:.3f}"


@dataclass(frozen=True)
class BaselineSummary:
    """One cell over its seeds: mean ± sd of FA, UT, the kept step and the oracle KL."""

    model: str
    method: str
    scope: str
    seeds: tuple[int, ...]
    forget_accuracy: Stat
    utility_accuracy: Stat
    step: Stat
    overlap_forget: Stat
    fraction: float
    reached: int | None  # seeds whose run reached the FA target
    kl_forget: Stat | None = None
    kl_retain: Stat | None = None

    @property
    def label(self) -> str:
        return baseline_label(self.method, self.scope)

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "model": self.model,
            "label": self.label,
            "method": self.method,
            "scope": self.scope,
            "seeds": len(self.seeds),
            "FA mean": self.forget_accuracy.mean,
            "FA sd": self.forget_accuracy.sd,
            "UT mean": self.utility_accuracy.mean,
            "UT sd": self.utility_accuracy.sd,
            "step mean": self.step.mean,
            "overlap forget": self.overlap_forget.mean,
            "trainable %": 100 * self.fraction,
            "reached target": self.reached,
        }
        if self.kl_forget is not None and self.kl_retain is not None:
            row.update(
                {
                    "KL oracle forget mean": self.kl_forget.mean,
                    "KL oracle forget sd": self.kl_forget.sd,
                    "KL oracle retain mean": self.kl_retain.mean,
                    "KL oracle retain sd": self.kl_retain.sd,
                }
            )
        return row


def aggregate(records: Iterable[RunRecord]) -> list[BaselineSummary]:
    """One :class:`BaselineSummary` per (model, method, scope), in the order cells first appear."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for rec in records:
        groups.setdefault((rec.model, rec.method, rec.scope), []).append(rec)
    if not groups:
        raise ValueError("no run records to aggregate")
    out = []
    for (model, method, scope), recs in groups.items():
        seeds = [r.seed for r in recs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{model} {baseline_label(method, scope)}: seed listed twice in {seeds}")
        with_oracle = [r.oracle for r in recs if r.oracle is not None]
        if with_oracle and len(with_oracle) != len(recs):
            raise ValueError(
                f"{model} {baseline_label(method, scope)}: only some seeds have an oracle distance"
            )
        reached = [r.reached for r in recs]
        out.append(
            BaselineSummary(
                model=model,
                method=method,
                scope=scope,
                seeds=tuple(seeds),
                forget_accuracy=Stat.of(r.forget_accuracy for r in recs),
                utility_accuracy=Stat.of(r.utility_accuracy for r in recs),
                step=Stat.of(r.step for r in recs),
                overlap_forget=Stat.of(r.overlap_forget for r in recs),
                fraction=recs[0].fraction,
                reached=None if any(v is None for v in reached) else sum(bool(v) for v in reached),
                kl_forget=Stat.of(o.kl_forget for o in with_oracle) if with_oracle else None,
                kl_retain=Stat.of(o.kl_retain for o in with_oracle) if with_oracle else None,
            )
        )
    return out


def summary_frame(
    summaries: Iterable[BaselineSummary], *, benchmark: str | None = "WMDP", paper_model: str | None = None
) -> pd.DataFrame:
    """The summaries as a frame indexed by label; with ``benchmark``, the paper's FA and UT
    for the same cell beside ours (empty where the paper has no such cell, or no twin)."""
    rows = []
    for s in summaries:
        row = s.as_row()
        if benchmark is not None:
            try:
                fa, ut = paper_result(paper_model or s.model, s.method, s.scope, benchmark)
            except KeyError:
                fa, ut = math.nan, math.nan
            row = {"paper FA": fa, "paper UT": ut, **row}
        rows.append(row)
    if not rows:
        raise ValueError("no summaries given")
    frame = pd.DataFrame(rows)
    # One model: index by the cell's label; several: by (model, label).
    return frame.set_index("label" if frame["model"].nunique() == 1 else ["model", "label"])


@dataclass
class BaselineGrid:
    """Every run of a grid: records, and the runs' :class:`~uoe_nb.unlearn.UnlearnResult`
    (their models dropped unless kept) keyed by ``(label, seed)``."""

    model: str
    before: dict[str, float]
    records: list[RunRecord]
    results: dict[tuple[str, int], UnlearnResult]
    lr_choices: dict[str, pd.DataFrame] = field(default_factory=dict)  # cell -> its sweep (with lr_grid)

    def frame(self) -> pd.DataFrame:
        """One row per run."""
        return pd.DataFrame([r.as_row() for r in self.records])

    def tradeoff_frame(self, levels: Sequence[float] = LEVELS, target: float = OPERATING_POINT) -> pd.DataFrame:
        """Per cell, the mean over seeds of utility at matched forgetting (FA = each level,
        interpolated along every run's path), at the lowest FA reached and at the operating
        point, with how many seeds reached it and the cell's learning rate (Chapter 6)."""
        rows = []
        for r in self.records:
            if not r.path:
                continue
            row = tradeoff_table({0: r.path}, levels, target).iloc[0].to_dict()
            rows.append({"label": r.label, "lr": r.lr, **row})
        if not rows:
            raise ValueError("no run recorded a path with both FA and UT: evaluate the runs")
        frame = pd.DataFrame(rows)
        groups = frame.groupby("label", sort=False)
        # a level that one seed never reached has no mean over the seeds (nan, not the others' mean)
        out = groups[[c for c in frame.columns if c not in ("label", "reached op")]].agg(
            lambda col: col.mean(skipna=False)
        )
        out["UT@op sd"] = groups["UT@op"].std()
        out["seeds at op"] = groups["reached op"].sum().astype(int)
        return out

    def paths(self, seed: int | None = None) -> dict[str, list[tuple[int, float, float]]]:
        """Each cell's FA-UT path for ``seed`` (default: the first seed run)."""
        seed = self.records[0].seed if seed is None and self.records else seed
        return {r.label: r.path for r in self.records if r.seed == seed and r.path}

    def summaries(self) -> list[BaselineSummary]:
        return aggregate(self.records)

    def summary_frame(
        self, *, benchmark: str | None = "WMDP", paper_model: str | None = None
    ) -> pd.DataFrame:
        return summary_frame(self.summaries(), benchmark=benchmark, paper_model=paper_model)


# --------------------------------------------------------------------------------------
# Tables and figures at matched forgetting (Chapter 6)
# --------------------------------------------------------------------------------------

COMPARISON_COLUMNS = ["paper FA", "paper UT", "lr", "FA@op", "UT@op", "UT@op sd", "seeds at op",
                      "UT@FA<=0.5", "UT@FA<=0.4", "UT@FA<=0.3", "overlap forget", "trainable %"]  # fmt: skip


def comparison_frame(
    grid: BaselineGrid, labels: Sequence[str] | None = None, *, benchmark: str | None = "WMDP",
    target: float = OPERATING_POINT,
) -> pd.DataFrame:  # fmt: skip
    """Tables 2 and 4 at the paper's operating point, one row per cell (``labels`` in order).

    Beside the paper's FA and UT for the cell: the learning rate the sweep chose (as text, so
    that rounding the table keeps it), our FA and
    UT at the operating point (the first evaluated checkpoint with FA <= ``target``, or the
    lowest FA a run reached; mean over seeds, UT's sd), how many seeds reached it, utility at
    FA = 0.5, 0.4 and 0.3 interpolated along each run's path (``nan`` where a seed never got
    there), the kept checkpoint's expert-selection overlap on forget text and the trainable
    share. A label the grid did not run (a skipped whole-model cell) is an empty row.
    """
    summary = grid.summary_frame(benchmark=benchmark)
    trade = grid.tradeoff_frame(target=target)
    frame = trade.join(summary.drop(columns=[c for c in summary.columns if c in trade.columns]))
    if benchmark is None:
        frame = frame.assign(**{"paper FA": math.nan, "paper UT": math.nan})
    frame["lr"] = frame["lr"].map(lambda lr: f"{lr:g}")  # a label, kept readable when a table is rounded
    return frame.reindex(list(labels) if labels is not None else list(frame.index))[COMPARISON_COLUMNS]


def uoe_gains(
    grids: Mapping[str, BaselineGrid], methods: Sequence[str], *, levels: Sequence[float] = LEVELS,
    target: float = OPERATING_POINT,
) -> pd.DataFrame:  # fmt: skip
    """Utility with UOE minus utility on the whole model, per (model, method), at matched forgetting.

    ``UT gain @op``: at the operating point (mean over seeds), with how many seeds of each
    cell reached it (``op seeds whole/UOE``); compare it only where both did.
    ``matched FA`` is the lowest of ``levels`` that every seed of both cells reached, and
    ``UT gain @matched`` the gain there (interpolated along the paths), so a cell that
    stopped short of the operating point is still compared at equal forgetting. The
    paper's gain (Table 2) is beside ours. Cells a grid did not run are left out.
    """
    rows = []
    for model, grid in grids.items():
        frame = comparison_frame(grid, target=target)
        for method in methods:
            whole, one = baseline_label(method, "full"), baseline_label(method, "uoe")
            if whole not in frame.index or one not in frame.index:
                continue
            a, b = frame.loc[whole], frame.loc[one]
            both = [lv for lv in levels if not (math.isnan(a[f"UT@FA<={lv:g}"]) or math.isnan(b[f"UT@FA<={lv:g}"]))]
            level = min(both) if both else math.nan
            rows.append({
                "model": model, "method": whole,
                "paper UT gain": b["paper UT"] - a["paper UT"],
                "UT gain @op": b["UT@op"] - a["UT@op"],
                "op seeds whole/UOE": f"{int(a['seeds at op'])}/{int(b['seeds at op'])}",
                "matched FA": level,
                "UT gain @matched": (b[f"UT@FA<={level:g}"] - a[f"UT@FA<={level:g}"]) if both else math.nan,
            })  # fmt: skip
    if not rows:
        raise ValueError("no model has both the whole-model and the UOE cell of any method given")
    return pd.DataFrame(rows).set_index(["model", "method"])


def oracle_frame(grid: BaselineGrid, references: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Distance to the retrain oracle, one row per reference and per cell (mean and sd over seeds).

    ``references`` maps a label (``"oracle"``, ``"before"``) to its ``forget_accuracy``,
    ``utility_accuracy``, ``kl_forget`` and ``kl_retain``; they come first. The cells' FA and
    UT are those of their kept checkpoints, the KL divergences (nats per token) those
    :func:`run_grid` measured with an oracle.
    """
    rows = {
        label: {"FA": ref["forget_accuracy"], "UT": ref["utility_accuracy"], "KL forget": ref["kl_forget"],
                "KL forget sd": math.nan, "KL retain": ref["kl_retain"], "KL retain sd": math.nan}
        for label, ref in references.items()
    }  # fmt: skip
    frame = grid.summary_frame(benchmark=None)
    if "KL oracle forget mean" not in frame.columns:
        raise ValueError("the grid measured no distance to an oracle: run it with oracle= and oracle_texts=")
    for label, row in frame.iterrows():
        rows[label] = {"FA": row["FA mean"], "UT": row["UT mean"], "KL forget": row["KL oracle forget mean"],
                       "KL forget sd": row["KL oracle forget sd"], "KL retain": row["KL oracle retain mean"],
                       "KL retain sd": row["KL oracle retain sd"]}  # fmt: skip
    return pd.DataFrame(rows).T.astype(float)


METHOD_COLOURS = {"ga": "tab:blue", "graddiff": "tab:orange", "npo": "tab:green", "simnpo": "tab:purple",
                  "rmu": "tab:red"}  # fmt: skip
SCOPE_STYLES = {"full": ("-", "o"), "uoe": ("--", "*"), "lora": (":", "s"), "esft": ("-.", "D")}


def plot_tradeoffs(
    grids: Mapping[str, BaselineGrid],
    labels: Sequence[str] | None = None,
    *,
    references: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    paper_models: Sequence[str] = ("Qwen1.5-MoE", "DeepSeek-V2-Lite"),
    benchmark: str = "WMDP",
    target: float = OPERATING_POINT,
    chance: float = 0.25,
):
    """Forget accuracy against utility along each cell's path (its first seed), one panel per
    model, and a first panel with the paper's Table 2 and 4 points on the same axes.

    Colour is the method, line style and marker the scope (whole model solid, UOE dashed,
    LoRA dotted, ESFT dash-dot); ``references[model]`` adds labelled points such as
    ``{"before": (FA, UT), "oracle": (FA, UT)}``. Dotted lines mark chance, dashed ones the
    operating point. Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(grids), figsize=(4.2 * (1 + len(grids)), 4.0), sharey=False)
    paper = paper_frame(benchmark).reset_index()
    for _, row in paper[paper["model"].isin(list(paper_models))].iterrows():
        faded = 1.0 if row["model"] == paper_models[0] else 0.45
        if row["method"] == "original":
            axes[0].scatter(row["FA"], row["UT"], color="k", marker="x", s=50, alpha=faded)
            continue
        if labels is not None and baseline_label(row["method"], row["scope"]) not in labels:
            continue
        axes[0].scatter(row["FA"], row["UT"], color=METHOD_COLOURS.get(row["method"], "grey"),
                        marker=SCOPE_STYLES.get(row["scope"], ("-", "o"))[1], s=60, alpha=faded)  # fmt: skip
    axes[0].set_title(f"paper ({paper_models[0]} solid, x pretrained)", fontsize=9)
    for ax, (model, grid) in zip(axes[1:], grids.items(), strict=True):
        seed = grid.records[0].seed if grid.records else None
        for rec in grid.records:
            if rec.seed != seed or not rec.path or (labels is not None and rec.label not in labels):
                continue
            style, marker = SCOPE_STYLES.get(rec.scope, ("-", "o"))
            ax.plot([p[1] for p in rec.path], [p[2] for p in rec.path], ls=style, marker=marker, ms=4,
                    color=METHOD_COLOURS.get(rec.method, "grey"), label=rec.label)  # fmt: skip
        for name, (fa, ut) in ((references or {}).get(model) or {}).items():
            ax.scatter(fa, ut, color="k", marker="P" if name == "oracle" else "x", s=60, zorder=3)
            ax.annotate(name, (fa, ut), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_title(f"ours: {model} (seed {seed})", fontsize=9)
    for ax in axes:
        ax.axvline(chance, color="grey", ls=":", lw=1)
        ax.axvline(target, color="black", ls="--", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("forget accuracy (lower: more forgotten)")
    axes[0].set_ylabel("utility accuracy")
    axes[-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------


def _safe_path(result: UnlearnResult) -> list[tuple[int, float, float]]:
    try:
        return run_path(result)
    except ValueError:  # no evaluated checkpoint with both accuracies
        return []


def _plain_model(model: nn.Module) -> nn.Module:
    """The transformers model behind a peft wrapper (adapters still active), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _grid_for(baseline: Baseline, lr_grid: Sequence[float] | Mapping[str, Sequence[float]]) -> list[float]:
    """The learning-rate grid of one cell: ``lr_grid`` itself, or its entry for the cell's label or scope."""
    if isinstance(lr_grid, Mapping):
        for key in (baseline.label, baseline.scope):
            if key in lr_grid:
                return list(lr_grid[key])
        raise ValueError(
            f"lr_grid has no grid for cell {baseline.label!r}: add its label or its scope {baseline.scope!r} "
            f"(it has {sorted(lr_grid)})"
        )
    if isinstance(lr_grid, str | bytes) or not isinstance(lr_grid, Sequence):
        raise ValueError(f"lr_grid must be a sequence of rates or a mapping to one, got {lr_grid!r}")
    return list(lr_grid)


def run_grid(
    base_model: nn.Module,
    tokenizer: Any,
    forget: Sequence[str],
    retain: Sequence[str],
    baselines: Sequence[Baseline],
    seeds: Sequence[int],
    config: UnlearnConfig,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    model_name: str = "",
    affinity: Any = None,
    before: Mapping[str, float] | None = None,
    oracle: nn.Module | None = None,
    oracle_texts: tuple[Sequence[str], Sequence[str]] | None = None,
    oracle_batch_size: int = 16,
    keep: Callable[[Baseline, int], bool] | None = None,
    lr_grid: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    operating_target: float = OPERATING_POINT,
) -> BaselineGrid:
    """Unlearn ``base_model`` for every baseline and seed (Tables 2 and 4; Chapter 6).

    Each run is :func:`uoe_nb.layer_study.run_variant` with ``config`` changed by the
    baseline (:meth:`Baseline.config`) and the seed: it trains ``base_model`` in place and
    gives it back bitwise (no copy of the model; what a scope trains is backed up in host
    memory).
    Set ``config.stop_forget_accuracy`` to run every cell to the same forget accuracy.
    ``evaluate(model) -> {"forget_accuracy", "utility_accuracy"}`` is required;
    ``before`` is its value on ``base_model`` (measured once when not given) and stands
    for every run's step-0 evaluation. Pass the base model's ``affinity`` so attribution
    runs once. With an ``oracle`` (a model retrained without the forget data) and
    ``oracle_texts=(forget_texts, retain_texts)``, each kept model's output KL to the
    oracle is measured (:func:`uoe_nb.diagnostics.oracle_distance`). Where
    ``keep(baseline, seed)`` is true the run's change is kept as ``result.patch``
    (apply it to ``base_model`` with :func:`uoe_nb.patches.apply_patch`).

    With ``lr_grid`` every cell's learning rate comes from one procedure instead of the
    cell's ``lr``: :func:`uoe_nb.tradeoff.choose_learning_rate` on the first seed (the rate
    whose run reaches ``operating_target`` with the best utility), then the other seeds at
    that rate; ``grid.lr_choices`` holds each cell's sweep and every record its rate.
    ``lr_grid`` is one grid for every cell, or a mapping from a cell's label (``"GA+UOE"``)
    or its scope (``"uoe"``) to its grid (the label wins): a one-expert scope needs larger
    rates than the whole model.
    """
    baselines = list(baselines)
    seeds = list(seeds)
    if not baselines:
        raise ValueError("no baselines given: pass at least one Baseline(method, scope)")
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed, e.g. seeds=(0,)")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be ints, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    labels = [b.label for b in baselines]
    if len(set(labels)) != len(labels):
        raise ValueError(f"each (method, scope) cell may appear once, got {labels}")
    if not callable(evaluate):
        raise ValueError("run_grid needs evaluate(model) -> {'forget_accuracy', 'utility_accuracy'}")
    if (oracle is None) != (oracle_texts is None):
        raise ValueError("give both oracle and oracle_texts=(forget_texts, retain_texts), or neither")
    if not forget:
        raise ValueError("the forget set is empty: give at least one forget document")

    grids = {b.label: _grid_for(b, lr_grid) for b in baselines} if lr_grid is not None else {}

    before = dict(evaluate(base_model) if before is None else before)
    for key in ("forget_accuracy", "utility_accuracy"):
        if key not in before:
            raise ValueError(f"evaluate must return {key!r}; got {sorted(before)}")
    oracle_batches = None
    if oracle is not None:
        device = next(oracle.parameters()).device
        oracle_batches = [
            list(
                make_batches(
                    tokenizer,
                    list(texts),
                    batch_size=oracle_batch_size,
                    max_length=config.max_length,
                    device=device,
                )
            )
            for texts in oracle_texts
        ]

    records: list[RunRecord] = []
    results: dict[tuple[str, int], UnlearnResult] = {}

    def one(baseline: Baseline, seed: int, lr: float | None) -> tuple[RunRecord, UnlearnResult]:
        cfg = baseline.config(config, seed)
        if lr is not None:
            cfg = dataclasses.replace(cfg, lr=float(lr))
        inspect = None
        if oracle is not None:

            def inspect(result):
                return oracle_distance(_plain_model(result.model), oracle, *oracle_batches, routing=False)

        row, result = run_variant(
            base_model,
            tokenizer,
            forget,
            retain,
            baseline.variant(),
            cfg,
            evaluate=starting_from(before, evaluate),
            affinity=affinity,
            inspect=inspect,
            keep_patch=keep is not None and keep(baseline, seed),
            base_name=model_name,
        )
        target = cfg.stop_forget_accuracy
        record = RunRecord(
            model=model_name,
            method=baseline.method,
            scope=baseline.scope,
            seed=seed,
            step=row["step"],
            forget_accuracy=row["FA"],
            utility_accuracy=row["UT"],
            forget_accuracy_before=before["forget_accuracy"],
            utility_accuracy_before=before["utility_accuracy"],
            trainable=result.scope.num_trainable,
            fraction=result.scope.fraction,
            reached=None if target is None else bool(row["FA"] <= target),
            stopped=result.stopped,
            overlap_forget=row["overlap forget"],
            oracle=result.inspected,
            lr=cfg.lr,
            path=_safe_path(result),
        )
        log.info("%s %s seed %d: %s", model_name, baseline.label, seed, record.as_row())
        return record, result

    choices: dict[str, LearningRateChoice] = {}
    for baseline in baselines:
        # One procedure for every cell: sweep the grid on the first seed, keep the rate that
        # reaches the operating point with the best utility; the other seeds run at that rate.
        grid = grids[baseline.label] if lr_grid is not None else None
        done, choice = seeds_at_chosen_rate(lambda seed, rate, b=baseline: one(b, seed, rate), seeds, grid,
                                            target=operating_target)  # fmt: skip
        if choice is not None:
            choices[baseline.label] = choice
        for seed, (record, result) in zip(seeds, done, strict=True):
            records.append(record)
            results[(baseline.label, seed)] = result
    return BaselineGrid(model=model_name, before=before, records=records, results=results,
                        lr_choices={k: v.table for k, v in choices.items()})  # fmt: skip


# --------------------------------------------------------------------------------------
# Table 3
# --------------------------------------------------------------------------------------


def parameter_ratios(
    model: nn.Module, scopes: Sequence[str] = ("uoe", "lora", "esft"), *, affinity: Any, model_name: str = ""
) -> pd.DataFrame:
    """Trainable parameters of each scope as a share of the model (the paper's Table 3).

    ``affinity`` is the forget set's :class:`~uoe_nb.attribution.Affinity` (UOE's target and
    ESFT's experts come from it). Each scope is applied to the model and undone, so the
    model is left as it was. Where ``model_name`` is a
    paper model or its zoo twin, the paper's percentage is shown beside ours.
    """
    scopes = list(scopes)
    if not scopes:
        raise ValueError("no scopes given")
    unknown = [s for s in scopes if s not in BASELINE_SCOPES]
    if unknown:
        raise ValueError(f"unknown baseline scopes {unknown}; choose from {list(BASELINE_SCOPES)}")
    # describe_scopes applies each scope to the model itself and undoes it (LoRA unloaded,
    # trained rows dropped, flags restored): no copy of the model is needed.
    rows = describe_scopes(
        model, [Scope.from_name(s) for s in scopes], target=affinity.target, affinity=affinity
    )
    try:
        paper = PAPER_PARAMETER_RATIOS[_paper_model(model_name)]
    except KeyError:
        paper = {}
    out = []
    for scope, row in zip(scopes, rows, strict=True):
        out.append(
            {
                "model": model_name,
                "scope": scope,
                "trains": row["name"],
                "trainable": row["trainable"],
                "total": row["total"],
                "trainable %": 100 * row["fraction"],
                "paper %": paper.get(scope, math.nan),
            }
        )
    return pd.DataFrame(out)
