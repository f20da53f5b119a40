"""_core._WriteRefused: a write the C check refused, as data.

_write_refs (the transforms' write-back) raises it with args (message,
position), as a plain ValueError did, plus the attributes `position` (the
index of the first refused write) and `reason`: "trace" (the Ref belongs to
another JAX trace), "mutable" (refused by refx.mutable) or "value" (the
value holds a tracer the Ref may not hold).  Nothing is written."""

import jax
import jax.numpy as jnp
import pytest

import refx
from refx import _core

TRACE_MSG = "Cannot mutate Ref from a different trace level"


def test_is_a_private_value_error():
    assert issubclass(_core._WriteRefused, ValueError)
    assert _core._WriteRefused.__name__ == "_WriteRefused"
    assert _core._WriteRefused.__module__ == "refx._core"


def test_reason_trace():
    outer = refx.Ref(1.0)
    seen = {}

    @jax.jit
    def f(x):
        inner = refx.Ref(x)
        try:
            _core._write_refs([inner, outer], [x + 1, x])
        except ValueError as e:
            seen["e"] = e
        seen["inner"] = inner.value is x
        return x

    f(2.0)
    e = seen["e"]
    assert type(e) is _core._WriteRefused
    assert (e.position, e.reason) == (1, "trace")
    msg, k = e.args
    assert k == 1 and msg.startswith(TRACE_MSG + ": this Ref (collection None)")
    assert str(e) == str((msg, 1))
    assert seen["inner"]  # all or nothing: the first Ref was not written
    assert outer.value == 1.0


def test_reason_mutable():
    a, b = refx.Ref(1.0, "stats"), refx.Ref(2.0, "params")
    with refx.mutable("stats"):
        with pytest.raises(_core._WriteRefused) as info:
            _core._write_refs([a, b], [3.0, 4.0])
    e = info.value
    assert (e.position, e.reason) == (1, "mutable")
    assert e.args[1] == 1
    assert e.args[0].startswith("refx.mutable: this Ref (collection 'params') may not be written")
    assert (a.value, b.value) == (1.0, 2.0)


def test_reason_value():
    leaked = []

    @jax.jit
    def f(x):
        leaked.append(x)
        return x

    f(jnp.ones(()))
    r, s = refx.Ref([0.0]), refx.Ref(1.0)
    with pytest.raises(_core._WriteRefused) as info:
        _core._write_refs([s, r], [5.0, [leaked[0]]])
    e = info.value
    assert (e.position, e.reason) == (1, "value")
    assert e.args[1] == 1
    assert e.args[0].startswith("Cannot set a Ref to a value holding a tracer of another trace")
    assert (s.value, r.value) == (1.0, [0.0])


def test_success_and_other_errors_are_unchanged():
    a, b = refx.Ref(1.0), refx.Ref(2.0)
    assert _core._write_refs([a, b], [3.0, 4.0]) is None
    assert (a.value, b.value) == (3.0, 4.0)
    with pytest.raises(TypeError, match="_write_refs: refs must be Refs"):
        _core._write_refs([a, 1], [0.0, 0.0])

    def boom(ref):
        raise RuntimeError("filter failed")

    with refx.mutable(boom):
        with pytest.raises(RuntimeError, match="filter failed"):
            _core._write_refs([a], [5.0])
    assert a.value == 3.0
