"""Scopes: which parameters may change during unlearning (Chapters 2, 5 and 6).

A :class:`Scope` is a small frozen description of a trainable set; :func:`apply_scope`
freezes a model and unfreezes exactly that set, returning a :class:`ScopeResult` that
counts the trainable parameters and builds safe optimizer groups. The scopes are the
ones the paper compares:

* :func:`full`, :func:`experts_and_routers`, :func:`routers_only`, :func:`experts_only`
  -- the pilot study and its ablation (Section 4, Fig. 1 and Table 1);
* :func:`uoe` -- the paper's method: the attributed expert of the attributed layer plus
  that layer's router, which the anchor loss (Eq. 3) trains (Section 5, Alg. 1);
* :func:`k_experts` -- several experts of one layer (Table 5: 1 vs 3 vs 6 experts);
* :func:`per_layer_experts` -- the top expert of many layers (Figs. 4 and 5);
* :func:`random_expert` -- a random expert of the target layer (Table 6 control);
* :func:`esft` and :func:`lora` -- the parameter-efficient baselines (Tables 3 and 4).

Scopes only say *what* trains; :func:`uoe_nb.trainable.make_trainable` says how (the
trained experts of a fused layer become parameters of their own, everything else is
frozen). LoRA goes through peft, whose ``target_parameters`` adapts the fused expert
tensors directly.

Applying a scope replaces the scope applied before it to the same model (its trained
rows are written back and dropped), so one model can be described under several scopes
in turn (:func:`describe_scopes`, the paper's Table 3).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .moe import MoELayer, NoMoELayersError, decoder_layers, find_moe_layers
from .trainable import TrainableSelection, make_trainable, remove_trained_rows

__all__ = [
    "SCOPE_NAMES",
    "LoraSelection",
    "Scope",
    "ScopeResult",
    "apply_scope",
    "describe_scopes",
    "esft",
    "experts_and_routers",
    "experts_only",
    "full",
    "k_experts",
    "lora",
    "per_layer_experts",
    "random_expert",
    "rmu_mlps",
    "routers_only",
    "uoe",
]

log = logging.getLogger(__name__)

# Scopes :meth:`Scope.from_name` builds with their defaults.
SCOPE_NAMES = (
    "full",
    "experts",
    "routers",
    "experts_and_routers",
    "uoe",
    "random_expert",
    "per_layer",
    "esft",
    "lora",
)
_ALIASES = {"experts_only": "experts", "routers_only": "routers", "per_layer_experts": "per_layer"}
_KINDS = (*SCOPE_NAMES, "k_experts", "rmu")
# Attribute set on a model by apply_scope, so the next scope can drop this one's trained rows.
_APPLIED_ATTR = "_uoe_nb_applied_scope"


class _Applied:
    """The scope last applied to a model. Copies and pickles of the model get an empty
    holder (its result points at the original model); a copy's own trained rows are
    dropped by the next :func:`apply_scope` on it."""

    def __init__(self, result: ScopeResult | None = None) -> None:
        self.result = result

    def __deepcopy__(self, memo) -> _Applied:
        return _Applied()

    def __reduce__(self):
        return (_Applied, ())


# --------------------------------------------------------------------------------------
# Describing a scope
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What may change during unlearning; build it with the constructors of this module.

    ``kind`` is one of ``full``, ``experts``, ``routers``, ``experts_and_routers``,
    ``uoe``, ``k_experts``, ``per_layer``, ``random_expert``, ``esft``, ``lora``; the other
    fields are that kind's settings. Checks that need no model happen here; checks
    against a model happen in :func:`apply_scope`.
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    experts: tuple[int, ...] | int | None = None  # k_experts: explicit experts, or k (top-k by affinity)
    layers: tuple[int, ...] | str | None = None  # per_layer: decoder-layer indices or "all"
    include_router: bool = False
    include_shared: bool = False
    top_p: float = 0.15  # esft
    rank: int = 8  # lora
    alpha: int = 16  # lora
    target_modules: str | tuple[str, ...] = "all-linear"  # lora
    include_experts: bool = True  # lora: adapters on the fused expert tensors too

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown scope kind {self.kind!r}; choose one of {list(_KINDS)}")
        for name in ("layer", "expert"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if self.kind == "k_experts":
            if self.layer is None:
                raise ValueError("k_experts needs a layer: k_experts(layer, experts)")
            if isinstance(self.experts, int):
                if isinstance(self.experts, bool) or self.experts < 1:
                    raise ValueError(f"k_experts needs k >= 1 experts, got {self.experts!r}")
            elif not self.experts:
                raise ValueError("k_experts got an empty expert list: give expert indices or a count k >= 1")
            elif any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.experts):
                raise ValueError(f"expert indices must be non-negative ints, got {list(self.experts)}")
        if self.kind == "per_layer":
            if isinstance(self.layers, str):
                if self.layers != "all":
                    raise ValueError(f"layers must be a list of layer indices or 'all', got {self.layers!r}")
            elif not self.layers:
                raise ValueError("per_layer_experts got no layers: give layer indices or 'all'")
            elif any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise ValueError(f"layer indices must be non-negative ints, got {list(self.layers)}")
        if self.kind == "esft" and not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"ESFT top_p must be in (0, 1], got {self.top_p}")
        if self.kind == "lora":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
            if self.alpha <= 0:
                raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
            if not self.target_modules and not self.include_experts:
                raise ValueError(
                    "this LoRA scope matches no parameter: give target_modules or set include_experts=True"
                )

    @property
    def needs_target(self) -> bool:
        """Whether :func:`apply_scope` uses the attributed ``target=(layer, expert)``."""
        return (self.kind == "uoe" and (self.layer is None or self.expert is None)) or self.kind == "random_expert"

    @property
    def needs_affinity(self) -> bool:
        """Whether :func:`apply_scope` needs the per-layer expert affinity (Eq. 2)."""
        return (self.kind == "k_experts" and isinstance(self.experts, int)) or self.kind in ("per_layer", "esft")

    @property
    def needs_attribution(self) -> bool:
        """Whether the expert-attribution step (target or affinity) must run first."""
        return self.needs_target or self.needs_affinity

    @property
    def moe_only(self) -> bool:
        """Whether the scope only makes sense on a mixture-of-experts model."""
        return self.kind not in ("full", "lora", "rmu")  # RMU's MLPs exist in a dense model too

    @property
    def label(self) -> str:
        """A short readable name that does not depend on the model (see :attr:`ScopeResult.name`)."""
        return _LABELS[self.kind]

    @classmethod
    def from_name(cls, name: str) -> Scope:
        """The scope called ``name`` with its defaults (``"uoe"``, ``"esft"``, ``"lora"``, ...)."""
        key = _ALIASES.get(str(name).lower(), str(name).lower())
        builders = {
            "full": full,
            "experts": experts_only,
            "routers": routers_only,
            "experts_and_routers": experts_and_routers,
            "uoe": uoe,
            "random_expert": random_expert,
            "per_layer": lambda: per_layer_experts("all"),
            "esft": esft,
            "lora": lora,
        }
        if key not in builders:
            raise ValueError(
                f"unknown scope {name!r}; choose one of {list(SCOPE_NAMES)}, or build one with "
                "uoe_nb.scopes.k_experts(layer, experts)"
            )
        return builders[key]()


_LABELS = {
    "full": "Full model",
    "experts": "Experts only",
    "routers": "Routers only",
    "experts_and_routers": "Experts + routers",
    "uoe": "UOE",
    "k_experts": "Experts of one layer",
    "per_layer": "Top-1 expert per layer",
    "random_expert": "Random expert",
    "esft": "ESFT",
    "lora": "LoRA",
    "rmu": "RMU's MLPs",
}


def full() -> Scope:
    """Every parameter of the model (the pilot study, Section 4 and Fig. 1)."""
    return Scope("full")


def experts_only(include_shared: bool = True) -> Scope:
    """All routed experts of all MoE layers (and the shared experts unless
    ``include_shared=False``); routers frozen. Table 1, "Experts Only"."""
    return Scope("experts", include_shared=include_shared)


def routers_only() -> Scope:
    """All routers; every expert frozen. Table 1, "Routers Only"."""
    return Scope("routers")


def experts_and_routers(include_shared: bool = True) -> Scope:
    """All routed experts (shared ones too unless ``include_shared=False``) and all
    routers; attention and embeddings frozen. Table 1, "Experts & Router"."""
    return Scope("experts_and_routers", include_shared=include_shared, include_router=True)


def uoe(
    layer: int | None = None, expert: int | None = None, *, include_router: bool = True, include_shared: bool = False
) -> Scope:
    """UOE (Section 5, Alg. 1): one expert and its layer's router, everything else frozen.

    Without ``layer``/``expert`` the expert comes from ``target=(layer, expert)`` given to
    :func:`apply_scope` (the attribution result, the top-1 expert of the layer with the
    highest top-1 affinity). The router trains through the anchor loss (Eq. 3).
    Shared experts stay frozen, as in the paper; the later version of the paper
    (SEUF, ACL 2025) reports that tuning them too hurts utility.
    """
    return Scope("uoe", layer=layer, expert=expert, include_router=include_router, include_shared=include_shared)


def k_experts(layer: int, experts: Sequence[int] | int, *, include_router: bool = True) -> Scope:
    """Several experts of one layer, plus its router (Table 5: 1 vs 3 vs 6 experts).

    ``experts`` is a list of expert indices, or a count ``k``: then the top-k experts of
    ``layer`` by the ``affinity`` passed to :func:`apply_scope`.
    """
    chosen = experts if isinstance(experts, int) else tuple(experts)
    return Scope("k_experts", layer=layer, experts=chosen, include_router=include_router)


def per_layer_experts(layers: Sequence[int] | str = "all", *, include_router: bool = True) -> Scope:
    """The top-1 expert (by affinity) of every listed layer, plus those layers' routers
    (Figs. 4 and 5: tuning one expert in many layers instead of one layer)."""
    return Scope("per_layer", layers=layers if isinstance(layers, str) else tuple(layers), include_router=include_router)


def random_expert(layer: int | None = None, *, include_router: bool = True) -> Scope:
    """A seeded random expert instead of the attributed one (Table 6 control).

    The expert is drawn in ``layer`` (default: the target's layer), excluding the target
    expert when it lies in that layer; ``seed`` of :func:`apply_scope` fixes the draw.
    """
    return Scope("random_expert", layer=layer, include_router=include_router)


def rmu_mlps(layer: int | None = None) -> Scope:
    """RMU's published parameter set (Li et al. 2024; the paper's RMU baseline, Chapters 2 and 6):
    the MLPs of decoder layers ``layer - 2`` to ``layer``, where ``layer`` is the one whose
    output the control vector steers. In an MoE layer the MLP is every routed expert and the
    shared experts (the paper unlearns all experts of those layers); routers, attention and
    embeddings stay frozen. A dense layer in that range (DeepSeek's first) trains its MLP.

    Without ``layer`` the scope follows the run: :func:`uoe_nb.unlearn.unlearn` takes the
    config's ``rmu_layer`` (which it then requires), so one cell describes RMU on any depth."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"rmu_mlps needs the steered layer as a non-negative int, got {layer!r}")
    return Scope("rmu", layer=layer)


def esft(top_p: float = 0.15, *, include_router: bool = False) -> Scope:
    """ESFT (Wang et al. 2024, the paper's PEFT baseline, Tables 3 and 4).

    In every MoE layer the experts are ranked by their affinity share -- the layer's
    affinity vector (Eq. 2, or token-selection shares) normalised to sum 1 **within the
    layer** -- and added in decreasing order until their cumulative share reaches
    ``top_p`` (at least one expert per layer). The paper uses ``top_p = 0.15``. ESFT's
    public script normalises the scores across all layers instead of per layer, a
    known bug that makes the threshold depend on the number of layers; this follows
    the method as described. Routers and shared experts stay frozen unless
    ``include_router=True``.
    """
    return Scope("esft", top_p=float(top_p), include_router=include_router)


def lora(
    rank: int = 8,
    alpha: int = 16,
    target_modules: str | Sequence[str] = "all-linear",
    *,
    include_experts: bool = True,
) -> Scope:
    """LoRA (Hu et al. 2021, the paper's PEFT baseline, Tables 3 and 4) through peft.

    Adapters go on every linear layer of every block (``target_modules="all-linear"``,
    peft's shorthand, which leaves the output head alone) and, with
    ``include_experts``, on each MoE layer's fused 3-D expert tensors through peft's
    ``LoraConfig(target_parameters=...)`` (names derived from
    :func:`uoe_nb.moe.find_moe_layers`, e.g. ``mlp.experts.gate_up_proj``). Routers are
    never adapted: a router's forward returns a tuple, which LoRA's linear wrapper cannot
    add to, and a wrapped router would hide from :func:`uoe_nb.moe.capture_routing`. (In
    transformers 4, where the paper ran, routers were ``nn.Linear`` and "all-linear" adapted
    them too.) peft's rewrite of targets for transformers-4 MoE checkpoints is switched off
    while the adapters are created: on these models it would strip LoRA from the dense MLPs
    and shared experts and put it on the routers. The base weights stay frozen, so they are
    bitwise unchanged by training.

    :func:`apply_scope` wraps the model in place and returns the peft model as
    :attr:`ScopeResult.model`. After training, ``result.model.merge_and_unload()`` folds
    the adapters into the base weights (the fused expert tensors included) and returns
    the plain transformers model; ``result.model.unload()`` removes the adapters and
    returns the original weights. To keep a LoRA-unlearned model, save the merged model:
    reloading saved adapters with ``PeftModel.from_pretrained`` would run peft's target
    rewrite again.
    """
    modules = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    return Scope("lora", rank=rank, alpha=alpha, target_modules=modules, include_experts=include_experts)


# --------------------------------------------------------------------------------------
# The applied scope
# --------------------------------------------------------------------------------------


@dataclass
class LoraSelection:
    """The LoRA adapters a :func:`lora` scope added: the peft model and its trainable names."""

    model: nn.Module
    config: Any  # peft.LoraConfig
    names: list[str]
    target_parameters: list[str]
    num_trainable: int

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]


@dataclass
class ScopeResult:
    """A scope applied to a model: what can change, how much, and how to optimise it.

    ``model`` is the model to train (the same object, or the peft model for LoRA);
    ``selection`` the underlying :class:`uoe_nb.trainable.TrainableSelection` (or
    :class:`LoraSelection`); ``experts`` maps decoder-layer index to the experts whose
    effective weights can change (for LoRA with expert adapters: all of them);
    ``routers`` lists the layers whose router is trainable; ``target_layer`` is the
    scope's layer (UOE, k experts, random expert) or the attributed target's layer.
    ``num_trainable`` counts exactly the parameters that can change; ``num_total`` the
    parameters of the original model (LoRA adapters excluded).
    """

    scope: Scope
    name: str
    model: nn.Module
    selection: TrainableSelection | LoraSelection
    num_trainable: int
    num_total: int
    target_layer: int | None
    experts: dict[int, list[int]] = field(default_factory=dict)
    routers: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Trainable / total parameters (the paper's Table 3 ratio)."""
        return self.num_trainable / self.num_total

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (a fused layer's trained experts as their own rows)."""
        return self.selection.parameters()

    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """AdamW groups: only selected values are parameters, so decay moves nothing else."""
        return [{"params": self.selection.parameters(), "weight_decay": weight_decay}]

    def write_back(self) -> None:
        """Copy trained expert rows into the model's fused tensors (after each optimizer step)."""
        if isinstance(self.selection, TrainableSelection):
            self.selection.write_back()

    def row(self) -> dict[str, Any]:
        """One row of the trainable-parameter table (Table 3)."""
        return {
            "name": self.name,
            "trainable": self.num_trainable,
            "total": self.num_total,
            "fraction": self.fraction,
        }

    def remove(self) -> None:
        """Write the trained rows back into the fused tensors, restore the plain modules
        and freeze the model.

        LoRA adapters are not touched: use ``model.merge_and_unload()`` or ``unload()``.
        """
        if isinstance(self.selection, TrainableSelection) and self.selection.model is not None:
            self.selection.remove()
        if self.model is not None and _applied(self.model) is self:
            self.model.__dict__.pop(_APPLIED_ATTR, None)  # no longer applied: the next scope has nothing to undo


# --------------------------------------------------------------------------------------
# Applying a scope
# --------------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be an int, got {value!r}") from err


def _parse_target(target: Any) -> tuple[int, int] | None:
    """``(layer, expert)`` from a pair or from an attribution result with ``.target``."""
    if target is None:
        return None
    target = getattr(target, "target", target)
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if not isinstance(target, Sequence) or isinstance(target, str) or len(target) != 2:
        raise ValueError(f"target must be a (layer, expert) pair, got {target!r}")
    return _as_int(target[0], "target layer"), _as_int(target[1], "target expert")


def _parse_affinity(affinity: Any, layers: Sequence[MoELayer], label: str) -> dict[int, torch.Tensor] | None:
    """Per-layer affinity vectors (float64), checked against the model's MoE layers."""
    if affinity is None:
        return None
    affinity = getattr(affinity, "scores", affinity)
    if not isinstance(affinity, Mapping):
        raise ValueError(
            f"affinity must map decoder-layer index to a [num_experts] tensor (or have .scores), "
            f"got {type(affinity).__name__}"
        )
    by_index = {lay.layer_index: lay for lay in layers}
    out: dict[int, torch.Tensor] = {}
    for key, values in affinity.items():
        index = _as_int(key, "affinity layer")
        if index not in by_index:
            raise ValueError(
                f"affinity has an entry for layer {index}, which has no routed experts (MoE layers: "
                f"{sorted(by_index)}); key the affinity by decoder-layer index, not by position"
            )
        vec = torch.as_tensor(values).detach().to("cpu", torch.float64)
        num = by_index[index].num_experts
        if vec.shape != (num,):
            raise ValueError(
                f"affinity of layer {index} has shape {tuple(vec.shape)}, expected ({num},) for its {num} experts"
            )
        if not torch.isfinite(vec).all():
            raise ValueError(f"affinity of layer {index} contains NaN or inf; recompute it ({label})")
        out[index] = vec
    return out


def _ranking(vec: torch.Tensor) -> list[int]:
    """Experts by decreasing affinity; ties go to the lower index."""
    return torch.sort(vec, descending=True, stable=True).indices.tolist()


def _layer_of(layers: Sequence[MoELayer], index: int, label: str) -> MoELayer:
    for lay in layers:
        if lay.layer_index == index:
            return lay
    raise IndexError(
        f"scope {label!r}: decoder layer {index} has no routed experts (out of range or dense); "
        f"MoE layers of this model are {[lay.layer_index for lay in layers]}"
    )


def _check_expert(layer: MoELayer, expert: int, label: str) -> None:
    if not 0 <= expert < layer.num_experts:
        raise IndexError(
            f"scope {label!r}: expert {expert} is out of range for layer {layer.layer_index}, "
            f"which has {layer.num_experts} experts (0..{layer.num_experts - 1})"
        )


def _need_affinity(affinity: dict[int, torch.Tensor] | None, layer: int, label: str) -> torch.Tensor:
    if affinity is None:
        raise ValueError(
            f"scope {label!r} ranks experts by affinity: pass affinity={{layer: tensor[num_experts]}} "
            "(uoe_nb.attribution's result, or its .scores) to apply_scope"
        )
    if layer not in affinity:
        raise ValueError(f"scope {label!r}: affinity has no entry for layer {layer} (it has {sorted(affinity)})")
    return affinity[layer]


def _applied(model: nn.Module, pop: bool = False) -> ScopeResult | None:
    holder = model.__dict__.pop(_APPLIED_ATTR, None) if pop else model.__dict__.get(_APPLIED_ATTR)
    return holder.result if isinstance(holder, _Applied) else None


def _reset(model: nn.Module, layers: Sequence[MoELayer]) -> None:
    """Drop the previous scope's trained rows (and any a copied model carries); refuse LoRA layers."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError(
            "the model already carries LoRA adapters: call merge_and_unload() or unload() on the peft model "
            "before applying another scope"
        )
    previous = _applied(model, pop=True)
    if previous is not None:
        previous.remove()
    remove_trained_rows(model)


def _esft_experts(vec: torch.Tensor, top_p: float, layer: int) -> list[int]:
    """ESFT's per-layer choice: experts by decreasing share until the cumulative share reaches top_p."""
    if (vec < 0).any() or vec.sum() <= 0:
        raise ValueError(f"ESFT needs non-negative affinity with a positive sum; layer {layer} has {vec.tolist()}")
    share = vec / vec.sum()  # per layer (the public ESFT script normalises across layers)
    order = _ranking(share)
    cumulative = torch.cumsum(share[order], dim=0)
    reached = (cumulative >= top_p - 1e-9).nonzero()
    count = int(reached[0]) + 1 if len(reached) else len(order)
    return sorted(order[: max(1, count)])


def apply_scope(
    model: nn.Module,
    scope: Scope | str,
    *,
    target: Any = None,
    affinity: Any = None,
    seed: int = 0,
) -> ScopeResult:
    """Freeze ``model`` and unfreeze exactly what ``scope`` allows (Chapters 2, 5, 6).

    ``target`` is the attributed ``(layer, expert)`` (or an attribution result with
    ``.target``); ``affinity`` maps decoder-layer index to a ``[num_experts]`` affinity
    vector (Eq. 2; or a result with ``.scores``); ``seed`` fixes :func:`random_expert`'s
    draw. Expert and router scopes use :func:`uoe_nb.trainable.make_trainable` (trained
    experts as parameters of their own); a scope applied earlier to the same model is replaced.
    LoRA wraps the model in place with peft (see :func:`lora`).

    Raises :class:`~uoe_nb.moe.NoMoELayersError` for an expert or router scope on a dense
    model, ``IndexError`` for a layer or expert out of range, ``ValueError`` for a
    missing target or affinity, ``k`` larger than the number of experts, or a scope that
    matches no parameter. After an error the model keeps the scope it had before.
    """
    if isinstance(scope, str):
        scope = Scope.from_name(scope)
    if not isinstance(scope, Scope):
        raise TypeError(f"scope must be a Scope or a scope name, got {type(scope).__name__}")
    label = scope.label
    try:
        layers = find_moe_layers(model)
    except NoMoELayersError as err:
        if scope.moe_only:
            raise NoMoELayersError(
                f"scope {label!r} trains experts or routers, but {err} -- on a dense model use full() or lora()"
            ) from None
        layers = []
    previous = _applied(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _reset(model, layers)
        target_pair = _parse_target(target)
        aff = _parse_affinity(affinity, layers, label)
        num_total = sum(p.numel() for p in model.parameters())
        if scope.kind == "lora":
            result = _apply_lora(model, scope, layers, num_total)
        else:
            result = _apply_experts(model, scope, layers, target_pair, aff, seed, label)
        if result.num_trainable == 0:
            result.remove()
            raise ValueError(f"scope {result.name!r} matches no parameter of {type(model).__name__}")
    except Exception:
        # Leave the model as it was: the earlier scope's trained rows and flags.
        if previous is not None and _applied(model) is None:
            _reapply(model, previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        raise
    if result.target_layer is None and target_pair is not None:
        result.target_layer = target_pair[0]
    if scope.kind != "lora":
        model.__dict__[_APPLIED_ATTR] = _Applied(result)
    log.info(
        "scope %s: %d of %d parameters trainable (%.4f%%)",
        result.name,
        result.num_trainable,
        result.num_total,
        100 * result.fraction,
    )
    return result


def _apply_experts(
    model: nn.Module,
    scope: Scope,
    layers: Sequence[MoELayer],
    target: tuple[int, int] | None,
    affinity: dict[int, torch.Tensor] | None,
    seed: int,
    label: str,
) -> ScopeResult:
    kind = scope.kind
    all_layers = [lay.layer_index for lay in layers]
    with_shared = [lay.layer_index for lay in layers if lay.shared_parameters()]
    experts: dict[int, list[int]] = {}
    routers: list[int] = []
    shared: list[int] = []
    target_layer: int | None = None

    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        names = [n for n, _ in model.named_parameters()]
        total = sum(p.numel() for p in model.parameters())
        experts = {lay.layer_index: list(range(lay.num_experts)) for lay in layers}
        selection = TrainableSelection(
            model=model,
            experts=experts,
            routers=list(all_layers),
            shared=list(with_shared),
            names=names,
            num_trainable=total,
            num_total=total,
        )
        return ScopeResult(
            scope=scope,
            name=_LABELS[kind],
            model=model,
            selection=selection,
            num_trainable=total,
            num_total=total,
            target_layer=None,
            experts=experts,
            routers=list(all_layers),
            shared=list(with_shared),
        )

    details: list[str] = []  # what goes inside the name's parentheses
    if kind in ("experts", "experts_and_routers"):
        experts = {lay.layer_index: list(range(lay.num_experts)) for lay in layers}
        shared = list(with_shared) if scope.include_shared else []
        routers = list(all_layers) if kind == "experts_and_routers" else []
        head = _LABELS[kind]
        if with_shared and not scope.include_shared:
            details.append("shared experts frozen")
    elif kind == "routers":
        routers = list(all_layers)
        head = _LABELS[kind]
    elif kind == "uoe":
        layer_index, expert = scope.layer, scope.expert
        if layer_index is None or expert is None:
            if target is None:
                raise ValueError(
                    "scope 'UOE' needs a target expert: give uoe(layer, expert) or pass "
                    "target=(layer, expert) (the attribution result) to apply_scope"
                )
            layer_index = target[0] if layer_index is None else layer_index
            expert = target[1] if expert is None else expert
        lay = _layer_of(layers, layer_index, label)
        _check_expert(lay, expert, label)
        experts = {layer_index: [expert]}
        target_layer = layer_index
        head, details = "UOE", [f"layer {layer_index}", f"expert {expert}"]
    elif kind == "k_experts":
        lay = _layer_of(layers, scope.layer, label)
        if isinstance(scope.experts, int):
            k = scope.experts
            if k > lay.num_experts:
                raise ValueError(
                    f"scope {label!r}: k={k} is larger than the {lay.num_experts} experts of layer {lay.layer_index}"
                )
            chosen = _ranking(_need_affinity(affinity, lay.layer_index, label))[:k]
            head = f"Top-{k} experts"
        else:
            chosen = list(dict.fromkeys(scope.experts))
            for e in chosen:
                _check_expert(lay, e, label)
            head = f"{len(chosen)} expert{'s' if len(chosen) != 1 else ''}"
        experts = {lay.layer_index: sorted(chosen)}
        target_layer = lay.layer_index
        details = [f"layer {lay.layer_index}", f"experts {', '.join(map(str, chosen))}"]
    elif kind == "per_layer":
        wanted = all_layers if scope.layers == "all" else list(dict.fromkeys(scope.layers))
        for index in wanted:
            _layer_of(layers, index, label)
            experts[index] = [_ranking(_need_affinity(affinity, index, label))[0]]
        head = f"Top-1 expert in {len(wanted)} layer{'s' if len(wanted) != 1 else ''}"
        details = [f"layers {', '.join(map(str, wanted))}"]
    elif kind == "random_expert":
        layer_index = scope.layer if scope.layer is not None else (target[0] if target is not None else None)
        if layer_index is None:
            raise ValueError(
                "scope 'Random expert' needs a layer: give random_expert(layer) or pass target=(layer, expert)"
            )
        lay = _layer_of(layers, layer_index, label)
        candidates = list(range(lay.num_experts))
        if target is not None and target[0] == layer_index:
            _check_expert(lay, target[1], label)
            candidates.remove(target[1])
        if not candidates:
            raise ValueError(f"scope {label!r}: layer {layer_index} has no expert other than the target")
        expert = random.Random(seed).choice(candidates)
        experts = {layer_index: [expert]}
        target_layer = layer_index
        head, details = "Random expert", [f"layer {layer_index}", f"expert {expert}"]
    elif kind == "rmu":
        if scope.layer is None:
            raise ValueError(
                f"scope {label!r} has no steered layer: give rmu_mlps(layer), or run it through "
                "uoe_nb.unlearn.unlearn with rmu_layer set, which fills it in"
            )
        _, decoder = decoder_layers(model)
        if scope.layer >= len(decoder):
            raise IndexError(f"scope {label!r}: layer {scope.layer} is out of range (0..{len(decoder) - 1})")
        span = list(range(max(0, scope.layer - 2), scope.layer + 1))
        by_index = {lay.layer_index: lay for lay in layers}
        experts = {i: list(range(by_index[i].num_experts)) for i in span if i in by_index}
        shared = [i for i in span if i in by_index and by_index[i].shared_parameters()]
        dense = [i for i in span if i not in by_index]
        target_layer = scope.layer
        head, details = "RMU's MLPs", [f"layers {span[0]}-{span[-1]}", "all experts" if experts else "MLPs"]
    elif kind == "esft":
        for lay in layers:
            vec = _need_affinity(affinity, lay.layer_index, label)
            experts[lay.layer_index] = _esft_experts(vec, scope.top_p, lay.layer_index)
        head = "ESFT"
        details = [f"top-p {scope.top_p:g}", f"{sum(len(v) for v in experts.values())} experts"]
    else:  # pragma: no cover - Scope.__post_init__ rejects unknown kinds
        raise ValueError(f"unknown scope kind {kind!r}")

    if kind in ("uoe", "k_experts", "per_layer", "random_expert", "esft"):
        if scope.include_router:
            routers = sorted(experts)
            if kind == "esft":
                details.append("+ routers")
        elif kind != "esft":
            details.append("router frozen")
        if scope.include_shared:
            missing = [i for i in experts if i not in with_shared]
            if missing:
                raise ValueError(
                    f"scope {label!r}: layers {missing} have no shared experts; use include_shared=False"
                )
            shared = sorted(experts)
            details.append("+ shared experts")
    name = f"{head} ({', '.join(details)})" if details else head
    selection = make_trainable(model, experts, routers=routers, shared_experts=shared,
                               dense_mlps=dense if kind == "rmu" else ())  # fmt: skip
    log.debug("scope %s trains experts %s, routers %s, shared %s", name, experts, routers, shared)
    return ScopeResult(
        scope=scope,
        name=name,
        model=model,
        selection=selection,
        num_trainable=selection.num_trainable,
        num_total=selection.num_total,
        target_layer=target_layer,
        experts=dict(selection.experts),
        routers=list(routers),
        shared=list(shared),
    )


def _expert_parameter_targets(model: nn.Module, layers: Sequence[MoELayer]) -> list[str]:
    """peft ``target_parameters`` for the fused 3-D expert tensors, relative to a decoder layer
    (``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj``)."""
    layers_name, _ = decoder_layers(model)
    names: set[str] = set()
    for lay in layers:
        if not lay.fused:
            continue
        prefix = f"{layers_name}.{lay.layer_index}."
        for name, p in lay.expert_parameters().items():
            if p.dim() == 3 and name.startswith(prefix):  # per-expert biases (gpt-oss) are not matrices
                names.add(name[len(prefix) :])
    return sorted(names)


@contextlib.contextmanager
def _native_peft_targets() -> Iterator[None]:
    """Switch off peft's rewrite of LoRA targets for transformers-4 MoE checkpoints.

    So that adapters trained on transformers 4 still load, peft (>= 0.18) maps the old
    per-expert module names (``gate_proj``/``up_proj``/``down_proj``, ``w1``-``w3``, the
    router ``gate``) of several families (Mixtral, OLMoE, DeepSeek, Qwen3-MoE, ...) to the
    fused tensors. On a model built in transformers 5 that rewrite also strips LoRA from
    the dense MLPs and shared experts (same names) and puts it on the routers, so it is off
    while the adapters are created here.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # older peft or transformers 4: nothing is rewritten
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def _apply_lora(model: nn.Module, scope: Scope, layers: Sequence[MoELayer], num_total: int) -> ScopeResult:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("the LoRA scope needs peft>=0.17: pip install 'peft>=0.17'") from err
    target_parameters = _expert_parameter_targets(model, layers) if scope.include_experts else []
    target_modules: Any = scope.target_modules
    target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules
    if not target_modules and not target_parameters:
        raise ValueError(
            f"scope 'LoRA' matches no parameter of {type(model).__name__}: it has no fused expert tensors and "
            "no target_modules were given"
        )
    routers = {lay.router_name: lay.router for lay in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=scope.rank,
        lora_alpha=scope.alpha,
        lora_dropout=0.0,  # peft's parameter adapters do not support dropout
        target_modules=target_modules or [],  # [] = only the expert tensors
        exclude_modules=sorted(routers) or None,
        target_parameters=target_parameters or None,
        bias="none",
    )
    try:
        with _native_peft_targets():
            peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"scope 'LoRA' matches no parameter of {type(model).__name__}: {err}") from err
    wrapped = [name for name, router in routers.items() if model.get_submodule(name) is not router]
    if wrapped:  # pragma: no cover - guards against a future peft that rewrites targets again
        raise RuntimeError(f"peft put LoRA on the routers {wrapped}; the LoRA scope keeps routers frozen")
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    selection = LoraSelection(peft_model, config, names, target_parameters, count)
    experts = {lay.layer_index: list(range(lay.num_experts)) for lay in layers} if target_parameters else {}
    where = "all linear layers" if scope.target_modules == "all-linear" else "chosen modules"
    name = f"LoRA (rank {scope.rank}, {where}{' + experts' if target_parameters else ''})"
    return ScopeResult(
        scope=scope,
        name=name,
        model=peft_model,
        selection=selection,
        num_trainable=count,
        num_total=num_total,
        target_layer=None,
        experts=experts,
        routers=[],
        shared=[],
    )


# --------------------------------------------------------------------------------------
# Table 3
# --------------------------------------------------------------------------------------


def describe_scopes(
    model: nn.Module,
    scopes: Sequence[Scope | str],
    target: Any = None,
    affinity: Any = None,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows ``{"name", "trainable", "total", "fraction"}`` for each scope (the paper's Table 3).

    Each scope is applied in turn and undone (trained rows dropped, LoRA adapters
    unloaded); afterwards the model's ``requires_grad`` flags, and the trained rows of a
    scope applied before the call, are as they were.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = _applied(model)
    rows = []
    try:
        for scope in scopes:
            result = apply_scope(model, scope, target=target, affinity=affinity, seed=seed)
            rows.append(result.row())
            if isinstance(result.selection, LoraSelection):
                result.model.unload()
            else:
                result.remove()
            model.__dict__.pop(_APPLIED_ATTR, None)
    finally:
        model.__dict__.pop(_APPLIED_ATTR, None)
        if previous is not None:
            _reapply(model, previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
    return rows


def _reapply(model: nn.Module, previous: ScopeResult) -> None:
    """Split again the trained rows of a scope replaced by :func:`describe_scopes` or by a
    failed :func:`apply_scope` (from the fused tensors, which hold their values)."""
    sel = previous.selection
    if isinstance(sel, TrainableSelection) and sel.split:
        remove_trained_rows(model)
        previous.selection = make_trainable(model, sel.experts, routers=sel.routers, shared_experts=sel.shared)
    model.__dict__[_APPLIED_ATTR] = _Applied(previous)
