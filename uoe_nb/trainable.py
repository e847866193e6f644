"""Train only what trains: how a chosen set of experts and routers becomes trainable (Chapters 1, 5, 6).

In transformers 5 every routed expert of a layer lives in fused 3-D tensors
(``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``). UOE trains one row of them. Making
the fused tensor trainable and masking its gradient would still allocate a gradient and
optimizer state for all ``E`` experts, and weight decay would move every expert. So:

* the **trained rows become parameters of their own** (``experts.trained.gate_up_proj``
  of shape ``[k, 2I, H]`` for ``k`` trained experts), in the model's dtype;
* the fused tensors **do not require gradients**; the experts module's forward runs the
  family's own fused call with the trained experts' routing weights set to 0, then adds
  the trained experts' output computed from their own weights (the family's expert
  function: gate, activation, optional biases and transposed layout), so no layer-sized
  tensor is built for the backward pass;
* :meth:`TrainableSelection.write_back` copies the trained rows into the fused tensors
  (the training loop does it after every optimizer step), and
  :meth:`TrainableSelection.remove` writes back and restores the plain module.

Everything not selected is frozen by construction, so it stays bitwise unchanged; a
``copy.deepcopy`` of a prepared model carries its own trained rows; and a patch
(:mod:`uoe_nb.patches`) of the finished model stores exactly the trained rows. A layer
whose experts are *all* trained (the pilot study's scopes) trains its fused tensors
directly: there is nothing to split. Experts stored as one module each (remote-code
models) are trained by ``requires_grad`` on those modules.

:class:`MasterWeights` is the second half: in a bf16 or fp16 model an AdamW update at the
paper's learning rates (1e-5 to 1e-4) is mostly below the weights' rounding step, so the
trained parameters are optimised as fp32 master copies and written back in the model's
dtype after each step (with dynamic loss scaling for fp16).

Scopes (:mod:`uoe_nb.scopes`) only say *what* trains; this module is the one place that
knows *how*.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .moe import MoELayer, NoMoELayersError, decoder_layers, find_moe_layers, moe_layer

__all__ = [
    "MasterWeights",
    "TrainableSelection",
    "TrainedRows",
    "make_trainable",
    "remove_trained_rows",
    "trained_rows",
]

_HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Trained rows of a fused experts module
# --------------------------------------------------------------------------------------


class TrainedRows(nn.Module):
    """The trained experts of one fused experts module, as parameters of their own.

    Each fused tensor ``name`` of shape ``[E, ...]`` has a twin ``name`` of shape
    ``[k, ...]`` here, holding rows ``experts`` (in that order).
    """

    def __init__(self, fused: Mapping[str, nn.Parameter], experts: Sequence[int]):
        super().__init__()
        self.experts = tuple(int(e) for e in experts)
        index = torch.tensor(self.experts, dtype=torch.long)
        for name, p in fused.items():
            rows = p.detach().index_select(0, index.to(p.device)).clone()
            self.register_parameter(name, nn.Parameter(rows, requires_grad=True))

    def extra_repr(self) -> str:
        return f"experts={list(self.experts)}"


def _expert_output(module: nn.Module, rows: TrainedRows, j: int, x: torch.Tensor) -> torch.Tensor:
    """Output of trained expert ``rows.experts[j]`` for tokens ``x`` ``[n, H]``, from its own weights.

    Mirrors the family's expert function: transformers' ``use_experts_implementation``
    interface (``has_gate``, ``is_transposed``, ``has_bias``, ``_apply_gate``, ``act_fn``,
    ``post_expert_norm``), or Llama-4's transposed gate-up/down layout.
    """

    def linear(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
        out = inp @ weight if transposed else inp @ weight.transpose(-2, -1)
        return out + bias if bias is not None else out

    dtype = x.dtype
    if hasattr(module, "has_gate"):
        transposed = bool(module.is_transposed)
        first = "gate_up_proj" if module.has_gate else "up_proj"
        bias = getattr(rows, f"{first}_bias")[j].to(dtype) if module.has_bias else None
        h = linear(x, getattr(rows, first)[j].to(dtype), bias, transposed)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        bias = rows.down_proj_bias[j].to(dtype) if module.has_bias else None
        h = linear(h, rows.down_proj[j].to(dtype), bias, transposed)
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        return h
    if hasattr(module, "gate_up_proj") and hasattr(module, "act_fn") and hasattr(module, "expert_dim"):
        gate, up = (x @ rows.gate_up_proj[j].to(dtype)).chunk(2, dim=-1)  # Llama-4
        return (up * module.act_fn(gate)) @ rows.down_proj[j].to(dtype)
    raise NotImplementedError(
        f"cannot compute one expert of {type(module).__name__} from its own weights: expected transformers' "
        "fused experts interface (gate_up_proj/down_proj with has_gate, is_transposed, _apply_gate)"
    )


def _routed_forward(self, hidden_states, *args, **kwargs):
    """Fused call without the trained experts, plus the trained experts from their own rows."""
    rows: TrainedRows = self.trained
    base = type(self).__mro__[1]
    args = list(args)
    index = args.pop(0) if args else kwargs.pop("top_k_index", kwargs.pop("router_indices", None))
    weights = args.pop(0) if args else kwargs.pop("top_k_weights", kwargs.pop("routing_weights", None))
    if index is None:  # Llama-4: tokens arrive grouped per expert, routing already applied
        out = base.forward(self, hidden_states, *args, **kwargs)
        groups = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        new = torch.stack([_expert_output(self, rows, j, groups[e]) for j, e in enumerate(rows.experts)])
        out = out.view(self.num_experts, -1, out.shape[-1])
        where = torch.tensor(rows.experts, device=out.device)
        return out.index_copy(0, where, new.to(out.dtype)).view(-1, out.shape[-1])
    trained = torch.zeros_like(index, dtype=torch.bool)
    for e in rows.experts:
        trained |= index == e
    out = base.forward(self, hidden_states, index, weights.masked_fill(trained, 0), *args, **kwargs)
    for j, e in enumerate(rows.experts):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        y = _expert_output(self, rows, j, hidden_states[token])
        y = y * weights[token, slot].unsqueeze(-1).to(y.dtype)
        out = out.index_add(0, token, y.to(out.dtype))
    return out


_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(base: type) -> type:
    """``base`` with :func:`_routed_forward` (one class per family, importable for pickle)."""
    if base not in _ROUTED_CLASSES:
        name = f"{base.__name__}WithTrainedRows"
        cls = type(name, (base,), {"forward": _routed_forward, "__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)
        _ROUTED_CLASSES[base] = cls
    return _ROUTED_CLASSES[base]


def trained_rows(experts: nn.Module) -> TrainedRows | None:
    """The :class:`TrainedRows` of a fused experts module, or ``None`` when it has none."""
    rows = experts._modules.get("trained")
    return rows if isinstance(rows, TrainedRows) else None


def _split(experts: nn.Module, chosen: Sequence[int]) -> TrainedRows:
    if trained_rows(experts) is not None:
        raise RuntimeError(
            f"{type(experts).__name__} already has trained rows (experts {list(trained_rows(experts).experts)}): "
            "call .remove() on the earlier selection first"
        )
    fused = dict(experts.named_parameters(recurse=False))
    rows = TrainedRows(fused, chosen)
    experts.trained = rows
    experts.__class__ = _routed_class(type(experts))
    return rows


@torch.no_grad()
def _write_back(experts: nn.Module) -> None:
    rows = trained_rows(experts)
    if rows is None:
        return
    for name, p in experts.named_parameters(recurse=False):
        twin = getattr(rows, name)
        index = torch.tensor(rows.experts, device=p.device)
        p.index_copy_(0, index, twin.detach().to(p.device, p.dtype))


def _unsplit(experts: nn.Module) -> None:
    if trained_rows(experts) is None:
        return
    _write_back(experts)
    del experts._modules["trained"]
    experts.__class__ = type(experts).__mro__[1]


# --------------------------------------------------------------------------------------
# The selection
# --------------------------------------------------------------------------------------


@dataclass
class TrainableSelection:
    """What :func:`make_trainable` unfroze.

    ``experts`` maps decoder-layer index to its trained experts; ``names`` are the
    trainable parameters' names (the trained rows as ``...experts.trained.<tensor>``);
    ``num_trainable`` counts exactly the values that can change.
    """

    model: nn.Module
    experts: dict[int, list[int]]
    routers: list[int]
    shared: list[int]
    names: list[str]
    num_trainable: int
    num_total: int
    split: list[str] = field(default_factory=list)  # names of experts modules with trained rows

    @property
    def fraction(self) -> float:
        """Trainable parameters / all parameters of the model (the trained rows not counted twice)."""
        return self.num_trainable / self.num_total

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """One AdamW group: only selected values are parameters, so decay touches nothing else."""
        return [{"params": self.parameters(), "weight_decay": weight_decay}]

    def original_values(self, device: str | torch.device = "cpu") -> dict[str, tuple[list[int] | None, torch.Tensor]]:
        """Copies (on ``device``) of what this selection can change, keyed by the plain model's
        parameter names: ``(rows, values)`` with the trained rows of a fused tensor, or
        ``(None, values)`` for a whole tensor. For a whole-model scope this is a copy of every
        parameter (host memory by default: the price of giving the base model back)."""
        params = dict(self.model.named_parameters())
        out: dict[str, tuple[list[int] | None, torch.Tensor]] = {}
        for name in self.names:
            if ".trained." in name:
                experts_name, _, tensor = name.partition(".trained.")
                rows = list(trained_rows(self.model.get_submodule(experts_name)).experts)
                out[f"{experts_name}.{tensor}"] = (rows, params[name].detach().to(device, copy=True))
            else:
                out[name] = (None, params[name].detach().to(device, copy=True))
        return out

    def write_back(self) -> None:
        """Copy the trained rows into the fused tensors (after an optimizer step)."""
        for name in self.split:
            _write_back(self.model.get_submodule(name))

    def remove(self) -> None:
        """Write the trained rows back and restore the plain experts modules; freeze everything."""
        for name in self.split:
            _unsplit(self.model.get_submodule(name))
        for p in self.model.parameters():
            p.requires_grad_(False)


def make_trainable(
    model: nn.Module,
    experts: Mapping[int, Sequence[int]] | None = None,
    *,
    routers: Iterable[int] = (),
    shared_experts: Iterable[int] = (),
    dense_mlps: Iterable[int] = (),
) -> TrainableSelection:
    """Freeze the model, then unfreeze exactly the chosen experts, routers and shared experts.

    ``experts`` maps decoder-layer index to expert indices; ``routers`` and
    ``shared_experts`` list decoder-layer indices whose router / shared experts train too;
    ``dense_mlps`` decoder layers without routed experts whose ``mlp`` trains whole (RMU's set).
    In a fused layer the chosen experts become parameters of their own (see the module
    docstring) unless all of the layer's experts are chosen. Use
    :meth:`TrainableSelection.param_groups` for the optimizer,
    :meth:`~TrainableSelection.write_back` after each step, and
    :meth:`~TrainableSelection.remove` when done.
    """
    experts = {int(k): sorted({int(e) for e in v}) for k, v in (experts or {}).items()}
    routers = sorted({int(r) for r in routers})
    shared = sorted({int(s) for s in shared_experts})
    dense = sorted({int(d) for d in dense_mlps})
    if not experts and not routers and not shared and not dense:
        raise ValueError("nothing to train: give at least one expert, router or shared-expert layer")
    try:
        layers = find_moe_layers(model)
    except NoMoELayersError:
        if experts or routers or shared:
            raise
        layers = []  # a dense model: only its MLPs can train (RMU's set)
    chosen_layers: list[tuple[MoELayer, list[int]]] = []
    for layer_index, chosen in experts.items():
        layer = moe_layer(model, layer_index, layers)
        if not chosen:
            raise ValueError(f"empty expert list for layer {layer_index}")
        for e in chosen:
            layer._check_expert(e)
        if layer.fused and trained_rows(layer.experts) is not None:
            raise RuntimeError(
                f"{layer.experts_name} already has trained rows: call .remove() on the earlier selection first"
            )
        chosen_layers.append((layer, chosen))
    for layer_index in (*routers, *shared):
        moe_layer(model, layer_index, layers)
    for layer_index in shared:
        if not moe_layer(model, layer_index, layers).shared_parameters():
            raise ValueError(f"layer {layer_index} has no shared experts")

    for p in model.parameters():
        p.requires_grad_(False)
    names: list[str] = []
    split: list[str] = []
    count = 0
    for layer, chosen in chosen_layers:
        if layer.fused and len(chosen) < layer.num_experts:
            rows = _split(layer.experts, chosen)
            split.append(layer.experts_name)
            for name, p in rows.named_parameters():
                names.append(f"{layer.experts_name}.trained.{name}")
                count += p.numel()
        elif layer.fused:
            for name, p in layer.expert_parameters().items():
                p.requires_grad_(True)
                names.append(name)
                count += p.numel()
        else:
            for e in chosen:
                for name, p in layer.single_expert_parameters(e).items():
                    names.append(name)
                    count += p.numel()
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    for layer_index in routers:
        for name, p in moe_layer(model, layer_index, layers).router_parameters().items():
            p.requires_grad_(True)
            names.append(name)
            count += p.numel()
    for layer_index in shared:
        for name, p in moe_layer(model, layer_index, layers).shared_parameters().items():
            p.requires_grad_(True)
            names.append(name)
            count += p.numel()
    if dense:
        layers_name, decoder = decoder_layers(model)
        moe_indices = {lay.layer_index for lay in layers}
        for layer_index in dense:
            mlp = getattr(decoder[layer_index], "mlp", None) if 0 <= layer_index < len(decoder) else None
            if layer_index in moe_indices or mlp is None:
                raise ValueError(f"decoder layer {layer_index} has no dense mlp to train")
            for name, p in mlp.named_parameters():
                p.requires_grad_(True)
                names.append(f"{layers_name}.{layer_index}.mlp.{name}")
                count += p.numel()
    trained_numel = sum(params[n].numel() for n in names if ".trained." in n)
    total = sum(p.numel() for p in model.parameters()) - trained_numel
    return TrainableSelection(
        model=model,
        experts=experts,
        routers=routers,
        shared=shared,
        names=names,
        num_trainable=count,
        num_total=total,
        split=split,
    )


def remove_trained_rows(model: nn.Module) -> int:
    """Write back and drop every :class:`TrainedRows` in ``model``; returns how many were dropped."""
    found = [m for m in model.modules() if trained_rows(m) is not None]
    for module in found:
        _unsplit(module)
    return len(found)


# --------------------------------------------------------------------------------------
# fp32 master weights for half-precision models
# --------------------------------------------------------------------------------------


class MasterWeights:
    """AdamW over fp32 master copies of half-precision parameters.

    ``params`` are the model's trainable parameters. With ``enabled``, each bf16/fp16
    parameter gets an fp32 master copy that the optimizer updates; after every step the
    master is rounded into the parameter. fp32 parameters are optimised directly. In an
    fp16 model the loss is scaled (dynamic loss scaling: halved and the step skipped on
    overflow, doubled after ``growth_interval`` good steps) so small gradients do not
    underflow. Without ``enabled`` this is plain AdamW in the parameters' dtype.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.0,
        enabled: bool = True,
        growth_interval: int = 200,
    ):
        self.params = list(params)
        self.masters: list[torch.Tensor | None] = []
        for p in self.params:
            if enabled and p.dtype in _HALF:
                self.masters.append(p.detach().float().clone())
            else:
                self.masters.append(None)
        targets = [m if m is not None else p for p, m in zip(self.params, self.masters, strict=True)]
        self.optimizer = torch.optim.AdamW(targets, lr=lr, weight_decay=weight_decay)
        fp16 = any(p.dtype == torch.float16 for p in self.params)
        self.scale = 2.0**16 if fp16 else 1.0
        self._good_steps, self._growth_interval = 0, growth_interval
        self.skipped = 0

    @property
    def targets(self) -> list[torch.Tensor]:
        return [m if m is not None else p for p, m in zip(self.params, self.masters, strict=True)]

    def state_bytes(self) -> int:
        """Bytes of master copies and optimizer moments (after the first step)."""
        n = sum(m.numel() * m.element_size() for m in self.masters if m is not None)
        for state in self.optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return n

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward() if self.scale != 1.0 else loss.backward()

    def step(self, grad_clip: float | None = None) -> str:
        """Unscale, check, clip and apply the gradients.

        Returns ``"ok"``; ``"skipped"`` when fp16 gradients overflowed (no update, the loss
        scale is halved); ``"nonfinite"`` when they are not finite at scale 1 (no update).
        """
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not None:
                m.grad = None if p.grad is None else p.grad.detach().float()
                p.grad = None
        targets = [t for t in self.targets if t.grad is not None]
        if self.scale != 1.0:
            for t in targets:
                t.grad.div_(self.scale)
        finite = bool(torch.stack([torch.isfinite(t.grad).all() for t in targets]).all()) if targets else True
        if not finite:
            self.zero_grad()
            if self.scale > 1.0:
                self.scale, self._good_steps = self.scale / 2.0, 0
                self.skipped += 1
                return "skipped"
            return "nonfinite"
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(targets, grad_clip)
        self.optimizer.step()
        self.zero_grad()
        self.sync()
        if self.scale != 1.0:
            self._good_steps += 1
            if self._good_steps % self._growth_interval == 0:
                self.scale = min(self.scale * 2.0, 2.0**24)
        return "ok"

    @torch.no_grad()
    def sync(self) -> None:
        """Round the masters into the parameters."""
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not None:
                p.copy_(m)

    @torch.no_grad()
    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Set parameters (and masters) to ``values`` (e.g. a kept checkpoint, any device)."""
        for p, m, v in zip(self.params, self.masters, values, strict=True):
            if m is not None:
                m.copy_(v)
                p.copy_(m)
            else:
                p.copy_(v)

    def snapshot(self, device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """The current values at full precision (masters where there are some), copied to ``device``."""
        return [t.detach().to(device, copy=True) for t in self.targets]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            if m is not None:
                m.grad = None

    def close(self) -> None:
        """Free the optimizer state, the masters and every gradient."""
        self.zero_grad()
        self.optimizer.state.clear()
        self.masters = [None for _ in self.masters]
