"""GC: every refx container takes part in cycle collection; objects are
tracked only where they can be part of a cycle; weak references work."""

import gc
import weakref

import jax.numpy as jnp
import numpy as np
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
    a = np.ones(3)  # numpy arrays take no part in the GC: no cycle through them
    d = refx.deref({"x": refx.Ref(a, "p"), "y": refx.Ref(Box(), "p")})
    assert not gc.is_tracked(d["x"])
    assert gc.is_tracked(d["y"])
    idx = refx.deref([r := refx.Ref(a, "p"), r])[1]
    assert not gc.is_tracked(idx)
    assert not gc.is_tracked(refx.clone([refx.Ref(a, "p")])[0])
    assert gc.is_tracked(refx.Ref(Box()))
    assert gc.is_tracked(refx.Partition({("a",): 1}))
    # a jax.Array has a __dict__ (a.me = ref closes a cycle): tracked
    j = jnp.ones(3)
    assert gc.is_tracked(refx.deref([refx.Ref(j, "p")])[0])
    assert gc.is_tracked(refx.clone([refx.Ref(j, "p")])[0])


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
    a = np.ones(3)
    # Value/Index: untracked when nothing they hold could ever lead back to
    # them (scalars, numpy arrays, atomic collections), tracked otherwise
    assert not gc.is_tracked(refx.Value(a, 0, "p"))
    assert not gc.is_tracked(refx.Value(1.5, 0, None))
    assert not gc.is_tracked(refx.Index(0, 3))
    assert gc.is_tracked(refx.Value([1], 0, "p"))
    assert gc.is_tracked(refx.Value({}, 0, "p"))  # empty, untracked, but may fill
    assert gc.is_tracked(refx.Value(jnp.ones(3), 0, "p"))
    assert gc.is_tracked(refx.Value(a, 0, (Box(),)))
    assert gc.is_tracked(refx.Index(0, (Box(),)))
    # Ref: constructed with a plain value, untracked; tracked once it holds
    # something that could lead back to it
    r = refx.Ref(a, "p")
    assert not gc.is_tracked(r)
    r.value = Box()
    assert gc.is_tracked(r)
    assert gc.is_tracked(refx.Ref(a, (Box(),)))
    assert gc.is_tracked(refx.Ref({}))


@pytest.mark.parametrize("how", ["setter", "update_refs", "update_refs by path", "update_refs from a Value"])
def test_cycle_closed_by_a_write_into_an_untracked_ref_is_collected(how):
    # clone makes untracked Refs for scalar values; a write that closes a
    # cycle must track the Ref, or the cycle would never be collected
    def make():
        (r,) = refx.clone([refx.Ref(1.0, "p")])
        assert not gc.is_tracked(r)
        b = Box(r)
        if how == "setter":
            r.value = b
        elif how == "update_refs":
            refx.update_refs([r], [b])
        elif how == "update_refs by path":
            refx.update_refs(refx.get_partition([r], "p"), {("0",): b})
        else:
            refx.update_refs([r], refx.deref([refx.Ref(b, "p")]))
        assert gc.is_tracked(r)
        return b

    assert collected(make)


def test_partition_and_filters_are_gc_tracked():
    assert gc.is_tracked(refx.Partition())
    for f in (refx.Not("c"), refx.All(), refx.Any(int)):
        assert gc.is_tracked(f)


# --- cycles whose container was untracked when it was stored (defect 8) ------


def test_cycle_through_an_empty_dict_value_filled_later():
    def make():
        r = refx.Ref({})  # an empty dict is not GC-tracked yet
        r.value["me"] = r
        return r

    assert collected(make)


def test_cycle_through_a_jax_array_attribute():
    def make():
        a = jnp.ones(3)  # a jax.Array has a __dict__
        r = refx.Ref(a)
        a.me = r
        return r

    assert collected(make)


def test_cycle_through_a_value_of_an_empty_dict():
    def make():  # Values take no weak references: watch a Box in the cycle
        b, d = Box(), {}
        v = refx.Value(d, 0)
        d["me"], d["box"] = v, b
        return b

    assert collected(make)


def test_cycle_through_a_cloned_ref_holding_a_jax_array():
    def make():
        a = jnp.ones(3)
        r = refx.clone([refx.Ref(a)])[0]
        a.me = r
        return r

    assert collected(make)


def test_cycle_through_an_updated_ref_holding_an_empty_list():
    def make():
        r = refx.Ref(0.0)
        refx.update_refs([r], [[]])
        r.value.append(r)
        return r

    assert collected(make)


def _node_class(stash=None, fails=False):
    """A custom pytree node (Python flatten/unflatten); unflatten may keep
    its children in `stash` and then raise."""
    import jax

    class Node:
        def __init__(self, x):
            self.x = x

    def unflatten(_, children):
        if stash is not None:
            stash.extend(children)
        if fails:
            raise RuntimeError("boom")
        return Node(*children)

    jax.tree_util.register_pytree_node(Node, lambda n: ((n.x,), None), unflatten)
    return Node


def _input(fn, Node):
    r = refx.Ref(jnp.ones(2), "p")
    if fn == "reref":
        v, i = refx.deref([r, r])
        return [Node(v), i]
    return [Node(r), r]


@pytest.mark.parametrize("fn", ["deref", "reref", "clone"])
def test_made_objects_are_tracked_when_the_call_returns(fn):
    # they are made untracked and tracked at the end (deref.c, "Tracked
    # later"): a Value or Ref holding a jax.Array can close a cycle
    Node = _node_class()
    out = getattr(refx, fn)(_input(fn, Node))
    assert gc.is_tracked(out[0].x)
    assert gc.is_tracked(out[1]) or type(out[1]) is refx.Index


@pytest.mark.parametrize("fn", ["deref", "reref", "clone"])
def test_made_objects_kept_by_a_failing_unflatten_are_tracked(fn):
    stash = []
    Node = _node_class(stash, fails=True)
    with pytest.raises(RuntimeError, match="boom"):
        getattr(refx, fn)(_input(fn, Node))
    assert stash and all(gc.is_tracked(x) for x in stash)


def test_cycle_through_a_value_made_by_deref_is_collected():
    import jax

    class Holder:
        pass

    def make():
        h = Holder()
        r = refx.Ref(jax.numpy.ones(2), "p")
        (v,) = refx.deref([r])
        h.v = v
        v.value.holder = h  # the array's __dict__ leads back to the Value
        return h

    assert collected(make)


@pytest.mark.parametrize("fn", ["deref", "reref", "clone"])
def test_collector_state_is_left_alone(fn):
    # deref/reref/clone pause the collector only for their own loop, which
    # runs no Python code: custom nodes run with the collector as the
    # program set it, and a gc.disable() made meanwhile stays
    seen = []
    import jax

    class Node:
        def __init__(self, x):
            self.x = x

    def flatten(n):
        seen.append(gc.isenabled())
        gc.disable()
        return (n.x,), None

    jax.tree_util.register_pytree_node(Node, flatten, lambda _, c: Node(*c))
    try:
        getattr(refx, fn)(_input(fn, Node))
        assert seen == [True]
        assert not gc.isenabled()
    finally:
        gc.enable()
