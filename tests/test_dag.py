"""refx.Dag (trees of Refs through plain JAX transforms) and refx.Static
(hashable values in the aux data: part of jit cache keys)."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


def model():
    w = refx.Ref(jnp.ones(3), "params")
    return {"a": w, "b": [w, refx.Ref(jnp.zeros(3), "stats")], "n": 4}


# --------------------------------------------------------------------- Dag


def test_dag_through_plain_jax_jit():
    m = model()
    traces = []

    @jax.jit
    def f(dag, x):
        traces.append(1)
        t = dag.tree
        assert t["a"] is t["b"][0]  # sharing rebuilt inside
        t["b"][1].value = t["b"][1].value + x * t["a"].value  # writable: Refs of this trace
        return dag, t["b"][1].value.sum()

    out, s = f(refx.Dag(m), jnp.full(3, 2.0))
    assert float(s) == 6.0
    new = out.tree
    assert new["a"] is new["b"][0] and new["a"] is not m["a"]
    np.testing.assert_array_equal(new["b"][1].value, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(m["b"][1].value, [0.0, 0.0, 0.0])  # write back by hand:
    refx.update_refs(m, new)
    np.testing.assert_array_equal(m["b"][1].value, [2.0, 2.0, 2.0])
    f(refx.Dag(m), jnp.full(3, 2.0))
    assert len(traces) == 1  # the deref'ed treedef is a stable cache key


def test_dag_treedef_records_sharing_and_collections():
    traces = []

    @jax.jit
    def f(dag):
        traces.append(1)
        return dag.tree[0].value + dag.tree[1].value

    r = refx.Ref(jnp.ones(()), "p")
    assert float(f(refx.Dag([r, r]))) == 2.0
    assert float(f(refx.Dag([refx.Ref(jnp.ones(()), "p"), refx.Ref(jnp.ones(()), "p")]))) == 2.0
    assert float(f(refx.Dag([refx.Ref(jnp.ones(()), "q"), refx.Ref(jnp.ones(()), "q")]))) == 2.0
    assert len(traces) == 3


def test_dag_through_jax_vmap():
    m = {"w": refx.Ref(jnp.arange(6.0).reshape(3, 2), "params"), "count": refx.Ref(jnp.zeros(3))}

    def f(dag, x):
        t = dag.tree
        t["count"].value = t["count"].value + 1
        return dag, (t["w"].value * x).sum()

    out, s = jax.vmap(f)(refx.Dag(m), jnp.ones((3, 2)))
    np.testing.assert_array_equal(s, [1.0, 5.0, 9.0])
    np.testing.assert_array_equal(out.tree["count"].value, [1.0, 1.0, 1.0])
    assert out.tree["w"].value.shape == (3, 2)


def test_dag_flattens_to_the_derefed_tree_and_rerefs_lazily():
    m = model()
    d = refx.Dag(m)
    assert d.tree is m
    leaves, td = jax.tree_util.tree_flatten(d)
    # the leaves of deref(m): two Values' arrays (the Index has none) and the int
    assert len(leaves) == 3 and leaves[2] == 4
    assert all(a is b for a, b in zip(leaves, jax.tree_util.tree_leaves(refx.deref(m)), strict=True))
    back = jax.tree_util.tree_unflatten(td, leaves)
    t1 = back.tree
    assert back.tree is t1 and t1["a"] is t1["b"][0]
    # a flatten after .tree derefs the (possibly written) Refs again
    t1["a"].value = jnp.full(3, 5.0)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(back)[0], [5.0, 5.0, 5.0])
    # tree_map over leaves (no .tree access needed)
    doubled = jax.tree_util.tree_map(lambda x: x * 2, refx.Dag(m))
    np.testing.assert_array_equal(doubled.tree["a"].value, [2.0, 2.0, 2.0])
    assert doubled.tree["n"] == 8 and m["n"] == 4
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(d)[0]]
    assert paths[0].startswith(".tree")


# ------------------------------------------------------------------- Static


def test_static_is_a_node_without_children():
    s = refx.Static(("relu", 3))
    leaves, td = jax.tree_util.tree_flatten({"s": s, "x": 1.0})
    assert leaves == [1.0]
    back = jax.tree_util.tree_unflatten(td, leaves)
    assert back["s"] == s and back["s"].value == ("relu", 3)
    assert repr(s) == "Static(('relu', 3))"
    assert pickle.loads(pickle.dumps(s)) == s and copy.deepcopy(s) == s


def test_static_equality_follows_jax_jits_static_rule():
    assert refx.Static(1) == refx.Static(1) and hash(refx.Static(1)) == hash(refx.Static(1))
    assert refx.Static(1) != refx.Static(1.0) and refx.Static(1) != refx.Static(True)
    assert refx.Static("a") != "a"
    td = [jax.tree_util.tree_structure(refx.Static(v)) for v in (1, 1.0, True, 1)]
    assert td[0] != td[1] and td[0] != td[2] and td[0] == td[3]


def test_static_unhashable_is_a_type_error():
    with pytest.raises(TypeError, match="Static: value must be hashable, got unhashable list"):
        refx.Static([1, 2])
    with pytest.raises(TypeError):
        refx.Static()


def test_static_as_a_jit_cache_key():
    seen = []

    @jax.jit
    def f(s, x):
        seen.append(s.value)
        return x * s.value

    assert float(f(refx.Static(2), jnp.array(3.0))) == 6.0
    assert float(f(refx.Static(2), jnp.array(4.0))) == 8.0
    assert float(f(refx.Static(3), jnp.array(4.0))) == 12.0
    out = f(refx.Static(2.0), jnp.array(1.0))
    assert seen == [2, 3, 2.0] and type(seen[-1]) is float and float(out) == 2.0

    @refx.jit
    def g(r, s):
        seen.append(s.value)
        r.value = r.value + s.value
        return s

    r = refx.Ref(jnp.array(0.0))
    out = g(r, refx.Static(5))
    assert isinstance(out, refx.Static) and out.value == 5
    g(r, refx.Static(5))
    g(r, refx.Static(7))
    assert seen[3:] == [5, 7] and float(r.value) == 17.0
