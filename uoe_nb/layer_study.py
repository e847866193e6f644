"""Why one expert in one layer: the paper's design ablations, run side by side (Chapter 5).

Section 4 ("A single-layer solution") and Section 5 ("Comparison of different design
choices") of the paper compare UOE with the obvious alternatives, each run until the
forget accuracy reaches the same level:

* the top-1 expert of *every* layer instead of one layer (Figs. 4 and 5);
* 1, 3 or 6 experts of the target layer (Table 5);
* a random expert of the target layer instead of the attributed one (Table 6);
* the top-1 expert of layers of lower affinity rank (Table 7);
* the shared experts tuned too (the later SEUF version of the paper).

A :class:`Variant` names one such choice (a :mod:`uoe_nb.scopes` scope plus the expert
the router anchor of Eq. 3 points to); :func:`run_variant` unlearns a *copy* of a base
model with it and returns one table row (kept checkpoint's forget accuracy and utility,
step, per-layer expert-selection overlap) and the full result.

The anchor target matters: :func:`uoe_nb.unlearn.unlearn` anchors the target layer's
router to ``config.target``, or to the attributed target when that is ``None``. A UOE
run at another expert (a random one, or the top expert of a lower-ranked layer) must
anchor to *that* expert, so those variants carry their own target
(:func:`expert_variant`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import nn

from .attribution import Affinity
from .scopes import Scope, uoe
from .unlearn import PARTS, StepRecord, UnlearnConfig, UnlearnResult, takes_parts, unlearn

__all__ = [
    "PAPER_TABLE5",
    "PAPER_TABLE6",
    "PAPER_TABLE7",
    "PAPER_EVERY_LAYER",
    "Variant",
    "beside_paper",
    "compare_variants",
    "expert_variant",
    "layer_rank_variants",
    "mean_overlap",
    "overlap_curve",
    "paper_notes",
    "plot_kept",
    "plot_layer_overlap",
    "random_expert_variant",
    "rank_table",
    "run_variant",
    "starting_from",
    "variants_table",
]

# The paper's ablations, each at FA ~ 0.25. Table 5 (GA on WMDP; the caption names no
# model, and its one-expert utility is DeepSeek-V2-Lite's GA+UOE entry of Table 2):
# utility by the number of experts of the target layer that are unlearned.
PAPER_TABLE5: dict[int, dict[str, float]] = {1: {"UT": 0.5100}, 3: {"UT": 0.4856}, 6: {"UT": 0.4652}}
# Table 6 (RMU on WMDP, Qwen1.5-MoE): the attributed expert against a random one.
PAPER_TABLE6: dict[str, dict[str, float]] = {"attributed": {"FA": 0.2536, "UT": 0.5351},
                                             "random": {"FA": 0.3505, "UT": 0.5947}}  # fmt: skip
# Table 7 (GA on RWKU, DeepSeek-V2-Lite, 26 MoE layers): UOE on the layer of each
# top-1 affinity rank.
PAPER_TABLE7: dict[int, dict[str, float]] = {
    1: {"top-1 affinity": 0.2110, "UT": 0.5485}, 2: {"top-1 affinity": 0.1957, "UT": 0.5475},
    3: {"top-1 affinity": 0.1695, "UT": 0.5453}, 13: {"top-1 affinity": 0.1115, "UT": 0.5445},
    20: {"top-1 affinity": 0.0942, "UT": 0.5441}, 23: {"top-1 affinity": 0.0844, "UT": 0.4262},
    26: {"top-1 affinity": 0.0618, "UT": 0.2355},
}  # fmt: skip
# Fig. 4 and its text (GA on WMDP, DeepSeek-V2-Lite): utility when the top-1 expert of
# every layer is unlearned, and before unlearning.
PAPER_EVERY_LAYER: dict[str, float] = {"UT": 0.247, "UT before": 0.555}


@dataclass(frozen=True)
class Variant:
    """One design choice to unlearn with: a label, a scope and the anchor's target.

    ``target`` is the ``(layer, expert)`` the router anchor (Eq. 3) pulls forget tokens
    to; ``None`` means the attributed target (the layer with the highest top-1 affinity
    and its top-1 expert). ``group`` names the comparison the variant belongs to.
    """

    label: str
    scope: Scope
    target: tuple[int, int] | None = None
    group: str = ""


def expert_variant(label: str, layer: int, expert: int, *, group: str = "", include_shared: bool = False) -> Variant:
    """UOE on a given ``(layer, expert)``, with the anchor pointing to that same expert."""
    return Variant(label, uoe(layer, expert, include_shared=include_shared), (int(layer), int(expert)), group)


def random_expert_variant(affinity: Affinity, seed: int, *, group: str = "random expert") -> Variant:
    """The Table 6 control: a seeded random expert of the target layer (never the target),
    trained and anchored exactly like UOE trains and anchors the attributed one."""
    layer, expert = affinity.random_expert(seed)
    return expert_variant(f"random expert {expert} (seed {seed})", layer, expert, group=group)


def layer_rank_variants(
    affinity: Affinity, ranks: Sequence[int] = (1, 2, -1), *, group: str = "layer rank"
) -> list[Variant]:
    """UOE on the top-1 expert of the layers ranked ``ranks`` by top-1 affinity (Table 7).

    Ranks count from 1 (the UOE layer); negative ranks count from the end (-1: the
    layer with the lowest top-1 affinity). Repeated layers are kept once.
    """
    order = affinity.layer_ranking()
    variants, seen = [], set()
    for rank in ranks:
        if rank == 0 or not -len(order) <= rank <= len(order):
            raise IndexError(f"layer rank {rank} is out of range: ranks are 1..{len(order)} or -1..-{len(order)}")
        position = rank - 1 if rank > 0 else len(order) + rank
        layer = order[position]
        if layer in seen:
            continue
        seen.add(layer)
        expert = affinity.ranking(layer)[0]
        label = f"layer rank {position + 1} (layer {layer}, top-1 affinity {affinity.top1(layer):.3f})"
        variants.append(expert_variant(label, layer, expert, group=group))
    return variants


def mean_overlap(record: StepRecord, which: str = "forget", layers: Sequence[int] | None = None) -> float:
    """Mean over MoE layers of the expert-selection overlap with the original model (Fig. 5).

    ``which`` is ``"forget"`` or ``"retain"``; ``layers`` restricts the mean (default: all).
    ``nan`` when the run recorded no overlap.
    """
    if which not in ("forget", "retain"):
        raise ValueError(f"which must be 'forget' or 'retain', got {which!r}")
    values: Mapping[int, float] = getattr(record, f"overlap_{which}")
    chosen = [v for k, v in values.items() if layers is None or k in layers]
    return sum(chosen) / len(chosen) if chosen else math.nan


def overlap_curve(result: UnlearnResult, which: str = "forget") -> list[dict[str, float]]:
    """Per evaluated step, the overlap of every layer and their mean (Fig. 5's curves)."""
    rows = []
    for rec in result.history:
        row: dict[str, float] = {"step": rec.step, "mean": mean_overlap(rec, which)}
        row.update({f"layer {k}": v for k, v in getattr(rec, f"overlap_{which}").items()})
        rows.append(row)
    return rows


def starting_from(
    before: Mapping[str, float], evaluate: Callable[[nn.Module], Mapping[str, float]]
) -> Callable[..., Mapping[str, float]]:
    """``evaluate``, except that its first call returns ``before`` (for :func:`run_variant` runs
    that all start from the same base model: Chapters 6 and 9).

    :func:`uoe_nb.unlearn.unlearn` evaluates at step 0, when the model still equals the base
    model (LoRA adapters start at zero), so the base model's evaluation serves every run.
    An evaluator that takes ``parts`` keeps taking them (``utility_eval="target"``).
    """
    first = [True]

    with_parts = takes_parts(evaluate)

    def wrapped(model: nn.Module, parts: Sequence[str] = PARTS) -> Mapping[str, float]:
        if first[0]:
            first[0] = False
            return dict(before)
        return evaluate(model, parts=parts) if with_parts else evaluate(model)

    return wrapped


def run_variant(
    base_model: nn.Module,
    tokenizer: Any,
    forget: Sequence[str],
    retain: Sequence[str],
    variant: Variant,
    config: UnlearnConfig,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    affinity: Affinity | None = None,
    inspect: Callable[[UnlearnResult], Any] | None = None,
    keep_patch: bool = False,
    base_name: str = "",
) -> tuple[dict[str, Any], UnlearnResult]:
    """Unlearn ``base_model`` with ``variant``, then give it back bitwise as it was.

    The run trains the model in place (no copy of the model): what the scope trains is
    copied to host memory first (``unlearn(..., keep_original=True)``: one expert and a
    router for UOE, every parameter for a whole-model scope) and written back at the end.
    While the model is unlearned, ``inspect(result)`` runs if given (its value is stored in
    ``result.inspected``), and with ``keep_patch`` the change is stored as
    ``result.patch`` (:class:`uoe_nb.patches.Patch`, on the CPU): ``apply_patch(base_model,
    result.patch)`` brings the unlearned model back when a later cell needs it. The result
    holds no model afterwards (:meth:`UnlearnResult.release`).

    ``config`` supplies everything but the scope and the anchor target, which come from
    the variant. Pass the base model's ``affinity`` so attribution runs once for all
    variants. Returns ``(row, result)``: the row holds the variant's label and group, the
    scope's name and trainable count, the kept checkpoint's step, forget accuracy (FA),
    utility (UT), and its expert-selection overlap with the original model on forget
    and retain text (mean over layers, and per layer as ``overlap_forget/L``).
    """
    cfg = dataclasses.replace(config, scope=variant.scope, target=variant.target)
    kind = cfg.scope.kind if isinstance(cfg.scope, Scope) else Scope.from_name(cfg.scope).kind
    if keep_patch and kind == "lora":
        raise ValueError(
            "keep_patch: a LoRA run has no patch (its change is spread over merged adapters); measure "
            "what you need with inspect= instead"
        )
    result = unlearn(base_model, forget, retain, cfg, tokenizer=tokenizer, evaluate=evaluate, affinity=affinity,
                     keep_original=True)  # fmt: skip
    try:
        result.inspected = inspect(result) if inspect is not None else None
        result.patch = result.make_patch(base_name or type(base_model).__name__) if keep_patch else None
    finally:
        result.restore()
        result.release()
    best = result.best
    row: dict[str, Any] = {
        "group": variant.group,
        "variant": variant.label,
        "scope": result.scope.name,
        "trainable": result.scope.num_trainable,
        "step": best.step,
        "FA": best.metrics.get("forget_accuracy", math.nan),
        "UT": best.metrics.get("utility_accuracy", math.nan),
        "overlap forget": mean_overlap(best, "forget"),
        "overlap retain": mean_overlap(best, "retain"),
        "stopped": result.stopped,
    }
    for layer, value in best.overlap_forget.items():
        row[f"overlap_forget/{layer}"] = value
    for layer, value in best.overlap_retain.items():
        row[f"overlap_retain/{layer}"] = value
    return row, result


def compare_variants(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[str],
    retain: Sequence[str],
    variants: Sequence[Variant],
    config: UnlearnConfig,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    attribution_docs: int = 256,
    batch_size: int = 16,
) -> tuple[Any, Affinity]:
    """Attribute the forget set once on ``model``, then :func:`run_variant` every variant.

    The same comparison on a second model (the 8-layer twin of Chapter 5) in one call. The
    model is given back bitwise after each run. Returns the rows as a frame indexed by the
    variant's label, and the model's :class:`~uoe_nb.attribution.Affinity` (its ``target``
    says which layer UOE chose).
    """
    import pandas as pd

    from .attribution import expert_affinity
    from .routing import batches

    if not variants:
        raise ValueError("no variants given: pass at least one Variant")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"each variant label may appear once, got {labels}")
    device = next(model.parameters()).device
    docs = list(forget[:attribution_docs])
    affinity = expert_affinity(
        model, batches(tokenizer, docs, batch_size=batch_size, max_length=config.max_length, device=device)
    )
    rows = []
    for variant in variants:
        row, _ = run_variant(model, tokenizer, forget, retain, variant, config, evaluate=evaluate, affinity=affinity)
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant"), affinity


def plot_layer_overlap(results: Mapping[str, UnlearnResult], target_layer: int | None = None):
    """Figs. 4 and 5 for the runs in ``results`` (label -> result), side by side.

    Left: the expert-selection overlap of the forget text per MoE layer at each run's
    kept checkpoint (one group of bars per layer, a dotted line at ``target_layer``).
    Right: the overlap averaged over layers along each run (:func:`overlap_curve`).
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no runs to draw")
    layers = sorted({layer for r in results.values() for layer in r.best.overlap_forget})
    if not layers:
        raise ValueError("the runs recorded no expert-selection overlap (monitor_docs=0?)")
    fig, (ax_kept, ax_curve) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(results)
    for i, (label, result) in enumerate(results.items()):
        kept = result.best.overlap_forget
        ax_kept.bar([x - 0.4 + (i + 0.5) * width for x in range(len(layers))],
                    [kept.get(layer, math.nan) for layer in layers], width, label=label)  # fmt: skip
        curve = overlap_curve(result, "forget")
        ax_curve.plot([r["step"] for r in curve], [r["mean"] for r in curve], "o-", label=label)
    ax_kept.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax_kept.set_ylabel("expert-selection overlap (forget text)")
    ax_kept.set_title("at the kept checkpoint (cf. Fig. 4)")
    if target_layer is not None:
        if target_layer not in layers:
            raise ValueError(f"target layer {target_layer} is not a monitored MoE layer {layers}")
        ax_kept.axvline(layers.index(target_layer), color="grey", ls=":", lw=1)
    ax_curve.set_xlabel("unlearning step")
    ax_curve.set_ylabel("mean overlap over layers (forget text)")
    ax_curve.set_title("over the run (cf. Fig. 5)")
    for ax in (ax_kept, ax_curve):
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kept(
    rows: Mapping[str, Mapping[str, Any]],
    before: Mapping[str, float] | None = None,
    *,
    target: float | None = None,
    highlight: str = "UOE",
):
    """The kept checkpoint of every variant (label -> :func:`run_variant` row) as a point
    of forget accuracy against utility; ``highlight`` as a star, the model ``before``
    unlearning (its ``forget_accuracy`` / ``utility_accuracy``) as a black square, the
    stop ``target`` as a dotted line. Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no variants to draw")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, row in rows.items():
        star = label == highlight
        ax.scatter(row["FA"], row["UT"], s=90 if star else 50, marker="*" if star else "o", label=label)
    if before is not None:
        ax.scatter(before["forget_accuracy"], before["utility_accuracy"], marker="s", color="k",
                   label="before unlearning")  # fmt: skip
    if target is not None:
        ax.axvline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel("forget accuracy FA (lower is better)")
    ax.set_ylabel("utility UT (higher is better)")
    ax.set_title("kept checkpoints of every variant")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    return fig


def beside_paper(
    ours: Mapping[Any, Mapping[str, Any]],
    paper: Mapping[Any, Mapping[str, float]],
    *,
    index: str,
    source: str,
    label: str,
    columns: Sequence[str] = ("FA", "UT", "step"),
    names: Mapping[Any, Any] | None = None,
) -> pd.DataFrame:
    """One of the paper's ablation tables beside ours, one row per entry of ``ours``.

    ``ours`` maps the paper's row key (e.g. the number of experts of Table 5) to our
    :func:`run_variant` row; ``paper`` is one of :data:`PAPER_TABLE5` / ``6`` / ``7``.
    Columns: each value the paper reports, as ``paper <name> (<source>)`` (``nan`` where it
    has no row for the key), then each of ``columns`` of ours, as ``<label> <column>``
    (e.g. ``label="ours (tiny)"``). ``names`` relabels the rows (key -> index label); the
    index is named ``index``.
    """
    if not ours:
        raise ValueError("no rows of ours given")
    reported = list(dict.fromkeys(col for entry in paper.values() for col in entry))
    rows = []
    for key, row in ours.items():
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(f"row {key!r} has no {missing}; it has {list(row)}")
        out: dict[str, Any] = {index: (names or {}).get(key, key)}
        out.update({f"paper {c} ({source})": paper.get(key, {}).get(c, math.nan) for c in reported})
        out.update({f"{label} {c}": row[c] for c in columns})
        rows.append(out)
    return pd.DataFrame(rows).set_index(index)


def rank_table(
    affinity: Affinity, runs: Mapping[tuple[int, int], Mapping[str, Any]], *, label: str
) -> pd.DataFrame:
    """Table 7 for our runs: one row per UOE run at the top-1 expert of some layer.

    ``runs`` maps each run's target ``(layer, expert)`` to its :func:`run_variant` row.
    Columns: the layer's rank by top-1 affinity (``"r of n"``, the index), the layer,
    the expert, its top-1 affinity, and the kept checkpoint's FA, UT and step as
    ``<label> FA`` and so on.
    """
    ranking = affinity.layer_ranking()
    rows = []
    for (layer, expert), row in runs.items():
        if layer not in ranking:
            raise ValueError(f"layer {layer} is not a MoE layer of the affinity ({ranking})")
        rows.append({"layer rank": f"{ranking.index(layer) + 1} of {len(ranking)}", "layer": layer, "expert": expert,
                     "top-1 affinity": affinity.top1(layer),
                     **{f"{label} {c}": row[c] for c in ("FA", "UT", "step")}})  # fmt: skip
    return pd.DataFrame(rows).set_index("layer rank")


def _short(x: float) -> str:
    return f"{x:g}".removeprefix("0")  # as the paper reports it, without trailing zeros


def paper_notes(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """What the paper reports for each variant's design choice (label -> note), by the
    row's ``group`` (the groups this module's variants use: ``UOE``, ``layers``,
    ``experts``, ``random expert``, ``layer rank``, ``shared``); ``""`` for other groups."""
    from .baselines import paper_result

    qwen, deepseek = (paper_result(m, "ga", "uoe")[1] for m in ("Qwen1.5-MoE", "DeepSeek-V2-Lite"))
    lowest = sorted(PAPER_TABLE7)[-2:]
    by_group = {
        "UOE": f"GA+UOE {_short(qwen)} (Qwen) / {_short(deepseek)} (DeepSeek); Table 5: {_short(PAPER_TABLE5[1]['UT'])}",
        "layers": f"Fig. 4: {_short(PAPER_EVERY_LAYER['UT'])} (DeepSeek, before {_short(PAPER_EVERY_LAYER['UT before'])})",
        "experts": "Table 5: " + ", ".join(f"{k} experts {_short(v['UT'])}" for k, v in PAPER_TABLE5.items() if k > 1),
        "random expert": f"Table 6, RMU: FA {_short(PAPER_TABLE6['random']['FA'])}, "
        f"UT {_short(PAPER_TABLE6['random']['UT'])} (Qwen)",
        "layer rank": "Table 7: UT falls for the lowest ranks ("
        + ", ".join(_short(PAPER_TABLE7[r]["UT"]) for r in lowest) + ")",
        "shared": "SEUF: lower than UOE",
    }  # fmt: skip
    return {label: by_group.get(row.get("group", ""), "") for label, row in rows.items()}


def variants_table(rows: Mapping[str, Mapping[str, Any]], *, label: str) -> pd.DataFrame:
    """Every variant's kept checkpoint (label -> :func:`run_variant` row) beside what the
    paper reports for its design choice (:func:`paper_notes`): one row per variant, with
    the trainable count, step, ``<label> FA`` / ``<label> UT`` and the mean overlaps."""
    if not rows:
        raise ValueError("no variants given")
    notes = paper_notes(rows)
    out = [{"variant": name, "paper (Qwen1.5-MoE / DeepSeek-V2-Lite)": notes[name], "trainable": row["trainable"],
            "step": row["step"], f"{label} FA": row["FA"], f"{label} UT": row["UT"],
            "overlap forget": row["overlap forget"], "overlap retain": row["overlap retain"]}
           for name, row in rows.items()]  # fmt: skip
    return pd.DataFrame(out).set_index("variant")
