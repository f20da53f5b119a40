"""refx.vmap and refx.StateAxes: values and gradients equal plain jax.vmap,
ensembles made inside, write-back (stacked and broadcast), identity,
sharing, all-or-nothing, closed-over Refs, errors, typed Refs, nesting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx

E = 4  # ensemble members
X = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (2, 3), shared by members


def init_member(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (2,))}


def stacked():
    return jax.vmap(init_member)(jax.random.split(jax.random.PRNGKey(0), E))


def make_ensemble():
    p = stacked()
    return {"w": refx.Ref(p["w"], "params"), "b": refx.Ref(p["b"], "params"),
            "calls": refx.Ref(jnp.array(0), "count"),  # broadcast: one for all
            "last": refx.Ref(jnp.zeros((E, 2)), "stats")}  # mapped with the params


AXES = refx.StateAxes({("params", "stats"): 0, ...: None})


def forward(m, x):
    m["calls"].value = m["calls"].value + 1  # unmapped value: fine for a broadcast Ref
    y = jnp.tanh(x @ m["w"].value + m["b"].value)
    m["last"].value = y.mean(0)
    return y


def plain_forward(w, b, x):
    return jnp.tanh(x @ w + b)


# ------------------------------------------------------------ values, grads


def test_values_and_write_back_equal_plain_jax_vmap():
    m = make_ensemble()
    w0, b0 = m["w"].value, m["b"].value
    out = refx.vmap(forward, in_axes=(AXES, None))(m, X)
    want = jax.vmap(plain_forward, in_axes=(0, 0, None))(w0, b0, X)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out.shape == (E, 2, 2)
    np.testing.assert_allclose(m["last"].value, want.mean(1), rtol=1e-6)  # stacked write
    assert int(m["calls"].value) == 1  # broadcast write
    assert m["w"].value is w0 and m["b"].value is b0  # not written: the same objects


def test_gradients_through_vmap_equal_plain_jax():
    m = make_ensemble()
    w0, b0 = m["w"].value, m["b"].value

    def loss(m, x):
        return jnp.sum(refx.vmap(forward, in_axes=(AXES, None))(m, x) ** 2)

    def plain(w, b, x):
        return jnp.sum(jax.vmap(plain_forward, in_axes=(0, 0, None))(w, b, x) ** 2)

    grads = refx.grad(loss)(m, X)
    gw, gb = jax.grad(plain, argnums=(0, 1))(w0, b0, X)
    np.testing.assert_allclose(grads[("w",)].value, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[("b",)].value, gb, rtol=1e-5, atol=1e-6)
    assert int(m["calls"].value) == 1  # other writes written back by refx.grad


def test_per_member_gradients_inside_vmap_equal_plain_jax():
    m = make_ensemble()
    w0, b0 = m["w"].value, m["b"].value

    def member_grad(m, x):
        return refx.grad(lambda m, x: jnp.sum(forward(m, x) ** 2))(m, x)

    grads = refx.vmap(member_grad, in_axes=(AXES, None))(m, X)
    gw, gb = jax.vmap(jax.grad(lambda w, b: jnp.sum(plain_forward(w, b, X) ** 2), argnums=(0, 1)))(
        w0, b0)
    np.testing.assert_allclose(grads[("w",)].value, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[("b",)].value, gb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ensembles


class Param(refx.Ref):
    pass


def make_member(key):
    """A member with a tied weight, a typed Ref with metadata and a counter."""
    k1, k2 = jax.random.split(key)
    w = Param(jax.random.normal(k1, (3, 3)), "params", init="normal")
    return {"enc": w, "dec": w, "b": refx.Ref(jax.random.normal(k2, (3,)), "params"),
            "zero": refx.Ref(jnp.zeros(2), "stats"), "name": "member"}


def test_ensemble_made_inside_is_one_tree_of_refs_with_stacked_values():
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    models = refx.vmap(make_member)(keys)
    def plain(k):  # the same values, with plain jax.vmap
        k1, k2 = jax.random.split(k)
        return jax.random.normal(k1, (3, 3)), jax.random.normal(k2, (3,))

    want_w, want_b = jax.vmap(plain)(keys)
    assert models["enc"] is models["dec"]  # the tie survives
    assert type(models["enc"]) is Param and models["enc"].metadata == {"init": "normal"}
    assert models["enc"].collection == "params" and models["zero"].collection == "stats"
    assert models["name"] == "member"  # a str leaf rides along
    np.testing.assert_allclose(models["enc"].value, want_w, rtol=1e-6)
    np.testing.assert_allclose(models["b"].value, want_b, rtol=1e-6)
    assert models["zero"].value.shape == (8, 2)  # an unmapped value, broadcast to the members
    assert not isinstance(models["b"].value, jax.core.Tracer)


def test_axis_size_makes_instances_when_nothing_is_mapped():
    models = refx.vmap(lambda: {"w": refx.Ref(jnp.ones(3), "params")}, axis_size=5)()
    assert models["w"].value.shape == (5, 3)
    with pytest.raises(ValueError, match=r"refx.vmap\(\S*<lambda>\): nothing is mapped .* pass axis_size"):
        refx.vmap(lambda: {"w": refx.Ref(jnp.ones(3), "params")})()


def test_out_axes_apply_to_outputs_and_new_refs():
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    out = refx.vmap(lambda k: (refx.Ref(jax.random.normal(k, (2,)), "p"), jnp.ones(4)),
                    out_axes=(1, None))(keys)
    r, ones = out
    assert r.value.shape == (2, 3) and ones.shape == (4,)


# ---------------------------------------------------- identity and sharing


def test_argument_refs_returned_are_the_callers_objects():
    m = make_ensemble()
    out = refx.vmap(lambda m, x: (m["w"], m["last"], x.sum()), in_axes=(AXES, None))(m, X)
    assert out[0] is m["w"] and out[1] is m["last"]
    assert out[2].shape == (E,)


def test_sharing_within_and_across_arguments_is_kept():
    m = make_ensemble()
    seen = {}

    def f(a, b, c):
        seen["within"] = a["x"] is a["y"]
        seen["across"] = a["x"] is b is c["z"]
        a["x"].value = a["x"].value * 2  # through one place, seen at all
        return b.value

    w = m["w"]
    w0 = w.value
    out = refx.vmap(f, in_axes=(0, 0, refx.StateAxes({...: 0})))({"x": w, "y": w}, w, {"z": w})
    assert seen == {"within": True, "across": True}
    np.testing.assert_allclose(w.value, 2 * w0)
    np.testing.assert_allclose(out, 2 * w0)


def test_the_same_ref_with_two_axes_is_an_error_naming_both_places():
    m = make_ensemble()
    with pytest.raises(ValueError, match=r"refx.vmap\(\S*<lambda>\): one Ref is at argument 0 at \('w',\) "
                       r"with axis 0 and at argument 1 with axis None; a Ref shared between places "
                       r"must have one axis"):
        refx.vmap(lambda a, b: a["w"].value, in_axes=(AXES, None))(m, m["w"])
    # and inside one argument, through a StateAxes whose path filter splits it
    sa = refx.StateAxes({refx.PathContains("x"): 0, ...: None})
    with pytest.raises(ValueError, match=r"one Ref is at argument 0 at \('x',\) with axis 0 and at "
                       r"argument 0 at \('y',\) with axis None"):
        refx.vmap(lambda a: a["x"].value, in_axes=(sa,))({"x": m["w"], "y": m["w"]})


def test_kwargs_are_mapped_over_axis_0():
    m = make_ensemble()
    out = refx.vmap(lambda x, *, m: x @ m["w"].value, in_axes=(None,))(X, m={"w": m["w"]})
    np.testing.assert_allclose(out, jax.vmap(lambda w: X @ w)(m["w"].value), rtol=1e-6)


def test_deref_nodes_pass_through_and_statestaxes_matches_them():
    m = make_ensemble()
    d = refx.deref({"w": m["w"], "calls": m["calls"]})
    out = refx.vmap(lambda d, x: (x @ d["w"].value, d), in_axes=(refx.StateAxes(
        {"params": 0, ...: None}), None))(d, X)
    assert isinstance(out[1]["w"], refx.Value) and isinstance(out[1]["calls"], refx.Value)
    assert out[1]["w"].value.shape == (E, 3, 2) and out[1]["calls"].value.shape == (E,)


def test_in_axes_prefix_trees_and_negative_axes():
    m = make_ensemble()
    wt = refx.Ref(jnp.moveaxis(m["w"].value, 0, -1), "params")  # members on the last axis

    def f(t, x):
        return x @ t["w"].value + t["b"].value

    out = refx.vmap(f, in_axes=({"w": -1, "b": 0}, None))({"w": wt, "b": m["b"]}, X)
    want = jax.vmap(lambda w, b: X @ w + b)(m["w"].value, m["b"].value)
    np.testing.assert_allclose(out, want, rtol=1e-6)


# -------------------------------------------------------- all or nothing


def test_fun_raising_writes_nothing():
    m = make_ensemble()
    before = {k: r.value for k, r in m.items()}

    def f(m, x):
        forward(m, x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        refx.vmap(f, in_axes=(AXES, None))(m, X)
    assert all(m[k].value is v for k, v in before.items())


def test_batched_write_into_a_broadcast_ref_is_an_error_and_writes_nothing():
    m = make_ensemble()
    before = {k: r.value for k, r in m.items()}

    def f(m, x):
        m["last"].value = m["last"].value + 1  # a mapped Ref: fine
        m["calls"].value = m["w"].value.sum()  # depends on the member: not for a broadcast Ref
        return x

    with pytest.raises(ValueError, match=r"refx.vmap\(\S*\bf\): fun wrote the Ref of argument 0 at "
                       r"\('calls',\) \(collection 'count'\), which is broadcast \(in_axes None\), "
                       r"with a value that depends on the mapped axis"):
        refx.vmap(f, in_axes=(AXES, None))(m, X)
    assert all(m[k].value is v for k, v in before.items())


def test_closed_over_refs_are_broadcast_read_live_and_written_unbatched():
    m = make_ensemble()
    scale = refx.Ref(jnp.array(3.0), "hyper")
    out = refx.vmap(lambda w: w.value * scale.value)(m["w"])
    np.testing.assert_allclose(out, 3.0 * m["w"].value)
    # a closed-over Ref is broadcast: one value for all instances
    with pytest.raises(ValueError, match="closed over by fun .*broadcast"):
        refx.vmap(lambda w: setattr(scale, "value", w.value.sum()))(m["w"])
    assert float(scale.value) == 3.0
    refx.vmap(lambda w: setattr(scale, "value", scale.value + 1))(m["w"])
    assert float(scale.value) == 4.0


# ------------------------------------------------------------------ errors


def test_errors():
    m = make_ensemble()
    with pytest.raises(ValueError, match=r"refx.vmap\(\S*<lambda>\): in_axes has 1 entries but 2 positional"):
        refx.vmap(lambda a, b: a, in_axes=(0,))(m, X)
    with pytest.raises(ValueError, match=r"in_axes maps the Ref of argument 0 at \('calls',\) "
                       r"\(collection 'count'\) over axis 0, but its value has shape \(\)"):
        refx.vmap(lambda m: m["w"].value)(m)
    with pytest.raises(ValueError, match=r"the mapped axes have different sizes: the Ref of argument 0 "
                       r"has size 4; argument 1 has size 2"):
        refx.vmap(lambda w, x: w.value)(m["w"], X)
    with pytest.raises(ValueError, match=r"axis_size is 3; the Ref of argument 0 has size 4"):
        refx.vmap(lambda w: w.value, axis_size=3)(m["w"])
    with pytest.raises(ValueError, match=r"argument 0 at \('calls',\) holds the Ref \(collection "
                       r"'count'\), which no filter of StateAxes\(\{\('params', 'stats'\): 0\}\) "
                       r"accepts; add a filter for it \(end with `...: None`"):
        refx.vmap(forward, in_axes=(refx.StateAxes({("params", "stats"): 0}), None))(m, X)
    with pytest.raises(ValueError, match=r"in_axes\[0\] is not a prefix of argument 0's structure"):
        refx.vmap(lambda m: m, in_axes=([0, 0],))({"a": 1})
    with pytest.raises(TypeError, match="in_axes entries must be ints, None or StateAxes"):
        refx.vmap(lambda m: m, in_axes=("x",))(m)
    with pytest.raises(TypeError, match="refx.vmap: fun must be callable"):
        refx.vmap(3)
    with pytest.raises(TypeError, match=r"the Ref of argument 0 holds a str, which JAX cannot trace"):
        refx.vmap(lambda r: r, in_axes=None, axis_size=2)(refx.Ref("text"))


def test_state_axes():
    sa = refx.StateAxes({"params": 0, refx.Not("params"): None})
    assert sa.filters == ("params", refx.Not("params")) and sa.axes == (0, None)
    assert sa == refx.StateAxes([("params", 0), (refx.Not("params"), None)])
    assert hash(sa) == hash(refx.StateAxes({"params": 0, refx.Not("params"): None}))
    assert repr(refx.StateAxes({"params": 0, ...: None})) == "StateAxes({'params': 0, ...: None})"
    with pytest.raises(TypeError, match=r"StateAxes: the axis of filter 'params' must be an int or None"):
        refx.StateAxes({"params": "0"})
    with pytest.raises(TypeError, match=r"StateAxes: the axis of filter 'params' must be an int or None"):
        refx.StateAxes({"params": True})
    with pytest.raises(TypeError, match="expected a"):
        refx.StateAxes({5: 0})
    with pytest.raises(ValueError, match="at least one"):
        refx.StateAxes({})
    with pytest.raises(TypeError, match="expected a mapping"):
        refx.StateAxes([1, 2])


# ----------------------------------------------------- typed Refs, nesting


def test_typed_refs_and_metadata_survive():
    w = Param(jnp.ones((E, 3)), "params", init="ones", tag=("a", 1))
    seen = {}

    def f(w):
        seen["type"], seen["meta"] = type(w), w.metadata
        w.value = w.value * 2
        return w, Param(w.value + 1, "params", init="new")

    same, made = refx.vmap(f)(w)
    assert seen == {"type": Param, "meta": {"init": "ones", "tag": ("a", 1)}}
    assert same is w and type(made) is Param and made.metadata == {"init": "new"}
    np.testing.assert_allclose(made.value, 3.0 * np.ones((E, 3)))


def test_vmap_inside_refx_jit_traces_once_and_writes_back():
    m = make_ensemble()
    traces = []

    @refx.jit
    def step(m, x):
        traces.append(1)
        return refx.vmap(forward, in_axes=(AXES, None))(m, x)

    for i in range(3):
        out = step(m, X)
        assert int(m["calls"].value) == i + 1
    assert len(traces) == 1
    np.testing.assert_allclose(out, jax.vmap(plain_forward, in_axes=(0, 0, None))(
        m["w"].value, m["b"].value, X), rtol=1e-6)


def test_axis_name_collectives():
    m = make_ensemble()

    def f(m):
        m["last"].value = m["last"].value + jax.lax.psum(1.0, "members")
        return jax.lax.pmean(m["w"].value, "members")

    out = refx.vmap(f, in_axes=(AXES,), axis_name="members")(m)
    np.testing.assert_allclose(out[0], m["w"].value.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m["last"].value, np.full((E, 2), float(E)))


def test_mutable_option():
    m = make_ensemble()
    with pytest.raises(ValueError, match=r"refx.mutable: this Ref \(collection 'count'\) may not be "
                       r"written inside refx.mutable\('stats'\)"):
        refx.vmap(forward, in_axes=(AXES, None), mutable="stats")(m, X)
    assert int(m["calls"].value) == 0
    refx.vmap(forward, in_axes=(AXES, None), mutable=("stats", "count"))(m, X)
    assert int(m["calls"].value) == 1
