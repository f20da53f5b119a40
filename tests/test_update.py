"""update_refs: every kind of source, both alignments, sharing rules, every
error path, and a full training step (deref, partition, jit(grad), optax,
update_refs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx

NOTHING = refx.NOTHING


def shared_tree():
    w = refx.Ref(jnp.ones(2), "params")
    s = refx.Ref(jnp.zeros(()), "stats")
    return {"a": [w, w, s], "b": s, "c": 1.0}, w, s


def test_source_of_refs():
    tree, w, s = shared_tree()
    src = refx.clone(tree)
    src["a"][0].value = jnp.full(2, 5.0)
    src["b"].value = 3.0
    refx.update_refs(tree, src)
    assert jnp.array_equal(w.value, jnp.full(2, 5.0)) and s.value == 3.0


def test_source_of_values_and_indexes():
    tree, w, s = shared_tree()
    d = jax.tree_util.tree_map(lambda x: x + 1, refx.deref(tree))
    refx.update_refs(tree, d)
    assert jnp.array_equal(w.value, jnp.full(2, 2.0)) and s.value == 1.0
    assert tree["c"] == 1.0  # plain leaves are not written


def test_source_of_plain_values():
    tree, w, s = shared_tree()
    new = jnp.full(2, 7.0)
    refx.update_refs(tree, {"a": [new, new, 4.0], "b": 4.0, "c": 1.0})
    assert w.value is new and s.value == 4.0


def test_partitions_seed_style():
    tree, w, s = shared_tree()
    (params, rest), _ = refx.tree_partition(refx.deref(tree), "params")
    params = jax.tree_util.tree_map(lambda x: x * 10, params)
    refx.update_refs(refx.get_partition(tree, "params"), params)
    assert jnp.array_equal(w.value, jnp.full(2, 10.0)) and s.value == 0.0


def test_partition_target_aligns_by_path_with_any_dict():
    tree, w, s = shared_tree()
    target = refx.get_partition(tree, "stats")
    # a checkpoint-like plain dict in another order
    src = {k: (jnp.array(9.0) if v is not NOTHING else NOTHING) for k, v in reversed(list(target.items()))}
    with pytest.raises(ValueError, match=r"the target repeats a Ref here but the source has a value that is not the object at the Ref's first position; sharing is by identity"):
        refx.update_refs(target, src)  # two distinct arrays for one shared Ref
    nine = jnp.array(9.0)
    src = {k: (nine if v is not NOTHING else NOTHING) for k, v in reversed(list(target.items()))}
    refx.update_refs(target, src)
    assert s.value is nine


def test_by_path_source_may_leave_out_nothing_and_repeats():
    # a checkpoint stores a tied Ref once and skips other collections
    tree, w, s = shared_tree()
    target = refx.get_partition(tree, ("params", "stats"))
    five = jnp.full(2, 5.0)
    refx.update_refs(target, {("a", "1"): five, ("b",): 3.0})
    assert w.value is five and s.value == 3.0
    with pytest.raises(ValueError, match=r"update_refs: path \('z',\) is in the source but not in the target"):
        refx.update_refs(target, {("a", "0"): 1.0, ("b",): 1.0, ("z",): 1.0})
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '2'\): the source has no value for the Ref here \(the path is missing from the source, and so are the Ref's other paths\)"):
        refx.update_refs(target, {("a", "0"): jnp.ones(2)})
    assert w.value is five and s.value == 3.0  # nothing written by the failures
    with pytest.raises(ValueError, match=r"update_refs: at \('c',\): target has NOTHING but source has float"):
        refx.update_refs(target, {("a", "0"): jnp.ones(2), ("b",): 1.0, ("c",): 2.0})


def test_update_inside_jit_on_refs_of_that_trace():
    tree, w, s = shared_tree()

    @jax.jit
    def step(d):
        t = refx.reref(d)
        new = jax.tree_util.tree_map(lambda x: x * 2, refx.deref(t))
        refx.update_refs(t, new)
        return refx.deref(t)

    out = refx.reref(step(refx.deref(tree)))
    assert jnp.array_equal(out["a"][1].value, jnp.full(2, 2.0))
    assert out["a"][0] is out["a"][1]


# --- errors: each leaves every Ref unchanged -------------------------------


def check_unchanged(tree, w, s):
    assert jnp.array_equal(w.value, jnp.ones(2)) and s.value == 0.0


def test_leaf_count_mismatch():
    tree, w, s = shared_tree()
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('c',\): the target has a leaf there, the source has no more leaves"):
        refx.update_refs(tree, {"a": [1.0, 1.0, 2.0], "b": 2.0})
    check_unchanged(tree, w, s)


def test_nothing_mismatch():
    tree, w, s = shared_tree()
    with pytest.raises(ValueError, match=r"update_refs: at \('b',\): target has a Ref but source has NOTHING"):
        refx.update_refs(tree, {"a": [5.0, 5.0, 5.0], "b": NOTHING, "c": 1.0})
    check_unchanged(tree, w, s)
    t = refx.get_partition(tree, "params")
    src = dict(t)
    src[("a", "2")] = 3.0
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '2'\): target has NOTHING but source has float"):
        refx.update_refs(t, src)


def test_mixing_refs_and_values():
    tree, w, s = shared_tree()
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '2'\): source has a Value but earlier positions hold Refs; a source may not mix Refs with Values/Indexes"):
        r = refx.Ref(1.0, "params")
        refx.update_refs(tree, {"a": [r, r, refx.Value(1.0, 0, "stats")], "b": refx.Index(0, "stats"), "c": 1.0})
    check_unchanged(tree, w, s)


def test_index_before_value():
    tree, w, s = shared_tree()
    d = refx.deref(tree)
    bad = {"a": [refx.Index(0, "params"), d["a"][0], d["a"][2]], "b": d["b"], "c": 1.0}
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '0'\): Index\(0\) comes before any Value with index 0"):
        refx.update_refs(tree, bad)
    check_unchanged(tree, w, s)


def test_sharing_mismatch():
    tree, w, s = shared_tree()
    # source does not share where the target does (last position fails)
    src = refx.deref({"a": [refx.Ref(1.0, "params"), refx.Ref(2.0, "params"), refx.Ref(3.0, "stats")], "b": refx.Ref(4.0, "stats"), "c": 1.0})
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '1'\): the target repeats a Ref here but the source has a new Value \(index 1\), not an Index"):
        refx.update_refs(tree, src)
    check_unchanged(tree, w, s)
    # source shares where the target does not
    t2 = {"x": refx.Ref(1.0), "y": refx.Ref(2.0)}
    d = refx.deref({"x": w, "y": w})
    with pytest.raises(ValueError, match=r"update_refs: at \('y',\): source has Index\(0\) but the target Ref here is not the one Value 0 updates"):
        refx.update_refs(t2, {"x": refx.Value(1.0, 0, None), "y": refx.Index(0, None)})
    assert t2["x"].value == 1.0 and t2["y"].value == 2.0
    del d
    r = refx.Ref(5.0)
    with pytest.raises(ValueError, match=r"update_refs: at \('y',\): the source repeats a Ref here but the target has a different Ref"):
        refx.update_refs(t2, {"x": r, "y": r})
    assert t2["x"].value == 1.0


def test_duplicate_value_index():
    t = [refx.Ref(1.0), refx.Ref(2.0)]
    with pytest.raises(ValueError, match=r"update_refs: at \('1',\): source has two Values with index 0"):
        refx.update_refs(t, [refx.Value(5.0, 0), refx.Value(6.0, 0)])
    assert [r.value for r in t] == [1.0, 2.0]


def test_collection_mismatch():
    tree, w, s = shared_tree()
    d = refx.deref(tree)
    d["b"] = refx.Index(1, "stats")
    d["a"][2] = refx.Value(5.0, 1, "other")
    with pytest.raises(ValueError, match=r"update_refs: at \('a', '2'\): source Value has collection 'other' but the target Ref has collection 'stats'"):
        refx.update_refs(tree, d)
    check_unchanged(tree, w, s)


def test_plain_target_leaf_with_ref_source():
    with pytest.raises(ValueError, match=r"update_refs: at \('0',\): target has int, not a Ref, but source has a Value"):
        refx.update_refs([1], [refx.Value(1, 0)])


def test_trace_violation_at_last_position_changes_nothing():
    inner = []
    outer = refx.Ref(0.0)

    @jax.jit
    def f(x):
        r = refx.Ref(x)
        with pytest.raises(ValueError, match=r"update_refs: at \('1',\): Cannot mutate Ref from a different trace level"):
            refx.update_refs([r, outer], [x + 1, x + 2])
        inner.append(r.value is x)
        return x

    f(jnp.ones(()))
    assert inner == [True] and outer.value == 0.0


def test_arity():
    with pytest.raises(TypeError, match=r"update_refs\(\) takes 2 arguments \(target, source\) but 1 were given"):
        refx.update_refs([])


# --- a full training step ----------------------------------------------------


def test_training_step_with_optax():
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (64, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.3
    w = refx.Ref(jax.random.normal(k2, (3,)) * 0.1, "params")
    b = refx.Ref(jnp.zeros(()), "params")
    count = refx.Ref(jnp.zeros((), jnp.int32), "state")
    # w is shared: an "encoder" and a tied "decoder" use the same Ref
    model = {"enc": {"w": w, "b": b}, "dec": {"w": w}, "count": count}

    tx = optax.sgd(0.1)
    opt_state = tx.init(refx.get_partition(refx.deref(model), "params"))

    @jax.jit
    def step(derefed, opt_state, x, y):
        (params, rest), treedef = refx.tree_partition(derefed, "params")

        def loss_fn(params):
            m = refx.reref(refx.merge_partitions((params, rest), treedef))
            pred = x @ m["enc"]["w"].value + m["enc"]["b"].value
            m["count"].value = m["count"].value + 1
            # the tied weight appears once in params (Value) and once as Index
            assert m["enc"]["w"] is m["dec"]["w"]
            return jnp.mean((pred - y) ** 2), refx.get_partition(refx.deref(m), "state")

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return loss, params, state, opt_state

    losses = []
    for _ in range(30):
        loss, params, state, opt_state = step(refx.deref(model), opt_state, x, y)
        refx.update_refs(refx.get_partition(model, "params"), params)
        refx.update_refs(refx.get_partition(model, "state"), state)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]
    assert model["enc"]["w"] is model["dec"]["w"] is w
    assert int(count.value) == 30
    np.testing.assert_allclose(w.value, [1.0, -2.0, 0.5], atol=0.2)


def test_update_survives_keys_that_mutate_the_source():
    from test_partition import EvilKey

    r = refx.Ref(0)
    source = {}
    source[EvilKey("a")] = [object()]  # only the dict holds this value
    target = refx.Partition({EvilKey("a", source): r})
    try:
        refx.update_refs(target, source)
    except ValueError as e:
        assert "update_refs" in str(e)
        assert r.value == 0
    else:
        assert isinstance(r.value, list)


# --- the source must have the target's structure (issue 10, defect 4) ---------


def encdec():
    r1, r2 = refx.Ref(jnp.ones(2), "params"), refx.Ref(jnp.zeros(2), "params")
    return {"enc": r1, "dec": r2}, r1, r2


def test_by_leaf_source_with_other_keys_is_an_error():
    tree, r1, r2 = encdec()
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('dec',\)"):
        refx.update_refs(tree, {"decoder": 1.0, "encoder": 2.0})
    assert jnp.array_equal(r1.value, jnp.ones(2)) and jnp.array_equal(r2.value, jnp.zeros(2))


def test_by_leaf_source_of_another_kind_of_node_is_an_error():
    tree, r1, r2 = encdec()
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('dec',\): the target has a leaf at \('dec',\), the source at \('0',\)"):
        refx.update_refs(tree, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's"):
        refx.update_refs([r1, r2], (1.0, 2.0))
    assert jnp.array_equal(r1.value, jnp.ones(2)) and jnp.array_equal(r2.value, jnp.zeros(2))


def test_by_leaf_another_models_derefed_tree_is_an_error():
    tree, r1, r2 = encdec()
    other = {"enc": refx.Ref(jnp.full(2, 5.0), "params"), "head": refx.Ref(jnp.full(2, 6.0), "params")}
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('dec',\)"):
        refx.update_refs(tree, refx.deref(other))
    assert jnp.array_equal(r1.value, jnp.ones(2))


def test_by_leaf_a_ref_may_take_a_pytree_value():
    opt = refx.Ref((jnp.zeros(2), {"mu": jnp.zeros(2)}), "opt")
    tree = {"opt": opt, "n": 3}
    new = (jnp.ones(2), {"mu": jnp.ones(2)})
    refx.update_refs(tree, {"opt": new, "n": 3})
    assert opt.value is new
    # and a deref'ed source of the same tree
    d = jax.tree_util.tree_map(lambda x: x + 1, refx.deref(tree))
    refx.update_refs(tree, d)
    assert jnp.array_equal(opt.value[1]["mu"], jnp.full(2, 2.0))


def test_by_leaf_plain_leaves_must_be_leaves_on_both_sides():
    r = refx.Ref(1.0)
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('n',\)"):
        refx.update_refs({"r": r, "n": 3}, {"r": 2.0, "n": {"x": 1}})
    assert r.value == 1.0


# --- by path, Refs nested in a partition entry (issue 10, defect 5) -----------


def test_by_path_writes_refs_nested_in_an_entry():
    a, b = refx.Ref(1.0, "params"), refx.Ref(2.0, "params")
    tree = {"block": (a, b), "c": refx.Ref(3.0, "params")}
    p = refx.get_partition(tree, ..., is_leaf=lambda x: isinstance(x, tuple))
    assert p[("block",)] == (a, b)
    refx.update_refs(p, {("block",): (10.0, 20.0), ("c",): 30.0})
    assert (a.value, b.value, tree["c"].value) == (10.0, 20.0, 30.0)
    # sharing inside and across entries still lines up
    with pytest.raises(ValueError, match=r"update_refs: at \('block', '1'\): target has float, not a Ref, but source has a Ref"):
        refx.update_refs(refx.get_partition({"block": (a, 5.0)}, ..., is_leaf=lambda x: isinstance(x, tuple)),
                         {("block",): (1.0, refx.Ref(2.0))})
    with pytest.raises(ValueError, match=r"update_refs: the source's structure differs from the target's at \('block', '1'\)"):
        refx.update_refs(p, {("block",): (1.0,), ("c",): 3.0})
    assert (a.value, b.value) == (10.0, 20.0)


# --- by path, shapes and dtypes are checked (issue 10, defect 6) --------------


def test_by_path_checks_shape_and_dtype():
    w = refx.Ref(jnp.ones((3, 2)), "params")
    b = refx.Ref(jnp.zeros(2), "params")
    p = refx.get_partition({"w": w, "b": b}, "params")
    with pytest.raises(ValueError, match=r"update_refs: at \('w',\): the source has shape \(2, 3\) but the target Ref holds shape \(3, 2\)"):
        refx.update_refs(p, {("w",): np.ones((2, 3), np.float32), ("b",): np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=r"update_refs: at \('b',\): the source has dtype int32 but the target Ref holds dtype float32"):
        refx.update_refs(p, {("w",): np.ones((3, 2), np.float32), ("b",): np.ones(2, np.int32)})
    with pytest.raises(ValueError, match=r"update_refs: at \('b',\): the source is a Python float; the target Ref holds an array of shape \(2,\) and dtype float32"):
        refx.update_refs(p, {("w",): np.ones((3, 2), np.float32), ("b",): 1.0})
    assert jnp.array_equal(w.value, jnp.ones((3, 2))) and jnp.array_equal(b.value, jnp.zeros(2))
    refx.update_refs(p, {("w",): np.full((3, 2), 2.0, np.float32), ("b",): jnp.ones(2)})
    assert jnp.array_equal(w.value, jnp.full((3, 2), 2.0)) and jnp.array_equal(b.value, jnp.ones(2))


@pytest.mark.parametrize("held, new", [
    (np.array(1.0, np.float32), np.float64(2.0)),    # np.float64 subclasses float
    (np.array(1.0 + 0j, np.complex64), np.complex128(2.0)),  # and complex128 complex
    (np.float32(1.0), np.float64(2.0)),
])
def test_by_path_numpy_scalar_is_judged_by_its_dtype(held, new):
    r = refx.Ref(held, "c")
    part = refx.get_partition({"s": r}, "c")
    with pytest.raises(ValueError, match="dtype"):
        refx.update_refs(part, {("s",): new})
    assert r.value is held


def test_by_path_same_type_non_array_is_still_not_an_array():
    held = jax.ShapeDtypeStruct((2,), np.float32)
    r = refx.Ref(held, "c")
    part = refx.get_partition({"s": r}, "c")
    with pytest.raises(ValueError, match="not an array"):
        refx.update_refs(part, {("s",): jax.ShapeDtypeStruct((2,), np.float32)})
    assert r.value is held


def test_by_path_writing_the_held_array_is_a_no_op():
    a = np.ones(3, np.float32)
    r = refx.Ref(a, "c")
    refx.update_refs(refx.get_partition({"s": r}, "c"), {("s",): a})
    assert r.value is a
