"""One switch between the tiny world and real models (every chapter).

``UOE_NB_MODE=tiny`` runs on the project's own tiny zoo and synthetic world (seconds
on a CPU); ``UOE_NB_MODE=full`` runs on a real checkpoint and the real benchmarks
(a GPU). Unset, the mode is ``full`` when a CUDA GPU is present and ``tiny``
otherwise. ``UOE_NB_MODEL`` picks the model: a zoo name in tiny mode, a preset name
(or any hub id) in full mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["MODES", "PRESETS", "ModelPreset", "default_model", "get_mode", "load_model"]

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
            "default in full mode: fits one Colab GPU with room for UOE training",
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
            "two A100-80 or one H100/H200 (paper used it for PEFT comparisons only)",
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
            "smallest real MoE; near chance on WMDP, prefer RWKU-style facts",
        ),
    ]
}

DEFAULT_TINY_MODEL = "tiny-qwen2moe"
DEFAULT_FULL_MODEL = "olmoe-1b-7b"


def get_mode() -> str:
    """``tiny`` or ``full`` from ``UOE_NB_MODE``; unset means full on a GPU, tiny otherwise."""
    value = os.environ.get("UOE_NB_MODE", "").strip().lower()
    if not value:
        return "full" if torch.cuda.is_available() else "tiny"
    if value not in MODES:
        raise ValueError(f"UOE_NB_MODE={value!r} is not a mode; use one of {MODES}")
    return value


def default_model(mode: str | None = None) -> str:
    """The model a chapter uses: ``UOE_NB_MODEL`` or the mode's default."""
    mode = mode or get_mode()
    return os.environ.get("UOE_NB_MODEL") or (DEFAULT_TINY_MODEL if mode == "tiny" else DEFAULT_FULL_MODEL)


def load_model(name: str | None = None, *, mode: str | None = None, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for the current mode.

    Tiny mode loads a zoo model (offline, about a second). Full mode loads a preset
    or a hub id in bf16 on the GPU (downloads on first use).
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
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        hub_id, dtype=dtype, device_map="auto" if torch.cuda.is_available() else None
    )
    tokenizer = AutoTokenizer.from_pretrained(hub_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
