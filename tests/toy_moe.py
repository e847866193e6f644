"""A remote-code style MoE model for tests: a Linear ``gate`` and one module per expert,
the layout of checkpoints that ship their own modelling code instead of transformers' fused one."""

from __future__ import annotations

import torch


def random_batch(vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three random sequences of 9 tokens, one left-padded and one right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


class RemoteStyleBlock(torch.nn.Module):
    """Softmax router over ``experts`` Linear experts, top-``top_k`` weighted sum."""

    def __init__(self, hidden: int = 16, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.softmax(self.gate(flat), -1)
        w, idx = torch.topk(scores, self.top_k, -1)
        out = torch.zeros_like(flat)
        for k in range(self.top_k):
            for e, expert in enumerate(self.experts):
                sel = idx[:, k] == e
                if sel.any():
                    out[sel] += w[sel, k, None] * expert(flat[sel])
        return out.reshape(x.shape)


class RemoteStyleModel(torch.nn.Module):
    """Embedding, then residual layers: a dense Linear first if ``dense_first``, then two MoE blocks."""

    def __init__(self, vocab: int = 50, hidden: int = 16, *, dense_first: bool = True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        layers: list[torch.nn.Module] = [torch.nn.Linear(hidden, hidden)] if dense_first else []
        self.layers = torch.nn.ModuleList(layers + [RemoteStyleBlock(hidden), RemoteStyleBlock(hidden)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return h
