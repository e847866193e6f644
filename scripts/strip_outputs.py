#!/usr/bin/env python3
"""Strip outputs and execution counts from the book's notebooks, in place.

Chapters are stored without outputs: the book build and nbval execute them anyway, and stored
outputs only bloat diffs. Usage:

    python scripts/strip_outputs.py            # every notebook under book/
    python scripts/strip_outputs.py a.ipynb    # given notebooks only
    python scripts/strip_outputs.py --check    # change nothing; exit 1 if any notebook has outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
# Cell metadata that front ends write while running a notebook.
RUN_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


def book_notebooks(book_dir: Path) -> list[Path]:
    """Notebooks under book_dir, without checkpoints or build output."""
    skip = {".ipynb_checkpoints", "_build", "_static"}
    return sorted(
        p for p in book_dir.rglob("*.ipynb") if not skip.intersection(p.relative_to(book_dir).parts)
    )


def strip(nb: nbformat.NotebookNode) -> bool:
    """Remove outputs, execution counts and run metadata; return whether anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell.outputs = []
                changed = True
            if cell.get("execution_count") is not None:
                cell.execution_count = None
                changed = True
        for key in RUN_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    if "widgets" in nb.metadata:
        del nb.metadata["widgets"]
        changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to strip (default: book/**/*.ipynb)"
    )
    parser.add_argument("--check", action="store_true", help="report notebooks with outputs, change nothing")
    args = parser.parse_args(argv)

    paths = args.notebooks or book_notebooks(ROOT / "book")
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
