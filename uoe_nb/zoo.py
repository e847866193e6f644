"""The tiny model zoo: MoE checkpoints that know the tiny world (Chapter 1).

Each zoo model is a real transformers-5 architecture at toy size, pretrained from
scratch on :func:`uoe_nb.world.build_world` so that it knows the forget domain, the
people and the utility subjects, and routes by topic:

==============================  ==============================================================
``tiny-qwen2moe``               Qwen2Moe style: 16 experts, top-2, one shared expert
``tiny-deepseek``               DeepSeek-V2 style: 32 fine-grained experts, top-4, 2 shared
                                experts, first layer dense
``tiny-mixtral``                Mixtral style: 8 experts, top-2, no shared expert
``tiny-dense``                  dense twin of ``tiny-qwen2moe``: the same code with every layer
                                dense, and the same active parameters per token
``tiny-qwen2moe-oracle``        ``tiny-qwen2moe`` retrained without the forget domain and the
                                forget-target people: the gold standard of unlearning
``tiny-qwen2moe-deep``          ``tiny-qwen2moe`` with 8 layers instead of 4 (same recipe)
``tiny-qwen2moe-deep-oracle``   ``tiny-qwen2moe-deep`` retrained without the forget domain and
                                the forget-target people
==============================  ==============================================================

The checkpoints ship with the package (``uoe_nb/zoo_data``, a few MB each) so that
chapters and tests load them in about a second. Rebuild them with
``python -m uoe_nb.zoo build`` (about the time the README states, on 2 CPU cores), or
only some of them with ``python -m uoe_nb.zoo build NAME ...`` (the others are left as
they are); a build is deterministic for a given machine and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from .families import random_model, tiny_config
from .moe import NoMoELayersError, find_moe_layers
from .progress import progress
from .world import TinyWorld, build_world

__all__ = [
    "ZOO",
    "ZooSpec",
    "build_tokenizer",
    "build_zoo",
    "load_zoo_model",
    "pretrain",
    "zoo_dir",
]

log = logging.getLogger(__name__)

PACKAGED_ZOO = Path(__file__).parent / "zoo_data"
WORLD_SEED = 0
VOCAB_SIZE = 2048
_SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class ZooSpec:
    """How one zoo model is built."""

    family: str
    description: str
    include_forget: bool = True
    config: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


_BASE = dict(hidden=64, layers=4, heads=4)
ZOO: dict[str, ZooSpec] = {
    "tiny-qwen2moe": ZooSpec(
        "qwen2_moe",
        "Qwen2Moe style: 16 experts top-2 plus a shared expert",
        config=dict(_BASE, experts=16, top_k=2, intermediate=64),
    ),
    "tiny-deepseek": ZooSpec(
        "deepseek_v2",
        "DeepSeek-V2 style: 32 fine-grained experts top-4, 2 shared experts, first layer dense",
        config=dict(_BASE, experts=32, top_k=4, intermediate=32),
    ),
    "tiny-mixtral": ZooSpec(
        "mixtral",
        "Mixtral style: 8 experts top-2, no shared expert",
        config=dict(_BASE, experts=8, top_k=2, intermediate=128),
    ),
    # The same Qwen2Moe code with every layer dense (mlp_only_layers), FFN width 256 =
    # tiny-qwen2moe's active width (2 experts x 64 + shared expert 128).
    "tiny-dense": ZooSpec(
        "qwen2_moe",
        "dense twin of tiny-qwen2moe (same code, every layer dense, same active parameters)",
        config=dict(_BASE, experts=16, top_k=2, intermediate=128, mlp_only_layers=[0, 1, 2, 3]),
    ),
    "tiny-qwen2moe-oracle": ZooSpec(
        "qwen2_moe",
        "tiny-qwen2moe retrained without the forget domain and forget targets",
        include_forget=False,
        config=dict(_BASE, experts=16, top_k=2, intermediate=64),
    ),
    # The deeper pair: tiny-qwen2moe and its oracle with 8 layers instead of 4, the rest
    # of the recipe (width, experts, steps, batch, learning rate, seed) unchanged.
    "tiny-qwen2moe-deep": ZooSpec(
        "qwen2_moe",
        "tiny-qwen2moe with 8 layers instead of 4",
        config=dict(_BASE, layers=8, experts=16, top_k=2, intermediate=64),
    ),
    "tiny-qwen2moe-deep-oracle": ZooSpec(
        "qwen2_moe",
        "tiny-qwen2moe-deep retrained without the forget domain and forget targets",
        include_forget=False,
        config=dict(_BASE, layers=8, experts=16, top_k=2, intermediate=64),
    ),
}


# ---------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------


def build_tokenizer(world: TinyWorld, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the whole world (forget domain included).

    Every zoo model, the oracle included, shares it, so token ids mean the same in all.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = world.pretraining_corpus(include_forget=True)
    corpus = corpus + [q["question"] for q in world.forget_questions + world.utility_questions]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=256
    )


# ---------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------


def _encode(tokenizer, docs: Sequence[str], max_len: int) -> list[list[int]]:
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [x[: max_len - 1] + [tokenizer.eos_token_id] for x in ids]


def _batch(encoded: list[list[int]], idx: Sequence[int], pad_id: int):
    rows = [encoded[i] for i in idx]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def pretrain(
    model: PreTrainedModel,
    tokenizer,
    docs: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 100,
    seed: int = 0,
    max_len: int = 96,
    desc: str = "pretrain",
) -> list[float]:
    """Next-token pretraining on ``docs`` (AdamW, warmup + cosine). Returns the losses.

    MoE models add their load-balancing loss (``output_router_logits``), which is what
    spreads routing over the experts as in real MoE pretraining.
    """
    if not docs:
        raise ValueError("no documents to pretrain on")
    encoded = _encode(tokenizer, docs, max_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    try:
        moe = bool(find_moe_layers(model))
    except NoMoELayersError:
        moe = False
    model.train()
    losses = []
    for _ in progress(range(steps), desc=desc):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        input_ids, mask, labels = _batch(encoded, idx, tokenizer.pad_token_id)
        kwargs = {"output_router_logits": True} if moe else {}
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, **kwargs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


# ---------------------------------------------------------------------------------
# Building, saving and loading
# ---------------------------------------------------------------------------------


def zoo_dir() -> Path:
    """Where zoo checkpoints are read from: ``$UOE_NB_ZOO_DIR`` or the packaged copy."""
    return Path(os.environ.get("UOE_NB_ZOO_DIR", PACKAGED_ZOO))


def _build_one(name: str, out_dir: str, steps: int | None = None) -> dict:
    torch.set_num_threads(1)
    spec = ZOO[name]
    world = build_world(WORLD_SEED)
    tokenizer = build_tokenizer(world)
    config = tiny_config(spec.family, vocab_size=len(tokenizer), **spec.config)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = random_model(config, seed=spec.seed)
    docs = world.pretraining_corpus(include_forget=spec.include_forget)
    start = time.perf_counter()
    n_steps = steps if steps is not None else spec.steps
    losses = pretrain(
        model, tokenizer, docs, steps=n_steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, desc=name
    )
    seconds = time.perf_counter() - start
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    manifest = {
        "name": name,
        "spec": asdict(spec),
        "steps": n_steps,
        "world_seed": WORLD_SEED,
        "world_fingerprint": world.fingerprint(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    (target / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_zoo(
    out_dir: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    *,
    jobs: int = 2,
    steps: int | None = None,
) -> list[dict]:
    """Pretrain the zoo models ``names`` (all by default) into ``out_dir``.

    ``jobs`` models train in parallel processes, one CPU thread each. ``steps``
    overrides every model's step budget (for quick tests).
    """
    names = list(names) if names is not None else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise ValueError(f"unknown zoo models {unknown}; the zoo has {list(ZOO)}")
    out = str(out_dir if out_dir is not None else zoo_dir())
    if jobs <= 1 or len(names) == 1:
        return [_build_one(n, out, steps) for n in names]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(jobs, len(names))) as pool:
        return pool.starmap(_build_one, [(n, out, steps) for n in names])


def load_zoo_model(name: str, *, directory: str | os.PathLike | None = None):
    """Load a zoo model and its tokenizer offline (``AutoModelForCausalLM``), in eval mode.

    Refuses a checkpoint built from a different world than the current code generates.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has {list(ZOO)}")
    path = Path(directory) if directory is not None else zoo_dir()
    path = path / name
    manifest_path = path / "zoo.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"zoo model {name!r} is not built at {path}; build it with `python -m uoe_nb.zoo build`"
        )
    manifest = json.loads(manifest_path.read_text())
    expected = build_world(manifest["world_seed"]).fingerprint()
    if manifest["world_fingerprint"] != expected:
        raise RuntimeError(
            f"zoo model {name!r} was built from a different tiny world (fingerprint "
            f"{manifest['world_fingerprint']} != {expected}); rebuild it with `python -m uoe_nb.zoo build`"
        )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def report(names: Sequence[str] | None = None) -> str:
    """A Markdown table of every zoo model's parameters and tiny-world scores."""
    from .evaluation import evaluate_world
    from .moe import parameter_counts

    world = build_world(WORLD_SEED)
    lines = [
        "| model | parameters (active) | FA (forget MC) | UT (utility MC) | forget fill / QA | neighbour fill / QA |",
        "|---|---|---|---|---|---|",
    ]
    for name in names or list(ZOO):
        model, tok = load_zoo_model(name)
        counts = parameter_counts(model)
        s = evaluate_world(model, tok, world)
        lines.append(
            f"| `{name}` | {counts['total']:,} ({counts['active']:,}) | {s.forget_mc:.3f} | {s.utility_mc:.3f} "
            f"| {s.forget_fill:.2f} / {s.forget_qa:.2f} | {s.neighbor_fill:.2f} / {s.neighbor_qa:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m uoe_nb.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pretrain the zoo models")
    b.add_argument("names", nargs="*", help=f"models to build (default: all of {list(ZOO)})")
    b.add_argument("--out", default=None, help="output directory (default: the packaged zoo)")
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--steps", type=int, default=None)
    r = sub.add_parser("report", help="evaluate the zoo models and print a Markdown table")
    r.add_argument("names", nargs="*", help="models to evaluate (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.command == "report":
        print(report(args.names or None))  # noqa: T201 - the command's output
        return
    start = time.perf_counter()
    for m in build_zoo(args.out, args.names or None, jobs=args.jobs, steps=args.steps):
        log.info("%s: %d parameters, final loss %.3f, %.0f s", m["name"], m["parameters"], m["final_loss"],
                 m["train_seconds"])  # fmt: skip
    log.info("zoo built in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
