"""Expert attribution: which expert holds the forget topic (Eq. 2 of the paper, Chapter 3).

The paper ranks the experts of layer ``l`` by their affinity to the forget set,

    s_i^(l) = 1/Z * sum_j ( 1/L_j * sum_t g_{i,t}^(l) )                      (Eq. 2)

where ``g_{i,t}`` is the routing weight token ``t`` of sequence ``j`` gives expert ``i``
(0 when the expert is not among the token's top-K), ``L_j`` the number of real tokens
of sequence ``j`` and ``Z`` the number of sequences. Each sequence is averaged first,
so long documents do not outweigh short ones. UOE then unlearns one expert only: the
top-1 expert of the layer whose top-1 affinity is highest (Section 4).

:func:`expert_affinity` computes Eq. 2 together with the plain token-assignment shares
of Fig. 2 (the "basic attribution metric" the paper improves on), so a chapter can
compare the two rankings (:func:`token_count_ranking`). :func:`attribution_stability`
measures how much the top-k experts of two disjoint halves of the forget set agree.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .moe import capture_routing, find_moe_layers
from .progress import progress

__all__ = [
    "Affinity",
    "attribution_stability",
    "expert_affinity",
    "split_texts",
    "token_count_ranking",
    "top_k_overlap",
]

logger = logging.getLogger(__name__)


def _descending(values: torch.Tensor) -> list[int]:
    """Indices by decreasing value; ties keep the lower index first."""
    return torch.sort(values.double(), descending=True, stable=True).indices.tolist()


@dataclass
class Affinity:
    """Expert affinities of every MoE layer on one text set (Eq. 2, Chapter 3).

    ``scores[layer]``: the ``[num_experts]`` affinity vector of Eq. 2 (keys are
    decoder-layer indices, so a DeepSeek model's dense first layer is absent).
    ``proportions[layer]``: the share of the layer's top-K token assignments each
    expert received (sums to 1; Fig. 2). ``assignment_counts[layer]`` and
    ``top1_counts[layer]``: the raw counts behind it, and how many tokens had the
    expert as their highest-weighted choice. ``num_sequences`` / ``num_tokens``: the
    non-empty sequences and real (non-padding) tokens that were averaged.
    """

    scores: dict[int, torch.Tensor]
    proportions: dict[int, torch.Tensor]
    assignment_counts: dict[int, torch.Tensor]
    top1_counts: dict[int, torch.Tensor]
    num_sequences: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("an Affinity needs the scores of at least one MoE layer")

    @property
    def layers(self) -> list[int]:
        """Decoder-layer indices of the MoE layers, in order."""
        return sorted(self.scores)

    def _check_layer(self, layer: int) -> torch.Tensor:
        if layer not in self.scores:
            raise IndexError(f"layer {layer} has no affinity scores; MoE layers are {self.layers}")
        return self.scores[layer]

    def ranking(self, layer: int) -> list[int]:
        """The experts of ``layer`` by decreasing affinity (ties: lower index first)."""
        return _descending(self._check_layer(layer))

    def top_experts(self, layer: int, k: int) -> list[int]:
        """The ``k`` experts of ``layer`` with the highest affinity (Table 5 tunes 1, 3, 6)."""
        scores = self._check_layer(layer)
        if not 1 <= k <= scores.numel():
            raise ValueError(f"k must be between 1 and {scores.numel()} (the experts of layer {layer}), got {k}")
        return self.ranking(layer)[:k]

    def top1(self, layer: int) -> float:
        """The highest affinity in ``layer`` (the number the paper compares across layers)."""
        return float(self._check_layer(layer).max())

    def layer_ranking(self) -> list[int]:
        """Layers by decreasing top-1 affinity (Table 7 unlearns the rank-r layer)."""
        layers = self.layers
        top = torch.tensor([self.top1(layer) for layer in layers], dtype=torch.float64)
        return [layers[i] for i in _descending(top)]

    @property
    def target(self) -> tuple[int, int]:
        """``(layer, expert)`` UOE unlearns: the layer with the highest top-1 affinity and
        that layer's top-1 expert (Section 4, "A single-layer solution")."""
        layer = self.layer_ranking()[0]
        return layer, self.ranking(layer)[0]

    def random_expert(self, seed: int, layer: int | None = None, exclude_target: bool = True) -> tuple[int, int]:
        """A seeded random ``(layer, expert)``: the paper's random-expert control (Table 6).

        ``layer`` defaults to the target layer. With ``exclude_target`` the expert is
        never the one attribution picks in that layer (its top-1 expert, which in the
        target layer is the UOE target).
        """
        layer = self.target[0] if layer is None else int(layer)
        num_experts = self._check_layer(layer).numel()
        candidates = list(range(num_experts))
        if exclude_target:
            candidates.remove(self.ranking(layer)[0])
        if not candidates:
            raise ValueError(f"layer {layer} has a single expert: there is no other expert to pick")
        return layer, random.Random(seed).choice(candidates)

    def table(self) -> list[dict]:
        """One row per MoE layer, for display: the rank-1 expert, its affinity and token share,
        and the layer's rank by top-1 affinity."""
        rank = {layer: r + 1 for r, layer in enumerate(self.layer_ranking())}
        rows = []
        for layer in self.layers:
            expert = self.ranking(layer)[0]
            rows.append(
                {
                    "layer": layer,
                    "expert": expert,
                    "affinity": float(self.scores[layer][expert]),
                    "proportion": float(self.proportions[layer][expert]),
                    "layer_rank": rank[layer],
                }
            )
        return rows


def _model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise ValueError(f"a batch needs 'input_ids' (and 'attention_mask'); got keys {sorted(batch)}")
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs


@torch.no_grad()
def expert_affinity(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    gate: str = "scores",
    progress_desc: str = "attribution",
) -> Affinity:
    """Expert affinity of every MoE layer on ``batches`` (Eq. 2, Chapter 3).

    ``batches`` yields tokenizer outputs (``input_ids``, ``attention_mask``), e.g. from
    :func:`uoe_nb.routing.batches`. The model runs in eval mode without gradients (its
    previous mode is restored). ``g`` is, as in the paper, the router's raw score of each
    selected expert (``gate="scores"``: the softmax, or sigmoid, of the router logits for
    the token's top-K experts, 0 elsewhere; :attr:`uoe_nb.moe.RoutingRecord.scores`).
    ``gate="applied"`` uses the weights the block actually applies instead
    (:attr:`~uoe_nb.moe.RoutingRecord.weights`), which Mixtral, Granite and DeepSeek-V3
    renormalise (and scale) over the top-K; for Qwen1.5-MoE, OLMoE and DeepSeek-V2-Lite
    the two agree. Padding tokens are skipped and sequences without real tokens are ignored.

    Raises ``ValueError`` when there are no batches or no real tokens, and
    :class:`uoe_nb.moe.NoMoELayersError` for a dense model.
    """
    if gate not in ("scores", "applied"):
        raise ValueError(f"gate must be 'scores' (the paper's g: raw router scores) or 'applied', got {gate!r}")
    layers = find_moe_layers(model)
    device = next(model.parameters()).device
    sums = {lay.layer_index: torch.zeros(lay.num_experts, dtype=torch.float64) for lay in layers}
    assigned = {lay.layer_index: torch.zeros(lay.num_experts, dtype=torch.float64) for lay in layers}
    top1 = {lay.layer_index: torch.zeros(lay.num_experts, dtype=torch.float64) for lay in layers}
    num_batches = num_sequences = num_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with capture_routing(model) as cap:
            for batch in progress(batches, desc=progress_desc):
                num_batches += 1
                cap.clear()
                model(**_model_inputs(batch, device))
                first = cap[layers[0].layer_index][0]
                lengths = first.mask.sum(dim=1).double().cpu()  # L_j
                real = lengths > 0
                num_sequences += int(real.sum())
                num_tokens += int(lengths.sum())
                for lay in layers:
                    rec = cap[lay.layer_index][0]
                    keep = rec.mask.bool()
                    g = rec.scores * rec.selected() if gate == "scores" else rec.weights
                    weights = g.double().masked_fill(~keep.unsqueeze(-1), 0.0).cpu()
                    per_sequence = weights.sum(dim=1)[real] / lengths[real].unsqueeze(-1)
                    sums[lay.layer_index] += per_sequence.sum(dim=0)
                    assigned[lay.layer_index] += rec.selected().sum(dim=(0, 1)).double().cpu()
                    best = rec.weights.argmax(dim=-1)[keep].cpu()
                    top1[lay.layer_index] += torch.bincount(best, minlength=lay.num_experts).double()
    finally:
        model.train(was_training)
    if not num_batches:
        raise ValueError("no batches given: expert attribution needs forget-set text")
    if not num_sequences:
        raise ValueError("the batches hold no real tokens (every attention_mask entry is 0)")
    logger.info("expert attribution over %d sequences, %d tokens", num_sequences, num_tokens)
    return Affinity(
        scores={k: (v / num_sequences).float() for k, v in sums.items()},
        proportions={k: (v / v.sum()).float() for k, v in assigned.items()},
        assignment_counts={k: v.long() for k, v in assigned.items()},
        top1_counts={k: v.long() for k, v in top1.items()},
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )


def token_count_ranking(affinity: Affinity, layer: int, *, by: str = "assignments") -> list[int]:
    """The experts of ``layer`` ranked by plain token counts instead of Eq. 2 (Chapter 3).

    ``by="assignments"``: how many top-K assignments each expert got (the token ratio
    of Fig. 2, the "basic attribution metric" of Section 4); ``by="top1"``: how many
    tokens had the expert as their highest-weighted choice. Compare with
    :meth:`Affinity.ranking`, e.g. through :func:`top_k_overlap`.
    """
    counts = {"assignments": affinity.assignment_counts, "top1": affinity.top1_counts}
    if by not in counts:
        raise ValueError(f"by must be 'assignments' or 'top1', got {by!r}")
    affinity._check_layer(layer)
    return _descending(counts[by][layer])


def top_k_overlap(ranking_a: Sequence[int], ranking_b: Sequence[int], k: int) -> float:
    """``|top-k of a  ∩  top-k of b| / k`` for two expert rankings."""
    if not 1 <= k <= min(len(ranking_a), len(ranking_b)):
        raise ValueError(f"k must be between 1 and the ranking length {min(len(ranking_a), len(ranking_b))}, got {k}")
    return len(set(ranking_a[:k]) & set(ranking_b[:k])) / k


def attribution_stability(
    model: nn.Module,
    batches_a: Iterable[Mapping[str, torch.Tensor]],
    batches_b: Iterable[Mapping[str, torch.Tensor]],
    k: int = 6,
) -> dict[int, float]:
    """Per MoE layer, how many of the top-``k`` experts two text sets agree on (Chapter 3).

    Returns ``|topk_a ∩ topk_b| / k`` per decoder-layer index. Give two disjoint
    halves of the forget set (:func:`split_texts`); the paper's later version reports
    0.87 for its top-6 experts on two disjoint subsets.
    """
    num_experts = min(lay.num_experts for lay in find_moe_layers(model))
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and the number of experts per layer ({num_experts}), got {k}")
    a = expert_affinity(model, batches_a, progress_desc="attribution (a)")
    b = expert_affinity(model, batches_b, progress_desc="attribution (b)")
    return {layer: top_k_overlap(a.ranking(layer), b.ranking(layer), k) for layer in a.layers}


def split_texts(texts: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint halves of ``texts`` after a seeded shuffle (for :func:`attribution_stability`)."""
    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"need at least two texts to split into two halves, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    half = len(texts) // 2
    return [texts[i] for i in order[:half]], [texts[i] for i in order[half:]]
