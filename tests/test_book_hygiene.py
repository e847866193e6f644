"""Book hygiene: chapters are stored clean, the TOC matches the pages, every chapter can be
opened and run on Colab, and MathJax is served from the book itself.

Each check is a function that takes paths and returns a list of problems, so that the tests
below run it both on the real book and on deliberately broken copies in a temporary folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COLAB_PREFIX = "https://colab.research.google.com/github/uoe-book/uoe-book/blob/main/"
SKIP_PARTS = {".ipynb_checkpoints", "_build", "_static"}
PAGE_SUFFIXES = (".ipynb", ".md")

COLAB_GUARD = re.compile(r"""^(\s*)if\s+["']google\.colab["']\s+in\s+sys\.modules\s*:\s*(#.*)?$""")
INSTALL = re.compile(
    r"""(^|[\s%!])(pip|pip3|conda|mamba|uv\s+pip)\s+install\b|["']pip["'],\s*["']install["']"""
)


def book_pages(book_dir: Path, suffixes: tuple[str, ...] = PAGE_SUFFIXES) -> list[Path]:
    """Pages (notebooks and Markdown files) under book_dir, without checkpoints, build output or static files."""
    pages = [p for p in book_dir.rglob("*") if p.suffix in suffixes and p.is_file()]
    return sorted(p for p in pages if not SKIP_PARTS.intersection(p.relative_to(book_dir).parts))


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def load_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# (a) stored without outputs


def output_problems(path: Path) -> list[str]:
    """Code cells that carry outputs or execution counts."""
    problems = []
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"{path.name}: cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"{path.name}: cell {i} has execution count {cell['execution_count']}")
    return problems


# (b) the TOC lists every page and only pages that exist


def toc_entries(toc: dict) -> list[str]:
    """Every `root` and `file` entry of a Jupyter Book _toc.yml, in order."""
    entries = [toc["root"]] if "root" in toc else []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return entries


def toc_problems(toc_path: Path, book_dir: Path) -> list[str]:
    """TOC entries without a file, and pages under book_dir that the TOC does not list."""
    root = toc_path.parent
    entries = toc_entries(yaml.safe_load(toc_path.read_text(encoding="utf-8")) or {})
    problems = []
    listed = set()
    for entry in entries:
        stem = entry[: -len(Path(entry).suffix)] if Path(entry).suffix in PAGE_SUFFIXES else entry
        listed.add(stem)
        if not any((root / f"{stem}{suffix}").is_file() for suffix in PAGE_SUFFIXES):
            problems.append(f"{toc_path.name} lists {entry!r}, but no {stem}.ipynb or {stem}.md exists")
    for page in book_pages(book_dir):
        stem = page.relative_to(root).with_suffix("").as_posix()
        if stem not in listed:
            problems.append(f"{page.relative_to(root)} is not listed in {toc_path.name}")
    return problems


# (c) every chapter is ready for Colab


def unguarded_installs(source: str) -> list[str]:
    """Install lines of a code cell that do not sit inside `if "google.colab" in sys.modules:`."""
    bad = []
    guard_indent = None
    for line in source.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if guard_indent is not None and indent <= guard_indent:
            guard_indent = None
        match = COLAB_GUARD.match(line)
        if match:
            guard_indent = len(match.group(1))
            continue
        if INSTALL.search(line) and guard_indent is None:
            bad.append(line.strip())
    return bad


def has_colab_setup(source: str) -> bool:
    """Whether the cell imports sys and installs something, only under the Colab guard."""
    guarded = any(COLAB_GUARD.match(line) for line in source.splitlines())
    return (
        guarded and "import sys" in source and bool(INSTALL.search(source)) and not unguarded_installs(source)
    )


def chapter_problems(path: Path, root: Path) -> list[str]:
    """A chapter needs a `parameters` cell, an Open-in-Colab badge first and a Colab-only setup cell."""
    cells = load_notebook(path)["cells"]
    name = path.name
    problems = []

    if not any(
        c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", []) for c in cells
    ):
        problems.append(f"{name}: no code cell is tagged 'parameters'")

    url = COLAB_PREFIX + path.relative_to(root).as_posix()
    first_md = next((cell_source(c) for c in cells if c["cell_type"] == "markdown"), "")
    if f"]({url})" not in first_md and f'href="{url}"' not in first_md:
        problems.append(f"{name}: the first Markdown cell does not link to {url}")
    if "open in colab" not in first_md.lower():
        problems.append(f"{name}: the first Markdown cell has no 'Open in Colab' badge")

    code = [cell_source(c) for c in cells if c["cell_type"] == "code"]
    if not any(has_colab_setup(src) for src in code):
        problems.append(f'{name}: no setup cell that installs only under `if "google.colab" in sys.modules:`')
    for i, src in enumerate(code):
        for line in unguarded_installs(src):
            problems.append(f"{name}: code cell {i} installs outside the Colab guard: {line}")
    return problems


# (d) MathJax is vendored


def mathjax_problems(config_path: Path) -> list[str]:
    """The Sphinx mathjax_path must name a local file in a static folder, with its CHTML fonts beside it."""
    root = config_path.parent
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    sphinx_config = (config.get("sphinx") or {}).get("config") or {}
    mathjax_path = sphinx_config.get("mathjax_path")
    if not mathjax_path:
        return [f"{config_path.name} sets no sphinx.config.mathjax_path: MathJax would load from a CDN"]
    if re.match(r"^(https?:)?//", mathjax_path):
        return [f"mathjax_path {mathjax_path!r} points at the network, not at the vendored copy"]
    static_dirs = [root / d for d in sphinx_config.get("html_static_path", [])] + [root / "_static"]
    found = [d / mathjax_path for d in static_dirs if (d / mathjax_path).is_file()]
    if not found:
        return [
            f"mathjax_path {mathjax_path!r} is in none of the static folders {[str(d) for d in static_dirs]}"
        ]
    fonts = found[0].parent / "output" / "chtml" / "fonts" / "woff-v2"
    if not any(fonts.glob("*.woff")):
        return [f"no MathJax CHTML fonts in {fonts}"]
    return []


# The real book

NOTEBOOKS = book_pages(ROOT / "book", (".ipynb",))


# (e) figures come from the library: a chapter calls a plot_* helper, it draws nothing itself

DRAWING = re.compile(r"\bimport\s+matplotlib|\bfrom\s+matplotlib\b|\bplt\.|\.subplots\(|\bax\w*\.(plot|bar|scatter|set_\w+)\(")


def drawing_problems(path: Path) -> list[str]:
    """Code cells that assemble a figure with matplotlib instead of calling a uoe_nb helper."""
    problems = []
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] == "code":
            for line in cell_source(cell).splitlines():
                if DRAWING.search(line.split("#", 1)[0]):
                    problems.append(f"{path.name}: cell {i} draws with matplotlib: {line.strip()}")
    return problems


def _id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_book_has_chapter_notebooks():
    assert NOTEBOOKS, "no chapter notebooks under book/"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_id)
def test_notebook_is_stored_without_outputs(notebook):
    problems = output_problems(notebook)
    assert not problems, "run `python scripts/strip_outputs.py`:\n" + "\n".join(problems)


def test_toc_lists_exactly_the_book_pages():
    problems = toc_problems(ROOT / "_toc.yml", ROOT / "book")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_id)
def test_chapter_is_ready_for_colab(notebook):
    problems = chapter_problems(notebook, ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_id)
def test_chapter_draws_through_the_library(notebook):
    problems = drawing_problems(notebook)
    assert not problems, "move the figure into a plot_* helper of uoe_nb:\n" + "\n".join(problems)


def test_mathjax_is_vendored():
    problems = mathjax_problems(ROOT / "_config.yml")
    assert not problems, "\n".join(problems)


# The checks themselves, on broken books in a temporary folder

GOOD_SETUP = 'import sys\n\nif "google.colab" in sys.modules:\n    %pip install -q uoe_nb\n'


def make_notebook(path: Path, cells: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def md(source: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def code(
    source: str, tags: tuple[str, ...] = (), outputs: list | None = None, count: int | None = None
) -> dict:
    return {
        "cell_type": "code",
        "metadata": {"tags": list(tags)},
        "source": source,
        "outputs": outputs or [],
        "execution_count": count,
    }


def badge(root: Path, path: Path) -> dict:
    url = COLAB_PREFIX + path.relative_to(root).as_posix()
    return md(
        f"# A chapter\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})\n"
    )


def good_chapter(root: Path, name: str = "02_good.ipynb") -> Path:
    path = root / "book" / name
    return make_notebook(
        path, [badge(root, path), code(GOOD_SETUP), code("seed = 0\n", ("parameters",)), code("x = 1\n")]
    )


def test_good_chapter_passes_every_check(tmp_path):
    path = good_chapter(tmp_path)
    assert output_problems(path) == []
    assert chapter_problems(path, tmp_path) == []


def test_outputs_and_execution_counts_are_caught(tmp_path):
    stream = {"output_type": "stream", "name": "stdout", "text": "1\n"}
    path = make_notebook(tmp_path / "book" / "x.ipynb", [code("print(1)", outputs=[stream], count=3)])
    problems = output_problems(path)
    assert len(problems) == 2
    assert "has outputs" in problems[0] and "execution count 3" in problems[1]


def test_missing_parameters_badge_and_setup_are_caught(tmp_path):
    path = make_notebook(tmp_path / "book" / "03_bad.ipynb", [md("# No badge here\n"), code("x = 1\n")])
    problems = "\n".join(chapter_problems(path, tmp_path))
    assert "tagged 'parameters'" in problems
    assert "does not link to" in problems and "/blob/main/book/03_bad.ipynb" in problems
    assert "no 'Open in Colab' badge" in problems
    assert "no setup cell" in problems


def test_badge_for_another_chapter_is_caught(tmp_path):
    other = tmp_path / "book" / "01_other.ipynb"
    path = tmp_path / "book" / "04_copy.ipynb"
    make_notebook(path, [badge(tmp_path, other), code(GOOD_SETUP), code("seed = 0\n", ("parameters",))])
    problems = chapter_problems(path, tmp_path)
    assert len(problems) == 1 and "does not link to" in problems[0]


@pytest.mark.parametrize(
    "source",
    [
        "%pip install uoe_nb\n",
        "!pip install -q uoe_nb\n",
        'import sys\nif "google.colab" in sys.modules:\n    import os\n%pip install uoe_nb\n',
        'import subprocess, sys\nsubprocess.run([sys.executable, "-m", "pip", "install", "uoe_nb"])\n',
    ],
    ids=["bare-magic", "bare-shell", "after-the-guard", "subprocess"],
)
def test_install_outside_the_colab_guard_is_caught(tmp_path, source):
    path = good_chapter(tmp_path)
    nb = load_notebook(path)
    nb["cells"].append(code(source))
    path.write_text(json.dumps(nb), encoding="utf-8")
    problems = chapter_problems(path, tmp_path)
    assert any("installs outside the Colab guard" in p for p in problems), problems


def test_guarded_installs_are_accepted():
    assert unguarded_installs(GOOD_SETUP) == []
    nested = (
        'import sys\nif "google.colab" in sys.modules:\n    for pkg in ["a"]:\n        %pip install {pkg}\n'
    )
    assert unguarded_installs(nested) == []
    assert unguarded_installs("# Colab runs `pip install` in the cell above\nx = 1\n") == []


def write_toc(root: Path, chapters: list[str]) -> Path:
    toc = {"format": "jb-book", "root": "book/intro", "chapters": [{"file": c} for c in chapters]}
    path = root / "_toc.yml"
    path.write_text(yaml.safe_dump(toc), encoding="utf-8")
    return path


def test_toc_with_missing_and_unlisted_pages_is_caught(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    (book / "intro.md").write_text("# Intro\n", encoding="utf-8")
    good_chapter(tmp_path, "01_listed.ipynb")
    good_chapter(tmp_path, "02_unlisted.ipynb")
    (book / "notes.md").write_text("# Stray page\n", encoding="utf-8")
    (book / ".ipynb_checkpoints").mkdir()
    (book / ".ipynb_checkpoints" / "01_listed-checkpoint.ipynb").write_text("{}", encoding="utf-8")
    toc = write_toc(tmp_path, ["book/01_listed", "book/09_missing"])
    problems = toc_problems(toc, book)
    assert len(problems) == 3, problems
    assert "'book/09_missing'" in problems[0]
    assert {"book/02_unlisted.ipynb", "book/notes.md"} == {p.split(" is not listed")[0] for p in problems[1:]}
    assert (
        toc_problems(write_toc(tmp_path, ["book/01_listed", "book/02_unlisted.ipynb", "book/notes"]), book)
        == []
    )


def write_config(root: Path, mathjax_path: str | None) -> Path:
    config = {"sphinx": {"config": {"html_static_path": ["book/_static"]}}}
    if mathjax_path is not None:
        config["sphinx"]["config"]["mathjax_path"] = mathjax_path
    path = root / "_config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_mathjax_from_cdn_or_missing_is_caught(tmp_path):
    assert "CDN" in mathjax_problems(write_config(tmp_path, None))[0]
    cdn = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"
    assert "network" in mathjax_problems(write_config(tmp_path, cdn))[0]
    assert "none of the static folders" in mathjax_problems(write_config(tmp_path, "mathjax/tex-chtml.js"))[0]

    vendored = tmp_path / "book" / "_static" / "mathjax"
    vendored.mkdir(parents=True)
    (vendored / "tex-chtml.js").write_text("/* MathJax */", encoding="utf-8")
    assert "fonts" in mathjax_problems(write_config(tmp_path, "mathjax/tex-chtml.js"))[0]
    fonts = vendored / "output" / "chtml" / "fonts" / "woff-v2"
    fonts.mkdir(parents=True)
    (fonts / "MathJax_Main-Regular.woff").write_bytes(b"")
    assert mathjax_problems(write_config(tmp_path, "mathjax/tex-chtml.js")) == []


def test_figure_code_in_a_chapter_is_caught(tmp_path):
    path = good_chapter(tmp_path)
    assert drawing_problems(path) == []
    drawn = make_notebook(tmp_path / "book" / "03_drawn.ipynb", [
        code("import matplotlib.pyplot as plt\n"), code("fig, ax = plt.subplots()\nax.bar([0], [1])\n"),
        code("fig = routing.plot_expert_shares(shares)  # plt. in a comment is fine\n")])  # fmt: skip
    problems = drawing_problems(drawn)
    assert [p.split(":")[1].strip() for p in problems] == ["cell 0 draws with matplotlib", "cell 1 draws with matplotlib",
                                                           "cell 1 draws with matplotlib"]  # fmt: skip
