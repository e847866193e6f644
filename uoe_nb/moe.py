"""One adapter layer for every transformers-5 mixture-of-experts family (Chapter 1).

Everything else in ``uoe_nb`` asks this module where a model keeps its routers and
experts, so a new MoE family needs no change anywhere else.

In transformers 5 a routed-expert block (the paper's Section 3, "Preliminaries") is

* a **router** whose forward returns, for the flattened tokens of a batch,
  ``(router_logits, top_k_weights, top_k_index)`` for nearly every family; the model
  class names the router class in ``_can_record_outputs["router_logits"]``;
* an **experts** module that stores every expert of the layer in fused 3-D tensors
  whose first dimension is the expert index (``gate_up_proj[E, 2I, H]``,
  ``down_proj[E, H, I]``; some families transpose the last two dimensions);
* optionally **shared experts** that every token uses.

The router scores every expert, ``s = softmax(router(u))`` (a sigmoid for
DeepSeek-V3-style routers), and the block mixes the top-K experts with weights ``g``
(the paper's ``g_{i,t}``: ``s_i`` for the chosen experts, 0 elsewhere; some families
renormalise or rescale the chosen weights, and :func:`capture_routing` records the
weights the model actually applies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "SUPPORTED_FAMILIES",
    "MoELayer",
    "NoMoELayersError",
    "RoutingCapture",
    "RoutingRecord",
    "capture_routing",
    "changed_parameters",
    "decoder_layers",
    "find_moe_layers",
    "moe_layer",
    "parameter_counts",
]

# Families checked by the test suite on tiny random models (``tests/test_moe.py``).
SUPPORTED_FAMILIES = (
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "olmoe",
    "granitemoe",
    "phimoe",
    "gpt_oss",
    "llama4_text",
)

# Router families that score with a sigmoid rather than a softmax over experts.
_SIGMOID_ROUTER_TYPES = ("deepseek_v3", "glm4_moe", "dots1", "llama4_text", "llama4")
_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)


class NoMoELayersError(ValueError):
    """Raised when a model has no routed-expert layer."""


@dataclass
class MoELayer:
    """Where one decoder layer keeps its router and experts.

    ``layer_index`` is the decoder-layer index (dense layers are skipped, so the
    position of a layer in :func:`find_moe_layers`' list is *not* its index).
    """

    layer_index: int
    block_name: str
    block: nn.Module
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    num_experts: int
    top_k: int
    scoring: str  # "softmax" or "sigmoid"
    fused: bool
    router_output_index: int = 0
    shared_experts: nn.Module | None = None
    shared_experts_name: str | None = None
    shared_gate: nn.Module | None = None

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of the experts module, keyed by their full name in the model.

        For fused layouts every tensor has the expert index as dimension 0 (trained rows
        split off by :mod:`uoe_nb.trainable` are not among them).
        """
        params = self.experts.named_parameters(recurse=not self.fused)
        return {f"{self.experts_name}.{n}": p for n, p in params}

    def single_expert_parameters(self, expert: int) -> dict[str, torch.Tensor]:
        """The parameters that belong to one expert (views into fused tensors)."""
        self._check_expert(expert)
        if self.fused:
            return {n: p[expert] for n, p in self.expert_parameters().items()}
        module = self.experts[expert]
        return {f"{self.experts_name}.{expert}.{n}": p for n, p in module.named_parameters()}

    def expert_numel(self) -> int:
        """Number of parameters of one routed expert."""
        if self.fused:
            return sum(p[0].numel() for p in self.expert_parameters().values())
        return sum(p.numel() for p in self.experts[0].parameters())

    def router_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{self.router_name}.{n}": p for n, p in self.router.named_parameters()}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        if self.shared_experts is not None:
            out.update({f"{self.shared_experts_name}.{n}": p for n, p in self.shared_experts.named_parameters()})
        if self.shared_gate is not None:
            name = f"{self.block_name}.shared_expert_gate"
            out.update({f"{name}.{n}": p for n, p in self.shared_gate.named_parameters()})
        return out

    def _check_expert(self, expert: int) -> None:
        if not 0 <= int(expert) < self.num_experts:
            raise IndexError(
                f"expert {expert} is out of range for layer {self.layer_index}, "
                f"which has {self.num_experts} experts (0..{self.num_experts - 1})"
            )


# --------------------------------------------------------------------------------------
# Finding the layers
# --------------------------------------------------------------------------------------


def _router_recorder(model: nn.Module):
    """The ``OutputRecorder`` a transformers model declares for ``router_logits``, if any."""
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        spec = recorders.get("router_logits") if isinstance(recorders, Mapping) else None
        if spec is not None:
            return spec
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers (the longest ``*.layers`` ModuleList)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise NoMoELayersError(
            f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList named "
            f"'layers' (supported families: {', '.join(SUPPORTED_FAMILIES)})"
        )
    return best


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def _scoring(router: nn.Module, config) -> str:
    scoring = getattr(config, "scoring_func", None)
    if scoring in ("softmax", "sigmoid"):
        return scoring
    if hasattr(router, "e_score_correction_bias"):
        return "sigmoid"
    if getattr(config, "model_type", None) in _SIGMOID_ROUTER_TYPES:
        return "sigmoid"
    return "softmax"


def _is_router_candidate(name: str, module: nn.Module, router_class) -> bool:
    if router_class is not None:
        return isinstance(module, router_class)
    # Remote-code models without a recorder: a 2-D ``gate``/``router`` weight next to experts.
    leaf = name.split(".")[-1]
    weight = getattr(module, "weight", None)
    return leaf in ("gate", "router") and isinstance(weight, torch.Tensor) and weight.dim() == 2


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every decoder layer with a routed-expert block, in layer order (Chapter 1).

    Routers are found through the model's recorded ``router_logits`` outputs
    (``_can_record_outputs``), so any transformers-5 MoE causal LM works without a
    per-family table; remote-code models with a ``gate`` module and an ``experts``
    ModuleList work too. Dense layers are skipped. Raises :class:`NoMoELayersError`
    for a model without routed experts.
    """
    spec = _router_recorder(model)
    router_class = getattr(spec, "target_class", None) if spec is not None else None
    output_index = getattr(spec, "index", 0) if spec is not None else 0
    config = _config_of(model)
    layers_name, layers = decoder_layers(model)
    found: list[MoELayer] = []
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}"
        for name, module in layer.named_modules():
            if not name or not _is_router_candidate(name, module, router_class):
                continue
            block_name = name.rsplit(".", 1)[0] if "." in name else ""
            block = layer.get_submodule(block_name) if block_name else layer
            experts = getattr(block, "experts", None)
            if experts is None:
                continue
            fused = not isinstance(experts, nn.ModuleList)
            router = module
            num_experts = int(getattr(router, "num_experts", 0) or router.weight.shape[0])
            top_k = (
                getattr(router, "top_k", None)
                or getattr(block, "top_k", None)
                or getattr(config, "num_experts_per_tok", None)
            )
            if top_k is None:
                raise ValueError(f"cannot tell how many experts layer {index} routes each token to")
            shared_name, shared = None, None
            for candidate in _SHARED_EXPERT_NAMES:
                if isinstance(getattr(block, candidate, None), nn.Module):
                    shared_name, shared = candidate, getattr(block, candidate)
                    break
            shared_gate = next(
                (getattr(block, g) for g in _SHARED_GATE_NAMES if isinstance(getattr(block, g, None), nn.Module)),
                None,
            )
            full_block = f"{prefix}.{block_name}" if block_name else prefix
            found.append(
                MoELayer(
                    layer_index=index,
                    block_name=full_block,
                    block=block,
                    router_name=f"{prefix}.{name}",
                    router=router,
                    experts_name=f"{full_block}.experts",
                    experts=experts,
                    num_experts=num_experts,
                    top_k=int(top_k),
                    scoring=_scoring(router, config),
                    fused=fused,
                    router_output_index=output_index,
                    shared_experts=shared,
                    shared_experts_name=f"{full_block}.{shared_name}" if shared_name else None,
                    shared_gate=shared_gate,
                )
            )
            break
    if not found:
        raise NoMoELayersError(
            f"model {type(model).__name__} has no MoE layers: UOE needs a mixture-of-experts model "
            f"(supported families: {', '.join(SUPPORTED_FAMILIES)}, and any transformers-5 MoE "
            "model that records router_logits)"
        )
    return found


def moe_layer(model: nn.Module, layer_index: int, layers: Sequence[MoELayer] | None = None) -> MoELayer:
    """The :class:`MoELayer` at decoder-layer index ``layer_index`` (clear error if none)."""
    layers = list(layers) if layers is not None else find_moe_layers(model)
    for layer in layers:
        if layer.layer_index == layer_index:
            return layer
    raise IndexError(
        f"decoder layer {layer_index} has no routed experts; MoE layers of this model are "
        f"{[lay.layer_index for lay in layers]}"
    )


# --------------------------------------------------------------------------------------
# Capturing routing
# --------------------------------------------------------------------------------------


@dataclass
class RoutingRecord:
    """One MoE layer's routing for one forward pass, shaped ``[batch, seq, ...]``.

    ``scores``: the full score distribution over all experts (softmax or sigmoid of the
    logits, the paper's ``s``). ``weights``: the routing weights the block actually
    applied, scattered to ``[batch, seq, num_experts]`` (0 for experts not selected; the
    paper's ``g``, after any renormalisation the family applies). ``top_k_index``: the
    selected experts. ``mask``: 1 for real tokens, 0 for padding; padding rows of
    ``scores``, ``weights`` and ``logits`` are set to 0.
    """

    layer_index: int
    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    top_k_index: torch.Tensor
    mask: torch.Tensor

    def selected(self) -> torch.Tensor:
        """Boolean ``[batch, seq, num_experts]``: which experts each real token used."""
        one_hot = torch.zeros_like(self.scores, dtype=torch.bool)
        one_hot.scatter_(-1, self.top_k_index, True)
        return one_hot & self.mask.bool().unsqueeze(-1)


@dataclass
class RoutingCapture:
    """What :func:`capture_routing` recorded: a list of records per layer, one per forward."""

    layers: list[MoELayer]
    records: dict[int, list[RoutingRecord]] = field(default_factory=dict)

    def __getitem__(self, layer_index: int) -> list[RoutingRecord]:
        return self.records[layer_index]

    def tokens(self, layer_index: int, what: str = "weights") -> torch.Tensor:
        """``[num_real_tokens, num_experts]`` rows of ``what`` over all recorded passes."""
        rows = [getattr(r, what)[r.mask.bool()] for r in self.records.get(layer_index, [])]
        if not rows:
            raise ValueError(f"nothing was recorded for layer {layer_index}")
        return torch.cat(rows)

    def clear(self) -> None:
        for rec in self.records.values():
            rec.clear()


def _parse_router_output(output, layer: MoELayer):
    """(logits, dense applied weights or None, top-k index or None) from a router's output."""
    if isinstance(output, torch.Tensor):
        return output, None, None
    out = tuple(output)
    logits = out[layer.router_output_index]
    if len(out) >= 3 and not torch.is_floating_point(out[2]) and out[2].shape[-1] == layer.top_k:
        index = out[2].long()
        dense = torch.zeros_like(logits, dtype=out[1].dtype).scatter(-1, index, out[1])
        return logits, dense, index
    if len(out) == 2 and out[0].shape == out[1].shape:
        # Llama-4 style: (dense applied scores, logits).
        dense = out[0]
        index = torch.topk(dense, layer.top_k, dim=-1).indices
        return logits, dense, index
    raise NotImplementedError(
        f"router output of {type(layer.router).__name__} is not understood: expected "
        "(router_logits, top_k_weights, top_k_index)"
    )


@contextlib.contextmanager
def capture_routing(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    *,
    detach: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[RoutingCapture]:
    """Record each MoE layer's router logits, scores and applied weights (Chapter 1).

    Use as ``with capture_routing(model) as cap: model(**batch)``; then
    ``cap[layer_index]`` is a list of :class:`RoutingRecord`, one per forward pass.
    The attention mask is read from the forward call (``attention_mask`` keyword) so
    that padding tokens are masked; pass ``attention_mask`` here for models called
    without one. ``detach=False`` keeps the autograd graph (for losses on routing,
    such as the anchor loss).
    """
    all_layers = find_moe_layers(model)
    wanted = set(layers) if layers is not None else {lay.layer_index for lay in all_layers}
    unknown = wanted - {lay.layer_index for lay in all_layers}
    if unknown:
        raise IndexError(
            f"layers {sorted(unknown)} have no routed experts; MoE layers are "
            f"{[lay.layer_index for lay in all_layers]}"
        )
    chosen = [lay for lay in all_layers if lay.layer_index in wanted]
    capture = RoutingCapture(layers=chosen, records={lay.layer_index: [] for lay in chosen})
    state: dict[str, torch.Tensor | None] = {"mask": attention_mask, "shape": None}

    def pre_hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is not None:
            state["shape"] = tuple(ref.shape[:2])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            state["mask"] = mask
        elif attention_mask is None:
            state["mask"] = None

    def make_hook(layer: MoELayer):
        def hook(_module, _inputs, output):
            logits, dense, index = _parse_router_output(output, layer)
            shape = state["shape"]
            if shape is None or shape[0] * shape[1] != logits.shape[0]:
                shape = (1, logits.shape[0])
            logits = logits.float().reshape(*shape, -1)
            if layer.scoring == "sigmoid":
                scores = torch.sigmoid(logits)
            else:
                scores = torch.softmax(logits, dim=-1)
            if dense is None:  # a router that returns only logits (remote-code style)
                index = torch.topk(scores, layer.top_k, dim=-1).indices.reshape(-1, layer.top_k)
                dense = torch.zeros_like(scores.reshape(-1, scores.shape[-1])).scatter(
                    -1, index, scores.reshape(-1, scores.shape[-1]).gather(-1, index)
                )
            weights = dense.float().reshape(*shape, -1)
            index = index.reshape(*shape, -1)
            mask = state["mask"]
            if mask is None or tuple(mask.shape) != tuple(shape):
                mask = torch.ones(shape, dtype=torch.long, device=logits.device)
            keep = mask.to(logits.device).bool().unsqueeze(-1)
            tensors = [t.masked_fill(~keep, 0.0) for t in (logits, scores, weights)]
            if detach:
                tensors = [t.detach() for t in tensors]
            capture.records[layer.layer_index].append(
                RoutingRecord(layer.layer_index, *tensors, index.detach(), mask.to(logits.device).detach())
            )

        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for lay in chosen:
            handles.append(lay.router.register_forward_hook(make_hook(lay)))
        yield capture
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------
# What changed
# --------------------------------------------------------------------------------------


def changed_parameters(
    model: nn.Module, reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor | bool]:
    """Which parameters differ (bitwise) from ``reference`` (a state-dict snapshot).

    For fused expert tensors the value is a boolean vector over the expert dimension
    telling which experts changed; for other tensors it is ``True``. Unchanged
    parameters are left out.
    """
    try:
        fused = {n for lay in find_moe_layers(model) if lay.fused for n in lay.expert_parameters()}
    except NoMoELayersError:
        fused = set()
    # Trained rows split off by uoe_nb.trainable are copies of fused rows, compared there.
    split = {id(p) for m in model.modules() if type(m).__name__ == "TrainedRows" for p in m.parameters()}
    out: dict[str, torch.Tensor | bool] = {}
    for name, p in model.named_parameters():
        if id(p) in split:
            continue
        ref = reference[name].to(p.device)
        if torch.equal(p.detach(), ref):
            continue
        if name in fused:
            out[name] = (p.detach() != ref).flatten(1).any(dim=1).cpu()
        else:
            out[name] = True
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and the parameters active for one token (Chapter 1).

    A token uses ``top_k`` of a layer's ``num_experts`` routed experts, so each MoE
    layer contributes ``(num_experts - top_k) * expert_size`` inactive parameters.
    For a dense model both numbers are equal.
    """
    total = sum(p.numel() for p in model.parameters())
    try:
        layers = find_moe_layers(model)
    except NoMoELayersError:
        layers = []
    inactive = sum((lay.num_experts - lay.top_k) * lay.expert_numel() for lay in layers)
    return {"total": total, "active": total - inactive}
