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
import numpy as np
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
    assert repr(refx.Ref(1, "params")) == "Ref(1, collection='params')"
    r = refx.Ref(None)
    r.value = [r]
    assert repr(r) == "Ref([Ref(...)], collection=None)"


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
    from refx import _arrays

    for cls in (refx.Ref, refx.Value, refx.Index, refx.Deref, refx.Partition,
                refx.Not, refx.All, refx.Any):
        python = {k for k, v in vars(cls).items() if isinstance(v, types.FunctionType)}
        if cls is refx.Ref:  # the array operators (refx/_arrays.py) are Python by design
            python -= _arrays.NAMES
        assert not python, (cls, python)
        assert cls.__module__ == "refx"
    assert type(refx.NOTHING) is refx.Nothing


def test_text_signatures():
    import inspect

    assert str(inspect.signature(refx.deref)) == "(tree, /)"
    assert str(inspect.signature(refx.tree_partition)) == "(tree, /, *filters, is_leaf=None)"
    assert str(inspect.signature(refx.update_refs)) == "(target, source, /)"
    assert str(inspect.signature(refx.Ref)) == "(value, collection=None, **metadata)"
    assert str(inspect.signature(refx.Value)) == "(value, index, collection=None, *, ref_type=None, metadata=None)"


def test_all_is_complete():
    # subpackages (refx.nn, once imported) are attributes but not names of refx
    assert sorted(refx.__all__) == sorted(
        n for n in dir(refx) if not n.startswith("_") and n not in ("annotations",)
        and not isinstance(getattr(refx, n), types.ModuleType)
    )


class Box:  # not a pytree node: one leaf; hashable by identity
    def __init__(self, x=None):
        self.x = x


def test_gc_tracking_follows_what_a_ref_can_reach():
    # Refs made by reref/clone are tracked only when they could be part of a
    # cycle; a write of a container value starts tracking.
    a = np.ones(2)
    tree = refx.clone({"x": refx.Ref(a, "params"), "y": refx.Ref(1.0)})
    r = tree["x"]
    assert not gc.is_tracked(r) and not gc.is_tracked(tree["y"])
    r.value = [r]  # a cycle through the value
    assert gc.is_tracked(r)
    w = weakref.ref(r)
    del r, tree
    gc.collect()
    assert w() is None
    # a collection that could lead back: tracked from the start (a tuple of
    # str and int cannot, and CPython untracks it)
    assert gc.is_tracked(refx.clone([refx.Ref(a, ("c", Box()))])[0])
    assert not gc.is_tracked(refx.clone([refx.Ref(a, ("c", 1))])[0])
    # update_refs writes keep tracking right too
    r2 = refx.clone([refx.Ref(a)])[0]
    refx.update_refs([r2], [Box(r2)])
    assert gc.is_tracked(r2)


def test_gc_tracking_of_values_and_indexes():
    a = np.ones(2)
    d = refx.deref([refx.Ref(a, "p"), refx.Ref([1], "p")])
    assert not gc.is_tracked(d[0])  # a numpy array and a str collection
    assert gc.is_tracked(d[1])      # a list could lead back
    assert not gc.is_tracked(refx.Index(0, "p"))
    assert gc.is_tracked(refx.Index(0, ("p", Box())))
    assert not gc.is_tracked(refx.Index(0, ("p", 1)))
    v = refx.Value(None, 0)
    assert not gc.is_tracked(v)


# --- collection is read-only (issue 10, defect 10) ----------------------------


def test_init_on_a_live_ref_cannot_change_its_collection():
    r = refx.Ref(1.0, "params")
    with pytest.raises(TypeError, match=r"Ref.__init__: this Ref is already initialized; its collection and metadata are read-only"):
        r.__init__(2.0, "other")
    assert r.collection == "params" and r.value == 1.0
    with pytest.raises(AttributeError):
        r.collection = "other"

    class Param(refx.Ref):
        def __init__(self, value):
            super().__init__(value, "params")

    p = Param(3.0)
    assert p.collection == "params"
    with pytest.raises(TypeError, match="already initialized"):
        refx.Ref.__init__(p, 4.0, "stats")
    assert p.collection == "params" and p.value == 3.0


# --- pickle/copy/deepcopy keep a subclass's state (issue 10, defect 11) --------


class Tagged(refx.Ref):
    pass


class Param(refx.Ref):
    def __init__(self, value, *, fan_in):
        super().__init__(value, "params")
        self.fan_in = fan_in


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_copies_keep_subclass_and_instance_dict(how):
    t = Tagged(jnp.ones(2), "c")
    t.note = "kept"
    p = Param([1.0], fan_in=3)
    tree = {"t": t, "p": p, "p2": p}
    if how == "copy":  # copy.copy of a dict would not copy the Refs
        out = {k: copy.copy(v) for k, v in tree.items()}
        assert out["p"].value is p.value
    else:
        out = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "deepcopy": copy.deepcopy}[how](tree)
        assert out["p2"] is out["p"]
    assert out["t"] is not t and out["p"] is not p
    assert type(out["t"]) is Tagged and out["t"].note == "kept" and out["t"].collection == "c"
    assert type(out["p"]) is Param and out["p"].fan_in == 3 and out["p"].collection == "params"
    assert out["p"].value == [1.0]


def test_deepcopy_of_a_ref_that_contains_itself_is_one_ref():
    r = refx.Ref(None, "c")
    r.value = [r]
    c = copy.deepcopy(r)
    assert c is not r and c.value[0] is c and c.collection == "c"
    p = pickle.loads(pickle.dumps(r))
    assert p.value[0] is p


def test_setstate_cannot_rewrite_a_live_ref():
    r = refx.Ref(1.0, "params")
    with pytest.raises(TypeError, match="already initialized"):
        r.__setstate__((2.0, "other", None))
    assert r.value == 1.0 and r.collection == "params"


# --- a Ref subclass registered as a pytree node (issue 10, defect 9) -----------


def test_ref_subclass_registered_as_a_pytree_node_is_refused():
    # In a subprocess: jax registrations cannot be undone.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import jax, refx
        class Var(refx.Ref):
            pass
        r = Var(1.0, "params")
        tree = {"a": r, "b": r}
        print(refx.deref(tree)["b"])  # fine before the registration
        jax.tree_util.register_pytree_node(Var, lambda v: ((v.value,), None), lambda _, c: Var(c[0]))
        for name, call in [("deref", lambda: refx.deref(tree)),
                           ("tree_partition", lambda: refx.tree_partition(tree, "params")),
                           ("get_partition", lambda: refx.get_partition(refx.deref(tree), ...)),
                           ("update_refs", lambda: refx.update_refs(tree, {"a": 2.0, "b": 2.0})),
                           ("clone", lambda: refx.clone(tree))]:
            try:
                call()
                print(name, "NO ERROR")
            except TypeError as e:
                print(name, "TypeError:", e)
        print("value", r.value)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Index(")
    for name in ("deref", "tree_partition", "update_refs", "clone"):
        line = next(x for x in lines if x.startswith(name + " "))
        assert line.startswith(name + " TypeError: " + name + ": the Ref subclass Var "), line
        assert "is registered as a JAX pytree node" in line, line
        assert "Refs must be pytree leaves" in line, line
    assert lines[-1] == "value 1.0"  # nothing was written
