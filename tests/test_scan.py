"""refx.scan: values and gradients equal plain jax.lax.scan, Refs in the
carry (each iteration sees the previous writes, final values written back),
Refs in xs (sliced, writes stacked), identity, all-or-nothing, closed-over
Refs, errors naming the Ref, typed Refs, nesting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx

T, D = 6, 3
XS = jnp.linspace(-1.0, 1.0, T * D).reshape(T, D)


def make_rnn():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w": refx.Ref(jax.random.normal(k1, (D, D)) * 0.5, "params"),
            "u": refx.Ref(jax.random.normal(k2, (D, D)) * 0.5, "params"),
            "h": refx.Ref(jnp.zeros(D), "state"),
            "steps": refx.Ref(jnp.array(0), "count"),
            "frozen": refx.Ref(jnp.ones(D), "const")}


def rnn_body(carry, x):
    m, acc = carry
    h = jnp.tanh(m["h"].value @ m["w"].value + x @ m["u"].value)
    m["h"].value = h  # the next iteration sees it
    m["steps"].value = m["steps"].value + 1
    return (m, acc + h.sum()), (h, m["steps"].value)


def plain_rnn(w, u, h0, xs):
    def body(carry, x):
        h, steps, acc = carry
        h = jnp.tanh(h @ w + x @ u)
        return (h, steps + 1, acc + h.sum()), (h, steps + 1)

    return jax.lax.scan(body, (h0, jnp.array(0), jnp.array(0.0)), xs)


# ------------------------------------------------------------ values, grads


def test_values_and_write_back_equal_plain_scan():
    m = make_rnn()
    w, u, frozen = m["w"].value, m["u"].value, m["frozen"].value
    (m_out, acc), (hs, steps) = refx.scan(rnn_body, (m, jnp.array(0.0)), XS)
    (h, n, want_acc), (want_hs, want_steps) = plain_rnn(w, u, jnp.zeros(D), XS)
    np.testing.assert_allclose(hs, want_hs, rtol=1e-6)
    np.testing.assert_array_equal(steps, want_steps)  # each iteration saw the previous write
    np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
    np.testing.assert_allclose(m["h"].value, h, rtol=1e-6)  # final values written back
    assert int(m["steps"].value) == T == int(n)
    assert all(m_out[k] is m[k] for k in m)  # the caller's own Refs (in a rebuilt dict)
    assert m["w"].value is w and m["frozen"].value is frozen  # not written: same objects


def test_gradients_through_scan_equal_plain_jax():
    m = make_rnn()
    w, u = m["w"].value, m["u"].value

    def loss(m, xs):
        (_, acc), (hs, _) = refx.scan(rnn_body, (m, jnp.array(0.0)), xs)
        return acc + jnp.sum(hs ** 2)

    def plain(w, u, xs):
        (_, _, acc), (hs, _) = plain_rnn(w, u, jnp.zeros(D), xs)
        return acc + jnp.sum(hs ** 2)

    value, grads = refx.value_and_grad(loss)(m, XS)
    want, (gw, gu) = jax.value_and_grad(plain, argnums=(0, 1))(w, u, XS)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grads[("w",)].value, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[("u",)].value, gu, rtol=1e-5, atol=1e-6)
    assert int(m["steps"].value) == T  # non-differentiated writes written back by refx.grad


def test_reverse_unroll_and_length():
    m = make_rnn()
    w, u = m["w"].value, m["u"].value
    (_, _), (hs, _) = refx.scan(rnn_body, (m, jnp.array(0.0)), XS, reverse=True, unroll=2)

    def plain_body(h, x):
        h = jnp.tanh(h @ w + x @ u)
        return h, h

    _, want = jax.lax.scan(plain_body, jnp.zeros(D), XS, reverse=True)
    np.testing.assert_allclose(hs, want, rtol=1e-6)
    n = refx.Ref(jnp.array(0), "count")

    def tick(c, _):
        c.value = c.value + 2
        return c, c.value

    c, ys = refx.scan(tick, n, length=4)
    assert c is n and int(n.value) == 8
    np.testing.assert_array_equal(ys, [2, 4, 6, 8])


# --------------------------------------------------------------------- xs


def test_refs_in_xs_are_sliced_and_their_writes_come_back_stacked():
    seq = refx.Ref(jnp.arange(12.0).reshape(4, 3), "data")
    untouched = refx.Ref(jnp.ones((4, 2)), "data")
    untouched0 = untouched.value
    total = refx.Ref(jnp.zeros(3), "acc")
    seen = {}

    def body(c, x):
        seen["shape"] = x["seq"].value.shape
        c.value = c.value + x["seq"].value
        x["seq"].value = x["seq"].value * 10  # one slice per iteration
        return c, x["other"].value.sum()

    c, ys = refx.scan(body, total, {"seq": seq, "other": untouched})
    assert seen["shape"] == (3,)
    np.testing.assert_allclose(total.value, np.arange(12.0).reshape(4, 3).sum(0))
    np.testing.assert_allclose(seq.value, 10 * np.arange(12.0).reshape(4, 3))  # stacked
    assert untouched.value is untouched0
    np.testing.assert_allclose(ys, [2.0] * 4)


def test_a_ref_in_both_carry_and_xs_is_an_error():
    r = refx.Ref(jnp.zeros((4, 3)), "data")
    with pytest.raises(ValueError, match=r"refx.scan\(\S*\): the Ref of init at \('a',\) \(collection "
                       r"'data'\) is also in xs, at xs at \('1',\); a Ref is either carried or scanned "
                       r"over, not both"):
        refx.scan(lambda c, x: (c, None), {"a": r}, (jnp.ones(4), r))


# ------------------------------------------------------------------ errors


def test_a_write_that_changes_shape_or_dtype_is_an_error_naming_the_ref():
    m = make_rnn()
    before = {k: r.value for k, r in m.items()}

    def grows(m, x):
        m["steps"].value = m["steps"].value + 1
        m["h"].value = jnp.concatenate([m["h"].value, x])
        return m, None

    with pytest.raises(ValueError, match=r"refx.scan\(\S*grows\): fun wrote the Ref of init at "
                       r"\('h',\) \(collection 'state'\) with float32\[6\], but it holds float32\[3\]; "
                       r"a Ref in the carry must keep its shape and dtype"):
        refx.scan(grows, m, XS)

    def casts(m, x):
        m["steps"].value = m["steps"].value + 0.5
        return m, None

    with pytest.raises(ValueError, match=r"the Ref of init at \('steps',\) \(collection 'count'\) "
                       r"with float32\[\], but it holds int32\[\]"):
        refx.scan(casts, m, XS)
    assert all(m[k].value is v for k, v in before.items())


def test_the_body_must_return_the_carry_it_was_given():
    m = make_rnn()
    other = refx.Ref(jnp.zeros(D), "state")
    with pytest.raises(ValueError, match=r"fun returned a carry holding another Ref where init at "
                       r"\('h',\) holds a Ref; return the carry with the Refs it was given"):
        refx.scan(lambda c, x: ({**c, "h": other}, None), m, XS)
    with pytest.raises(ValueError, match=r"fun returned a carry holding a ArrayImpl|fun returned a "
                       r"carry holding a \w+ where init at \('h',\) holds a Ref"):
        refx.scan(lambda c, x: ({**c, "h": x}, None), m, XS)
    with pytest.raises(ValueError, match=r"fun returned a carry holding a Ref at init at \('1',\), "
                       r"where init holds a"):
        refx.scan(lambda c, x: ((c[0], refx.Ref(x)), None), (m, jnp.zeros(D)), XS)
    with pytest.raises(ValueError, match=r"fun returned a carry of another structure than init"):
        refx.scan(lambda c, x: ((c, c), None), m, XS)
    with pytest.raises(ValueError, match=r"fun returned the carry's leaf at init at \('1',\) as "
                       r"float32\[2\], but init has float32\[3\]"):
        refx.scan(lambda c, x: ((c[0], x[:2]), None), (m, jnp.zeros(D)), XS)
    with pytest.raises(TypeError, match=r"refx.scan\(\S*\): fun must return a pair \(carry, y\)"):
        refx.scan(lambda c, x: c, m, XS)


def test_fun_raising_writes_nothing_including_on_iteration_3():
    m = make_rnn()
    before = {k: r.value for k, r in m.items()}

    def body(m, x):
        m["h"].value = m["h"].value + x
        m["steps"].value = m["steps"].value + 1
        if int(m["steps"].value) == 3:  # concrete only when JAX runs the loop eagerly
            raise RuntimeError("iteration 3")
        return m, None

    with jax.disable_jit(), pytest.raises(RuntimeError, match="iteration 3"):
        refx.scan(body, m, XS)
    assert all(m[k].value is v for k, v in before.items())
    with pytest.raises(jax.errors.ConcretizationTypeError):  # traced: raises while tracing
        refx.scan(body, m, XS)
    assert all(m[k].value is v for k, v in before.items())


def test_eager_scan_under_disable_jit_equals_traced():
    m1, m2 = make_rnn(), make_rnn()
    out1 = refx.scan(rnn_body, (m1, jnp.array(0.0)), XS)[1]
    with jax.disable_jit():
        out2 = refx.scan(rnn_body, (m2, jnp.array(0.0)), XS)[1]
    np.testing.assert_allclose(out1[0], out2[0], rtol=1e-6)
    np.testing.assert_allclose(m1["h"].value, m2["h"].value, rtol=1e-6)
    assert int(m2["steps"].value) == T


def test_closed_over_refs_are_read_and_written_live():
    scale = refx.Ref(jnp.array(2.0), "hyper")
    n = refx.Ref(jnp.array(0.0), "acc")

    def body(c, x):
        c.value = c.value + scale.value * x
        return c, None

    refx.scan(body, n, jnp.ones(3))
    assert float(n.value) == 6.0
    refx.scan(lambda c, x: (setattr(scale, "value", scale.value + x) or c, None), n,
              jnp.ones(3))
    assert float(scale.value) == 5.0 and float(n.value) == 6.0  # each step saw the last


# ----------------------------------------------------- outputs, typed Refs


class Counter(refx.Ref):
    pass


def test_new_refs_in_y_come_out_stacked_with_sharing_and_types():
    def body(c, x):
        r = Counter(x * 2, "made", unit="steps")
        return c, {"a": r, "b": r, "c": c}

    c0 = refx.Ref(jnp.array(1.0), "carry")
    c, ys = refx.scan(body, c0, jnp.arange(3.0))
    assert ys["a"] is ys["b"] and type(ys["a"]) is Counter
    assert ys["a"].metadata == {"unit": "steps"} and ys["a"].collection == "made"
    np.testing.assert_allclose(ys["a"].value, [0.0, 2.0, 4.0])
    assert ys["c"] is c0 and c is c0  # an argument Ref in y: the caller's object


def test_typed_refs_and_pytree_values_in_the_carry():
    state = Counter((jnp.zeros(2), {"m": jnp.ones(2)}), "opt", unit="x")
    seen = {}

    def body(s, x):
        seen["type"], seen["meta"] = type(s), s.metadata
        a, d = s.value
        s.value = (a + x, {"m": d["m"] * 2})
        return s, None

    refx.scan(body, state, jnp.ones((3, 2)))
    assert seen == {"type": Counter, "meta": {"unit": "x"}}
    np.testing.assert_allclose(state.value[0], [3.0, 3.0])
    np.testing.assert_allclose(state.value[1]["m"], [8.0, 8.0])


def test_shared_ref_in_the_carry_and_deref_nodes():
    r = refx.Ref(jnp.array(0.0), "acc")
    d = refx.deref({"k": refx.Ref(jnp.array(1.0), "v")})

    def body(c, x):
        assert c["a"] is c["b"]
        c["a"].value = c["a"].value + c["d"]["k"].value * x
        return c, None

    refx.scan(body, {"a": r, "b": r, "d": d}, jnp.arange(4.0))
    assert float(r.value) == 6.0


def test_scan_inside_refx_jit_traces_once():
    m = make_rnn()
    traces = []

    @refx.jit
    def run(m, xs):
        traces.append(1)
        (_, acc), _ = refx.scan(rnn_body, (m, jnp.array(0.0)), xs)
        return acc

    run(m, XS)
    run(m, XS)
    assert len(traces) == 1 and int(m["steps"].value) == 2 * T


def test_mutable_option():
    m = make_rnn()
    with pytest.raises(ValueError, match=r"refx.mutable: this Ref \(collection 'count'\) may not be "
                       r"written inside refx.mutable\('state'\)"):
        refx.scan(rnn_body, (m, jnp.array(0.0)), XS, mutable="state")
    assert int(m["steps"].value) == 0
    refx.scan(rnn_body, (m, jnp.array(0.0)), XS, mutable=("state", "count"))
    assert int(m["steps"].value) == T
