"""Typed Refs and metadata (issue 13): Ref subclasses and Ref(value,
collection, **metadata) survive deref/reref, clone, pickle and copy, are
part of a deref'ed tree's static data (so of jit's cache key), and type
filters see them through deref."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


class Param(refx.Ref):
    pass


class BatchStat(refx.Ref):
    pass


class Fan(refx.Ref):
    """A subclass with its own __init__ and an instance attribute."""

    def __init__(self, value, *, fan_in):
        super().__init__(value, "params")
        self.fan_in = fan_in


def model():
    w = Param(jnp.ones((2, 3)), "params", sharding=("data", None))
    b = Param(jnp.zeros(3), "params")
    m = BatchStat(jnp.zeros(3), "batch_stats")
    f = Fan(jnp.ones(2), fan_in=7)
    plain = refx.Ref(1.0, "state", tag="step")
    return {"w": w, "w2": w, "b": b, "m": m, "f": f, "n": plain}


# --- metadata on a Ref ---------------------------------------------------------


def test_metadata_is_read_only_and_keyword_only():
    r = refx.Ref(jnp.ones(2), "params", sharding=("model",), init="zeros")
    assert dict(r.metadata) == {"sharding": ("model",), "init": "zeros"}
    assert r.collection == "params"
    with pytest.raises(TypeError):
        r.metadata["x"] = 1
    with pytest.raises(AttributeError):
        r.metadata = {}
    assert dict(refx.Ref(1).metadata) == {}
    with pytest.raises(TypeError, match=r"Ref\(\) takes at most 2 positional arguments"):
        refx.Ref(1, "c", "extra")


def test_metadata_must_be_hashable():
    with pytest.raises(TypeError, match=r"Ref\(\): metadata 'spec' must be hashable \(it is part of the jit cache key\), got unhashable list"):
        refx.Ref(1, spec=["model", None])


def test_misspelled_arguments_are_not_taken_for_metadata():
    for bad, meant in [("colection", "collection"), ("collections", "collection"),
                       ("vaule", "value"), ("valu", "value")]:
        with pytest.raises(TypeError, match=rf"metadata name '{bad}' looks like a misspelled '{meant}'"):
            refx.Ref(1, **{bad: 1})
    with pytest.raises(TypeError, match="missing required argument 'value'"):
        refx.Ref(collection="c")
    with pytest.raises(TypeError, match="multiple values for argument 'collection'"):
        refx.Ref(1, "c", collection="d")
    assert refx.Ref(value=1, collection="c", selection=2).metadata["selection"] == 2


def test_replace_makes_a_new_ref_of_the_same_kind():
    f = Fan(jnp.ones(2), fan_in=3)
    g = f.replace(sharding=("model",))
    assert type(g) is Fan and g is not f and g.fan_in == 3
    assert g.value is f.value and g.collection == "params"
    assert dict(g.metadata) == {"sharding": ("model",)}
    h = g.replace(value=jnp.zeros(2), collection="frozen", sharding=None)
    assert h.collection == "frozen" and dict(h.metadata) == {"sharding": None}
    assert jnp.array_equal(h.value, jnp.zeros(2))
    g.value = jnp.full(2, 5.0)  # not shared with f
    assert jnp.array_equal(f.value, jnp.ones(2))
    with pytest.raises(TypeError, match="keyword arguments only"):
        f.replace(1)


def test_reinit_cannot_change_metadata():
    r = refx.Ref(1, sharding=("a",))
    with pytest.raises(TypeError, match="its collection and metadata are read-only"):
        r.__init__(1, sharding=("b",))
    assert dict(r.metadata) == {"sharding": ("a",)}


def test_repr_shows_class_and_metadata_and_short_arrays():
    r = Param(jnp.ones((64, 64)), "params", sharding=("model", None))
    assert repr(r) == "Param(float32[64,64], collection='params', sharding=('model', None))"
    d = refx.deref([r, r])
    assert repr(d[0]) == ("Value(float32[64,64], index=0, collection='params', "
                          "ref_type=Param, sharding=('model', None))")
    assert repr(d[1]) == "Index(0, collection='params', ref_type=Param, sharding=('model', None))"
    opt = refx.Ref((jnp.zeros(3), {"mu": np.ones((2, 2), np.float32)}), "opt")
    assert repr(opt) == "Ref((float32[3], {'mu': float32[2,2]}), collection='opt')"


# --- deref / reref / clone keep class, metadata and attributes ------------------


def check_same_kinds(a, b):
    for k in a:
        assert type(a[k]) is type(b[k]), k
        assert dict(a[k].metadata) == dict(b[k].metadata), k
        assert a[k].collection == b[k].collection, k
    assert b["w"] is b["w2"] and b["f"].fan_in == 7


def test_deref_records_ref_type_and_metadata():
    tree = model()
    d = refx.deref(tree)
    assert d["w"].ref_type is Param and dict(d["w"].metadata) == {"sharding": ("data", None)}
    assert isinstance(d["w2"], refx.Index) and d["w2"].ref_type is Param
    assert d["m"].ref_type is BatchStat and d["n"].ref_type is refx.Ref
    assert dict(d["n"].metadata) == {"tag": "step"}
    assert d["f"].ref_type is Fan


def test_reref_and_clone_rebuild_the_same_kinds():
    tree = model()
    check_same_kinds(tree, refx.reref(refx.deref(tree)))
    c = refx.clone(tree)
    check_same_kinds(tree, c)
    assert c["w"] is not tree["w"]


def test_kinds_survive_jit_and_are_part_of_its_cache_key():
    tree = model()
    traces = []

    @jax.jit
    def f(d):
        traces.append(1)
        t = refx.reref(d)
        assert type(t["w"]) is Param and t["f"].fan_in == 7
        t["m"].value = t["m"].value + 1
        return refx.deref(t)

    out = refx.reref(f(refx.deref(tree)))
    check_same_kinds(tree, out)
    f(refx.deref(model()))
    assert len(traces) == 1  # same kinds: one trace
    other = model()
    other["w"] = other["w2"] = Param(jnp.ones((2, 3)), "params", sharding=("model", None))
    f(refx.deref(other))
    assert len(traces) == 2  # other metadata: another trace
    td = jax.tree_util.tree_structure
    assert td(refx.deref(model())) != td(refx.deref(other))


def test_unhashable_attribute_is_a_clear_error_at_deref():
    f = Fan(1.0, fan_in=[1, 2])
    with pytest.raises(TypeError, match=r"deref: the Fan at \('x',\) has an instance attribute that cannot be hashed"):
        refx.deref({"x": f})
    # clone copies the attributes without hashing them
    assert refx.clone({"x": f})["x"].fan_in == [1, 2]


def test_pickle_and_copies_keep_kinds():
    tree = model()
    for out in (pickle.loads(pickle.dumps(tree)), copy.deepcopy(tree)):
        check_same_kinds(tree, out)
    d = refx.deref(tree)
    for out in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(d)
        assert out["w"].ref_type is Param and dict(out["w"].metadata) == {"sharding": ("data", None)}
        assert out["w2"] == d["w2"]  # an Index: no array to compare
        assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), out, d)))


def test_value_and_index_constructors_take_kinds():
    v = refx.Value(1.0, 0, "params", ref_type=Param, metadata={"sharding": ("a",)})
    i = refx.Index(0, "params", ref_type=Param, metadata={"sharding": ("a",)})
    assert v.ref_type is Param and i.ref_type is Param and dict(v.metadata) == {"sharding": ("a",)}
    t = refx.reref([v, i])
    assert type(t[0]) is Param and t[0] is t[1] and dict(t[0].metadata) == {"sharding": ("a",)}
    assert refx.Value(1.0, 0) == refx.Value(1.0, 0, ref_type=refx.Ref, metadata={})
    assert refx.Value(1.0, 0) != v.__class__(1.0, 0, ref_type=Param)
    assert hash(refx.Index(0)) != hash(refx.Index(0, ref_type=Param))
    with pytest.raises(TypeError, match="ref_type must be Ref or a subclass of it, not <class 'int'>"):
        refx.Value(1.0, 0, ref_type=int)
    with pytest.raises(TypeError, match="must be hashable"):
        refx.Index(0, metadata={"x": []})


def test_reref_refuses_an_index_of_another_kind():
    with pytest.raises(ValueError, match=r"reref: Index\(0\) at \('1',\) stands for a BatchStat with metadata \(\) but its Value for a Param"):
        refx.reref([refx.Value(1.0, 0, ref_type=Param), refx.Index(0, ref_type=BatchStat)])


def test_crafted_aux_data_with_a_bad_kind_is_refused():
    from refx import _core

    for kind in [(int, (), ()), (Param, [], ()), (Param, (("x",),), ()), "kind"]:
        with pytest.raises(TypeError, match="a Ref's kind is|metadata and attributes are"):
            _core._value_unflatten((0, None, kind), [1.0])


# --- filters see types through deref --------------------------------------------


def test_type_filters_match_refs_and_their_derefed_nodes():
    tree = model()
    params = refx.get_partition(tree, Param)
    assert [k for k, v in params.items() if v is not refx.NOTHING] == [("b",), ("w",), ("w2",)]
    dparams = refx.get_partition(refx.deref(tree), Param)
    assert [k for k, v in dparams.items() if v is not refx.NOTHING] == [("b",), ("w",), ("w2",)]
    (stats, rest), _ = refx.tree_partition(refx.deref(tree), BatchStat)
    assert [k for k, v in stats.items() if v is not refx.NOTHING] == [("m",)]
    # refx.Ref matches every Ref and everything deref'ed from one
    assert all(v is not refx.NOTHING for v in refx.get_partition(refx.deref(tree), refx.Ref).values())


# --- update_refs checks the kind of a Value --------------------------------------


def test_update_refs_refuses_a_value_of_another_class():
    tree = model()
    d = refx.deref(tree)
    src = dict(d)
    src["m"] = refx.Value(jnp.ones(3), d["m"].index, "batch_stats", ref_type=Param)
    with pytest.raises(ValueError, match=r"update_refs: at \('m',\): source Value stands for a Param but the target Ref is a BatchStat"):
        refx.update_refs(tree, src)
    refx.update_refs(tree, jax.tree_util.tree_map(lambda x: x + 1, d))
    assert jnp.array_equal(tree["m"].value, jnp.ones(3))


# --- refx.jit and refx.grad keep kinds (issue 13 with issue 11) -------------------


def test_refx_jit_sees_and_returns_typed_refs_and_keys_on_metadata():
    tree = model()
    seen, traces = [], []

    @refx.jit
    def step(t):
        traces.append(1)
        seen.append((type(t["w"]), dict(t["w"].metadata), t["f"].fan_in, type(t["m"])))
        t["m"].value = t["m"].value + 1
        made = Fan(jnp.zeros(2), fan_in=11).replace(tag="new")
        return made, t["w"]

    made, w = step(tree)
    assert seen[0] == (Param, {"sharding": ("data", None)}, 7, BatchStat)
    assert w is tree["w"] and type(made) is Fan and made.fan_in == 11
    assert dict(made.metadata) == {"tag": "new"} and made.collection == "params"
    assert jnp.array_equal(tree["m"].value, jnp.ones(3))
    step(tree)
    assert len(traces) == 1
    other = model()
    other["w"] = other["w2"] = Param(jnp.ones((2, 3)), "params", sharding=("model", None))
    step(other)
    assert len(traces) == 2  # other metadata: another entry
    assert seen[-1][1] == {"sharding": ("model", None)}


def test_refx_grad_differentiates_typed_refs_by_class():
    w = Param(jnp.full(2, 3.0), "params")
    s = BatchStat(jnp.zeros(2), "batch_stats")

    def loss(m):
        m["s"].value = m["s"].value + 1
        return jnp.sum(m["w"].value ** 2)

    g = refx.grad(loss, wrt=Param)({"w": w, "s": s})
    assert g[("w",)].ref_type is Param
    assert jnp.allclose(g[("w",)].value, 6.0) and g[("s",)] is refx.NOTHING
    assert jnp.array_equal(s.value, jnp.ones(2))
