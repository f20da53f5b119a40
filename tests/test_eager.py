"""Eager refx transforms are cached (issue 19): the second call with the
same function object, structures and avals neither traces nor compiles;
and refx.jit explains its cache misses and retraces when asked."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx
from refx import _control


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


class JaxWork(logging.Handler):
    """Counts JAX's traces and compilations (jax_log_compiles' records)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(("Finished tracing", "Compiling")):
            self.records.append(msg)

    def __enter__(self):
        self.prev = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        self.logger = logging.getLogger("jax")
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        jax.config.update("jax_log_compiles", self.prev)


def _transform_call(transform, bump, r):
    """A call of `transform` whose function (made once) runs bump(r)."""
    if transform == "scan":
        def body(ref, x):
            return bump(ref), x

        xs = jnp.arange(3.0)
        return lambda: refx.scan(body, r, xs)
    if transform == "cond":
        def keep(ref):
            return ref

        return lambda: refx.cond(True, bump, keep, r)
    if transform == "switch":
        branches = [lambda ref: ref, bump]
        return lambda: refx.switch(1, branches, r)
    if transform == "fori_loop":
        def body(i, ref):
            return bump(ref)

        return lambda: refx.fori_loop(0, 2, body, r)
    if transform == "while_loop":
        def cond(ref):
            return ref.value[0] < 0  # never true: the body is traced, not run

        return lambda: refx.while_loop(cond, bump, r)
    if transform == "vmap":
        mapped = refx.vmap(lambda x, ref: (bump(ref), x)[1], in_axes=(0, None))
        xs = jnp.ones(3)
        return lambda: mapped(xs, r)
    rem = refx.remat(bump)
    return lambda: rem(r)


TRANSFORMS = ["scan", "cond", "switch", "fori_loop", "while_loop", "vmap", "remat"]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_second_eager_call_neither_traces_nor_compiles(transform):
    traces = Counter()
    r = refx.Ref(jnp.ones(2), "s")

    def bump(ref):
        traces()
        ref.value = ref.value + 1
        return ref

    run = _transform_call(transform, bump, r)
    run()
    n = traces.n
    with JaxWork() as work:
        run()
        run()
    assert traces.n == n, f"{transform}: the body was traced again"
    assert work.records == [], f"{transform}: JAX traced or compiled: {work.records}"


def test_eager_entry_per_function_and_options():
    r = refx.Ref(jnp.ones(2), "s")

    def body(ref, x):
        ref.value = ref.value + x
        return ref, x

    before = len(_control._EAGER)
    refx.scan(body, r, jnp.ones(2))
    refx.scan(body, r, jnp.ones(2))  # a hit
    refx.scan(body, r, jnp.ones(2), unroll=2)
    refx.scan(body, r, jnp.ones(2), unroll=True)  # == 1, but unrolls fully: its own entry
    keys = [k for k in _control._EAGER if k[:2] == ("scan", body)]
    assert len(keys) == 3
    assert len(_control._EAGER) == min(before + 3, _control._EAGER_MAX)
    np.testing.assert_array_equal(r.value, [9.0, 9.0])  # 4 scans of 2 steps


def test_same_code_different_refs_do_not_share_an_entry():
    # two lambdas of one code object closing over different Refs, two
    # partials of one function, two bound methods of equal objects: each
    # writes its own Ref
    a, b = refx.Ref(jnp.zeros(2), "s"), refx.Ref(jnp.zeros(2), "s")

    def closing(ref):
        def body(i, c):
            ref.value = ref.value + 1
            return c
        return body

    fa, fb = closing(a), closing(b)
    assert fa.__code__ is fb.__code__
    dummy = refx.Ref(jnp.zeros(()), "d")
    for _ in range(2):
        refx.fori_loop(0, 3, fa, dummy)
        refx.fori_loop(0, 3, fb, dummy)
    np.testing.assert_array_equal(a.value, [6.0, 6.0])
    np.testing.assert_array_equal(b.value, [6.0, 6.0])

    def add(ref, n, i, c):
        ref.value = ref.value + n
        return c

    pa, pb = functools.partial(add, a, 1.0), functools.partial(add, b, 10.0)
    refx.fori_loop(0, 1, pa, dummy)
    refx.fori_loop(0, 1, pb, dummy)
    refx.fori_loop(0, 1, pa, dummy)
    np.testing.assert_array_equal(a.value, [8.0, 8.0])
    np.testing.assert_array_equal(b.value, [16.0, 16.0])

    class Body:
        def __init__(self, ref):
            self.ref = ref

        def __eq__(self, other):  # every Body is "equal"
            return isinstance(other, Body)

        def __hash__(self):
            return 0

        def step(self, i, c):
            self.ref.value = self.ref.value * 2
            return c

    ba, bb = Body(a), Body(b)
    assert ba == bb
    refx.fori_loop(0, 1, ba.step, dummy)
    refx.fori_loop(0, 1, bb.step, dummy)  # bound methods: equal only for one object
    refx.fori_loop(0, 1, ba.step, dummy)  # a new bound method of ba: its entry, no trace
    np.testing.assert_array_equal(a.value, [32.0, 32.0])
    np.testing.assert_array_equal(b.value, [32.0, 32.0])


def test_eager_lru_evicts_the_least_recently_run_and_stays_right(monkeypatch):
    monkeypatch.setattr(_control, "_EAGER_MAX", 3)
    monkeypatch.setattr(_control, "_EAGER", {})
    r = refx.Ref(jnp.zeros(()), "s")
    traces = {}

    def adder(k):
        def body(i, ref):
            traces[k] = traces.get(k, 0) + 1
            ref.value = ref.value + k
            return ref
        return body

    f = [adder(k) for k in range(5)]
    total = 0.0
    for k in (0, 1, 2, 0, 3):  # 0 runs again before 3 comes: 1 is the oldest
        refx.fori_loop(0, 1, f[k], r)
        total += k
    assert len(_control._EAGER) == 3
    assert [k[1] for k in _control._EAGER] == [f[0], f[2], f[3]]
    assert traces == {0: 1, 1: 1, 2: 1, 3: 1}
    refx.fori_loop(0, 1, f[1], r)  # evicted: traced again, and right
    total += 1
    assert traces[1] == 2
    assert float(r.value) == total
    refx.fori_loop(0, 1, f[1], r)
    refx.fori_loop(0, 1, f[3], r)
    total += 1 + 3
    assert traces[1] == 2 and traces[3] == 1
    assert float(r.value) == total
    assert len(_control._EAGER) == 3


def test_cached_entry_refuses_what_refx_jit_cannot_take():
    # the entry exists (made by an array call); a later call with a str leaf,
    # inside a trace, or under disable_jit runs the transform's own way
    r = refx.Ref(jnp.ones(2), "s")

    def scale(s, ref):
        ref.value = ref.value * (len(s) if isinstance(s, str) else s)

    def keep(s, ref):
        return None

    refx.cond(True, scale, keep, 2.0, r)  # cached
    refx.cond(True, scale, keep, "abc", r)  # a str: uncached, closed over
    np.testing.assert_array_equal(r.value, [6.0, 6.0])

    @jax.jit
    def inside(v):
        ref = refx.Ref(v, "s")
        refx.cond(True, scale, keep, 2.0, ref)
        return ref.value

    np.testing.assert_array_equal(inside(r.value), [12.0, 12.0])
    with jax.disable_jit():
        refx.cond(True, scale, keep, 2.0, r)
    np.testing.assert_array_equal(r.value, [12.0, 12.0])
    refx.cond(True, scale, keep, 0.5, r)
    np.testing.assert_array_equal(r.value, [6.0, 6.0])


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
