"""GC: every refx container takes part in cycle collection; objects are
tracked only where they can be part of a cycle; weak references work."""

import gc
import weakref

import jax.numpy as jnp
import pytest

import refx


def collected(make):
    """make() returns (obj, keepalive-free cycle): True if gc frees it."""
    w = weakref.ref(make())
    gc.collect()
    return w() is None


class Box:
    """A weakref-able, GC-tracked object to hang cycles on."""

    def __init__(self, x=None):
        self.x = x


def test_cycle_through_ref_value():
    def make():
        b = Box()
        b.x = refx.Ref(b)
        return b

    assert collected(make)


def test_cycle_through_ref_collection():
    def make():
        b = Box()
        r = refx.Ref(0, collection=(b,))  # hashable, holds b
        b.x = r
        return b

    assert collected(make)


def test_cycle_through_ref_subclass_dict():
    class MyRef(refx.Ref):
        pass

    def make():
        b = Box()
        r = MyRef(1)
        r.owner = b
        b.x = r
        return b

    assert collected(make)


def test_cycle_through_value():
    def make():
        b = Box()
        b.x = refx.Value([b], 0, "c")
        return b

    assert collected(make)


def test_cycle_through_partition():
    def make():
        b = Box()
        b.x = refx.Partition({("a",): b})
        return b

    assert collected(make)


@pytest.mark.parametrize("cls", [refx.Not, refx.All, refx.Any])
def test_cycle_through_filters(cls):
    def make():
        b = Box()
        b.x = cls(lambda leaf, b=b: leaf is b)
        return b

    assert collected(make)


def test_cycle_through_user_is_leaf_predicate():
    # tree_partition wraps is_leaf in a C predicate object; no cycle leaks
    def make():
        b = Box()
        b.x = lambda x, b=b: x is b
        refx.tree_partition([1, 2], is_leaf=b.x)
        return b

    assert collected(make)


def test_deref_tree_with_cycle_is_collected():
    def make():
        b = Box()
        r = refx.Ref(b, "c")
        b.x = refx.deref({"a": r, "b": r})  # Value holds b, b holds the tree
        return b

    assert collected(make)


def test_tracking_only_where_cycles_are_possible():
    a = jnp.ones(3)
    d = refx.deref({"x": refx.Ref(a, "p"), "y": refx.Ref(Box(), "p")})
    assert not gc.is_tracked(d["x"])
    assert gc.is_tracked(d["y"])
    idx = refx.deref([r := refx.Ref(a, "p"), r])[1]
    assert not gc.is_tracked(idx)
    assert not gc.is_tracked(refx.clone([refx.Ref(a, "p")])[0])
    assert gc.is_tracked(refx.Ref(Box()))
    assert gc.is_tracked(refx.Partition({("a",): 1}))


def test_weakrefs():
    r = refx.Ref(1)
    calls = []
    w = weakref.ref(r, lambda _: calls.append(1))
    assert w() is r
    proxy = weakref.proxy(r)
    assert proxy.value == 1
    del r
    gc.collect()
    assert w() is None and calls == [1]
    cache = weakref.WeakKeyDictionary()
    r2 = refx.Ref(2)
    cache[r2] = "meta"
    assert cache[r2] == "meta"
    del r2
    gc.collect()
    assert len(cache) == 0


def test_tracking_follows_what_is_held():
    a = jnp.ones(3)
    # Value/Index: untracked when holding untracked or plain things with an
    # atomic collection, tracked otherwise
    assert not gc.is_tracked(refx.Value(a, 0, "p"))
    assert not gc.is_tracked(refx.Value(1.5, 0, None))
    assert not gc.is_tracked(refx.Index(0, 3))
    assert gc.is_tracked(refx.Value([1], 0, "p"))
    assert gc.is_tracked(refx.Value(a, 0, (Box(),)))
    assert gc.is_tracked(refx.Index(0, (Box(),)))
    # Ref: constructed with a plain value, untracked; tracked once it holds
    # something that could lead back to it
    r = refx.Ref(a, "p")
    assert not gc.is_tracked(r)
    r.value = Box()
    assert gc.is_tracked(r)
    assert gc.is_tracked(refx.Ref(a, (Box(),)))


@pytest.mark.parametrize("how", ["setter", "update_refs", "update_refs by path", "__init__"])
def test_cycle_closed_by_a_write_into_an_untracked_ref_is_collected(how):
    # clone makes untracked Refs for array values; a write that closes a
    # cycle must track the Ref, or the cycle would never be collected
    def make():
        (r,) = refx.clone([refx.Ref(jnp.ones(2), "p")])
        assert not gc.is_tracked(r)
        b = Box(r)
        if how == "setter":
            r.value = b
        elif how == "update_refs":
            refx.update_refs([r], [b])
        elif how == "update_refs by path":
            refx.update_refs(refx.get_partition([r], "p"), {("0",): b})
        else:
            r.__init__(b, "p")
        assert gc.is_tracked(r)
        return b

    assert collected(make)


def test_partition_and_filters_are_gc_tracked():
    assert gc.is_tracked(refx.Partition())
    for f in (refx.Not("c"), refx.All(), refx.Any(int)):
        assert gc.is_tracked(f)
