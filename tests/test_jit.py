"""refx.jit and refx.jit_partial: write-back, identity, sharing, caching,
all-or-nothing, closed-over Refs, donation, nesting, threads."""

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


class Counter:
    """Counts how often a function's Python body runs (traces)."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def model():
    w = refx.Ref(jnp.arange(3.0), "params")
    return {"enc": {"w": w, "b": refx.Ref(jnp.zeros(3), "params")},
            "dec": {"w": w}, "n": refx.Ref(jnp.array(0), "state"), "k": 3}


# --------------------------------------------------------------- write-back


def test_written_refs_get_values_unwritten_keep_their_object():
    m = model()
    b0, n0 = m["enc"]["b"].value, m["n"].value

    @refx.jit
    def step(m, x):
        m["enc"]["w"].value = m["enc"]["w"].value + x
        return m["enc"]["w"].value.sum()

    out = step(m, jnp.ones(3))
    assert float(out) == 6.0
    np.testing.assert_array_equal(m["enc"]["w"].value, [1.0, 2.0, 3.0])
    assert m["dec"]["w"] is m["enc"]["w"]  # the caller's tree is untouched
    assert m["enc"]["b"].value is b0 and m["n"].value is n0  # same objects
    step(m, jnp.ones(3))
    np.testing.assert_array_equal(m["enc"]["w"].value, [2.0, 3.0, 4.0])


def test_inside_fun_sees_new_refs_of_the_jit_trace_with_sharing_and_collections():
    m = model()
    seen = {}

    @refx.jit
    def f(m):
        seen["tied"] = m["enc"]["w"] is m["dec"]["w"]
        seen["new"] = m["enc"]["w"] is not outer_w
        seen["colls"] = (m["enc"]["w"].collection, m["n"].collection)
        seen["tracer"] = isinstance(m["enc"]["w"].value, jax.core.Tracer)
        seen["static_leaf"] = m["k"]
        m["dec"]["w"].value = m["dec"]["w"].value * 2  # through the other path

    outer_w = m["enc"]["w"]
    f(m)
    assert seen["tied"] and seen["new"] and seen["tracer"]
    assert seen["colls"] == ("params", "state")
    assert isinstance(seen["static_leaf"], jax.core.Tracer)  # a Python int leaf is traced
    np.testing.assert_array_equal(m["enc"]["w"].value, [0.0, 2.0, 4.0])


def test_pytree_and_scalar_values_in_refs():
    state = refx.Ref((jnp.ones(2), {"m": jnp.zeros(2)}), "opt")
    count = refx.Ref(0, "count")
    none = refx.Ref(None, "none")

    @refx.jit
    def f(s, c, z):
        a, d = s.value
        s.value = (a + 1, {"m": d["m"] - 1})
        c.value = c.value + 1
        assert z.value is None

    f(state, count, none)
    f(state, count, none)
    np.testing.assert_array_equal(state.value[0], [3.0, 3.0])
    np.testing.assert_array_equal(state.value[1]["m"], [-2.0, -2.0])
    assert int(count.value) == 2 and none.value is None


# ----------------------------------------------------------------- outputs


def test_returned_argument_refs_are_the_callers_objects():
    m = model()

    @refx.jit
    def f(m):
        m["n"].value = m["n"].value + 1
        return m["enc"]["w"], [m["n"], m["dec"]["w"]], m["k"]

    w, (n, w2), k = f(m)
    assert w is m["enc"]["w"] and w2 is w and n is m["n"]
    assert int(n.value) == 1 and k == 3


def test_refs_made_inside_come_back_new_with_sharing_kept():
    @refx.jit
    def f(x):
        r = refx.Ref(x * 2, "made")
        s = refx.Ref(x, "other")
        r.value = r.value + 1
        return {"a": r, "b": [r, s], "x": x}

    out = f(jnp.ones(2))
    assert isinstance(out["a"], refx.Ref) and out["a"] is out["b"][0]
    assert out["a"].collection == "made" and out["b"][1].collection == "other"
    np.testing.assert_array_equal(out["a"].value, [3.0, 3.0])
    out["a"].value = jnp.zeros(2)  # a Ref of the caller's trace: writable
    assert not isinstance(out["a"].value, jax.core.Tracer)


def test_derefed_nodes_pass_through_as_pytree_nodes():
    m = model()

    @refx.jit
    def f(d, m):
        # dict keys are sorted: "dec" comes first and holds the Value
        assert isinstance(d["dec"]["w"], refx.Value) and isinstance(d["enc"]["w"], refx.Index)
        m["n"].value = m["n"].value + 1
        return refx.get_partition(refx.deref(m), "params"), d

    part, d2 = f(refx.deref(m), m)
    assert isinstance(part, refx.Partition)
    assert jax.tree_util.tree_structure(part) == jax.tree_util.tree_structure(
        refx.get_partition(refx.deref(m), "params"))
    assert isinstance(d2["enc"]["w"], refx.Index) and int(m["n"].value) == 1


def test_a_closed_over_ref_returned_is_the_same_object():
    outer = refx.Ref(jnp.ones(2), "c")

    @refx.jit
    def f(x):
        return outer, x + outer.value

    r, y = f(jnp.ones(2))
    assert r is outer
    np.testing.assert_array_equal(y, [2.0, 2.0])


# ---------------------------------------------------------------- sharing


def test_sharing_across_arguments():
    r = refx.Ref(jnp.ones(2), "p")
    seen = []

    @refx.jit
    def f(a, b):
        seen.append(a["x"] is b[0])
        a["x"].value = a["x"].value + 1
        return b[0].value  # the write is seen through the other argument

    out = f({"x": r}, [r])
    assert seen == [True]
    np.testing.assert_array_equal(out, [2.0, 2.0])
    np.testing.assert_array_equal(r.value, [2.0, 2.0])


def test_a_cache_entry_is_never_used_for_another_sharing_pattern():
    count = Counter()

    @refx.jit
    def f(a, b):
        count()
        a.value = a.value + 1
        return b.value  # b is a when shared: sees the write

    r = refx.Ref(jnp.array(1.0))
    assert float(f(r, r)) == 2.0
    r1, r2 = refx.Ref(jnp.array(1.0)), refx.Ref(jnp.array(1.0))  # equal values
    assert float(f(r1, r2)) == 1.0
    assert float(r1.value) == 2.0 and float(r2.value) == 1.0
    assert float(f(r, r)) == 3.0 and float(f(r1, r2)) == 1.0
    assert count.n == 2


def test_collections_and_ref_types_are_part_of_the_key():
    class Param(refx.Ref):
        pass

    seen = []

    @refx.jit
    def f(r):
        seen.append((type(r), r.collection))
        r.value = r.value + 1

    a, b, c = refx.Ref(jnp.ones(()), "x"), refx.Ref(jnp.ones(()), "y"), Param(jnp.ones(()), "x")
    for r in (a, b, c, a, b, c):
        f(r)
    assert seen == [(refx.Ref, "x"), (refx.Ref, "y"), (Param, "x")]
    assert type(c) is Param and float(c.value) == 3.0


# ---------------------------------------------------------------- caching


def test_same_structure_does_not_retrace():
    count = Counter()

    @refx.jit
    def step(m, x):
        count()
        m["n"].value = m["n"].value + 1
        m["enc"]["w"].value = m["enc"]["w"].value * x
        return m["n"].value

    m = model()
    for _ in range(5):
        step(m, jnp.ones(3))
    assert count.n == 1 and step._cache_size() == 1 and int(m["n"].value) == 5
    other = model()  # another model of the same structure
    step(other, jnp.ones(3))
    assert count.n == 1
    step(m, jnp.ones(4)[:3] * 2)  # same shape
    assert count.n == 1
    m["enc"]["w"].value = jnp.ones(5)
    m["enc"]["b"].value = jnp.ones(5)
    step(m, jnp.ones(5))  # new shapes: jax retraces the same entry
    assert count.n == 2 and len(step._cache) == 1


def test_the_written_set_may_differ_between_traces_of_one_entry():
    @refx.jit
    def f(a, b):
        if a.value.shape[0] == 2:  # writes a for one shape, b for the other
            a.value = a.value + 1
        else:
            b.value = b.value + 1

    a, b = refx.Ref(jnp.ones(2)), refx.Ref(jnp.ones(()))
    f(a, b)
    a2, b2 = refx.Ref(jnp.ones(3)), refx.Ref(jnp.ones(()))
    f(a2, b2)
    f(a, b)
    assert len(f._cache) == 1 and f._cache_size() == 2
    np.testing.assert_array_equal(a.value, [3.0, 3.0])
    assert float(b.value) == 1.0
    np.testing.assert_array_equal(a2.value, [1.0, 1.0, 1.0])
    assert float(b2.value) == 2.0


def test_static_args_follow_jax_jits_rule():
    seen = []

    @refx.jit(static_argnums=1)
    def f(r, k):
        seen.append(type(k))
        r.value = r.value + k
        return k  # an output: traced, so an array (as with jax.jit)

    r = refx.Ref(jnp.array(0.0))
    out = [f(r, 1), f(r, 1.0), f(r, True), f(r, 1)]
    assert seen == [int, float, bool]  # 1, 1.0 and True are three keys
    assert [o.dtype.kind for o in out] == ["i", "f", "b", "i"]
    assert float(r.value) == 4.0
    assert int(f(r, k=2)) == 2 and seen[-1] is int  # by keyword: inferred name
    with pytest.raises(TypeError, match=r"refx.jit\(.*f\): static argument .* unhashable list"):
        f(r, [1])


def test_static_argnames_and_dynamic_kwargs():
    count = Counter()

    @refx.jit(static_argnames="mode")
    def f(m, *, mode, scale):
        count()
        if mode == "double":
            m.value = m.value * 2 * scale
        return len(mode)

    r = refx.Ref(jnp.ones(2))
    assert int(f(r, mode="double", scale=1.0)) == 6
    assert int(f(r, scale=2.0, mode="double")) == 6
    assert int(f(r, mode="keep", scale=1.0)) == 4
    np.testing.assert_array_equal(r.value, [8.0, 8.0])
    assert count.n == 2


# ----------------------------------------------------- all or nothing, traces


def test_nothing_is_written_when_fun_raises():
    m = model()
    before = {k: v.value for k, v in refx.get_partition(m, refx.Ref).items()
              if isinstance(v, refx.Ref)}

    @refx.jit
    def f(m, x):
        m["n"].value = m["n"].value + 1
        m["enc"]["w"].value = m["enc"]["w"].value * 0
        return m["enc"]["w"].value @ x  # fails after the writes: shapes

    with pytest.raises(TypeError, match="dot_general requires contracting dimensions"):
        f(m, jnp.ones((5, 5)))
    after = {k: v.value for k, v in refx.get_partition(m, refx.Ref).items()
             if isinstance(v, refx.Ref)}
    assert all(after[k] is before[k] for k in before)


def test_nothing_is_written_when_fun_raises_at_trace_time_with_a_static_flag():
    m = model()
    w0 = m["enc"]["w"].value

    @refx.jit(static_argnums=1)
    def f(m, fail):
        m["enc"]["w"].value = m["enc"]["w"].value + 1
        if fail:
            raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        f(m, True)
    assert m["enc"]["w"].value is w0
    f(m, False)
    np.testing.assert_array_equal(m["enc"]["w"].value, [1.0, 2.0, 3.0])


def test_closed_over_ref_is_read_live_and_written_back():
    outer = refx.Ref(jnp.array(2.0), "c")
    count = Counter()

    @refx.jit
    def read(x):
        count()
        return x * outer.value

    assert float(read(jnp.array(3.0))) == 6.0
    outer.value = jnp.array(10.0)
    assert float(read(jnp.array(3.0))) == 30.0  # read at every call, not a constant
    # traced twice on the first call: once to find the closed-over Ref, once
    # with it as a hidden input; never again for new values
    assert count.n == 2

    @refx.jit
    def write(x):
        outer.value = x

    write(jnp.array(1.0))
    assert float(outer.value) == 1.0


def test_a_ref_of_another_trace_passed_in_and_written_raises_and_writes_nothing():
    outer = refx.Ref(jnp.array(1.0), "o")

    @refx.jit
    def f(inner, o):
        inner.value = inner.value + 1
        o.value = o.value + 1

    @jax.jit
    def g(x):
        inner = refx.Ref(x, "i")  # a Ref of g's trace
        with pytest.raises(ValueError, match=r"Cannot mutate Ref from a different trace level.*"
                           r"refx.jit\(.*f\) wrote the Ref of argument 1.*nothing was written"):
            f(inner, outer)
        return inner.value  # not written either

    assert float(g(jnp.array(5.0))) == 5.0
    assert float(outer.value) == 1.0


def test_a_ref_of_another_trace_only_read_is_fine():
    outer = refx.Ref(jnp.array(3.0), "o")

    @refx.jit
    def f(inner, o):
        inner.value = inner.value * o.value

    @jax.jit
    def g(x):
        inner = refx.Ref(x)
        f(inner, outer)
        return inner.value

    assert float(g(jnp.array(2.0))) == 6.0


# ---------------------------------------------------------------- donation


def test_donation_leaves_no_ref_holding_a_deleted_array():
    w, b, c = (refx.Ref(jnp.full(4, float(i)), "p") for i in range(3))
    shared = jnp.ones(4)
    s1, s2 = refx.Ref(shared, "p"), refx.Ref(shared, "p")  # one array, two Refs
    plain = jnp.full(4, 7.0)
    in_plain = refx.Ref(plain, "p")  # same array as a plain argument

    @refx.jit(donate_argnums=0)
    def f(m, x, p):
        m["w"].value = m["w"].value + x  # written
        m["s1"].value = m["s1"].value + 1
        # m["b"] only read, m["c"] untouched
        return m["b"].value.sum() + p.sum()

    # nothing but its Ref holds w's array, so it is donated: the written
    # value reuses its buffer (a variable holding it would keep it undonated)
    w_ptr, old_b = w.value.unsafe_buffer_pointer(), b.value
    m = {"w": w, "b": b, "c": c, "s1": s1, "s2": s2, "q": in_plain}
    out = f(m, jnp.ones(4), plain)
    assert float(out) == 4.0 + 28.0
    refs = (w, b, c, s1, s2, in_plain)
    assert not any(r.value.is_deleted() for r in refs)
    # donated: an output reuses its buffer (XLA may give it to s1's output,
    # of the same shape)
    assert w_ptr in {w.value.unsafe_buffer_pointer(), s1.value.unsafe_buffer_pointer()}
    assert b.value is old_b  # read, not written: not donated, its own array
    np.testing.assert_array_equal(w.value, [1.0] * 4)
    np.testing.assert_array_equal(b.value, [1.0] * 4)
    np.testing.assert_array_equal(s1.value, [2.0] * 4)
    np.testing.assert_array_equal(s2.value, [1.0] * 4)
    assert not shared.is_deleted() and not plain.is_deleted()  # held elsewhere: kept
    for _ in range(3):  # and again: every Ref stays usable
        f(m, jnp.ones(4), plain)
        assert not any(r.value.is_deleted() for r in refs)
    np.testing.assert_array_equal(w.value, [4.0] * 4)


def test_donation_of_a_ref_of_another_trace_raises_before_anything_is_deleted():
    outer = refx.Ref(jnp.ones(3))
    v0 = outer.value

    @refx.jit(donate_argnums=0)
    def f(r):
        r.value = r.value + 1  # written, so donated: refused before the call
        return r.value.sum()

    @jax.jit
    def g(x):
        with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level"):
            f(outer)
        return x

    g(jnp.ones(()))
    assert outer.value is v0 and not v0.is_deleted()


# ----------------------------------------------------------------- nesting


def test_refx_jit_inside_refx_jit():
    inner_count = Counter()

    @refx.jit
    def inner(m, x):
        inner_count()
        m["n"].value = m["n"].value + 1
        m["enc"]["w"].value = m["enc"]["w"].value * x
        return m["enc"]["w"]

    @refx.jit
    def outer(m, x):
        w = inner(m, x)
        assert w is m["enc"]["w"]
        inner(m, x)
        return w.value.sum()

    m = model()
    assert float(outer(m, jnp.full(3, 2.0))) == 12.0
    assert int(m["n"].value) == 2
    np.testing.assert_array_equal(m["enc"]["w"].value, [0.0, 4.0, 8.0])


def test_jax_grad_and_refx_grad_inside_refx_jit():
    @refx.jit
    def step(m, x):
        def loss(w):
            return jnp.sum((w * x) ** 2)

        g1 = jax.grad(loss)(m["enc"]["w"].value)
        g2 = refx.grad(lambda mm: loss(mm["enc"]["w"].value))(m)
        m["enc"]["w"].value = m["enc"]["w"].value - 0.1 * g1
        return g1, g2

    m = model()
    w0 = m["enc"]["w"].value
    g1, g2 = step(m, jnp.ones(3))
    np.testing.assert_allclose(g1, 2 * w0)
    np.testing.assert_allclose(g2[("dec", "w")].value, 2 * w0)  # the Value (sorted keys)
    np.testing.assert_allclose(m["enc"]["w"].value, w0 - 0.2 * w0, rtol=1e-6)


def test_refx_jit_inside_jax_jit_and_under_jax_grad():
    r = refx.Ref(jnp.array(3.0))

    @refx.jit
    def f(r, x):
        return r.value * x

    @jax.jit
    def g(x):
        return f(r, x)

    assert float(g(jnp.array(2.0))) == 6.0
    assert float(jax.grad(lambda x: f(r, x))(jnp.array(2.0))) == 3.0


# ---------------------------------------------------------------- threads


def test_threads_calling_one_jit_function():
    @refx.jit
    def step(m, x):
        m["a"].value = m["a"].value + x
        m["b"].value = m["a"].value  # a and b always written together
        return m["a"].value

    models = [{"a": refx.Ref(jnp.array(float(i))), "b": refx.Ref(jnp.array(0.0))}
              for i in range(8)]
    shared = {"a": refx.Ref(jnp.array(0.0)), "b": refx.Ref(jnp.array(0.0))}
    step(shared, jnp.array(1.0))
    errors, torn = [], []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for k in range(40):
                out = step(models[i], jnp.array(1.0))
                assert float(out) == i + k + 1.0
                step(shared, jnp.array(1.0))
                a, b = shared["a"].value, shared["b"].value
                if float(a) < float(b):  # b is only ever set to a's new value
                    torn.append((a, b))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert not torn
    for i, m in enumerate(models):
        assert float(m["a"].value) == i + 40.0 == float(m["b"].value)
    assert float(shared["a"].value) == float(shared["b"].value)


# ----------------------------------------------------- wrapper and options


def test_wrapper_metadata_methods_and_lower():
    class Model:
        def __init__(self):
            self.w = refx.Ref(jnp.ones(2))

        @refx.jit
        def scale(self, s):
            """Scale the weight."""
            self.w.value = self.w.value * s
            return self.w.value

    jax.tree_util.register_pytree_node(Model, lambda m: ((m.w,), None),
                                       lambda _, c: _model_from(Model, c))
    m = Model()
    np.testing.assert_array_equal(m.scale(3.0), [3.0, 3.0])
    np.testing.assert_array_equal(m.w.value, [3.0, 3.0])
    assert Model.scale.__name__ == "scale" and Model.scale.__doc__ == "Scale the weight."
    assert Model.scale.__wrapped__.__name__ == "scale"
    text = Model.scale.lower(m, 2.0).as_text()
    assert "mul" in text


def _model_from(cls, children):
    m = object.__new__(cls)
    (m.w,) = children
    return m


def test_options_and_errors():
    with pytest.raises(TypeError, match=r"in_shardings is not supported: refx.jit keeps each Ref's value on the sharding the Ref declares"):
        refx.jit(lambda x: x, in_shardings=1)
    with pytest.raises(TypeError, match="fun must be callable"):
        refx.jit(3)
    with pytest.raises(ValueError, match="both static and donated"):
        refx.jit(lambda a: a, static_argnums=0, donate_argnums=0)
    f = refx.jit(lambda r: r.value + 1, inline=True)
    assert float(f(refx.Ref(jnp.array(1.0)))) == 2.0
    g = refx.jit(static_argnums=(0,))(lambda n, r: r.value * n)
    assert float(g(3, refx.Ref(jnp.array(2.0)))) == 6.0


# ------------------------------------------------------------- jit_partial


def test_jit_partial_reads_current_values_and_writes_back():
    m = model()
    count = Counter()

    def step(m, x):
        count()
        m["n"].value = m["n"].value + 1
        return (m["enc"]["w"].value * x).sum()

    f = refx.jit_partial(step, m)
    assert float(f(jnp.ones(3))) == 3.0
    m["enc"]["w"].value = jnp.asarray(np.full(3, 2.0, np.float32))  # changed: seen
    assert float(f(jnp.ones(3))) == 6.0
    refx.update_refs(m["enc"], {"w": jnp.ones(3), "b": jnp.ones(3)})
    assert float(f(jnp.ones(3))) == 3.0
    assert int(m["n"].value) == 3 and count.n == 1


def test_jit_partial_binds_refs_not_containers():
    m = model()
    f = refx.jit_partial(lambda m: m["enc"]["w"].value.sum(), m)
    m["enc"]["w"] = refx.Ref(jnp.full(3, 100.0))  # the container changed: not seen
    assert float(f()) == 3.0


def test_jit_partial_with_refs_in_the_remaining_arguments():
    m = model()
    extra = refx.Ref(jnp.array(1.0), "extra")
    seen = []

    @refx.jit
    def plain(m, r):
        m["n"].value = m["n"].value + 1
        r.value = r.value * 2
        seen.append(r is m["n"])

    f = refx.jit_partial(plain.__wrapped__, m)
    f(extra)
    f(m["n"])  # a bound Ref passed again: the same Ref inside
    assert seen == [False, True]
    assert float(extra.value) == 2.0
    # n: first call +1 -> 1; second call (r is n): +1 then *2 -> 4
    assert int(m["n"].value) == 4


def test_jit_partial_static_and_donation():
    m = {"w": refx.Ref(jnp.ones(2))}

    def f(m, k, x):
        m["w"].value = m["w"].value * k + x
        return k

    g = refx.jit_partial(f, m, static_argnums=1, donate_argnums=0)
    ptr = m["w"].value.unsafe_buffer_pointer()
    assert g(3, jnp.ones(2)) == 3
    assert m["w"].value.unsafe_buffer_pointer() == ptr  # donated: its buffer reused
    assert not m["w"].value.is_deleted()
    np.testing.assert_array_equal(m["w"].value, [4.0, 4.0])
    with pytest.raises(ValueError, match="bound argument"):
        refx.jit_partial(f, m, static_argnums=0)


# ------------------------------------------------------------ hostile input


def test_leaves_jax_cannot_trace_are_named():
    f = refx.jit(lambda m, x: x)
    with pytest.raises(TypeError, match=r"refx.jit\(.*lambda.*\): argument 1 at \('name',\) is a "
                       r"str, which JAX cannot trace; pass it as a static argument"):
        f({"r": refx.Ref(jnp.ones(2))}, {"name": "relu"})
    with pytest.raises(TypeError, match=r"the Ref of argument 0 at \('r',\) holds a str"):
        f({"r": refx.Ref("relu")}, 1.0)
    g = refx.jit_partial(lambda m, x: x, {"r": refx.Ref(object())})
    with pytest.raises(TypeError, match=r"refx.jit_partial\(.*\): the Ref of bound argument 0 at "
                       r"\('r',\) holds a object"):
        g(1.0)


def test_a_raising_custom_node_propagates_and_writes_nothing():
    class Boom(Exception):
        pass

    class Node:
        def __init__(self, r, fail):
            self.r, self.fail = r, fail

    def flatten(n):
        if n.fail:
            raise Boom("flatten")
        return (n.r,), None

    jax.tree_util.register_pytree_node(Node, flatten, lambda _, c: Node(c[0], False))
    r = refx.Ref(jnp.ones(()))
    v0 = r.value

    @refx.jit
    def f(n):
        n.r.value = n.r.value + 1

    with pytest.raises(Boom, match="flatten"):
        f(Node(r, True))
    assert r.value is v0
    f(Node(r, False))
    assert float(r.value) == 2.0


def test_threads_on_a_cold_cache():
    errors, results = [], [None] * 8
    barrier = threading.Barrier(8)

    @refx.jit
    def f(r, x):
        r.value = r.value + x
        return r.value * 2

    refs = [refx.Ref(jnp.array(float(i))) for i in range(8)]

    def work(i):
        try:
            barrier.wait()
            results[i] = float(f(refs[i], jnp.array(1.0)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [2.0 * (i + 1) for i in range(8)]
    assert [float(r.value) for r in refs] == [i + 1.0 for i in range(8)]


def test_cache_key_compares_collections_by_equality_and_passes_their_errors():
    class Coll:
        def __init__(self, name, boom=False):
            self.name, self.boom = name, boom

        def __hash__(self):
            return hash(self.name)

        def __eq__(self, other):
            if self.boom or getattr(other, "boom", False):
                raise ZeroDivisionError("collection __eq__")
            return isinstance(other, Coll) and other.name == self.name

    count = Counter()

    @refx.jit
    def f(r):
        count()
        r.value = r.value + 1

    a, b = refx.Ref(jnp.ones(()), Coll("p")), refx.Ref(jnp.ones(()), Coll("p"))
    f(a)
    f(b)  # an equal collection (another object): the same entry
    assert count.n == 1 and float(b.value) == 2.0
    with pytest.raises(ZeroDivisionError, match="collection __eq__"):
        f(refx.Ref(jnp.ones(()), Coll("p", boom=True)))
    f(a)
    assert count.n == 1 and float(a.value) == 3.0


def test_last_key_fast_path_tells_classes_and_metadata_apart():
    # regression: the last-key shortcut compared each Ref's type only, so a
    # call with Refs carrying metadata right after one with plain Refs (same
    # structure) reused the plain entry: fun saw plain Refs, and declared
    # shardings were ignored
    class Param(refx.Ref):
        pass

    seen = []

    @refx.jit
    def f(t):
        seen.append((type(t["a"]), dict(t["a"].metadata)))
        return t["a"].value

    calls = [refx.Ref(jnp.ones(2)), refx.Ref(jnp.ones(2), tag="x"), Param(jnp.ones(2)),
             Param(jnp.ones(2)), refx.Ref(jnp.ones(2), tag="x"), refx.Ref(jnp.ones(2), tag="y"),
             refx.Ref(jnp.ones(2))]
    for r in calls:
        f({"a": r})
    assert seen == [(refx.Ref, {}), (refx.Ref, {"tag": "x"}), (Param, {}),
                    (refx.Ref, {"tag": "y"})]
    assert f._cache_size() == 4
