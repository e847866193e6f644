"""Full-model GA vs GA+UOE on the tiny zoo, run to the same forget accuracy.

    python benchmarks/ga_vs_uoe.py --models tiny-qwen2moe tiny-mixtral --seeds 0 1 2

Prints, per model and seed, the kept checkpoint's forget accuracy (FA), utility (UT),
step, and mean expert-selection overlap with the original model on forget and retain
text; then the mean and spread over seeds. Nothing here is tuned to agree with the
paper: the settings are the library defaults plus the learning rate and budget below.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from uoe_nb.unlearn import UnlearnConfig, unlearn, world_evaluator
from uoe_nb.world import build_world
from uoe_nb.zoo import load_zoo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen2moe", "tiny-mixtral"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target-fa", type=float, default=0.35)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-uoe", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("UOE_NB_PROGRESS", "0")
    torch.set_num_threads(1)
    world = build_world(0)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            for scope, lr in (("full", args.lr_full), ("uoe", args.lr_uoe)):
                model, tok = load_zoo_model(name)
                cfg = UnlearnConfig(method="ga", scope=scope, lr=lr, steps=args.steps, batch_size=4,
                                    eval_every=args.eval_every, stop_forget_accuracy=args.target_fa, seed=seed)  # fmt: skip
                start = time.perf_counter()
                res = unlearn(model, world.forget_corpus, world.retain_corpus, cfg, tokenizer=tok,
                              evaluate=world_evaluator(tok, world))  # fmt: skip
                best = res.best
                rows.append({
                    "model": name, "seed": seed, "scope": res.scope.name, "step": best.step,
                    "FA": best.metrics["forget_accuracy"], "UT": best.metrics["utility_accuracy"],
                    "overlap_forget": statistics.mean(best.overlap_forget.values()),
                    "overlap_retain": statistics.mean(best.overlap_retain.values()),
                    "seconds": time.perf_counter() - start, "stopped": res.stopped,
                })  # fmt: skip
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                      flush=True)  # fmt: skip
    print("\n| model | scope | FA | UT | overlap forget | overlap retain | step |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for scope in sorted({r["scope"] for r in rows if r["model"] == name}):
            sel = [r for r in rows if r["model"] == name and r["scope"] == scope]

            def ms(key, sel=sel):
                vals = [r[key] for r in sel]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

            print(f"| {name} | {scope} | {ms('FA')} | {ms('UT')} | {ms('overlap_forget')} | "
                  f"{ms('overlap_retain')} | {ms('step')} |")  # fmt: skip


if __name__ == "__main__":
    main()
