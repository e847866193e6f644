"""Unlearning patches: save only what unlearning changed (Chapters 6 and 8).

UOE trains one expert of one layer (and that layer's router): about 0.06 % of the
parameters of Qwen1.5-MoE (the paper's Table 3). Saving the whole unlearned model
wastes tens of gigabytes and invites overwriting the base checkpoint, so this module
saves a **patch**: for every fused expert tensor, only the changed expert rows (a
slice along dimension 0, with their indices); for any other changed parameter (a
router), the whole tensor. Both the new and the original values are stored, so that
:func:`apply_patch` and :func:`revert_patch` are bitwise exact.

A patch records the :func:`fingerprint` of the base model it was made from and
refuses to apply to any other weights (a different checkpoint, another dtype, or a
model that already carries the patch).

Typical use::

    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ...  # unlearn one expert of `model`
    patch = make_patch(base, model, metadata={"base_model": "tiny-qwen2moe", "method": "ga+uoe"})
    patch.save("ga_uoe.patch.safetensors")
    fresh, tok = load_zoo_model("tiny-qwen2moe")
    apply_patch(fresh, Patch.load("ga_uoe.patch.safetensors"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .moe import NoMoELayersError, changed_parameters, find_moe_layers

__all__ = [
    "PATCH_FORMAT",
    "Patch",
    "PatchEntry",
    "PatchInfo",
    "apply_patch",
    "fingerprint",
    "make_patch",
    "revert_patch",
]

log = logging.getLogger(__name__)

PATCH_FORMAT = "uoe-patch/1"
_METADATA_KEY = "uoe_patch"
# Elements hashed per copy: bounds the host memory a GPU tensor needs while hashing.
_HASH_CHUNK = 1 << 24
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


# --------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------


def _state_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    if isinstance(model_or_state, Mapping):
        return model_or_state
    raise TypeError(f"expected a model or a state dict, got {type(model_or_state).__name__}")


def fingerprint(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (64 hex digits) of a model's weights: names, dtypes, shapes and exact bytes.

    Tensors are hashed in sorted name order from the state dict (a model and its
    ``state_dict()`` give the same fingerprint), streamed one chunk at a time, so a model
    of any size can be hashed without a second copy in memory. The hash covers the
    **exact bytes** (in the machine's byte order, little-endian on every platform torch
    supports): the same weights in another dtype, or after any rounding, have another
    fingerprint. That is the point: a patch applies only to the weights it was made from.
    """
    state = _state_of(model_or_state)
    digest = hashlib.sha256()
    digest.update(PATCH_FORMAT.encode())
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta":
            raise ValueError(
                f"parameter {name!r} is on the meta device: load the weights before fingerprinting"
            )
        flat = tensor.detach().reshape(-1)
        header = (
            f"\0{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0{flat.numel() * flat.element_size()}\0"
        )
        digest.update(header.encode())
        for start in range(0, flat.numel(), _HASH_CHUNK):
            chunk = flat[start : start + _HASH_CHUNK].contiguous().cpu()
            digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------


@dataclass
class PatchEntry:
    """One changed parameter: ``rows`` (expert indices along dim 0) or ``None`` for all of it."""

    name: str
    new: torch.Tensor
    old: torch.Tensor
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.new.shape != self.old.shape or self.new.dtype != self.old.dtype:
            raise ValueError(
                f"patch entry {self.name!r}: new {tuple(self.new.shape)} {self.new.dtype} and old "
                f"{tuple(self.old.shape)} {self.old.dtype} values must have the same shape and dtype"
            )
        if self.rows is not None and (self.rows.dim() != 1 or self.rows.numel() != self.new.shape[0]):
            raise ValueError(
                f"patch entry {self.name!r}: {self.rows.numel()} row indices for {self.new.shape[0]} stored rows"
            )

    @property
    def numel(self) -> int:
        """Number of stored new values (the old values double it on disk)."""
        return self.new.numel()


@dataclass
class PatchInfo:
    """What a patch says about itself (stored as JSON in the file's metadata)."""

    base_model: str
    base_fingerprint: str
    patched_fingerprint: str
    method: str
    layer: int | None = None  # target layer (the paper's l*), when there is one
    expert: int | None = None  # target expert (the paper's e*), when there is one
    experts: dict[int, list[int]] = field(default_factory=dict)  # every stored expert row, per layer
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    library_version: str = __version__
    format: str = PATCH_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PatchInfo:
        data = json.loads(text)
        if data.get("format") != PATCH_FORMAT:
            raise ValueError(
                f"unsupported patch format {data.get('format')!r}; this library reads {PATCH_FORMAT!r}"
            )
        data["experts"] = {int(k): [int(e) for e in v] for k, v in data.get("experts", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Patch:
    """The parameters one unlearning run changed, with their original values."""

    entries: dict[str, PatchEntry]
    info: PatchInfo

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def numel(self) -> int:
        """Number of parameters the patch sets."""
        return sum(e.numel for e in self.entries.values())

    @classmethod
    def from_models(
        cls,
        original_state: Mapping[str, torch.Tensor],
        unlearned_model: nn.Module,
        metadata: Mapping[str, Any],
    ) -> Patch:
        """Shorthand for :func:`make_patch` with everything that changed."""
        return make_patch(original_state, unlearned_model, metadata=metadata)

    def as_row(self) -> dict[str, Any]:
        """A table row: base model, method, target, size and metrics."""
        row = {
            "base model": self.info.base_model,
            "method": self.info.method,
            "layer": self.info.layer,
            "expert": self.info.expert,
            "parameters set": self.numel,
            "tensors": len(self.entries),
        }
        row.update(self.info.metrics)
        return row

    def save(
        self, path: str | os.PathLike, *, allow_in_model_dir: bool = False, overwrite: bool = False
    ) -> Path:
        """Write the patch as one safetensors file (tensors + JSON metadata); return the path.

        Refuses a path inside a saved model's directory (one holding ``config.json`` and
        weights) unless ``allow_in_model_dir``, so a patch never lands among, or over, the
        base checkpoint's files; refuses an existing file unless ``overwrite``.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"{path} is a directory: give a file name such as {path / 'unlearn.patch.safetensors'}"
            )
        if not allow_in_model_dir:
            model_dir = _enclosing_model_dir(path)
            if model_dir is not None:
                raise ValueError(
                    f"refusing to write a patch into {model_dir}, which holds a saved model (config.json and "
                    "weights): save it elsewhere, or pass allow_in_model_dir=True"
                )
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: choose another name or pass overwrite=True")
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in self.entries.items():
            tensors[f"new:{name}"] = entry.new.detach().cpu().contiguous()
            tensors[f"old:{name}"] = entry.old.detach().cpu().contiguous()
            if entry.rows is not None:
                tensors[f"rows:{name}"] = entry.rows.detach().cpu().to(torch.int64).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={_METADATA_KEY: self.info.to_json()})
        log.info("saved patch (%d tensors, %d parameters) to %s", len(self.entries), self.numel, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Patch:
        """Read a patch written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no patch file at {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _METADATA_KEY not in metadata:
                raise ValueError(
                    f"{path} is a safetensors file but not a UOE patch (no {_METADATA_KEY!r} metadata)"
                )
            info = PatchInfo.from_json(metadata[_METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        entries: dict[str, PatchEntry] = {}
        for key in tensors:
            kind, _, name = key.partition(":")
            if kind == "new":
                entries[name] = PatchEntry(
                    name, tensors[key], tensors[f"old:{name}"], tensors.get(f"rows:{name}")
                )
        return cls(entries=entries, info=info)


def _enclosing_model_dir(path: Path) -> Path | None:
    """The nearest directory above ``path`` that holds a saved model, if any."""
    for folder in path.resolve().parents:
        if not (folder / "config.json").is_file():
            continue
        if any((folder / w).is_file() for w in _WEIGHT_FILES) or any(folder.glob("model-*.safetensors")):
            return folder
    return None


# --------------------------------------------------------------------------------------
# Making a patch
# --------------------------------------------------------------------------------------


def _jsonable(value: Any, what: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"patch metadata {what!r} must be JSON-serialisable: {err}") from err
    return value


def make_patch(
    base_state: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    metadata: Mapping[str, Any],
    experts: Mapping[int, Iterable[int]] | None = None,
    extra_params: Iterable[str] = (),
) -> Patch:
    """The patch that turns ``base_state`` (a snapshot taken before unlearning) into ``model``.

    What changed is found bitwise (:func:`uoe_nb.moe.changed_parameters`). Fused expert
    tensors contribute only their changed expert rows; other parameters (a router) are
    stored whole. ``metadata`` must name ``base_model`` and ``method``; it may give
    ``layer`` and ``expert`` (the target; deduced when exactly one expert changed),
    ``config`` (a dict or dataclass), ``metrics`` (e.g. FA and UT), and any other JSON-able
    keys (kept under ``info.extra``).

    ``experts`` (layer -> expert indices) declares the scope of the run: a change to
    any other expert or to a non-expert parameter not named in ``extra_params`` is an
    error, and the declared rows are stored even where a row happened not to change.
    ``extra_params`` names parameters to store whole even if unchanged.
    """
    if base_state is None:
        raise ValueError(
            "a patch needs the base weights: take a snapshot before unlearning, "
            "base = {k: v.detach().clone() for k, v in model.state_dict().items()}"
        )
    for key in ("base_model", "method"):
        if not isinstance(metadata.get(key), str) or not metadata[key]:
            raise ValueError(
                f"patch metadata needs a non-empty string {key!r} (e.g. 'tiny-qwen2moe', 'ga+uoe')"
            )
    state = model.state_dict()
    missing = sorted(set(state) - set(base_state))
    if missing:
        raise ValueError(f"the base snapshot lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    for name, ref in base_state.items():
        if name in state and (state[name].shape != ref.shape or state[name].dtype != ref.dtype):
            raise ValueError(
                f"{name!r} is {tuple(state[name].shape)} {state[name].dtype} in the model but "
                f"{tuple(ref.shape)} {ref.dtype} in the base snapshot: they are not the same architecture"
            )
    params = dict(model.named_parameters())
    for name in state:
        if name not in params and not torch.equal(state[name], base_state[name].to(state[name].device)):
            raise ValueError(f"buffer {name!r} changed; a patch stores parameters only")
    try:
        layers = find_moe_layers(model)
    except NoMoELayersError:
        layers = []
    fused_layer = {n: lay.layer_index for lay in layers if lay.fused for n in lay.expert_parameters()}
    expert_of: dict[str, tuple[int, int]] = {}  # non-fused expert parameter -> (layer, expert)
    for lay in layers:
        if not lay.fused:
            for e in range(lay.num_experts):
                expert_of.update({n: (lay.layer_index, e) for n in lay.single_expert_parameters(e)})

    changed = changed_parameters(model, base_state)
    extra = list(extra_params)
    unknown = [n for n in extra if n not in params]
    if unknown:
        raise KeyError(f"extra_params {unknown} are not parameters of the model")
    declared = None
    if experts is not None:
        declared = {int(k): sorted({int(e) for e in v}) for k, v in experts.items()}
        by_index = {lay.layer_index: lay for lay in layers}
        for layer_index, chosen in declared.items():
            if layer_index not in by_index:
                raise IndexError(
                    f"layer {layer_index} has no routed experts; MoE layers are {sorted(by_index)}"
                )
            for e in chosen:
                by_index[layer_index]._check_expert(e)
        outside = []
        for name, what in changed.items():
            if name in extra:
                continue
            if name in fused_layer:
                allowed = set(declared.get(fused_layer[name], []))
                stray = [int(i) for i in torch.nonzero(what).flatten() if int(i) not in allowed]
                if stray:
                    outside.append(f"{name} experts {stray}")
            elif name in expert_of:
                layer_index, e = expert_of[name]
                if e not in declared.get(layer_index, []):
                    outside.append(name)
            else:
                outside.append(name)
        if outside:
            raise ValueError(
                f"parameters changed outside the declared experts {declared} and extra_params: {outside}; "
                "declare them, or call make_patch without `experts` to store everything that changed"
            )

    entries: dict[str, PatchEntry] = {}
    stored_experts: dict[int, set[int]] = {}
    for name in params:
        p = params[name].detach()
        ref = base_state[name].to(p.device)
        if name in fused_layer and name not in extra:
            layer_index = fused_layer[name]
            rows = set()
            if name in changed:
                rows |= {int(i) for i in torch.nonzero(changed[name]).flatten()}
            if declared is not None:
                rows |= set(declared.get(layer_index, []))
            if not rows:
                continue
            index = torch.tensor(sorted(rows), dtype=torch.int64)
            on_device = index.to(p.device)
            entries[name] = PatchEntry(name, p[on_device].cpu().clone(), ref[on_device].cpu().clone(), index)
            stored_experts.setdefault(layer_index, set()).update(rows)
        elif name in changed or name in extra or _declared_module_expert(name, expert_of, declared):
            entries[name] = PatchEntry(name, p.cpu().clone(), ref.cpu().clone())
            if name in expert_of:
                layer_index, e = expert_of[name]
                stored_experts.setdefault(layer_index, set()).add(e)
    if not entries:
        raise ValueError(
            "the model equals the base snapshot: nothing was unlearned, so there is nothing to patch"
        )

    experts_map = {k: sorted(v) for k, v in sorted(stored_experts.items())}
    layer, expert = metadata.get("layer"), metadata.get("expert")
    if layer is None and expert is None and len(experts_map) == 1:
        only_layer, only_experts = next(iter(experts_map.items()))
        if len(only_experts) == 1:
            layer, expert = only_layer, only_experts[0]
    known = {"base_model", "method", "layer", "expert", "config", "metrics"}
    info = PatchInfo(
        base_model=metadata["base_model"],
        base_fingerprint=fingerprint({k: base_state[k] for k in state}),  # extra snapshot keys ignored
        patched_fingerprint=fingerprint(model),
        method=metadata["method"],
        layer=None if layer is None else int(layer),
        expert=None if expert is None else int(expert),
        experts=experts_map,
        config=_jsonable(metadata.get("config") or {}, "config"),
        metrics=_jsonable(metadata.get("metrics") or {}, "metrics"),
        extra=_jsonable({k: v for k, v in metadata.items() if k not in known}, "extra"),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return Patch(entries=entries, info=info)


def _declared_module_expert(
    name: str, expert_of: Mapping[str, tuple[int, int]], declared: Mapping[int, list[int]] | None
) -> bool:
    """Whether ``name`` belongs to a declared expert stored as its own module (not fused)."""
    if declared is None or name not in expert_of:
        return False
    layer_index, expert = expert_of[name]
    return expert in declared.get(layer_index, [])


# --------------------------------------------------------------------------------------
# Applying and reverting
# --------------------------------------------------------------------------------------


def _write(model: nn.Module, patch: Patch, which: str) -> None:
    params = dict(model.named_parameters())
    # Check every entry before writing any, so a bad patch leaves the model untouched.
    for name, entry in patch.entries.items():
        if name not in params:
            raise KeyError(f"the patch sets {name!r}, which the model does not have: wrong architecture")
        p = params[name]
        expected = p.shape if entry.rows is None else (entry.rows.numel(), *p.shape[1:])
        if tuple(entry.new.shape) != tuple(expected) or entry.new.dtype != p.dtype:
            raise ValueError(
                f"patch values for {name!r} are {tuple(entry.new.shape)} {entry.new.dtype}, the model needs "
                f"{tuple(expected)} {p.dtype}: load the base model in the dtype the patch was made in"
            )
        if entry.rows is not None and (entry.rows.min() < 0 or entry.rows.max() >= p.shape[0]):
            raise IndexError(
                f"patch rows {entry.rows.tolist()} are out of range for {name!r} ({p.shape[0]} rows)"
            )
    with torch.no_grad():
        for name, entry in patch.entries.items():
            p = params[name]
            values = getattr(entry, which).to(p.device)
            if entry.rows is None:
                p.copy_(values)
            else:
                p.index_copy_(0, entry.rows.to(p.device), values)


def apply_patch(model: nn.Module, patch: Patch, *, check_fingerprint: bool = True) -> nn.Module:
    """Write the patch's new values into ``model`` in place; return the model.

    With ``check_fingerprint`` (the default) the model's :func:`fingerprint` must equal the
    patch's base fingerprint, so a patch applies only to the exact weights it was made
    from. After applying, the model has the patched fingerprint, so applying the same
    patch again is refused rather than silently repeated.
    """
    if check_fingerprint:
        current = fingerprint(model)
        if current != patch.info.base_fingerprint:
            if current == patch.info.patched_fingerprint:
                raise ValueError("the model already carries this patch (its fingerprint is the patched one)")
            raise ValueError(
                f"the model's weights (fingerprint {current}) are not the base this patch was made from "
                f"({patch.info.base_model!r}, fingerprint {patch.info.base_fingerprint}): load that base model, "
                "in the same dtype, or pass check_fingerprint=False if you know what you are doing"
            )
    _write(model, patch, "new")
    return model


def revert_patch(model: nn.Module, patch: Patch, *, check_fingerprint: bool = True) -> nn.Module:
    """Put the patch's original values back, bitwise; return the model.

    With ``check_fingerprint`` the model must carry exactly this patch (its fingerprint is
    the patched one); afterwards its fingerprint is the base fingerprint again.
    """
    if check_fingerprint:
        current = fingerprint(model)
        if current != patch.info.patched_fingerprint:
            hint = (
                " (it is the base model: nothing to revert)" if current == patch.info.base_fingerprint else ""
            )
            raise ValueError(
                f"the model (fingerprint {current}) does not carry this patch (patched fingerprint "
                f"{patch.info.patched_fingerprint}){hint}"
            )
    _write(model, patch, "old")
    return model
