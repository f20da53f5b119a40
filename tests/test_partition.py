"""tree_partition, get_partition, merge_partitions and the Partition type."""

import collections
import dataclasses
import pickle

import jax
import jax.numpy as jnp
import pytest

import refx

NOTHING = refx.NOTHING
NT = collections.namedtuple("NT", "x y")


@dataclasses.dataclass
class DC:
    w: object
    b: object


jax.tree_util.register_dataclass(DC, data_fields=["w", "b"], meta_fields=[])


class Custom:
    def __init__(self, children):
        self.children = children


jax.tree_util.register_pytree_node(
    Custom, lambda c: (c.children, None), lambda _, ch: Custom(list(ch))
)


def model():
    w = refx.Ref(jnp.ones(2), "params")
    b = refx.Ref(jnp.zeros(2), "params")
    m = refx.Ref(jnp.zeros(2), "batch_stats")
    tree = {"layers": [{"w": w, "b": b, "m": m}, {"w": w, "b": refx.Ref(jnp.ones(2), "params")}],
            "head": w, "step": 3}
    return tree, w, b, m


# --- paths -----------------------------------------------------------------


def test_paths_of_every_key_kind():
    r = refx.Ref(0)
    tree = {"d": {"k": r, "3": r}, "l": [r, (r,)], "nt": NT(x=r, y=r), "dc": DC(w=r, b=r),
            "c": Custom([r, r]), "n": None}
    (p,), _ = refx.tree_partition(tree)
    assert list(p) == [
        ("c", "0"), ("c", "1"),
        ("d", "3"), ("d", "k"),
        ("dc", "w"), ("dc", "b"),
        ("l", "0"), ("l", "1", "0"),
        ("nt", "x"), ("nt", "y"),
    ]
    assert all(type(s) is str for path in p for s in path)


def test_partition_is_in_leaf_order():
    tree, *_ = model()
    (p,), _ = refx.tree_partition(tree)
    assert list(p.values()) == jax.tree_util.tree_leaves(tree)


class Twins:
    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    Twins,
    lambda t: (((jax.tree_util.GetAttrKey("x"), t.a), (jax.tree_util.GetAttrKey("x"), t.b)), None),
    lambda _, ch: Twins(*ch),
)


def test_duplicate_paths_are_an_error():
    with pytest.raises(ValueError, match=r"tree_partition: leaves 0 and 1 both map to path \('t', 'x'\); paths must be unique"):
        refx.tree_partition({"t": Twins(refx.Ref(0), refx.Ref(1))})
    # Partition keys are spliced into paths, so they can collide too
    collide = refx.Partition({("a", "b"): 1, ("a",): {"b": 2}})
    with pytest.raises(ValueError, match=r"get_partition: leaves 0 and 1 both map to path \('a', 'b'\)"):
        refx.get_partition(collide, ...)


def test_partition_of_a_partition_keeps_its_paths():
    tree, w, b, m = model()
    params, rest = refx.tree_partition(tree, "params")[0]
    (p2, r2), td2 = refx.tree_partition(params, refx.Ref)
    # a Partition's NOTHING entries are absences, not leaves: the
    # sub-partition holds its present paths, with their own names
    present = [k for k, v in params.items() if v is not NOTHING]
    assert list(p2) == present
    assert all(p2[k] is params[k] for k in present)
    assert all(v is NOTHING for v in r2.values())
    # and merging rebuilds the Partition, NOTHINGs included
    back = refx.merge_partitions((p2, r2), td2)
    assert type(back) is refx.Partition and back == params


def test_nothing_outside_a_partition_is_a_leaf():
    (p, rest), td = refx.tree_partition([1, NOTHING], lambda x: x is NOTHING)
    assert p == {("0",): NOTHING, ("1",): NOTHING} and rest[("0",)] == 1
    with pytest.raises(ValueError, match=r"merge_partitions: no value at path \('1',\)"):
        refx.merge_partitions((p, rest), td)


# --- tree_partition --------------------------------------------------------


def test_filters_give_n_plus_one_partitions_first_match_wins():
    tree, w, b, m = model()
    (params, stats, rest), td = refx.tree_partition(
        tree, "params", lambda x: isinstance(x, refx.Ref))
    assert params[("layers", "0", "w")] is w
    assert params[("head",)] is w
    assert stats[("layers", "0", "m")] is m
    assert stats[("layers", "0", "w")] is NOTHING  # went to the first filter
    assert rest[("step",)] == 3
    for path in params:
        assert sum(p[path] is not NOTHING for p in (params, stats, rest)) == 1


def test_zero_filters():
    tree, *_ = model()
    (only,), td = refx.tree_partition(tree)
    assert NOTHING not in only.values()
    assert refx.merge_partitions((only,), td) == tree


def test_merge_roundtrip_keeps_ref_objects():
    tree, w, b, m = model()
    parts, td = refx.tree_partition(tree, "params", "batch_stats")
    out = refx.merge_partitions(parts, td)
    assert out["layers"][0]["w"] is w and out["head"] is w and out["layers"][1]["w"] is w
    assert out["layers"][0]["m"] is m
    assert out == tree


def test_get_partition_is_the_first_partition():
    tree, *_ = model()
    for f in ("params", refx.Ref, lambda x: x == 3, ...):
        assert refx.get_partition(tree, f) == refx.tree_partition(tree, f)[0][0]


def test_partitioning_a_derefed_tree_by_collection():
    tree, w, b, m = model()
    (params, rest), td = refx.tree_partition(refx.deref(tree), "params")
    # leaf order: "head" sorts before "layers", so it holds the Value
    assert isinstance(params[("head",)], refx.Value)
    assert isinstance(params[("layers", "0", "w")], refx.Index)
    assert isinstance(params[("layers", "0", "b")], refx.Value)
    assert isinstance(rest[("layers", "0", "m")], refx.Value)
    assert rest[("step",)] == 3
    back = refx.reref(refx.merge_partitions((params, rest), td))
    assert back["head"] is back["layers"][0]["w"]


def test_is_leaf():
    tree = {"a": {"x": 1, "y": 2}, "b": refx.Ref(0)}
    (p, rest), _ = refx.tree_partition(tree, lambda x: isinstance(x, dict) and "x" in x,
                                       is_leaf=lambda x: isinstance(x, dict) and "x" in x)
    assert p == {("a",): {"x": 1, "y": 2}, ("b",): NOTHING}
    assert refx.get_partition(tree, dict, is_leaf=lambda x: x is tree["a"]) == p
    with pytest.raises(TypeError, match="is_leaf must be a callable or None, not int"):
        refx.tree_partition(tree, is_leaf=3)


def test_keyword_errors():
    with pytest.raises(TypeError, match="tree_partition\\(\\) got an unexpected keyword argument 'filters'"):
        refx.tree_partition({}, filters=[])
    with pytest.raises(TypeError, match="tree_partition\\(\\) missing required argument 'tree'"):
        refx.tree_partition()
    with pytest.raises(TypeError, match="get_partition\\(\\) takes 2 positional arguments"):
        refx.get_partition({})


def test_path_cache_reuses_path_objects():
    tree, *_ = model()
    (a,), _ = refx.tree_partition(tree)
    (b,), _ = refx.tree_partition(tree)
    assert all(x is y for x, y in zip(a, b, strict=True))


def test_unhashable_aux_data_still_works():
    class U:
        def __init__(self, ch):
            self.ch = ch

    jax.tree_util.register_pytree_node(U, lambda u: (u.ch, [1, 2]), lambda aux, ch: U(list(ch)))
    r = refx.Ref(1, "c")
    (p, rest), td = refx.tree_partition(U([r, 2]), "c")
    assert p == {("0",): r, ("1",): NOTHING}
    assert refx.merge_partitions((p, rest), td).ch == [r, 2]


# --- merge_partitions errors -----------------------------------------------


def test_merge_errors():
    tree, w, b, m = model()
    (p, r), td = refx.tree_partition(tree, "params")
    with pytest.raises(ValueError, match=r"merge_partitions: two values at path \('layers', '0', 'b'\) \(partitions 0 and 1\); each path must have exactly one non-NOTHING value"):
        refx.merge_partitions((p, {k: (b if k == ("layers", "0", "b") else v) for k, v in r.items()}), td)
    with pytest.raises(ValueError, match=r"merge_partitions: no value at path \('head',\) \(NOTHING in all 2 partitions\)"):
        refx.merge_partitions(({**p, ("head",): NOTHING}, r), td)
    short = dict(list(r.items())[:-1])
    with pytest.raises(ValueError, match=r"merge_partitions: partition 1 has 6 paths but partition 0 has 7; path \('step',\) is only in partition 0"):
        refx.merge_partitions((p, short), td)
    renamed = {("x",) if k == ("step",) else k: v for k, v in r.items()}
    with pytest.raises(ValueError, match=r"merge_partitions: path \('step',\) of the treedef is not in partition 1"):
        refx.merge_partitions((p, renamed), td)
    # a treedef the path cache no longer holds: its paths are computed from
    # the treedef itself (partition 0 used to give them, by position)
    from refx import _core

    _core._clear_path_cache()
    with pytest.raises(ValueError, match=r"merge_partitions: path \('step',\) of the treedef is not in partition 1"):
        refx.merge_partitions((p, renamed), td)
    other_td = jax.tree_util.tree_structure([1, 2])
    with pytest.raises(ValueError, match="merge_partitions: treedef has 2 leaves but the partitions have 7 paths"):
        refx.merge_partitions((p, r), other_td)
    with pytest.raises(TypeError, match="merge_partitions: treedef must be a PyTreeDef"):
        refx.merge_partitions((p, r), "td")
    with pytest.raises(TypeError, match="merge_partitions: partition 1 is a list; expected a dict"):
        refx.merge_partitions((p, []), td)
    with pytest.raises(TypeError, match="merge_partitions: partitions must be a tuple or list of dicts, not refx.Partition"):
        refx.merge_partitions(p, td)
    with pytest.raises(ValueError, match="merge_partitions: no partitions given"):
        refx.merge_partitions((), td)


def test_merge_accepts_reordered_and_plain_dicts():
    tree, *_ = model()
    (p, r), td = refx.tree_partition(tree, "params")
    reordered = dict(reversed(list(r.items())))
    assert refx.merge_partitions((dict(p), reordered), td) == tree
    # the treedef's paths give the leaf order, even when partition 0 is
    # reordered (it used to silently misplace leaves)
    out = refx.merge_partitions((dict(reversed(list(p.items()))), reordered), td)
    assert out == tree and out["layers"][0]["m"] is tree["layers"][0]["m"]


def test_merge_rejects_a_treedef_of_another_tree_with_as_many_leaves():
    tree, *_ = model()
    parts, td = refx.tree_partition(tree, "params")
    _, other_td = refx.tree_partition([1, 2, 3, 4, 5, 6, 7])
    assert other_td.num_leaves == td.num_leaves
    with pytest.raises(ValueError, match=r"merge_partitions: path \('0',\) of the treedef is not in partition 0 \(are the treedef and the partitions from different trees\?\)"):
        refx.merge_partitions(parts, other_td)


# --- the Partition type ----------------------------------------------------


def test_partition_is_immutable():
    (p,), _ = refx.tree_partition({"a": 1})
    for op in (lambda: p.__setitem__(("b",), 2), lambda: p.__delitem__(("a",)),
               lambda: p.update({}), p.clear, lambda: p.pop(("a",)), p.popitem,
               lambda: p.setdefault(("c",), 1)):
        with pytest.raises(TypeError, match="Partition is immutable"):
            op()
    with pytest.raises(TypeError, match="Partition is immutable"):
        p |= {("z",): 1}
    p.__init__({("q",): 1})  # a no-op, not a mutation
    assert p == {("a",): 1}


def test_partition_equals_dict_and_constructs():
    p = refx.Partition({("a",): 1})
    assert p == {("a",): 1} and isinstance(p, dict)
    assert refx.Partition([(("a",), 1)]) == p
    assert refx.Partition() == {}
    assert repr(p) == "Partition({('a',): 1})"
    assert (p | {("b",): 2}) == {("a",): 1, ("b",): 2}
    assert pickle.loads(pickle.dumps(p)) == p
    assert type(pickle.loads(pickle.dumps(p))) is refx.Partition


def test_partition_is_a_pytree_with_keys():
    p = refx.Partition({("a", "0"): jnp.ones(2), ("b",): NOTHING, ("c",): jnp.zeros(2)})
    leaves, td = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 2  # NOTHING gives no leaf
    q = jax.tree_util.tree_map(lambda x: x + 1, p)
    assert type(q) is refx.Partition and list(q) == list(p) and q[("b",)] is NOTHING
    kp = jax.tree_util.tree_flatten_with_path(p)[0]
    assert [k for k, _ in kp] == [(jax.tree_util.DictKey(("a", "0")),), (jax.tree_util.DictKey(("c",)),)]
    g = jax.grad(lambda p: sum(v.sum() for v in jax.tree_util.tree_leaves(p)))(p)
    assert type(g) is refx.Partition and g[("b",)] is NOTHING


def test_partition_treedef_is_stable_jit_key():
    traces = []

    @jax.jit
    def f(p):
        traces.append(1)
        return jax.tree_util.tree_map(lambda x: x * 2, p)

    for i in range(3):
        tree = {"w": refx.Ref(jnp.ones(2) * i, "params"), "s": refx.Ref(jnp.ones(1), "stats")}
        (p, r), _ = refx.tree_partition(refx.deref(tree), "params")
        f(p)
    assert len(traces) == 1


class EvilKey:
    """A path whose __eq__ empties another dict (frees its values)."""

    def __init__(self, name, victim=None):
        self.name, self.victim = name, victim

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        if self.victim is not None:
            self.victim.clear()
        return isinstance(other, EvilKey) and other.name == self.name

    def __repr__(self):
        return f"EvilKey({self.name!r})"


def test_merge_survives_keys_that_mutate_partitions():
    td = jax.tree_util.tree_structure([0])
    victim = {}
    victim[EvilKey("a")] = [object()]  # only the dict holds this value
    p0 = {EvilKey("a", victim): NOTHING}
    try:
        out = refx.merge_partitions((p0, victim), td)
    except ValueError as e:
        assert "merge_partitions" in str(e)
    else:
        assert isinstance(out[0], list)


# --- merging is by path, always (issue 10, defect 1) -------------------------


def _fill_path_cache_with_other_shapes():
    for i in range(600):
        refx.tree_partition([0] * i)


def test_merge_is_by_path_after_the_path_cache_was_emptied():
    a, b = refx.Ref(1, "params"), refx.Ref(2, "stats")
    (p, rest), td = refx.tree_partition({"a": a, "b": b}, "params")
    p2, rest2 = (dict(reversed(list(x.items()))) for x in (p, rest))
    _fill_path_cache_with_other_shapes()
    out = refx.merge_partitions((p2, rest2), td)
    assert out["a"] is a and out["b"] is b
    from refx import _core

    _core._clear_path_cache()
    out = refx.merge_partitions((p2, rest2), td)
    assert out["a"] is a and out["b"] is b


def test_merge_after_tree_map_sorts_keys():
    # jax.tree_util sorts dict keys: ('l', '10') comes before ('l', '2')
    (p,), td = refx.tree_partition({"l": list(range(12))})
    mapped = jax.tree_util.tree_map(lambda x: x, dict(p))
    assert list(mapped)[2] == ("l", "10")
    assert refx.merge_partitions((mapped,), td) == {"l": list(range(12))}
    _fill_path_cache_with_other_shapes()
    assert refx.merge_partitions((mapped,), td) == {"l": list(range(12))}


def test_merge_with_a_jax_treedef_is_by_path():
    td = jax.tree_util.tree_structure({"x": 0, "y": [0, 0]})
    part = {("y", "1"): 3, ("x",): 1, ("y", "0"): 2}
    assert refx.merge_partitions((part,), td) == {"x": 1, "y": [2, 3]}
    with pytest.raises(ValueError, match=r"merge_partitions: path \('b',\) of the treedef is not in partition 0 \(are the treedef and the partitions from different trees\?\)"):
        refx.merge_partitions(({("a",): 1},), jax.tree_util.tree_structure({"b": 0}))


def test_merge_with_a_treedef_of_custom_nodes_the_cache_never_saw():
    tree = {"dc": DC(refx.Ref(1.0, "params"), 2.0), "nt": NT(3.0, [4.0]), "c": Custom([5.0, 6.0])}
    (p, rest), td = refx.tree_partition(tree, "params")
    from refx import _core

    _core._clear_path_cache()
    out = refx.merge_partitions((dict(reversed(list(p.items()))), rest), td)
    assert out["dc"].w is tree["dc"].w and out["nt"] == NT(3.0, [4.0])
    assert out["c"].children == [5.0, 6.0]


# --- paths are a function of the tree alone (issue 10, defect 2) -------------


class Color(str, __import__("enum").Enum):
    RED = "red"


@pytest.mark.parametrize(
    "keys",
    [(1, 1.0, True), (0.0, -0.0), ("red", Color.RED)],
    ids=["1-1.0-True", "0.0--0.0", "str-enum"],
)
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_paths_do_not_depend_on_which_equal_key_came_first(keys, order):
    seq = keys if order == "forward" else tuple(reversed(keys))
    for k in seq:
        tree = {k: refx.Ref(0, "params")}
        (p, rest), td = refx.tree_partition(tree, "params")
        assert list(p) == [(str(k),)], k
        assert refx.get_partition(tree, ...) == {(str(k),): tree[k]}
        assert refx.merge_partitions((p, rest), td)[k] is tree[k]
        # the key kept its own type through the round trip
        assert type(next(iter(refx.merge_partitions((p, rest), td)))) is type(k)


def test_equal_keys_inside_lists_and_tuples_get_their_own_paths():
    for k in (1, 1.0, True, 1, True):
        (p,), _ = refx.tree_partition([({k: 0},)])
        assert list(p) == [("0", "0", str(k))]


# --- the path cache is bounded by what it holds (issue 10, defect 3) ---------


def test_path_cache_is_bounded_by_paths():
    from refx import _core

    limit = _core._path_cache_limits()
    assert limit == {"paths": 500_000, "entries": 512}
    old = _core._set_path_cache_limits(paths=1000, entries=512)
    try:
        _core._clear_path_cache()
        for n in range(300, 340):  # a model that grows by one Ref per step
            (p,), _ = refx.tree_partition([refx.Ref(0)] * n)
            assert len(p) == n
            stats = _core._debug_counters()
            assert stats["path_cache_paths"] <= 1000
        assert stats["path_cache_size"] <= 3
        # a tree bigger than the whole bound is not cached, and still right
        (p,), td = refx.tree_partition(list(range(1500)))
        assert list(p.values()) == list(range(1500))
        assert _core._debug_counters()["path_cache_paths"] <= 1000
        assert refx.merge_partitions((p,), td) == list(range(1500))
    finally:
        _core._set_path_cache_limits(**old)
    assert _core._path_cache_limits() == {"paths": 500_000, "entries": 512}


def test_path_cache_evicts_oldest_first_and_stays_correct():
    from refx import _core

    old = _core._set_path_cache_limits(paths=100, entries=4)
    try:
        _core._clear_path_cache()
        trees = [{f"k{i}": list(range(i + 1))} for i in range(10)]
        for _ in range(3):
            for t in trees:
                (p,), td = refx.tree_partition(t)
                assert refx.merge_partitions((dict(reversed(list(p.items()))),), td) == t
                stats = _core._debug_counters()
                assert stats["path_cache_size"] <= 4 and stats["path_cache_paths"] <= 100
    finally:
        _core._set_path_cache_limits(**old)
