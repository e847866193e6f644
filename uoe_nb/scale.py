"""The whole UOE pipeline at any scale, and what it costs (Chapter 8).

Three pieces, each usable on its own:

* **Architectures.** :data:`ARCHITECTURES` holds the published ``config.json`` values of
  every real checkpoint in :data:`uoe_nb.mode.PRESETS`, so that a model of the real size
  can be built *without downloading it*: on PyTorch's ``meta`` device to count
  parameters and training state (:func:`footprint`, instant, no memory), or with random
  weights on a GPU to measure step time and memory (:func:`random_model_of`). Step time
  and memory do not depend on the weights' values.
* **Costs.** :class:`MemoryMeter` reads peak memory (CUDA allocated bytes, or the
  growth of the process's resident set on a CPU); :func:`measure_uoe_step` times GA+UOE
  steps on random tokens.
* **The pipeline.** A :class:`Benchmark` bundles a forget set, a retain set, the FA/UT
  evaluation and the RWKU-style probes: the tiny world in tiny mode, WMDP-cyber +
  wikitext + lm-eval's ``wmdp_cyber`` / ``mmlu``, or RWKU + MMLU, in full mode.
  :func:`run_pipeline` runs attribution (Eq. 2), unlearning (Eq. 4) and evaluation on
  it, timing each stage and recording peak memory, and returns a
  :class:`PipelineReport`. The same code runs in both modes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .moe import find_moe_layers
from .trainable import MasterWeights, make_trainable

__all__ = [
    "ARCHITECTURES",
    "Benchmark",
    "Footprint",
    "MemoryMeter",
    "PAPER_PRESETS",
    "PipelineReport",
    "StepCost",
    "architecture_config",
    "footprint",
    "load_benchmark",
    "measure_uoe_step",
    "plot_footprints",
    "random_model_of",
    "run_pipeline",
    "table3",
    "tiny_benchmark",
]

# Published config.json values of each preset's checkpoint (architecture only; the
# tokenizer-related ids do not change sizes). ``tests/test_scale.py`` checks that the
# parameter counts built from them match the totals the model cards state.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe-1b-7b": (
        "olmoe",
        dict(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
            clip_qkv=None, tie_word_embeddings=False, pad_token_id=1, bos_token_id=None, eos_token_id=50279,
        ),
    ),
    "qwen1.5-moe-a2.7b": (
        "qwen2_moe",
        dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
            decoder_sparse_step=1, max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek-v2-lite": (
        "deepseek_v2",
        dict(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
            topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
            max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
    ),
    "mixtral-8x7b": (
        "mixtral",
        dict(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
    ),
    "granite-3.0-1b-a400m": (
        "granitemoe",
        dict(
            vocab_size=49155, hidden_size=1024, intermediate_size=512, num_hidden_layers=24,
            num_attention_heads=16, num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22, attention_multiplier=0.015625,
        ),
    ),
}  # fmt: skip


def architecture_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config of preset ``name``'s architecture (no download); ``overrides`` win."""
    if name not in ARCHITECTURES:
        raise KeyError(f"no architecture for {name!r}; known: {sorted(ARCHITECTURES)}")
    family, values = ARCHITECTURES[name]
    return AutoConfig.for_model(family, **{**values, **overrides})


def _as_config(config: PretrainedConfig | str) -> PretrainedConfig:
    return architecture_config(config) if isinstance(config, str) else config


def meta_model(config: PretrainedConfig | str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of ``config`` on the ``meta`` device: every shape, no memory, no values."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_as_config(config), dtype=dtype)


def random_model_of(
    config: PretrainedConfig | str,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_cpu_gib: float = 4.0,
) -> nn.Module:
    """A randomly initialised model of ``config`` (a preset name or a config), built on ``device``.

    Use it to measure step time and memory at the real size without downloading weights.
    On a CPU, models whose weights exceed ``max_cpu_gib`` are refused (they are meant for a GPU).
    """
    config = _as_config(config)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available")
    if device.type == "cpu":
        size = _weight_bytes(meta_model(config, dtype)) / 2**30
        if size > max_cpu_gib:
            raise RuntimeError(
                f"the model's weights take {size:.1f} GiB in {dtype}; build it on a GPU (device='cuda') "
                f"or raise max_cpu_gib"
            )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------
# Footprint: counted on the meta device
# ---------------------------------------------------------------------------------


@dataclass
class Footprint:
    """Sizes of one architecture and of what full-model and UOE training hold in memory.

    Whole-model training state (``full_state_gib``) is the gradients plus AdamW's two
    moments in the weights' dtype, as ``unlearn`` runs the full scope by default
    (``master_weights=False``): 3 values per parameter. UOE's state (``uoe_state_bytes``)
    is what :mod:`uoe_nb.trainable` holds for the trained expert and router alone: the
    expert's own copy of its rows and, for every trained value, its gradient in the
    weights' dtype, an fp32 master copy (half-precision weights only) and two fp32 AdamW
    moments -- 16 bytes per trained expert value in bf16. ``uoe_state_elements`` is the
    number of trained values. Activations are not included (they depend on batch and
    sequence length).
    """

    name: str
    family: str
    total: int
    active: int
    moe_layers: int
    experts: int
    top_k: int
    expert_numel: int
    uoe_trainable: int
    uoe_state_elements: int
    bytes_per_value: int
    uoe_router: int = 0  # trained router values (trained in place: no copy)

    @property
    def weights_gib(self) -> float:
        return self.total * self.bytes_per_value / 2**30

    @property
    def full_state_gib(self) -> float:
        return 3 * self.total * self.bytes_per_value / 2**30

    @property
    def uoe_state_bytes(self) -> int:
        b = self.bytes_per_value
        per_value = b + (4 if b < 4 else 0) + 8  # gradient, fp32 master (half weights), fp32 moments
        copied_rows = self.uoe_state_elements - self.uoe_router
        return copied_rows * b + self.uoe_state_elements * per_value

    @property
    def uoe_state_gib(self) -> float:
        return self.uoe_state_bytes / 2**30

    def as_row(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "family": self.family,
            "parameters (B)": self.total / 1e9,
            "active (B)": self.active / 1e9,
            "MoE layers": self.moe_layers,
            "experts (top-k)": f"{self.experts} (top-{self.top_k})",
            "UOE trainable (M)": self.uoe_trainable / 1e6,
            "UOE fraction (%)": 100 * self.uoe_trainable / self.total,
            "weights (GiB)": self.weights_gib,
            "full GA state (GiB)": self.full_state_gib,
            "UOE state (GiB)": self.uoe_state_gib,
        }


def footprint(
    config: PretrainedConfig | str,
    *,
    name: str | None = None,
    layer: int | None = None,
    expert: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Footprint:
    """Count ``config``'s parameters and UOE's trainable set on the meta device (Table 3, Chapter 8).

    ``layer`` is the UOE target layer (default: the middle MoE layer; the sizes are the
    same in every MoE layer of these models); ``expert`` the target expert. Active
    parameters count every non-routed parameter plus ``top_k`` routed experts per layer.
    """
    label = name or (config if isinstance(config, str) else getattr(config, "model_type", "model"))
    config = _as_config(config)
    model = meta_model(config, dtype)
    layers = find_moe_layers(model)
    by_index = {m.layer_index: m for m in layers}
    if layer is None:
        layer = layers[len(layers) // 2].layer_index
    if layer not in by_index:
        raise IndexError(f"layer {layer} has no routed experts; MoE layers are {sorted(by_index)}")
    target = by_index[layer]
    if not 0 <= expert < target.num_experts:
        raise IndexError(f"expert {expert} is out of range: layer {layer} has {target.num_experts} experts")
    total = sum(p.numel() for p in model.parameters())
    routed = sum(m.expert_numel() * m.num_experts for m in layers)
    active_routed = sum(m.expert_numel() * m.top_k for m in layers)
    selection = make_trainable(model, {layer: [expert]}, routers=[layer])
    state = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = selection.num_trainable
    router = sum(p.numel() for p in target.router_parameters().values())
    selection.remove()
    return Footprint(
        name=label,
        family=config.model_type,
        total=total,
        active=total - routed + active_routed,
        moe_layers=len(layers),
        experts=target.num_experts,
        top_k=target.top_k,
        expert_numel=target.expert_numel(),
        uoe_trainable=trainable,
        uoe_state_elements=state,
        bytes_per_value=torch.empty((), dtype=dtype).element_size(),
        uoe_router=router,
    )


# ---------------------------------------------------------------------------------
# Measuring memory and step time
# ---------------------------------------------------------------------------------


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc), so it does not hide later growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory between :meth:`begin` and :meth:`peak_mib`.

    On a GPU, ``torch.cuda.max_memory_allocated`` (weights included). On a CPU torch's
    allocations are invisible to ``tracemalloc``, so the meter reports how far the
    process's resident-set high-water mark rose above its value at :meth:`begin` (Linux:
    the mark is reset through ``/proc/self/clear_refs``; elsewhere ``getrusage``'s
    lifetime maximum, which understates a window that needs less than an earlier one).
    CPU numbers are rough: freed memory the allocator keeps counts as already there.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.start = 0.0
        self.can_reset_rss = False
        if self.device.type != "cuda":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset_rss = _proc_status_mib("VmHWM") is not None
            except OSError:
                self.can_reset_rss = False

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (weights included)"
        if self.can_reset_rss:
            return "growth of the process's resident-set high-water mark (VmHWM) above its start"
        return "growth of getrusage's lifetime resident-set maximum (understates later windows)"

    def begin(self) -> None:
        gc.collect()
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _proc_status_mib("VmRSS") or 0.0
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.can_reset_rss:
            return max(0.0, (_proc_status_mib("VmHWM") or 0.0) - self.start)
        return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start)


def state_mib(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """MiB of gradients and optimizer state: what training holds on top of the weights."""
    total = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total / 2**20


@dataclass
class StepCost:
    """Median wall time of a GA+UOE step and the memory it needed (Chapter 8)."""

    label: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    trainable: int
    seconds_per_step: float
    peak_mib: float
    state_mib: float
    weights_mib: float
    memory: str  # how peak_mib was measured

    def as_row(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "device": self.device,
            "dtype": self.dtype,
            "batch x seq": f"{self.batch_size} x {self.seq_len}",
            "trainable": self.trainable,
            "s / step": self.seconds_per_step,
            "weights (MiB)": self.weights_mib,
            "grad + AdamW state (MiB)": self.state_mib,
            "peak (MiB)": self.peak_mib,
        }


def measure_uoe_step(
    model: nn.Module,
    *,
    label: str = "model",
    layer: int | None = None,
    expert: int = 0,
    batch_size: int = 4,
    seq_len: int = 512,
    steps: int = 5,
    warmup: int = 2,
    lr: float = 1e-4,
) -> StepCost:
    """Time GA+UOE steps (one expert and the router of ``layer``, AdamW) on random tokens.

    The step is the training step of :func:`uoe_nb.unlearn.unlearn` without its data
    pipeline: zero_grad, forward, ``-NLL`` plus the router anchor, backward, AdamW step on
    the trained expert's own rows and the router (fp32 masters in a half-precision
    model, :class:`uoe_nb.trainable.MasterWeights`). Returns the median step time over
    ``steps`` after ``warmup`` steps and the peak memory over all of them; ``state_mib``
    is the trained rows' copy plus gradients, masters and AdamW moments. The model's
    weights are restored afterwards.
    """
    from .moe import capture_routing
    from .objectives import anchor_loss

    if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 2:
        raise ValueError("steps and batch_size must be positive, warmup >= 0 and seq_len >= 2")
    device = next(model.parameters()).device
    layers = {m.layer_index: m for m in find_moe_layers(model)}
    if layer is None:
        layer = sorted(layers)[len(layers) // 2]
    if layer not in layers:
        raise IndexError(f"layer {layer} has no routed experts; MoE layers are {sorted(layers)}")
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    meter = MemoryMeter(device)
    was_training = model.training
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    selection = make_trainable(model, {layer: [expert]}, routers=[layer])
    trainable = selection.parameters()
    original = [p.detach().clone() for p in trainable]  # one expert and one router: small
    optimizer = MasterWeights(trainable, lr=lr)
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        with capture_routing(model, layers=[layer], detach=False) as cap:
            loss = -model(**batch, labels=ids, use_cache=False).loss
        record = cap[layer][0]
        loss = loss + anchor_loss(record.scores, record.mask, expert)
        optimizer.backward(loss)
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        meter.begin()
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
        peak = meter.peak_mib()
        rows = sum(p.numel() * p.element_size() for n, p in zip(selection.names, trainable, strict=True) if ".trained." in n)
        held = (optimizer.state_bytes() + rows + sum(p.numel() * p.element_size() for p in trainable)) / 2**20
    finally:
        with torch.no_grad():
            for p, value in zip(trainable, original, strict=True):
                p.copy_(value)
        optimizer.close()
        selection.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = None
        model.train(was_training)
    return StepCost(
        label=label,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        batch_size=batch_size,
        seq_len=seq_len,
        trainable=selection.num_trainable,
        seconds_per_step=statistics.median(times),
        peak_mib=peak,
        state_mib=held,
        weights_mib=_weight_bytes(model) / 2**20,
        memory=meter.description,
    )


# ---------------------------------------------------------------------------------
# Benchmarks and the pipeline
# ---------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """A forget set, a retain set and how to score a model on them (Section 5 of the paper).

    ``evaluate(model)`` returns at least ``forget_accuracy`` (FA, lower is better) and
    ``utility_accuracy`` (UT); the benchmarks :func:`load_benchmark` builds use an
    :class:`uoe_nb.evaluation.Evaluator`, which also takes ``parts=("forget",)`` or
    ``("utility",)`` and knows its ``forget_questions`` and ``utility_questions``. The
    probes are RWKU-style ``{"query", "answer", "level"}`` dicts scored by ROUGE-L recall
    of a greedy answer (may be empty).
    """

    name: str
    forget_texts: list[str]
    retain_texts: list[str]
    evaluate: Callable[..., Mapping[str, float]]
    forget_probes: list[dict] = field(default_factory=list)
    neighbor_probes: list[dict] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.forget_texts:
            raise ValueError(f"benchmark {self.name!r} has an empty forget set")


def tiny_benchmark(tokenizer: Any) -> Benchmark:
    """The tiny world the zoo models learned (Chapter 1): crystal passages to forget, everyday text to keep."""
    from .evaluation import world_evaluator
    from .world import build_world
    from .zoo import WORLD_SEED

    world = build_world(WORLD_SEED)
    return Benchmark(
        name="tiny world",
        forget_texts=list(world.forget_corpus),
        retain_texts=list(world.retain_corpus),
        evaluate=world_evaluator(tokenizer, world),
        forget_probes=list(world.forget_probes),
        neighbor_probes=list(world.neighbor_probes),
        description="FA: crystal multiple choice; UT: everyday multiple choice; probes: the forget targets' "
        "fill-in and QA probes and their neighbours'",
    )


#: Default evaluation subsets of the real benchmarks: the first 500 WMDP-cyber questions and
#: the first 20 questions of each of MMLU's 57 subjects (1,140), sized for a Colab runtime.
FORGET_QUESTIONS = 500
MMLU_PER_SUBJECT = 20


def _count(value: Any, what: str, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{what} is {value}, more than {most}")
    return value


def load_benchmark(
    name: str,
    tokenizer: Any,
    *,
    forget_limit: int = 2000,
    retain_limit: int = 2000,
    forget_questions: int | None = None,
    mmlu_per_subject: int | None = None,
    eval_limit: int | None = None,
    probe_limit: int = 100,
    rwku_subjects: Sequence[str] | None = None,
) -> Benchmark:
    """A :class:`Benchmark` by name: ``"tiny"``, ``"wmdp"`` or ``"rwku"`` (Section 5, Chapter 8).

    * ``tiny``: :func:`tiny_benchmark` (no download).
    * ``wmdp``: WMDP's cyber forget corpus, wikitext as retain set, FA = lm-eval
      ``wmdp_cyber`` on its first ``forget_questions`` questions (default 500 of 1,987),
      UT = lm-eval ``mmlu`` on the first ``mmlu_per_subject`` questions of each of its 57
      subjects (default 20, so 1,140 questions, every subject weighted equally; at most
      100, the smallest subject's size).
    * ``rwku``: RWKU passages of ``rwku_subjects`` (default: the first target) as the
      forget set, wikitext as retain set, FA = mean ROUGE-L recall on their first
      ``probe_limit`` forget probes, UT = the same MMLU subset; the probes and neighbour
      probes are kept.

    ``evaluate`` is an :class:`uoe_nb.evaluation.Evaluator`: ``parts`` selects FA or UT,
    ``forget_questions`` / ``utility_questions`` count them. ``eval_limit`` is the older
    single knob: when given it sets both counts that are not given. lm-eval's task index is
    built once per process. The real benchmarks download from the Hugging Face hub.
    """
    from . import data, evaluation

    if name == "tiny":
        return tiny_benchmark(tokenizer)
    if name not in ("wmdp", "rwku"):
        raise ValueError(f"unknown benchmark {name!r}; choose 'tiny', 'wmdp' or 'rwku'")
    if eval_limit is not None:
        _count(eval_limit, "eval_limit")
    if forget_questions is None:
        forget_questions = eval_limit if eval_limit is not None else FORGET_QUESTIONS
    n_forget = min(_count(forget_questions, "forget_questions"), data.WMDP_QUESTIONS["cyber"])
    if mmlu_per_subject is None:
        mmlu_per_subject = min(eval_limit, data.MMLU_SMALLEST_SUBJECT) if eval_limit else MMLU_PER_SUBJECT
    per_subject = _count(mmlu_per_subject, "mmlu_per_subject", most=data.MMLU_SMALLEST_SUBJECT)
    retain = data.load_wikitext(limit=retain_limit)

    def utility(model: nn.Module) -> float:
        # evaluation.lm_eval_tasks is looked up at call time, so a patched one is used
        return evaluation.lm_eval_tasks(model, tokenizer, ("mmlu",), limit=per_subject)["mmlu"]

    mmlu_words = f"lm-eval mmlu, first {per_subject} of each of {data.MMLU_SUBJECTS} subjects"
    if name == "wmdp":

        def forget(model: nn.Module) -> float:
            return evaluation.lm_eval_tasks(model, tokenizer, ("wmdp_cyber",), limit=n_forget)["wmdp_cyber"]

        return Benchmark(
            name="WMDP-cyber",
            forget_texts=data.load_wmdp_corpus("cyber", "forget", limit=forget_limit),
            retain_texts=retain,
            evaluate=evaluation.Evaluator(
                forget,
                utility,
                n_forget,
                per_subject * data.MMLU_SUBJECTS,
                description=f"FA: lm-eval wmdp_cyber, first {n_forget}; UT: {mmlu_words}",
            ),  # fmt: skip
            description=f"FA: lm-eval wmdp_cyber (first {n_forget} questions); UT: {mmlu_words}",
        )
    subjects = list(rwku_subjects or data.load_rwku_targets()[:1])
    probes = data.load_rwku_probes(subjects)[:probe_limit]
    neighbours = data.load_rwku_neighbor_probes(subjects)[:probe_limit]

    def forget_probes(model: nn.Module) -> float:
        return evaluation.probe_rouge_recall(model, tokenizer, probes).mean

    return Benchmark(
        name=f"RWKU ({', '.join(subjects)})",
        forget_texts=data.load_rwku_passages(subjects)[:forget_limit],
        retain_texts=retain,
        evaluate=evaluation.Evaluator(
            forget_probes,
            utility,
            len(probes),
            per_subject * data.MMLU_SUBJECTS,
            description=f"FA: ROUGE-L recall on {len(probes)} probes; UT: {mmlu_words}",
        ),  # fmt: skip
        forget_probes=probes,
        neighbor_probes=neighbours,
        description=f"FA: ROUGE-L recall on the targets' {len(probes)} probes; UT: {mmlu_words}",
    )


@dataclass
class PipelineReport:
    """What one end-to-end run measured: scores before and after, and what each stage cost."""

    model: str
    benchmark: str
    method: str
    scope: str
    target: tuple[int, int] | None
    trainable: int
    fraction: float
    before: dict[str, float]
    after: dict[str, float]
    steps_run: int
    kept_step: int
    stopped: str
    seconds: dict[str, float]  # wall time per stage
    seconds_per_step: float
    peak_mib: float
    memory: str
    device: str

    def scores(self) -> dict[str, Any]:
        """One row: every score before and after (FA and UT, then the probes)."""
        row: dict[str, Any] = {"model": self.model, "method": self.method, "scope": self.scope}
        for key, before in self.before.items():
            short = _SHORT.get(key, key)
            row[f"{short} before"] = before
            row[f"{short} after"] = self.after.get(key, math.nan)
        return row

    def costs(self) -> dict[str, Any]:
        """One row: where the time went, step cost and peak memory."""
        row: dict[str, Any] = {"model": self.model, "method": self.method, "scope": self.scope,
                               "device": self.device, "trainable": self.trainable,
                               "steps": self.steps_run, "s / step": self.seconds_per_step}  # fmt: skip
        row.update({f"{stage} (s)": s for stage, s in self.seconds.items()})
        row["peak (MiB)"] = self.peak_mib
        return row


_SHORT = {"forget_accuracy": "FA", "utility_accuracy": "UT"}


def _score(model: nn.Module, tokenizer: Any, bench: Benchmark, max_new_tokens: int) -> dict[str, float]:
    from .evaluation import probe_rouge_recall

    out = {k: float(v) for k, v in bench.evaluate(model).items()}
    for key, probes in (("forget probes", bench.forget_probes), ("neighbour probes", bench.neighbor_probes)):
        if probes:
            out[key] = probe_rouge_recall(model, tokenizer, probes, max_new_tokens=max_new_tokens).mean
    return out


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str, device: torch.device) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[stage] = time.perf_counter() - started


def run_pipeline(
    model: nn.Module,
    tokenizer: Any,
    benchmark: Benchmark,
    config: Any = None,
    *,
    label: str = "model",
    attribution_batch_size: int = 16,
    max_new_tokens: int = 30,
) -> tuple[PipelineReport, Any]:
    """Attribution, unlearning and evaluation of ``model`` on ``benchmark``, timed (Chapter 8).

    ``config`` is a :class:`uoe_nb.unlearn.UnlearnConfig` (default: GA+UOE). The model is
    unlearned in place. Stages: ``evaluate before``, ``attribution`` (Eq. 2 on the first
    ``config.attribution_docs`` forget documents; skipped when the scope needs no
    target), ``unlearn`` (Eq. 4, with its periodic FA/UT evaluations) and ``evaluate
    after``. Peak memory is measured over the whole run. Returns ``(report, result)``
    with the :class:`uoe_nb.unlearn.UnlearnResult`.
    """
    from .attribution import expert_affinity
    from .routing import batches
    from .scopes import Scope
    from .unlearn import UnlearnConfig, unlearn

    config = config or UnlearnConfig()
    config.validate()
    device = next(model.parameters()).device
    meter = MemoryMeter(device)
    seconds: dict[str, float] = {}
    meter.begin()
    model.eval()
    with _timed(seconds, "evaluate before", device):
        before = _score(model, tokenizer, benchmark, max_new_tokens)
    scope = config.scope if isinstance(config.scope, Scope) else Scope.from_name(config.scope)
    affinity = None
    if scope.needs_affinity or (scope.needs_target and config.target is None):
        with _timed(seconds, "attribution", device):
            docs = benchmark.forget_texts[: config.attribution_docs]
            affinity = expert_affinity(
                model,
                batches(tokenizer, docs, batch_size=attribution_batch_size, max_length=config.max_length,
                        device=device),
            )  # fmt: skip
    with _timed(seconds, "unlearn", device):
        result = unlearn(model, benchmark.forget_texts, benchmark.retain_texts, config, tokenizer=tokenizer,
                         evaluate=benchmark.evaluate, affinity=affinity)  # fmt: skip
    with _timed(seconds, "evaluate after", device):
        after = _score(result.model, tokenizer, benchmark, max_new_tokens)
    report = PipelineReport(
        model=label,
        benchmark=benchmark.name,
        method=config.method,
        scope=result.scope.name,
        target=result.target,
        trainable=result.scope.num_trainable,
        fraction=result.scope.fraction,
        before=before,
        after=after,
        steps_run=result.steps_run,
        kept_step=result.best_step,
        stopped=result.stopped,
        seconds=seconds,
        seconds_per_step=result.seconds_per_step,
        peak_mib=meter.peak_mib(),
        memory=meter.description,
        device=str(device),
    )
    return report, result


#: The paper's models (Table 3) and the presets of their architectures.
PAPER_PRESETS = {"Qwen1.5-MoE": "qwen1.5-moe-a2.7b", "DeepSeek-V2-Lite": "deepseek-v2-lite",
                 "Mixtral-8x7B": "mixtral-8x7b"}  # fmt: skip


def _footprint_table(footprints: Sequence[Footprint] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(footprints, pd.DataFrame):
        table = footprints
    else:
        rows = [f.as_row() for f in footprints]
        table = pd.DataFrame(rows).set_index("model") if rows else pd.DataFrame()
    if table.empty:
        raise ValueError("no footprints given")
    return table


def table3(footprints: Sequence[Footprint] | pd.DataFrame) -> pd.DataFrame:
    """Table 3 beside ours: UOE's trainable parameters as a share of all, per paper model.

    ``footprints`` are :func:`footprint` results named by preset (or their ``as_row()``
    frame); one row per model of :data:`PAPER_PRESETS`, indexed by preset, with the
    paper's percentage and ours (``nan`` for a preset not among the footprints).
    """
    from .baselines import PAPER_PARAMETER_RATIOS

    ours = _footprint_table(footprints)["UOE fraction (%)"]
    rows = [{"model": preset, "paper model": paper, "paper UOE fraction (%)": PAPER_PARAMETER_RATIOS[paper]["uoe"],
             "ours (%)": float(ours.get(preset, math.nan))} for paper, preset in PAPER_PRESETS.items()]  # fmt: skip
    return pd.DataFrame(rows).set_index("model")


def plot_footprints(footprints: Sequence[Footprint] | pd.DataFrame):
    """Weights against the gradient + AdamW state of whole-model and UOE training, per model.

    ``footprints`` are :func:`footprint` results, or a frame of their ``as_row()`` rows
    indexed by model. Three bars per model on a log scale; activations are not counted.
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    table = _footprint_table(footprints)
    bars = {"weights (GiB)": "weights", "full GA state (GiB)": "full-model training state",
            "UOE state (GiB)": "UOE training state"}  # fmt: skip
    missing = [c for c in bars if c not in table.columns]
    if missing:
        raise KeyError(f"the table lacks {missing}: give Footprint.as_row() rows")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.27
    for i, (column, label) in enumerate(bars.items()):
        ax.bar([x + (i - 1) * width for x in range(len(table))], table[column].tolist(), width, label=label)
    ax.set_xticks(range(len(table)), [str(m) for m in table.index], rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("memory (GiB, log scale)")
    ax.set_title("weights vs gradient + AdamW state, activations excluded")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def footprint_markdown(names: Sequence[str] | None = None) -> str:
    """The footprint of each preset (default: all) as a Markdown table (``python -m uoe_nb.scale``)."""
    rows = [footprint(name, name=name).as_row() for name in (names or ARCHITECTURES)]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{v:,.3f}" if isinstance(v, float) else f"`{v}`" if k == "model" else str(v)
            for k, v in row.items()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(footprint_markdown(sys.argv[1:] or None) + "\n")
