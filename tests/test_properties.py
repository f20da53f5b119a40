"""Property tests: the C core against the pure-Python oracle (tests/oracle.py)
on random nested trees of dicts/lists/tuples/None/namedtuples with shared
Refs."""

import collections

import jax
from hypothesis import given, settings
from hypothesis import strategies as st

import refx
from oracle import make_oracle

ORACLE = make_oracle(refx.Ref, refx.Value, refx.Index, refx.NOTHING, refx.Partition)
NT = collections.namedtuple("NT", "x y")
COLLECTIONS = [None, "params", "stats"]


@st.composite
def trees(draw):
    pool = [
        refx.Ref(draw(st.integers(-5, 5)), draw(st.sampled_from(COLLECTIONS)))
        for _ in range(draw(st.integers(0, 5)))
    ]
    leaves = st.integers(-3, 3) | st.none()
    if pool:
        leaves = leaves | st.sampled_from(pool) | st.sampled_from(pool)

    def extend(children):
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=4),
            st.tuples(children, children).map(lambda t: NT(*t)),
        )

    return draw(st.recursive(leaves, extend, max_leaves=24))


FILTERS = st.sampled_from(
    ["params", "stats", refx.Ref, int, (refx.Ref, int), ..., False,
     refx.Not("params"), refx.All(refx.Ref, refx.Not("stats")), refx.Any("stats", int),
     lambda x: isinstance(x, int) and x > 0]
)


def is_refx_leaf(x):
    return isinstance(x, (refx.Ref, refx.Deref))


def flat(tree):
    return jax.tree_util.tree_flatten(tree, is_leaf=is_refx_leaf)


def same_tree(a, b):
    """Same structure; Refs identical; other leaves equal."""
    la, ta = flat(a)
    lb, tb = flat(b)
    assert ta == tb
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, refx.Ref) or isinstance(y, refx.Ref):
            assert x is y
        else:
            assert type(x) is type(y) and x == y


def sharing_pattern(tree):
    """For each leaf: the position of the first leaf that is the same Ref."""
    leaves, _ = flat(tree)
    first = {}
    return [first.setdefault(id(x), i) if isinstance(x, refx.Ref) else None
            for i, x in enumerate(leaves)]


@settings(max_examples=300, deadline=None)
@given(trees())
def test_deref_matches_oracle(tree):
    same_tree(refx.deref(tree), ORACLE.deref(tree))


@settings(max_examples=300, deadline=None)
@given(trees())
def test_reref_inverts_deref(tree):
    d = refx.deref(tree)
    r = refx.reref(d)
    assert sharing_pattern(r) == sharing_pattern(tree)
    lt, tt = flat(tree)
    lr, tr = flat(r)
    assert tt == tr
    for a, b in zip(lt, lr, strict=True):
        if isinstance(a, refx.Ref):
            assert b is not a and b.value is a.value and b.collection == a.collection
        else:
            assert b is a
    same_tree(refx.deref(r), d)
    c = refx.clone(tree)
    assert sharing_pattern(c) == sharing_pattern(tree)
    same_tree(refx.deref(c), d)


@settings(max_examples=300, deadline=None)
@given(trees(), st.lists(FILTERS, max_size=3), st.booleans())
def test_partition_matches_oracle_and_merges_back(tree, filters, derefed):
    if derefed:
        tree = refx.deref(tree)
    parts, td = refx.tree_partition(tree, *filters)
    oparts, otd = ORACLE.tree_partition(tree, *filters)
    assert td == otd
    assert len(parts) == len(filters) + 1
    for p, q in zip(parts, oparts, strict=True):
        assert type(p) is refx.Partition
        assert list(p) == list(q)
        for k in p:
            assert p[k] is q[k] or (not is_refx_leaf(p[k]) and p[k] == q[k])
    merged = refx.merge_partitions(parts, td)
    same_tree(merged, tree)
    same_tree(merged, ORACLE.merge_partitions(oparts, otd))
    # the non-NOTHING entries of partition k are the leaves filter k accepts
    leaves, _ = jax.tree_util.tree_flatten(tree, is_leaf=is_refx_leaf)
    preds = [ORACLE.to_predicate(f) for f in filters]
    for leaf, *entries in zip(leaves, *(p.values() for p in parts), strict=True):
        k = next((i for i, pred in enumerate(preds) if pred(leaf)), len(preds))
        assert [e is not refx.NOTHING for e in entries] == [i == k for i in range(len(parts))]
    if filters:
        g = refx.get_partition(tree, filters[0])
        assert list(g.items()) == list(parts[0].items())


@settings(max_examples=200, deadline=None)
@given(trees(), st.integers(1, 5))
def test_update_refs_matches_oracle(tree, k):
    new = jax.tree_util.tree_map(lambda v: v * k + 1, refx.deref(tree))
    mine, theirs = refx.clone(tree), refx.clone(tree)
    refx.update_refs(mine, new)
    ORACLE.update_refs(theirs, new)
    assert [r.value if isinstance(r, refx.Ref) else r for r in flat(mine)[0]] == [
        r.value if isinstance(r, refx.Ref) else r for r in flat(theirs)[0]]
    # and by partition, seed style
    mine2 = refx.clone(tree)
    (params, _), _ = refx.tree_partition(new, "params")
    refx.update_refs(refx.get_partition(mine2, "params"), params)
    for a, b, orig in zip(flat(mine2)[0], flat(mine)[0], flat(tree)[0], strict=True):
        if isinstance(a, refx.Ref):
            # params got the new values; every other Ref kept its own
            assert a.value == (b.value if a.collection == "params" else orig.value)
