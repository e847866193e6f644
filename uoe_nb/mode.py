"""One switch between the tiny world and real models, and what fits the GPU (every chapter).

``UOE_NB_MODE=tiny`` runs on the project's own tiny zoo and synthetic world (seconds
on a CPU); ``UOE_NB_MODE=full`` runs on a real checkpoint and the real benchmarks
(a GPU). Unset, the mode is ``full`` when a CUDA GPU is present and ``tiny``
otherwise. ``UOE_NB_MODEL`` picks the model: a zoo name in tiny mode, a preset name
(or any hub id) in full mode.

Full mode on one GPU follows three rules (the README's "Running on Colab"):

* **precision** (:func:`dtype_for_device`): bf16 where the GPU computes in bf16 natively
  (Ampere or newer), fp16 weights where it does not (a Colab T4; the trained slices then
  train fp32 master copies), fp32 on a CPU;
* **default preset** (:func:`preset_for_gpu_memory`): ``granite-3.0-1b-a400m`` below
  20 GB of GPU memory, ``olmoe-1b-7b`` from 20 GB up; ``UOE_NB_MODEL`` always wins;
* **one GPU, no offloading** (:func:`load_model`): the model loads onto the current GPU
  after its counted size (:func:`memory_need`) was compared with the free memory; a model
  that would not fit with room for UOE training is refused with the memory it needs, the
  memory free and a preset that fits. :func:`training_fits` answers the same question for a
  whole-model baseline, so a chapter can skip that cell and say why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MODES",
    "PRESETS",
    "MemoryNeed",
    "ModelPreset",
    "default_model",
    "dtype_for_device",
    "fitting_preset",
    "get_mode",
    "gpu_memory",
    "load_model",
    "memory_need",
    "model_depth",
    "preset_for_gpu_memory",
    "training_fits",
]

logger = logging.getLogger(__name__)

MODES = ("tiny", "full")


@dataclass(frozen=True)
class ModelPreset:
    """A real MoE checkpoint a reader can run, with what it needs."""

    name: str
    hub_id: str
    family: str
    total_params_b: float
    active_params_b: float
    experts: str
    weights_gb: float  # bf16 weights
    gpu: str  # smallest GPU that holds inference + UOE training
    notes: str = ""


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            "olmoe-1b-7b",
            "allenai/OLMoE-1B-7B-0125-Instruct",
            "olmoe",
            6.9,
            1.3,
            "64 experts, top-8, 16 layers",
            13.8,
            "one 24-40 GB GPU (L4, A10G, A100-40)",
            "default in full mode on a GPU of 20 GB or more",
        ),
        ModelPreset(
            "qwen1.5-moe-a2.7b",
            "Qwen/Qwen1.5-MoE-A2.7B-Chat",
            "qwen2_moe",
            14.3,
            2.7,
            "60 experts top-4 + shared expert, 24 layers",
            28.6,
            "A100-40 (paper's model)",
        ),
        ModelPreset(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite",
            "deepseek_v2",
            15.7,
            2.4,
            "64 experts top-6 + 2 shared, 27 layers, first dense",
            31.4,
            "A100-40 (paper's model)",
        ),
        ModelPreset(
            "mixtral-8x7b",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "mixtral",
            46.7,
            12.9,
            "8 experts top-2, 32 layers",
            93.4,
            "one H200 (141 GB) (paper used it for PEFT comparisons only)",
        ),
        ModelPreset(
            "granite-3.0-1b-a400m",
            "ibm-granite/granite-3.0-1b-a400m-instruct",
            "granitemoe",
            1.3,
            0.4,
            "32 experts top-8, 24 layers",
            2.7,
            "a free Colab T4 (16 GB)",
            "default in full mode on a GPU below 20 GB; near chance on WMDP, prefer RWKU-style facts",
        ),
    ]
}

DEFAULT_TINY_MODEL = "tiny-qwen2moe"
DEFAULT_FULL_MODEL = "olmoe-1b-7b"
#: The full-mode default on a GPU with less memory than :data:`SMALL_GPU_BYTES` (a 16 GB T4).
SMALL_GPU_MODEL = "granite-3.0-1b-a400m"
#: Below this much GPU memory (20 GB) the default preset is :data:`SMALL_GPU_MODEL`.
SMALL_GPU_BYTES = 20 * 10**9

# Activation memory of one training step, per token, calibrated on the one real-size
# measurement we have (OLMoE-1B-7B, bf16, batch 4 x 512, one H100; the peaks minus weights
# and optimizer state were about 11.5 GB for the whole model and 2.1 GB for one expert):
# fp32 logits, their log-softmax and its gradient (12 bytes per vocabulary entry), plus
# this many hidden-sized values per decoder layer. Both estimates lie slightly above what
# was measured; the headroom below covers the allocator's fragmentation and workspaces.
_ACTIVATION_VALUES_PER_LAYER = {"full": 80, "uoe": 8, "forward": 2}
_LOGIT_BYTES_PER_VOCAB = 12
_HEADROOM = 0.10
_FIXED_BYTES = 512 * 2**20
# UOE per trained parameter: the trained expert's own copy and its gradient in the model's
# dtype (2 + 2 bytes in bf16), an fp32 master (4) and two fp32 AdamW moments (8).
_UOE_BYTES_PER_TRAINED = 16


def get_mode() -> str:
    """``tiny`` or ``full`` from ``UOE_NB_MODE``; unset means full on a GPU, tiny otherwise."""
    value = os.environ.get("UOE_NB_MODE", "").strip().lower()
    if not value:
        return "full" if torch.cuda.is_available() else "tiny"
    if value not in MODES:
        raise ValueError(f"UOE_NB_MODE={value!r} is not a mode; use one of {MODES}")
    return value


# --------------------------------------------------------------------------- device and precision


def dtype_for_device(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype full mode loads weights in on ``device`` (default: the current GPU, else the CPU).

    bf16 on a GPU that computes in bf16 natively (compute capability 8 or more: A100, L4,
    H100), fp16 on an older GPU (a Colab T4; torch would emulate bf16 there, slowly), fp32 on
    a CPU. Trained slices of a half-precision model train fp32 master copies (the training
    core's ``master_weights``), so fp16 weights are safe for UOE.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for but no CUDA GPU is available")
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def preset_for_gpu_memory(total_bytes: int) -> str:
    """The default full-mode preset for a GPU with ``total_bytes`` of memory.

    ``granite-3.0-1b-a400m`` below 20 GB (a 16 GB T4), ``olmoe-1b-7b`` from 20 GB up
    (an L4 or A10G at 24 GB, A100 at 40 or 80 GB, H100). ``UOE_NB_MODEL`` overrides it
    (:func:`default_model`).
    """
    if isinstance(total_bytes, bool) or not isinstance(total_bytes, int) or total_bytes <= 0:
        raise ValueError(f"total_bytes must be a positive int (bytes of GPU memory), got {total_bytes!r}")
    return SMALL_GPU_MODEL if total_bytes < SMALL_GPU_BYTES else DEFAULT_FULL_MODEL


def gpu_memory(device: int | None = None) -> tuple[int, int] | None:
    """``(free, total)`` bytes of the current (or given) GPU, or None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device is None else device
    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


def default_model(mode: str | None = None) -> str:
    """The model a chapter uses: ``UOE_NB_MODEL``, else the mode's default.

    In full mode the default depends on the GPU's memory (:func:`preset_for_gpu_memory`);
    without a GPU it is ``olmoe-1b-7b``.
    """
    mode = mode or get_mode()
    chosen = os.environ.get("UOE_NB_MODEL")
    if chosen:
        return chosen
    if mode == "tiny":
        return DEFAULT_TINY_MODEL
    memory = gpu_memory()
    return preset_for_gpu_memory(memory[1]) if memory is not None else DEFAULT_FULL_MODEL


def model_depth(name: str) -> int:
    """Decoder layers of a zoo model, a preset or a hub id, read from its configuration (no
    weights loaded): a chapter sets a depth-relative setting (RMU's layer) before it loads."""
    from . import scale
    from .zoo import ZOO, zoo_dir

    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a zoo name, a preset name or a hub id, got {name!r}")
    if name in ZOO:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(zoo_dir() / name)
    elif name in scale.ARCHITECTURES:
        config = scale.architecture_config(name)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(PRESETS[name].hub_id if name in PRESETS else name)
    return int(config.get_text_config().num_hidden_layers)


# --------------------------------------------------------------------------- counted memory


@dataclass(frozen=True)
class MemoryNeed:
    """GPU memory a model needs to train one scope, counted from its architecture (bytes).

    ``weights``: every parameter in the model's dtype. ``training``: what the scope adds
    (UOE: 16 bytes per trained parameter; whole model: gradients and two AdamW moments in
    the model's dtype, 3x the weights, or 14 bytes per parameter with fp32 masters).
    ``activations``: one step of ``tokens`` tokens (an estimate calibrated on one H100
    measurement). ``total`` adds 10 % and 512 MiB of headroom.
    """

    model: str
    scope: str
    dtype: torch.dtype
    parameters: int
    trained: int
    tokens: int
    weights: int
    training: int
    activations: int

    @property
    def total(self) -> int:
        return int((self.weights + self.training + self.activations) * (1 + _HEADROOM)) + _FIXED_BYTES

    def describe(self) -> str:
        """One line: the total and what it is made of, in GiB."""
        return (
            f"{_gib(self.total)} for {self.model} ({_SCOPE_WORDS[self.scope]}, "
            f"{str(self.dtype).removeprefix('torch.')}: weights {_gib(self.weights)}, training state "
            f"{_gib(self.training)}, activations of {self.tokens:,} tokens {_gib(self.activations)}, "
            f"plus {int(_HEADROOM * 100)} % and 0.5 GiB headroom)"
        )


_SCOPE_WORDS = {"uoe": "UOE training", "full": "whole-model training", "forward": "forward passes only"}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _architecture(model: Any, dtype: torch.dtype | None) -> tuple[str, Any, torch.dtype]:
    """``(label, meta or real model, dtype)`` for a preset name, a hub id or a loaded model."""
    from torch import nn

    if isinstance(model, nn.Module):
        param_dtype = next(model.parameters()).dtype
        label = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        return label, model, dtype or param_dtype
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a preset name, a hub id or a loaded model, got {model!r}")
    from . import scale

    dtype = dtype or dtype_for_device()
    if model in scale.ARCHITECTURES:
        return model, scale.meta_model(model, dtype), dtype
    from transformers import AutoConfig

    hub_id = PRESETS[model].hub_id if model in PRESETS else model
    config = AutoConfig.from_pretrained(hub_id)
    return model, scale.meta_model(config, dtype), dtype


def memory_need(
    model: Any,
    scope: str = "uoe",
    *,
    dtype: torch.dtype | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    master_weights: bool | None = None,
) -> MemoryNeed:
    """Count what training ``scope`` of ``model`` holds on a GPU (Chapter 8).

    ``scope`` is ``"uoe"``, ``"full"`` or ``"forward"`` (no training: scoring and generation).
    ``model`` is a preset name (counted on the meta device, no download), a hub id (counted
    from its downloaded ``config.json``) or a loaded model. UOE trains one expert of the
    middle MoE layer and its router: per trained parameter 16 bytes (a copy in the model's
    dtype, its gradient, an fp32 master and two fp32 moments). Whole-model AdamW holds
    gradients and two moments in the model's dtype (4x the weights in all); with
    ``master_weights`` (default: on for fp16, as on a T4) 14 bytes per parameter instead.
    """
    if scope not in _ACTIVATION_VALUES_PER_LAYER:
        raise ValueError(f"scope must be one of {sorted(_ACTIVATION_VALUES_PER_LAYER)}, got {scope!r}")
    for key, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    from .moe import find_moe_layers

    label, net, dtype = _architecture(model, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    parameters = sum(p.numel() for p in net.parameters())
    weights = parameters * size
    if scope == "uoe":
        layers = find_moe_layers(net)
        target = layers[len(layers) // 2]
        trained = target.expert_numel() + sum(p.numel() for p in target.router_parameters().values())
        training = _UOE_BYTES_PER_TRAINED * trained
    elif scope == "forward":
        trained, training = 0, 0
    else:
        trained = parameters
        if master_weights is None:
            master_weights = dtype == torch.float16
        training = 14 * parameters if master_weights and size == 2 else 3 * weights
    text = net.config.get_text_config()
    tokens = batch_size * max_length
    per_layer = _ACTIVATION_VALUES_PER_LAYER[scope] * text.hidden_size * size * text.num_hidden_layers
    activations = tokens * (per_layer + _LOGIT_BYTES_PER_VOCAB * text.vocab_size)
    return MemoryNeed(label, scope, dtype, parameters, trained, tokens, weights, training, activations)


def fitting_preset(free_bytes: int, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """The largest preset whose UOE training (:func:`memory_need`) fits in ``free_bytes``, or None."""
    from . import scale

    fits = [
        (need.weights, name)
        for name in scale.ARCHITECTURES
        if (need := memory_need(name, "uoe", dtype=dtype)).total <= free_bytes
    ]
    return max(fits)[1] if fits else None


def training_fits(
    model: Any,
    scope: str = "full",
    *,
    dtype: torch.dtype | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    master_weights: bool | None = None,
) -> tuple[bool, str]:
    """Whether training ``scope`` of ``model`` fits the free GPU memory, and a message saying why (Chapters 2, 6, 8).

    A chapter calls it before a whole-model baseline and skips that cell with the message
    when it does not fit. ``model`` is a preset name, a hub id or the loaded model; for a
    loaded model on the GPU its weights already count as used, so only the rest has to fit.
    Without a CUDA GPU nothing is checked and the answer is True.
    """
    try:
        need = memory_need(model, scope, dtype=dtype, batch_size=batch_size, max_length=max_length,
                           master_weights=master_weights)  # fmt: skip
    except OSError as err:  # a hub id whose config cannot be read (offline, private)
        logger.warning("could not count %s (%s); its memory is not checked", model, err)
        return True, f"could not count {model} ({err}); memory not checked"
    memory = gpu_memory()
    if memory is None:
        return True, f"no CUDA GPU, memory not checked; on a GPU this would need {need.describe()}"
    free, total = memory
    from torch import nn

    resident = 0
    if isinstance(model, nn.Module) and next(model.parameters()).device.type == "cuda":
        resident = need.weights
    required = need.total - resident
    have = f"the GPU has {_gib(free)} free of {_gib(total)}"
    if resident:
        have += f" with the model's {_gib(resident)} of weights already loaded"
    if required <= free:
        return True, f"fits: needs {need.describe()}; {have}"
    return False, f"does not fit: needs {need.describe()}; {have}"


# --------------------------------------------------------------------------- loading


def _check_fits(name: str, hub_id: str, dtype: torch.dtype) -> None:
    """Refuse before loading a model that would not leave room for UOE training."""
    memory = gpu_memory()
    if memory is None:
        return
    from .moe import NoMoELayersError

    target = name if name in PRESETS else hub_id
    try:
        try:
            need = memory_need(target, "uoe", dtype=dtype)
        except NoMoELayersError:  # a dense model (the pilot study's): room for scoring it
            need = memory_need(target, "forward", dtype=dtype)
    except Exception as err:  # a hub id without a readable config: load it unchecked
        logger.warning(
            "could not count %s before loading (%s); loading it without the memory check", hub_id, err
        )
        return
    free, total = memory
    if need.total <= free:
        return
    other = fitting_preset(free, dtype)
    advice = (
        f"set UOE_NB_MODEL={other} (a preset that fits)"
        if other
        else "no preset fits; use a larger GPU or tiny mode (UOE_NB_MODE=tiny)"
    )
    raise RuntimeError(
        f"{name} does not fit this GPU for {_SCOPE_WORDS[need.scope]}: it needs {need.describe()}, and the GPU has "
        f"{_gib(free)} free of {_gib(total)}. Free GPU memory (restart the runtime) or {advice}. "
        "Full mode never offloads weights to the CPU."
    )


def load_model(name: str | None = None, *, mode: str | None = None, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for the current mode (every chapter).

    Tiny mode loads a zoo model (offline, about a second). Full mode loads a preset or a
    hub id (downloads on first use) in :func:`dtype_for_device`'s dtype onto the current
    GPU, all of it (no offloading), after checking that it fits with room for UOE training;
    without a GPU it loads in fp32 on the CPU.
    """
    mode = mode or get_mode()
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    name = name or default_model(mode)
    if mode == "tiny":
        from .zoo import load_zoo_model

        return load_zoo_model(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_id = PRESETS[name].hub_id if name in PRESETS else name
    dtype = dtype or dtype_for_device()
    device_map = None
    if torch.cuda.is_available():
        _check_fits(name, hub_id, dtype)
        device_map = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(hub_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
