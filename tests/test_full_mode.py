"""Every chapter's full-mode branch executes, on a CPU, with the hub replaced by the tiny world.

``full_mode_fakes.install`` stands in for the three hub-facing functions (model loading,
dataset rows, lm-eval's hub tasks) and caps unlearning runs at a few steps; everything else
is the chapter's own full-mode code: its parameters, its model and data calls, its tables
and figures. Each chapter runs once per preset in :data:`PRESETS` (chosen with
``UOE_NB_MODEL``), and the fakes serve a tiny bf16 model of that preset's own family, so a
line that only works for one family or only in fp32 fails here. A cell that raises anything
but an ``AssertionError`` fails the test. The chapters' science asserts hold for their real
budgets, not for four steps on a tiny model, so an ``AssertionError`` is allowed and reported,
not failed.

A chapter that trains or scores questions prints its plan (``plan: runs=.. optimizer_steps=..
questions=..``) before it does, and the test compares that line with what the chapter asked
the fakes for at its real budget: runs, optimizer steps and questions must be equal. A chapter
that does neither (Chapter 3, attribution only) may print none.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_mode_fakes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
# The default preset (OLMoE: no shared experts) and one with a shared expert (Qwen2Moe).
PRESETS = {"olmoe": "olmoe-1b-7b", "qwen2moe": "qwen1.5-moe-a2.7b"}

PRELUDE = """
import os, sys
os.environ["UOE_NB_MODE"] = "full"
os.environ["UOE_NB_MODEL"] = {preset!r}
sys.path.insert(0, {tests!r})
import full_mode_fakes
full_mode_fakes.install(counts_path={counts!r})
"""


def _outputs(nb, kind: str):
    return [
        (i, o) for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if o.get("output_type") == kind
    ]


def _check_full_mode_branch(path: Path, preset: str, tmp_path: Path) -> None:
    counts_path = tmp_path / "counts.json"
    nb = nbformat.read(path, as_version=4)
    prelude = PRELUDE.format(
        preset=preset, tests=str(Path(__file__).resolve().parent), counts=str(counts_path)
    )
    nb.cells.insert(0, nbformat.v4.new_code_cell(prelude))
    env = (os.environ.get("UOE_NB_MODE"), os.environ.get("UOE_NB_MODEL"))
    client = NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    assert (os.environ.get("UOE_NB_MODE"), os.environ.get("UOE_NB_MODEL")) == env  # the kernel's is its own
    errors, asserts = [], []
    for index, out in _outputs(nb, "error"):
        (asserts if out["ename"] == "AssertionError" else errors).append(
            f"cell {index}: {out['ename']}: {out['evalue']}"
        )
    text = "".join(o.get("text", "") for _, o in _outputs(nb, "stream"))
    mode_line = next((line for line in text.splitlines() if "mode=" in line), "")
    assert "mode=full" in mode_line, f"the chapter did not run in full mode: {mode_line!r}"
    assert not errors, "\n".join(errors + [f"(science asserts under the capped budget: {asserts})"])

    counts = json.loads(counts_path.read_text())
    want = full_mode_fakes.served_kind(preset)
    served = [m for m in counts["models"] if m["requested"] == preset]
    assert served, f"the chapter never loaded {preset}: {counts['models']}"
    assert all(m["served"] == want and m["dtype"] == "bfloat16" for m in served), served
    plan = full_mode_fakes.parse_plan(text)
    plan_log = os.environ.get("UOE_NB_PLAN_LOG")  # where to collect the printed plans (README figures)
    if plan_log:
        line = next((ln for ln in text.splitlines() if ln.startswith("plan:")), "no plan")
        with open(plan_log, "a") as log:
            log.write(f"{path.stem} {preset}: {line}\n")
    if plan is None:  # only a chapter that neither trains nor scores questions may go without one
        assert counts["runs"] == 0 and counts["questions"] == 0, (
            f"the chapter trains or evaluates but prints no plan: {json.dumps(counts, indent=1)[:4000]}"
        )
        return
    problems = full_mode_fakes.compare_with_plan(plan, counts)
    assert not problems, "\n".join(problems + [f"asked for: {json.dumps(counts, indent=1)[:4000]}"])


# One test class per (chapter, preset): the test command distributes test scopes (modules and
# classes) over its workers, so the rehearsals run in parallel.
def _test_class(path: Path, short: str, preset: str) -> type:
    def test_full_mode_branch_runs(self, tmp_path):
        _check_full_mode_branch(path, preset, tmp_path)

    name = f"TestFullMode_{path.stem}_{short}"
    doc = f"{path.name} in full mode on a tiny bf16 stand-in for {preset}"
    return type(name, (), {"test_full_mode_branch_runs": test_full_mode_branch_runs, "__doc__": doc})


for _path in CHAPTERS:
    for _short, _preset in PRESETS.items():
        _cls = _test_class(_path, _short, _preset)
        globals()[_cls.__name__] = _cls
del _path, _short, _preset, _cls
