"""refx.grad and refx.value_and_grad: gradients equal jax.grad of the same
model written functionally, tied weights summed, Partition structure for
optax/update_refs, batch statistics written back, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx

X = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.5], [2.0, -1.0, 0.0]])


def make_model():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w = refx.Ref(jax.random.normal(k1, (3, 2)), "params")  # tied: enc and dec
    return {
        "enc": {"w": w, "b": refx.Ref(jax.random.normal(k2, (2,)), "params")},
        "dec": {"w": w, "b": refx.Ref(jnp.zeros(3), "params")},
        "mean": refx.Ref(jnp.zeros(2), "batch_stats"),
        "steps": refx.Ref(jnp.array(0), "state"),
    }


def loss_fn(m, x):
    h = jnp.tanh(x @ m["enc"]["w"].value + m["enc"]["b"].value)
    m["mean"].value = 0.9 * m["mean"].value + 0.1 * jax.lax.stop_gradient(h.mean(0))
    m["steps"].value = m["steps"].value + 1
    recon = h @ m["dec"]["w"].value.T + m["dec"]["b"].value
    return jnp.mean((recon - x) ** 2)


def functional_loss(w, b_enc, b_dec, x):
    """The same model, written functionally: the tied weight used twice."""
    h = jnp.tanh(x @ w + b_enc)
    return jnp.mean((h @ w.T + b_dec - x) ** 2)


def test_gradients_equal_jax_grad_of_the_functional_model_tied_weight_summed():
    m = make_model()
    w, be, bd = m["enc"]["w"].value, m["enc"]["b"].value, m["dec"]["b"].value
    loss, grads = refx.value_and_grad(loss_fn)(m, X)
    want_loss, (gw, gbe, gbd) = jax.value_and_grad(functional_loss, argnums=(0, 1, 2))(
        w, be, bd, X)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # the tied weight is one Ref: one Value (at its first path, "dec" in
    # sorted order), an Index at the other, and the sum of both uses
    assert isinstance(grads[("dec", "w")], refx.Value) and isinstance(grads[("enc", "w")], refx.Index)
    np.testing.assert_allclose(grads[("dec", "w")].value, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[("enc", "b")].value, gbe, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[("dec", "b")].value, gbd, rtol=1e-5, atol=1e-6)
    # and it differs from one use only (the sum really happened)
    g_enc_only = jax.grad(lambda w: functional_loss(w, be, bd, X) * 0 + jnp.mean(
        (jnp.tanh(X @ w + be) @ jax.lax.stop_gradient(w).T + bd - X) ** 2))(w)
    assert not np.allclose(g_enc_only, gw)


def test_gradient_structure_is_get_partition_of_deref_so_optax_and_update_refs_take_it():
    m = make_model()
    want = refx.get_partition(refx.deref(m), "params")
    grads = refx.grad(loss_fn)(m, X)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(want)
    assert grads[("mean",)] is refx.NOTHING and grads[("steps",)] is refx.NOTHING
    tx = optax.adam(1e-2)
    opt_state = tx.init(want)
    params = refx.get_partition(refx.deref(m), "params")
    updates, opt_state = tx.update(grads, opt_state, params)
    refx.update_refs(refx.get_partition(m, "params"), optax.apply_updates(params, updates))
    assert m["enc"]["w"] is m["dec"]["w"]
    assert not np.allclose(m["enc"]["w"].value, want[("dec", "w")].value)


def test_other_written_refs_are_written_back():
    m = make_model()
    mean0 = m["mean"].value
    w0 = m["enc"]["w"].value
    refx.value_and_grad(loss_fn)(m, X)
    h = jnp.tanh(X @ w0 + m["enc"]["b"].value)
    np.testing.assert_allclose(m["mean"].value, 0.1 * h.mean(0), rtol=1e-6)
    assert int(m["steps"].value) == 1
    assert m["enc"]["w"].value is w0  # differentiated, not written
    assert not isinstance(m["mean"].value, jax.core.Tracer) and mean0 is not m["mean"].value


def test_batch_stats_written_back_under_refx_jit_and_training_converges():
    m = make_model()
    tx = optax.sgd(0.1)
    opt = refx.Ref(tx.init(refx.get_partition(refx.deref(m), "params")), "opt")

    @refx.jit
    def step(m, opt, x):
        loss, grads = refx.value_and_grad(loss_fn)(m, x)
        params = refx.get_partition(refx.deref(m), "params")
        updates, opt.value = tx.update(grads, opt.value, params)
        refx.update_refs(refx.get_partition(m, "params"), optax.apply_updates(params, updates))
        return loss

    losses = [float(step(m, opt, X)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    assert int(m["steps"].value) == 30
    assert float(jnp.abs(m["mean"].value).sum()) > 0
    assert step._cache_size() == 1


def test_has_aux_and_refs_in_aux():
    m = make_model()

    def f(m, x):
        return loss_fn(m, x), {"mean": m["mean"], "h": x.sum(), "new": refx.Ref(x.sum(), "n")}

    (loss, aux), grads = refx.value_and_grad(f, has_aux=True)(m, X)
    assert aux["mean"] is m["mean"]  # the caller's Ref, written
    assert float(aux["h"]) == float(X.sum())
    assert isinstance(aux["new"], refx.Ref) and aux["new"].collection == "n"
    g, aux2 = refx.grad(f, has_aux=True)(m, X)
    assert aux2["mean"] is m["mean"] and isinstance(g, refx.Partition)


def test_argnums_and_sharing_across_arguments():
    w = refx.Ref(jnp.array([1.0, 2.0]), "params")
    other = {"w": w, "c": refx.Ref(jnp.array(3.0), "params")}

    def f(x, a, b):
        # w is used through both arguments: one Ref inside, gradients summed
        assert a["w"] is b[0]
        return jnp.sum(a["w"].value * a["c"].value * x) + jnp.sum(b[0].value ** 2)

    g = refx.grad(f, argnums=1)(jnp.array(2.0), other, [w])
    np.testing.assert_allclose(g[("w",)].value, 3.0 * 2.0 + 2 * w.value)
    np.testing.assert_allclose(g[("c",)].value, jnp.sum(w.value * 2.0))


def test_wrt_filters():
    class Param(refx.Ref):
        pass

    m = {"a": Param(jnp.array(1.0), "params"), "b": refx.Ref(jnp.array(2.0), "other"),
         "c": refx.Ref(jnp.array(3.0), "params")}

    def f(m):
        return m["a"].value * m["b"].value * m["c"].value

    def present(g):
        return {k for k, v in g.items() if v is not refx.NOTHING}

    assert present(refx.grad(f)(m)) == {("a",), ("c",)}
    assert present(refx.grad(f, wrt="other")(m)) == {("b",)}
    assert present(refx.grad(f, wrt=Param)(m)) == {("a",)}
    assert present(refx.grad(f, wrt=refx.Ref)(m)) == {("a",), ("b",), ("c",)}
    assert present(refx.grad(f, wrt=refx.Not("params"))(m)) == {("b",)}
    assert present(refx.grad(f, wrt=lambda r: r.value > 1.5)(m)) == {("b",), ("c",)}
    g = refx.grad(f, wrt=("other", Param))(m)
    assert float(g[("a",)].value) == 6.0 and float(g[("b",)].value) == 3.0
    with pytest.raises(TypeError):
        refx.grad(f, wrt=5)


def test_writing_a_differentiated_ref_is_a_value_error_naming_it():
    m = make_model()
    w0 = m["enc"]["b"].value

    def bad(m, x):
        m["enc"]["b"].value = m["enc"]["b"].value * 2
        return loss_fn(m, x)

    with pytest.raises(ValueError, match=r"refx.grad\(.*bad\): fun wrote the Ref of argument 0 at "
                       r"\('enc', 'b'\) \(collection 'params'\), which is being differentiated"):
        refx.grad(bad)(m, X)
    assert m["enc"]["b"].value is w0 and int(m["steps"].value) == 0  # nothing written


def test_write_back_is_all_or_nothing_across_traces():
    outer = refx.Ref(jnp.array(0.0), "batch_stats")

    def f(p, o, inner):
        inner.value = inner.value + 1
        o.value = o.value + 1
        return p.value ** 2

    @jax.jit
    def g(x):
        p = refx.Ref(x, "params")
        inner = refx.Ref(x, "batch_stats")
        with pytest.raises(ValueError, match=r"Cannot mutate Ref from a different trace level: "
                           r"refx.grad\(.*f\) wrote the Ref of argument 1"):
            refx.grad(f)(p, outer, inner)
        return inner.value

    assert float(g(jnp.array(2.0))) == 2.0  # the Ref of g's trace was not written either
    assert float(outer.value) == 0.0


def test_under_jax_jit_with_dag_and_nested_in_jax_grad():
    m = make_model()

    @jax.jit
    def g(dag, x):
        loss, grads = refx.value_and_grad(loss_fn)(dag.tree, x)
        return loss, grads, dag

    loss, grads, dag = g(refx.Dag(m), X)
    want = refx.value_and_grad(loss_fn)(refx.clone(m), X)
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    np.testing.assert_allclose(grads[("dec", "w")].value, want[1][("dec", "w")].value, rtol=1e-5)
    assert int(dag.tree["steps"].value) == 1 and int(m["steps"].value) == 0
    # second-order: jax.grad of a function using refx.grad
    r = refx.Ref(jnp.array(3.0), "params")

    def inner(x):
        return refx.grad(lambda rr: (rr.value * x) ** 2)(r)[()].value

    np.testing.assert_allclose(jax.grad(inner)(jnp.array(2.0)), 4 * 3.0 * 2.0)  # d/dx 2 r x^2


def test_argnums_errors():
    with pytest.raises(TypeError, match="argnums must be an int"):
        refx.grad(lambda m: 0.0, argnums=(0,))
    with pytest.raises(TypeError, match="argnums=2 but 1 positional"):
        refx.grad(lambda m: 0.0, argnums=2)(refx.Ref(1.0))
    with pytest.raises(TypeError, match=r"fun must return \(value, aux\)"):
        refx.grad(lambda r: r.value, has_aux=True)(refx.Ref(jnp.array(1.0), "params"))
