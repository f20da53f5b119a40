"""The hand-written stubs (refx/__init__.pyi) agree with the C module.

mypy's stubtest imports the installed refx and compares every name,
signature and class of the stub with the runtime objects, so a stub that
drifts from the C code (a renamed parameter, a missing name, __init__ where
the C type has only __new__) fails here, not in a user's type checker.
"""

import subprocess
import sys

import pytest

import refx

pytest.importorskip("mypy")


def test_stubtest_finds_no_differences(tmp_path):
    # refx's private modules are plain Python without a
    # stub; they import the C module refx._core, which has no stub of its
    # own (refx/__init__.pyi describes what _core exports).  Only the public
    # stub is compared.  Under JAX 0.4.36, jax.tree_util.GetAttrKey is
    # declared as a Python class but is jaxlib's C++ class at run time, so
    # stubtest sees the private _wiring._VALUE_KEY and _wiring._DAG_TREE_KEY
    # differ from their inferred types; later JAX releases agree with
    # themselves, hence --ignore-unused-allowlist.
    cfg = tmp_path / "mypy.ini"
    cfg.write_text("[mypy]\n"
                   + "".join(f"[mypy-refx.{m}]\nignore_errors = True\n"
                             for m in ("_compat", "_wiring", "_lift", "_lifts", "_jit", "_grad",
                                       "_control", "_mutable")))
    allow = tmp_path / "allowlist.txt"
    # private modules without stubs: JAX 0.4.36 declares its key classes
    # (GetAttrKey...) as Python classes but they are jaxlib's C++ ones at run
    # time, so any module-level instance of them differs (_wiring._VALUE_KEY,
    # _wiring._DAG_TREE_KEY); the public stub is what is checked
    allow.write_text("refx\\._(compat|wiring)\\._[A-Z_]+_KEY\n")
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "refx", "--mypy-config-file", str(cfg),
         "--allowlist", str(allow), "--ignore-unused-allowlist"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


def test_filter_alias_names_every_filter_kind():
    import collections.abc
    import typing

    kinds = typing.get_args(refx.Filter)
    assert typing.get_origin(kinds[0]) is collections.abc.Callable
    runtime_kinds = (collections.abc.Callable,) + kinds[1:]
    for f in (lambda x: True, "p", refx.Ref, (refx.Ref, "p"), refx.Not("p"),
              refx.All("p"), refx.Any("p"), True, ...):
        assert isinstance(f, runtime_kinds), f
        refx.get_partition({"a": refx.Ref(1, "p")}, f)  # and refx accepts it
    assert not isinstance(3, runtime_kinds)
    with pytest.raises(TypeError):
        refx.get_partition({"a": refx.Ref(1, "p")}, 3)
