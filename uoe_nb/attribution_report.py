"""How much to trust an expert attribution (Eq. 2 of the paper, Chapter 3).

:mod:`uoe_nb.attribution` computes the affinities and picks the target expert. This module
asks three questions of that choice, each returning plain rows for a table:

* :func:`subset_stability`: do disjoint subsets of the forget set pick the same experts,
  and how does the agreement grow with the subset's size? (The paper's later version
  reports 0.87 top-6 overlap between two disjoint 100k-token subsets and 0.94 between a
  subset and the full set.)
* :func:`ranking_agreement`: does Eq. 2 rank the experts like plain token counts (the
  "basic attribution metric" of Fig. 2)? Spearman correlation and top-k overlap.
* :func:`target_specificity`: is the expert Eq. 2 picks in each layer specific to the
  forget domain, i.e. does it get more affinity on forget text than on retain text?
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from .attribution import Affinity, expert_affinity, token_count_ranking, top_k_overlap
from .routing import batches

__all__ = [
    "PAPER_FULL_OVERLAP",
    "PAPER_SUBSET_OVERLAP",
    "attribution_summary",
    "paper_comparison",
    "plot_affinity",
    "plot_share_vs_affinity",
    "plot_subset_stability",
    "ranking_agreement",
    "spearman",
    "stability_by_size",
    "subset_stability",
    "target_specificity",
]

# The paper's later version: top-6 overlap of two disjoint 100k-token forget subsets, and
# of a subset with the full set.
PAPER_SUBSET_OVERLAP = 0.87
PAPER_FULL_OVERLAP = 0.94


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (ascending), ties given their average rank."""
    values = values.double().flatten()
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    for value in torch.unique(values):
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (ties: average ranks).

    Returns ``nan`` when either vector is constant (the correlation is undefined).
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs vectors of equal length, got {a.numel()} and {b.numel()}")
    if a.numel() < 2:
        raise ValueError("spearman needs at least two values")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def ranking_agreement(affinity: Affinity, k: int) -> list[dict[str, Any]]:
    """Per MoE layer, how Eq. 2's ranking compares with ranking by plain token counts.

    Columns: ``spearman_assignments`` (affinity vs the number of top-K assignments),
    ``spearman_top1`` (affinity vs the number of tokens whose highest-weighted expert it
    is), ``top_k_overlap`` (top-``k`` experts by affinity vs by assignments) and
    ``same_top1`` (whether both rankings put the same expert first).
    """
    rows = []
    for layer in affinity.layers:
        by_affinity = affinity.ranking(layer)
        by_count = token_count_ranking(affinity, layer)
        rows.append(
            {
                "layer": layer,
                "spearman_assignments": spearman(affinity.scores[layer], affinity.assignment_counts[layer]),
                "spearman_top1": spearman(affinity.scores[layer], affinity.top1_counts[layer]),
                "top_k_overlap": top_k_overlap(by_affinity, by_count, k),
                "same_top1": by_affinity[0] == by_count[0],
            }
        )
    return rows


def target_specificity(forget: Affinity, retain: Affinity) -> list[dict[str, Any]]:
    """Per MoE layer, the forget set's top-1 expert and its affinity on forget vs retain text.

    Columns: ``expert`` (top-1 by forget affinity), ``forget_affinity``, ``retain_affinity``,
    ``ratio`` (forget / retain; ``inf`` if the retain affinity is 0), ``retain_rank``
    (1-based rank of that expert on the retain text) and ``is_target`` (the layer UOE picks).
    """
    if forget.layers != retain.layers:
        raise ValueError(f"the two affinities cover different layers: {forget.layers} vs {retain.layers}")
    target_layer = forget.target[0]
    rows = []
    for layer in forget.layers:
        expert = forget.ranking(layer)[0]
        f = float(forget.scores[layer][expert])
        r = float(retain.scores[layer][expert])
        rows.append(
            {
                "layer": layer,
                "expert": expert,
                "forget_affinity": f,
                "retain_affinity": r,
                "ratio": f / r if r > 0 else float("inf"),
                "retain_rank": retain.ranking(layer).index(expert) + 1,
                "is_target": layer == target_layer,
            }
        )
    return rows


def subset_stability(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    sizes: Sequence[int],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 6,
    batch_size: int = 16,
    max_length: int = 512,
    full: Affinity | None = None,
) -> list[dict[str, Any]]:
    """Top-``k`` agreement of attributions on random subsets of ``texts``, by subset size.

    For each seed the texts are shuffled once; for each ``size`` the first ``size`` texts
    form subset A and the next ``size`` texts subset B (disjoint). One row per
    (size, seed, MoE layer) with ``tokens`` (real tokens in A), ``disjoint_overlap``
    (top-``k`` of A vs B), ``full_overlap`` (A vs the whole of ``texts``), ``target`` (the
    ``(layer, expert)`` A alone would pick) and ``same_target`` (whether that is the whole
    set's target).
    ``full`` is the affinity on all of ``texts``, computed here when not given.
    """
    texts = list(texts)
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive numbers of texts, got {sizes}")
    if 2 * max(sizes) > len(texts):
        raise ValueError(
            f"two disjoint subsets of {max(sizes)} texts need {2 * max(sizes)} texts, got {len(texts)}; "
            "use smaller sizes or more texts"
        )
    if not seeds:
        raise ValueError("give at least one seed")
    device = next(model.parameters()).device

    def affinity(subset: list[str]) -> Affinity:
        return expert_affinity(
            model,
            batches(tokenizer, subset, batch_size=batch_size, max_length=max_length, device=device),
            progress_desc=f"attribution ({len(subset)} texts)",
        )

    full = full if full is not None else affinity(texts)
    num_experts = min(len(full.scores[layer]) for layer in full.layers)
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and the number of experts per layer ({num_experts}), got {k}")
    rows = []
    for seed in seeds:
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        for size in sizes:
            a = affinity([texts[i] for i in order[:size]])
            b = affinity([texts[i] for i in order[size : 2 * size]])
            for layer in full.layers:
                rows.append(
                    {
                        "size": size,
                        "seed": seed,
                        "tokens": a.num_tokens,
                        "layer": layer,
                        "disjoint_overlap": top_k_overlap(a.ranking(layer), b.ranking(layer), k),
                        "full_overlap": top_k_overlap(a.ranking(layer), full.ranking(layer), k),
                        "target": a.target,
                        "same_target": a.target == full.target,
                    }
                )
    return rows


def stability_by_size(rows: Iterable[Mapping[str, Any]], target_layer: int) -> pd.DataFrame:
    """:func:`subset_stability`'s rows summed up per subset size (one row per size).

    Columns: ``tokens`` (mean real tokens per subset), ``disjoint_mean`` /
    ``disjoint_std`` (the top-k overlap of two disjoint subsets over layers and seeds),
    ``full_mean`` (subset vs the whole set), ``same_target`` (share of subsets that
    choose the whole set's target), and the two overlaps at ``target_layer`` alone.
    """
    sweep = pd.DataFrame(list(rows))
    if sweep.empty:
        raise ValueError("no subset_stability rows given")
    if target_layer not in set(sweep["layer"]):
        raise ValueError(f"layer {target_layer} is not in the rows; their layers are {sorted(set(sweep['layer']))}")
    by_size = sweep.groupby("size").agg(
        tokens=("tokens", "mean"),
        disjoint_mean=("disjoint_overlap", "mean"),
        disjoint_std=("disjoint_overlap", "std"),
        full_mean=("full_overlap", "mean"),
        same_target=("same_target", "mean"),
    )
    at_target = sweep[sweep.layer == target_layer].groupby("size")[["disjoint_overlap", "full_overlap"]].mean()
    return by_size.join(at_target.add_suffix(" (target layer)"))


def plot_affinity(forget: Affinity, retain: Affinity | None = None, *, ncols: int = 4):
    """Eq. 2's affinities per MoE layer: bars for the forget text, the target expert in red.

    Each panel ranks the layer's experts by forget affinity; dots give the same experts'
    affinity on ``retain`` text (when given), so a domain-specific expert is a tall bar
    over a low dot. Returns the figure.
    """
    from .plots import finish_rank_panels, layer_panels

    if retain is not None and retain.layers != forget.layers:
        raise ValueError(f"forget and retain affinities cover different layers: {forget.layers} vs {retain.layers}")
    fig, panels, first_column = layer_panels(forget.layers, ncols=ncols, height=3.0)
    for layer, ax in panels.items():
        order = forget.ranking(layer)
        rank = range(1, len(order) + 1)
        colours = ["tab:red" if (layer, e) == forget.target else "tab:blue" for e in order]
        ax.bar(rank, forget.scores[layer][order].tolist(), color=colours, alpha=0.8, label="forget text")
        if retain is not None:
            ax.plot(rank, retain.scores[layer][order].tolist(), "k.", label="retain text, same expert")
    return finish_rank_panels(fig, panels, first_column, xlabel="expert rank by forget affinity", ylabel="affinity $s_i^{(l)}$ (Eq. 2)")


def plot_subset_stability(
    rows: Iterable[Mapping[str, Any]],
    target_layer: int,
    *,
    k: int,
    num_experts: int,
    paper: float | None = PAPER_SUBSET_OVERLAP,
):
    """:func:`subset_stability` against the subsets' size in tokens (log scale).

    Left: the top-``k`` overlap of two disjoint subsets per MoE layer (mean and sd over
    seeds), with chance (``k / num_experts``) and the paper's value (``paper``; ``None``
    leaves it out). Right: the share of subsets whose own target is the whole set's.
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and num_experts ({num_experts}), got {k}")
    rows = list(rows)
    by_size = stability_by_size(rows, target_layer)
    per_layer = pd.DataFrame(rows).groupby(["size", "layer"])["disjoint_overlap"].agg(["mean", "std"])
    per_layer = per_layer.reset_index()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for layer, part in per_layer.groupby("layer"):
        label = f"layer {layer}" + (" (target)" if layer == target_layer else "")
        ax1.errorbar(by_size["tokens"].loc[part["size"]].tolist(), part["mean"].tolist(),
                     yerr=part["std"].fillna(0).tolist(), marker="o", capsize=3, label=label)  # fmt: skip
    ax1.axhline(k / num_experts, color="gray", ls="--", label=f"chance ({k}/{num_experts})")
    if paper is not None:
        ax1.axhline(paper, color="tab:red", ls=":", label=f"paper: {paper:g} (100k-token subsets)")
    ax1.set_ylabel(f"top-{k} overlap of two disjoint subsets")
    ax1.legend(fontsize=7)
    ax2.plot(by_size["tokens"].tolist(), by_size["same_target"].tolist(), "o-")
    ax2.set_ylabel("share of subsets choosing the full set's target")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("tokens per subset")
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    return fig


def plot_share_vs_affinity(affinity: Affinity):
    """Every expert as a point: its share of top-K assignments (Fig. 2) against Eq. 2.

    One colour per MoE layer; the target expert is circled in red. Points off the
    diagonal trend are experts that the two attributions rank differently. Returns the
    figure.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for layer in affinity.layers:
        ax.scatter(affinity.proportions[layer].tolist(), affinity.scores[layer].tolist(), s=14,
                   label=f"layer {layer}")  # fmt: skip
    layer, expert = affinity.target
    ax.scatter([float(affinity.proportions[layer][expert])], [float(affinity.scores[layer][expert])], s=120,
               facecolors="none", edgecolors="tab:red", label="target expert")  # fmt: skip
    ax.set_xlabel("share of top-K token assignments (Fig. 2)")
    ax.set_ylabel("affinity $s_i^{(l)}$ (Eq. 2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attribution_summary(
    model: nn.Module,
    tokenizer,
    forget: Sequence[str],
    retain: Sequence[str],
    *,
    name: str,
    top_k: int = 6,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    max_length: int = 512,
) -> dict[str, Any]:
    """One model's attribution in one row (Chapter 3's family table).

    The target Eq. 2 picks, its top-1 affinity and specificity (forget over retain
    affinity), the stability of the choice over disjoint halves of ``forget`` (one split
    per seed, top-k overlap at the target layer, how often a half picks the same target
    and which targets the halves picked), the Spearman correlation of the target layer's
    affinities with its token counts, and the share of parameters UOE trains. ``k`` is
    ``top_k``, or a quarter of the experts when a layer has fewer than ``2 * top_k``
    (six of eight experts would overlap by chance).
    """
    from .moe import find_moe_layers
    from .scopes import describe_scopes

    device = next(model.parameters()).device

    def affinity(texts: Sequence[str], part: str) -> Affinity:
        return expert_affinity(model, batches(tokenizer, list(texts), batch_size=batch_size, max_length=max_length,
                                              device=device), progress_desc=f"{name} {part}")  # fmt: skip

    f, r = affinity(forget, "forget"), affinity(retain, "retain")
    layer, expert = f.target
    n = len(f.scores[layer])
    k = top_k if n >= 2 * top_k else max(1, n // 4)
    half = len(forget) // 2
    stab = [row for row in subset_stability(model, tokenizer, forget, (half,), seeds=seeds, k=k, batch_size=batch_size,
                                            max_length=max_length, full=f) if row["layer"] == layer]  # fmt: skip
    spec = next(row for row in target_specificity(f, r) if row["layer"] == layer)
    agree = next(row for row in ranking_agreement(f, k) if row["layer"] == layer)
    moe_layer = next(x for x in find_moe_layers(model) if x.layer_index == layer)
    fraction = describe_scopes(model, ["uoe"], target=f.target)[0]["fraction"]
    targets = pd.Series([str(row["target"]) for row in stab]).value_counts()
    return {
        "model": name,
        "experts (top-K)": f"{moe_layer.num_experts} (top-{moe_layer.top_k})",
        "target (layer, expert)": f"({layer}, {expert})",
        "tokens": f.num_tokens,
        "top-1 affinity": f.top1(layer),
        "forget / retain affinity": spec["forget_affinity"] / spec["retain_affinity"],
        "disjoint halves, top-k overlap": sum(row["disjoint_overlap"] for row in stab) / len(stab),
        "half vs full, top-k overlap": sum(row["full_overlap"] for row in stab) / len(stab),
        "halves choosing the target": sum(row["same_target"] for row in stab) / len(stab),
        "targets of the halves": ", ".join(f"{t} x{c}" for t, c in targets.items()),
        "k": k,
        "k (chance)": f"{k} ({k / n:.2f})",
        "Spearman affinity vs counts": agree["spearman_assignments"],
        "UOE trainable fraction (%)": 100 * fraction,
    }


def paper_comparison(summary: Mapping[str, Any], *, label: str) -> pd.DataFrame:
    """What the paper reports about its attribution beside one :func:`attribution_summary`
    row: tokens used, the chosen layer's top-1 affinity (Table 7), the subset overlaps of
    the later version, the Spearman correlation of two rankings, and UOE's share of the
    parameters (Table 3). Indexed by quantity; columns the paper's value and ``label``."""
    from .baselines import PAPER_PARAMETER_RATIOS
    from .layer_study import PAPER_TABLE7

    k = summary["k"]
    uoe_share = sorted({ratios["uoe"] for m, ratios in PAPER_PARAMETER_RATIOS.items() if m != "Mixtral-8x7B"})
    rows = [
        ("tokens used for attribution", "> 100,000", f"{summary['tokens']:,}"),
        ("top-1 affinity of the chosen layer", f"{PAPER_TABLE7[1]['top-1 affinity']:.3f} (Table 7, RWKU)",
         f"{summary['top-1 affinity']:.3f}"),
        ("top-6 overlap, two disjoint subsets", f"{PAPER_SUBSET_OVERLAP:g} (v2)",
         f"{summary['disjoint halves, top-k overlap']:.2f} (top-{k})"),
        ("top-6 overlap, subset vs full set", f"{PAPER_FULL_OVERLAP:g} (v2)",
         f"{summary['half vs full, top-k overlap']:.2f} (top-{k})"),
        ("Spearman between two rankings", "1.0 (g vs g·||FFN||, v2)",
         f"{summary['Spearman affinity vs counts']:.2f} (affinity vs token counts)"),
        ("parameters UOE trains", " / ".join(f"{v:g} %" for v in uoe_share) + " (Table 3)",
         f"{summary['UOE trainable fraction (%)']:.2f} %"),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["quantity", "paper (Qwen1.5-MoE / DeepSeek-V2-Lite)", label]).set_index(
        "quantity"
    )
