"""The unlearning losses: UOE's router anchor (Eq. 3-4) and the baselines it combines with.

Chapter 2 introduces the baselines (GA, GradDiff, NPO, SimNPO, RMU), Chapter 4 the
anchor loss, Chapter 6 the retain-side router term. The total objective of Eq. 4 is

    forget_loss + retain_weight * retain_loss + anchor_weight * anchor_loss
    (lambda)                       (alpha)

Everything here is a pure function of tensors, except :func:`sequence_nll` and
:func:`token_mean_nll`, which run a model on a batch. Masks are ``[batch, seq]`` with
1 for real tokens and 0 for padding; every function checks shapes and refuses a mask
with no real token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "anchor_loss",
    "ga_loss",
    "npo_loss",
    "per_sequence_nll",
    "per_token_nll",
    "reference_top_k",
    "retain_kl_loss",
    "retain_kl_top_k_loss",
    "retain_nll_loss",
    "retain_router_loss",
    "rmu_control_vector",
    "rmu_forget_loss",
    "rmu_retain_loss",
    "sequence_nll",
    "simnpo_loss",
    "token_mean_nll",
]


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _real_tokens(mask: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """``mask`` as booleans, after checking it matches ``shape`` and holds a real token."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(shape)} (one entry per token)")
    keep = mask.bool()
    if not keep.any():
        raise ValueError(f"{what}: the mask has no real token (all entries are 0); give at least one token")
    return keep


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: {names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _vector(x: torch.Tensor, what: str, name: str) -> None:
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{what}: {name} must be a non-empty 1-D tensor (one value per sequence), got {tuple(x.shape)}")


def _positive(value: float, what: str, name: str) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what}: {name} must be a positive finite number, got {value}")


# --------------------------------------------------------------------------------------
# Log-likelihood
# --------------------------------------------------------------------------------------


def per_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL at every position, ``[batch, seq - 1]`` in float32 (0 where not
    counted), and the mask of counted predictions (on the NLL's device).

    Position ``t``'s logits predict token ``t + 1``. A prediction counts when both the
    predicted token and the token it is predicted from are real (with right padding
    this is exactly the usual ``labels = -100`` on padding). :func:`per_sequence_nll` sums
    it per sequence; :func:`uoe_nb.stability.weighted_retain_nll` weights it per token.
    """
    what = "per_sequence_nll"
    if logits.dim() != 3:
        raise ValueError(f"{what}: logits must be [batch, seq, vocab], got {tuple(logits.shape)}")
    if tuple(input_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"{what}: input_ids {tuple(input_ids.shape)} do not match logits {tuple(logits.shape[:2])} [batch, seq]"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = _real_tokens(attention_mask, tuple(input_ids.shape), what)
    if input_ids.shape[1] < 2:
        raise ValueError(f"{what}: sequences need at least two tokens to predict one, got length {input_ids.shape[1]}")
    counted = keep[:, 1:] & keep[:, :-1]
    targets = input_ids[:, 1:].to(logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        # One sequence at a time, recomputed in the backward pass: the float32 log-softmax of
        # the whole batch (4 x 128 x 50k floats: 0.1 GiB, twice with its gradient) is never held.
        nll = torch.stack(
            [checkpoint(_row_nll, logits[b, :-1], targets[b], use_reentrant=False) for b in range(logits.shape[0])]
        )
    else:
        nll = torch.stack([_row_nll(logits[b, :-1], targets[b]) for b in range(logits.shape[0])])
    counted = counted.to(nll.device)
    return nll.masked_fill(~counted, 0.0), counted


def per_sequence_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of predicted tokens per sequence (Chapter 2).

    The sums of :func:`per_token_nll`. Returns ``(sum_nll[B], n_tokens[B])`` in float32; a
    one-token sequence has ``n_tokens == 0``.
    """
    nll, counted = per_token_nll(logits, input_ids, attention_mask)
    return nll.sum(dim=1), counted.sum(dim=1).to(torch.float32)


def _row_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_nll(
    model_or_logits: nn.Module | torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_sequence_nll` of a batch, given the model (run here) or its logits."""
    if "input_ids" not in batch:
        raise ValueError(f"sequence_nll: the batch needs 'input_ids', got keys {sorted(batch)}")
    mask = batch.get("attention_mask")
    if isinstance(model_or_logits, torch.Tensor):
        logits = model_or_logits
    else:
        inputs = {"input_ids": batch["input_ids"]}
        if mask is not None:
            inputs["attention_mask"] = mask
        logits = model_or_logits(**inputs).logits
    return per_sequence_nll(logits, batch["input_ids"], mask)


def token_mean_nll(model_or_logits: nn.Module | torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL per predicted token over the whole batch (every token weighs the same)."""
    return retain_nll_loss(*sequence_nll(model_or_logits, batch))


def _token_mean(nll_sum: torch.Tensor, n_tokens: torch.Tensor, what: str) -> torch.Tensor:
    _vector(nll_sum, what, "nll_sum")
    _same_shape(nll_sum, n_tokens, what, "nll_sum and n_tokens")
    total = n_tokens.sum()
    if not total > 0:
        raise ValueError(f"{what}: no predicted tokens in the batch (n_tokens sums to {float(total)})")
    return nll_sum.sum() / total


# --------------------------------------------------------------------------------------
# Forget and retain losses of the baselines (Chapter 2)
# --------------------------------------------------------------------------------------


def ga_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set: ``-NLL`` (Chapter 2).

    Averaging: all predicted tokens of the batch weigh the same,
    ``-(sum_j sum_nll_j) / (sum_j n_tokens_j)`` (what a causal LM's loss with
    ``labels`` gives, as in the released code), not a mean of per-sequence means.
    """
    return -_token_mean(nll_sum, n_tokens, "ga_loss")


def retain_nll_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """GradDiff's NLL retain term: mean NLL per predicted token of the retain batch."""
    return _token_mean(nll_sum, n_tokens, "retain_nll_loss")


def retain_kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GradDiff's KL retain term: ``KL(reference || current)`` of the next-token
    distributions, summed over the vocabulary and averaged over real tokens.

    ``ref_logits`` come from the frozen original model and are detached here.
    """
    what = "retain_kl_loss"
    if logits.dim() != 3:
        raise ValueError(f"{what}: logits must be [batch, seq, vocab], got {tuple(logits.shape)}")
    _same_shape(logits, ref_logits, what, "logits and ref_logits")
    keep = _real_tokens(mask, tuple(logits.shape[:2]), what).to(logits.device)
    log_p = F.log_softmax(logits[keep].float(), dim=-1)
    log_ref = F.log_softmax(ref_logits.detach()[keep].float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum(dim=-1).mean()


def reference_top_k(ref_logits: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens of the frozen reference at each real position:
    ``(log_probs[n, k], indices[n, k])`` over the ``n`` real tokens (for :func:`retain_kl_top_k_loss`).
    A few hundred kilobytes per batch where the full logits take ``vocab`` floats per token."""
    what = "reference_top_k"
    if ref_logits.dim() != 3:
        raise ValueError(f"{what}: ref_logits must be [batch, seq, vocab], got {tuple(ref_logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < ref_logits.shape[-1]:
        raise ValueError(f"{what}: k must be an int in [1, vocab), got {k!r}")
    keep = _real_tokens(mask, tuple(ref_logits.shape[:2]), what).to(ref_logits.device)
    log_ref = F.log_softmax(ref_logits.detach()[keep].float(), dim=-1)
    values, indices = log_ref.topk(k, dim=-1)
    return values, indices


def retain_kl_top_k_loss(
    logits: torch.Tensor, ref_top: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """GradDiff's KL retain term over the reference's top-k tokens plus one bucket for the rest.

    ``KL(ref || current)`` between the two next-token distributions coarse-grained to the
    reference's ``k`` likeliest tokens and "any other token": exact for that partition and,
    by the data-processing inequality, never above the full-vocabulary KL; it needs only
    the reference's top-k (:func:`reference_top_k`) instead of its full logits.
    """
    what = "retain_kl_top_k_loss"
    if logits.dim() != 3:
        raise ValueError(f"{what}: logits must be [batch, seq, vocab], got {tuple(logits.shape)}")
    keep = _real_tokens(mask, tuple(logits.shape[:2]), what).to(logits.device)
    ref_logp, index = (t.to(logits.device) for t in ref_top)
    log_p = F.log_softmax(logits[keep].float(), dim=-1)
    if ref_logp.shape != index.shape or ref_logp.shape[0] != log_p.shape[0]:
        raise ValueError(f"{what}: the reference holds {ref_logp.shape[0]} tokens, the batch {log_p.shape[0]}")
    cur_logp = log_p.gather(-1, index)

    def with_rest(lp: torch.Tensor) -> torch.Tensor:
        rest = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
        return torch.cat([lp, rest.unsqueeze(-1)], dim=-1)

    ref_all, cur_all = with_rest(ref_logp), with_rest(cur_logp)
    return (ref_all.exp() * (ref_all - cur_all)).sum(dim=-1).mean()


def npo_loss(
    nll_cur: torch.Tensor,
    nll_ref: torch.Tensor,
    beta: float,
    *,
    per_token: bool = False,
    n_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024; Chapter 2):

        -(2 / beta) * mean_j log sigmoid( beta * (NLL_cur(x_j) - NLL_ref(x_j)) )

    ``nll_cur`` / ``nll_ref`` are per-sequence NLLs of the model being trained and of
    the frozen original (detached here). NPO's definition, the paper's and
    open-unlearning's, uses the summed NLL of each sequence (the default here and in
    :class:`uoe_nb.unlearn.UnlearnConfig`, with the paper's ``beta = 0.001``). With
    ``per_token=True`` both are divided by ``n_tokens`` (the per-token mean NLL): the
    forget term then weighs a sequence by its mean, not its sum, so it is about the
    sequence length weaker against a per-token retain NLL, and with a larger ``beta``
    (0.1) a summed NLL that moves by tens of nats would saturate the sigmoid (loss 0,
    no gradient) within a few steps. When current and reference agree the loss is
    ``(2 / beta) * log 2``; for ``beta * (NLL_cur - NLL_ref)`` near 0 its gradient is
    that of GA on the summed NLL.
    """
    what = "npo_loss"
    _positive(beta, what, "beta")
    _vector(nll_cur, what, "nll_cur")
    _same_shape(nll_cur, nll_ref, what, "nll_cur and nll_ref")
    nll_ref = nll_ref.detach()
    if per_token:
        if n_tokens is None:
            raise ValueError(f"{what}: per_token=True needs n_tokens (the predicted tokens of each sequence)")
        _same_shape(nll_cur, n_tokens, what, "nll_cur and n_tokens")
        if not bool((n_tokens > 0).all()):
            raise ValueError(f"{what}: every sequence needs at least one predicted token for a per-token mean")
        nll_cur, nll_ref = nll_cur / n_tokens, nll_ref / n_tokens
    elif n_tokens is not None:
        raise ValueError(f"{what}: n_tokens is only used with per_token=True; pass per_token=True or drop n_tokens")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_cur - nll_ref)).mean()


def simnpo_loss(
    nll_sum: torch.Tensor, n_tokens: torch.Tensor, beta: float = 4.5, delta: float = 0.0
) -> torch.Tensor:
    """SimNPO's forget term (Fan et al. 2024; Chapter 2), reference-free NPO on length-normalised NLL:

        -(2 / beta) * mean_j log sigmoid( beta * (NLL_cur(x_j) / |x_j| - delta) )

    ``nll_sum`` and ``n_tokens`` are per-sequence summed NLL and predicted-token counts
    (:func:`per_sequence_nll`). Minimising it raises the forget NLL; ``delta`` is a margin
    inside the ``beta`` scaling. The retain term (open-unlearning's SimNPO adds one) is the
    GradDiff retain loss, added by the training loop with ``retain_weight``.
    """
    what = "simnpo_loss"
    _positive(beta, what, "beta")
    _vector(nll_sum, what, "nll_sum")
    _same_shape(nll_sum, n_tokens, what, "nll_sum and n_tokens")
    if not bool((n_tokens > 0).all()):
        raise ValueError(f"{what}: every sequence needs at least one predicted token (two tokens in all)")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / n_tokens - delta)).mean()


# --------------------------------------------------------------------------------------
# RMU (Li et al. 2024; Chapter 2)
# --------------------------------------------------------------------------------------


def rmu_control_vector(
    hidden_size: int, coefficient: float, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """RMU's fixed random control vector ``u = c * r / ||r||`` with ``r ~ U[0, 1)^d``.

    ``coefficient`` is the steering coefficient ``c`` (6.5 for Zephyr-7B in WMDP; the
    paper uses 8000 / 32000 with UOE). The same seed gives the same vector.
    """
    if int(hidden_size) < 1:
        raise ValueError(f"rmu_control_vector: hidden_size must be positive, got {hidden_size}")
    _positive(coefficient, "rmu_control_vector", "coefficient")
    generator = torch.Generator().manual_seed(int(seed))
    r = torch.rand(int(hidden_size), generator=generator, dtype=torch.float64)
    return (coefficient * r / r.norm()).to(dtype)


def _masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, what: str) -> torch.Tensor:
    if hidden.dim() != 3:
        raise ValueError(f"{what}: hidden states must be [batch, seq, hidden], got {tuple(hidden.shape)}")
    keep = _real_tokens(mask, tuple(hidden.shape[:2]), what).to(hidden.device)
    diff = hidden[keep].float() - (target[keep] if target.dim() == 3 else target).float()
    return diff.pow(2).mean()


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget term: ``MSE(h_l(forget), u)``, the mean over real tokens and hidden
    dimensions of the squared distance between layer ``l``'s output and the control vector."""
    what = "rmu_forget_loss"
    if hidden.dim() != 3 or control.shape != hidden.shape[-1:]:
        raise ValueError(
            f"{what}: need hidden [batch, seq, d] and control [d], got {tuple(hidden.shape)} and {tuple(control.shape)}"
        )
    return _masked_mse(hidden, control.to(hidden.device), mask, what)


def rmu_retain_loss(hidden: torch.Tensor, frozen_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: ``MSE(h_l(retain), h_l_frozen(retain))`` over real tokens and
    dimensions (the WMDP code weights it by ``alpha``, e.g. 1200). ``frozen_hidden`` is detached."""
    what = "rmu_retain_loss"
    _same_shape(hidden, frozen_hidden, what, "hidden and frozen_hidden")
    return _masked_mse(hidden, frozen_hidden.detach(), mask, what)


# --------------------------------------------------------------------------------------
# Router terms: UOE's anchor (Eq. 3) and our retain-side extension
# --------------------------------------------------------------------------------------


def _router_scores(scores: torch.Tensor, mask: torch.Tensor, what: str) -> torch.Tensor:
    if scores.dim() < 2:
        raise ValueError(f"{what}: scores must be [..., num_experts] (e.g. [batch, seq, E]), got {tuple(scores.shape)}")
    return _real_tokens(mask, tuple(scores.shape[:-1]), what).to(scores.device)


def anchor_loss(
    scores: torch.Tensor, mask: torch.Tensor, target_expert: int, *, reduction: str = "sum"
) -> torch.Tensor:
    """Router anchor loss, Eq. 3 of the paper (Chapter 4).

    ``scores`` is the target router's FULL score distribution over all ``E`` experts
    (``[batch, seq, E]``, e.g. :attr:`uoe_nb.moe.RoutingRecord.scores` captured with
    ``detach=False``), not the top-K-masked ``g``; only real tokens (``mask``) count.

    * ``reduction="sum"``: Eq. 3, ``sum_i (s_i - onehot_i)^2`` per token, averaged
      over tokens.
    * ``reduction="mean"``: the released code's ``F.mse_loss(onehot, scores)``, a
      mean over tokens x experts, i.e. the "sum" value divided by ``E``.

    So an anchor weight (alpha) of ``a`` with "mean" equals ``a / E`` with "sum":
    the code's alpha = 1 is the paper's alpha = 1/E.
    """
    what = "anchor_loss"
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{what}: reduction must be 'sum' (Eq. 3) or 'mean' (released code), got {reduction!r}")
    keep = _router_scores(scores, mask, what)
    num_experts = scores.shape[-1]
    if not 0 <= int(target_expert) < num_experts:
        raise ValueError(f"{what}: target_expert {target_expert} is out of range for {num_experts} experts")
    s = scores[keep].float()
    one_hot = F.one_hot(torch.tensor(int(target_expert), device=s.device), num_experts).to(s.dtype)
    per_token = (s - one_hot).pow(2).sum(dim=-1)
    loss = per_token.mean()
    return loss / num_experts if reduction == "mean" else loss


def retain_router_loss(scores: torch.Tensor, ref_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain-side router term (our extension, not in the paper; Chapter 6).

    Mean over real retain tokens of ``sum_i (s_i - s_i^orig)^2``: the target router's
    current full score distribution against the original model's (``ref_scores``,
    detached). The anchor pulls every token towards the unlearned expert, retain
    tokens included; on the tiny models that routing drift, not the forgetting,
    caused most of the damage to retained knowledge, and this term keeps retain
    tokens routed as before.
    """
    what = "retain_router_loss"
    _same_shape(scores, ref_scores, what, "scores and ref_scores")
    keep = _router_scores(scores, mask, what)
    diff = scores[keep].float() - ref_scores.detach()[keep].float()
    return diff.pow(2).sum(dim=-1).mean()
