"""Peak memory of unlearning at a real model's width, per scope, next to what uoe_nb.scale predicts.

Run from the repository root::

    python benchmarks/memory.py                          # CPU, bf16, OLMoE-1B-7B's width: uoe, routers, full
    python benchmarks/memory.py --scopes uoe --target    # one scope, then the PASS/FAIL checks
    python benchmarks/memory.py --layers uoe=8 full=4 --device cuda --json memory.json

The model is a *randomly initialised* copy of a preset's architecture
(``uoe_nb.scale.architecture_config``, default ``olmoe-1b-7b``: 64 experts top-8, hidden
2048, expert width 1024, vocabulary 50304) cut to a few decoder layers, so that it fits
a CPU: every layer has the real width, only the depth is smaller. Memory does not depend
on the weights' values. Each scope runs :func:`uoe_nb.unlearn.unlearn` (method ``ga``,
``--steps`` steps of ``--batch`` random-token documents of exactly ``--seq`` tokens, no
evaluator, the layer cache at its default) in a fresh Python process, so that one
scope's peak cannot hide in another's freed memory:

* ``uoe``: one expert and its layer's router, the target layer in the middle (Section 5, Alg. 1);
* ``routers``: every router, every expert frozen (Table 1, "Routers Only");
* ``full``: the whole model (the GA baseline).

Peak memory beyond the loaded model: on a CPU, the Linux resident-set high-water mark
(``VmHWM``) of the process, reset through ``/proc/self/clear_refs`` once the model and the
documents are in memory and the model has served one no-grad forward pass of a training
batch (``--no-warmup`` skips that; the first forward leaves about 0.3 GiB of allocator pools
and kernel scratch space resident on this CPU at OLMoE's width, which is the loaded model's,
not the run's), minus the resident set at that moment. The workers run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so that tensor memory freed during the run goes
back to the operating system and the high-water mark is the memory live at once, as
``max_memory_allocated`` is on a GPU; ``--glibc-default`` keeps glibc's growing threshold,
under which freed blocks stay resident (0.96 instead of 0.63 GiB for ``uoe`` on this machine); on a GPU,
``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` minus
what was allocated at that moment. It is printed in GiB, next to the weights' GiB, its
ratio to the weights, and the training state that ``uoe_nb.scale`` predicts:
``footprint().uoe_state_gib`` (the trained expert's own rows, with gradient, fp32 master
and moments), ``full_state_gib`` (gradients and two AdamW moments in the weights' dtype),
and for the routers the same rule as UOE's trained values (:func:`state_bytes_per_value`).
Activations, logits and any copies of the trainable weights that the loop keeps are not
in the prediction; the gap between the two columns is where they show. The retain
documents (``--retain-docs``, default as many as the forget documents) are random tokens
too: GA does not train on them, the loop only monitors routing on them.

``--target`` checks the goals for the training step (Chapter 8's memory claims):
(a) UOE on 4 layers grows by at most 0.75 GiB, the size of one layer's fused expert
tensors; (b) the full model on 2 layers grows by at most 4.5x its weights. It prints
PASS or FAIL for each and exits with status 1 if one fails.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

SCOPES = ("uoe", "routers", "full")
# glibc serves allocations from this size up with mmap and gives them back on free (its default
# threshold grows as large blocks are freed, and freed heap memory then stays resident).
MMAP_THRESHOLD = 2**20
DEFAULT_LAYERS = {"uoe": 4, "routers": 4, "full": 2}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}

# --target: (scope, decoder layers, what is compared, limit).
UOE_LIMIT_GIB = 0.75  # (a) growth of UOE on 4 layers
FULL_LIMIT_RATIO = 4.5  # (b) growth of the full model on 2 layers, in multiples of its weights
TARGETS = (
    ("uoe", 4, "peak_gib", UOE_LIMIT_GIB),
    ("full", 2, "ratio", FULL_LIMIT_RATIO),
)

GIB = 2**30


# --------------------------------------------------------------------------------------
# Model, documents, tokenizer
# --------------------------------------------------------------------------------------


def model_config(preset: str, layers: int):
    """The preset's architecture with ``layers`` decoder layers (every other size as published)."""
    from uoe_nb.scale import architecture_config

    config = architecture_config(preset, num_hidden_layers=layers)
    # Some families list one entry per layer (e.g. which layers are sparse); cut them too.
    for key in ("mlp_only_layers", "layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) > layers:
            setattr(config, key, value[:layers])
    return config


def word_tokenizer(vocab_size: int, pad_id: int):
    """A real tokenizer object whose words are ``t<id>``: text ``"t5 t7"`` encodes to ids ``[5, 7]``
    (the pad id is ``<pad>``).

    :func:`uoe_nb.unlearn.unlearn` tokenizes its documents itself (``uoe_nb.routing.batches``),
    so random token ids travel as such words and come back unchanged, without a download.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # The pad token gets a name that no word contains: special tokens are matched inside words too.
    vocab = {f"t{i}": i for i in range(vocab_size) if i != pad_id} | {"<pad>": pad_id}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<pad>")


def random_documents(count: int, length: int, vocab_size: int, pad_id: int, seed: int) -> list[str]:
    """``count`` documents of exactly ``length`` random tokens (never the pad token, so no padding)."""
    generator = torch.Generator().manual_seed(seed)
    low = 3  # below: the special tokens of most vocabularies
    if pad_id < low:
        ids = torch.randint(low, vocab_size, (count, length), generator=generator)
    else:  # draw from one id fewer and step over the pad id
        ids = torch.randint(low, vocab_size - 1, (count, length), generator=generator)
        ids = torch.where(ids >= pad_id, ids + 1, ids)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


# --------------------------------------------------------------------------------------
# What uoe_nb.scale predicts
# --------------------------------------------------------------------------------------


def state_bytes_per_value(bytes_per_value: int, master: bool) -> int:
    """Training state per trained value, counted as ``uoe_nb.scale.Footprint`` counts UOE's.

    Gradient in the weights' dtype, plus with fp32 master copies (``master_weights``) an
    fp32 master for half-precision weights and two fp32 AdamW moments; without them two
    moments in the weights' dtype.
    """
    b = bytes_per_value
    return b + (4 if b < 4 else 0) + 8 if master else 3 * b


def prediction(config, scope: str, target_layer: int, dtype: torch.dtype, master: bool) -> dict[str, Any]:
    """Weights and predicted training state in GiB, counted on the meta device by ``uoe_nb.scale``.

    ``master`` says whether the run keeps fp32 master copies (``UnlearnConfig.master_weights``).
    """
    from uoe_nb.moe import find_moe_layers
    from uoe_nb.scale import footprint, meta_model

    fp = footprint(config, layer=target_layer, dtype=dtype)
    per_value = state_bytes_per_value(fp.bytes_per_value, master)
    if scope == "uoe":
        state, basis = fp.uoe_state_gib, "footprint().uoe_state_gib (fp32 master weights)"
    elif scope == "full" and not master:
        state, basis = fp.full_state_gib, "footprint().full_state_gib"
    elif scope == "full":
        state, basis = fp.total * per_value / GIB, f"{per_value} bytes per parameter"
    elif scope == "routers":
        model = meta_model(config, dtype)
        router = sum(p.numel() for layer in find_moe_layers(model) for p in layer.router.parameters())
        state, basis = router * per_value / GIB, f"{per_value} bytes per router parameter"
    else:
        raise ValueError(f"no prediction for scope {scope!r}; choose one of {list(SCOPES)}")
    return {
        "parameters": fp.total,
        "weights_gib": fp.weights_gib,
        "predicted_state_gib": state,
        "prediction": basis,
        "master_weights": master,
    }


# --------------------------------------------------------------------------------------
# One scope, in its own process
# --------------------------------------------------------------------------------------


class PeakBeyond:
    """Peak memory beyond what is allocated at :meth:`begin` (CPU: VmHWM - VmRSS; GPU: CUDA allocated)."""

    def __init__(self, device: torch.device) -> None:
        from uoe_nb.scale import MemoryMeter

        self.device = device
        self.meter = MemoryMeter(device)
        if device.type != "cuda" and not self.meter.can_reset_rss:
            raise RuntimeError(
                "this benchmark reads the peak from /proc/self/status after resetting it through "
                "/proc/self/clear_refs, which needs Linux; run it on Linux or with --device cuda"
            )
        self.loaded_gib = 0.0

    def begin(self) -> None:
        self.meter.begin()  # collects garbage, returns freed memory to the OS, resets the peak
        if self.device.type == "cuda":
            self.loaded_gib = torch.cuda.memory_allocated(self.device) / GIB
        else:
            self.loaded_gib = self.meter.start / 1024

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0.0, self.meter.peak_mib() / 1024 - self.loaded_gib)
        return self.meter.peak_mib() / 1024

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated beyond the allocation after loading"
        return "VmHWM beyond VmRSS after loading (reset through /proc/self/clear_refs)"


def measure_scope(args: argparse.Namespace, scope: str, layers: int) -> dict[str, Any]:
    """Build the model, run ``unlearn`` on it with ``scope`` and return the record of one table row."""
    from uoe_nb.scale import random_model_of
    from uoe_nb.unlearn import UnlearnConfig, unlearn

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = model_config(args.preset, layers)
    target_layer = layers // 2
    text = config.get_text_config()
    pad_id = text.pad_token_id if text.pad_token_id is not None else 0
    n_docs = args.steps * args.batch
    forget = random_documents(n_docs, args.seq, text.vocab_size, pad_id, seed=1)
    n_retain = n_docs if args.retain_docs is None else args.retain_docs
    retain = random_documents(n_retain, args.seq, text.vocab_size, pad_id, seed=2) if n_retain else []
    tokenizer = word_tokenizer(text.vocab_size, pad_id)
    for special in (False, True):  # the loop may or may not add special tokens: none exist here
        got = len(tokenizer(forget[0], add_special_tokens=special)["input_ids"])
        if got != args.seq:
            raise RuntimeError(f"a document tokenized to {got} tokens instead of {args.seq}")
    settings: dict[str, Any] = dict(method="ga", scope=scope, steps=args.steps, batch_size=args.batch,
                                    max_length=args.seq, seed=0)  # fmt: skip
    if scope == "uoe":
        settings["target"] = (target_layer, args.expert)
    settings.update(args.set)
    unlearn_config = UnlearnConfig(**settings)
    master = settings.get("master_weights")
    master = scope != "full" if master is None else bool(master)  # unlearn's default
    predicted = prediction(config, scope, target_layer, dtype, master)

    model = random_model_of(config, device=device, dtype=dtype, seed=0, max_cpu_gib=args.max_cpu_gib)
    if args.warmup:
        # A model that has served one forward pass: the allocator's pools and the kernels' scratch
        # buffers that the first forward creates (about 0.3 GiB on this CPU at OLMoE's width) are part
        # of the loaded model, not of the unlearning run.
        batch = tokenizer(forget[: args.batch], return_tensors="pt")
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items()})
        del batch
    meter = PeakBeyond(device)
    meter.begin()
    started = time.perf_counter()
    result = unlearn(model, forget, retain, unlearn_config, tokenizer=tokenizer)
    wall = time.perf_counter() - started
    peak = meter.peak_gib()
    weights = predicted["weights_gib"]
    return {
        "scope": scope,
        "layers": layers,
        "target": list(result.target) if result.target else None,
        "trainable": int(result.scope.num_trainable),
        **predicted,
        "loaded_gib": meter.loaded_gib,
        "peak_gib": peak,
        "ratio": peak / weights,
        "steps_run": result.steps_run,
        "seconds_per_step": result.seconds_per_step,
        "wall_s": wall,
        "memory": meter.description,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
    }


def run_in_subprocess(args: argparse.Namespace, scope: str, layers: int) -> dict[str, Any]:
    """:func:`measure_scope` in a fresh interpreter; a record with ``error`` if it fails."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "record.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", scope, "--worker-layers", str(layers),
                   "--worker-out", out, *args.forwarded]  # fmt: skip
        started = time.perf_counter()
        env = dict(os.environ)
        if args.live_peak and "MALLOC_MMAP_THRESHOLD_" not in env:
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        done = subprocess.run(command, check=False, env=env)
        if done.returncode != 0 or not os.path.exists(out):
            return {"scope": scope, "layers": layers, "error": f"exit status {done.returncode} (traceback above)",
                    "wall_s": time.perf_counter() - started}  # fmt: skip
        with open(out) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def machine_lines(device: torch.device) -> list[str]:
    import transformers

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, device: {device}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / GIB:.0f} GiB")
    else:
        lines.append(f"CPU: {platform.processor() or platform.machine()}")
    return lines


def table(records: list[dict[str, Any]]) -> str:
    """The measured rows as a Markdown table."""
    lines = [
        "| scope | layers | trainable | weights GiB | peak beyond model GiB | x weights "
        "| predicted state GiB | s / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['scope']} | {r['layers']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['scope']} | {r['layers']} | {r['trainable']:,} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} "
            f"| {r['ratio']:.1f}x | {r['predicted_state_gib']:.3f} | {r['seconds_per_step']:.1f} |"
        )
    return "\n".join(lines)


def check_targets(records: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """``(name, passed, line)`` for each goal; ``passed`` is ``None`` when its row was not measured."""
    checks = []
    for scope, layers, key, limit in TARGETS:
        bound = f"{limit:g} GiB" if key == "peak_gib" else f"{limit:g}x its weights"
        name = f"{scope} on {layers} layers grows by at most {bound}"
        row = next(
            (r for r in records if r["scope"] == scope and r["layers"] == layers and "error" not in r), None
        )
        if row is None:
            checks.append(
                (name, None, f"NOT CHECKED  {name}: run --scopes {scope} --layers {scope}={layers}")
            )
            continue
        value = row[key]
        passed = value <= limit
        shown = f"{value:.2f} GiB" if key == "peak_gib" else f"{value:.2f}x ({row['peak_gib']:.2f} GiB)"
        checks.append((name, passed, f"{'PASS' if passed else 'FAIL'}  {name}: measured {shown}"))
    return checks


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _layers(values: list[str], scopes: list[str]) -> dict[str, int]:
    layers = dict(DEFAULT_LAYERS)
    for value in values:
        scope, sep, count = value.rpartition("=")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--layers {value!r}: give a positive count, or SCOPE=COUNT such as uoe=4")
        if sep and scope not in SCOPES:
            raise ValueError(f"--layers {value!r}: unknown scope {scope!r}; choose one of {list(SCOPES)}")
        for name in [scope] if sep else scopes:
            layers[name] = int(count)
    return layers


def _settings(values: list[str]) -> dict[str, Any]:
    from uoe_nb.unlearn import UnlearnConfig

    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    out = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--set {value!r}: give KEY=VALUE with KEY a field of UnlearnConfig: {sorted(fields)}"
            )
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="olmoe-1b-7b", help="architecture (default: %(default)s)")
    p.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--layers", nargs="+", default=[], metavar="[SCOPE=]N",
                   help="decoder layers, for every scope (N) or one (uoe=4); default uoe=4 routers=4 full=2")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (bf16), float16 (fp16) or float32 (fp32)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="tokens per document (default: %(default)s)")
    p.add_argument("--retain-docs", type=int, default=None,
                   help="retain documents (GA only monitors them; default: as many as forget documents)")  # fmt: skip
    p.add_argument("--expert", type=int, default=0, help="UOE's target expert in the middle layer")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more UnlearnConfig fields, e.g. use_layer_cache=False")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument(
        "--max-cpu-gib", type=float, default=8.0, help="largest model built on a CPU, GiB of weights"
    )
    p.add_argument("--glibc-default", dest="live_peak", action="store_false",
                   help="CPU: keep glibc's growing mmap threshold, so freed heap memory stays in the resident "
                   "set and counts towards the peak (default: MALLOC_MMAP_THRESHOLD_=1 MiB in the workers, "
                   "so the peak is the memory live at once, as max_memory_allocated is on a GPU)")  # fmt: skip
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="measure from a model that has not run a forward pass yet (default: one no-grad "
                   "forward of a training batch before the peak is reset)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    p.add_argument(
        "--target", action="store_true", help="print PASS/FAIL for the memory goals; exit 1 on FAIL"
    )
    p.add_argument("--worker", choices=SCOPES, help=argparse.SUPPRESS)
    p.add_argument("--worker-layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if args.dtype not in DTYPES:
        p.error(f"--dtype {args.dtype!r}: choose one of {sorted(DTYPES)} (or bf16, fp16, fp32)")
    if min(args.steps, args.batch, args.threads) < 1 or args.seq < 2 or (args.retain_docs or 0) < 0:
        p.error("--steps, --batch and --threads must be positive, --seq at least 2, --retain-docs >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    raw_settings = list(args.set)
    try:
        layers = _layers(args.layers, args.scopes)
        args.set = _settings(args.set)
    except ValueError as error:
        p.error(str(error))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("UOE_NB_PROGRESS", "0")
    torch.set_num_threads(args.threads)

    if args.worker:
        record = measure_scope(args, args.worker, args.worker_layers)
        with open(args.worker_out, "w") as f:
            json.dump(record, f)
        return 0

    n_retain = args.steps * args.batch if args.retain_docs is None else args.retain_docs
    # What each worker needs besides its scope and layer count.
    args.forwarded = ["--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
                      "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                      "--expert", str(args.expert), "--retain-docs", str(n_retain), "--threads", str(args.threads),
                      "--max-cpu-gib", str(args.max_cpu_gib), *([] if args.warmup else ["--no-warmup"])]  # fmt: skip
    if raw_settings:
        args.forwarded += ["--set", *raw_settings]
    device = torch.device(args.device)
    for line in machine_lines(device):
        print(line, flush=True)
    if device.type != "cuda":
        threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_") or (str(MMAP_THRESHOLD) if args.live_peak else None)
        print(f"glibc MALLOC_MMAP_THRESHOLD_: {threshold or 'default (growing)'}", flush=True)
    print(
        f"model: {args.preset}'s width with few decoder layers, random {args.dtype} weights; unlearn GA, "
        f"{args.steps} steps, batch {args.batch} x {args.seq} tokens, {n_retain} retain documents, no evaluator"
        + (f", {args.set}" if args.set else ""),
        flush=True,
    )
    records = []
    for scope in args.scopes:
        print(f"  running {scope} on {layers[scope]} layers ...", file=sys.stderr, flush=True)
        records.append(run_in_subprocess(args, scope, layers[scope]))
    memory = next((r["memory"] for r in records if "memory" in r), "not measured")
    print(f"peak: {memory}; predicted state: gradients, masters and AdamW moments (uoe_nb.scale)\n")
    print(table(records))
    failed = any("error" in r for r in records)
    if args.target:
        print()
        for _, passed, line in check_targets(records):
            print(line)
            failed = failed or passed is False
    if args.json:
        info = {
            "machine": machine_lines(device),
            "preset": args.preset,
            "dtype": args.dtype,
            "records": records,
        }
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
