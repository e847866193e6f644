"""Step cost of unlearning: full model vs one expert, with and without skipping frozen layers.

Run from the repository root::

    python benchmarks/step_cost.py                      # tiny zoo model on the CPU, well under a minute
    python benchmarks/step_cost.py --model tiny-deepseek --batch 8 --seq 64
    python benchmarks/step_cost.py --config olmoe-1b-7b --batch 4 --seq 512 --steps 10   # GPU only, bf16
    python benchmarks/step_cost.py --config olmoe-1b-7b --dry-run   # build on the meta device, count only

``--config olmoe-1b-7b`` builds a *randomly initialised* model of OLMoE-1B-7B's published
architecture (6.9B parameters, 64 experts top-8, 16 layers) directly on the GPU in
bf16; nothing is downloaded. Step time does not depend on the weights' values.

Every row runs on the same model and the same batch (random token ids, no padding),
with AdamW, and reports the median step time over ``--steps`` steps after ``--warmup``
steps (zero_grad, forward, loss, backward, optimizer step):

* forward only: one forward pass under ``torch.no_grad`` (no step);
* GA, full model: every parameter trainable, loss ``-NLL(forget)``;
* GA+UOE: one expert of layer L plus L's router (``uoe_nb.trainable.make_trainable``: the
  expert's rows as parameters of their own, the fused expert tensors frozen), full forward;
* GA+UOE, cached input: the same, with layer L's input computed once and layers L..
  run from it (``uoe_nb.fastpath.forward_from_layer``);
* RMU as WMDP runs it: every expert of layers L-2..L trainable, full forward, loss
  ``MSE(h_L, u)`` to a fixed control vector u (forget term only);
* RMU+UOE: one expert of layer L, only layer L run from its cached input
  (``forward_from_layer(..., run_above=False)``).

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` during the row (weights
included). On a CPU, torch memory is not visible to tracemalloc; the script reports how
far the process's resident set size rose above its value at the start of the row
(Linux: the peak is reset per row through ``/proc/self/clear_refs`` and read from
``VmHWM``; elsewhere ``resource.getrusage``'s lifetime high-water mark, whose growth
understates rows that need less than an earlier row). Freed memory the allocator keeps
counts towards the next row's starting value, so CPU numbers are rough.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from uoe_nb.fastpath import LayerInputCache, forward_from_layer, hidden_after_layer
from uoe_nb.moe import NoMoELayersError, decoder_layers, find_moe_layers
from uoe_nb.scale import ARCHITECTURES, MemoryMeter, state_mib
from uoe_nb.trainable import make_trainable

# Real architectures (published config.json values), built with random weights.
CONFIGS = ARCHITECTURES


@dataclass
class Row:
    name: str
    trainable: int
    step_s: float
    peak_mib: float
    state_mib: float  # gradients + AdamW state held after the row's last step


@dataclass
class Result:
    rows: list[Row]
    total: int
    target: int
    exact_gap: float  # largest |cached - full| over the GA loss and RMU's layer-L output
    dtype: str


# --------------------------------------------------------------------------------------
# Model and batch
# --------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, device: torch.device):
    if args.config:
        family, values = CONFIGS[args.config]
        config = AutoConfig.for_model(family, **values)
        if args.dry_run:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if device.type != "cuda":
            sys.exit(f"--config {args.config} needs a GPU (it is a bf16 model of several billion parameters)")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model
    from uoe_nb.zoo import load_zoo_model

    model, _ = load_zoo_model(args.model)
    return model.to(device)


def make_batch(model, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def control_vector(hidden: int, coefficient: float, device, dtype) -> torch.Tensor:
    """RMU's fixed random direction u = c * r / ||r||, r uniform in [0, 1)^d."""
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(hidden, generator=generator)
    return (coefficient * u / u.norm()).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None


def train_step(optimizer, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> Result | None:
    """Measure every row on one model and one batch; ``None`` for a dry run."""
    device = torch.device(args.device)
    model = build_model(args, device)
    total = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(
            f"{args.config}: {total / 1e9:.3f}B parameters, {total * 2 / 2**30:.2f} GiB in bf16 (meta device)"
        )
        return None
    model.train()
    _, layers = decoder_layers(model)
    try:
        moe = {lay.layer_index: lay for lay in find_moe_layers(model)}
    except NoMoELayersError as error:
        sys.exit(f"{error}\n(the UOE rows of this benchmark need routed experts)")
    target = args.layer if args.layer is not None else len(layers) // 2
    if target not in moe:
        sys.exit(f"--layer {target} has no routed experts; MoE layers are {sorted(moe)}")
    if not 0 <= args.expert < moe[target].num_experts:
        sys.exit(
            f"--expert {args.expert} is out of range: layer {target} has {moe[target].num_experts} experts"
        )
    rmu_layers = [i for i in range(target - 2, target + 1) if i in moe]
    batch = make_batch(model, args.batch, args.seq, device)
    labels = batch["input_ids"]
    dtype = next(model.parameters()).dtype
    control = control_vector(model.config.hidden_size, args.steering, device, dtype)
    meter = MemoryMeter(device)
    rows: list[Row] = []

    def measure(name: str, trainable: int, step: Callable[[], None], optimizer=None) -> None:
        meter.begin()
        seconds = time_steps(step, args.warmup, args.steps, device)
        rows.append(Row(name, trainable, seconds, meter.peak_mib(), state_mib(model, optimizer)))
        print(f"  measured {name}: {seconds * 1e3:.2f} ms/step", file=sys.stderr)

    def nll() -> torch.Tensor:
        return model(**batch, labels=labels, use_cache=False).loss

    def rmu_loss(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(hidden, control.expand_as(hidden))

    # Forward only.
    freeze(model)

    def forward_only() -> None:
        with torch.no_grad():
            model(**batch, use_cache=False)

    measure("forward only, no gradients", 0, forward_only)

    # GA, full model.
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    measure("GA, full model", total, train_step(optimizer, lambda: -nll()), optimizer)
    del optimizer
    freeze(model)

    # GA+UOE: one expert and the router of layer L, full forward.
    selection = make_trainable(model, {target: [args.expert]}, routers=[target])
    optimizer = torch.optim.AdamW(selection.param_groups(0.0), lr=args.lr)
    measure(
        "GA+UOE (1 expert + router), full forward",
        selection.num_trainable,
        train_step(optimizer, lambda: -nll()),
        optimizer,
    )
    freeze(model)
    selection.remove()

    # The same from the cached input of layer L.
    selection = make_trainable(model, {target: [args.expert]}, routers=[target])
    optimizer = torch.optim.AdamW(selection.param_groups(0.0), lr=args.lr)
    cache = LayerInputCache(target, max_items=4)

    def cached_nll() -> torch.Tensor:
        return forward_from_layer(model, batch, target, cache, key=0, labels=labels).outputs.loss

    with torch.no_grad():
        gap = (cached_nll() - nll()).abs().item()  # the first call also runs the exactness check
    measure(
        "GA+UOE, cached input of layer L",
        selection.num_trainable,
        train_step(optimizer, lambda: -cached_nll()),
        optimizer,
    )
    del optimizer, cache
    freeze(model)
    selection.remove()

    # RMU as the WMDP code runs it: full forward, a hook keeps layer L's output.
    selection = make_trainable(model, {i: list(range(moe[i].num_experts)) for i in rmu_layers})
    optimizer = torch.optim.AdamW(selection.param_groups(0.0), lr=args.lr)
    kept: dict[str, torch.Tensor] = {}

    def keep(_module, _args, output):
        kept["h"] = output[0] if isinstance(output, tuple) else output

    def rmu_full() -> torch.Tensor:
        model(**batch, use_cache=False)
        return rmu_loss(kept["h"])

    handle = layers[target].register_forward_hook(keep)
    try:
        measure(
            f"RMU (every expert of layers {rmu_layers[0]}-{rmu_layers[-1]}), full forward",
            selection.num_trainable,
            train_step(optimizer, rmu_full),
            optimizer,
        )
    finally:
        handle.remove()
    del optimizer
    freeze(model)
    selection.remove()

    # RMU+UOE: one expert of layer L; only layer L runs, from its cached input.
    selection = make_trainable(model, {target: [args.expert]})
    optimizer = torch.optim.AdamW(selection.param_groups(0.0), lr=args.lr)
    cache = LayerInputCache(target, max_items=4)

    def layer_output() -> torch.Tensor:
        return forward_from_layer(model, batch, target, cache, key=0, run_above=False).layer_hidden

    with torch.no_grad():
        gap = max(gap, (layer_output() - hidden_after_layer(model, batch, target)).abs().max().item())
    measure(
        "RMU+UOE (1 expert), layer L only, from its cached input",
        selection.num_trainable,
        train_step(optimizer, lambda: rmu_loss(layer_output())),
        optimizer,
    )
    selection.remove()
    return Result(
        rows=rows, total=total, target=target, exact_gap=gap, dtype=str(dtype).removeprefix("torch.")
    )


def machine_info(device: torch.device) -> list[str]:
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, device: {device}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append(f"CPU: {platform.processor() or platform.machine()}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="tiny-qwen2moe", help="a zoo model (default: %(default)s)")
    source.add_argument(
        "--config", choices=sorted(CONFIGS), help="random weights of a real architecture (GPU)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layer", type=int, default=None, help="target layer L (default: the middle layer)")
    parser.add_argument("--expert", type=int, default=0, help="target expert of layer L")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steering", type=float, default=8000.0, help="RMU control-vector norm c")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--dry-run", action="store_true", help="build on the meta device and count parameters"
    )
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --seq and --steps must be positive and --warmup non-negative")
    if args.config:
        args.model = None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("UOE_NB_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for line in machine_info(device):
        print(line)
    result = run(args)
    if result is None:
        return
    meter = MemoryMeter(device)
    print(
        f"\nmodel: {args.config or args.model} ({result.total / 1e6:.1f}M parameters, {result.dtype}), "
        f"batch {args.batch} x {args.seq} tokens, target layer {result.target}, expert {args.expert}, AdamW; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps"
    )
    print(f"memory: {meter.description}; state = gradients + AdamW state after the last step")
    print("\n| step | trainable params | s/step | vs full GA | peak MiB | state MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    full = next(r.step_s for r in result.rows if r.name.startswith("GA, full"))
    for r in result.rows:
        print(
            f"| {r.name} | {r.trainable:,} | {r.step_s:.4f} | {r.step_s / full:.2f}x "
            f"| {r.peak_mib:,.0f} | {r.state_mib:,.1f} |"
        )
    print(
        f"\ncached path vs full forward: largest difference in GA loss and layer-L output = {result.exact_gap:.2e}"
    )


if __name__ == "__main__":
    main()
