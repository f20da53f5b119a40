"""Eager refx transforms are cached (issue 19): the second call with the
same function object, structures and avals neither traces nor compiles;
and refx.jit explains its cache misses and retraces when asked."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def test_eager_scan_traces_once_and_stays_live():
    traces = Counter()
    scale = refx.Ref(jnp.float32(1.0), "hyper")  # closed over: read live
    m = {"w": refx.Ref(jnp.zeros(3), "params")}

    def body(c, x):
        traces()
        c["w"].value = c["w"].value + x * scale.value
        return c, c["w"].value.sum()

    xs = jnp.ones(4)
    refx.scan(body, m, xs)
    n = traces.n
    refx.scan(body, m, xs)
    assert traces.n == n  # cached: the body did not run again
    np.testing.assert_array_equal(m["w"].value, [8.0] * 3)
    scale.value = jnp.float32(10.0)
    _, ys = refx.scan(body, m, xs)
    assert traces.n == n
    np.testing.assert_array_equal(m["w"].value, [48.0] * 3)  # the new scale was read
    assert float(ys[-1]) == 144.0


@pytest.mark.parametrize("transform", ["cond", "switch", "fori_loop", "while_loop", "vmap",
                                       "remat"])
def test_every_eager_transform_is_cached(transform):
    traces = Counter()
    r = refx.Ref(jnp.ones(2), "s")

    def bump(ref):
        traces()
        ref.value = ref.value + 1
        return ref

    if transform == "cond":
        def keep(ref):
            return ref

        def run():
            refx.cond(True, bump, keep, r)  # the same function objects each call
    elif transform == "switch":
        branches = [lambda ref: ref, bump]

        def run():
            refx.switch(1, branches, r)
    elif transform == "fori_loop":
        def body(i, ref):
            return bump(ref)

        def run():
            refx.fori_loop(0, 1, body, r)
    elif transform == "while_loop":
        def cond(ref):
            return ref.value[0] < 0  # never true: the body is traced, not run

        def run():
            refx.while_loop(cond, bump, r)
    elif transform == "vmap":
        mapped = refx.vmap(lambda x, ref: (bump(ref), x)[1], in_axes=(0, None))

        def run():
            mapped(jnp.ones(3), r)
    else:
        rem = refx.remat(bump)

        def run():
            rem(r)
    run()
    n = traces.n
    before = r.value
    run()
    assert traces.n == n, f"{transform}: traced again"
    if transform != "while_loop":
        np.testing.assert_array_equal(r.value, before + 1)  # and still written


def test_eager_calls_that_refx_jit_cannot_take_still_work():
    # a str among the operands is closed over by the eager path
    out = refx.cond(True, lambda s, x: x * len(s), lambda s, x: x, "abc", jnp.ones(2))
    np.testing.assert_array_equal(out, [3.0, 3.0])
    # a str returned from a branch (no refx.jit output): the uncached path
    r = refx.Ref(jnp.ones(2), "s")
    ys = refx.scan(lambda c, x: (c, x), r, jnp.arange(3.0))[1]
    np.testing.assert_array_equal(ys, [0.0, 1.0, 2.0])


def test_explain_cache_misses_names_the_change(caplog):
    f = refx.jit(lambda m, x: m["w"].value * x)
    m = {"w": refx.Ref(jnp.ones(3), "p")}
    prev = jax.config.jax_explain_cache_misses
    jax.config.update("jax_explain_cache_misses", True)
    try:
        with caplog.at_level(logging.WARNING, logger="refx"):
            f(m, 1.0)
            f(m, jnp.ones(3))  # a new aval: jax retraces the entry
            f({"w": refx.Ref(jnp.ones(3), "q")}, 1.0)  # a new collection: a new entry
    finally:
        jax.config.update("jax_explain_cache_misses", prev)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "refx")
    assert "first call" in text
    assert "argument 1 changed from float32[], weak to float32[3]" in text
    assert "the collection of the Ref of argument 0 at ('w',): 'p' -> 'q'" in text


def test_no_explanations_unless_asked(caplog):
    f = refx.jit(lambda x: x + 1)
    with caplog.at_level(logging.WARNING, logger="refx"):
        f(1.0)
        f(jnp.ones(2))
    assert not [r for r in caplog.records if r.name == "refx"]
