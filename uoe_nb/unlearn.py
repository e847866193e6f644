"""One training entry point for every unlearning method and scope (Chapters 2, 4-6).

``unlearn(model, forget, retain, config, tokenizer=...)`` minimises the paper's Eq. 4,

    forget_loss + retain_weight * retain_loss + anchor_weight * anchor_loss
    (        l_f + lambda        * l_r         + alpha         * L_anchor      )

over the parameters a :mod:`uoe_nb.scopes` scope unfreezes, and monitors what the
paper plots while it runs: forget loss, forget and utility accuracy, expert-selection
overlap with the original model per layer on forget and retain text (Fig. 3a, 4, 5),
and the shift of token proportions (Fig. 6).

Checkpoint choice. The paper keeps "the checkpoint with the best balance between
unlearning efficacy and utility". We score an evaluated checkpoint by

    balance = (FA_0 - max(FA, chance)) - max(0, UT_0 - UT)

(forget-accuracy drop, counted only down to chance (``chance_accuracy``, 0.25 for 4-way
multiple choice: a model below chance has not forgotten better, it answers against the
truth), minus utility drop, with ``_0`` the original model), and keep the
checkpoint with the highest balance; when ``stop_forget_accuracy`` is set, checkpoints
that reached it are preferred over those that did not, and among them the one with
the highest utility wins.

Frozen references (NPO's reference log-likelihoods, GradDiff's KL targets, RMU's
frozen activations, the retain-router term) are computed once per batch before the
first update, from the original model in eval mode, so no copy of the original weights
is kept. The references of the retain side (KL targets, frozen activations) are kept off
the accelerator and moved in per step.

Memory. Only what trains has gradients and optimizer state: a scope's trained experts
are parameters of their own (:mod:`uoe_nb.trainable`); in a bf16/fp16 model they (and
the trained routers) are optimised as fp32 master copies (``master_weights``), and
whole-model runs follow the model's dtype unless ``master_weights=True``. Gradients are
checked for finiteness before an update (a bad step is never applied, so no per-step
copy is needed). The best checkpoint is copied off the accelerator (CPU memory, or a
temporary file when it does not fit there) only when a new best is found. A finished run
holds no gradients, no optimizer state and no trained-row wrappers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import objectives, stability
from .attribution import expert_affinity
from .evaluation import PARTS, world_evaluator
from .fastpath import LayerInputCache, forward_from_layer, hidden_after_layer, stop_after_layer
from .moe import capture_routing, find_moe_layers, moe_layer
from .progress import progress
from .routing import batches as make_batches
from .scopes import LoraSelection, Scope, ScopeResult, apply_scope
from .trainable import MasterWeights

__all__ = [
    "METHODS",
    "PARTS",
    "StepRecord",
    "UnlearnConfig",
    "UnlearnResult",
    "takes_parts",
    "unlearn",
    "world_evaluator",
]

log = logging.getLogger(__name__)

METHODS = ("ga", "graddiff", "npo", "simnpo", "rmu")
_RETAIN_METHODS = ("graddiff", "npo", "simnpo", "rmu")  # methods with a retain term


def _trains_router(scope: Scope) -> bool:
    """Whether a scope can train a router (LoRA's adapters are not a router update GRIP can project)."""
    if scope.kind in ("full", "routers", "experts_and_routers"):
        return True
    if scope.kind in ("experts", "rmu", "lora"):
        return False
    return bool(scope.include_router)


@dataclass
class UnlearnConfig:
    """Everything a run needs besides the model and data.

    ``anchor_weight`` is the paper's alpha, ``retain_weight`` its lambda. Every router
    the scope trains is anchored to the expert the scope trains in that layer (to the
    attributed target where it trains several) unless ``anchor_weight`` is 0.
    ``anchor_reduction="sum"`` is the paper's Eq. 3 (the released code's ``mse_loss`` is
    ``"mean"``, i.e. alpha divided by the number of experts).

    Two other ways to keep routing stable (Chapter 9, :mod:`uoe_nb.stability`), both off by
    default: ``grip=True`` (GRIP, Zhu et al. 2026) keeps every trained router's change in the
    null space of its inputs on the first ``grip_docs`` retain documents (the subspace holding
    ``grip_energy`` of their energy), so it needs a scope that trains a router and a retain set;
    ``trace=True`` (TRACE, Xie et al. 2026) weights the retain loss token by token so that each
    forget-critical expert (forget frequency above ``trace_ratio`` times retain frequency, among
    the experts the scope trains) is as frequent on retain as on forget text, weights cut at
    ``trace_max_weight`` times the mean, so it needs a method with a retain term.
    """

    method: str = "ga"
    scope: Scope | str = "uoe"
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 4
    max_length: int = 128
    anchor_weight: float = 1.0
    anchor_reduction: str = "sum"
    retain_weight: float = 1.0
    retain_loss: str = "nll"  # "nll" or "kl" (GradDiff / NPO / SimNPO retain term)
    kl_top_k: int | None = None  # "kl": keep the reference's top-k tokens only (None: full vocabulary)
    retain_router_weight: float = 0.0  # our extension, off as in the paper
    npo_beta: float = 0.001  # the paper's beta
    npo_per_token: bool = False  # True: per-token mean NLL instead of NPO's per-sequence sum
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.0
    rmu_layer: int | None = None  # default: the target layer
    rmu_coefficient: float = 20.0
    rmu_retain_weight: float = 100.0
    target: tuple[int, int] | None = None  # (layer, expert); None: from attribution
    attribution_docs: int = 256
    seed: int = 0
    eval_every: int = 10
    stop_forget_accuracy: float | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    monitor_docs: int = 32
    use_layer_cache: bool = True  # reuse the frozen layers' output below the trainable ones
    master_weights: bool | None = None  # fp32 master copies; None: on for every scope but "full"
    utility_eval: str = "always"  # "always", or "target": UT only where FA reached the target, and at the end
    chance_accuracy: float = 0.25  # FA of guessing (4-way multiple choice): forgetting below it is not better
    grip: bool = False  # GRIP: router updates projected onto the null space of the retain router inputs
    grip_energy: float = 0.99  # share of the retain inputs' energy whose directions the routers may not change
    grip_docs: int = 256  # retain documents whose router inputs span the protected subspace
    trace: bool = False  # TRACE: retain loss reweighted towards the forget-critical experts
    trace_ratio: float = 1.0  # critical: forget frequency > trace_ratio x retain frequency
    trace_max_weight: float = 10.0  # token weights cut at this multiple of their mean

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, batch_size and eval_every must be positive")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {self.retain_loss!r}")
        if self.anchor_reduction not in ("sum", "mean"):
            raise ValueError(f"anchor_reduction must be 'sum' or 'mean', got {self.anchor_reduction!r}")
        if self.utility_eval not in ("always", "target"):
            raise ValueError(f"utility_eval must be 'always' or 'target', got {self.utility_eval!r}")
        if self.utility_eval == "target" and self.stop_forget_accuracy is None:
            raise ValueError("utility_eval='target' needs stop_forget_accuracy (the target it waits for)")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (one token predicts the next), got {self.max_length!r}")
        for name in ("anchor_weight", "retain_weight", "retain_router_weight", "rmu_retain_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.kl_top_k is not None and (isinstance(self.kl_top_k, bool) or not isinstance(self.kl_top_k, int)
                                          or self.kl_top_k < 1):  # fmt: skip
            raise ValueError(f"kl_top_k must be a positive int or None, got {self.kl_top_k!r}")
        for name in ("stop_forget_accuracy", "chance_accuracy"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be an accuracy in [0, 1], got {value!r}")
        self._validate_stabilisers()

    def _validate_stabilisers(self) -> None:
        for name in ("grip", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.grip_energy, int | float) and 0.0 < self.grip_energy <= 1.0):
            raise ValueError(f"grip_energy must be in (0, 1], got {self.grip_energy!r}")
        if isinstance(self.grip_docs, bool) or not isinstance(self.grip_docs, int) or self.grip_docs < 1:
            raise ValueError(f"grip_docs must be a positive int, got {self.grip_docs!r}")
        if not (isinstance(self.trace_ratio, int | float) and math.isfinite(self.trace_ratio) and self.trace_ratio > 0):
            raise ValueError(f"trace_ratio must be a finite number > 0, got {self.trace_ratio!r}")
        if not (isinstance(self.trace_max_weight, int | float) and math.isfinite(self.trace_max_weight)
                and self.trace_max_weight >= 1):  # fmt: skip
            raise ValueError(f"trace_max_weight must be a finite number >= 1, got {self.trace_max_weight!r}")
        if self.trace:
            weight = self.rmu_retain_weight if self.method == "rmu" else self.retain_weight
            if self.method not in _RETAIN_METHODS:
                raise ValueError(
                    f"trace=True reweights the retain loss, and method {self.method!r} has none: use one of "
                    f"{_RETAIN_METHODS} (graddiff is GA with a retain term)"
                )
            if not weight:
                raise ValueError("trace=True reweights the retain loss, but its weight is 0: set retain_weight "
                                 "(rmu_retain_weight for RMU) above 0")  # fmt: skip
        if self.grip:
            scope = self.scope if isinstance(self.scope, Scope) else Scope.from_name(self.scope)
            if not _trains_router(scope):
                raise ValueError(
                    f"grip=True projects router updates, but scope {scope.label!r} trains no router: use a scope "
                    "that trains one (uoe, routers, experts_and_routers, full, or include_router=True)"
                )


@dataclass
class StepRecord:
    """What was measured after ``step`` optimiser steps (step 0 = the original model)."""

    step: int
    forget_loss: float | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    overlap_forget: dict[int, float] = field(default_factory=dict)
    overlap_retain: dict[int, float] = field(default_factory=dict)
    proportions_forget: dict[int, list[float]] = field(default_factory=dict)
    proportions_shift: dict[int, float] = field(default_factory=dict)
    balance: float | None = None

    def row(self) -> dict[str, Any]:
        """A flat table row (per-layer values as ``overlap_forget/L``)."""
        out: dict[str, Any] = {"step": self.step, "forget_loss": self.forget_loss, "loss": self.loss}
        out.update(self.metrics)
        out["balance"] = self.balance
        for name in ("overlap_forget", "overlap_retain", "proportions_shift"):
            for layer, v in getattr(self, name).items():
                out[f"{name}/{layer}"] = v
        return out


@dataclass
class UnlearnResult:
    """The kept model, the run's history and what was trained."""

    model: nn.Module
    config: UnlearnConfig
    scope: ScopeResult
    target: tuple[int, int] | None
    history: list[StepRecord]
    best_step: int
    stopped: str
    affinity: Any = None
    steps_run: int = 0  # optimiser steps taken (fewer than config.steps after an early stop)
    train_seconds: float = 0.0  # wall time of those steps (loss, backward, optimiser), evaluation excluded
    original: dict[str, tuple[list[int] | None, torch.Tensor]] | None = None  # with keep_original
    inspected: Any = None  # what a caller measured on the unlearned model (layer_study.run_variant)
    patch: Any = None  # the run's change as a uoe_nb.patches.Patch, when kept
    stability: dict[str, Any] = field(default_factory=dict)  # GRIP's RouterNullSpace, TRACE's TraceWeights

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of one optimiser step (``nan`` when no step ran)."""
        return self.train_seconds / self.steps_run if self.steps_run else math.nan

    @property
    def best(self) -> StepRecord:
        return next(r for r in self.history if r.step == self.best_step)

    def restore(self) -> nn.Module:
        """Put the model back as it was before the run (needs ``unlearn(..., keep_original=True)``;
        a LoRA run removes its adapters instead) and return it. Bitwise: only what the scope
        trained is written, from the copies taken before the first step."""
        if self.model is None:
            raise ValueError("this result no longer holds its model (release() was called)")
        if isinstance(self.scope.selection, LoraSelection):
            self.model = self.model.unload()
            self.scope.model = self.scope.selection.model = self.model
            return self.model
        if self.original is None:
            raise ValueError("restore() needs the original values: run unlearn(..., keep_original=True)")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, (rows, values) in self.original.items():
                p = params[name]
                if rows is None:
                    p.copy_(values)
                else:
                    p.index_copy_(0, torch.tensor(rows, device=p.device), values.to(p.device, p.dtype))
        return self.model

    def make_patch(self, base_model: str, **metadata: Any):
        """The :class:`uoe_nb.patches.Patch` of this run's change (needs ``keep_original=True``):
        only what the scope trained, with its values before and after; ``base_model`` names
        the checkpoint it applies to. Call it before :meth:`restore`."""
        from .patches import make_patch

        if self.model is None or self.original is None:
            raise ValueError("make_patch() needs the model and unlearn(..., keep_original=True)")
        if isinstance(self.scope.selection, LoraSelection):
            raise ValueError("a LoRA run has no patch: merge_and_unload() the model and save it instead")
        metadata = {"base_model": base_model, "method": self.config.method, "config": config_dict(self.config),
                    "metrics": dict(self.best.metrics), **metadata}  # fmt: skip
        if self.target is not None:
            metadata.setdefault("layer", self.target[0])
            metadata.setdefault("expert", self.target[1])
        # Declare what the scope trained, so the patch holds it even where a run kept the original
        # values (a model already at the forget target): a patch that changes nothing, not an error.
        fused = {n for lay in find_moe_layers(self.model) if lay.fused for n in lay.expert_parameters()}
        extra = [n for n in self.original if n not in fused]
        return make_patch(_BaseView(self.model, self.original), self.model, metadata=metadata,
                          experts=self.scope.experts, extra_params=extra)  # fmt: skip

    def release(self) -> None:
        """Drop every reference this result holds to the model (keep the history and numbers).

        Chapters keep tables and patches, not models: after ``release()`` the model is
        freed as soon as the caller drops its own references.
        """
        self.model = None
        self.scope.model = None
        self.scope.selection.model = None

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.history]

    def summary(self) -> dict[str, Any]:
        """One row: method, scope, trainable fraction, kept step and its metrics."""
        best = self.best
        row = {
            "method": self.config.method,
            "scope": self.scope.name,
            "trainable": self.scope.num_trainable,
            "fraction": self.scope.fraction,
            "step": best.step,
            "stopped": self.stopped,
        }
        row.update(best.metrics)
        return row


# ---------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------


def takes_parts(evaluate: Callable) -> bool:
    """Whether ``evaluate`` accepts ``parts=`` (see :class:`uoe_nb.evaluation.Evaluator`)."""
    try:
        return "parts" in inspect.signature(evaluate).parameters
    except (TypeError, ValueError):
        return False


_UNANCHORED = ("full", "experts", "experts_and_routers", "routers", "lora", "rmu")
_KL_CACHE_LIMIT = 2 * 2**30  # bytes of full-vocabulary KL references a run may keep in host memory
_JITTER = ("router_jitter_noise", "input_jitter_noise", "moe_jitter_eps")


def _stochastic_routing(model: nn.Module) -> str:
    """The config settings that make routing random in training mode (e.g. PhiMoE's jitter), or ''."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    found = [f"{k}={getattr(config, k)}" for k in _JITTER if (getattr(config, k, 0) or 0) > 0]
    return ", ".join(found)


def _usable(texts: list[str], tokenizer, what: str) -> list[str]:
    """Documents with at least two tokens (one predicts the next); the rest are dropped with a
    logged count, and a set left empty is refused."""
    if not texts:
        return texts
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    keep = [t for t, n in zip(texts, lengths, strict=True) if n >= 2]
    if len(keep) < len(texts):
        if not keep:
            raise ValueError(f"every {what} document tokenizes to fewer than two tokens: nothing to learn from")
        log.warning("dropped %d of %d %s documents shorter than two tokens", len(texts) - len(keep), len(texts), what)
    return keep


def _balance(metrics: Mapping[str, float], base: Mapping[str, float], chance: float = 0.0) -> float | None:
    """Forget-accuracy drop (counted only down to chance: below it is not better forgetting)
    minus utility drop."""
    if "forget_accuracy" not in metrics or "utility_accuracy" not in metrics:
        return None
    forget_drop = base["forget_accuracy"] - max(metrics["forget_accuracy"], chance)
    utility_drop = max(0.0, base["utility_accuracy"] - metrics["utility_accuracy"])
    return forget_drop - utility_drop


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


class _Run:
    """State of one unlearning run (kept out of the public function for readability)."""

    def __init__(self, model, tokenizer, forget, retain, config: UnlearnConfig, evaluate, device):
        self.model, self.tok, self.cfg, self.evaluate = model, tokenizer, config, evaluate
        self.device = device
        gen = torch.Generator().manual_seed(config.seed)

        def batched(texts):
            order = torch.randperm(len(texts), generator=gen).tolist()
            shuffled = [texts[i] for i in order]
            return list(
                make_batches(tokenizer, shuffled, batch_size=config.batch_size, max_length=config.max_length,
                             device=device)  # fmt: skip
            )

        self.forget_batches = batched(list(forget))
        self.retain_batches = batched(list(retain)) if retain else []
        # Monitoring and attribution forward no more tokens at once than a training step does.
        k, b = config.monitor_docs, config.batch_size
        self.monitor = {
            "forget": list(make_batches(tokenizer, list(forget)[:k], batch_size=b, max_length=config.max_length,
                                        device=device)),  # fmt: skip
            "retain": list(make_batches(tokenizer, list(retain)[:k], batch_size=b, max_length=config.max_length,
                                        device=device)) if retain else [],  # fmt: skip
        }
        self.ref_cache: dict[tuple[str, int], Any] = {}
        self.grip: stability.RouterNullSpace | None = None
        self.trace: stability.TraceWeights | None = None

    # -- frozen references ------------------------------------------------------------
    def reference(self, key: tuple[str, int], fn: Callable[[], Any], *, offload: bool = False) -> Any:
        """The original model's value for ``key``: computed (eval mode, no grad) while the
        weights are still the original ones, i.e. by :meth:`precompute_references` before
        the first update; later calls only read the store."""
        if key not in self.ref_cache:
            if self.updated:
                raise RuntimeError(f"reference {key} was not computed before the first update")
            was = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    value = fn()
            finally:
                self.model.train(was)
            self.ref_cache[key] = _to(value, "cpu") if offload and self.device.type != "cpu" else value
        value = self.ref_cache[key]
        return _to(value, self.device) if offload else value

    def precompute_references(self, steps: int) -> None:
        """Every frozen reference that the run's ``steps`` steps will ask for (steps cycle
        through the batches, so the first ``max(#forget, #retain)`` steps meet them all)."""
        span = min(steps, max(len(self.forget_batches), len(self.retain_batches)))
        for step in progress(range(span), desc="references"):
            self.step_loss(step, references_only=True)

    # -- monitoring ----------------------------------------------------------------------
    @torch.no_grad()
    def routing_snapshot(self, which: str) -> dict[int, list[torch.Tensor]]:
        out: dict[int, list[torch.Tensor]] = {}
        was = self.model.training
        self.model.eval()
        last = max(lay.layer_index for lay in find_moe_layers(self.model))
        for batch in self.monitor[which]:
            # Routing is all it needs: stop after the last MoE layer (no LM head, no logits).
            with capture_routing(self.model) as cap, stop_after_layer(self.model, last):
                self.model(**batch)
            for layer, recs in cap.records.items():
                out.setdefault(layer, []).append(recs[0].selected())
        self.model.train(was)
        return out

    def measure(self, step: int, forget_loss: float | None, loss: float | None, *, final: bool = False) -> StepRecord:
        rec = StepRecord(step=step, forget_loss=forget_loss, loss=loss)
        if self.evaluate is not None:
            if self.cfg.utility_eval == "always" or step == 0 or final or not takes_parts(self.evaluate):
                rec.metrics = dict(self.evaluate(self.model))
            else:  # utility only where forgetting reached the target (Colab-sized full mode)
                rec.metrics = dict(self.evaluate(self.model, parts=("forget",)))
                fa = rec.metrics.get("forget_accuracy")
                if fa is not None and fa <= self.cfg.stop_forget_accuracy:
                    rec.metrics.update(self.evaluate(self.model, parts=("utility",)))
        if self.is_moe:
            for which in ("forget", "retain"):
                if not self.monitor[which]:
                    continue
                now = self.routing_snapshot(which)
                overlap = {}
                for layer, sels in now.items():
                    inter = sum(int((a & b).sum()) for a, b in zip(sels, self.base_routing[which][layer], strict=True))
                    total = sum(int(b.sum()) for b in self.base_routing[which][layer])
                    overlap[layer] = inter / total if total else float("nan")
                setattr(rec, f"overlap_{which}", overlap)
                if which == "forget":
                    props = {layer: _proportions(sels) for layer, sels in now.items()}
                    rec.proportions_forget = {k: v.tolist() for k, v in props.items()}
                    rec.proportions_shift = {
                        k: 0.5 * float((v - self.base_props[k]).abs().sum()) for k, v in props.items()
                    }
        return rec

    # -- forward passes --------------------------------------------------------------------
    def logits(self, batch, key) -> torch.Tensor:
        """Logits of ``batch``; layers below the lowest trainable layer come from the cache."""
        if self.cache is not None:
            return forward_from_layer(self.model, batch, self.cache.layer_index, self.cache, key).logits
        return self.model(**batch).logits

    def nll(self, batch, key) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch, key)
        return objectives.per_sequence_nll(logits, batch["input_ids"], batch["attention_mask"])

    def hidden_at(self, batch, layer_index: int, key) -> torch.Tensor:
        """Output of decoder layer ``layer_index``; nothing above it runs."""
        if self.cache is not None and layer_index >= self.cache.layer_index:
            if layer_index == self.cache.layer_index:
                out = forward_from_layer(self.model, batch, layer_index, self.cache, key, run_above=False,
                                         output_layer_hidden=True)  # fmt: skip
                return out.layer_hidden
        return hidden_after_layer(self.model, batch, layer_index)

    def anchor_term(self, cap) -> torch.Tensor:
        """alpha * Eq. 3 over every anchored router, from this step's forget forward."""
        total = 0.0
        for layer, expert in self.anchors:
            rec = cap[layer][0]
            total = total + objectives.anchor_loss(rec.scores, rec.mask, expert, reduction=self.cfg.anchor_reduction)
        return self.cfg.anchor_weight * total

    def weighted_retain_term(self, rb, rkey, j: int, ref_logits) -> torch.Tensor:
        """TRACE's retain term: the configured retain loss with retain batch ``j``'s token weights."""
        weights, mask = self.trace.weights[j], rb["attention_mask"]
        logits = self.logits(rb, rkey)
        if self.cfg.retain_loss == "nll":
            return stability.weighted_retain_nll(logits, rb["input_ids"], mask, weights)
        if self.cfg.kl_top_k:
            return stability.weighted_retain_kl_top_k(logits, ref_logits, mask, weights)
        return stability.weighted_retain_kl(logits, ref_logits, mask, weights)

    def step_loss(self, step: int, *, references_only: bool = False) -> tuple[torch.Tensor, float] | None:
        cfg = self.cfg
        i = step % len(self.forget_batches)
        fb = self.forget_batches[i]
        j = step % len(self.retain_batches) if self.retain_batches else None
        rb = self.retain_batches[j] if j is not None else None
        fkey, rkey = ("forget", i), ("retain", j)
        target_layer = self.target[0] if self.target else None
        anchor_layers = [layer for layer, _ in self.anchors]
        anchor_on = bool(self.anchors) and cfg.anchor_weight != 0
        uses_retain = rb is not None and (
            cfg.method == "rmu" or (cfg.method in ("graddiff", "npo", "simnpo") and cfg.retain_weight != 0)
        )
        router_term = bool(cfg.retain_router_weight) and rb is not None and self.target is not None

        # Frozen references: read from the store filled before the first update.
        if cfg.method == "npo":
            ref_total, ref_count = self.reference(("npo", i), lambda: self.nll(fb, fkey))
        if uses_retain and cfg.method == "rmu":
            frozen = self.reference(("rmu", j), lambda: self.hidden_at(rb, self.rmu_layer, rkey), offload=True)
        ref_logits = None
        if uses_retain and cfg.method != "rmu" and cfg.retain_loss == "kl":
            if cfg.kl_top_k:
                ref_logits = self.reference(
                    ("kl", j),
                    lambda: objectives.reference_top_k(self.logits(rb, rkey), rb["attention_mask"], cfg.kl_top_k),
                    offload=True,
                )
            else:
                ref_logits = self.reference(("kl", j), lambda: self.logits(rb, rkey), offload=True)
        if router_term:

            def scores_on_retain():
                with capture_routing(self.model, layers=[target_layer]) as c:
                    self.logits(rb, rkey)
                return c[target_layer][0].scores

            ref_scores = self.reference(("router", j), scores_on_retain)
        if references_only:
            return None

        anchoring = capture_routing(self.model, layers=anchor_layers, detach=False) if anchor_on else _null()
        if cfg.method == "rmu":
            with anchoring as cap:
                h = self.hidden_at(fb, self.rmu_layer, fkey)
            forget_term = objectives.rmu_forget_loss(h, self.control.to(h.dtype), fb["attention_mask"])
            loss = forget_term + (self.anchor_term(cap) if anchor_on else 0.0)
            if uses_retain and self.trace is not None:
                loss = loss + cfg.rmu_retain_weight * stability.weighted_rmu_retain(
                    self.hidden_at(rb, self.rmu_layer, rkey), frozen, rb["attention_mask"], self.trace.weights[j]
                )
            elif uses_retain:
                loss = loss + cfg.rmu_retain_weight * objectives.rmu_retain_loss(
                    self.hidden_at(rb, self.rmu_layer, rkey), frozen, rb["attention_mask"]
                )
            forget_value = float(forget_term.detach())
        else:
            with anchoring as cap:
                total, count = self.nll(fb, fkey)
            if cfg.method in ("ga", "graddiff"):
                forget_term = objectives.ga_loss(total, count)
            elif cfg.method == "npo":
                forget_term = objectives.npo_loss(
                    total, ref_total, cfg.npo_beta, per_token=cfg.npo_per_token,
                    n_tokens=count if cfg.npo_per_token else None,
                )
            else:  # simnpo
                forget_term = objectives.simnpo_loss(total, count, cfg.simnpo_beta, cfg.simnpo_delta)
            loss = forget_term
            forget_value = float((total.sum() / count.sum()).detach())
            if anchor_on:
                loss = loss + self.anchor_term(cap)
            if uses_retain and self.trace is not None:
                loss = loss + cfg.retain_weight * self.weighted_retain_term(rb, rkey, j, ref_logits)
            elif uses_retain:
                if cfg.retain_loss == "nll":
                    r_total, r_count = self.nll(rb, rkey)
                    retain_term = objectives.retain_nll_loss(r_total, r_count)
                elif cfg.kl_top_k:
                    retain_term = objectives.retain_kl_top_k_loss(self.logits(rb, rkey), ref_logits, rb["attention_mask"])
                else:
                    retain_term = objectives.retain_kl_loss(self.logits(rb, rkey), ref_logits, rb["attention_mask"])
                loss = loss + cfg.retain_weight * retain_term
        if router_term:
            with capture_routing(self.model, layers=[target_layer], detach=False) as c:
                self.logits(rb, rkey)
            loss = loss + cfg.retain_router_weight * objectives.retain_router_loss(
                c[target_layer][0].scores, ref_scores, rb["attention_mask"]
            )
        return loss, forget_value


@contextlib.contextmanager
def _null():
    yield None


class _BaseView(Mapping):
    """The model before a run, read lazily: kept originals where the run trained, else the
    current (untouched) parameters."""

    def __init__(self, model: nn.Module, original: Mapping[str, tuple[list[int] | None, torch.Tensor]]):
        self.params = dict(model.named_parameters())
        self.original = original

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.original:
            return self.params[name].detach()
        rows, values = self.original[name]
        if rows is None:
            return values
        full = self.params[name].detach().to(values.device, copy=True)
        full[rows] = values.to(full.dtype)
        return full

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _to(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _proportions(selected: Sequence[torch.Tensor]) -> torch.Tensor:
    counts = sum(s.sum(dim=(0, 1)).double() for s in selected)
    return (counts / counts.sum()).float()


def unlearn(
    model: nn.Module,
    forget: Sequence[str],
    retain: Sequence[str],
    config: UnlearnConfig | None = None,
    *,
    tokenizer,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    affinity: Any = None,
    keep_original: bool = False,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping ``retain`` (Eq. 4; Chapters 2, 4-6).

    ``evaluate(model) -> {"forget_accuracy": ..., "utility_accuracy": ...}`` is called
    at step 0 and every ``eval_every`` steps (see :func:`world_evaluator`); without it
    only losses and routing are recorded and the last checkpoint is kept. The model is
    trained in place; the returned ``result.model`` holds the kept checkpoint.
    ``keep_original=True`` copies what the scope trains to host memory before the first
    step (one expert's rows and a router for UOE; every parameter for the full scope), so
    that :meth:`UnlearnResult.restore` gives the model back and
    :meth:`UnlearnResult.make_patch` stores the change.
    """
    config = config or UnlearnConfig()
    config.validate()
    for name, texts in (("forget", forget), ("retain", retain)):
        if isinstance(texts, str | bytes):
            raise TypeError(f"the {name} set is one string: give a list of documents, e.g. [{name}_text]")
    forget, retain = list(forget), list(retain or [])
    for name, texts in (("forget", forget), ("retain", retain)):
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"the {name} set must hold strings, found {sorted(set(bad))}")
    forget = _usable(forget, tokenizer, "forget")
    retain = _usable(retain, tokenizer, "retain") if retain else retain
    if not forget:
        raise ValueError("the forget set is empty: give at least one forget document")
    if config.method in ("graddiff",) and not retain:
        raise ValueError(f"method {config.method!r} needs a retain set")
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    run = _Run(model, tokenizer, forget, retain, config, evaluate, device)
    if config.retain_loss == "kl" and config.kl_top_k is None and config.method in ("graddiff", "npo", "simnpo"):
        vocab = model.config.get_text_config().vocab_size
        tokens = sum(int(b["attention_mask"].numel()) for b in run.retain_batches[: config.steps])
        if tokens * vocab * 4 > _KL_CACHE_LIMIT:
            raise ValueError(
                f"the KL retain term would keep {tokens * vocab * 4 / 2**30:.1f} GiB of full-vocabulary reference "
                f"logits ({tokens} tokens x {vocab} tokens of vocabulary): set kl_top_k (e.g. 64) to keep the "
                "reference's top-k tokens only"
            )
    run.decoder_layers = _decoder_layers(model)

    scope = config.scope if isinstance(config.scope, Scope) else Scope.from_name(config.scope)
    if scope.kind == "rmu" and scope.layer is None:  # rmu_mlps(): the MLPs below the steered layer
        if config.rmu_layer is None:
            raise ValueError("scope rmu_mlps() takes its layer from rmu_layer: set rmu_layer (the steered layer)")
        scope = dataclasses.replace(scope, layer=config.rmu_layer)
    try:
        moe_layers = find_moe_layers(model)
    except Exception:  # dense model: only scopes that do not need experts will work
        moe_layers = []
    run.is_moe = bool(moe_layers)
    target = config.target
    needs = scope.needs_affinity or (scope.needs_target and target is None)
    if run.is_moe and needs and affinity is None:
        # Expert attribution (Eq. 2) on the forget set, as in the paper's Algorithm 1.
        docs = forget[: config.attribution_docs]
        affinity = expert_affinity(
            model, make_batches(tokenizer, docs, batch_size=config.batch_size, max_length=config.max_length,
                                device=device)  # fmt: skip
        )
    if target is None and affinity is not None and hasattr(affinity, "target"):
        target = affinity.target
    scope_result = apply_scope(model, scope, target=target, affinity=getattr(affinity, "scores", affinity),
                               seed=config.seed)  # fmt: skip
    try:
        train_model = scope_result.model
        run.model = train_model
        run.scope = scope_result
        run.anchors = _anchor_pairs(scope_result, target)
        # The trained expert is the target when the scope names one expert in one layer
        # (uoe with explicit arguments, random_expert); otherwise the attributed target.
        if len(run.anchors) == 1:
            target = run.anchors[0]
        run.target = tuple(target) if target is not None else None
        if config.method == "rmu":
            layer = config.rmu_layer
            if layer is None:  # the steered layer: the RMU scope's, else the target's
                layer = scope.layer if scope.kind == "rmu" else (target[0] if target else None)
            if layer is None:
                raise ValueError("RMU needs a layer: set rmu_layer or use a scope with a target layer")
            if not 0 <= layer < len(run.decoder_layers):
                raise IndexError(f"rmu_layer {layer} is out of range (0..{len(run.decoder_layers) - 1})")
            run.rmu_layer = layer
            above = [a for a, _ in run.anchors if a > layer]
            if above and config.anchor_weight:
                raise ValueError(
                    f"RMU runs the model only up to layer {layer}, but the scope trains (and anchors) the router of "
                    f"layer(s) {above} above it: set rmu_layer to the highest trained layer, or anchor_weight=0"
                )
            hidden = model.config.get_text_config().hidden_size
            run.control = objectives.rmu_control_vector(hidden, config.rmu_coefficient, config.seed).to(device)

        run.cache = None
        lowest = _lowest_trainable_layer(scope_result)
        stochastic = _stochastic_routing(model)
        if config.use_layer_cache and stochastic:
            log.warning("%s routes stochastically in training (%s): the layer cache is off", type(model).__name__,
                        stochastic)  # fmt: skip
        if config.use_layer_cache and not stochastic and lowest is not None and lowest > 0:
            # Frozen layers below the lowest trainable one give the same output for a batch
            # every time: compute their output once per batch (checked exact on first use).
            n_items = len(run.forget_batches) + len(run.retain_batches)
            run.cache = LayerInputCache(lowest, max_items=max(1, n_items))
        original = None
        if keep_original and not isinstance(scope_result.selection, LoraSelection):
            original = scope_result.selection.original_values("cpu")
        trainable = scope_result.parameters()
        master = config.master_weights if config.master_weights is not None else scope.kind != "full"
        opt = MasterWeights(trainable, lr=config.lr, weight_decay=config.weight_decay, enabled=master)

        run.updated = False
        _setup_stabilisers(run, train_model, scope_result, retain, tokenizer, config, opt)
        if config.method == "npo" or config.method == "rmu" or config.retain_loss == "kl" or config.retain_router_weight:
            run.precompute_references(config.steps)
        if run.is_moe:
            run.base_routing = {w: run.routing_snapshot(w) for w in ("forget", "retain") if run.monitor[w]}
            run.base_props = {k: _proportions(v) for k, v in run.base_routing.get("forget", {}).items()}
        history = [run.measure(0, None, None)]
        base_metrics = history[0].metrics
        history[0].balance = _balance(base_metrics, base_metrics, config.chance_accuracy) if base_metrics else None
        best_step, best_key = 0, _key(history[0], config)
        kept = _Checkpoint(opt) if evaluate is not None else None
        if kept is not None:
            kept.save(0)
    except BaseException:
        if not isinstance(scope_result.selection, LoraSelection):
            scope_result.remove()  # a refused setup leaves the model as it was
        raise
    stopped = "step budget"
    steps_run, train_seconds, done = 0, 0.0, 0
    train_model.train()
    try:
        for step in progress(range(config.steps), desc=f"unlearn {config.method}"):
            started = time.perf_counter()
            loss, forget_value = run.step_loss(step)
            if not torch.isfinite(loss):
                stopped = f"non-finite loss at step {step + 1}; kept the state before it"
                break
            opt.zero_grad()
            opt.backward(loss)
            status = opt.step(config.grad_clip)
            if status == "skipped":
                continue  # fp16 loss-scale overflow: no update, the scale is halved
            if status != "ok":
                stopped = f"non-finite gradients at step {step + 1}; kept the state before it"
                break
            if run.grip is not None:
                run.grip.project()  # the applied update, not the gradient: Adam rescales elementwise
                opt.sync()
            run.updated = True
            scope_result.write_back()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - started
            steps_run = done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                train_model.eval()
                rec = run.measure(done, forget_value, float(loss.detach()), final=done == config.steps)
                train_model.train()
                rec.balance = _balance(rec.metrics, base_metrics, config.chance_accuracy) if base_metrics else None
                history.append(rec)
                key = _key(rec, config)
                if key > best_key or evaluate is None:
                    best_step, best_key = done, key
                    if kept is not None:
                        kept.save(done)
                fa = rec.metrics.get("forget_accuracy")
                if config.stop_forget_accuracy is not None and fa is not None and fa <= config.stop_forget_accuracy:
                    stopped = f"forget accuracy {fa:.3f} <= {config.stop_forget_accuracy} at step {done}"
                    break
        if history[-1].step != done:
            # Stopped between evaluations: measure the state the run ends in.
            train_model.eval()
            history.append(run.measure(done, None, None, final=True))
        last = history[-1]
        if evaluate is not None and "utility_accuracy" not in last.metrics and takes_parts(evaluate):
            last.metrics.update(evaluate(train_model, parts=("utility",)))
        last.balance = _balance(last.metrics, base_metrics, config.chance_accuracy) if base_metrics else None
        if evaluate is None:
            best_step = done  # nothing to choose by: the run ends in its last state
        elif _key(last, config) > best_key:
            best_step, best_key = done, _key(last, config)
            kept.save(done)
        if kept is not None and kept.step != done:
            kept.restore()
            scope_result.write_back()
    finally:
        opt.close()
        if kept is not None:
            kept.close()
        for p in train_model.parameters():
            p.grad = None
        run.ref_cache.clear()
        if run.cache is not None:
            run.cache.clear()
        if not isinstance(scope_result.selection, LoraSelection):
            scope_result.remove()  # trained rows written back, plain modules, everything frozen
    train_model.eval()
    return UnlearnResult(
        model=train_model,
        config=config,
        scope=scope_result,
        target=run.target,
        history=history,
        best_step=best_step,
        stopped=stopped,
        affinity=affinity,
        steps_run=steps_run,
        train_seconds=train_seconds,
        original=original,
        stability={k: v for k, v in (("grip", run.grip), ("trace", run.trace)) if v is not None},
    )


def _setup_stabilisers(run: _Run, model: nn.Module, scope: ScopeResult, retain: list[str], tokenizer,
                       config: UnlearnConfig, opt: MasterWeights) -> None:  # fmt: skip
    """GRIP's bases and TRACE's weights, from the original model before the first update (Chapter 9)."""
    if not (config.grip or config.trace):
        return
    if not run.is_moe:
        raise ValueError("grip and trace keep the routing of a mixture-of-experts model: this model has no MoE layer")
    if not retain:
        raise ValueError("grip and trace are computed on retain text: give a retain set")
    if config.grip:
        if not scope.routers:
            raise ValueError(f"grip=True projects router updates, but scope {scope.name!r} trains no router")
        batches = make_batches(tokenizer, retain[: config.grip_docs], batch_size=config.batch_size,
                               max_length=config.max_length, device=run.device)  # fmt: skip
        run.grip = stability.RouterNullSpace.from_batches(model, scope.routers, batches, config.grip_energy)
        masters = {id(p): m for p, m in zip(opt.params, opt.masters, strict=True) if m is not None}
        run.grip.attach(model, masters)
    if config.trace:
        candidates = {k: v for k, v in scope.experts.items() if v}
        if not candidates:  # a routers-only scope: the experts whose routing it trains
            candidates = {layer: list(range(moe_layer(model, layer).num_experts)) for layer in scope.routers}
        run.trace = stability.trace_weights(model, run.forget_batches, run.retain_batches, candidates,
                                            ratio=config.trace_ratio, max_weight=config.trace_max_weight)  # fmt: skip
        log.info("TRACE: critical experts %s, largest token weight %.2f", run.trace.critical, run.trace.max_weight())


class _Checkpoint:
    """The kept checkpoint of a run, off the accelerator: CPU memory, or a temporary file
    when its values would take more than half of the memory the machine has free."""

    def __init__(self, opt: MasterWeights):
        self.opt = opt
        self.step: int | None = None
        self.values: list[torch.Tensor] | None = None
        self.path: str | None = None
        nbytes = sum(t.numel() * t.element_size() for t in opt.targets)
        self.where = "cpu" if nbytes <= 0.5 * _free_host_bytes() else "disk"
        if self.where == "disk":
            log.info("the kept checkpoint (%.1f GiB) goes to a temporary file", nbytes / 2**30)

    def save(self, step: int) -> None:
        snapshot = self.opt.snapshot("cpu")
        if self.where == "disk":
            if self.path is None:
                fd, self.path = tempfile.mkstemp(prefix="uoe_nb_checkpoint_", suffix=".pt")
                os.close(fd)
            torch.save(snapshot, self.path)
            del snapshot
        else:
            self.values = snapshot
        self.step = step

    def restore(self) -> None:
        values = self.values if self.where == "cpu" else torch.load(self.path, weights_only=True)
        self.opt.load(values)

    def close(self) -> None:
        self.values = None
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)
        self.path = None


def _free_host_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _anchor_pairs(scope: ScopeResult, target) -> list[tuple[int, int]]:
    """(layer, expert) pairs whose router is anchored (Eq. 3).

    A trainable router is anchored to the one expert the scope trains in its layer
    (UOE, a random expert, the top-1 expert of each layer); a router of a layer with
    several trained experts is anchored to the attributed target if it is there. The
    anchor is UOE's loss: the baselines as published (the whole model, the pilot study's
    experts-and-routers and routers-only scopes, LoRA) train without it.
    """
    if scope.scope.kind in _UNANCHORED:
        return []
    pairs = []
    for layer in scope.routers:
        experts = scope.experts.get(layer, [])
        if len(experts) == 1:
            pairs.append((layer, experts[0]))
        elif target is not None and target[0] == layer and target[1] in experts:
            pairs.append((layer, target[1]))
    return pairs


def _lowest_trainable_layer(scope: ScopeResult) -> int | None:
    """The lowest decoder layer with a trainable parameter, for expert/router scopes."""
    if scope.scope.kind in ("full", "lora"):
        return None
    if scope.scope.kind == "rmu":  # dense MLPs in its span are not among the expert layers
        return max(0, scope.scope.layer - 2)
    layers = set(scope.experts) | set(scope.routers) | set(scope.shared)
    return min(layers) if layers else None


def _key(rec: StepRecord, config: UnlearnConfig) -> tuple:
    """Sort key of a checkpoint: reached the stop target first, then utility/balance."""
    if rec.balance is None:  # not fully evaluated (no utility): never preferred
        return (-1, 0.0)
    fa = rec.metrics.get("forget_accuracy", math.inf)
    if config.stop_forget_accuracy is not None:
        reached = fa <= config.stop_forget_accuracy
        return (int(reached), rec.metrics.get("utility_accuracy", 0.0) if reached else rec.balance)
    return (1, rec.balance)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from .moe import decoder_layers

    return decoder_layers(model)[1]


def config_dict(config: UnlearnConfig) -> dict[str, Any]:
    """A JSON-able view of a config (for patches and tables)."""
    out = asdict(config)
    if not isinstance(config.scope, str):
        out["scope"] = repr(config.scope)
    return out
