"""Routing statistics: how a text's tokens spread over the experts (Chapter 1, Fig. 2).

The paper's Insight 1 is that the forget set's tokens go to a few experts (a long
tail) while general text spreads over many. :func:`token_proportions` measures the
share of a layer's token-to-expert assignments each expert receives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .moe import capture_routing, find_moe_layers
from .progress import progress

__all__ = ["batches", "entropy", "plot_expert_shares", "token_proportions", "top_share"]


def batches(
    tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 512, device=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenizer outputs (``input_ids``, ``attention_mask``) for ``texts``, padded per batch.

    One tokenization rule for training, attribution and evaluation: the tokenizer's own
    special tokens are added (a BOS token for DeepSeek, Mixtral and Llama-style
    tokenizers), as lm-eval's Hugging Face model does when it scores a prompt.
    """
    if not texts:
        raise ValueError("no texts given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(
            chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=True
        )
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        yield out


@torch.no_grad()
def token_proportions(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, desc: str = "routing"
) -> dict[int, torch.Tensor]:
    """Per MoE layer, the share of token-to-expert assignments each expert gets.

    Each real (non-padding) token is assigned to ``top_k`` experts; the result for a
    layer is a ``[num_experts]`` tensor summing to 1 (Fig. 2 of the paper).
    """
    layers = find_moe_layers(model)
    counts = {lay.layer_index: torch.zeros(lay.num_experts, dtype=torch.float64) for lay in layers}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in progress(batches, desc=desc):
            with capture_routing(model) as cap:
                model(**batch)
            for lay in layers:
                for rec in cap[lay.layer_index]:
                    counts[lay.layer_index] += rec.selected().sum(dim=(0, 1)).double().cpu()
            seen += 1
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("no batches given")
    return {k: (v / v.sum()).float() for k, v in counts.items()}


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of a distribution; lower means more concentrated."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def top_share(p: torch.Tensor, k: int = 1) -> float:
    """The share of the ``k`` largest entries."""
    return float(p.sort(descending=True).values[:k].sum())


def plot_expert_shares(
    forget: Mapping[int, torch.Tensor], retain: Mapping[int, torch.Tensor] | None = None, *, ncols: int = 4
):
    """Fig. 2: per MoE layer, the experts' shares of the forget text's assignments.

    ``forget`` and ``retain`` are :func:`token_proportions` results. Each panel ranks the
    layer's experts by their share (bars: forget text; dots: retain text, ranked by its
    own shares), so a long tail shows as a tall first bar falling fast. Returns the figure.
    """
    from .plots import finish_rank_panels, layer_panels

    if retain is not None and set(retain) != set(forget):
        raise ValueError(f"forget and retain shares cover different layers: {sorted(forget)} vs {sorted(retain)}")
    fig, panels, first_column = layer_panels(sorted(forget), ncols=ncols)
    for layer, ax in panels.items():
        shares = forget[layer].sort(descending=True).values
        rank = range(1, len(shares) + 1)
        ax.bar(rank, shares.tolist(), alpha=0.7, label="forget domain")
        if retain is not None:
            ax.plot(rank, retain[layer].sort(descending=True).values.tolist(), "k.-", label="retain text")
    return finish_rank_panels(fig, panels, first_column, xlabel="expert rank", ylabel="share of assignments")
