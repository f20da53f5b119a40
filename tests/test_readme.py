"""Every Python block of README.md runs, in order, in one namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def blocks():
    if not README.exists():  # an installed-package test run without the repo
        pytest.skip("README.md not found")
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_blocks_run():
    code = blocks()
    assert len(code) >= 5
    ns: dict = {}
    for block in code:
        exec(compile(block, str(README), "exec"), ns)
