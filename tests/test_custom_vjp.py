"""refx.custom_vjp (issue 19): functions of Refs with a backward pass of
their own, checked against the same function written functionally with
jax.custom_vjp, through refx.grad, jax.grad, refx.jit and refx.vmap;
writes, shared Refs, nondiff_argnums, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


def close(a, b):
    return all(np.allclose(x, y, rtol=1e-6, atol=1e-6) for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


# a layer with a clipped backward pass (the cotangent of w is clipped to
# [-0.05, 0.05]): not the true gradient, so the custom rule is what is tested


def clip_fwd_values(w, b, x):
    y = jnp.tanh(x @ w + b)
    return y, (w, x, y)


def clip_bwd_values(res, g):
    w, x, y = res
    gz = g * (1 - y ** 2)
    return jnp.clip(x.T @ gz, -0.05, 0.05), gz.sum(0), gz @ w.T


@jax.custom_vjp
def functional(w, b, x):
    return jnp.tanh(x @ w + b)


functional.defvjp(clip_fwd_values, clip_bwd_values)


@refx.custom_vjp
def layer(p, x):
    return jnp.tanh(x @ p["w"].value + p["b"].value)


def layer_fwd(p, x):
    y, res = clip_fwd_values(p["w"].value, p["b"].value, x)
    return y, res


def layer_bwd(res, g):
    gw, gb, gx = clip_bwd_values(res, g)
    return {"w": gw, "b": gb}, gx


layer.defvjp(layer_fwd, layer_bwd)


def data():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (4, 3)) * 3
    b = jax.random.normal(k2, (3,))
    x = jax.random.normal(k3, (5, 4)) * 3
    return w, b, x


def params(w, b):
    return {"w": refx.Ref(w, "params"), "b": refx.Ref(b, "params")}


def test_primal_and_gradients_equal_the_functional_custom_vjp():
    w, b, x = data()
    p = params(w, b)
    assert close(layer(p, x), functional(w, b, x))
    want = jax.grad(lambda w, b, x: (functional(w, b, x) ** 2).sum(), argnums=(0, 1, 2))(w, b, x)
    true = jax.grad(lambda w: (jnp.tanh(x @ w + b) ** 2).sum())(w)
    assert not close(want[0], true)  # the custom rule is not the true gradient
    g = refx.grad(lambda p, x: (layer(p, x) ** 2).sum())(p, x)
    assert close(g[("w",)].value, want[0]) and close(g[("b",)].value, want[1])
    # jax.grad through Refs made from traced values, and the input's cotangent
    gj = jax.grad(lambda w, b, x: (layer(params(w, b), x) ** 2).sum(),
                  argnums=(0, 1, 2))(w, b, x)
    assert close(gj, want)
    # under refx.jit, and refx.value_and_grad
    step = refx.jit(refx.value_and_grad(lambda p, x: (layer(p, x) ** 2).sum()))
    loss, g2 = step(p, x)
    assert close(loss, (functional(w, b, x) ** 2).sum())
    assert close(g2[("w",)].value, want[0])
    assert p["w"].value is w  # nothing written


def test_under_vmap():
    w, b, x = data()
    xs = jnp.stack([x, 2 * x])
    p = params(w, b)
    out = refx.vmap(lambda p, x: layer(p, x), in_axes=(None, 0))(p, xs)
    assert close(out, jax.vmap(functional, in_axes=(None, None, 0))(w, b, xs))
    want = jax.grad(lambda w: (jax.vmap(functional, in_axes=(None, None, 0))(w, b, xs)).sum())(w)
    g = refx.grad(lambda p: refx.vmap(lambda p, x: layer(p, x), in_axes=(None, 0))(p, xs).sum())(p)
    assert close(g[("w",)].value, want)


def test_a_shared_ref_gets_the_sum_of_its_cotangents():
    @refx.custom_vjp
    def two(a, b):
        return a.value * b.value

    def fwd(a, b):
        return a.value * b.value, (a.value, b.value)

    def bwd(res, g):
        va, vb = res
        return 3 * g * vb, 3 * g * va  # 3x the true gradient

    two.defvjp(fwd, bwd)
    r = refx.Ref(jnp.array(2.0), "params")
    g = refx.grad(lambda t: two(t[0], t[1]))((r, r))  # one Ref at both places
    assert float(g[("0",)].value) == 12.0  # 3 * 2 + 3 * 2


def test_writes_are_written_back_without_a_gradient():
    @refx.custom_vjp
    def counted(m, x):
        m["n"].value = m["n"].value + 1
        return m["w"].value * x

    def fwd(m, x):
        m["n"].value = m["n"].value + 1
        return m["w"].value * x, (x,)

    def bwd(res, g):
        (x,) = res
        return {"w": g * x * 10, "n": None}, None

    counted.defvjp(fwd, bwd)
    m = {"w": refx.Ref(jnp.array(2.0), "params"), "n": refx.Ref(jnp.array(0), "count")}
    assert float(counted(m, 3.0)) == 6.0 and int(m["n"].value) == 1
    g = refx.grad(lambda m: counted(m, 3.0))(m)
    assert float(g[("w",)].value) == 30.0 and int(m["n"].value) == 2
    refx.jit(lambda m: counted(m, 3.0))(m)
    assert int(m["n"].value) == 3
    refx.jit(refx.grad(lambda m: counted(m, 3.0)))(m)
    assert int(m["n"].value) == 4


def test_nondiff_argnums_come_first_in_bwd():
    seen = []

    def scaled(act, cfg, x):
        return act(x) * cfg["scale"].value

    f = refx.custom_vjp(scaled, nondiff_argnums=(0, 1))

    def fwd(act, cfg, x):
        return scaled(act, cfg, x), x

    def bwd(act, cfg, x, g):
        seen.append((act, type(cfg["scale"]).__name__, cfg["scale"].collection))
        return (g * cfg["scale"].value * 100,)

    f.defvjp(fwd, bwd)
    cfg = {"scale": refx.Ref(jnp.array(2.0), "config")}
    assert float(f(jnp.sin, cfg, 0.5)) == pytest.approx(2 * np.sin(0.5))
    assert float(jax.grad(lambda x: f(jnp.sin, cfg, x))(0.5)) == pytest.approx(200.0)
    assert seen == [(jnp.sin, "Ref", "config")]
    # keyword arguments are resolved to positions
    assert float(f(jnp.sin, cfg, x=0.5)) == pytest.approx(2 * np.sin(0.5))


def test_errors():
    @refx.custom_vjp
    def f(p):
        return p["w"].value * 2

    p = {"w": refx.Ref(jnp.ones(3), "params")}
    with pytest.raises(TypeError, match=r"refx.custom_vjp\(.*f\): no VJP defined; call "
                                        r"\.defvjp\(fwd, bwd\) on it first"):
        f(p)
    with pytest.raises(TypeError, match=r"refx.custom_vjp: fun must be callable, not int"):
        refx.custom_vjp(3)
    with pytest.raises(TypeError, match=r"refx.custom_vjp: bwd must be callable"):
        f.defvjp(lambda p: None, None)

    def loss(p):
        return f(p).sum()

    f.defvjp(lambda p: p["w"].value * 2, lambda res, g: ({"w": g},))
    with pytest.raises(TypeError, match=r"fwd must return a pair \(out, residuals\), got "
                                        r"ArrayImpl|fwd must return a pair"):
        refx.grad(loss)(p)
    f.defvjp(lambda p: (p["w"].value * 2, p["w"]), lambda res, g: ({"w": g},))
    with pytest.raises(TypeError, match=r"fwd returned a Ref in its residuals at the root; "
                                        r"residuals are arrays"):
        refx.grad(loss)(p)
    f.defvjp(lambda p: (p["w"].value * 2, ()), lambda res, g: ({"w": g}, 1))
    with pytest.raises(TypeError, match=r"bwd must return a tuple with one cotangent per "
                                        r"differentiable argument \(1: arguments \[0\]\), got "
                                        r"a tuple of length 2"):
        refx.grad(loss)(p)
    f.defvjp(lambda p: (p["w"].value * 2, ()), lambda res, g: ({"w": jnp.ones(4)},))
    with pytest.raises(ValueError, match=r"bwd returned a cotangent for the Ref of argument 0 "
                                         r"at \('w',\) \(collection 'params'\) at argument 0 at "
                                         r"\('w',\) with structure .* and shapes \[\(4,\)\], "
                                         r"but its value has .* and \[\(3,\)\]"):
        refx.grad(loss)(p)
    f.defvjp(lambda p: (p["w"].value * 2, ()), lambda res, g: ([g],))
    with pytest.raises(ValueError, match=r"bwd returned a cotangent for argument 0 that does "
                                         r"not have the argument's structure"):
        refx.grad(loss)(p)

    @refx.custom_vjp
    def returns_ref(p):
        return p["w"]

    returns_ref.defvjp(lambda p: (p["w"], ()), lambda res, g: (None,))
    with pytest.raises(TypeError, match=r"fun returned a Ref at the output; a function with a "
                                        r"custom derivative returns values \(return r.value\)"):
        returns_ref(p)
    w0 = p["w"].value

    @refx.custom_vjp
    def grows(p):
        p["new"] = refx.Ref(1.0)
        return p["w"].value

    grows.defvjp(lambda p: (p["w"].value, ()), lambda res, g: (None,))
    with pytest.raises(ValueError, match=r"fun added a leaf at argument 0 at \('new',\)"):
        grows(dict(p))
    assert p["w"].value is w0


# --------------------------------------------------------------------------
# refx.custom_jvp
# --------------------------------------------------------------------------


@jax.custom_jvp
def softplus_functional(w, x):
    return jnp.logaddexp(x * w, 0.0)


@softplus_functional.defjvp
def _softplus_functional_jvp(primals, tangents):
    w, x = primals
    tw, tx = tangents
    y = softplus_functional(w, x)
    s = jax.nn.sigmoid(x * w)
    return y, 3 * s * (tw * x + w * tx)  # 3x the true derivative


def test_custom_jvp_equals_the_functional_custom_jvp():
    @refx.custom_jvp
    def softplus(m, x):
        m["n"].value = m["n"].value + 1
        return jnp.logaddexp(x * m["w"].value, 0.0)

    @softplus.defjvp
    def _jvp(primals, tangents):
        m, x = primals
        tm, tx = tangents
        m["n"].value = m["n"].value + 1
        w = m["w"].value
        assert tm["n"].dtype == jax.dtypes.float0  # an integer Ref's tangent
        s = jax.nn.sigmoid(x * w)
        return jnp.logaddexp(x * w, 0.0), 3 * s * (tm["w"] * x + w * tx)

    w, x = jnp.array([0.5, -1.0, 2.0]), jnp.array([1.0, 2.0, -3.0])
    m = {"w": refx.Ref(w, "params"), "n": refx.Ref(jnp.array(0), "count")}
    assert close(softplus(m, x), softplus_functional(w, x)) and int(m["n"].value) == 1
    g = refx.grad(lambda m: softplus(m, x).sum())(m)
    want = jax.grad(lambda w: softplus_functional(w, x).sum())(w)
    assert close(g[("w",)].value, want) and int(m["n"].value) == 2
    assert not close(want, jax.grad(lambda w: jnp.logaddexp(x * w, 0.0).sum())(w))
    # forward mode through Refs made from traced values, and x's tangent
    f = lambda w, x: softplus({"w": refx.Ref(w), "n": refx.Ref(jnp.array(0))}, x)  # noqa: E731
    out, tan = jax.jvp(f, (w, x), (jnp.ones(3), jnp.ones(3)))
    wout, wtan = jax.jvp(softplus_functional, (w, x), (jnp.ones(3), jnp.ones(3)))
    assert close(out, wout) and close(tan, wtan)
    # under refx.jit
    g2 = refx.jit(refx.grad(lambda m: softplus(m, x).sum()))(m)
    assert close(g2[("w",)].value, want) and int(m["n"].value) == 3


def test_custom_jvp_nondiff_and_errors():
    def scaled(cfg, x):
        return jnp.sin(x) * cfg["s"].value

    f = refx.custom_jvp(scaled, nondiff_argnums=(0,))

    @f.defjvp
    def _jvp(cfg, primals, tangents):
        (x,), (tx,) = primals, tangents
        return scaled(cfg, x), 10 * cfg["s"].value * tx

    cfg = {"s": refx.Ref(jnp.array(2.0), "config")}
    assert float(jax.grad(lambda x: f(cfg, x))(0.3)) == pytest.approx(20.0)
    g = refx.custom_jvp(lambda r: r.value)
    with pytest.raises(TypeError, match=r"no JVP rule defined; call \.defjvp\(jvp\) on it first"):
        g(refx.Ref(1.0))
    g.defjvp(lambda primals, tangents: primals[0].value)
    with pytest.raises(TypeError, match=r"the jvp rule must return a pair"):
        jax.grad(lambda v: g(refx.Ref(v)))(1.0)
