"""Every Python block of README.md and of each page under docs/ runs.

One namespace per page, its blocks in order. A page that continues
another opens with `<!-- test: after PAGE.md -->`: PAGE's blocks run
first, in the same namespace. A block opening with `# needs: module` runs
where that optional module imports (orbax, treescope, flax, equinox); the
page's test is then reported skipped, unless REFX_DOCS_ALL=1 (make
docs-peers, in make ci), where a block that cannot run is a failure.

Blocks fenced ```py are shown, not run: each must be listed in NOT_RUN
with the reason, so a block cannot drop out of the suite unnoticed.
"""

import importlib.util
import os
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# (page, first line of the ```py block): why the suite does not run it.
NOT_RUN = {
    ("sharding.md", "mesh = jax.make_mesh((2, 4), (\"data\", \"model\"))"):
        "needs 8 devices; examples/train_sharded.py and tests/test_sharding.py run it",
}


def pages():
    if not DOCS.is_dir():  # an installed-package test run without the repo
        return []
    return [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


def page_id(path):
    return path.name if path.parent == DOCS else str(path.relative_to(ROOT))


def blocks(path, lang="python"):
    """The code of each ```lang block, dedented (a block may be indented
    under a list item or a content tab)."""
    found = re.findall(rf"^( *)```{lang}\n(.*?)^\1```", path.read_text(), re.S | re.M)
    return [textwrap.dedent(code) if indent else code for indent, code in found]


def available(need):
    """`# needs: module` or `# needs: package>=X.Y` (an API the block uses
    appeared in that release: older ones skip it, as a missing one does)."""
    module, _, minimum = need.partition(">=")
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:  # its parent package is missing
        return False
    if not minimum:
        return True
    from importlib.metadata import version

    have = tuple(int(p) for p in re.findall(r"\d+", version(module))[:2])
    return have >= tuple(int(p) for p in minimum.split("."))


def run_page(path, ns, missing, seen=()):
    if path in seen:
        raise AssertionError(f"{page_id(path)}: a cycle of '<!-- test: after -->'")
    after = re.search(r"<!-- test: after (\S+\.md) -->", path.read_text())
    if after:
        run_page(DOCS / after.group(1), ns, missing, (*seen, path))
    for block in blocks(path):
        need = re.match(r"# needs: (\S+)\n", block)
        if need and not available(need.group(1)):
            missing.append(need.group(1))
            continue
        exec(compile(block, str(path), "exec"), ns)


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_page_python_blocks_run(path):
    ns: dict = {}
    missing: list = []
    run_page(path, ns, missing)
    if missing:
        msg = f"{page_id(path)}: blocks needing {', '.join(sorted(set(missing)))} not run: not installed"
        if os.environ.get("REFX_DOCS_ALL") == "1":
            pytest.fail(msg + " (REFX_DOCS_ALL=1)")
        pytest.skip(msg)


def test_blocks_not_run_are_listed():
    shown = {(page_id(p), b.split("\n", 1)[0]) for p in pages() for b in blocks(p, "py")}
    assert shown == set(NOT_RUN), (
        "```py blocks are not run: list each in NOT_RUN with the reason, or fence it ```python")


def test_readme_links_resolve():
    """README.md links into docs/ (mkdocs --strict checks the links of the
    pages themselves): every relative link must name a file that exists."""
    readme = ROOT / "README.md"
    if not (readme.exists() and DOCS.is_dir()):
        pytest.skip("README.md or docs/ not found")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "README.md links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_docs_have_code():
    if not DOCS.is_dir():
        pytest.skip("docs/ not found")
    assert sum(len(blocks(p)) for p in pages()) >= 30
