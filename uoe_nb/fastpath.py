"""Do not pay for frozen layers: cheaper UOE steps by skipping what cannot change.

A UOE step (Section 4 of the paper) trains one expert of the target layer L plus that
layer's router; every parameter below L is frozen. Three savings follow, and each is
exact, not an approximation:

* the backward pass never goes below L (autograd builds no graph through layers whose
  inputs and parameters do not require grad);
* the frozen layers below L map a batch to the same input of layer L every time the
  batch is seen, so :class:`LayerInputCache` computes that input once and
  :func:`forward_from_layer` restarts the model from it;
* RMU's forget loss ``MSE(h_L(forget), u)`` (Li et al. 2024; RMU+UOE in Table 2 of the
  paper puts it at the UOE target layer) lives on layer L's output, so the layers above
  L, the final norm and the LM head need not run at all (:func:`hidden_after_layer`, or
  ``forward_from_layer(..., run_above=False)``).

The measured effect at real size is in ``benchmarks/step_cost.py``. Everything here
works for any transformers-5 causal LM whose decoder layers sit in one ``ModuleList``
(:func:`uoe_nb.moe.decoder_layers`); because some families do work outside the layers,
the cached path checks itself against a full forward the first time it runs and raises
:class:`FastPathMismatchError` rather than silently returning different numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .moe import decoder_layers

__all__ = [
    "FastPathMismatchError",
    "FromLayerOutput",
    "LayerInputCache",
    "LayerStop",
    "batch_key",
    "forward_from_layer",
    "hidden_after_layer",
    "stop_after_layer",
]

log = logging.getLogger(__name__)

# Tolerances of the exactness check, per dtype. The cached path runs the same kernels on
# the same tensors, so float32 results agree to rounding noise.
_TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


class FastPathMismatchError(RuntimeError):
    """The cached-input path does not reproduce the full forward for this model family."""


class _StopForward(Exception):
    """Raised inside a forward hook to end a forward pass early (never leaves this module)."""


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _layers_checked(model: nn.Module, layer_index: int) -> nn.ModuleList:
    _, layers = decoder_layers(model)
    if not isinstance(layer_index, int) or not 0 <= layer_index < len(layers):
        raise IndexError(
            f"layer_index {layer_index!r} is out of range: {type(model).__name__} has {len(layers)} decoder "
            f"layers (0..{len(layers) - 1})"
        )
    return layers


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple whose first item is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError(
        "cannot find the hidden states among a decoder layer's arguments: expected them as the first "
        "positional argument or as the keyword 'hidden_states'"
    )


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise KeyError(
            f"the batch has no 'input_ids' (keys: {sorted(batch)}); pass tokenizer outputs, e.g. from "
            "uoe_nb.routing.batches"
        )
    return dict(batch)


# --------------------------------------------------------------------------------------
# Stopping a forward pass after one layer
# --------------------------------------------------------------------------------------


@dataclass
class LayerStop:
    """What :func:`stop_after_layer` caught: the output hidden states of the layer."""

    layer_index: int
    hidden: torch.Tensor | None = None

    @property
    def stopped(self) -> bool:
        return self.hidden is not None


@contextlib.contextmanager
def stop_after_layer(model: nn.Module, layer_index: int) -> Iterator[LayerStop]:
    """Within the block, a forward of ``model`` ends right after decoder layer ``layer_index``.

    Usage::

        with stop_after_layer(model, 7) as stop:
            model(**batch)          # runs embeddings and layers 0..7 only
        h7 = stop.hidden            # [batch, seq, hidden], layer 7's output

    A forward hook on the layer stores its output and raises a private exception that
    this context manager swallows, so no layer above ``layer_index``, no final norm and
    no LM head runs; the model call must therefore be the last statement of the block.
    The stored tensor keeps its autograd graph when gradients are enabled (RMU's forget
    loss is computed on it). It is the layer's raw output: for the last layer this is
    *before* the final norm, unlike ``output_hidden_states``' last entry.
    """
    layers = _layers_checked(model, layer_index)
    stop = LayerStop(layer_index)

    def hook(_module, _args, output):
        stop.hidden = _hidden_of(output)
        raise _StopForward

    handle = layers[layer_index].register_forward_hook(hook)
    try:
        yield stop
    except _StopForward:
        pass
    finally:
        handle.remove()


def hidden_after_layer(
    model: nn.Module, batch: Mapping[str, torch.Tensor], layer_index: int, **kwargs: Any
) -> torch.Tensor:
    """Output hidden states ``[batch, seq, hidden]`` of decoder layer ``layer_index``.

    Runs the model only up to and including that layer (:func:`stop_after_layer`).
    Equals ``model(**batch, output_hidden_states=True).hidden_states[layer_index + 1]``
    for every layer but the last (whose entry there is after the final norm). Gradients
    flow if they are enabled; wrap in ``torch.no_grad()`` for frozen activations (RMU's
    retain target).
    """
    inputs = _model_inputs(batch)
    kwargs.setdefault("use_cache", False)
    with stop_after_layer(model, layer_index) as stop:
        model(**inputs, **kwargs)
    if not stop.stopped:
        raise RuntimeError(
            f"decoder layer {layer_index} of {_model_type(model)} never ran during the forward pass; the model "
            "does not call its decoder layers through the ModuleList uoe_nb.moe.decoder_layers found"
        )
    return stop.hidden


def _input_of_layer(model: nn.Module, inputs: Mapping[str, torch.Tensor], layer_index: int) -> tuple:
    """(hidden states entering layer ``layer_index``, output kind of a real layer) under the caller's grad mode.

    The output kind is 0 when the layers return a tensor, else the length of the tuple
    they return (read off layer ``layer_index - 1``, so pass-through stand-ins can mimic it).
    """
    layers = _layers_checked(model, layer_index)
    seen: dict[str, Any] = {"kind": 0}

    def pre_hook(_module, args, kwargs):
        seen["hidden"] = _hidden_argument(args, kwargs)
        raise _StopForward

    def kind_hook(_module, _args, output):
        seen["kind"] = len(output) if isinstance(output, (tuple, list)) else 0

    handles = [layers[layer_index].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if layer_index > 0:
        handles.append(layers[layer_index - 1].register_forward_hook(kind_hook))
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "hidden" not in seen:
        raise RuntimeError(
            f"decoder layer {layer_index} of {_model_type(model)} never ran during the forward pass; the model "
            "does not call its decoder layers through the ModuleList uoe_nb.moe.decoder_layers found"
        )
    return seen["hidden"], seen["kind"]


# --------------------------------------------------------------------------------------
# Caching the input of layer L
# --------------------------------------------------------------------------------------


def batch_key(batch: Mapping[str, torch.Tensor]) -> str:
    """A content key for a batch: a hash of its ``input_ids`` and ``attention_mask``.

    Use it as the ``key`` of :class:`LayerInputCache` when batches have no natural index
    (e.g. a shuffled data loader). It reads the tensors back to the CPU, which costs a
    device synchronisation; a batch index is cheaper where there is one.
    """
    digest = hashlib.sha1()
    for name in ("input_ids", "attention_mask"):
        tensor = batch.get(name)
        if tensor is None:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Entry:
    hidden: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class LayerInputCache:
    """The hidden states entering decoder layer ``layer_index``, per batch, for one model.

    The entry for a key is computed once (``torch.no_grad``, model in eval mode, the
    forward stopped at layer L by a pre-hook) and then reused by
    :func:`forward_from_layer`. It is exact as long as nothing below layer L changes:
    :func:`forward_from_layer` refuses to run when a parameter below L is trainable.
    Dropout below L is not applied on the cached path (the cache is computed in eval
    mode), which only matters for models configured with dropout.

    Memory: each entry holds ``B * S * H`` floats in the model's dtype on the model's
    device (for OLMoE-1B-7B, batch 4 x 512 tokens x 2048 in bf16: 8 MiB). ``max_items``
    bounds the number of entries; the least recently used one is evicted first
    (``None``: no bound). A cache belongs to the first model it is used with.
    """

    def __init__(self, layer_index: int, max_items: int | None = 64):
        if not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be at least 1 (or None for no bound), got {max_items}")
        self.layer_index = layer_index
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._model_ref: weakref.ref | None = None
        self._output_kind = 0
        self._verified: set[bool] = set()  # run_above values whose exactness was checked

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys in least- to most-recently-used order."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached activations."""
        return sum(e.hidden.numel() * e.hidden.element_size() for e in self._entries.values())

    @property
    def verified(self) -> bool:
        """Whether the exactness check has passed for this cache's model."""
        return bool(self._verified)

    def clear(self) -> None:
        """Drop every entry (call it if the layers below L ever change)."""
        self._entries.clear()

    def _bind(self, model: nn.Module) -> None:
        bound = self._model_ref() if self._model_ref is not None else None
        if bound is None:
            if self._model_ref is not None:  # the first model was garbage-collected
                self.clear()
                self._verified.clear()
            self._model_ref = weakref.ref(model)
        elif bound is not model:
            raise ValueError(
                "this LayerInputCache holds activations of another model; make one cache per model "
                "(and per target layer)"
            )

    def get(self, model: nn.Module, batch: Mapping[str, torch.Tensor], key: Hashable) -> torch.Tensor:
        """The cached input of layer L for ``batch`` (computed and stored on a miss).

        Raises ``ValueError`` when ``key`` was stored for a different batch (different
        ``input_ids`` or ``attention_mask``).
        """
        self._bind(model)
        inputs = _model_inputs(batch)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        entry = self._entries.get(key)
        if entry is not None:
            same_mask = (entry.attention_mask is None and mask is None) or (
                entry.attention_mask is not None
                and mask is not None
                and torch.equal(entry.attention_mask, mask)
            )
            if not (entry.input_ids.shape == ids.shape and torch.equal(entry.input_ids, ids) and same_mask):
                raise ValueError(
                    f"cache key {key!r} was stored for a different batch; give each distinct batch its own "
                    "key (e.g. uoe_nb.fastpath.batch_key(batch))"
                )
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.hidden
        self.misses += 1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hidden, kind = _input_of_layer(model, inputs, self.layer_index)
        finally:
            model.train(was_training)
        if self.layer_index > 0:
            self._output_kind = kind
        self._entries[key] = _Entry(
            hidden.detach(), ids.detach().clone(), None if mask is None else mask.detach().clone()
        )
        while self.max_items is not None and len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
            self.evictions += 1
        return self._entries[key].hidden


# --------------------------------------------------------------------------------------
# Running the model from layer L
# --------------------------------------------------------------------------------------


class _PassThrough(nn.Module):
    """Stands in for a frozen decoder layer below L: returns its hidden-states input unchanged.

    Attribute reads it cannot answer (``attention_type``, ``layer_idx``, ...) go to the
    real layer, so model code that inspects its layers keeps working.
    """

    def __init__(self, original: nn.Module, output_kind: int):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no parameters, no hooks
        self.output_kind = output_kind

    def forward(self, *args: Any, **kwargs: Any):
        hidden = _hidden_argument(args, kwargs)
        if self.output_kind:
            return (hidden, *([None] * (self.output_kind - 1)))
        return hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


@contextlib.contextmanager
def _bypass_below(
    model: nn.Module, layer_index: int, hidden: torch.Tensor, output_kind: int
) -> Iterator[None]:
    """Layers below ``layer_index`` become pass-throughs; layer ``layer_index`` reads ``hidden``."""
    layers = _layers_checked(model, layer_index)
    originals = [layers[i] for i in range(layer_index)]

    def substitute(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        _hidden_argument(args, kwargs)  # raises the explanatory error
        return None

    handle = layers[layer_index].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        for i, original in enumerate(originals):
            layers[i] = _PassThrough(original, output_kind)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original
        handle.remove()


@dataclass
class FromLayerOutput:
    """What :func:`forward_from_layer` returns.

    ``logits``: ``[batch, seq, vocab]`` (``None`` when ``run_above=False``).
    ``layer_hidden``: the output hidden states of layer L (when ``output_layer_hidden``
    or ``run_above=False``). ``outputs``: the model's own output object (``loss`` when
    ``labels`` were passed; router logits and hidden states there only cover layers
    L and above), ``None`` when ``run_above=False``.
    """

    logits: torch.Tensor | None
    layer_hidden: torch.Tensor | None
    outputs: Any = None


def _trainable_below(model: nn.Module, layer_index: int) -> list[str]:
    layers = _layers_checked(model, layer_index)
    below = {id(p) for i in range(layer_index) for p in layers[i].parameters()}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        below |= {id(p) for p in embeddings.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) in below]


def _run_cached(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer_index: int,
    hidden: torch.Tensor,
    output_kind: int,
    *,
    run_above: bool,
    output_layer_hidden: bool,
    kwargs: dict,
) -> FromLayerOutput:
    kwargs = dict(kwargs)
    kwargs.setdefault("use_cache", False)
    with _bypass_below(model, layer_index, hidden, output_kind):
        if not run_above:
            with stop_after_layer(model, layer_index) as stop:
                model(**inputs, **kwargs)
            return FromLayerOutput(logits=None, layer_hidden=stop.hidden)
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if output_layer_hidden:
            layers = _layers_checked(model, layer_index)

            def keep(_module, _args, output):
                captured["hidden"] = _hidden_of(output)

            handle = layers[layer_index].register_forward_hook(keep)
        try:
            outputs = model(**inputs, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
    return FromLayerOutput(logits=outputs.logits, layer_hidden=captured.get("hidden"), outputs=outputs)


@contextlib.contextmanager
def _hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Module forward hooks and pre-hooks of ``model`` are switched off inside the block.

    The exactness check runs extra forwards; observers such as
    :func:`uoe_nb.moe.capture_routing` must not see them (an anchor loss would average
    over their detached records). Hooks registered inside the block work as usual.
    """
    saved = []
    for module in model.modules():
        saved.append((module, module._forward_hooks, module._forward_pre_hooks))
        module._forward_hooks = OrderedDict()
        module._forward_pre_hooks = OrderedDict()
    try:
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module._forward_hooks = hooks
            module._forward_pre_hooks = pre_hooks


def _check_exact(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], layer_index: int, run_above: bool
) -> None:
    """Compare the cached path with a full forward on one batch (eval mode, no grad, hooks off)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks_suspended(model):
            hidden, output_kind = _input_of_layer(model, inputs, layer_index)
            fast = _run_cached(
                model,
                inputs,
                layer_index,
                hidden,
                output_kind,
                run_above=run_above,
                output_layer_hidden=False,
                kwargs={},
            )
            if run_above:
                reference = model(**inputs, use_cache=False).logits
                got, what = fast.logits, "logits"
            else:
                reference = hidden_after_layer(model, inputs, layer_index)
                got, what = fast.layer_hidden, f"output of layer {layer_index}"
    finally:
        model.train(was_training)
    atol, rtol = _TOLERANCE.get(reference.dtype, (1e-5, 1e-5))
    if (
        got is None
        or got.shape != reference.shape
        or not torch.allclose(got, reference, atol=atol, rtol=rtol)
    ):
        diff = (
            (got.float() - reference.float()).abs().max().item()
            if got is not None and got.shape == reference.shape
            else float("nan")
        )
        raise FastPathMismatchError(
            f"the cached-input path does not reproduce the full forward for model family "
            f"{_model_type(model)!r} at layer {layer_index}: {what} differ by up to {diff:.3g} "
            f"(tolerance atol={atol}, rtol={rtol}). The family probably does work between its decoder layers "
            "that the cache cannot replay; use the full forward (or hidden_after_layer) for it"
        )
    log.debug("cached path of %s at layer %d matches the full forward", _model_type(model), layer_index)


def forward_from_layer(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layer_index: int,
    cache: LayerInputCache,
    key: Hashable,
    *,
    run_above: bool = True,
    output_layer_hidden: bool = False,
    check_exact: bool = True,
    **kwargs: Any,
) -> FromLayerOutput:
    """The model's output for ``batch`` computed from the cached input of layer L.

    Layers below ``layer_index`` are replaced for the duration of the call by
    pass-throughs and layer L's input by the cached tensor (detached: no gradient flows
    below L), so only the embeddings (cheap, their output is discarded), the
    mask/position preparation and layers L.. run. ``run_above=False`` also stops after
    layer L and returns its output only (RMU needs nothing more). ``kwargs`` go to the
    model call (e.g. ``labels``).

    The first call for a cache (per ``run_above`` setting) compares the cached path with
    a full forward of the same batch and raises :class:`FastPathMismatchError` if they
    differ; ``check_exact=False`` skips that. The check runs with the model's forward
    hooks suspended, so hooks (e.g. :func:`uoe_nb.moe.capture_routing` for the anchor
    loss) see exactly one forward per call: layer L and above, plus, on a cache miss,
    the layers below L once under ``no_grad``. With gradients enabled, raises
    ``ValueError`` when a parameter below layer L requires grad (the cached path would
    give it no gradient, and the cached input would go stale after a step).
    """
    if cache.layer_index != layer_index:
        raise ValueError(
            f"the cache holds inputs of layer {cache.layer_index}, not of layer {layer_index}; make a "
            f"LayerInputCache({layer_index})"
        )
    _layers_checked(model, layer_index)
    trainable = _trainable_below(model, layer_index) if torch.is_grad_enabled() else []
    if trainable:
        shown = ", ".join(trainable[:3]) + (" ..." if len(trainable) > 3 else "")
        raise ValueError(
            f"{len(trainable)} parameters below layer {layer_index} require grad ({shown}): the cached path "
            "gives them no gradient and its cached input would go stale after an update. Freeze them "
            "(uoe_nb.trainable.make_trainable does), run under torch.no_grad(), or use the full forward"
        )
    inputs = _model_inputs(batch)
    hidden = cache.get(model, inputs, key)
    if check_exact and run_above not in cache._verified:
        _check_exact(model, inputs, layer_index, run_above)
        cache._verified.add(run_above)
    return _run_cached(
        model,
        inputs,
        layer_index,
        hidden,
        cache._output_kind,
        run_above=run_above,
        output_layer_hidden=output_layer_hidden,
        kwargs=kwargs,
    )
