"""refx.remat, refx.cond, refx.switch, refx.fori_loop, refx.while_loop:
values and gradients equal plain JAX, write-back (taken branch, last
iteration), identity, all-or-nothing, closed-over Refs, errors naming the
Ref, typed Refs; nesting of the transforms; threads."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx

X = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.5]])


def make_mlp(depth=3):
    keys = jax.random.split(jax.random.PRNGKey(0), depth)
    return {"layers": [{"w": refx.Ref(jax.random.normal(k, (3, 3)) * 0.7, "params")} for k in keys],
            "calls": refx.Ref(jnp.array(0), "count"),
            "act_mean": refx.Ref(jnp.zeros(3), "stats")}


def mlp(m, x):
    m["calls"].value = m["calls"].value + 1
    for layer in m["layers"]:
        x = jnp.tanh(x @ layer["w"].value)
    m["act_mean"].value = jax.lax.stop_gradient(x.mean(0))
    return x


def plain_mlp(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)
    return x


def weights(m):
    return [layer["w"].value for layer in m["layers"]]


# -------------------------------------------------------------------- remat


def test_remat_values_and_gradients_equal_plain_jax_and_writes_come_back():
    m = make_mlp()
    ws = weights(m)
    loss = lambda m, x: jnp.sum(refx.remat(mlp)(m, x) ** 2)
    value, grads = refx.value_and_grad(loss)(m, X)
    want, gws = jax.value_and_grad(lambda ws: jnp.sum(plain_mlp(ws, X) ** 2))(ws)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    for i, g in enumerate(gws):
        np.testing.assert_allclose(grads[("layers", str(i), "w")].value, g, rtol=1e-5, atol=1e-6)
    # and equal refx.grad without remat
    m2 = make_mlp()
    plain_grads = refx.grad(lambda m, x: jnp.sum(mlp(m, x) ** 2))(m2, X)
    for p, v in plain_grads.items():
        if v is not refx.NOTHING:
            np.testing.assert_allclose(grads[p].value, v.value, rtol=1e-5, atol=1e-6)
    assert int(m["calls"].value) == 1  # written inside remat, back through refx.grad
    np.testing.assert_allclose(m["act_mean"].value, plain_mlp(ws, X).mean(0), rtol=1e-6)


def test_remat_recomputes_and_passes_policy_prevent_cse_and_statics():
    m = make_mlp()
    def jaxpr(f):  # the model is made inside the traced function: its Refs are that trace's
        return str(jax.make_jaxpr(lambda x: refx.grad(lambda m, x: jnp.sum(f(m, x)))(make_mlp(), x))(X))

    assert "remat" in jaxpr(refx.remat(mlp)) and "remat" not in jaxpr(mlp)
    seen = []

    def policy(prim, *args, **params):
        seen.append(prim)
        return False

    refx.grad(lambda m, x: jnp.sum(refx.remat(mlp, policy=policy, prevent_cse=False)(m, x)))(m, X)
    assert seen  # JAX asked our policy what to save

    def deep(m, x, n):
        for _ in range(n):  # n must be a Python int: a static argument
            x = jnp.tanh(x @ m["layers"][0]["w"].value)
        return x

    out = refx.remat(deep, static_argnums=2)(m, X, 3)
    np.testing.assert_allclose(out, plain_mlp([weights(m)[0]] * 3, X), rtol=1e-6)
    out = refx.remat(static_argnums=(2,))(deep)(m, X, 2)  # as a decorator factory
    np.testing.assert_allclose(out, plain_mlp([weights(m)[0]] * 2, X), rtol=1e-6)
    with pytest.raises(TypeError, match=r"refx.remat\(\S*deep\): static_argnums \[5\] but 3 positional"):
        refx.remat(deep, static_argnums=5)(m, X, 3)


def test_remat_identity_new_refs_and_all_or_nothing():
    m = make_mlp()
    ws = weights(m)

    def f(m, x):
        mlp(m, x)
        return m["layers"][0]["w"], refx.Ref(x.sum(), "made")

    w, made = refx.remat(f)(m, X)
    assert w is m["layers"][0]["w"] and made.collection == "made"
    assert all(a is b for a, b in zip(weights(m), ws, strict=True))  # not written: same objects
    before = m["calls"].value

    def boom(m, x):
        mlp(m, x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        refx.remat(boom)(m, X)
    assert m["calls"].value is before


def test_remat_inside_grad_inside_jit():
    m = make_mlp()
    ws = weights(m)
    traces = []

    @refx.jit
    def step(m, x):
        traces.append(1)
        return refx.grad(lambda m, x: jnp.sum(refx.remat(mlp)(m, x) ** 2))(m, x)

    grads = step(m, X)
    step(m, X)
    gws = jax.grad(lambda ws: jnp.sum(plain_mlp(ws, X) ** 2))(ws)
    for i, g in enumerate(gws):
        np.testing.assert_allclose(grads[("layers", str(i), "w")].value, g, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1 and int(m["calls"].value) == 2


# --------------------------------------------------------------- cond/switch


def make_state():
    return {"a": refx.Ref(jnp.zeros(2), "s"), "b": refx.Ref(jnp.ones(2), "s"),
            "n": refx.Ref(jnp.array(0), "count")}


def bump_a(m, x):
    m["a"].value = m["a"].value + x
    return m["a"].value.sum()


def drop_b(m, x):
    m["b"].value = m["b"].value - x
    m["n"].value = m["n"].value + 1
    return -m["b"].value.sum()


@pytest.mark.parametrize("pred", [True, False])
def test_cond_writes_the_taken_branch_and_keeps_the_rest(pred):
    m = make_state()
    a0, b0, n0 = m["a"].value, m["b"].value, m["n"].value
    x = jnp.array([1.0, 2.0])
    out = refx.cond(pred, bump_a, drop_b, m, x)
    if pred:
        np.testing.assert_allclose(m["a"].value, [1.0, 2.0])
        np.testing.assert_allclose(m["b"].value, b0)  # written in the other branch only
        assert float(out) == 3.0 and int(m["n"].value) == 0
    else:
        np.testing.assert_allclose(m["a"].value, a0)
        np.testing.assert_allclose(m["b"].value, [0.0, -1.0])
        assert float(out) == 1.0 and int(m["n"].value) == 1
    # a Ref no branch wrote keeps its very value object
    m2 = make_state()
    m2["extra"] = refx.Ref(jnp.ones(3), "s")
    e0 = m2["extra"].value
    refx.cond(pred, bump_a, drop_b, m2, x)
    assert m2["extra"].value is e0
    del n0


def test_cond_values_and_gradients_equal_plain_jax_under_jit():
    w = refx.Ref(jnp.array([0.5, -1.0]), "params")
    n = refx.Ref(jnp.array(0), "count")

    def loss(m, x, flag):
        def yes(m, x):
            m["n"].value = m["n"].value + 1
            return jnp.sum(jnp.sin(m["w"].value * x))

        def no(m, x):
            return jnp.sum((m["w"].value * x) ** 2)

        return refx.cond(flag, yes, no, m, x)

    def plain(w, x, flag):
        return jax.lax.cond(flag, lambda w: jnp.sum(jnp.sin(w * x)), lambda w: jnp.sum((w * x) ** 2), w)

    step = refx.jit(refx.value_and_grad(loss))
    x = jnp.array([1.0, 3.0])
    for flag in (True, False, True):
        value, g = step({"w": w, "n": n}, x, jnp.asarray(flag))
        want, gw = jax.value_and_grad(plain)(w.value, x, flag)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(g[("w",)].value, gw, rtol=1e-6)
    assert int(n.value) == 2


def test_switch_three_branches_and_clamping():
    for index, want in [(0, [1.0, 1.0]), (1, [2.0, 2.0]), (2, [3.0, 3.0]), (7, [3.0, 3.0]), (-1, [1.0, 1.0])]:
        r = refx.Ref(jnp.zeros(2), "s")
        branches = [lambda r, k=k: setattr(r, "value", r.value + k) for k in (1.0, 2.0, 3.0)]
        refx.switch(index, branches, r)
        np.testing.assert_allclose(r.value, want)
    r = refx.Ref(jnp.zeros(2), "s")
    refx.jit(lambda r, i: refx.switch(i, [bump_a, drop_b, lambda m, x: 0.0], {"a": r, "b": r,
                                                                            "n": refx.Ref(0)}, 1.0))(r, 0)
    np.testing.assert_allclose(r.value, [1.0, 1.0])


def test_branches_that_create_refs():
    def make(k):
        return lambda x: refx.Ref(x * k, "made", kind="branch")

    for pred, want in ((True, 2.0), (False, 3.0)):
        r = refx.cond(pred, make(2.0), make(3.0), jnp.ones(2))
        assert type(r) is refx.Ref and r.collection == "made" and r.metadata == {"kind": "branch"}
        np.testing.assert_allclose(r.value, [want, want])
    m = make_state()
    with pytest.raises(ValueError, match=r"refx.cond\(.*\): (true|false)_fun .* returns outputs with "
                       r"leaf 0: (a new Ref \(collection 'made'\)|the Ref of operand 0 at \('a',\)).* "
                       r"every branch must return the same Refs at the same places"):
        refx.cond(True, lambda m: refx.Ref(m["a"].value, "made"), lambda m: m["a"], m)


def test_cond_errors_name_the_ref_and_write_nothing():
    m = make_state()
    before = {k: r.value for k, r in m.items()}

    def grow(m, x):
        m["n"].value = m["n"].value + 1
        m["a"].value = jnp.concatenate([m["a"].value, x])
        return 0.0

    with pytest.raises(ValueError, match=r"refx.cond\(\S* / \S*\): (true_fun|false_fun) .* leaves the "
                       r"Ref of operand 0 at \('a',\) \(collection 's'\) as float32\[(4|2)\] but "
                       r"(true_fun|false_fun) .* as float32\[(2|4)\]; a Ref must have the same shape "
                       r"and dtype after every branch"):
        refx.cond(True, grow, drop_b, m, jnp.ones(2))
    with pytest.raises(ValueError, match=r"as int32\[\] but .* as float32\[\]|as float32\[\] but .* as int32\[\]"):
        refx.cond(True, lambda m: setattr(m["n"], "value", m["n"].value * 0.5), lambda m: None, m)

    def boom(m, x):
        drop_b(m, x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        refx.cond(True, bump_a, boom, m, jnp.ones(2))
    scale = refx.Ref(jnp.array(1.0), "hyper")
    # closed over: live, and written back like an operand (issue 19)
    refx.cond(True, lambda m: setattr(scale, "value", m["a"].value.sum()), lambda m: None, m)
    assert float(scale.value) == float(m["a"].value.sum())
    assert all(m[k].value is v for k, v in before.items())
    with pytest.raises(TypeError, match="refx.cond: true_fun must be callable"):
        refx.cond(True, 1, bump_a, m)
    with pytest.raises(ValueError, match="refx.switch: branches must hold at least one function"):
        refx.switch(0, [], m)


# ------------------------------------------------------------------- loops


def test_fori_loop_values_gradients_and_last_iteration():
    w = refx.Ref(jnp.array([0.3, -0.2]), "params")
    log = refx.Ref(jnp.zeros(5), "log")
    keep = refx.Ref(jnp.ones(2), "const")
    keep0 = keep.value

    def body(i, carry):
        m, x = carry
        x = jnp.tanh(x * m["w"].value + m["keep"].value)
        m["log"].value = m["log"].value.at[i].set(x.sum())
        return m, x

    def loss(m, x0):
        _, x = refx.fori_loop(0, 5, body, (m, x0))
        return jnp.sum(x ** 2)

    def plain(w, x):
        for _ in range(5):
            x = jnp.tanh(x * w + 1.0)
        return jnp.sum(x ** 2)

    m = {"w": w, "log": log, "keep": keep}
    x0 = jnp.array([1.0, 2.0])
    value, g = refx.value_and_grad(loss)(m, x0)
    want, gw = jax.value_and_grad(plain)(w.value, x0)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(g[("w",)].value, gw, rtol=1e-5)
    assert keep.value is keep0 and np.all(log.value != 0)
    # traced bounds (a while loop inside): the last iteration's values
    n = refx.Ref(jnp.array(0.0), "acc")
    out = refx.jit(lambda n, k: refx.fori_loop(0, k, lambda i, n: (setattr(n, "value", n.value + i), n)[1],
                                               n))(n, 4)
    assert out is n and float(n.value) == 6.0
    refx.fori_loop(0, 0, lambda i, n: (setattr(n, "value", n.value + 1), n)[1], n)
    assert float(n.value) == 6.0  # zero iterations: the value it had
    refx.fori_loop(0, 3, lambda i, n: (setattr(n, "value", n.value + 1), n)[1], n, unroll=3)
    assert float(n.value) == 9.0


def test_while_loop():
    k = refx.Ref(jnp.array(0), "count")
    acc = refx.Ref(jnp.array(1.0), "acc")

    def body(m):
        m["k"].value = m["k"].value + 1
        m["acc"].value = m["acc"].value * 2
        return m

    out = refx.while_loop(lambda m: m["acc"].value < 100.0, body, {"k": k, "acc": acc})
    assert out["k"] is k and int(k.value) == 7 and float(acc.value) == 128.0
    with pytest.raises(ValueError, match=r"refx.while_loop\(\S*body\): cond_fun \(\S*\) wrote the "
                       r"Ref of init_val at \('k',\) \(collection 'count'\); cond_fun may read Refs, "
                       r"not write them"):
        refx.while_loop(lambda m: (setattr(m["k"], "value", m["k"].value + 1), False)[1], body,
                        {"k": k, "acc": acc})
    assert int(k.value) == 7


def test_loop_errors_name_the_ref():
    r = refx.Ref(jnp.zeros(2), "s")
    with pytest.raises(ValueError, match=r"refx.fori_loop\(\S*\): fun wrote the Ref of init_val "
                       r"\(collection 's'\) with float32\[3\], but it holds float32\[2\]"):
        refx.fori_loop(0, 3, lambda i, r: (setattr(r, "value", jnp.zeros(3)), r)[1], r)
    with pytest.raises(ValueError, match=r"refx.while_loop\(\S*\): fun returned a carry holding a "
                       r"\w+ where init_val holds a Ref"):
        refx.while_loop(lambda r: False, lambda r: r.value, r)
    assert r.value.shape == (2,)


# ------------------------------------------------------------------ nesting


def test_vmap_inside_scan_inside_jit():
    ens = {"w": refx.Ref(jnp.ones((4, 3)), "params"), "seen": refx.Ref(jnp.zeros(4), "stats"),
           "t": refx.Ref(jnp.array(0), "count")}
    axes = refx.StateAxes({("params", "stats"): 0, ...: None})

    def member(m, x):
        m["seen"].value = m["seen"].value + x.sum()
        return m["w"].value @ x

    def body(m, x):
        m["t"].value = m["t"].value + 1
        return m, refx.vmap(member, in_axes=(axes, None))(m, x)

    @refx.jit
    def run(m, xs):
        return refx.scan(body, m, xs)[1]

    xs = jnp.arange(6.0).reshape(2, 3)
    ys = run(ens, xs)
    np.testing.assert_allclose(ys, np.tile(xs.sum(1)[:, None], (1, 4)))
    np.testing.assert_allclose(ens["seen"].value, np.full(4, 15.0))
    assert int(ens["t"].value) == 2


def test_cond_and_loops_inside_scan_and_vmap():
    r = refx.Ref(jnp.zeros(3), "s")

    def body(r, x):
        refx.cond(x > 1.0, lambda r: setattr(r, "value", r.value + x), lambda r: None, r)
        refx.fori_loop(0, 2, lambda i, r: (setattr(r, "value", r.value * 1.0 + 0.5), r)[1], r)
        return r, r.value.sum()

    rs = refx.vmap(lambda r, xs: refx.scan(body, r, xs)[1], in_axes=(None, 0))
    with pytest.raises(ValueError, match="broadcast"):
        rs(r, jnp.arange(6.0).reshape(2, 3))  # writes per member into a broadcast Ref
    assert float(r.value.sum()) == 0.0
    big = refx.Ref(jnp.zeros((2, 3)), "s")
    out = refx.vmap(lambda r, xs: refx.scan(body, r, xs)[1])(big, jnp.arange(6.0).reshape(2, 3))
    assert out.shape == (2, 3)


# ------------------------------------------------------------------ threads


def test_threads_running_transforms_on_their_own_trees_get_the_serial_answer():
    def work(seed):
        m = {"w": refx.Ref(jnp.full((3, 3), 0.1 * seed), "params"),
             "h": refx.Ref(jnp.zeros(3), "state"), "n": refx.Ref(jnp.array(0), "count")}

        def body(m, x):
            m["h"].value = jnp.tanh(m["h"].value @ m["w"].value + x)
            m["n"].value = m["n"].value + 1
            return m, m["h"].value.sum()

        _, ys = refx.scan(body, m, jnp.ones((4, 3)) * seed)
        refx.cond(seed % 2 == 0, lambda m: setattr(m["n"], "value", m["n"].value * 10),
                  lambda m: None, m)
        g = refx.grad(lambda m: jnp.sum(refx.remat(lambda m: m["w"].value @ m["h"].value)(m)))(m)
        return np.asarray(ys), np.asarray(m["h"].value), int(m["n"].value), np.asarray(
            g[("w",)].value)

    serial = [work(s) for s in range(6)]
    results = [None] * 6
    errors = []

    def run(s):
        try:
            for _ in range(3):
                results[s] = work(s)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for want, got in zip(serial, results, strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------- every transform, the same rules


class Param(refx.Ref):
    pass


def _transforms():
    """name -> run(fun_of_a_ref, ref): each transform calling fun with the Ref
    (fun reads and may write it) and returning what fun returned."""
    return {
        "vmap": lambda f, r: refx.vmap(f, in_axes=None, axis_size=2)(r),
        "scan": lambda f, r: refx.scan(lambda c, x: (c, f(c)), r, None, length=2)[1],
        "remat": lambda f, r: refx.remat(f)(r),
        "cond": lambda f, r: refx.cond(True, f, f, r),
        "switch": lambda f, r: refx.switch(1, [f, f, f], r),
        "fori_loop": lambda f, r: (refx.fori_loop(0, 2, lambda i, r: (f(r), r)[1], r), None)[1],
        "while_loop": lambda f, r: refx.while_loop(lambda r: False, lambda r: (f(r), r)[1], r),
    }


@pytest.mark.parametrize("name", list(_transforms()))
def test_typed_refs_metadata_closed_over_and_all_or_nothing(name):
    run = _transforms()[name]
    r = Param(jnp.ones(2), "params", init="ones")
    seen = {}

    def look(p):
        seen["type"], seen["meta"], seen["coll"] = type(p), p.metadata, p.collection
        seen["inner"] = p is not r
        return p.value.sum()

    run(look, r)
    if name != "while_loop":  # its body never runs here; cond_fun did not look
        assert seen == {"type": Param, "meta": {"init": "ones"}, "coll": "params", "inner": True}
    # closed over: read live, and a write is written back (issue 19)
    other = refx.Ref(jnp.full(2, 3.0), "hyper")
    run(lambda p: p.value.sum() + other.value.sum(), r)
    if name != "while_loop":
        run(lambda p: setattr(other, "value", p.value * 5), r)
        np.testing.assert_array_equal(other.value, r.value * 5)
    # fun raising: nothing written
    r0 = r.value

    def boom(p):
        p.value = p.value + 1
        raise RuntimeError("boom")

    if name != "while_loop":
        with pytest.raises(RuntimeError, match="boom"):
            run(boom, r)
    assert r.value is r0 and float(other.value[0]) == (5.0 if name != "while_loop" else 3.0)


@pytest.mark.parametrize("name", list(_transforms()))
def test_a_write_back_refused_names_the_transform_and_writes_nothing(name):
    """The write-back's own checks (trace level, refx.mutable), with their
    messages: a Ref of another trace written, and a refx.mutable filter that
    accepts the Ref inside the transform but not the caller's."""
    if name == "while_loop":
        run = lambda f, r: refx.while_loop(lambda r: r.value[0] < 1.5, lambda r: (f(r), r)[1], r)
    else:
        run = _transforms()[name]
    bump = lambda p: setattr(p, "value", p.value + 1)
    outer = []

    @jax.jit
    def make(x):
        outer.append(refx.Ref(np.ones(2, np.float32), "s"))  # a Ref of a finished trace
        return x

    make(jnp.ones(2))
    with pytest.raises(ValueError, match=r"Cannot mutate Ref from a different trace level: "
                       rf"refx.{name}\(.*\) wrote the Ref of \w+.*, which belongs to another JAX "
                       r"trace than the call's; nothing was written"):
        run(bump, outer[0])
    r = refx.Ref(jnp.ones(2), "s")
    not_the_callers = lambda ref: ref is not r  # the Refs inside the transform are others
    with refx.mutable(not_the_callers), pytest.raises(
            ValueError, match=rf"refx.mutable: this Ref \(collection 's'\) may not be written .* "
                              rf"\(refx.{name}\(.*\) wrote the Ref of (argument|operand|init)"
                              r"[^)]*\); nothing was written"):
        run(bump, r)
    np.testing.assert_allclose(r.value, 1.0)


def test_switch_gradients_equal_plain_jax():
    w = refx.Ref(jnp.array([0.5, -1.0]), "params")
    fs = [lambda m, x: jnp.sum(m["w"].value * x), lambda m, x: jnp.sum(jnp.sin(m["w"].value * x)),
          lambda m, x: jnp.sum((m["w"].value * x) ** 3)]
    pfs = [lambda w, x: jnp.sum(w * x), lambda w, x: jnp.sum(jnp.sin(w * x)),
           lambda w, x: jnp.sum((w * x) ** 3)]
    x = jnp.array([1.0, 3.0])
    for i in range(3):
        value, g = refx.value_and_grad(lambda m, x, i=i: refx.switch(i, fs, m, x))({"w": w}, x)
        want, gw = jax.value_and_grad(lambda w, i=i: jax.lax.switch(i, pfs, w, x))(w.value)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(g[("w",)].value, gw, rtol=1e-6)


def test_while_loop_values_equal_plain_jax_and_static_leaves_ride_along():
    def plain(x):
        return jax.lax.while_loop(lambda c: c[0] < 10.0, lambda c: (c[0] * 1.5 + c[1], c[1] + 1),
                                  (x, 0.0))

    r = refx.Ref(jnp.array(1.0), "s")

    def body(c):
        c["r"].value = c["r"].value * 1.5 + c["k"]
        assert c["name"] == "counter"  # a str leaf: kept out of JAX, passed as it is
        return {**c, "k": c["k"] + 1}

    out = refx.while_loop(lambda c: c["r"].value < 10.0, body, {"r": r, "k": 0.0, "name": "counter"})
    want = plain(jnp.array(1.0))
    np.testing.assert_allclose(r.value, want[0], rtol=1e-6)
    np.testing.assert_allclose(out["k"], want[1])
    assert out["name"] == "counter" and out["r"] is r
    with pytest.raises(ValueError, match=r"the carry's str at init_val at \('name',\) changed"):
        refx.while_loop(lambda c: c["r"].value < 20.0, lambda c: {**c, "name": "x"},
                        {"r": r, "name": "counter"})
