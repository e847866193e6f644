"""Two published ways to keep routing stable while unlearning, besides UOE's anchor (Chapter 9).

* **GRIP** (Zhu et al., 2026, arXiv:2601.16905): every update of a trained router is projected onto the null
  space of the router's inputs on retain text, so the router logits of those inputs, and with
  them the expert selection on retained data, cannot move, while the router stays trainable in
  the remaining directions. :class:`RouterNullSpace` builds the bases and projects.
* **TRACE** (Xie et al., 2026, arXiv:2606.10338): forget data activates a few experts far more than retain
  data does, so the retain loss barely regularises them. TRACE finds these forget-critical
  experts from activation frequencies and reweights the token-level retain loss so that each
  of them is as frequent, by weight, on retain data as on forget data.
  :func:`critical_experts` and :func:`match_frequencies` compute the weights, the
  ``weighted_*`` losses use them.

Both are options of :class:`uoe_nb.unlearn.UnlearnConfig` (``grip=True``, ``trace=True``);
this module holds what they compute, on tensors and batches, and needs nothing of the
training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import objectives
from .fastpath import stop_after_layer
from .moe import capture_routing, moe_layer

__all__ = [
    "RouterNullSpace",
    "TraceWeights",
    "activation_frequencies",
    "critical_experts",
    "match_frequencies",
    "subspace_basis",
    "trace_weights",
    "weighted_retain_kl",
    "weighted_retain_kl_top_k",
    "weighted_retain_nll",
    "weighted_rmu_retain",
]

Batch = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------
# GRIP: router updates in the null space of the retain inputs
# --------------------------------------------------------------------------------------


def subspace_basis(gram: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal basis ``[D, r]`` of the leading directions of inputs with Gram matrix ``gram``.

    ``gram = X^T X`` over the inputs ``X [n, D]``. The basis holds the fewest eigenvectors whose
    eigenvalues (the inputs' squared norms along them) sum to at least ``energy`` of the total;
    ``energy=1`` keeps every direction the inputs span (eigenvalues above 1e-10 of the largest).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    values, vectors = torch.linalg.eigh(gram.double().cpu())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0:
        return vectors[:, :0].float()
    if energy >= 1.0:
        rank = int((values > 1e-10 * values[0]).sum())
    else:
        rank = int((values.cumsum(0) / total < energy).sum()) + 1
    return vectors[:, : min(rank, len(values))].float().contiguous()


def _router_tensors(model: nn.Module, layer: int) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The router's weight ``[E, H]`` and bias ``[E]`` (or None); refuses other router parameters."""
    lay = moe_layer(model, layer)
    params = dict(lay.router.named_parameters())
    weight, bias = params.pop("weight", None), params.pop("bias", None)
    if weight is None or weight.dim() != 2 or params:
        raise ValueError(
            f"GRIP projects a linear router (weight [experts, hidden], optional bias); the router of layer {layer} "
            f"({type(lay.router).__name__}) has parameters {sorted(dict(lay.router.named_parameters()))}"
        )
    return weight, bias


@torch.no_grad()
def router_input_gram(
    model: nn.Module, layers: Sequence[int], batches: Iterable[Batch]
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Per layer, the Gram matrix ``X^T X`` of the hidden states entering its router on
    ``batches`` (real tokens only; a bias adds a constant-1 input), and the token counts."""
    layers = sorted({int(i) for i in layers})
    grams: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def make_hook(layer: int, with_bias: bool):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1]).double()
            mask = state["mask"]
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.reshape(-1).bool().to(x.device)]
            if with_bias:
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            g = x.T @ x
            grams[layer] = grams[layer] + g if layer in grams else g
            counts[layer] += x.shape[0]

        return hook

    was = model.training
    model.eval()
    try:
        for layer in layers:
            _, bias = _router_tensors(model, layer)
            router = moe_layer(model, layer).router
            handles.append(router.register_forward_pre_hook(make_hook(layer, bias is not None), with_kwargs=True))
        for batch in batches:
            state["mask"] = batch.get("attention_mask")
            with stop_after_layer(model, layers[-1]):
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return grams, counts


@dataclass
class RouterNullSpace:
    """GRIP's projection for the trained routers of one run (Chapter 9).

    ``bases[layer]`` is an orthonormal basis ``U [D, r]`` of the router inputs on retain text
    (``D`` = hidden size, +1 where the router has a bias). One basis serves every row (expert)
    of a router: a token's top-k choice compares the logits of *all* experts, so every row must
    keep its logit on every retain token, not only on the tokens that select its expert. After
    each optimiser step the router's change since the start of the run is projected,
    ``W <- W_0 + (W - W_0)(I - U U^T)``: the applied update (Adam's rescaled step, weight decay
    included) stays in the null space, which projecting the gradient would not ensure. Memory:
    the bases and one copy of each trained router, no model-sized copy.
    """

    bases: dict[int, torch.Tensor]
    energy: float
    tokens: dict[int, int] = field(default_factory=dict)
    _start: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _targets: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_batches(
        cls, model: nn.Module, layers: Sequence[int], batches: Iterable[Batch], energy: float = 0.99
    ) -> RouterNullSpace:
        """Bases of the routers of ``layers`` from the model's router inputs on ``batches``
        (the original model: call it before the first update)."""
        if not layers:
            raise ValueError("GRIP needs a scope that trains a router: this one trains none")
        batches = list(batches)
        if not batches:
            raise ValueError("GRIP needs retain text: its bases span the router inputs on retain data")
        grams, counts = router_input_gram(model, layers, batches)
        bases = {layer: subspace_basis(g, energy) for layer, g in grams.items()}
        return cls(bases=bases, energy=float(energy), tokens=counts)

    def ranks(self) -> dict[int, int]:
        """Protected directions per router (of hidden size, +1 with a bias)."""
        return {layer: int(u.shape[1]) for layer, u in self.bases.items()}

    def attach(self, model: nn.Module, targets: Mapping[int, torch.Tensor] | None = None) -> None:
        """Remember each router's starting value; ``targets`` maps ``id(parameter)`` to the tensor the
        optimiser updates (an fp32 master copy), default the parameter itself."""
        targets = targets or {}
        for layer in self.bases:
            weight, bias = _router_tensors(model, layer)
            w = targets.get(id(weight), weight)
            b = None if bias is None else targets.get(id(bias), bias)
            self._targets[layer] = (w, b)
            self._start[layer] = self._joined(w, b).detach().clone()

    @staticmethod
    def _joined(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return w.float() if b is None else torch.cat([w.float(), b.float().unsqueeze(1)], dim=1)

    @torch.no_grad()
    def project(self) -> None:
        """Put every router's change since :meth:`attach` into the null space of its basis."""
        if not self._targets:
            raise RuntimeError("call attach(model) before project()")
        for layer, (w, b) in self._targets.items():
            u = self.bases[layer].to(w.device)
            start = self._start[layer]
            delta = self._joined(w, b) - start
            new = start + delta - (delta @ u) @ u.T
            w.copy_(new[:, : w.shape[1]])
            if b is not None:
                b.copy_(new[:, -1])


# --------------------------------------------------------------------------------------
# TRACE: retain tokens reweighted by forget-critical experts
# --------------------------------------------------------------------------------------


@torch.no_grad()
def activation_frequencies(
    model: nn.Module, batches: Iterable[Batch], layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], list[dict[int, torch.Tensor]]]:
    """Per layer, the share of real tokens whose top-k includes each expert ``[E]``, and per batch
    the selections ``{layer: bool[batch, seq, E]}`` (on the CPU) they come from."""
    layers = sorted({int(i) for i in layers})
    counts: dict[int, torch.Tensor] = {}
    tokens = 0
    selections = []
    was = model.training
    model.eval()
    try:
        for batch in batches:
            with capture_routing(model, layers=layers) as cap, stop_after_layer(model, layers[-1]):
                model(**batch)
            sel = {layer: cap[layer][0].selected().cpu() for layer in layers}
            selections.append(sel)
            tokens += int(batch["attention_mask"].sum())
            for layer, s in sel.items():
                c = s.sum(dim=(0, 1)).double()
                counts[layer] = counts[layer] + c if layer in counts else c
    finally:
        model.train(was)
    if not tokens:
        raise ValueError("no real tokens to count expert activations on")
    return {layer: c / tokens for layer, c in counts.items()}, selections


def critical_experts(
    forget: Mapping[int, torch.Tensor],
    retain: Mapping[int, torch.Tensor],
    candidates: Mapping[int, Sequence[int]],
    ratio: float = 1.0,
) -> list[tuple[int, int]]:
    """TRACE's forget-critical experts: among ``candidates`` ({layer: experts}), those whose
    activation frequency on forget text exceeds ``ratio`` times their frequency on retain text.

    Experts that no retain token selects are left out: no retain token could carry their weight.
    """
    out = []
    for layer in sorted(candidates):
        for e in sorted(candidates[layer]):
            f, r = float(forget[layer][e]), float(retain[layer][e])
            if r > 0 and f > ratio * r:
                out.append((int(layer), int(e)))
    return out


def match_frequencies(
    selected: torch.Tensor, target: torch.Tensor, *, max_weight: float = 10.0, sweeps: int = 200, tol: float = 1e-8
) -> torch.Tensor:
    """Token weights ``[n]`` under which each column's weighted frequency equals ``target``.

    ``selected`` is bool ``[n, C]`` (token t activates critical expert c), ``target`` ``[C]`` the
    forget frequencies. Iterative proportional fitting, one binary margin per column: the tokens
    that activate expert c are scaled by ``target_c / current_c``, the others by
    ``(1 - target_c) / (1 - current_c)``; with one column this is exact in one step
    (``f_F / f_R`` and ``(1 - f_F) / (1 - f_R)``). Then the weights are divided by their mean,
    those above ``max_weight`` are cut to it, and the weights are divided by their mean again
    (mean 1; a cut leaves the matching approximate).
    """
    selected = selected.bool()
    n = selected.shape[0]
    w = torch.ones(n, dtype=torch.float64)
    if n == 0 or selected.shape[1] == 0:
        return w.float()
    s = selected.double()
    target = target.double().clamp(0.0, 1.0)
    for _ in range(sweeps):
        worst = 0.0
        for c in range(s.shape[1]):
            current = float((w * s[:, c]).sum() / w.sum())
            worst = max(worst, abs(current - float(target[c])))
            if 0.0 < current < 1.0:
                up = float(target[c]) / current
                down = (1.0 - float(target[c])) / (1.0 - current)
                w = w * torch.where(selected[:, c], up, down)
        if worst < tol:
            break
    w = w / w.mean()
    w = w.clamp(max=max_weight)
    return (w / w.mean()).float()


@dataclass
class TraceWeights:
    """TRACE's statistics and token weights for one run (Chapter 9).

    ``critical`` lists the forget-critical ``(layer, expert)`` pairs; ``forget`` and
    ``retain`` the activation frequency of each on forget and retain text, ``weighted`` its
    weighted frequency on retain text (the target is ``forget``); ``weights[i]`` are the
    ``[batch, seq]`` token weights of retain batch ``i`` (0 on padding, mean 1 over real tokens).
    """

    critical: list[tuple[int, int]]
    forget: dict[tuple[int, int], float]
    retain: dict[tuple[int, int], float]
    weighted: dict[tuple[int, int], float]
    weights: list[torch.Tensor] = field(repr=False)

    def rows(self) -> list[dict[str, float]]:
        """One row per critical expert: its frequencies on forget, retain and weighted retain text."""
        return [{"layer": lay, "expert": e, "forget": self.forget[lay, e], "retain": self.retain[lay, e],
                 "weighted retain": self.weighted[lay, e]} for lay, e in self.critical]  # fmt: skip

    def max_weight(self) -> float:
        return max((float(w.max()) for w in self.weights), default=math.nan)


def trace_weights(
    model: nn.Module,
    forget_batches: Sequence[Batch],
    retain_batches: Sequence[Batch],
    candidates: Mapping[int, Sequence[int]],
    *,
    ratio: float = 1.0,
    max_weight: float = 10.0,
) -> TraceWeights:
    """TRACE's token weights for ``retain_batches`` (the original model: call it before the first update).

    Activation frequencies are counted on every forget and retain batch; the critical experts
    are picked among ``candidates`` (:func:`critical_experts`) and the weights fitted over all
    retain tokens at once (:func:`match_frequencies`), so a batch rich in tokens of a critical
    expert weighs more in the retain loss than one without.
    """
    layers = sorted(int(k) for k in candidates)
    if not layers:
        raise ValueError("TRACE needs candidate experts: the scope trains no expert and no router")
    if not retain_batches:
        raise ValueError("TRACE reweights the retain loss: give a retain set")
    f_freq, _ = activation_frequencies(model, forget_batches, layers)
    r_freq, selections = activation_frequencies(model, retain_batches, layers)
    critical = critical_experts(f_freq, r_freq, candidates, ratio)
    masks = [b["attention_mask"].bool().cpu() for b in retain_batches]
    columns = [torch.cat([sel[lay][..., e][m] for sel, m in zip(selections, masks, strict=True)]) for lay, e in critical]
    table = torch.stack(columns, dim=1) if columns else torch.zeros(sum(int(m.sum()) for m in masks), 0, dtype=torch.bool)
    target = torch.tensor([float(f_freq[lay][e]) for lay, e in critical], dtype=torch.float64)
    flat = match_frequencies(table, target, max_weight=max_weight)
    weights, start = [], 0
    for m, batch in zip(masks, retain_batches, strict=True):
        w = torch.zeros(m.shape, dtype=torch.float32)
        k = int(m.sum())
        w[m] = flat[start : start + k]
        start += k
        weights.append(w.to(batch["attention_mask"].device))
    weighted = {
        pair: float((flat.double() * table[:, i].double()).sum() / flat.double().sum()) for i, pair in enumerate(critical)
    }
    return TraceWeights(
        critical=critical,
        forget={(lay, e): float(f_freq[lay][e]) for lay, e in critical},
        retain={(lay, e): float(r_freq[lay][e]) for lay, e in critical},
        weighted=weighted,
        weights=weights,
    )


# --------------------------------------------------------------------------------------
# Token-weighted retain losses (TRACE)
# --------------------------------------------------------------------------------------


def _real(mask: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(weights.shape) != tuple(shape) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: weights {tuple(weights.shape)} and mask {tuple(mask.shape)} must be {shape}")
    keep = mask.bool()
    if not bool(keep.any()):
        raise ValueError(f"{what}: the batch has no real tokens")
    return keep


def weighted_retain_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The retain NLL with token weights: ``sum_t w_t NLL_t / (number of predictions)``.

    The prediction at position ``t`` (of token ``t + 1``) carries token ``t``'s weight, the
    routing of that position; with all weights 1 this is
    :func:`uoe_nb.objectives.retain_nll_loss`. Dividing by the count (not by the weights' sum)
    keeps the data set's weighting across batches.
    """
    what = "weighted_retain_nll"
    _real(mask, weights, tuple(input_ids.shape), what)
    nll, counted = objectives.per_token_nll(logits, input_ids, mask)
    if not bool(counted.any()):
        raise ValueError(f"{what}: no predicted tokens in the batch")
    w = weights[:, :-1].to(nll.device, torch.float32) * counted
    return (w * nll).sum() / counted.sum()


def weighted_retain_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """:func:`uoe_nb.objectives.retain_kl_loss` with token weights (mean of ``w_t KL_t`` over real tokens)."""
    keep = _real(mask, weights, tuple(logits.shape[:2]), "weighted_retain_kl").to(logits.device)
    log_p = F.log_softmax(logits[keep].float(), dim=-1)
    log_ref = F.log_softmax(ref_logits.detach()[keep].float(), dim=-1)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)
    return (weights.to(kl.device)[keep] * kl).mean()


def weighted_retain_kl_top_k(
    logits: torch.Tensor, ref_top: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """:func:`uoe_nb.objectives.retain_kl_top_k_loss` with token weights."""
    keep = _real(mask, weights, tuple(logits.shape[:2]), "weighted_retain_kl_top_k").to(logits.device)
    ref_logp, index = (t.to(logits.device) for t in ref_top)
    cur_logp = F.log_softmax(logits[keep].float(), dim=-1).gather(-1, index)

    def with_rest(lp: torch.Tensor) -> torch.Tensor:
        rest = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
        return torch.cat([lp, rest.unsqueeze(-1)], dim=-1)

    ref_all, cur_all = with_rest(ref_logp), with_rest(cur_logp)
    kl = (ref_all.exp() * (ref_all - cur_all)).sum(dim=-1)
    return (weights.to(kl.device)[keep] * kl).mean()


def weighted_rmu_retain(
    hidden: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """:func:`uoe_nb.objectives.rmu_retain_loss` with token weights (mean of ``w_t ||h_t - h0_t||^2 / H``)."""
    keep = _real(mask, weights, tuple(hidden.shape[:2]), "weighted_rmu_retain").to(hidden.device)
    per_token = (hidden[keep].float() - frozen.to(hidden.device)[keep].float()).pow(2).mean(dim=-1)
    return (weights.to(hidden.device)[keep] * per_token).mean()
