"""Every Python block of README.md runs, in order, in one namespace."""

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def blocks():
    if not README.exists():  # an installed-package test run without the repo
        pytest.skip("README.md not found")
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def available(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_readme_python_blocks_run():
    code = blocks()
    assert len(code) >= 5
    ns: dict = {}
    missing = []
    for block in code:
        # a block opening with "# needs: module" runs where that optional
        # module imports (orbax, treescope); the test is then reported skipped
        need = re.match(r"# needs: (\S+)\n", block)
        if need and not available(need.group(1)):
            missing.append(need.group(1))
            continue
        exec(compile(block, str(README), "exec"), ns)
    if missing:
        pytest.skip(f"README blocks needing {', '.join(missing)} not run: not installed")
