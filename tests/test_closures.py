"""Closed-over Refs are live in every refx transform (issue 19): a Ref that
fun reads without receiving it is read at every call, a Ref it writes is
written back like an argument's, and a Ref both passed and closed over is
one Ref.  The attacks: a cached entry reused for another model whose Ref
the closure does not hold, a Ref whose kind changes after the first trace,
a write refused after the call, threads reading Refs while another traces."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


def model():
    return {"w": refx.Ref(jnp.ones(3), "params"), "n": refx.Ref(jnp.zeros(()), "state")}


def test_jit_reads_a_closed_over_ref_at_every_call():
    m = model()
    f = refx.jit(lambda x: (m["w"].value * x).sum())
    assert float(f(1.0)) == 3.0
    m["w"].value = jnp.full(3, 2.0)
    assert float(f(1.0)) == 6.0  # not the first trace's constant
    m["w"].value = m["w"].value * 5
    assert float(f(1.0)) == 30.0
    assert len(f._cache) == 1


def test_jit_writes_a_closed_over_ref_back():
    m = model()
    count = refx.Ref(jnp.int32(0), "steps")

    @refx.jit
    def step(x):
        count.value = count.value + 1
        m["w"].value = m["w"].value + x
        return m["w"].value.sum()

    for i in range(3):
        assert float(step(1.0)) == 3.0 * (i + 2)
    assert int(count.value) == 3
    np.testing.assert_array_equal(m["w"].value, [4.0] * 3)
    assert not isinstance(count.value, jax.core.Tracer)


def test_a_ref_passed_and_closed_over_is_one_ref():
    m = model()

    @refx.jit
    def step(arg, x):
        arg["w"].value = arg["w"].value + x  # through the argument
        return m["w"].value.sum()  # read through the closure: sees the write

    assert float(step(m, 1.0)) == 6.0
    np.testing.assert_array_equal(m["w"].value, [2.0] * 3)


def test_a_cached_entry_is_not_reused_for_a_model_the_closure_does_not_hold():
    # attack: the first call's trace knows the closed-over Ref is argument 0;
    # a call with another model of the same structure must not reuse that
    a, b = model(), model()
    b["w"].value = jnp.full(3, 10.0)

    @refx.jit
    def f(arg):
        return arg["w"].value.sum() + a["w"].value.sum()

    assert float(f(a)) == 6.0
    assert float(f(b)) == 33.0  # b's 30 + a's 3, not b + b
    assert float(f(a)) == 6.0


def test_a_closed_over_ref_whose_attributes_change_retraces():
    class Scaled(refx.Ref):
        pass

    r = Scaled(jnp.ones(2), "p")
    r.scale = 2.0
    f = refx.jit(lambda x: r.value * r.scale + x)
    np.testing.assert_array_equal(f(0.0), [2.0, 2.0])
    r.scale = 10.0
    np.testing.assert_array_equal(f(0.0), [10.0, 10.0])


def test_a_write_the_caller_may_not_do_is_refused_and_nothing_written():
    m = model()
    before = m["n"].value

    @refx.jit
    def step(x):
        m["n"].value = m["n"].value + x
        return x

    with refx.mutable("params"), pytest.raises(ValueError, match="refx.mutable"):
        step(1.0)  # refused while it traces
    assert m["n"].value is before
    step(0.0)  # traced and cached outside the block
    before = m["n"].value
    with refx.mutable("params"), pytest.raises(ValueError, match="refx.mutable") as e:
        step(1.0)  # a cached call: its write-back is refused
    assert "a Ref closed over by fun" in str(e.value)
    assert m["n"].value is before

    @jax.jit
    def outer(x):  # m's Refs belong to the eval trace, not outer's
        step(x)
        return x

    with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level"):
        outer(1.0)
    assert m["n"].value is before


@pytest.mark.parametrize("transform", ["grad", "vmap", "scan", "cond", "switch", "remat",
                                       "fori_loop", "while_loop", "jit_partial"])
def test_every_transform_reads_and_writes_closed_over_refs(transform):
    m = model()
    count = refx.Ref(jnp.float32(0), "c")

    def touch():
        count.value = count.value + 1
        return m["w"].value.sum()

    if transform == "grad":
        g = refx.grad(lambda a: (a["w"].value * touch()).sum())({"w": refx.Ref(jnp.ones(3),
                                                                             "params")})
        np.testing.assert_array_equal(g[("w",)].value, [3.0] * 3)
        want = 1
    elif transform == "vmap":
        out = refx.vmap(lambda x: x * m["w"].value.sum())(jnp.arange(3.0))
        np.testing.assert_array_equal(out, [0.0, 3.0, 6.0])
        refx.vmap(lambda x: touch(), in_axes=0)(jnp.arange(3.0))
        want = 1
    elif transform == "scan":
        refx.scan(lambda c, x: (c, touch()), None, jnp.arange(4.0))
        want = 4
    elif transform == "cond":
        refx.cond(True, lambda: touch(), lambda: m["w"].value.sum())
        want = 1
    elif transform == "switch":
        refx.switch(1, [lambda: m["w"].value.sum(), lambda: touch()])
        want = 1
    elif transform == "remat":
        refx.remat(lambda x: touch() * x)(jnp.float32(2.0))
        want = 1
    elif transform == "fori_loop":
        refx.fori_loop(0, 5, lambda i, c: (touch(), c)[1], None)
        want = 5
    elif transform == "while_loop":
        refx.while_loop(lambda c: count.value < 3, lambda c: (touch(), c)[1], None)
        want = 3
    else:
        f = refx.jit_partial(lambda a, x: (touch(), a["w"].value.sum() + x)[1], m)
        f(0.0)
        f(0.0)
        want = 2
    assert float(count.value) == want


def test_nested_transforms_inside_jit_see_the_stand_ins():
    g = refx.Ref(jnp.float32(0), "g")
    m = model()

    @refx.jit
    def loop(xs):
        def body(c, x):
            g.value = g.value + x
            return c, None

        refx.scan(body, None, xs)
        grads = refx.grad(lambda mm: (mm["w"].value * g.value).sum())(m)
        return grads[("w",)].value

    np.testing.assert_array_equal(loop(jnp.arange(4.0)), [6.0] * 3)
    assert float(g.value) == 6.0
    np.testing.assert_array_equal(loop(jnp.arange(4.0)), [12.0] * 3)
    assert float(g.value) == 12.0


def test_a_thread_reading_refs_while_another_traces_gets_its_own_values():
    # attack: the capture hook is global in C; a thread that is not tracing
    # must read its Refs' values, never another thread's stand-ins
    m = model()
    other = refx.Ref(jnp.full(3, 7.0), "p")
    started, stop = threading.Event(), threading.Event()
    seen = []

    def reader():
        started.set()
        while not stop.is_set():
            seen.append(other.value)

    t = threading.Thread(target=reader)
    t.start()
    started.wait()
    try:
        for i in range(5):
            f = refx.jit(lambda x, i=i: (other.value * x).sum() + m["w"].value.sum() + i)
            assert float(f(1.0)) == 21.0 + 3.0 + i
    finally:
        stop.set()
        t.join()
    assert all(v is other.value for v in seen)


def test_a_closed_over_ref_holding_a_str_is_named():
    r = refx.Ref("hello", "p")
    with pytest.raises(TypeError, match="closed over by fun"):
        refx.jit(lambda x: (r.value, x)[1])(1.0)


@pytest.mark.parametrize("transform", ["vmap", "remat"])
def test_a_structure_change_that_adds_no_leaf_is_named(transform):
    # d["x"] = None adds a node but no leaf: the message names the arguments
    d = {"a": refx.Ref(jnp.ones(2), "s")}

    def f(t):
        t["x"] = None
        return t["a"].value

    run = refx.vmap(f, in_axes=None, axis_size=2) if transform == "vmap" else refx.remat(f)
    with pytest.raises(ValueError, match="changed the structure"):
        run(d)
    assert "x" not in d


# ---------------------------------------------------------------------------
# C functions that read or write Refs without .value (deref, clone,
# update_refs) see closed-over Refs as .value does.  Without it, deref of a
# closed-over model inside refx.jit read the first trace's values as
# constants (a silent stale read) and update_refs refused the write.

def sgd_closure_model():
    return {"w": refx.Ref(jnp.ones(3), "params"), "b": refx.Ref(jnp.zeros(3), "params"),
            "n": refx.Ref(jnp.int32(0), "count")}


def test_deref_of_a_closed_over_model_is_read_at_every_call():
    m = sgd_closure_model()
    f = refx.jit(lambda: refx.get_partition(refx.deref(m), "params")[("w",)].value.sum())
    assert float(f()) == 3.0
    m["w"].value = jnp.full(3, 4.0)
    assert float(f()) == 12.0  # not the first trace's constant


def test_deref_after_a_write_inside_the_closure_sees_the_write():
    m = sgd_closure_model()

    @refx.jit
    def f():
        m["w"].value = m["w"].value * 2
        return refx.deref(m)["w"].value.sum()

    assert float(f()) == 6.0
    assert float(f()) == 12.0
    np.testing.assert_array_equal(m["w"].value, [4.0] * 3)


def test_update_refs_writes_a_closed_over_model_back():
    m = sgd_closure_model()

    @refx.jit
    def step(x):
        params = refx.get_partition(refx.deref(m), "params")
        new = jax.tree_util.tree_map(lambda v: v + x, params)
        refx.update_refs(refx.get_partition(m, "params"), new)
        refx.update_refs([m["n"]], [m["n"].value + 1])

    for _ in range(3):
        step(1.0)
    np.testing.assert_array_equal(m["w"].value, [4.0] * 3)
    np.testing.assert_array_equal(m["b"].value, [3.0] * 3)
    assert int(m["n"].value) == 3


def test_update_refs_from_closed_over_source_refs_reads_them_live():
    src = refx.Ref(jnp.ones(3), "p")
    dst = refx.Ref(jnp.zeros(3), "p")

    @refx.jit
    def copy():
        refx.update_refs([dst], [src])  # a source Ref stands for its value

    copy()
    np.testing.assert_array_equal(dst.value, [1.0] * 3)
    src.value = jnp.full(3, 7.0)
    copy()
    np.testing.assert_array_equal(dst.value, [7.0] * 3)


def test_clone_of_a_closed_over_model_uses_its_current_values():
    m = sgd_closure_model()
    f = refx.jit(lambda: refx.clone(m)["w"].value.sum())
    assert float(f()) == 3.0
    m["w"].value = jnp.full(3, 2.0)
    assert float(f()) == 6.0


@pytest.mark.parametrize("transform", ["grad", "vmap", "scan", "cond"])
def test_deref_and_update_refs_of_closed_over_refs_in_other_transforms(transform):
    m = sgd_closure_model()

    def bump(x):
        params = refx.get_partition(refx.deref(m), "params")
        refx.update_refs(refx.get_partition(m, "params"),
                         jax.tree_util.tree_map(lambda v: v + 1, params))
        return x

    if transform == "grad":
        refx.grad(lambda a: (a["x"].value * bump(1.0)).sum(), wrt="x")({"x": refx.Ref(jnp.ones(()), "x")})
    elif transform == "vmap":
        refx.vmap(lambda x: bump(x))(jnp.arange(2.0))
    elif transform == "scan":
        refx.scan(lambda c, x: (c, bump(x)), None, jnp.arange(2.0))
    else:
        refx.cond(True, lambda: bump(0.0), lambda: 0.0)
    want = 2.0 if transform == "scan" else 1.0
    np.testing.assert_array_equal(m["w"].value, [1.0 + want] * 3)


def test_the_sgd_step_of_bench_step_as_a_closure_equals_the_argument_form():
    import optax

    def make():
        return ({"w": refx.Ref(jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "params")},
                None)

    def sgd(model, opt, x):
        def loss(m):
            return ((x @ m["w"].value) ** 2).sum()
        grads = refx.grad(loss, wrt="params")(model)
        params = refx.get_partition(refx.deref(model), "params")
        updates, state = optax.sgd(0.1, momentum=0.9).update(grads, opt.value, params)
        refx.update_refs(refx.get_partition(model, "params"), optax.apply_updates(params, updates))
        opt.value = state

    x = jnp.ones((4, 2))
    results = []
    for form in ("args", "closure"):
        m, _ = make()
        opt = refx.Ref(optax.sgd(0.1, momentum=0.9).init(refx.get_partition(refx.deref(m), "params")),
                       "opt")
        if form == "args":
            f = refx.jit(sgd)
            for _ in range(3):
                f(m, opt, x)
        else:
            f = refx.jit(lambda x, m=m, opt=opt: sgd(m, opt, x))  # closes over m, opt
            for _ in range(3):
                f(x)
        results.append(m["w"].value)
    np.testing.assert_array_equal(results[0], results[1])


def test_replace_of_a_closed_over_ref_copies_its_current_value():
    r = refx.Ref(jnp.ones(2), "p")
    f = refx.jit(lambda: r.replace(collection="q").value.sum())
    assert float(f()) == 2.0
    r.value = jnp.full(2, 5.0)
    assert float(f()) == 10.0
