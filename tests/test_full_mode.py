"""Every chapter's full-mode branch executes, on a CPU, with the hub replaced by the tiny world.

``full_mode_fakes.install`` stands in for the three hub-facing functions (model loading,
dataset rows, lm-eval's hub tasks) and caps unlearning runs at a few steps; everything else
is the chapter's own full-mode code: its parameters, its model and data calls, its tables
and figures. A cell that raises anything but an ``AssertionError`` fails the test. The
chapters' science asserts hold for their real budgets, not for four steps on a tiny model, so
an ``AssertionError`` is allowed and reported, not failed.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))

PRELUDE = f"""
import os, sys
os.environ["UOE_NB_MODE"] = "full"
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import full_mode_fakes
full_mode_fakes.install()
"""


def _check_full_mode_branch(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE))
    env_mode = os.environ.get("UOE_NB_MODE")
    client = NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    assert os.environ.get("UOE_NB_MODE") == env_mode  # the kernel's environment is its own
    errors, asserts = [], []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                (asserts if out["ename"] == "AssertionError" else errors).append(
                    f"cell {index}: {out['ename']}: {out['evalue']}"
                )
    mode_line = next((o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                      if o.get("output_type") == "stream" and "mode=" in o.get("text", "")), "")  # fmt: skip
    assert "mode=full" in mode_line, f"the chapter did not run in full mode: {mode_line!r}"
    assert not errors, "\n".join(errors + [f"(science asserts under the capped budget: {asserts})"])


# One test class per chapter: the test command distributes test scopes (modules and classes)
# over its workers, so the chapters' rehearsals can run in parallel.
def _test_class(path: Path) -> type:
    def test_full_mode_branch_runs(self, tmp_path):
        _check_full_mode_branch(path, tmp_path)

    name = "TestFullMode_" + path.stem
    return type(
        name, (), {"test_full_mode_branch_runs": test_full_mode_branch_runs, "__doc__": str(path.name)}
    )


for _path in CHAPTERS:
    _cls = _test_class(_path)
    globals()[_cls.__name__] = _cls
del _path, _cls
