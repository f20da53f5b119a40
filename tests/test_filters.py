"""Filters: callables, the C-evaluated shorthands and Not/All/Any."""

import jax
import jax.numpy as jnp
import pytest

import refx

P = refx.Ref(1, "params")
S = refx.Ref(2, "stats")
V = refx.Value(1, 0, "params")
I = refx.Index(0, "params")  # noqa: E741
LEAVES = [P, S, V, I, 3, "params", refx.NOTHING, jnp.ones(1)]


def matches(f):
    """The leaves f accepts, as evaluated by the C filter machinery."""
    got = [leaf for leaf in LEAVES if refx.Any(f)(leaf)]
    # tree_partition agrees: each leaf lands in partition 0 iff accepted
    (first, _), _ = refx.tree_partition(LEAVES, f)
    assert [leaf for leaf, v in zip(LEAVES, first.values(), strict=True) if v is not refx.NOTHING] == [
        leaf for leaf in got if leaf is not refx.NOTHING]
    return got


def test_str_matches_collection_of_ref_value_index():
    assert matches("params") == [P, V, I]
    assert matches("stats") == [S]
    assert matches("nope") == []


def test_type_is_isinstance():
    # a Ref class also matches the Values/Indexes deref'ed from its Refs
    assert matches(refx.Ref) == [P, S, V, I]
    assert matches(refx.Deref) == [V, I]
    assert matches(int) == [3]


def test_tuple_is_any():
    assert matches(("stats", int)) == [S, 3]
    assert matches(()) == []


def test_constants():
    assert matches(...) == LEAVES
    assert matches(True) == LEAVES
    assert matches(False) == []


def test_callable():
    assert matches(lambda x: x is S) == [S]


def test_not_all_any():
    assert matches(refx.Not("params")) == [S, 3, "params", refx.NOTHING, LEAVES[-1]]
    assert matches(refx.All(refx.Ref, "params")) == [P, V, I]
    assert matches(refx.Any(refx.Index, "stats")) == [S, I]
    assert matches(refx.All()) == LEAVES
    assert matches(refx.Any()) == []
    assert matches(refx.Not(refx.Not(refx.Any(refx.All("params"))))) == [P, V, I]


def test_filter_objects_are_callable_and_compare():
    assert refx.Not("params")(S) is True
    assert refx.All(refx.Ref, "params")(P) is True
    assert refx.Not("a") == refx.Not("a") and refx.Not("a") != refx.Not("b")
    assert hash(refx.Any("a", int)) == hash(refx.Any("a", int))
    assert repr(refx.Not("a")) == "Not('a')"
    assert repr(refx.All("a", int)) == "All('a', <class 'int'>)"
    assert repr(refx.Any()) == "Any()"
    assert refx.All("a", int).filters == ("a", int)


def test_bad_filters_are_type_errors():
    with pytest.raises(TypeError, match=r"tree_partition: filter 1 is 5 \(int\); expected a callable, a collection name \(str\), a type"):
        refx.tree_partition({}, "a", 5)
    with pytest.raises(TypeError, match=r"get_partition: filter 0 is None"):
        refx.get_partition({}, None)
    with pytest.raises(TypeError, match=r"tree_partition: filter 0 is 1.5"):
        refx.tree_partition({}, ("a", (1.5,)))
    with pytest.raises(TypeError, match=r"Not: filter 0 is 3"):
        refx.Not(3)
    with pytest.raises(TypeError, match=r"Not\(\) takes exactly one filter \(2 given\)"):
        refx.Not("a", "b")
    with pytest.raises(TypeError, match=r"All: filter 1 is 3"):
        refx.All("a", 3)


def test_filter_exceptions_pass_through():
    class Boom(Exception):
        pass

    def bad(x):
        raise Boom("filter failed")

    with pytest.raises(Boom, match="filter failed"):
        refx.tree_partition([P, S], "params", bad)
    with pytest.raises(Boom):
        refx.Not(bad)(1)


def test_collection_eq_exception_passes_through():
    class Weird:
        def __hash__(self):
            return 1

        def __eq__(self, other):
            raise RuntimeError("eq")

    r = refx.Ref(1, Weird())
    with pytest.raises(RuntimeError, match="eq"):
        refx.get_partition([r], "params")


# --- path filters (issue 14) -------------------------------------------------


def path_model():
    return {
        "enc": {"w": refx.Ref(1.0, "params"), "b": refx.Ref(2.0, "params")},
        "dec": {"w": refx.Ref(3.0, "params")},
        "blocks": [{"linear": {"w": refx.Ref(4.0, "params")}},
                   {"linear": {"w": refx.Ref(5.0, "params")}}],
    }


def present(p):
    return [k for k, v in p.items() if v is not refx.NOTHING]


def test_path_contains_matches_a_run_of_path_parts():
    t = path_model()
    assert present(refx.get_partition(t, refx.PathContains("enc"))) == [("enc", "b"), ("enc", "w")]
    assert present(refx.get_partition(t, refx.PathContains("blocks", "0"))) == [("blocks", "0", "linear", "w")]
    assert present(refx.get_partition(t, refx.PathContains("linear", "w"))) == [
        ("blocks", "0", "linear", "w"), ("blocks", "1", "linear", "w")]
    assert present(refx.get_partition(t, refx.PathContains("0", "blocks"))) == []  # in order
    # combined with other filters, and on a deref'ed tree
    p = refx.get_partition(refx.deref(t), refx.All("params", refx.Not(refx.PathContains("w"))))
    assert present(p) == [("enc", "b")]
    (enc, rest), td = refx.tree_partition(t, refx.Any(refx.PathContains("enc"), refx.PathContains("dec")))
    assert len(present(enc)) == 3 and refx.merge_partitions((enc, rest), td) == t


def test_path_filter_takes_path_and_leaf():
    t = path_model()
    f = refx.PathFilter(lambda path, leaf: path[-1] == "w" and leaf.value > 2)
    assert present(refx.get_partition(t, f)) == [("blocks", "0", "linear", "w"),
                                                 ("blocks", "1", "linear", "w"), ("dec", "w")]


def test_path_filters_can_be_called_with_a_path_and_refuse_a_bare_leaf():
    f = refx.PathContains("enc")
    assert f(("enc", "w"), 1) is True and f(("dec", "w"), 1) is False
    assert refx.Not(f)(("dec",), 1) is True
    with pytest.raises(TypeError, match="PathContains is a path filter: it needs the leaf's path"):
        f(1)
    with pytest.raises(TypeError, match="PathFilter is a path filter"):
        refx.All(refx.PathFilter(lambda p, x: True))(1)
    with pytest.raises(TypeError, match="path parts are str"):
        refx.PathContains(0)
    with pytest.raises(TypeError, match=r"PathFilter\(fn\) takes one callable"):
        refx.PathFilter(1)
    assert refx.PathContains("a", "b") == refx.PathContains("a", "b")
    assert repr(refx.PathContains("a", "b")) == "PathContains('a', 'b')"


def test_keypath_to_path_is_the_partition_key():
    t = path_model()
    pairs, _ = jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(x, refx.Ref))
    (p,), _ = refx.tree_partition(t)
    assert [refx.keypath_to_path(kp) for kp, _ in pairs] == list(p)
    with pytest.raises(TypeError):
        refx.keypath_to_path(5)
