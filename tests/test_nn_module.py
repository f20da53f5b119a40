"""nn.Module, nn.Rngs and the Ref types through refx's functions and transforms."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx
import refx.nn as nn


class Block(nn.Module):
    def __init__(self, d, *, rngs):
        self.linear = nn.Linear(d, d, rngs=rngs)
        self.norm = nn.BatchNorm(d, rngs=rngs)
        self.drop = nn.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(nn.relu(self.norm(self.linear(x))))


class Tied(nn.Module):
    def __init__(self, *, rngs):
        self.enc = nn.Linear(3, 4, rngs=rngs)
        self.dec = self.enc  # the same layer twice
        self.w = nn.Param(jnp.ones((4, 3)))
        self.w_again = self.w  # the same Ref twice
        self.blocks = [Block(4, rngs=rngs), Block(4, rngs=rngs)]
        self.cfg = {"act": "relu", "sizes": [3, 4]}  # static, unhashable
        self.steps = nn.BatchStat(jnp.array(0))

    def __call__(self, x):
        self.steps.value += 1
        h = self.enc(x)
        for b in self.blocks:
            h = b(h)
        return h @ self.w_again.value


def test_module_is_a_pytree_keyed_by_attribute_names():
    m = Tied(rngs=nn.Rngs(0))
    paths = [p for p, r in refx.get_partition(m, nn.Param).items() if r is not refx.NOTHING]
    assert ("enc", "kernel") in paths and ("blocks", "1", "linear", "bias") in paths
    assert list(refx.state_dict(m, nn.Param))[:2] == ["enc/kernel", "enc/bias"]
    leaves = jax.tree_util.tree_leaves(m)
    assert all(isinstance(x, refx.Ref) for x in leaves)
    # statics (sizes, flags, a dict of lists) are aux data, not leaves
    _, treedef = jax.tree_util.tree_flatten(m)
    assert "relu" in str(treedef)


def test_types_and_collections_select_the_same_refs():
    m = Tied(rngs=nn.Rngs(0))
    by_type = refx.get_partition(m, nn.Param)
    by_name = refx.get_partition(m, "params")
    assert list(by_type.items()) == list(by_name.items())
    stats = [p for p, r in refx.get_partition(m, nn.BatchStat).items() if r is not refx.NOTHING]
    assert ("blocks", "0", "norm", "mean") in stats and ("steps",) in stats
    rng = [p for p, r in refx.get_partition(m, nn.RngState).items() if r is not refx.NOTHING]
    assert rng and all(p[-1] in ("key", "count") for p in rng)
    assert nn.Param(1).collection == "params" and nn.Cache(1).collection == "cache"
    assert nn.Param(1, "other").collection == "other"
    p = nn.Param(jnp.ones(2), sharding=("model",))
    assert p.metadata["sharding"] == ("model",)


def test_ties_stay_shared_through_deref_jit_grad_checkpoint_summary():
    m = Tied(rngs=nn.Rngs(0))
    assert m.enc is m.dec and m.w is m.w_again
    d = refx.deref(m)
    back = refx.reref(d)
    assert back.enc.kernel is back.dec.kernel and back.w is back.w_again

    @refx.jit
    def f(m, x):
        assert m.enc.kernel is m.dec.kernel and m.w is m.w_again
        return m(x)

    x = jnp.ones((2, 3))
    f(m, x)
    assert int(m.steps.value) == 1
    s = refx.summary(m)
    params = [r for r in s.rows if r.collection == "params"][0]
    assert params.ties == 3  # dec.kernel, dec.bias, w_again
    sd = refx.state_dict(m)
    assert "enc/kernel" in sd and "dec/kernel" not in sd  # a tie stored once, at its first path
    m2 = Tied(rngs=nn.Rngs(5))
    refx.load_state_dict(m2, sd)
    assert m2.enc.kernel is m2.dec.kernel
    np.testing.assert_array_equal(m2.enc.kernel.value, m.enc.kernel.value)
    g = refx.grad(lambda m: jnp.sum(m(x)), wrt=nn.Param)(m)
    assert sum(isinstance(v, refx.Value) for v in g.values()) == 2 + 2 * 4 + 1


def test_ties_through_remat():
    m = Tied(rngs=nn.Rngs(0))
    m.eval()
    x = jnp.ones((2, 3))
    g1 = refx.grad(lambda m: jnp.sum(m(x)), wrt=nn.Param)(m)
    g2 = refx.grad(lambda m: jnp.sum(refx.remat(lambda m: m(x))(m)), wrt=nn.Param)(m)
    for k in g1:
        if isinstance(g1[k], refx.Value):
            np.testing.assert_allclose(g1[k].value, g2[k].value, rtol=1e-6)


def test_train_eval_set_flags_everywhere_and_retrace_once_per_mode():
    m = Tied(rngs=nn.Rngs(0))
    m.eval()
    assert all(b.drop.deterministic and b.norm.use_running_average for b in m.blocks)
    traces = []

    @refx.jit
    def f(m, x):
        traces.append(1)
        return m(x)

    x = jnp.ones((4, 3))
    a = f(m, x)
    b = f(m, x)
    np.testing.assert_array_equal(a, b)  # eval: deterministic, stats not moved
    m.train()
    assert not m.blocks[0].drop.deterministic and not m.blocks[0].norm.use_running_average
    mean0 = m.blocks[0].norm.mean.value
    f(m, x)
    f(m, x)
    assert len(traces) == 2  # one trace per mode
    assert not np.array_equal(m.blocks[0].norm.mean.value, mean0)
    # per-call override
    d = m.blocks[0].drop
    np.testing.assert_array_equal(d(jnp.ones(5), deterministic=True), jnp.ones(5))
    with pytest.raises(ValueError, match="no submodule"):
        m.set_attributes(nonexistent=1)


def test_repr_is_short_and_nested():
    m = Tied(rngs=nn.Rngs(0))
    r = repr(m)
    assert r.startswith("Tied(\n  enc=Linear(kernel=Param(float32[3,4]), bias=Param(float32[4])")
    assert "dec=Linear(<same as enc>)" in r
    assert "w_again=Param(<same as w>)" in r
    assert len(r.splitlines()) < 60


def test_treescope_renders_a_module():
    treescope = pytest.importorskip("treescope")
    m = Tied(rngs=nn.Rngs(0))
    text = treescope.render_to_text(m)
    assert "Tied" in text and "kernel" in text


def test_pickle_roundtrip_keeps_ties():
    m = Tied(rngs=nn.Rngs(0))
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.enc is m2.dec and m2.w is m2.w_again and type(m2.w) is nn.Param


def test_vmap_ensemble_of_modules_with_split_rngs():
    keys = nn.Rngs(0).split(4)
    members = refx.vmap(lambda r: nn.Linear(3, 2, rngs=r))(keys)
    assert members.kernel.value.shape == (4, 3, 2)
    k = members.kernel.value
    assert not np.allclose(k[0], k[1])  # each member its own stream
    y = refx.vmap(lambda m, x: m(x), in_axes=(0, None))(members, jnp.ones((5, 3)))
    assert y.shape == (4, 5, 2)


# -- Rngs -------------------------------------------------------------------


def test_rngs_fresh_keys_eagerly():
    r = nn.Rngs(0, dropout=1)
    a, b = r.params(), r.params()
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert int(r.default.count.value) == 2
    d = r.dropout()
    assert int(r["dropout"].count.value) == 1
    assert not np.array_equal(jax.random.key_data(d), jax.random.key_data(a))
    with pytest.raises(AttributeError, match="no stream 'other' and no 'default'"):
        nn.Rngs(params=0).other()
    # the same seed gives the same keys (reproducible)
    np.testing.assert_array_equal(jax.random.key_data(nn.Rngs(0).params()), jax.random.key_data(a))


def test_rngs_fresh_keys_under_jit_scan_vmap_cond():
    r = nn.Rngs(0)

    @refx.jit
    def draw(r):
        return jax.random.uniform(r.dropout())

    u = [float(draw(r)) for _ in range(3)]
    assert len(set(u)) == 3 and int(r.default.count.value) == 3

    def body(r, _):
        return r, jax.random.uniform(r.dropout())

    _, us = refx.scan(body, r, None, length=4)
    assert len(set(np.asarray(us).tolist())) == 4 and int(r.default.count.value) == 7

    split = r.split(3)
    vs = refx.vmap(lambda r: jax.random.uniform(r()))(split)
    assert len(set(np.asarray(vs).tolist())) == 3
    np.testing.assert_array_equal(split.default.count.value, [1, 1, 1])

    out = refx.cond(jnp.array(True), lambda r: jax.random.uniform(r()), lambda r: jnp.float32(0), r)
    assert float(out) not in u and int(r.default.count.value) == 9  # split drew once too


def test_closed_over_rngs_advance_inside_jit():
    # closed-over Refs are live in refx.jit: the counter is written back, so
    # each call draws a fresh number
    r = nn.Rngs(0)
    f = refx.jit(lambda x: x + jax.random.uniform(r()))
    a, b = float(f(1.0)), float(f(1.0))
    assert a != b
    eager = nn.Rngs(0)
    assert a == pytest.approx(1.0 + float(jax.random.uniform(eager())))


def test_dropout_draws_per_example_masks_under_vmap_with_split_rngs():
    d = nn.Dropout(0.5)
    rs = nn.Rngs(0).split(8)
    ys = refx.vmap(lambda r, x: d(x, rngs=r), in_axes=(0, None))(rs, jnp.ones(64))
    masks = np.asarray(ys) == 0
    assert len({m.tobytes() for m in masks}) == 8


# -- Refs in array code -----------------------------------------------------


def test_ref_operators_and_array_attributes():
    r = nn.Param(jnp.arange(6.0).reshape(2, 3))
    x = jnp.ones((3, 2))
    np.testing.assert_array_equal(r @ x, r.value @ x)
    np.testing.assert_array_equal(x.T + r, x.T + r.value)
    np.testing.assert_array_equal(1 - r, 1 - r.value)
    np.testing.assert_array_equal(r ** 2, r.value ** 2)
    np.testing.assert_array_equal(-r, -r.value)
    np.testing.assert_array_equal(r > 2, r.value > 2)
    np.testing.assert_array_equal(np.ones(3) * r, r.value)
    assert (r.shape, r.dtype, r.ndim, r.size) == ((2, 3), jnp.float32, 2, 6)
    np.testing.assert_array_equal(jnp.asarray(r), r.value)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(r.value))
    np.testing.assert_array_equal(r[1], r.value[1])
    np.testing.assert_array_equal(r[...], r.value)
    assert float(nn.Param(jnp.array(2.5))) == 2.5
    assert not isinstance(r + 1, refx.Ref)
    # == is identity, and Refs hash by identity
    r2 = nn.Param(r.value)
    assert (r == r) is True and (r == r2) is False and len({r, r2, r}) == 2


def test_ref_operators_inside_jit_and_grad():
    m = {"w": nn.Param(jnp.ones((3, 3)))}

    @refx.jit
    def f(m, x):
        m["w"][...] = m["w"] * 0.5
        return x @ m["w"]

    y = f(m, jnp.ones((1, 3)))
    np.testing.assert_allclose(y, [[1.5, 1.5, 1.5]])
    np.testing.assert_allclose(m["w"].value, 0.5)
    g = refx.grad(lambda m: (jnp.ones(3) @ m["w"]).sum(), wrt=nn.Param)(m)
    np.testing.assert_allclose(g[("w",)].value, jnp.ones((3, 3)))


def test_ref_setitem_checks_shape_and_dtype():
    r = nn.Param(jnp.zeros((2, 3)))
    r[0, 1] = 5.0
    r[1] = jnp.ones(3)
    np.testing.assert_array_equal(r.value, [[0, 5, 0], [1, 1, 1]])
    r[...] = 0
    np.testing.assert_array_equal(r.value, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"ref\[\.\.\.\] = x: x is float32\[3,2\] but this Param "
                       r"\(collection 'params'\) holds float32\[2,3\]; ref\[\.\.\.\] = x keeps the shape"):
        r[...] = jnp.zeros((3, 2))
    with pytest.raises(TypeError, match=r"x is int32\[2,3\] but this Param \(collection 'params'\) holds "
                       r"float32\[2,3\]; the dtype must match"):
        r[...] = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(TypeError, match=r"ref\[0\] = x: x is float16\[3\] but this Param"):
        r[0] = jnp.ones(3, jnp.float16)
    np.testing.assert_array_equal(r.value, jnp.zeros((2, 3)))  # nothing written


def test_jnp_functions_do_not_take_refs_document_it():
    r = nn.Param(jnp.ones(3))
    assert float(jnp.sum(r.value)) == 3.0 and float(jnp.sum(r[...])) == 3.0
    assert float(r.sum()) == 3.0


def test_batch_norm_axis_name_averages_statistics_across_the_mapped_axis():
    """BatchNorm(axis_name=...) under refx.vmap(axis_name=...): each member
    normalizes by the statistics of all members' examples (lax.pmean), so the
    broadcast BatchNorm's running stats are written once, equal to those of one
    BatchNorm over the whole batch."""
    bn = nn.BatchNorm(3, axis_name="b", momentum=0.5, rngs=nn.Rngs(0))
    whole = nn.BatchNorm(3, momentum=0.5, rngs=nn.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 8, 3)) * 2 + 1
    y = refx.vmap(lambda bn, x: bn(x), in_axes=(None, 0), axis_name="b")(bn, x)
    np.testing.assert_allclose(np.asarray(y).reshape(32, 3), whole(x.reshape(32, 3)), atol=1e-5)
    np.testing.assert_allclose(bn.mean.value, whole.mean.value, atol=1e-6)
    np.testing.assert_allclose(bn.var.value, whole.var.value, atol=1e-5)


# -- jit_partial and a bound model that changes ------------------------------------


class _Net(nn.Module):
    def __init__(self, rngs):
        self.l1 = nn.Linear(4, 4, rngs=rngs)
        self.bn = nn.BatchNorm(4, rngs=rngs)
        self.drop = nn.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.l1(x)))


def _state(m):
    def host(v):
        if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
            v = jax.random.key_data(v)
        return np.asarray(v)

    return [host(v) for v in jax.tree_util.tree_leaves(refx.deref(m))]


def test_jit_partial_refuses_a_bound_model_whose_mode_changed():
    """A step bound in training mode, called after model.eval(), would run
    the training trace (dropout, running statistics written): it raises,
    naming the attribute, and writes nothing; train() makes it callable
    again, and a step bound in eval mode runs the eval trace."""
    m = _Net(nn.Rngs(0, dropout=1))
    x = jnp.ones((3, 4))
    fwd = refx.jit_partial(lambda m, x: m(x), m)
    fwd(x)
    m.eval()
    before = _state(m)
    with pytest.raises(ValueError, match=r"bound argument 0 at \('bn',\), static attribute "
                                         r"'use_running_average' is True, bound as False.*bind again"):
        fwd(x)
    for a, b in zip(before, _state(m), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing written
    ev = refx.jit_partial(lambda m, x: m(x), m)  # bound in eval mode
    np.testing.assert_allclose(ev(x), m(x), rtol=1e-6)
    for a, b in zip(before, _state(m), strict=True):
        np.testing.assert_array_equal(a, b)  # eval writes no statistics
    m.set_attributes(deterministic=True)  # an equal value: still what ev bound
    ev(x)
    m.train()
    fwd(x)  # its own binding again
    with pytest.raises(ValueError, match="static attribute '(use_running_average|deterministic)' is False"):
        ev(x)


def test_jit_partial_refuses_a_bound_model_whose_layer_or_ref_was_replaced():
    m = _Net(nn.Rngs(0, dropout=1))
    x = jnp.ones((3, 4))
    fwd = refx.jit_partial(lambda m, x: m(x), m)
    fwd(x)
    m.l1.kernel = nn.Param(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"the Ref at bound argument 0 at \('l1', 'kernel'\) was replaced"):
        fwd(x)
    fwd = refx.jit_partial(lambda m, x: m.l1(x), m)  # bind again: the new Ref
    np.testing.assert_allclose(fwd(x), m.l1.bias.value + jnp.zeros((3, 4)))
    m.l1 = nn.Linear(4, 4, rngs=nn.Rngs(3))
    with pytest.raises(ValueError, match="was replaced"):
        fwd(x)
    m.extra = 3
    with pytest.raises(ValueError, match="attribute 'extra' was added"):
        fwd(x)
    del m.extra
    with pytest.raises(ValueError, match="was replaced"):  # l1 is still another layer
        fwd(x)


def test_jit_partial_sees_a_change_through_a_subclass_setattr():
    class Own(nn.Module):
        def __init__(self):
            self.w = nn.Param(jnp.ones(()))
            self.k = 1.0

        def __setattr__(self, name, value):  # writes past Module.__setattr__
            object.__setattr__(self, name, value)

    m = Own()
    f = refx.jit_partial(lambda m: m.w.value * m.k, m)
    assert float(f()) == 1.0
    m.k = 2.0
    with pytest.raises(ValueError, match="static attribute 'k' is 2.0, bound as 1.0"):
        f()
    assert float(refx.jit_partial(lambda m: m.w.value * m.k, m)()) == 2.0


def test_jit_partial_names_the_type_when_the_values_print_alike():
    class MyInt(int):
        pass

    class P(nn.Module):
        def __init__(self):
            self.w = nn.Param(jnp.ones(()))
            self.n = 2

    m = P()
    f = refx.jit_partial(lambda m: m.w.value * m.n, m)
    f()
    m.n = MyInt(2)
    with pytest.raises(ValueError, match=r"'n' is 2 \(MyInt\), bound as 2 \(int\)"):
        f()
