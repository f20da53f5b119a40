"""The Ref type: construction, value/collection, pytree leafness, identity,
GC and weak references, repr, subclassing, pickling, and that the public
API is made of C objects."""

import copy
import gc
import pickle
import types
import weakref

import jax
import jax.numpy as jnp
import pytest

import refx


def test_value_get_set():
    r = refx.Ref(1)
    assert r.value == 1
    r.value = 2
    assert r.value == 2
    assert r.collection is None


def test_collection():
    r = refx.Ref(1, collection="params")
    assert r.collection == "params"
    r2 = refx.Ref(1, "batch_stats")
    assert r2.collection == "batch_stats"
    with pytest.raises(AttributeError):
        r.collection = "other"


def test_unhashable_collection_is_type_error():
    with pytest.raises(TypeError, match="Ref: collection must be hashable, got unhashable list"):
        refx.Ref(1, collection=["params"])


def test_value_cannot_be_deleted():
    r = refx.Ref(1)
    with pytest.raises(AttributeError, match="cannot delete Ref.value"):
        del r.value
    assert r.value == 1


def test_arguments():
    with pytest.raises(TypeError):
        refx.Ref()
    with pytest.raises(TypeError):
        refx.Ref(1, "a", "b")
    r = refx.Ref(value=3, collection="c")
    assert (r.value, r.collection) == (3, "c")


def test_ref_is_a_leaf():
    r = refx.Ref(1)
    assert jax.tree_util.tree_leaves([r, r]) == [r, r]
    assert jax.tree_util.tree_structure(r).num_leaves == 1


def test_identity_equality_and_hash():
    a, b = refx.Ref(1), refx.Ref(1)
    assert a != b
    assert a == a
    assert hash(a) != hash(b) or a is not b
    assert len({a, b, a}) == 2


def test_repr_shows_value_and_collection():
    assert repr(refx.Ref(1, "params")) == "Ref(value=1, collection='params')"
    r = refx.Ref(None)
    r.value = [r]
    assert repr(r) == "Ref(value=[Ref(...)], collection=None)"


def test_weakref_and_gc():
    r = refx.Ref(1)
    w = weakref.ref(r)
    assert w() is r
    del r
    gc.collect()
    assert w() is None


def test_cycle_through_value_is_collected():
    r = refx.Ref(None)
    r.value = {"self": r}
    w = weakref.ref(r)
    del r
    gc.collect()
    assert w() is None


def test_subclass():
    class Param(refx.Ref):
        def __init__(self, value):
            super().__init__(value, "params")

    p = Param(jnp.ones(2))
    assert isinstance(p, refx.Ref)
    assert p.collection == "params"
    assert jax.tree_util.tree_leaves([p]) == [p]
    d = refx.deref({"w": p, "v": p})
    assert isinstance(d["v"], refx.Value)
    assert d["v"].collection == "params"
    p.extra = 1  # Python subclasses get a __dict__
    assert p.extra == 1


def test_pickle_keeps_sharing():
    r = refx.Ref([1, 2], "c")
    tree = {"a": r, "b": r}
    tree2 = pickle.loads(pickle.dumps(tree))
    assert tree2["a"] is tree2["b"]
    assert tree2["a"] is not r
    assert tree2["a"].value == [1, 2] and tree2["a"].collection == "c"


def test_copy_and_deepcopy():
    r = refx.Ref([1], "c")
    c = copy.copy(r)
    assert c is not r and c.value is r.value and c.collection == "c"
    d = copy.deepcopy({"a": r, "b": r})
    assert d["a"] is d["b"] and d["a"].value == [1] and d["a"].value is not r.value


def test_generic_alias():
    assert refx.Ref[int].__origin__ is refx.Ref
    assert refx.Value[int].__origin__ is refx.Value
    assert refx.Partition[int].__origin__ is refx.Partition


def test_public_api_is_c():
    for f in (refx.deref, refx.reref, refx.clone, refx.tree_partition,
              refx.get_partition, refx.merge_partitions, refx.update_refs):
        assert type(f) is types.BuiltinFunctionType, f
        assert f.__module__ == "refx._core"
    for cls in (refx.Ref, refx.Value, refx.Index, refx.Deref, refx.Partition,
                refx.Not, refx.All, refx.Any):
        assert not any(isinstance(v, types.FunctionType) for v in vars(cls).values()), cls
        assert cls.__module__ == "refx"
    assert type(refx.NOTHING) is refx.Nothing


def test_text_signatures():
    import inspect

    assert str(inspect.signature(refx.deref)) == "(tree, /)"
    assert str(inspect.signature(refx.tree_partition)) == "(tree, /, *filters, is_leaf=None)"
    assert str(inspect.signature(refx.update_refs)) == "(target, source, /)"
    assert str(inspect.signature(refx.Ref)) == "(value, collection=None)"
    assert str(inspect.signature(refx.Value)) == "(value, index, collection=None)"


def test_all_is_complete():
    assert sorted(refx.__all__) == sorted(
        n for n in dir(refx) if not n.startswith("_") and n not in ("annotations",)
    )


def test_gc_tracking_follows_what_a_ref_can_reach():
    # Refs made by reref/clone are tracked only when they could be part of a
    # cycle; a write of a container value starts tracking.
    a = jnp.ones(2)
    tree = refx.clone({"x": refx.Ref(a, "params"), "y": refx.Ref(1.0)})
    r = tree["x"]
    assert not gc.is_tracked(r) and not gc.is_tracked(tree["y"])
    r.value = [r]  # a cycle through the value
    assert gc.is_tracked(r)
    w = weakref.ref(r)
    del r, tree
    gc.collect()
    assert w() is None
    # a non-atomic collection could lead back: tracked from the start
    assert gc.is_tracked(refx.clone([refx.Ref(a, ("c", 1))])[0])
    # update_refs writes keep tracking right too
    class Box:  # not a pytree node: one leaf
        def __init__(self, x):
            self.x = x

    r2 = refx.clone([refx.Ref(a)])[0]
    refx.update_refs([r2], [Box(r2)])
    assert gc.is_tracked(r2)


def test_gc_tracking_of_values_and_indexes():
    a = jnp.ones(2)
    d = refx.deref([refx.Ref(a, "p"), refx.Ref([1], "p")])
    assert not gc.is_tracked(d[0])  # an array and a str collection
    assert gc.is_tracked(d[1])      # a list could lead back
    assert not gc.is_tracked(refx.Index(0, "p"))
    assert gc.is_tracked(refx.Index(0, ("p", 1)))
    v = refx.Value(None, 0)
    assert not gc.is_tracked(v)
