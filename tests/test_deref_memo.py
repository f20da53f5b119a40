"""deref, clone and reref flatten through a memo of their last tree.

deref and clone keep one memo of the last tree of Refs they flattened and
reref one of the last deref'ed tree (src/refx/flatmemo.c, as refx.jit's
argument memo, with "Memoized flattens" in src/refx/deref.c).  The promise
is unchanged: the output is exactly what a fresh flatten would give, with
the tree as it is now.  Unlike refx.jit's (whose cache compares treedefs
with ==, as jax.jit's does), these memos give their treedef to the output,
so a module's static attributes must be the very objects the memo holds,
not equal ones: 2.0 set where 2 was comes out as 2.0.
"""

from __future__ import annotations

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refx
import refx.nn as nn
from refx import _core
from test_flatten_memo import LEAVES, make_leaf, mutate, trees

is_deref = lambda x: isinstance(x, (refx.Value, refx.Index))  # noqa: E731


@pytest.fixture(autouse=True)
def _empty_memos():
    """Each test starts with empty memo boxes: what earlier tests (in any
    order) left there decides which memos are kept, not what is output."""
    _core._clear_flatten_memos()


def same_structure(a, b):
    """Treedefs equal, and every custom node's aux data equal item by item
    with (name, value) pairs holding the very same value objects."""
    assert a == b, (a, b)
    na, nb = a.node_data(), b.node_data()
    if na is not None:
        assert na[0] is nb[0]
        if isinstance(na[1], tuple) and issubclass(na[0], nn.Module):
            for pa, pb in zip(na[1], nb[1], strict=True):
                va, vb = (getattr(v, "value", v) if type(v).__name__ == "_Frozen" else v
                          for v in (pa[1], pb[1]))
                assert pa[0] == pb[0] and va is vb, (pa, pb)
    for ca, cb in zip(a.children(), b.children(), strict=True):
        same_structure(ca, cb)


def memoized(tree, derefed=False):
    """Is a memo of tree's structure first in its box (so the next call's
    walk starts with it)?"""
    box = _core._flatten_memos()[1 if derefed else 0]
    is_leaf = is_deref if derefed else None
    td = jax.tree_util.tree_structure(tree, is_leaf=is_leaf)
    return box is not None and box[0] is not None and len(box[0]) == 5 and box[0][0] == td


def warm(tree):
    """Calls enough for deref/clone's and reref's memos of tree: a memo is
    made for a structure's second flatten that found none."""
    for _ in range(3):
        refx.reref(refx.deref(tree))
    assert memoized(tree) and memoized(refx.deref(tree), derefed=True)


def check_all(tree):
    """deref, reref of it and clone: each as a fresh flatten says, three
    times (the third with the memos a second flatten makes)."""
    for _ in range(3):
        _check_once(tree)


def _check_once(tree):
    leaves, td = jax.tree_util.tree_flatten(tree)
    d = refx.deref(tree)
    dl, dtd = jax.tree_util.tree_flatten(d, is_leaf=is_deref)
    same_structure(dtd, td)
    numbers: dict[int, int] = {}
    for a, b in zip(leaves, dl, strict=True):
        if isinstance(a, refx.Ref):
            first = id(a) not in numbers
            k = numbers.setdefault(id(a), len(numbers))
            assert type(b) is (refx.Value if first else refx.Index)
            assert b.index == k
            if first:
                assert b.value is a.value
        else:
            assert b is a
    for out in (refx.reref(d), refx.clone(tree)):
        ol, otd = jax.tree_util.tree_flatten(out)
        same_structure(otd, td)
        made: dict[int, refx.Ref] = {}
        for a, b in zip(leaves, ol, strict=True):
            if isinstance(a, refx.Ref):
                assert isinstance(b, refx.Ref) and b is not a and b.value is a.value
                assert made.setdefault(id(a), b) is b  # sharing kept
            else:
                assert b is a
        assert len({id(r) for r in made.values()}) == len(made)


class Block(nn.Module):
    def __init__(self, k):
        self.k = k
        self.w = nn.Param(jnp.ones(2))


@pytest.mark.parametrize("old, new", [(2, 2.0), (1, True), (0.0, -0.0), ("a", np.str_("a")),
                                      ((1, 2), (1.0, 2.0))])
def test_a_static_equal_to_the_memos_comes_out_as_set(old, new):
    m = Block(old)
    check_all([m, m])
    assert memoized([m, m])
    m.k = new
    check_all([m, m])
    for _ in range(3):
        for out in (refx.reref(refx.deref([m])), refx.clone([m])):
            assert out[0].k is new
            assert type(out[0].k) is type(new)


def test_second_call_agrees_after_every_kind_of_change():
    r = refx.Ref(jnp.ones(2))
    tree = {"a": [r, r, None, 1.0], "b": (refx.Ref(3.0), Block(1)), "c": {"x": r}}
    check_all(tree)
    check_all(tree)
    tree["a"].append(refx.Ref(1.0))
    check_all(tree)
    tree["a"][2] = 0.5  # None -> a leaf
    check_all(tree)
    tree["c"] = {"y": r}  # same arity, another key
    check_all(tree)
    tree["b"][1].k = 2  # aux data
    check_all(tree)
    tree["b"][1].extra = nn.Param(jnp.zeros(1))  # a new child
    check_all(tree)
    tree["a"][0] = refx.Ref(jnp.zeros(2))  # another Ref, same structure
    check_all(tree)


def test_a_deref_ed_value_where_the_memo_has_a_ref_is_named():
    good = {"a": refx.Ref(1.0), "b": [refx.Ref(2.0)]}
    warm(good)
    bad = {"a": refx.Ref(1.0), "b": [refx.Value(2.0, 0, None)]}
    with pytest.raises(ValueError, match=r"deref: Value found at \('b', '0'\)"):
        refx.deref(bad)
    with pytest.raises(ValueError, match=r"clone: Value found at \('b', '0'\)"):
        refx.clone(bad)


def test_a_ref_where_reref_s_memo_has_a_value_is_named():
    d = refx.deref({"a": refx.Ref(1.0), "b": [refx.Ref(2.0)]})
    warm({"a": refx.Ref(1.0), "b": [refx.Ref(2.0)]})
    bad = {"a": d["a"], "b": [refx.Ref(2.0)]}
    with pytest.raises(ValueError, match=r"reref: Ref found at \('b', '0'\)"):
        refx.reref(bad)
    with pytest.raises(ValueError, match=r"reref: Index\(0\) at \('a',\) comes before any Value"):
        refx.reref({"a": refx.Index(0, None), "b": [d["a"]]})


def test_index_and_value_swapped_at_the_same_places():
    r = refx.Ref(1.0)
    d = refx.deref([r, r])
    warm([r, r])
    out = refx.reref(d)
    assert out[0] is out[1]
    d2 = refx.deref([r, refx.Ref(2.0)])  # Value, Value where it had Value, Index
    out2 = refx.reref(d2)
    assert out2[0] is not out2[1] and out2[1].value == 2.0


@settings(max_examples=100, deadline=None)
@given(trees, st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), LEAVES), max_size=6))
def test_property_deref_reref_clone_always_as_fresh(tree, ops):
    root = [tree]
    check_all(root)
    for op, which, leaf in ops:
        mutate(root, op, which, make_leaf(leaf))
        check_all(root)
        check_all(root)


def test_threads_with_other_structures():
    trees_ = [[{"a": refx.Ref(float(i)), "b": [refx.Ref(1.0)] * (i % 3)}, Block(i % 2)]
              for i in range(8)]
    errors = []

    def work(t):
        try:
            for _ in range(200):
                check_all(t)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in trees_]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_a_memo_holds_no_leaf_and_lets_go_of_its_structure():
    import gc
    import weakref

    class Leaf:
        pass

    class Static:
        def __hash__(self):
            return 0

        def __eq__(self, other):
            return isinstance(other, Static)

    leaf, static = Leaf(), Static()
    m = Block(static)
    tree = {"a": refx.Ref(leaf), "b": leaf, "m": m}
    for _ in range(2):
        refx.reref(refx.deref(tree))
        refx.clone(tree)
    wl, ws = weakref.ref(leaf), weakref.ref(static)
    del leaf, static, m, tree
    gc.collect()
    assert wl() is None  # never held by a memo
    # the module's static is in the treedefs the boxes keep: trees of other
    # structures, flattened in turn, replace them
    for _ in range(20):
        for k in (1, 2, 3, 4):
            refx.reref(refx.deref([refx.Ref(1.0)] * k))
    gc.collect()
    assert ws() is None


class _HookNT(collections.namedtuple("_HookNT", "x")):
    """A namedtuple whose _fields lookup (asked on every flatten, by jaxlib
    and by the memo's walk) runs armed[0] once."""

    __slots__ = ()
    armed: list = [None]

    def __getattribute__(self, name):
        if name == "_fields" and _HookNT.armed[0] is not None:
            f, _HookNT.armed[0] = _HookNT.armed[0], None
            f()
        return object.__getattribute__(self, name)


def test_a_dict_changed_while_the_walk_is_inside_it():
    # the walk took the dict's values before walking into "a"; Python code
    # run there replaces "b": the output must hold the new Ref's value
    tree = {"a": _HookNT(refx.Ref(0.0)), "b": refx.Ref(1.0)}
    warm(tree)
    new = refx.Ref(2.0)
    _HookNT.armed[0] = lambda: tree.__setitem__("b", new)
    assert refx.deref(tree)["b"].value == 2.0
    # and reref, with a Value replaced
    d = refx.deref({"a": _HookNT(refx.Ref(0.0)), "b": refx.Ref(1.0)})
    warm({"a": _HookNT(refx.Ref(0.0)), "b": refx.Ref(1.0)})
    newv = refx.deref([refx.Ref(5.0), refx.Ref(6.0)])[1]
    _HookNT.armed[0] = lambda: d.__setitem__("b", newv)
    assert refx.reref(d)["b"].value == 6.0


def test_a_type_registered_while_the_walk_runs():
    class Box:
        def __init__(self, v):
            self.v = v

    tree = [_HookNT(refx.Ref(0.0)), Box(refx.Ref(1.0))]
    warm(tree)  # Box a leaf, in the memo
    _HookNT.armed[0] = lambda: jax.tree_util.register_pytree_node(
        Box, lambda b: ((b.v,), None), lambda _, c: Box(*c))
    out = refx.deref(tree)
    assert isinstance(out[1], Box) and out[1] is not tree[1]
    assert isinstance(out[1].v, refx.Value)  # a node now: its Ref deref'ed


def test_no_memo_inside_a_trace_keeps_a_tracer():
    class Blk(nn.Module):
        def __init__(self, scale):
            self.act = lambda x: x * scale  # a static closing over a tracer
            self.w = nn.Param(jnp.ones(2))

    def f(x):
        d = refx.deref([Blk(x.sum())])
        refx.clone([Blk(x.sum())])
        return refx.reref(d)[0].w.value * 2

    with jax.checking_leaks():
        jax.jit(f)(jnp.ones(2))


def test_an_unhashable_static_is_the_same_while_it_is_the_same_object():
    m = Block([64, 64])
    check_all([m])
    check_all([m])
    m.k = [64, 64]  # equal, another list: the output holds the new one
    out = refx.reref(refx.deref([m]))
    assert out[0].k is m.k
    assert refx.clone([m])[0].k is m.k


def test_two_trees_in_turn_each_get_a_memo():
    a = {"w": refx.Ref(jnp.ones(2)), "b": [refx.Ref(1.0)]}
    b = (refx.Ref(2.0), Block(3))
    for _ in range(6):  # memos of earlier work, hit lately, give way after a while
        refx.deref(a)
        refx.deref(b)
    box = _core._flatten_memos()[0]
    tds = {box[0][0], box[1][0]}
    assert tds == {jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)}
    for _ in range(3):
        check_all(a)
        check_all(b)


def test_a_structure_seen_once_makes_no_memo():
    _core._clear_flatten_memos()
    refx.deref([refx.Ref(1.0)])
    box = _core._flatten_memos()[0]
    assert box[0] is None and box[1] is None  # only remembered as seen
    refx.deref([refx.Ref(1.0)])
    assert memoized([refx.Ref(1.0)])


def test_a_structure_not_memoized_is_not_tried_again():
    tree = {1: refx.Ref(1.0)}  # a non-str key: left to jaxlib
    for _ in range(3):
        check_all(tree)
    box = _core._flatten_memos()[0]
    assert len(box[0]) == 1 and box[0][0] == jax.tree_util.tree_structure(tree)


def test_memos_trading_places_leak_nothing():
    import sys

    a = {"w": refx.Ref(jnp.ones(2))}
    b = [refx.Ref(2.0), refx.Ref(3.0)]
    for _ in range(3):
        refx.deref(a)
        refx.deref(b)
        refx.reref(refx.deref(a))
        refx.reref(refx.deref(b))
    boxes = _core._flatten_memos()
    memos = [m for box in boxes for m in box[:2]]
    before = [sys.getrefcount(m) for m in memos]
    del boxes
    for _ in range(100):  # each call hits the second memo, which moves first
        refx.reref(refx.deref(a))
        refx.reref(refx.deref(b))
        refx.clone(a)
    boxes = _core._flatten_memos()
    assert [sys.getrefcount(m) for m in memos] == before
    assert {id(m) for box in boxes for m in box[:2]} == {id(m) for m in memos}


def test_a_raising_aux_compare_against_a_memo_is_no_error():
    # np.int64(1) == (1, 2) is an array, whose truth raises: comparing this
    # tree's treedef with one the memos keep must not fail the call
    m = Block(np.int64(1))
    check_all([m])
    m.k = (1, 2)
    check_all([m])
    m.k = np.int64(1)
    check_all([m])


def test_a_structure_that_keeps_missing_its_memo_is_marked():
    # the last leaf's type alternates: the treedef is the same, the memo's
    # walk misses; made again once, then the structure is marked not
    # memoized, so each call costs a plain flatten, not a memo's making
    refs = [refx.Ref(1.0) for _ in range(5)]
    for i in range(8):
        check_all(refs + [1.0 if i % 2 else np.float32(1.0)])
    box = _core._flatten_memos()[0]
    td = jax.tree_util.tree_structure(refs + [1.0])
    assert len(box[0]) == 1 and box[0][0] == td


def test_memos_a_workload_left_are_dropped():
    a, b = [refx.Ref(1.0)], {"x": refx.Ref(2.0)}
    for _ in range(3):
        refx.deref(a)
        refx.deref(b)
    rotation = [[refx.Ref(1.0)] * k + [None] for k in range(1, 4)]  # never twice in a row's reach
    for _ in range(20):
        for t in rotation:
            refx.deref(t)
    box = _core._flatten_memos()[0]
    left = {jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)}
    assert not any(m is not None and m[0] in left for m in box[:2])
    assert not any(box[i] in left for i in (2, 3, 9))
    for t in rotation:
        check_all(t)


def test_the_memo_boxes_are_immutable():
    refx.deref([refx.Ref(1.0)])
    for box in _core._flatten_memos():
        assert box is None or type(box) is tuple


def test_three_trees_in_turn_keep_two_memos():
    _core._clear_flatten_memos()
    trees_ = [[refx.Ref(1.0)] * 50 + [[refx.Ref(2.0)] * k] for k in (1, 2, 3)]
    for _ in range(10):
        for t in trees_:
            refx.deref(t)
    box = _core._flatten_memos()[0]
    kept = [m for m in box[:2] if m is not None and len(m) == 5]
    assert len(kept) == 2
    made = {id(m) for m in kept}
    for _ in range(10):  # and no memo is made again
        for t in trees_:
            refx.deref(t)
    assert {id(m) for m in _core._flatten_memos()[0][:2]} == made
    for t in trees_:
        check_all(t)


def test_a_namedtuple_memo_runs_no_metaclass_code():
    """The memo reads a namedtuple class's _fields as its instances find
    it, not through the metaclass: a metaclass hook a plain flatten never
    runs is not run (so it cannot fail the call, nor be swallowed)."""

    class Stop(BaseException):
        pass

    class Meta(type):
        def __getattribute__(cls, name):
            if name == "_fields":
                raise Stop(name)
            return type.__getattribute__(cls, name)

    class NT(tuple, metaclass=Meta):
        def __new__(cls, *a):
            return tuple.__new__(cls, a)

    type.__setattr__(NT, "_fields", ("a",))
    tree = [NT(refx.Ref(1.0))]
    assert jax.tree_util.tree_structure(tree).num_leaves == 1
    for _ in range(3):
        check_all(tree)
    assert memoized(tree)
