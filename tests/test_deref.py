"""deref, reref and clone: round trips over every kind of pytree node,
sharing, pass-through of other leaves, the node types Value/Index/NOTHING,
jit caching, and every error path."""

import collections
import dataclasses
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx

NT = collections.namedtuple("NT", "x y")


@dataclasses.dataclass
class DC:
    a: object
    b: object


jax.tree_util.register_dataclass(DC, data_fields=["a", "b"], meta_fields=[])


class Custom:
    def __init__(self, children, tag):
        self.children, self.tag = children, tag


jax.tree_util.register_pytree_node(
    Custom, lambda c: (c.children, c.tag), lambda tag, ch: Custom(list(ch), tag)
)


def make_tree():
    w = refx.Ref(jnp.ones(3), "params")
    b = refx.Ref(jnp.zeros(3), "params")
    s = refx.Ref(0, "state")
    tree = {
        "list": [w, b, 1.5, None],
        "tuple": (w, 2.5, s),
        "nt": NT(x=b, y=np.arange(2)),
        "dc": DC(a=w, b=[s, s]),
        "custom": Custom([w, 7], tag="t"),
        "none": None,
    }
    return tree, (w, b, s)


def leaves(t):
    return jax.tree_util.tree_leaves(
        t, is_leaf=lambda x: isinstance(x, (refx.Ref, refx.Deref))
    )


def test_first_occurrence_is_value_later_are_index():
    a, b = refx.Ref(1, "x"), refx.Ref(2, "y")
    d = refx.deref([a, b, a, [b, a]])
    assert d == [
        refx.Value(1, 0, "x"),
        refx.Value(2, 1, "y"),
        refx.Index(0, "x"),
        [refx.Index(1, "y"), refx.Index(0, "x")],
    ]


def test_roundtrip_preserves_structure_and_sharing():
    tree, (w, b, s) = make_tree()
    d = refx.deref(tree)
    assert not any(isinstance(x, refx.Ref) for x in leaves(d))
    r = refx.reref(d)
    assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(tree)
    # sharing: every occurrence of w is the same new Ref
    assert r["list"][0] is r["tuple"][0] is r["dc"].a is r["custom"].children[0]
    assert r["list"][1] is r["nt"].x
    assert r["tuple"][2] is r["dc"].b[0] is r["dc"].b[1]
    assert r["list"][0] is not w  # new Refs
    assert r["list"][0].value is w.value  # same value object
    assert r["list"][0].collection == "params"
    # non-Ref leaves pass through
    assert r["list"][2] == 1.5 and r["tuple"][1] == 2.5
    assert r["nt"].y is tree["nt"].y
    assert r["custom"].tag == "t" and r["custom"].children[1] == 7


def test_values_are_not_copied():
    a = jnp.ones(4)
    assert jax.tree_util.tree_leaves(refx.deref([refx.Ref(a)]))[0] is a
    n = np.ones(4)
    assert refx.reref(refx.deref([refx.Ref(n)]))[0].value is n


def test_ref_holding_a_pytree_value():
    r = refx.Ref({"m": jnp.ones(2), "v": (1, 2)})
    d = refx.deref([r, r])
    assert jax.tree_util.tree_leaves(d) == jax.tree_util.tree_leaves(r.value)
    out = refx.reref(d)
    assert out[0] is out[1] and out[0].value is r.value


def test_empty_and_leafless_trees():
    assert refx.deref([]) == []
    assert refx.deref(None) is None
    assert refx.reref({}) == {}
    assert refx.deref(5) == 5
    r = refx.Ref(1)
    assert refx.deref(r) == refx.Value(1, 0, None)
    assert refx.reref(refx.Value(1, 0, None)).value == 1


def test_nothing_passes_through():
    r = refx.Ref(1)
    d = refx.deref({"a": r, "b": refx.NOTHING})
    assert d["b"] is refx.NOTHING
    assert refx.reref(d)["b"] is refx.NOTHING


def test_deref_output_through_jit_and_back():
    tree, (w, b, s) = make_tree()
    d = refx.deref(tree)

    @jax.jit
    def f(d):
        t = refx.reref(d)
        t["list"][0].value = t["list"][0].value * 2
        t["tuple"][2].value = t["tuple"][2].value + 1
        return refx.deref(t)

    out = refx.reref(f(d))
    assert jnp.array_equal(out["dc"].a.value, 2 * jnp.ones(3))
    assert out["dc"].b[1].value == 1
    assert out["list"][0] is out["custom"].children[0]


def test_jit_traces_once_for_same_shaped_trees():
    traces = []

    @jax.jit
    def f(d):
        traces.append(1)
        t = refx.reref(d)
        t["a"].value = t["a"].value + 1
        return refx.deref(t)

    for i in range(3):
        r = refx.Ref(jnp.full(3, float(i)), "params")
        out = f(refx.deref({"a": r, "b": r, "c": [r]}))
    assert len(traces) == 1
    assert refx.reref(out)["c"][0].value[0] == 3.0


def test_treedef_is_stable():
    def td(i):
        r = refx.Ref(jnp.ones(2) * i, "c")
        return jax.tree_util.tree_structure(refx.deref([r, r, refx.Ref(i)]))

    assert td(1) == td(2)
    assert hash(td(1)) == hash(td(2))


def test_value_node():
    v = refx.Value(jnp.ones(2), 3, "c")
    assert v.index == 3 and v.collection == "c"
    children, aux = jax.tree_util.tree_flatten(v)
    assert len(children) == 1 and children[0] is v.value
    assert aux.node_data()[1] == (3, "c")
    v2 = jax.tree_util.tree_map(lambda x: x + 1, v)
    assert isinstance(v2, refx.Value) and v2.index == 3 and v2.collection == "c"
    assert jnp.array_equal(v2.value, 2 * jnp.ones(2))
    assert repr(refx.Value(1, 0, "c")) == "Value(1, index=0, collection='c')"
    with pytest.raises(AttributeError):
        v.value = 2
    with pytest.raises(AttributeError):
        v.index = 2


def test_index_node():
    i = refx.Index(2, "c")
    assert jax.tree_util.tree_leaves(i) == []
    assert jax.tree_util.tree_structure(i).node_data()[1] == (2, "c")
    assert i == refx.Index(2, "c") and i != refx.Index(2, "d") and i != refx.Index(1, "c")
    assert hash(i) == hash(refx.Index(2, "c"))
    assert repr(i) == "Index(2, collection='c')"
    assert jax.tree_util.tree_map(lambda x: x, [i]) == [i]


def test_deref_is_the_common_base():
    assert issubclass(refx.Value, refx.Deref) and issubclass(refx.Index, refx.Deref)
    with pytest.raises(TypeError):
        refx.Deref()


def test_value_index_constructor_errors():
    with pytest.raises(TypeError, match="Value: index must be an int, not str"):
        refx.Value(1, "0")
    with pytest.raises(ValueError, match="Index: index must be >= 0, got -1"):
        refx.Index(-1)
    with pytest.raises(TypeError, match="Index: collection must be hashable"):
        refx.Index(0, {})
    with pytest.raises(TypeError, match="Value: index must be an int, not bool"):
        refx.Value(1, True)


def test_nothing():
    assert jax.tree_util.tree_leaves(refx.NOTHING) == []
    assert jax.tree_util.tree_leaves([refx.NOTHING, 1]) == [1]
    assert repr(refx.NOTHING) == "NOTHING"
    assert pickle.loads(pickle.dumps(refx.NOTHING)) is refx.NOTHING
    with pytest.raises(TypeError):
        type(refx.NOTHING)()


def test_pickle_value_and_index():
    v = refx.Value([1], 2, "c")
    assert pickle.loads(pickle.dumps(v)) == v
    i = refx.Index(2, "c")
    assert pickle.loads(pickle.dumps(i)) == i


def test_clone():
    tree, (w, b, s) = make_tree()
    c = refx.clone(tree)
    assert c["list"][0] is not w and c["list"][0].value is w.value
    assert c["list"][0] is c["tuple"][0] is c["dc"].a
    orig = w.value
    c["list"][0].value = 5
    assert w.value is orig  # the original is untouched
    assert c["dc"].a.value == 5


# --- errors ---------------------------------------------------------------


def test_deref_of_derefed_tree():
    d = refx.deref({"a": [refx.Ref(1), refx.Ref(2)]})
    with pytest.raises(
        ValueError,
        match=r"deref: Value found at \('a', '0'\); expected a tree of Refs \(was it already deref'ed\?\)",
    ):
        refx.deref(d)
    with pytest.raises(ValueError, match=r"deref: Index found at \('b', '1'\)"):
        refx.deref({"a": 1, "b": [refx.Ref(1), refx.Index(0)]})
    with pytest.raises(ValueError, match=r"clone: Value found at \('a', '1'\)"):
        refx.clone({"a": [refx.Ref(1), refx.Value(1, 0)]})


def test_reref_of_ref_tree():
    r = refx.Ref(1)
    with pytest.raises(
        ValueError,
        match=r"reref: Ref found at \('x', 'y'\); expected a deref'ed tree of Values and Indexes",
    ):
        refx.reref({"x": {"y": r}})


def test_reref_index_before_value():
    with pytest.raises(
        ValueError,
        match=r"reref: Index\(0\) at \('a',\) comes before any Value with index 0",
    ):
        refx.reref({"a": refx.Index(0), "b": refx.Value(1, 0)})


def test_reref_index_out_of_order():
    with pytest.raises(
        ValueError,
        match=r"reref: Value at \('1',\) has index 5, expected 1; Values must be numbered",
    ):
        refx.reref([refx.Value(1, 0), refx.Value(2, 5)])


def test_reref_collection_mismatch():
    with pytest.raises(
        ValueError,
        match=r"reref: Index\(0\) at \('1',\) has collection 'b' but its Value has collection 'a'",
    ):
        refx.reref([refx.Value(1, 0, "a"), refx.Index(0, "b")])


def test_user_exception_passes_through():
    class Boom(Exception):
        pass

    class Bad:
        pass

    def flat(x):
        raise Boom("from flatten")

    jax.tree_util.register_pytree_node(Bad, flat, lambda a, c: Bad())
    with pytest.raises(Boom, match="from flatten"):
        refx.deref([refx.Ref(1), Bad()])
    with pytest.raises(Boom, match="from flatten"):
        refx.reref([Bad()])


@pytest.mark.skipif(sys.version_info >= (3, 12),
                    reason="CPython >= 3.12 never runs the GC (or its callbacks) inside a C call")
def test_a_nested_call_from_a_gc_callback_does_not_disturb_the_numbering():
    # deref/clone number Refs by stamping them.  A nested deref run from a
    # GC callback while the outer call allocates re-stamps the shared Refs;
    # the stamps are only read in pass 1, which allocates no Python object
    # and so cannot run the GC (it used to be one loop, redone with a map).
    import gc

    shared = [refx.Ref(i, "c") for i in range(40)]
    tree = {"a": shared, "b": shared[::-1]}
    expected_deref = refx.deref(tree)
    busy = []

    def nested(phase, info):
        if phase == "start" and not busy:
            busy.append(1)
            ran.append(1)
            try:
                refx.deref(tree)
                refx.clone(tree)
            finally:
                busy.pop()

    ran = []
    threshold = gc.get_threshold()
    gc.callbacks.append(nested)
    gc.set_threshold(1)
    try:
        outs = [refx.deref(tree) for _ in range(5)]
        clones = [refx.clone(tree) for _ in range(5)]
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(nested)
    assert ran  # the nested calls did run mid-call
    for out in outs:
        assert out == expected_deref
    for c in clones:
        assert [r.value for r in c["a"]] == list(range(40))
        assert all(x is y for x, y in zip(c["a"], c["b"][::-1], strict=True))


def headroom():
    """How many more Python frames this thread can push before RecursionError."""
    depth = 0

    def down(k):
        nonlocal depth
        depth = k
        down(k + 1)

    try:
        down(1)
    except RecursionError:
        pass
    return depth


# Beyond every interpreter's limit: 3.11/3.12 stop at the recursion limit
# (1,000), 3.13 counts C recursion separately (10,000 levels).
@pytest.mark.parametrize("depth", [20000, 50000])
def test_too_deep_tree_is_recursion_error(depth):
    t = refx.Ref(1)
    for _ in range(depth):
        t = [t]
    before = headroom()
    for f in (refx.deref, refx.reref, refx.clone, refx.tree_partition,
              lambda t: refx.update_refs(t, t),
              lambda t: refx.get_partition(t, ..., is_leaf=lambda x: False)):
        for _ in range(3):
            with pytest.raises(RecursionError, match="maximum recursion depth exceeded"):
                f(t)
        # jaxlib loses recursion budget on such errors; refx gives it back
        assert headroom() == before


def test_errors_inside_trees_do_not_leak_recursion_budget():
    class Boom(Exception):
        pass

    class Bad:
        pass

    def flat(x):
        raise Boom("no")

    jax.tree_util.register_pytree_node(Bad, flat, lambda a, c: Bad())
    deep = Bad()
    for _ in range(200):
        deep = [deep]
    def bad_is_leaf(x):
        if x == 7:
            raise Boom("is_leaf")
        return False

    deep7 = 7
    for _ in range(200):
        deep7 = [deep7]
    before = headroom()
    # 20 x 200 levels would exhaust a 1000-level budget if any leaked
    for _ in range(20):
        for f in (refx.deref, refx.reref, refx.clone, refx.tree_partition,
                  lambda t: refx.update_refs(t, t)):
            with pytest.raises(Boom):
                f(deep)
        with pytest.raises(Boom):
            refx.tree_partition(deep7, is_leaf=bad_is_leaf)
    assert headroom() == before


def test_value_key_path_reads_value():
    d = refx.deref({"a": [refx.Ref(1)]})
    (kp, leaf), = jax.tree_util.tree_flatten_with_path(d)[0]
    assert jax.tree_util.keystr(kp) == "['a'][0].value" and leaf == 1


# --- reref/clone check tracers like Ref() does (issue 10, defect 12) ----------


def _escaped_tree():
    """A deref'ed tree whose values are tracers of a finished jit trace."""
    leaked = {}

    @jax.jit
    def f(x):
        tree = refx.reref(refx.deref({"w": refx.Ref(x, "params")}))
        leaked["d"] = refx.deref(tree)
        leaked["tree"] = tree
        return x

    f(jnp.ones(2))
    return leaked


def test_reref_refuses_tracers_of_a_finished_trace():
    leaked = _escaped_tree()
    with pytest.raises(ValueError, match=r"reref: at \('w',\): Cannot set a Ref to a value holding a tracer of another trace"):
        refx.reref(leaked["d"])


def test_clone_refuses_tracers_of_a_finished_trace():
    leaked = _escaped_tree()
    with pytest.raises(ValueError, match=r"clone: at \('w',\): Cannot set a Ref to a value holding a tracer of another trace"):
        refx.clone(leaked["tree"])


def test_reref_inside_jit_accepts_its_own_tracers_and_enclosing_ones():
    @jax.jit
    def f(x):
        d = refx.deref({"a": refx.Ref(x), "b": refx.Ref(2.0)})
        inner = jax.grad(lambda y: refx.reref({"a": refx.Value(y, 0), "b": refx.Value(x, 1)})["a"].value)
        return refx.reref(d)["a"].value + inner(x)

    assert f(jnp.float32(1.0)) == 2.0
