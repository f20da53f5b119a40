"""nn.Optimizer (optax state in Refs) and nn.wrap (foreign pytrees, Equinox)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx
import refx.nn as nn


class MLP(nn.Module):
    def __init__(self, *, rngs):
        self.l1 = nn.Linear(4, 8, rngs=rngs)
        self.bn = nn.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.l2 = nn.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(nn.relu(self.bn(self.l1(x))))


def data():
    x = jax.random.normal(jax.random.key(0), (16, 4))
    return x, jnp.sin(x[:, :2])


def loss_fn(m, x, y):
    return jnp.mean((m(x) - y) ** 2)


def plain_adam_reference(model, x, y, steps):
    """The same training with optax on a dict of arrays (no refx.nn)."""
    params = {"/".join(p): r.value for p, r in refx.get_partition(model, nn.Param).items()
              if r is not refx.NOTHING}
    tx = optax.adam(1e-2)
    st = tx.init(params)
    m = refx.clone(model)
    for _ in range(steps):
        for k, r in refx.get_partition(m, nn.Param).items():
            if r is not refx.NOTHING:
                r.value = params["/".join(k)]
        g = refx.grad(loss_fn, wrt=nn.Param)(m, x, y)
        g = {"/".join(k): v.value for k, v in g.items() if isinstance(v, refx.Value)}
        upd, st = tx.update(g, st, params)
        params = optax.apply_updates(params, upd)
    return params


@pytest.mark.parametrize("jitted", [False, True])
def test_optimizer_matches_plain_optax(jitted):
    model = MLP(rngs=nn.Rngs(0))
    x, y = data()
    ref = plain_adam_reference(model, x, y, 3)
    opt = nn.Optimizer(model, optax.adam(1e-2), wrt=nn.Param)

    def step(model, opt, x, y):
        loss, g = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)
        opt.update(model, g)
        return loss

    if jitted:
        step = refx.jit(step)
    losses = [float(step(model, opt, x, y)) for _ in range(3)]
    assert losses[-1] < losses[0]
    for k, r in refx.get_partition(model, nn.Param).items():
        # l1's bias is followed by BatchNorm, which removes it: its gradient is
        # rounding noise (~1e-8) that adam scales up to lr-sized steps, which
        # differ between the compiled and the eager computation
        if r is not refx.NOTHING and k != ("l1", "bias"):
            np.testing.assert_allclose(r.value, ref["/".join(k)], rtol=1e-5, atol=1e-6)
    assert int(opt.step.value) == 3


def test_optimizer_state_is_one_ref_per_array_with_param_sharding():
    class Sharded(nn.Module):
        def __init__(self, rngs):
            self.l = nn.Linear(4, 6, kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), (None, "model")), rngs=rngs)

    m = Sharded(nn.Rngs(0))
    assert m.l.kernel.metadata["sharding"] == (None, "model")
    opt = nn.Optimizer(m, optax.adam(1e-3))
    refs = [r for r in jax.tree_util.tree_leaves(opt.opt_state) if isinstance(r, refx.Ref)]
    assert all(isinstance(r, nn.OptState) for r in refs)
    # adam: count, mu and nu for kernel and bias
    assert len(refs) == 5
    sd = refx.state_dict(opt)
    assert "opt_state/0/mu/l/kernel" in sd and "step" in sd
    mu_kernel = opt.opt_state[0].mu["l/kernel"]
    assert mu_kernel.metadata["sharding"] == (None, "model")
    assert "sharding" not in opt.opt_state[0].count.metadata


def test_optimizer_wrt_is_any_filter():
    model = MLP(rngs=nn.Rngs(0))
    x, y = data()
    only_l2 = refx.All(nn.Param, refx.PathContains("l2"))
    opt = nn.Optimizer(model, optax.sgd(0.1), wrt=only_l2)
    assert opt.names == ("l2/kernel", "l2/bias")
    l1 = model.l1.kernel.value
    l2 = model.l2.kernel.value
    g = refx.grad(loss_fn, wrt=only_l2)(model, x, y)
    opt.update(model, g)
    np.testing.assert_array_equal(model.l1.kernel.value, l1)
    assert not np.allclose(model.l2.kernel.value, l2)
    assert nn.Optimizer(model, optax.sgd(0.1), wrt="params").names[0] == "l1/kernel"


def test_optimizer_wrt_matching_nothing_is_an_error():
    model = MLP(rngs=nn.Rngs(0))
    with pytest.raises(ValueError, match=r"Optimizer: wrt='param' matches no Ref of this MLP; it holds "
                       r"6 x Param\('params'\), 2 x BatchStat\('batch_stats'\)"):
        nn.Optimizer(model, optax.adam(1e-3), wrt="param")


def test_optimizer_update_with_wrong_grads_is_an_error():
    model = MLP(rngs=nn.Rngs(0))
    x, y = data()
    opt = nn.Optimizer(model, optax.adam(1e-3), wrt=nn.Param)
    g = refx.grad(loss_fn, wrt=refx.All(nn.Param, refx.PathContains("l1")))(model, x, y)
    before = model.l1.kernel.value
    with pytest.raises(ValueError, match=r"the gradients do not match the parameters .* missing "
                       r"\['bn/bias', 'bn/scale', 'l2/bias', 'l2/kernel'\]"):
        opt.update(model, g)
    np.testing.assert_array_equal(model.l1.kernel.value, before)
    assert int(opt.step.value) == 0


def test_optimizer_with_tied_weights_sums_gradients():
    class TiedAE(nn.Module):
        def __init__(self, rngs):
            self.emb = nn.Embed(10, 4, rngs=rngs)
            self.out_emb = self.emb

        def __call__(self, ids):
            return self.out_emb.attend(self.emb(ids))

    m = TiedAE(nn.Rngs(0))
    opt = nn.Optimizer(m, optax.sgd(0.1))
    assert opt.names == ("emb/embedding",)
    ids = jnp.arange(5)

    @refx.jit
    def step(m, opt):
        loss, g = refx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(ids), ids).mean())(m)
        opt.update(m, g)
        return loss

    losses = [float(step(m, opt)) for _ in range(5)]
    assert losses[-1] < losses[0] and m.emb is m.out_emb


def test_optimizer_matches_nnx_optimizer_training():
    nnx = pytest.importorskip("flax.nnx")

    class NMLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    a = NMLP(nnx.Rngs(0))
    b = MLP(rngs=nn.Rngs(1))
    from test_nn_layers import copy_params

    copy_params(a, b)
    import inspect

    try:
        oa = nnx.Optimizer(a, optax.adam(1e-2), wrt=nnx.Param)
    except TypeError:  # flax < 0.11
        oa = nnx.Optimizer(a, optax.adam(1e-2))
    new_api = "model" in inspect.signature(oa.update).parameters  # update(model, grads)
    ob = nn.Optimizer(b, optax.adam(1e-2))
    x, y = data()

    @nnx.jit
    def step_a(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
        o.update(m, g) if new_api else o.update(g)
        return loss

    @refx.jit
    def step_b(m, o):
        loss, g = refx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), wrt=nn.Param)(m)
        o.update(m, g)
        return loss

    for _ in range(4):
        np.testing.assert_allclose(step_a(a, oa), step_b(b, ob), rtol=1e-5)
    np.testing.assert_allclose(a.l1.kernel.value, b.l1.kernel.value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.bn.mean.value, b.bn.mean.value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.bn.var.value, b.bn.var.value, rtol=1e-5, atol=1e-6)


# -- nn.wrap: foreign pytrees and Equinox -------------------------------------


def test_wrap_a_pytree_and_function_keeps_ties():
    w = jnp.ones((3, 3))
    tree = {"enc": w, "dec": w, "b": jnp.zeros(3), "n": 2}
    m = nn.wrap(tree, lambda t, x: (x @ t["enc"] + t["b"]) @ t["dec"].T * t["n"])
    assert m.refs["enc"] is m.refs["dec"] and isinstance(m.refs["enc"], nn.Param)
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(m(x), (x @ w) @ w.T * 2)
    g = refx.grad(lambda m: m(x).sum(), wrt=nn.Param)(m)
    assert sum(isinstance(v, refx.Value) for v in g.values()) == 2  # the tie is one Value
    opt = nn.Optimizer(m, optax.sgd(0.01))
    refx.jit(lambda m, o: o.update(m, refx.grad(lambda m: m(x).sum())(m)))(m, opt)
    assert m.refs["enc"] is m.refs["dec"]
    assert not np.allclose(m.unwrap()["enc"], w)
    assert m.unwrap()["n"] == 2


def test_wrap_equinox_module_trains_under_refx():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(4, 2, 16, 2, key=jax.random.key(0))
    m = nn.from_equinox(mlp)
    x, y = data()
    np.testing.assert_allclose(m(x[0]), mlp(x[0]), rtol=1e-6)
    opt = nn.Optimizer(m, optax.adam(1e-2))

    @refx.jit
    def step(m, opt):
        loss, g = refx.value_and_grad(
            lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2), wrt=nn.Param)(m)
        opt.update(m, g)
        return loss

    losses = [float(step(m, opt)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    trained = m.unwrap()
    assert isinstance(trained, eqx.nn.MLP)
    np.testing.assert_allclose(jax.vmap(trained)(x), jax.vmap(m)(x), rtol=1e-6)
    assert any("layers.0.weight" == k for k in m.refs)


def test_wrap_equinox_shared_array_is_one_ref():
    eqx = pytest.importorskip("equinox")
    lin = eqx.nn.Linear(3, 3, key=jax.random.key(0))
    pair = (lin, lin)  # the same arrays twice
    m = nn.wrap(pair, lambda p, x: p[1](p[0](x)))
    refs = list(m.refs.values())
    assert len({id(r) for r in refs}) == 2 and len(refs) == 4
    np.testing.assert_allclose(m(jnp.ones(3)), lin(lin(jnp.ones(3))), rtol=1e-6)
