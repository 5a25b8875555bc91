"""The documentation: its code runs, its API reference is complete, and the site builds.

Every ```python block of a page under `docs/` runs, in page order, in one namespace per page,
in a temporary working directory. A block can be marked by an HTML comment on the line right
before its fence:

- `<!-- skip: why -->`: never run (it needs data, a download or a GPU); it must still compile.
- `<!-- slow: why -->`: run only by the `slow` test (it takes more than a few seconds).
- `<!-- needs: module -->`: the block needs an optional package (`onnx`); where that package
  is not installed, the page's test skips and names it, instead of failing.

A ```text block marked `<!-- output -->` right after a python block is what that block prints,
exactly (up to trailing spaces); use it only for deterministic output.

A block that raises fails the test, with the page and line in the traceback. The API
reference must name everything in `earlyexit.__all__`, every figure must come from
`scripts/make_figures.py`, and `mkdocs build --strict` must pass.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import earlyexit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>python|text)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|slow|needs)\b\s*(?::\s*(?P<why>.*?))?\s*-->\s*$")
_OUTPUT = re.compile(r"^\s*<!--\s*output\b.*-->\s*$")


@dataclass
class Block:
    """One ```python block of a page."""

    page: Path
    line: int  # 1-based line of the first line of code
    code: str
    marker: str | None  # "skip", "slow", "needs" or None
    why: str | None
    expected: str | None = None  # what it prints, from a ```text block marked <!-- output -->


def extract_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, in order, with their markers.

    A ```text block right after a ```python block, marked `<!-- output -->`, is what the
    python block prints; the test compares them.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent = match.group("indent")
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: unclosed ``` block")
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[start:end]
        ]
        text = textwrap.dedent("\n".join(body)) + "\n"
        if match.group("lang") == "text":
            if _OUTPUT.match(previous):
                if not blocks or blocks[-1].expected is not None:
                    raise AssertionError(f"{page}:{i + 1}: an output block needs a python block")
                blocks[-1].expected = text
        else:
            marker = _MARKER.match(previous)
            blocks.append(
                Block(
                    page=page,
                    line=start + 1,
                    code=text,
                    marker=marker.group("kind") if marker else None,
                    why=marker.group("why") if marker else None,
                )
            )
        i = end + 1
    return blocks


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text(encoding="utf-8"))


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


PAGES = _pages()
SLOW_PAGES = [p for p in PAGES if any(b.marker == "slow" for b in extract_blocks(p))]


def _run_page(page: Path, include_slow: bool, tmp_path: Path, monkeypatch) -> int:
    matplotlib = pytest.importorskip("matplotlib")  # the docs' plotting snippets need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = sorted(
        {
            block.why
            for block in extract_blocks(page)
            if block.marker == "needs" and importlib.util.find_spec(block.why) is None
        }
    )
    if missing:
        pytest.skip(
            f"{_page_id(page)} needs {', '.join(missing)}, which is not installed "
            "(`pip install -e .[dev]` installs it)"
        )
    monkeypatch.chdir(tmp_path)
    # A real module, as a user's script is: torch.fx looks functions up by their module.
    name = "docs_" + re.sub(r"\W", "_", _page_id(page))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    ran = 0
    try:
        for block in extract_blocks(page):
            if block.marker == "skip" or (block.marker == "slow" and not include_slow):
                continue
            code = compile(block.code, f"{page}:{block.line}", "exec")
            # Line numbers in tracebacks point into the page.
            code = code.replace(co_firstlineno=block.line)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, module.__dict__)
            sys.stdout.write(out.getvalue())
            if block.expected is not None:
                got = [line.rstrip() for line in out.getvalue().rstrip().splitlines()]
                want = [line.rstrip() for line in block.expected.rstrip().splitlines()]
                assert got == want, (
                    f"{page}:{block.line}: the output shown on the page is stale; it prints\n"
                    + "\n".join(got)
                )
            ran += 1
    finally:
        plt.close("all")
    return ran


def test_pages_have_python_blocks():
    names = {_page_id(p) for p in PAGES}
    assert {"getting-started.md", "index.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_blocks_compile_and_markers_say_why(page):
    for block in extract_blocks(page):
        ast.parse(block.code, filename=f"{page}:{block.line}")
        if block.marker is not None:
            assert block.why, f"{page}:{block.line}: say why, e.g. <!-- skip: needs ImageNet -->"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    _run_page(page, include_slow=False, tmp_path=tmp_path, monkeypatch=monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_page_id)
def test_page_snippets_run_with_slow_ones(page, tmp_path, monkeypatch):
    _run_page(page, include_slow=True, tmp_path=tmp_path, monkeypatch=monkeypatch)


def _documented_names() -> set[str]:
    """Last components of every `::: earlyexit...` object in the API reference."""
    text = REFERENCE.read_text(encoding="utf-8")
    return {m.split(".")[-1] for m in re.findall(r"^:::\s*(earlyexit[\w.]*)", text, re.M)}


def test_reference_documents_every_public_name():
    documented = _documented_names()
    text = REFERENCE.read_text(encoding="utf-8")
    missing = [
        name
        for name in earlyexit.__all__
        if name not in documented and not (name.startswith("__") and f"earlyexit.{name}" in text)
    ]
    assert not missing, f"docs/reference.md lacks `::: earlyexit.NAME` for {missing}"


def test_reference_objects_exist():
    text = REFERENCE.read_text(encoding="utf-8")
    for path in re.findall(r"^:::\s*(earlyexit[\w.]*)", text, re.M):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            break


def test_figures_are_generated_and_used():
    """Every figure in docs/assets/ is written by scripts/make_figures.py and shown on a page."""
    script = (ROOT / "scripts" / "make_figures.py").read_text(encoding="utf-8")
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))
    figures = sorted((DOCS / "assets").glob("*.png"))
    assert figures
    for figure in figures:
        assert f'"{figure.name}"' in script, f"{figure.name} is not made by make_figures.py"
        assert f"assets/{figure.name}" in pages, f"{figure.name} is on no page"


def _figure_numbers() -> dict:
    import json

    return json.loads((DOCS / "assets" / "figures.json").read_text(encoding="utf-8"))


def test_figure_numbers_match_the_library_resnet20():
    """The numbers behind the home page's picture are what `convert` gives today."""
    import timm

    numbers = _figure_numbers()["resnet20_pareto_3"]
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3, dist="pareto")
    assert net.exit_names == numbers["exit_names"]
    assert [round(c, 4) for c in net.exit_costs.tolist()] == numbers["exit_costs"]
    assert net.stage_macs == numbers["stage_macs"]


@pytest.mark.slow
def test_figure_numbers_match_the_library_resnet110():
    """The placements the docs quote (resnet110 and the paper's tables) are still the library's."""
    import timm

    from earlyexit.placement import place_exits

    numbers = _figure_numbers()
    profiles = {}
    for row in numbers["paper_placements"]:
        depth = row["model"]
        if depth not in profiles:
            profiles[depth] = earlyexit.profile(timm.create_model(depth))
        fractions = [c.fraction for c in profiles[depth].candidates]
        targets = earlyexit.distribution_targets(row["dist"], row["n_exits"])
        picks = place_exits(fractions, targets)
        assert [profiles[depth].candidates[k].name for k in picks] == row["exit_names"], row
    prof = profiles["resnet110"]
    for dist, placement in numbers["resnet110_placements_10"].items():
        picks = place_exits([c.fraction for c in prof.candidates], placement["targets"])
        assert [prof.candidates[k].name for k in picks] == placement["exit_names"], dist


def _mkdocs() -> list[str]:
    exe = shutil.which("mkdocs")
    return [exe] if exe else [sys.executable, "-m", "mkdocs"]


@pytest.mark.timeout(300)
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    proc = subprocess.run(
        [*_mkdocs(), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    missing = [
        name
        for name in earlyexit.__all__
        if not name.startswith("__") and not re.search(rf'id="earlyexit(\.\w+)*\.{name}"', html)
    ]
    assert not missing, f"the built API reference has no entry for {missing}"
