"""deref keeps the Value it made in each Ref and gives it again while it
still says the same (deref.c, "Reused Values").  A kept Value is a cache:
these tests attack it where a cache goes wrong: a value written through
every path, a Ref met at another position, attributes and metadata that
change, the memory it holds, donation, the collector, threads."""

import gc
import sys
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


class Box:
    """A plain value with a weakref, to see when it is freed."""

    def __init__(self, n):
        self.n = n


def values(tree):
    return [v.value for v in jax.tree_util.tree_leaves(
        refx.deref(tree), is_leaf=lambda x: isinstance(x, refx.Deref)) if isinstance(v, refx.Value)]


def test_a_second_deref_gives_equal_values_and_reuses_them():
    a, b = refx.Ref(1.0, "p"), refx.Ref(2.0, "q")
    d1, d2 = refx.deref([a, b, a]), refx.deref([a, b, a])
    assert d1 == d2
    assert d1[0] is d2[0] and d1[1] is d2[1]  # the kept Values


@pytest.mark.parametrize("how", ["setter", "update_refs", "jit", "jit_partial", "grad", "scan", "restore"])
def test_every_write_is_seen_by_the_next_deref(how):
    r = refx.Ref(jnp.zeros(3), "p")
    tree = {"r": r}
    before = refx.deref(tree)
    new = jnp.arange(3.0)
    if how == "setter":
        r.value = new
    elif how == "update_refs":
        refx.update_refs(tree, {"r": new})
    elif how == "jit":
        refx.jit(lambda t: setattr(t["r"], "value", t["r"].value + jnp.arange(3.0)))(tree)
    elif how == "jit_partial":
        refx.jit_partial(lambda t: setattr(t["r"], "value", t["r"].value + jnp.arange(3.0)), tree)()
    elif how == "grad":  # r is written, the other Ref differentiated
        def loss(t):
            t["r"].value = t["r"].value + jnp.arange(3.0)
            return jnp.sum(t["r"].value * t["w"].value)
        tree["w"] = refx.Ref(1.0, "w")
        refx.grad(loss, wrt="w")(tree)
    elif how == "scan":
        def body(t, x):
            t["r"].value = t["r"].value + x
            return t, None
        refx.scan(body, tree, jnp.arange(3.0)[None])
    elif how == "restore":
        refx.update_refs(refx.get_partition(tree, "p"), refx.get_partition({"r": refx.Ref(new, "p")}, "p"))
    after = refx.deref(tree)
    np.testing.assert_array_equal(after["r"].value, new)
    np.testing.assert_array_equal(before["r"].value, jnp.zeros(3))  # the old tree is unchanged


def test_a_ref_met_at_another_position_gets_its_new_number():
    a, b = refx.Ref(1.0), refx.Ref(2.0)
    refx.deref([a, b])
    d = refx.deref([b, a, b])
    assert (d[0].index, d[0].value, d[1].index, d[1].value) == (0, 2.0, 1, 1.0)
    assert isinstance(d[2], refx.Index) and d[2].index == 0
    back = refx.reref(d)
    assert back[0] is back[2] and back[0].value == 2.0 and back[1].value == 1.0


def test_attribute_and_subclass_changes_are_seen():
    class Tagged(refx.Ref):
        pass

    r = Tagged(1.0, "p")
    d1 = refx.deref([r])
    r.tag = "x"  # an instance attribute: part of the Value's kind
    d2 = refx.deref([r])
    assert d1[0] is not d2[0]
    assert refx.reref(d2)[0].tag == "x"
    r.tag = "y"
    assert refx.reref(refx.deref([r]))[0].tag == "y"
    del r.tag
    assert not hasattr(refx.reref(refx.deref([r]))[0], "tag")


def test_metadata_refs_reuse_and_keep_their_metadata():
    r = refx.Ref(jnp.ones(2), "p", sharding=("x",))
    d1, d2 = refx.deref([r]), refx.deref([r])
    assert d1[0] is d2[0]
    assert refx.reref(d2)[0].metadata == {"sharding": ("x",)}


@pytest.mark.parametrize("how", ["setter", "update_refs", "jit"])
def test_a_written_ref_does_not_keep_its_old_value_alive(how):
    old = Box(0)
    r = refx.Ref(old, "p")
    refx.deref([r])  # the Ref now keeps a Value holding `old`
    gone = weakref.ref(old)
    del old
    if how == "setter":
        r.value = Box(1)
    elif how == "update_refs":
        refx.update_refs([r], [Box(1)])
    else:  # jax arrays take no weakref: count the array's holders
        arr = jnp.zeros(())
        r.value = arr
        held = sys.getrefcount(arr)  # this frame and the Ref
        refx.deref([r])
        assert sys.getrefcount(arr) == held + 1  # and the kept Value
        refx.jit(lambda t: setattr(t[0], "value", t[0].value + 1))([r])
        assert sys.getrefcount(arr) == held - 1  # only this frame
    gc.collect()
    assert gone() is None


def test_a_dead_ref_frees_its_kept_value():
    v = Box(0)
    r = refx.Ref(v, "p")
    refx.deref([r])
    gone = weakref.ref(v)
    del v, r
    assert gone() is None


def test_a_cycle_through_the_kept_value_is_collected():
    r = refx.Ref(None, "p")
    r.value = [r]  # the value leads back to its Ref
    refx.deref([r])
    gone = weakref.ref(r)
    del r
    gc.collect()
    assert gone() is None


def test_a_derefed_model_is_still_donated():
    w = refx.Ref(jnp.full(4, 1.0), "p")
    refx.deref({"w": w})  # result dropped: only the kept Value holds more

    @refx.jit(donate_argnums=0)
    def f(m):
        m["w"].value = m["w"].value + 1

    ptr = w.value.unsafe_buffer_pointer()
    old = w.value
    del old  # (a variable would keep it undonated)
    f({"w": w})
    assert w.value.unsafe_buffer_pointer() == ptr  # the buffer was reused
    np.testing.assert_array_equal(w.value, 2.0)


def test_a_kept_derefed_tree_still_blocks_donation():
    w = refx.Ref(jnp.full(4, 1.0), "p")
    kept = refx.deref({"w": w})  # alive: its Value holds the array

    @refx.jit(donate_argnums=0)
    def f(m):
        m["w"].value = m["w"].value + 1

    f({"w": w})
    assert not kept["w"].value.is_deleted()
    np.testing.assert_array_equal(kept["w"].value, 1.0)
    np.testing.assert_array_equal(w.value, 2.0)


def test_threads_derefing_and_writing_see_whole_moments():
    refs = [refx.Ref(0, "p") for _ in range(50)]
    stop = threading.Event()
    bad = []

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            refx.update_refs(refs, [n] * len(refs))

    def reader():
        for _ in range(2000):
            vs = values(refs)
            if len(set(vs)) != 1:
                bad.append(vs)

    t = threading.Thread(target=writer)
    t.start()
    try:
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for x in readers:
            x.start()
        for x in readers:
            x.join()
    finally:
        stop.set()
        t.join()
    assert not bad


def test_reref_refused_late_makes_no_ref_that_survives():
    arr = jnp.ones(3)
    before = sys.getrefcount(arr)
    for _ in range(100):
        with pytest.raises(ValueError, match="Index"):
            refx.reref([refx.Value(arr, 0), refx.Value(arr, 1), refx.Index(7)])
    gc.collect()
    assert sys.getrefcount(arr) == before


def test_reref_of_many_values_roundtrips():
    refs = [refx.Ref(jnp.full(2, float(i)), "p" if i % 2 else "q") for i in range(2000)]
    tree = {"a": refs, "b": refs[::7]}
    back = refx.reref(refx.deref(tree))
    assert refx.deref(back) == refx.deref(tree)
    assert back["b"][1] is back["a"][7]


# ------------------------------------------------------------------ property

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle import make_oracle  # noqa: E402

ORACLE = make_oracle(refx.Ref, refx.Value, refx.Index, refx.NOTHING, refx.Partition)

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5), st.integers(-3, 3)),
    st.tuples(st.just("deref"), st.lists(st.integers(0, 5), max_size=8)),
    st.tuples(st.just("tag"), st.integers(0, 5), st.integers(0, 2)),
), max_size=30)


class Tagged(refx.Ref):
    pass


@settings(max_examples=200, deadline=None)
@given(ops)
def test_any_sequence_of_writes_and_derefs_matches_the_oracle(seq):
    # the oracle makes fresh Values every time; the C deref may reuse them:
    # both must give equal trees after any history of writes, attribute
    # changes and orders
    refs = [Tagged(i, "p") if i % 2 else refx.Ref(i, "q") for i in range(6)]
    for op in seq:
        if op[0] == "write":
            refs[op[1]].value = op[2]
        elif op[0] == "tag":
            if isinstance(refs[op[1]], Tagged):
                refs[op[1]].tag = op[2]
        else:
            tree = [refs[i] for i in op[1]]
            got = refx.deref(tree)
            # fresh Refs (clone) have no kept Value: their deref is fresh
            assert got == refx.deref(refx.clone(tree))
            if not any(isinstance(r, Tagged) for r in tree):
                assert got == ORACLE.deref(tree)  # (the oracle knows no kinds)
            back = refx.reref(got)
            assert [r.value for r in back] == [refs[i].value for i in op[1]]
            assert [getattr(r, "tag", None) for r in back] == [getattr(refs[i], "tag", None) for i in op[1]]
