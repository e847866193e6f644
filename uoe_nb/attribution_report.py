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
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attribution import Affinity, expert_affinity, token_count_ranking, top_k_overlap
from .routing import batches

__all__ = ["ranking_agreement", "spearman", "subset_stability", "target_specificity"]


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
