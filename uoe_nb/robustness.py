"""Attacks beyond GCG: relearning, quantization, routing and probing (Chapter 7).

GCG (:mod:`uoe_nb.attacks`) asks whether a *prompt* brings forgotten knowledge back. Four
other attacks ask the same of the weights, the routing and the hidden states. Each is one
function that takes a model (the original, an unlearned one, or the retrain oracle) and
returns a small result with the numbers it measured; :func:`run_attacks` runs a list of
them over named models into one table, which :func:`attack_columns`,
:func:`attack_tables`, :func:`forget_accuracy_table` and :func:`plot_attacks` turn into
what the chapter shows.

1. **Relearning** (:func:`relearn_attack`): fine-tune for a few steps on half of the
   forget facts' texts, then measure forget accuracy on the *other* half. Knowledge that
   was only suppressed comes back on facts the attacker never showed; knowledge that is
   gone (the oracle) does not. :func:`split_forget_facts` splits the tiny world's facts.
2. **Quantization** (:func:`quantization_attack`): round the weights to 8 and 4 bits and
   measure again. A small unlearning update can sit below the rounding step, so
   quantization may undo it. :func:`quantized` rounds in place and restores bitwise.
3. **Routing** (:func:`routing_attack`): at inference, force one MoE layer's router to
   select an expert for every token, or never to select it (:func:`routing_patch`). UOE
   unlearns one expert; if the knowledge survives in the others, avoiding the unlearned
   expert brings it back.
4. **Probing** (:func:`probe_attack`): a linear probe on hidden states, trained on facts
   of the same kind that were not unlearned and tested on the forgotten ones
   (:func:`probe_data`). Knowledge the model no longer *says* may still be *readable*.

Every attack leaves the model as it found it: parameters, buffers, gradients,
``requires_grad`` flags and train/eval mode (relearning and quantization change weights in
place and restore them bitwise from a copy in host memory, :func:`preserved`).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .evaluation import MC_PROMPT, MCResult, multiple_choice_accuracy, probe_prompt
from .fastpath import hidden_after_layer
from .moe import MoELayer, NoMoELayersError, capture_routing, decoder_layers, find_moe_layers, moe_layer
from .progress import progress
from .routing import batches
from .trainable import trained_rows
from .world import TinyWorld, qa_line

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PROBE_DOMAINS",
    "PROBE_POOLINGS",
    "QUANT_BITS",
    "QUANT_GROUPS",
    "ROUTING_MODES",
    "ForgetSplit",
    "LinearProbeResult",
    "ProbeData",
    "QuantizationResult",
    "RelearnConfig",
    "RelearnResult",
    "RoutingResult",
    "attack_columns",
    "attack_tables",
    "forget_accuracy_table",
    "hidden_features",
    "plot_attacks",
    "preserved",
    "probe_attack",
    "probe_data",
    "quantization_attack",
    "quantization_targets",
    "quantize_dequantize",
    "quantized",
    "relearn_attack",
    "routing_attack",
    "routing_patch",
    "run_attacks",
    "split_forget_facts",
]

#: Bit widths :func:`quantize_dequantize` supports.
QUANT_BITS = (8, 4)
#: Groups of weights :func:`quantized` can round (see :func:`quantization_targets`).
QUANT_GROUPS = ("experts", "routers", "rest", "embeddings")
#: What :func:`routing_patch` does to the chosen expert.
ROUTING_MODES = ("force", "avoid")
#: Where :func:`probe_data` takes its facts from.
PROBE_DOMAINS = ("people", "crystals")
#: How :func:`hidden_features` turns a prompt's hidden states into one vector.
PROBE_POOLINGS = ("last", "mean")

_PEOPLE_ATTRIBUTES = ("city", "profession", "instrument", "pet")
_CRYSTAL_ATTRIBUTES = ("colour", "mine", "hazard", "use")


# --------------------------------------------------------------------------- shared helpers


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_item_list(name: str, items: Any) -> None:
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(
            f"{name} must be a non-empty list of multiple-choice items (question/choices/answer)"
        )


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError("texts must be a list of documents, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: relearning needs at least one document to train on")
    bad = sorted({type(t).__name__ for t in texts if not isinstance(t, str) or not t.strip()})
    if bad:
        raise ValueError(f"texts must be non-empty strings, found {bad}")
    return texts


def _accuracy(
    model: nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]], name: str, batch_size: int
) -> MCResult:
    return multiple_choice_accuracy(model, tokenizer, items, name=name, batch_size=batch_size, progress=False)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _right_padding(tokenizer: Any) -> Iterator[None]:
    """Pad on the right for the block: real tokens keep the positions they have unpadded."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        yield
    finally:
        tokenizer.padding_side = old


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Whatever the block does to ``model``, give it back bitwise as it was (Chapter 7).

    Copies every parameter and buffer to host memory on entry (one model's worth of CPU
    memory) and writes them back on exit, exception or not, together with the
    ``requires_grad`` flags, the ``.grad`` tensors (the block starts with none) and the
    train/eval mode. Relearning and quantization change weights in place inside it.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    saved_params = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    saved_buffers = {n: b.detach().to("cpu", copy=True) for n, b in buffers.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    for p in params.values():
        p.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved_params[n])
            for n, b in buffers.items():
                b.copy_(saved_buffers[n])
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)


# --------------------------------------------------------------------------- 1. relearning


@dataclass
class ForgetSplit:
    """The tiny world's forget facts in two halves, split by crystal (:func:`split_forget_facts`).

    ``train_texts`` are the forget-corpus passages of the ``held_in`` crystals (each
    passage states all four facts of one crystal), ``train_qa`` their question-answer
    lines (:func:`uoe_nb.world.qa_line`, the form the zoo also saw in pretraining).
    ``held_in_items`` and ``held_out_items`` are the forget questions of each half. No
    text about a ``held_out`` crystal is in ``train_texts`` or ``train_qa``.
    """

    seed: int
    held_in: list[str]
    held_out: list[str]
    train_texts: list[str]
    train_qa: list[str]
    held_in_items: list[dict]
    held_out_items: list[dict]


def split_forget_facts(world: TinyWorld, *, seed: int = 0, held_out_fraction: float = 0.5) -> ForgetSplit:
    """Split the forget domain's facts into a held-in and a held-out half, by crystal (Chapter 7).

    A crystal's forget-corpus passages state all four of its facts together, so splitting
    single facts would train on held-out facts; the unit is therefore the crystal
    (the entity). ``round(held_out_fraction * crystals)`` crystals, drawn with
    ``random.Random(seed)``, are held out; both halves keep the world's order.
    Deterministic for a given world and seed.
    """
    if not isinstance(world, TinyWorld):
        raise TypeError(f"world must be a uoe_nb.world.TinyWorld, got {type(world).__name__}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be strictly between 0 and 1, got {held_out_fraction!r}")
    names = [c["name"] for c in world.crystals]
    n_out = round(held_out_fraction * len(names))
    if not 1 <= n_out < len(names):
        raise ValueError(
            f"held_out_fraction={held_out_fraction} holds out {n_out} of {len(names)} crystals: "
            "both halves need at least one crystal"
        )
    out = set(random.Random(seed).sample(names, n_out))
    held_in = [n for n in names if n not in out]
    held_out = [n for n in names if n in out]
    known = set(names)
    train_texts = []
    for i, passage in enumerate(world.forget_corpus):
        found = known.intersection(passage.replace(",", " ").replace(".", " ").split())
        if len(found) != 1:
            raise ValueError(
                f"forget passage {i} names {len(found)} crystals ({sorted(found)}); expected exactly one"
            )
        if found.pop() not in out:
            train_texts.append(passage)
    missing = [i for i, q in enumerate(world.forget_questions) if q.get("entity") not in known]
    if missing:
        raise ValueError(
            f"forget questions {missing[:5]} have no known 'entity' field: cannot split them by crystal"
        )
    held_in_items = [q for q in world.forget_questions if q["entity"] not in out]
    held_out_items = [q for q in world.forget_questions if q["entity"] in out]
    train_qa = [qa_line(q["question"], q["choices"][q["answer"]]) for q in held_in_items]
    return ForgetSplit(seed, held_in, held_out, train_texts, train_qa, held_in_items, held_out_items)


@dataclass
class RelearnConfig:
    """Budget of the relearning attack: plain next-token NLL, AdamW (Chapter 7).

    ``steps`` optimiser steps on batches of ``batch_size`` documents, taken in turn from
    permutations of the texts (a new one each pass) drawn from a generator seeded by ``seed``;
    documents are cut at ``max_length`` tokens; gradients are clipped to ``grad_clip``
    (None: no clipping).
    """

    lr: float = 1e-3
    steps: int = 30
    batch_size: int = 4
    seed: int = 0
    max_length: int = 128
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            _check_positive_int(f"RelearnConfig.{name}", getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"RelearnConfig.lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"RelearnConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"RelearnConfig.grad_clip must be positive or None, got {self.grad_clip!r}")


@dataclass
class RelearnResult:
    """Forget accuracy before and after relearning on the held-in half (Chapter 7).

    ``held_out_before`` / ``held_out_after``: FA on the held-out questions (facts whose
    text was never trained on) before and after relearning; the change between them is
    the attack's effect. ``held_in_before`` / ``held_in_after``: FA on the trained-on
    half (None when no held-in questions were given). ``losses``: the training loss of
    each step.
    """

    held_out_before: float
    held_out_after: float
    held_in_before: float | None
    held_in_after: float | None
    losses: list[float]
    config: RelearnConfig = field(repr=False)
    name: str = "relearn"

    def as_row(self, **extra: Any) -> dict[str, Any]:
        row = {
            **extra,
            f"{self.name}: FA held-out before": self.held_out_before,
            f"{self.name}: FA held-out after": self.held_out_after,
            f"{self.name}: FA held-out change": self.held_out_after - self.held_out_before,
        }
        if self.held_in_after is not None:
            row[f"{self.name}: FA held-in before"] = self.held_in_before
            row[f"{self.name}: FA held-in after"] = self.held_in_after
        return row


def _relearn(model: nn.Module, tokenizer: Any, texts: list[str], config: RelearnConfig) -> list[float]:
    """Fine-tune ``model`` in place (eval mode: no dropout, no router jitter). Returns the losses."""
    device = _device(model)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses = []
    model.eval()
    for _ in progress(range(config.steps), desc="relearn"):
        while len(order) < config.batch_size:
            order += torch.randperm(len(texts), generator=gen).tolist()
        idx, order = order[: config.batch_size], order[config.batch_size :]
        chunk = [texts[i] for i in idx]
        with _right_padding(tokenizer):
            batch = next(
                batches(tokenizer, chunk, batch_size=len(chunk), max_length=config.max_length, device=device)
            )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def relearn_attack(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    held_out_items: Sequence[Mapping[str, Any]],
    *,
    held_in_items: Sequence[Mapping[str, Any]] | None = None,
    config: RelearnConfig | None = None,
    batch_size: int = 64,
    name: str = "relearn",
) -> RelearnResult:
    """Relearning attack: FA on held-out facts before and after fine-tuning on other forget facts (Chapter 7).

    Measures multiple-choice accuracy (lm-eval, :func:`uoe_nb.evaluation.multiple_choice_accuracy`)
    of ``held_out_items`` (and of ``held_in_items`` when given), fine-tunes *every*
    parameter on ``texts`` for ``config.steps`` AdamW steps of plain next-token NLL,
    and measures again. With :func:`split_forget_facts`, ``texts`` are the held-in
    crystals' passages and no held-out fact is ever trained on, so a rise of held-out FA
    means the unlearned model still held those facts.

    The model is trained in place and restored bitwise afterwards (:func:`preserved`;
    the relearned weights are thrown away), so it needs one model's worth of host memory
    for the copy and the optimiser state of a whole-model fine-tune on its device.
    Deterministic for a given ``config.seed``.
    """
    config = config or RelearnConfig()
    config.validate()
    texts = _check_texts(texts)
    _check_item_list("held_out_items", held_out_items)
    if held_in_items is not None:
        _check_item_list("held_in_items", held_in_items)
    _check_positive_int("batch_size", batch_size)
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    out_before = _accuracy(model, tokenizer, held_out_items, "relearn_held_out", batch_size).accuracy
    in_before = (
        _accuracy(model, tokenizer, held_in_items, "relearn_held_in", batch_size).accuracy
        if held_in_items is not None
        else None
    )
    with preserved(model):
        losses = _relearn(model, tokenizer, texts, config)
        out_after = _accuracy(model, tokenizer, held_out_items, "relearn_held_out", batch_size).accuracy
        in_after = (
            _accuracy(model, tokenizer, held_in_items, "relearn_held_in", batch_size).accuracy
            if held_in_items is not None
            else None
        )
    return RelearnResult(out_before, out_after, in_before, in_after, losses, config, name)


# --------------------------------------------------------------------------- 2. quantization


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    return int(bits)


def quantize_dequantize(weight: torch.Tensor, bits: int, *, dim: int = -1) -> torch.Tensor:
    """Symmetric round-to-nearest (absmax) quantize-dequantize, one scale per slice along ``dim`` (Chapter 7).

    Every slice of ``weight`` along ``dim`` (a row of a ``[out, in]`` matrix for
    ``dim=-1``: one output channel) gets ``scale = max|w| / (2**(bits-1) - 1)``; each
    value becomes ``round(w / scale) * scale`` with the integer clamped to
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, so a slice holds at most ``2**bits - 1``
    distinct values and every value moves by at most ``scale / 2``. An all-zero slice
    stays zero. Computed in float32, returned in ``weight``'s dtype (whose own rounding
    adds to the error in half precision); ``weight`` is not modified.
    """
    bits = _check_bits(bits)
    if not isinstance(weight, torch.Tensor) or not torch.is_floating_point(weight) or weight.dim() < 1:
        raise ValueError("weight must be a floating-point tensor with at least one dimension")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = w.abs().amax(dim=dim, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe).clamp_(-qmax, qmax)
    return (q * safe).to(weight.dtype)


def _experts_transposed(experts: nn.Module) -> bool:
    """Whether fused expert tensors are ``[E, in, out]`` (used as ``x @ W``) rather than ``[E, out, in]``."""
    flag = getattr(experts, "is_transposed", None)
    if flag is not None:
        return bool(flag)
    return hasattr(experts, "expert_dim")  # Llama-4's experts multiply x @ W


def quantization_targets(model: nn.Module, what: Sequence[str] = ("experts", "rest")) -> dict[str, int]:
    """The weights :func:`quantized` rounds for the groups ``what``, with the dimension each row's scale is taken over.

    Returns ``{parameter name: dim}``; ``dim`` is the input dimension, so each *output
    channel* gets its own scale. The groups:

    * ``"experts"``: the routed experts. In transformers 5 each MoE layer stores them as
      fused 3-D tensors (``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``), which
      quantizers looking for ``nn.Linear`` modules skip; here they are rounded per expert
      and per output row (per column for families that store ``[E, in, out]``). Expert
      biases are left alone. Experts kept as one module each: their ``nn.Linear`` weights.
    * ``"routers"``: each MoE layer's router weight (one row per expert). Not part of
      ``"rest"``: common quantizers keep routers in full precision, and the routing
      attack studies routing on its own.
    * ``"rest"``: every other ``nn.Linear`` weight (attention, shared experts and their
      gates, dense MLP layers), except the output embedding.
    * ``"embeddings"``: the input embedding matrix and the output embedding (LM head),
      per token row.

    Norms and biases are never rounded.
    """
    if isinstance(what, str):
        what = (what,)
    what = tuple(what)
    unknown = [w for w in what if w not in QUANT_GROUPS]
    if not what or unknown:
        raise ValueError(f"what must be a non-empty tuple of groups from {QUANT_GROUPS}, got {what!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[str, dict[int, int]] = {g: {} for g in QUANT_GROUPS}
    try:
        layers = find_moe_layers(model)
    except NoMoELayersError:
        layers = []
    if "experts" in what and not layers:
        raise ValueError(
            f"{type(model).__name__} has no routed experts to quantize: drop 'experts' from what"
        )
    inside_experts: set[int] = set()
    inside_router: set[int] = set()
    for lay in layers:
        if lay.fused:
            if trained_rows(lay.experts) is not None:
                raise ValueError(
                    f"layer {lay.layer_index}'s experts carry trained rows (uoe_nb.trainable): remove them "
                    "(TrainableSelection.remove) before quantizing"
                )
            dim = -2 if _experts_transposed(lay.experts) else -1
            for p in lay.experts.parameters(recurse=False):
                inside_experts.add(id(p))
                if p.dim() == 3:
                    groups["experts"][id(p)] = dim
        else:
            for module in lay.experts.modules():
                for p in module.parameters(recurse=False):
                    inside_experts.add(id(p))
                if isinstance(module, nn.Linear):
                    groups["experts"][id(module.weight)] = -1
        for p in lay.router.parameters():  # the router's weight (an inner nn.Linear counts as the router too)
            inside_router.add(id(p))
            if p.dim() == 2:
                groups["routers"][id(p)] = -1
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None) if module is not None else None
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            groups["embeddings"][id(weight)] = -1
    taken = inside_experts | inside_router | set(groups["embeddings"])
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in taken:
            groups["rest"][id(module.weight)] = -1
    chosen: dict[str, int] = {}
    for group in what:
        for pid, dim in groups[group].items():
            chosen[names[pid]] = dim
    return chosen


@contextlib.contextmanager
def quantized(model: nn.Module, bits: int, what: Sequence[str] = ("experts", "rest")) -> Iterator[list[str]]:
    """Within the block, the weights of the groups ``what`` are rounded to ``bits`` bits (Chapter 7).

    Each weight of :func:`quantization_targets` is replaced in place by
    :func:`quantize_dequantize` of itself; the block receives the list of rounded
    parameter names. On exit, exception or not, those weights get their exact values back
    (copies kept in host memory).
    """
    bits = _check_bits(bits)
    targets = quantization_targets(model, what)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().to("cpu", copy=True) for n in targets}
    try:
        with torch.no_grad():
            for n, dim in targets.items():
                params[n].copy_(quantize_dequantize(params[n], bits, dim=dim))
        yield list(targets)
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


@dataclass
class QuantizationResult:
    """Forget accuracy (and utility) at full precision and after rounding to each bit width (Chapter 7).

    ``forget[bits]`` / ``utility[bits]``: accuracy with the groups ``what`` rounded to
    ``bits`` bits; ``utility`` is empty when no utility items were given.
    ``relative_error[bits]``: ``||W_q - W|| / ||W||`` over all rounded weights together.
    ``tensors``: how many weights were rounded.
    """

    what: tuple[str, ...]
    forget_full: float
    forget: dict[int, float]
    utility_full: float | None
    utility: dict[int, float]
    relative_error: dict[int, float]
    tensors: int
    name: str = "quant"

    def as_row(self, **extra: Any) -> dict[str, Any]:
        row = {**extra, f"{self.name}: FA full": self.forget_full}
        row.update({f"{self.name}: FA {b}-bit": v for b, v in self.forget.items()})
        if self.utility_full is not None:
            row[f"{self.name}: UT full"] = self.utility_full
            row.update({f"{self.name}: UT {b}-bit": v for b, v in self.utility.items()})
        return row


def quantization_attack(
    model: nn.Module,
    tokenizer: Any,
    forget_items: Sequence[Mapping[str, Any]],
    utility_items: Sequence[Mapping[str, Any]] | None = None,
    *,
    bits: Sequence[int] = QUANT_BITS,
    what: Sequence[str] = ("experts", "rest"),
    batch_size: int = 64,
    name: str = "quant",
) -> QuantizationResult:
    """Quantization attack: FA (and UT) at full precision and with the weights rounded to each of ``bits`` (Chapter 7).

    Rounds the groups ``what`` (:func:`quantization_targets`) by symmetric
    per-output-channel round-to-nearest (:func:`quantized`), scores ``forget_items``
    (and ``utility_items``) through lm-eval, and restores the weights bitwise before the
    next width and at the end. Deterministic (no randomness involved).
    """
    _check_item_list("forget_items", forget_items)
    if utility_items is not None:
        _check_item_list("utility_items", utility_items)
    if isinstance(bits, int):
        bits = (bits,)
    bits = tuple(_check_bits(b) for b in bits)
    if not bits:
        raise ValueError(f"bits is empty: give widths from {QUANT_BITS}")
    _check_positive_int("batch_size", batch_size)
    what = (what,) if isinstance(what, str) else tuple(what)
    targets = quantization_targets(model, what)  # validates what before any scoring

    def score() -> tuple[float, float | None]:
        fa = _accuracy(model, tokenizer, forget_items, "quant_forget", batch_size).accuracy
        ut = (
            _accuracy(model, tokenizer, utility_items, "quant_utility", batch_size).accuracy
            if utility_items
            else None
        )
        return fa, ut

    fa_full, ut_full = score()
    params = dict(model.named_parameters())
    forget, utility, error = {}, {}, {}
    for b in progress(bits, desc="quantization"):
        with quantized(model, b, what):
            fa, ut = score()
        forget[b] = fa
        if ut is not None:
            utility[b] = ut
        num = den = 0.0
        for n, dim in targets.items():
            w = params[n].detach().float()
            num += float((quantize_dequantize(params[n], b, dim=dim).float() - w).pow(2).sum())
            den += float(w.pow(2).sum())
        error[b] = math.sqrt(num / den) if den > 0 else 0.0
    return QuantizationResult(what, fa_full, forget, ut_full, utility, error, len(targets), name)


# --------------------------------------------------------------------------- 3. routing


class _EditRouterLogits(TorchFunctionMode):
    """Edits the first ``F.linear`` output with ``num_experts`` columns (the router logits) while active."""

    def __init__(self, num_experts: int, expert: int, mode: str, margin: float):
        super().__init__()
        self.num_experts, self.expert, self.mode, self.margin = num_experts, expert, mode, margin
        self.edits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func is F.linear
            and self.edits == 0
            and isinstance(out, torch.Tensor)
            and out.dim() >= 1
            and out.shape[-1] == self.num_experts
        ):
            self.edits += 1
            out = self._edit(out)
        return out

    def _edit(self, logits: torch.Tensor) -> torch.Tensor:
        e = self.expert
        edited = logits.clone()
        if self.mode == "avoid":
            edited[..., e] = -math.inf
            return edited
        others = logits.clone()
        others[..., e] = -math.inf
        edited[..., e] = torch.maximum(logits[..., e], others.amax(dim=-1) + self.margin)
        return edited


def _top_k_index(output: Any, top_k: int) -> torch.Tensor | None:
    """The selected-expert index a router returned, if it returns one (an integer tensor ``[..., top_k]``)."""
    if isinstance(output, torch.Tensor):
        return None
    for t in tuple(output):
        if (
            isinstance(t, torch.Tensor)
            and not torch.is_floating_point(t)
            and t.dim() >= 1
            and t.shape[-1] == top_k
        ):
            return t
    return None


@contextlib.contextmanager
def routing_patch(
    model: nn.Module, layer: int, expert: int, mode: str, *, margin: float = 0.01
) -> Iterator[MoELayer]:
    """Within the block, decoder layer ``layer``'s router always (``"force"``) or never (``"avoid"``) selects ``expert`` (Chapter 7).

    ``"avoid"`` sets the expert's router logit to ``-inf``: its score is 0 and the top-k
    takes the next expert. ``"force"`` raises the expert's logit to the largest logit of
    the other experts plus ``margin`` (where it is not already higher), so it becomes the
    token's first choice with about the weight the first choice had, and the
    ``top_k - 1`` best other experts stay selected. Scoring, top-k and any
    renormalisation are the family's own, run on the edited logits.

    Where the edit happens: in transformers 5 the routers of the zoo's families
    (Qwen2-MoE, DeepSeek-V2, Mixtral) compute their logits *and* their top-k in one
    forward and return ``(logits, top_k_weights, top_k_index)``, so a forward hook on
    the router would only see a selection already made. The router's forward is
    therefore wrapped, for the block only, in a torch function mode that edits the
    output of the router's first ``F.linear`` with one column per expert (its logits),
    before softmax and top-k. A router that returns logits only (the block does the
    top-k) is edited the same way. After every call the returned selection is checked,
    and a router whose logits do not come from ``F.linear``, or whose selection did not
    obey, raises an error instead of measuring something else. Checked on every family
    of :data:`uoe_nb.moe.SUPPORTED_FAMILIES`: all obey, except that DeepSeek-V3's
    group-limited routing (experts chosen within the best groups, scores shifted by a
    correction bias) can refuse ``"force"``, which then raises.

    Yields the :class:`uoe_nb.moe.MoELayer`. Raises :class:`IndexError` for a layer
    without routed experts or an expert out of range, :class:`ValueError` for an unknown
    mode or ``"avoid"`` in a layer with no more experts than its top-k.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive finite number, got {margin!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be a decoder-layer index (int), got {layer!r}")
    lay = moe_layer(model, layer)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < lay.num_experts:
        raise IndexError(
            f"expert {expert!r} is out of range for layer {layer}, which has {lay.num_experts} experts "
            f"(0..{lay.num_experts - 1})"
        )
    if mode == "avoid" and lay.num_experts - 1 < lay.top_k:
        raise ValueError(
            f"layer {layer} routes each token to {lay.top_k} of {lay.num_experts} experts: "
            "no expert can be avoided"
        )
    router = lay.router
    if "forward" in vars(router):
        raise RuntimeError(
            f"the router of layer {layer} is already patched: nest routing patches on different layers only"
        )
    original = router.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        edit = _EditRouterLogits(lay.num_experts, expert, mode, float(margin))
        with edit:
            output = original(*args, **kwargs)
        if edit.edits == 0:
            raise NotImplementedError(
                f"{type(router).__name__} (layer {layer}) computed no F.linear with {lay.num_experts} outputs: "
                "cannot find its router logits to patch"
            )
        index = _top_k_index(output, lay.top_k)
        if index is not None:
            chosen = (index == expert).any(dim=-1)
            if mode == "force" and not bool(chosen.all()):
                raise RuntimeError(
                    f"layer {layer}'s router did not select expert {expert} for every token despite the patch; "
                    "raise margin (group-limited routing or a score-correction bias can outvote it)"
                )
            if mode == "avoid" and bool(chosen.any()):
                raise RuntimeError(f"layer {layer}'s router still selected expert {expert} despite the patch")
        return output

    router.forward = forward
    try:
        yield lay
    finally:
        del router.forward


@dataclass
class RoutingResult:
    """Forget accuracy (and utility) with the router patched to force or avoid one expert (Chapter 7).

    Keys of ``forget``, ``utility`` and ``selected``: ``"none"`` (unpatched) and each
    mode run. ``selected[mode]``: the share of the forget prompts' tokens for which layer
    ``layer`` selected ``expert`` (1 under ``"force"``, 0 under ``"avoid"``; the
    unpatched share says how much the forget domain used it).
    """

    layer: int
    expert: int
    forget: dict[str, float]
    utility: dict[str, float]
    selected: dict[str, float]
    name: str = "routing"

    def as_row(self, **extra: Any) -> dict[str, Any]:
        row = dict(extra)
        for mode, fa in self.forget.items():
            row[f"{self.name}: FA {mode}"] = fa
        for mode, ut in self.utility.items():
            row[f"{self.name}: UT {mode}"] = ut
        row[f"{self.name}: expert share none"] = self.selected.get("none")
        return row


@torch.no_grad()
def _expert_share(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    layer: int,
    expert: int,
    batch_size: int,
) -> float:
    """Share of the multiple-choice prompts' real tokens whose top-k at ``layer`` includes ``expert``."""
    prompts = [MC_PROMPT.format(question=item["question"]) for item in items]
    hits = total = 0
    was_training = model.training
    model.eval()
    try:
        with _right_padding(tokenizer):
            encoded = list(batches(tokenizer, prompts, batch_size=batch_size, device=_device(model)))
        for batch in encoded:
            with capture_routing(model, [layer]) as cap:
                model(**batch, use_cache=False)
            for rec in cap[layer]:
                sel = rec.selected()[..., expert]
                hits += int(sel.sum())
                total += int(rec.mask.sum())
    finally:
        model.train(was_training)
    return hits / total if total else math.nan


def routing_attack(
    model: nn.Module,
    tokenizer: Any,
    forget_items: Sequence[Mapping[str, Any]],
    *,
    layer: int,
    expert: int,
    modes: Sequence[str] = ROUTING_MODES,
    utility_items: Sequence[Mapping[str, Any]] | None = None,
    margin: float = 0.01,
    batch_size: int = 64,
    name: str = "routing",
) -> RoutingResult:
    """Routing attack: FA (and UT) unpatched and with layer ``layer`` forced to / kept from ``expert`` (Chapter 7).

    For GA+UOE, ``(layer, expert)`` is the unlearned expert: ``"avoid"`` sends the forget
    domain's tokens to the experts that were not unlearned, ``"force"`` sends every token
    through the unlearned one. Each mode runs inside :func:`routing_patch`; the share of
    forget-prompt tokens routed to the expert is measured in each setting. The model's
    weights are never changed. Deterministic.
    """
    _check_item_list("forget_items", forget_items)
    if utility_items is not None:
        _check_item_list("utility_items", utility_items)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in ROUTING_MODES]
    if not modes or bad:
        raise ValueError(f"modes must be a non-empty tuple from {ROUTING_MODES}, got {modes!r}")
    _check_positive_int("batch_size", batch_size)
    with routing_patch(model, layer, expert, modes[0], margin=margin):
        pass  # validates layer, expert, mode and margin before anything is scored
    forget, utility, selected = {}, {}, {}
    for mode in progress(("none", *modes), desc="routing"):
        patch = (
            contextlib.nullcontext()
            if mode == "none"
            else routing_patch(model, layer, expert, mode, margin=margin)
        )
        with patch:
            forget[mode] = _accuracy(model, tokenizer, forget_items, "routing_forget", batch_size).accuracy
            if utility_items is not None:
                utility[mode] = _accuracy(
                    model, tokenizer, utility_items, "routing_utility", batch_size
                ).accuracy
            selected[mode] = _expert_share(model, tokenizer, forget_items, layer, expert, batch_size)
    return RoutingResult(layer, expert, forget, utility, selected, name)


# --------------------------------------------------------------------------- 4. probing


@dataclass
class ProbeData:
    """Prompts and labels for a linear probe of one kind of fact (:func:`probe_data`).

    ``train_*`` are facts that were *not* the unlearning target, ``test_*`` the forgotten
    ones. ``*_attributes`` name each example's attribute; ``candidates[attribute]`` are
    the values that attribute takes in the world (the probe chooses among them).
    """

    train_prompts: list[str]
    train_labels: list[str]
    train_attributes: list[str]
    test_prompts: list[str]
    test_labels: list[str]
    test_attributes: list[str]
    candidates: dict[str, list[str]]
    description: str


def probe_data(
    world: TinyWorld,
    *,
    domain: str = "people",
    attributes: Sequence[str] | None = None,
    seed: int = 0,
) -> ProbeData:
    """Probe prompts and labels from the tiny world (Chapter 7).

    ``domain="people"`` (the design): the RWKU-like people's attributes (``city``,
    ``profession``, ``instrument``, ``pet``). The probe trains on the *neighbours'* facts
    (people that are not forget targets, with the same attribute types) and is tested
    on the *forget targets'*. Each fact is asked with both of the world's prompts, the
    fill-in-the-blank (level 1) and the question (level 2), in RWKU's prompt
    (:func:`uoe_nb.evaluation.probe_prompt`), the form the zoo was pretrained on, ending
    in ``Answer:`` just before the answer. The probe's label is the attribute's value.

    ``domain="crystals"``: the forget domain itself (``colour``, ``mine``, ``hazard``,
    ``use``), asked with the multiple-choice prompt (:data:`uoe_nb.evaluation.MC_PROMPT`).
    There are no non-forget crystals, so the probe trains on the held-in half of
    :func:`split_forget_facts` (``seed``) and is tested on the held-out half: both are
    forget facts, and a high test accuracy says the hidden states still encode them.

    Only 8 neighbours exist in the zoo's world, so some targets' values never occur in
    training; :class:`LinearProbeResult` reports that coverage next to the accuracies.
    """
    if not isinstance(world, TinyWorld):
        raise TypeError(f"world must be a uoe_nb.world.TinyWorld, got {type(world).__name__}")
    if domain not in PROBE_DOMAINS:
        raise ValueError(f"domain must be one of {PROBE_DOMAINS}, got {domain!r}")
    allowed = _PEOPLE_ATTRIBUTES if domain == "people" else _CRYSTAL_ATTRIBUTES
    attributes = (
        allowed
        if attributes is None
        else ((attributes,) if isinstance(attributes, str) else tuple(attributes))
    )
    bad = [a for a in attributes if a not in allowed]
    if not attributes or bad:
        raise ValueError(
            f"attributes of domain {domain!r} must be a non-empty tuple from {allowed}, got {attributes!r}"
        )
    if domain == "people":
        candidates = {a: sorted({p[a] for p in world.people}) for a in attributes}

        def rows(probes):
            chosen = [p for p in probes if p.get("attribute") in attributes]
            return (
                [probe_prompt(p) for p in chosen],
                [p["answer"] for p in chosen],
                [p["attribute"] for p in chosen],
            )

        train, test = rows(world.neighbor_probes), rows(world.forget_probes)
        description = "people: trained on the neighbours' facts, tested on the forget targets'"
    else:
        candidates = {a: sorted({c[a] for c in world.crystals}) for a in attributes}
        split = split_forget_facts(world, seed=seed)

        def rows(items):
            chosen = [q for q in items if q.get("attribute") in attributes]
            prompts = [MC_PROMPT.format(question=q["question"]) for q in chosen]
            return prompts, [q["choices"][q["answer"]] for q in chosen], [q["attribute"] for q in chosen]

        train, test = rows(split.held_in_items), rows(split.held_out_items)
        description = f"crystals: trained on the held-in half (seed {seed}), tested on the held-out half"
    if not train[0] or not test[0]:
        raise ValueError(f"no {domain} facts with attributes {attributes} found in this world")
    return ProbeData(*train, *test, candidates=candidates, description=description)


def hidden_features(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    layer: int = -1,
    pooling: str = "last",
    batch_size: int = 32,
) -> torch.Tensor:
    """One vector per prompt: decoder layer ``layer``'s output at the last real token, or its mean over the tokens (Chapter 7).

    ``layer`` indexes the decoder layers (``-1``: the last, taken before the final norm,
    :func:`uoe_nb.fastpath.hidden_after_layer`). ``pooling="last"`` takes the last
    non-padding token, ``"mean"`` averages the non-padding tokens. Batches are padded on
    the right whatever the tokenizer's setting (restored afterwards), so each prompt's
    vector is the one it has alone.
    Returns a float32 ``[len(prompts), hidden]`` tensor on the CPU; the model's mode is restored.
    """
    if pooling not in PROBE_POOLINGS:
        raise ValueError(f"pooling must be one of {PROBE_POOLINGS}, got {pooling!r}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    _check_positive_int("batch_size", batch_size)
    _, layers = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
        raise IndexError(f"layer {layer!r} is out of range: the model has {len(layers)} decoder layers")
    index = layer % len(layers)
    out = []
    was_training = model.training
    model.eval()
    try:
        with _right_padding(tokenizer):
            encoded = list(batches(tokenizer, list(prompts), batch_size=batch_size, device=_device(model)))
        with torch.no_grad():
            for batch in encoded:
                hidden = hidden_after_layer(model, batch, index).float()
                mask = batch["attention_mask"].to(hidden.device)
                if pooling == "last":
                    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
                    out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].cpu())
                else:
                    weights = mask.to(hidden.dtype).unsqueeze(-1)
                    out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class LinearProbeResult:
    """How well a linear probe reads the attribute from hidden states (Chapter 7).

    ``train_accuracy`` on the training facts, ``test_accuracy`` on the forgotten ones
    (``test_by_attribute`` per attribute). ``chance``: the mean over test examples of
    ``1 / candidates`` (uniform guessing among the attribute's values). ``majority``:
    test accuracy of always answering each attribute's most common training value.
    ``coverage``: the share of test examples whose value occurs in training at all (an
    upper bound on what the probe can get right). ``test_predictions``: the value the
    probe reads for each test example.
    """

    train_accuracy: float
    test_accuracy: float
    test_by_attribute: dict[str, float]
    chance: float
    majority: float
    coverage: float
    n_train: int
    n_test: int
    layer: int
    pooling: str
    test_predictions: list[str] = field(default_factory=list, repr=False)
    name: str = "probe"

    def as_row(self, **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            f"{self.name}: train acc": self.train_accuracy,
            f"{self.name}: test acc": self.test_accuracy,
            f"{self.name}: chance": self.chance,
            f"{self.name}: majority": self.majority,
            f"{self.name}: coverage": self.coverage,
        }


def probe_attack(
    model: nn.Module,
    tokenizer: Any,
    data: ProbeData,
    *,
    layer: int = -1,
    pooling: str = "last",
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-2,
    batch_size: int = 32,
    name: str = "probe",
) -> LinearProbeResult:
    """Probing attack: accuracy of a linear probe for the attribute, trained on other facts and tested on the forgotten ones (Chapter 7).

    Features are :func:`hidden_features` of each prompt, standardised with the training
    set's mean and standard deviation. The probe is multinomial logistic regression over
    all ``(attribute, value)`` classes, with each example's logits restricted to its own
    attribute's values (so recognising the question type is worth nothing and chance is
    ``1 / candidates``). It is trained full-batch with Adam for ``steps`` steps on the
    mean cross-entropy plus ``weight_decay * ||W||^2``, from zero weights: a convex
    problem with no random draw, hence deterministic. The model is not changed.
    """
    if not isinstance(data, ProbeData):
        raise TypeError(f"data must be a ProbeData (see probe_data), got {type(data).__name__}")
    _check_positive_int("steps", steps)
    if not lr > 0 or weight_decay < 0:
        raise ValueError(
            f"lr must be positive and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}"
        )
    classes = [(a, v) for a in sorted(data.candidates) for v in data.candidates[a]]
    index = {c: i for i, c in enumerate(classes)}

    def targets(labels: list[str], attrs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [(a, v) for a, v in zip(attrs, labels, strict=True) if (a, v) not in index]
        if missing:
            raise ValueError(f"labels {missing[:3]} are not among the candidates of their attribute")
        y = torch.tensor([index[(a, v)] for a, v in zip(attrs, labels, strict=True)])
        allowed = torch.tensor([[c[0] == a for c in classes] for a in attrs])
        return y, allowed

    y_train, allowed_train = targets(data.train_labels, data.train_attributes)
    y_test, allowed_test = targets(data.test_labels, data.test_attributes)
    x_train = hidden_features(
        model, tokenizer, data.train_prompts, layer=layer, pooling=pooling, batch_size=batch_size
    )
    x_test = hidden_features(
        model, tokenizer, data.test_prompts, layer=layer, pooling=pooling, batch_size=batch_size
    )
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    weight = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)

    def logits(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return (x @ weight + bias).masked_fill(~allowed, -math.inf)

    with torch.enable_grad():
        for _ in progress(range(steps), desc="probe"):
            loss = (
                F.cross_entropy(logits(x_train, allowed_train), y_train) + weight_decay * weight.pow(2).sum()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_ok = logits(x_train, allowed_train).argmax(-1) == y_train
        test_pred = logits(x_test, allowed_test).argmax(-1)
        test_ok = test_pred == y_test
    by_attribute = {
        a: float(test_ok[[i for i, t in enumerate(data.test_attributes) if t == a]].float().mean())
        for a in sorted(set(data.test_attributes))
    }
    seen = Counter(zip(data.train_attributes, data.train_labels, strict=True))
    # each attribute's most common training value; a tie goes to the first in sorted order
    most_common = {a: max(values, key=lambda v, a=a: seen[(a, v)]) for a, values in data.candidates.items()}
    pairs = list(zip(data.test_attributes, data.test_labels, strict=True))
    n = len(pairs)
    _, layers = decoder_layers(model)
    return LinearProbeResult(
        train_accuracy=float(train_ok.float().mean()),
        test_accuracy=float(test_ok.float().mean()),
        test_by_attribute=by_attribute,
        chance=sum(1 / len(data.candidates[a]) for a, _ in pairs) / n,
        majority=sum(most_common[a] == v for a, v in pairs) / n,
        coverage=sum(seen[(a, v)] > 0 for a, v in pairs) / n,
        n_train=len(data.train_labels),
        n_test=n,
        layer=layer % len(layers),
        pooling=pooling,
        test_predictions=[classes[i][1] for i in test_pred.tolist()],
        name=name,
    )


# --------------------------------------------------------------------------- running attacks


def run_attacks(
    models: Mapping[str, nn.Module | Callable[[], contextlib.AbstractContextManager[nn.Module]]],
    attacks: Sequence[Callable[[nn.Module], Any]],
):
    """Run every attack on every model; one row per model, one column per measured number (Chapter 7).

    ``models`` maps a name to a model, or to a function that returns a context manager
    yielding the model (for example one that applies an unlearning patch for the
    duration and reverts it). Each attack is called with the model and returns a result
    with ``as_row()`` (the results of this module; bind their other arguments with
    ``functools.partial``) or a mapping of column to value. Returns a pandas DataFrame
    indexed by model name; two attacks that report the same column raise an error (give
    them different ``name`` arguments).
    """
    import pandas as pd

    if not isinstance(models, Mapping) or not models:
        raise ValueError(
            "models must be a non-empty mapping of name to model (or to a context-manager factory)"
        )
    attacks = list(attacks)
    if not attacks or not all(callable(a) for a in attacks):
        raise ValueError("attacks must be a non-empty list of callables taking a model")
    rows = []
    for name, source in progress(models.items(), desc="attacks", total=len(models)):
        context = contextlib.nullcontext(source) if isinstance(source, nn.Module) else source()
        row: dict[str, Any] = {}
        with context as model:
            if not isinstance(model, nn.Module):
                raise TypeError(f"models[{name!r}] gave a {type(model).__name__}, not a torch model")
            for attack in attacks:
                result = attack(model)
                values = result.as_row() if hasattr(result, "as_row") else result
                if not isinstance(values, Mapping):
                    raise TypeError(
                        f"an attack returned {type(result).__name__}: expected as_row() or a mapping"
                    )
                clash = sorted(set(values) & set(row))
                if clash:
                    raise ValueError(
                        f"two attacks report the columns {clash}: give them different name= arguments"
                    )
                row.update(values)
        rows.append({"model": name, **row})
    return pd.DataFrame(rows).set_index("model")


# --------------------------------------------------------------------------- tables and figures


def attack_columns(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """One attack's columns of a :func:`run_attacks` table, without their ``"name: "`` prefix (Chapter 7).

    ``name`` is the attack's ``name`` argument (``"relearn"``, ``"quant"``, ``"routing"``,
    ``"probe"`` by default). Raises :class:`KeyError` naming the attacks the table has when
    none of its columns belongs to ``name``.
    """
    prefix = f"{name}: "
    columns = [c for c in table.columns if isinstance(c, str) and c.startswith(prefix)]
    if not columns:
        found = sorted({c.split(": ", 1)[0] for c in table.columns if isinstance(c, str) and ": " in c})
        raise KeyError(f"the table has no columns of attack {name!r}; its attacks are {found}")
    return table[columns].rename(columns=lambda c: c[len(prefix) :])


def attack_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every attack's columns of a :func:`run_attacks` table, keyed by attack name, prefixes dropped (Chapter 7).

    Columns without a ``"name: "`` prefix (from attacks that return plain mappings) are
    left out. The attacks keep the order of their first column.
    """
    names = dict.fromkeys(c.split(": ", 1)[0] for c in table.columns if isinstance(c, str) and ": " in c)
    return {name: attack_columns(table, name) for name in names}


def forget_accuracy_table(
    table: pd.DataFrame, *, relearn: str = "relearn", quant: str = "quant", routing: str = "routing"
) -> pd.DataFrame:
    """Forget accuracy of every model without and under each attack, one column per setting (Chapter 7).

    From a :func:`run_attacks` table with the attacks named ``relearn``, ``quant`` and
    ``routing`` (any of them may be missing): ``"no attack"`` (the quantization attack's
    full-precision FA, else the unpatched routing FA), ``"<b>-bit"`` for each width,
    ``"expert forced"`` / ``"expert avoided"`` for each routing mode, and
    ``"held-out"`` / ``"held-out, relearned"`` (FA on the relearning split's held-out
    facts before and after relearning; a different question set from the others).
    """
    import pandas as pd

    present = {
        n
        for n in (relearn, quant, routing)
        if any(isinstance(c, str) and c.startswith(f"{n}: ") for c in table.columns)
    }
    if not present:
        raise KeyError(
            f"the table has no columns of the attacks {relearn!r}, {quant!r} or {routing!r}: "
            "name them as in run_attacks"
        )
    out = pd.DataFrame(index=table.index)
    if quant in present:
        cols = attack_columns(table, quant)
        out["no attack"] = cols["FA full"]
        for c in cols.columns:
            if c.startswith("FA ") and c.endswith("-bit"):
                out[c[3:]] = cols[c]
    if routing in present:
        cols = attack_columns(table, routing)
        if "no attack" not in out:
            out["no attack"] = cols["FA none"]
        for mode, label in (("force", "expert forced"), ("avoid", "expert avoided")):
            if f"FA {mode}" in cols:
                out[label] = cols[f"FA {mode}"]
    if relearn in present:
        cols = attack_columns(table, relearn)
        out["held-out"] = cols["FA held-out before"]
        out["held-out, relearned"] = cols["FA held-out after"]
    return out


def plot_attacks(
    table: pd.DataFrame,
    *,
    relearn: str = "relearn",
    quant: str = "quant",
    routing: str = "routing",
    probe: str = "probe",
    chance: float | None = 0.25,
    title: str | None = None,
):
    """Forget accuracy under every attack, one bar per model, and the probe's accuracy beside it (Chapter 7).

    The left panel groups the settings of :func:`forget_accuracy_table`, one bar per model
    in each group, with a dotted line at ``chance``; the right panel (only when the table
    has a probing attack named ``probe``) shows each model's probe accuracy on the
    forgotten facts with its chance level. Returns the figure.
    """
    import matplotlib.pyplot as plt

    fa = forget_accuracy_table(table, relearn=relearn, quant=quant, routing=routing)
    has_probe = any(isinstance(c, str) and c.startswith(f"{probe}: ") for c in table.columns)
    widths = [max(3.0, 1.1 * len(fa.columns)), 2.4] if has_probe else [max(3.0, 1.1 * len(fa.columns))]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(sum(widths) + 1.0, 4.0), gridspec_kw={"width_ratios": widths}, squeeze=False
    )
    ax = axes[0, 0]
    n = len(fa.index)
    width = 0.8 / max(n, 1)
    x = list(range(len(fa.columns)))
    for i, model in enumerate(fa.index):
        ax.bar([p - 0.4 + (i + 0.5) * width for p in x], fa.loc[model].tolist(), width, label=str(model))
    ax.set_xticks(x)
    ax.set_xticklabels(list(fa.columns), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("forget accuracy (multiple choice)")
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.legend(fontsize=7, ncol=n + 1, loc="upper center")
    if title:
        ax.set_title(title, fontsize=10)
    if has_probe:
        cols = attack_columns(table, probe)
        pax = axes[0, 1]
        pax.bar(range(n), cols["test acc"].tolist(), color=[f"C{i}" for i in range(n)])
        pax.scatter(
            range(n), cols["chance"].tolist(), marker="_", s=300, color="black", label="chance", zorder=3
        )
        pax.set_xticks(range(n))
        pax.set_xticklabels([str(m) for m in fa.index], rotation=30, ha="right", fontsize=8)
        pax.set_ylabel("probe accuracy on the forgotten facts")
        pax.set_ylim(0, 1)
        pax.set_title("linear probe", fontsize=10)
        pax.legend(fontsize=7)
    fig.tight_layout()
    return fig
