"""Checks beyond the paper: is the forgetting erasure or rerouting? how far from the oracle? (Chapters 4, 6)

The paper measures unlearning by forget accuracy and utility. Three further checks tell
*how* a model forgot:

* **Router-restored check** (:func:`router_restored_check`). UOE trains the target
  expert *and* (through the anchor loss, Eq. 3) that layer's router. Putting the
  original router weights back and re-measuring splits the forgetting into a part that
  lives in the routing (tokens sent into a sabotaged expert, or away from the one that
  knew) and a part erased from the weights. At tiny scale much of the forgetting is
  routing: unlearning a low-affinity expert with the anchor forgot as well as the
  attributed one, and all of it vanished once the routers were restored.
* **Expert-selection overlap** (:func:`routing_overlap`): per layer, the share of each
  token's top-K experts two models have in common, the metric of the paper's Fig. 3a,
  4 and 5 (Section 4, "expert selection shift").
* **Distance to the retrain oracle** (:func:`oracle_distance`): the KL divergence of the
  next-token distributions (:func:`output_kl`) between an unlearned model and a model
  retrained without the forget data, on forget and on retain text.

Batches are ``{"input_ids", "attention_mask"}`` dicts such as
:func:`uoe_nb.routing.batches` yields; every mean is over non-padding tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .moe import capture_routing, changed_parameters, find_moe_layers
from .progress import progress

__all__ = [
    "OracleDistance",
    "RouterRestored",
    "oracle_distance",
    "output_kl",
    "restore_routers",
    "router_restored_check",
    "routing_overlap",
]

Batch = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------
# Putting original weights back for a while
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _swapped(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Copy ``state[name]`` into each model tensor ``tensors[name]``; copy the old bytes back on exit."""
    missing = [n for n in tensors if n not in state]
    if missing:
        raise KeyError(
            f"the original state lacks {missing}: take a full state_dict() snapshot before unlearning"
        )
    for name, t in tensors.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(
                f"{name!r} is {tuple(t.shape)} in the model but {tuple(state[name].shape)} in the original state"
            )
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    try:
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(state[name])
        yield
    finally:
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(saved[name])


@contextlib.contextmanager
def restore_routers(
    model: nn.Module, original_state: Mapping[str, torch.Tensor], layers: Iterable[int] | None = None
) -> Iterator[list[int]]:
    """Temporarily put the original router weights back into MoE layers ``layers`` (default all).

    ``original_state`` is a ``state_dict()`` snapshot taken before unlearning. Inside the
    ``with`` block the routers (their parameters and persistent buffers) hold the
    original values; on exit, also when the block raises, the unlearned values come back
    bitwise. Yields the decoder-layer indices whose routers were restored.
    """
    moe = find_moe_layers(model)
    available = [lay.layer_index for lay in moe]
    wanted = available if layers is None else sorted({int(i) for i in layers})
    unknown = [i for i in wanted if i not in available]
    if unknown:
        raise IndexError(f"layers {unknown} have no routed experts; MoE layers of this model are {available}")
    if not wanted:
        raise ValueError("no layers given: pass None for every MoE layer")
    tensors: dict[str, torch.Tensor] = {}
    for lay in moe:
        if lay.layer_index in wanted:
            for name, t in lay.router.state_dict(keep_vars=True).items():
                tensors[f"{lay.router_name}.{name}"] = t
    with _swapped(model, tensors, original_state):
        yield list(wanted)


@dataclass
class RouterRestored:
    """One measurement on the unlearned model, with its original routers, and (optionally) before unlearning.

    ``evaluate`` should grow with what the model knows (e.g. forget accuracy), so the
    forgetting is ``original - unlearned``.
    """

    unlearned: float
    restored: float
    original: float | None = None
    layers: list[int] = field(default_factory=list)

    @property
    def routing_share(self) -> float | None:
        """(restored - unlearned) / (original - unlearned): the share of the forgetting the routers hold.

        1 means restoring the routers undoes all of the forgetting (it was routing), 0
        means none (the knowledge is gone from the expert weights). Raw value: it can
        fall outside [0, 1] (see :attr:`routing_share_clipped`). ``None`` without an
        ``original`` value or when nothing was forgotten.
        """
        if self.original is None or self.original == self.unlearned:
            return None
        return (self.restored - self.unlearned) / (self.original - self.unlearned)

    @property
    def routing_share_clipped(self) -> float | None:
        """:attr:`routing_share` clipped to [0, 1]."""
        share = self.routing_share
        return None if share is None else min(1.0, max(0.0, share))

    def as_row(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "unlearned": self.unlearned,
            "routers restored": self.restored,
            "routing share": self.routing_share,
            "routing share (clipped)": self.routing_share_clipped,
        }


def router_restored_check(
    model: nn.Module,
    original_state: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    *,
    original: float | None = None,
    measure_original: bool = False,
    layers: Iterable[int] | None = None,
) -> RouterRestored:
    """Does the forgetting survive when the original routers come back? (Chapters 4 and 6)

    Runs ``evaluate(model)`` on the unlearned model and again inside
    :func:`restore_routers`. Give the pre-unlearning value as ``original``, or set
    ``measure_original`` to measure it by temporarily restoring every changed parameter;
    then :attr:`RouterRestored.routing_share` is the share of the forgetting that
    vanishes with the original routers. A share near 1 means the "unlearning" is mostly
    routing into a sabotaged expert (or away from the knowing one), not erasure: at tiny
    scale that is what we find for much of the forgetting, so report this check next to
    FA and UT. The model is left exactly as it was.
    """
    if original is not None and measure_original:
        raise ValueError("give either an original value or measure_original=True, not both")
    unlearned = float(evaluate(model))
    with restore_routers(model, original_state, layers) as restored_layers:
        restored = float(evaluate(model))
    if measure_original:
        params = dict(model.named_parameters())
        changed = {name: params[name] for name in changed_parameters(model, original_state)}
        with _swapped(model, changed, original_state):
            original = float(evaluate(model))
    return RouterRestored(
        unlearned=unlearned,
        restored=restored,
        original=None if original is None else float(original),
        layers=restored_layers,
    )


# --------------------------------------------------------------------------------------
# Comparing two models token by token
# --------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "vocab_size", None)


def _moe_structure(model: nn.Module) -> list[tuple[int, int, int]]:
    return [(lay.layer_index, lay.num_experts, lay.top_k) for lay in find_moe_layers(model)]


@dataclass
class _Comparison:
    kl: float | None
    overlap: dict[int, float]
    tokens: int


def _materialise(batches: Iterable[Batch], what: str) -> list[Batch]:
    out = list(batches)
    if not out:
        raise ValueError(f"no {what} batches given")
    for b in out:
        if "input_ids" not in b:
            raise ValueError(f"every {what} batch needs 'input_ids' (and 'attention_mask' when padded)")
    return out


@torch.no_grad()
def _compare(
    model_a: nn.Module, model_b: nn.Module, batches: Sequence[Batch], *, kl: bool, overlap: bool, desc: str
) -> _Comparison:
    """One forward of each model per batch; KL(p_a || p_b) and/or top-K overlap over real tokens."""
    if kl:
        va, vb = _vocab_size(model_a), _vocab_size(model_b)
        if va != vb:
            raise ValueError(
                f"the models have different vocabularies ({va} vs {vb} tokens): output KL needs two models "
                "that share one tokenizer"
            )
    structure: list[tuple[int, int, int]] = []
    if overlap:
        structure = _moe_structure(model_a)
        other = _moe_structure(model_b)
        if structure != other:
            raise ValueError(
                "the models have different MoE layers (layer, experts, top-k): "
                f"{structure} vs {other}; expert-selection overlap needs the same architecture"
            )
    kl_sum = 0.0
    overlap_sum = {layer: 0.0 for layer, _, _ in structure}
    top_k = {layer: k for layer, _, k in structure}
    tokens = 0
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for batch in progress(batches, desc=desc):
            outputs = []
            for model in (model_a, model_b):
                device = _device(model)
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                context = capture_routing(model) if overlap else contextlib.nullcontext()
                with context as cap:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                outputs.append((logits, cap))
            (logits_a, cap_a), (logits_b, cap_b) = outputs
            real = batch.get("attention_mask")
            real = torch.ones_like(batch["input_ids"], dtype=torch.bool) if real is None else real.bool()
            n = int(real.sum())
            tokens += n
            if kl:
                if logits_a.shape[-1] != logits_b.shape[-1]:
                    raise ValueError(
                        f"the models predict over {logits_a.shape[-1]} and {logits_b.shape[-1]} tokens: "
                        "output KL needs one shared vocabulary"
                    )
                log_a = F.log_softmax(logits_a[real.to(logits_a.device)].float(), dim=-1)
                log_b = F.log_softmax(logits_b[real.to(logits_b.device)].float(), dim=-1).to(log_a.device)
                kl_sum += float((log_a.exp() * (log_a - log_b)).sum(dtype=torch.float64))
            if overlap:
                for layer in overlap_sum:
                    rec_a, rec_b = cap_a[layer][-1], cap_b[layer][-1]
                    sel_a = rec_a.selected().cpu()
                    sel_b = rec_b.selected().cpu()
                    shared = (sel_a & sel_b).sum(-1)[real].double()
                    overlap_sum[layer] += float(shared.sum()) / top_k[layer]
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if tokens == 0:
        raise ValueError("the batches hold no real tokens (every attention_mask entry is 0)")
    return _Comparison(
        kl=kl_sum / tokens if kl else None,
        overlap={layer: s / tokens for layer, s in overlap_sum.items()},
        tokens=tokens,
    )


def output_kl(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean per-token KL(p_a || p_b) of the next-token distributions, in nats (Chapter 6).

    Averaged over every non-padding position of every batch (token-weighted, not per
    sequence). Both models must share one tokenizer: different vocabulary sizes raise.
    """
    return _compare(
        model_a, model_b, _materialise(batches, "input"), kl=True, overlap=False, desc="output KL"
    ).kl


def routing_overlap(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Batch]) -> dict[int, float]:
    """Per MoE layer, the mean over real tokens of |top-K_a ∩ top-K_b| / K (Fig. 3a, 4, 5; Chapter 4).

    The paper's expert-selection overlap ratio: 1 when both models send every token to
    the same experts. Expert indices are compared as they are, so the models must share
    an architecture (same MoE layers, experts and top-K; otherwise ``ValueError``) and,
    to be meaningful, an initialisation (an unlearned copy, or a retrain from the same seed).
    """
    batches = _materialise(batches, "input")
    return _compare(model_a, model_b, batches, kl=False, overlap=True, desc="routing overlap").overlap


@dataclass
class OracleDistance:
    """How far an unlearned model is from the retrain oracle, on forget and on retain text.

    ``kl_*`` is KL(p_oracle || p_model) per token in nats; ``overlap_*`` maps MoE layer ->
    expert-selection overlap with the oracle (empty when routing was not compared).
    """

    kl_forget: float
    kl_retain: float
    overlap_forget: dict[int, float] = field(default_factory=dict)
    overlap_retain: dict[int, float] = field(default_factory=dict)
    tokens_forget: int = 0
    tokens_retain: int = 0

    def as_row(self) -> dict[str, float]:
        """A table row; overlaps are averaged over layers."""

        def mean(d: Mapping[int, float]) -> float:
            return sum(d.values()) / len(d) if d else math.nan

        return {
            "KL to oracle (forget)": self.kl_forget,
            "KL to oracle (retain)": self.kl_retain,
            "overlap with oracle (forget)": mean(self.overlap_forget),
            "overlap with oracle (retain)": mean(self.overlap_retain),
        }


def oracle_distance(
    model: nn.Module,
    oracle: nn.Module,
    forget_batches: Iterable[Batch],
    retain_batches: Iterable[Batch],
    *,
    routing: bool = True,
) -> OracleDistance:
    """Distance of ``model`` to the retrain ``oracle`` on forget and retain text (Chapter 6).

    The ideal unlearned model behaves like the oracle (trained without the forget data)
    everywhere: small KL on forget text (it forgot what the oracle never knew) and on
    retain text (nothing else moved). KL is taken as KL(p_oracle || p_model), the
    oracle being the target distribution. With ``routing`` the expert-selection overlap
    with the oracle is reported too; it needs the same MoE architecture (pass
    ``routing=False`` for a dense oracle). Read it with care: expert indices of two
    separately trained models need not correspond. Even the zoo's
    ``tiny-qwen2moe-oracle``, trained from the same seed, shares only about 0.2 of
    ``tiny-qwen2moe``'s top-2 choices on forget and on retain text alike (chance is
    2/16 = 0.125), so overlap with the *original* model (:func:`routing_overlap`) is the
    paper's routing metric, and the KL is the oracle metric.

    Batches may be lists or generators; each batch is used for one forward pass of each
    model, and generators are consumed (read into a list first).
    """
    result = {}
    for what, batches in (("forget", forget_batches), ("retain", retain_batches)):
        cmp = _compare(
            oracle,
            model,
            _materialise(batches, what),
            kl=True,
            overlap=routing,
            desc=f"oracle distance ({what})",
        )
        result[what] = cmp
    return OracleDistance(
        kl_forget=result["forget"].kl,
        kl_retain=result["retain"].kl,
        overlap_forget=result["forget"].overlap,
        overlap_retain=result["retain"].overlap,
        tokens_forget=result["forget"].tokens,
        tokens_retain=result["retain"].tokens,
    )
