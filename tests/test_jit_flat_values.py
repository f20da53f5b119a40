"""A Ref whose value is a pytree crosses refx.jit's jax.jit call as its
leaves and comes back rebuilt in C (src/refx/flatvalue.c).  Every test
compares with the same function run without refx.jit (the oracle: plain
Python over the Refs), so a value at the wrong place, a stale leaf or a
node of the wrong type fails it, whatever the memo believed."""

from __future__ import annotations

import collections
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx
import refx.nn
from refx import _core

State = collections.namedtuple("State", "mu nu count")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
    x: jax.Array
    y: jax.Array


def model_with_stats():
    return {
        "l1": {"w": refx.Ref(jnp.arange(6.0).reshape(2, 3), "params"),
               "mean": refx.Ref(jnp.zeros(3), "batch_stats")},
        "l2": {"w": refx.Ref(jnp.ones((3, 2)), "params"), "b": refx.Ref(jnp.zeros(2), "params")},
    }


def values():
    """Pytree values users keep in one Ref, by name."""
    model = model_with_stats()
    params = refx.get_partition(refx.deref(model), "params")  # Values, with holes
    shared = refx.Ref(jnp.ones(2), "params")
    return {
        "optax sgd over a Partition of Values": optax.sgd(0.1, momentum=0.9).init(params),
        "optax adam over dicts": optax.adam(1e-3).init({"b": jnp.ones(2), "a": jnp.zeros((2, 2))}),
        "dict, keys unsorted": {"z": jnp.ones(2), "a": jnp.zeros(3), "m": jnp.full((), 2.0)},
        "list, tuple and None": [jnp.ones(2), (jnp.zeros(3), None), []],
        "namedtuple": State(jnp.ones(2), {"q": jnp.zeros(1)}, jnp.zeros(())),
        "deref'ed ties (Value and Index)": refx.deref({"a": shared, "b": shared, "c": refx.Ref(jnp.zeros(1))}),
        "a dict holding NOTHING": {"a": jnp.ones(2), "b": refx.NOTHING},
        "numpy leaves": {"a": np.ones(3, np.float32), "b": (np.zeros(2, np.float32),)},
        "empty tuple": (),
    }


def bump(r):
    r.value = jax.tree.map(lambda x: x * 2 + 1, r.value)
    leaves = jax.tree.leaves(r.value)
    return sum(jnp.sum(x) for x in leaves) if leaves else jnp.zeros(())


def check_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def check_nodes(got, want):
    """The same node types all the way down (a Flat must never leak)."""
    assert type(got) is type(want) or (
        isinstance(want, (np.ndarray, jax.Array)) and isinstance(got, jax.Array)), (got, want)
    if isinstance(want, (tuple, list)):
        for a, b in zip(got, want, strict=True):
            check_nodes(a, b)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            check_nodes(got[k], want[k])
    elif isinstance(want, refx.Value):
        check_nodes(got.value, want.value)


@pytest.mark.parametrize("name", list(values()))
def test_pytree_value_through_refx_jit_equals_the_oracle(name):
    r, oracle = refx.Ref(values()[name]), refx.Ref(values()[name])
    f = refx.jit(bump)
    for _ in range(4):
        check_same(f(r), bump(oracle))
        check_same(r.value, oracle.value)
        check_nodes(r.value, jax.tree.map(jnp.asarray, oracle.value))
    assert _core._Flat not in {type(x) for x in jax.tree.leaves(r.value, is_leaf=lambda x: True)}


def test_the_value_goes_as_leaves_and_its_memo_is_hit():
    r = refx.Ref(values()["optax sgd over a Partition of Values"])
    f = refx.jit(bump)
    f(r)
    (spec,) = f._value_memos
    assert type(spec) is _core._FlatSpec
    for _ in range(3):
        f(r)
    assert f._value_memos[0] is spec  # checked against, not made again
    assert f._cache_size() == 1


def test_arrays_go_as_they_are():
    r = refx.Ref(jnp.ones(3))
    f = refx.jit(bump)
    f(r)
    f(r)
    assert f._value_memos == ()
    np.testing.assert_allclose(r.value, 7.0)


def test_a_dict_changed_in_place_is_read_anew():
    # a leaf replaced inside the value, not through .value: the walk reads it
    r, oracle = refx.Ref({"a": jnp.ones(2), "b": [jnp.zeros(2)]}), refx.Ref({"a": jnp.ones(2), "b": [jnp.zeros(2)]})
    f = refx.jit(bump)
    f(r), bump(oracle)
    for x in (r, oracle):
        x.value["a"] = jnp.full(2, 10.0)
        x.value["b"][0] = jnp.full(2, -1.0)
    check_same(f(r), bump(oracle))
    check_same(r.value, oracle.value)
    for x in (r, oracle):  # and the structure changed in place
        x.value["b"].append(jnp.ones(3))
        x.value["c"] = (jnp.zeros(1),)
    check_same(f(r), bump(oracle))
    check_same(r.value, oracle.value)


def test_a_new_structure_retraces_and_alternating_ones_stay_right():
    names = ["dict, keys unsorted", "namedtuple", "list, tuple and None"]
    refs = [refx.Ref(values()[n]) for n in names]
    oracles = [refx.Ref(values()[n]) for n in names]
    f = refx.jit(bump)
    for i in range(12):  # the same Ref number sees three structures in turn
        check_same(f(refs[i % 3]), bump(oracles[i % 3]))
        check_same(refs[i % 3].value, oracles[i % 3].value)
    # the number's memo was made again and again without a hit: given up
    assert f._value_memos[0] is False
    check_same(f(refs[0]), bump(oracles[0]))


def test_a_value_the_memo_does_not_take_goes_as_it_is():
    for v in (Box(jnp.ones(2), jnp.zeros(2)), {1: jnp.ones(2), 2: jnp.zeros(1)},
              collections.OrderedDict(b=jnp.ones(1), a=jnp.zeros(1))):
        r, oracle = refx.Ref(v), refx.Ref(v)
        f = refx.jit(bump)
        for _ in range(3):
            check_same(f(r), bump(oracle))
            check_same(r.value, oracle.value)
        assert type(r.value) is type(v)


def test_a_leaf_type_change_is_a_new_memo_not_a_wrong_tree():
    r = refx.Ref({"a": np.ones(3, np.float32)})
    f = refx.jit(bump)
    f(r)  # the memo had numpy leaves; the written value has jax arrays
    f(r)
    spec = f._value_memos[0]
    f(r)
    assert f._value_memos[0] is spec
    np.testing.assert_allclose(r.value["a"], 15.0)


def test_closed_over_and_bound_pytree_values_are_live():
    r = refx.Ref(values()["namedtuple"])
    oracle = refx.Ref(values()["namedtuple"])
    g = refx.jit(lambda: bump(r))
    h = refx.jit_partial(bump, r)
    for fn in (g, h, g, h):
        check_same(fn(), bump(oracle))
        check_same(r.value, oracle.value)
    r.value = State(jnp.zeros(2), {"q": jnp.ones(1)}, jnp.ones(()))  # replaced outside
    oracle.value = State(jnp.zeros(2), {"q": jnp.ones(1)}, jnp.ones(()))
    check_same(g(), bump(oracle))
    check_same(r.value, oracle.value)


def test_donated_pytree_values():
    r = refx.Ref(values()["optax adam over dicts"])
    oracle = refx.Ref(values()["optax adam over dicts"])
    f = refx.jit(bump, donate_argnums=0)
    for _ in range(3):
        check_same(f(r), bump(oracle))
        check_same(r.value, oracle.value)


def test_an_optax_step_with_the_state_in_one_ref():
    model, ref_model = model_with_stats(), model_with_stats()
    tx = optax.adam(1e-2)

    def init(m):
        return refx.Ref(tx.init(refx.get_partition(refx.deref(m), "params")))

    def step(m, opt, x):
        def loss(m):
            h = x @ m["l1"]["w"].value
            m["l1"]["mean"].value = 0.9 * m["l1"]["mean"].value + 0.1 * h.mean(0)
            return jnp.sum((h @ m["l2"]["w"].value + m["l2"]["b"].value) ** 2)

        g = refx.grad(loss)(m)
        p = refx.get_partition(refx.deref(m), "params")
        u, opt.value = tx.update(g, opt.value, p)
        refx.update_refs(refx.get_partition(m, "params"), optax.apply_updates(p, u))

    opt, ref_opt = init(model), init(ref_model)
    f = refx.jit(step)
    x = jnp.linspace(-1, 1, 8).reshape(4, 2)
    for _ in range(5):
        f(model, opt, x)
        step(ref_model, ref_opt, x)
    check_same(refx.deref(model), refx.deref(ref_model))
    check_same(opt.value, ref_opt.value)


class Touchy(collections.namedtuple("Touchy", "a b")):
    fail = False

    def __new__(cls, a, b):
        if cls.fail:
            raise RuntimeError("no Touchy today")
        return super().__new__(cls, a, b)


def test_a_rebuild_that_raises_writes_nothing():
    a, t = refx.Ref(jnp.zeros(2)), refx.Ref(Touchy(jnp.ones(1), jnp.ones(1)))

    def both(a, t):
        a.value = a.value + 1
        t.value = Touchy(t.value.a + 1, t.value.b)

    f = refx.jit(both)
    f(a, t)
    Touchy.fail = True
    try:
        with pytest.raises(RuntimeError, match="no Touchy today"):
            f(a, t)
    finally:
        Touchy.fail = False
    np.testing.assert_allclose(a.value, 1.0)  # all or nothing
    np.testing.assert_allclose(t.value.a, 2.0)
    f(a, t)
    np.testing.assert_allclose(a.value, 2.0)
    np.testing.assert_allclose(t.value.a, 3.0)


def test_threads_share_a_function_and_keep_their_own_values():
    f = refx.jit(lambda r: r.__setattr__("value", {"n": r.value["n"] + 1, "s": (r.value["s"][0] * 1,)}))
    refs = [refx.Ref({"n": jnp.zeros(()), "s": (jnp.ones(2),)}) for _ in range(4)]
    f(refs[0])
    refs[0].value = {"n": jnp.zeros(()), "s": (jnp.ones(2),)}

    def run(r):
        for _ in range(25):
            f(r)

    threads = [threading.Thread(target=run, args=(r,)) for r in refs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in refs:
        assert float(r.value["n"]) == 25.0
        assert type(r.value["s"]) is tuple


def test_flat_objects_are_internal_and_checked():
    with pytest.raises(TypeError):
        _core._Flat()
    with pytest.raises(TypeError):
        _core._FlatSpec()
    with pytest.raises(TypeError):
        _core._flat_unflatten(None, ())
    with pytest.raises(TypeError):
        _core._flat_flatten(1)


def test_a_value_whose_aux_data_changed_is_not_taken_for_the_memo():
    # same structure but for a Value's collection, index and kind: each is
    # part of the treedef, so each must come back as the new value has it
    a, b = refx.Ref(jnp.ones(2), "params"), refx.Ref(jnp.zeros(2), "params")
    r = refx.Ref(refx.deref({"x": a, "y": b}))
    f = refx.jit(bump)
    f(r)
    f(r)
    for new in (refx.deref({"x": refx.Ref(jnp.ones(2), "stats"), "y": b}),
                refx.deref({"y": b, "x": a}, ),
                refx.deref({"x": refx.Ref(jnp.ones(2)), "y": refx.Ref(jnp.ones(2))}),
                refx.deref({"x": refx.nn.Param(jnp.ones(2)), "y": b})):
        r.value = new
        oracle = refx.Ref(new)
        check_same(f(r), bump(oracle))
        check_same(r.value, oracle.value)
        for got, want in zip(jax.tree.leaves(r.value, is_leaf=lambda x: isinstance(x, refx.Value)),
                             jax.tree.leaves(oracle.value, is_leaf=lambda x: isinstance(x, refx.Value)),
                             strict=True):
            assert (got.index, got.collection, type(got)) == (want.index, want.collection, type(want))
            assert jax.tree.structure(got) == jax.tree.structure(want)


# ---- found by the hostile review of the Flat path ----


@pytest.mark.parametrize("old, new", [(1, True), (True, 1), (1, 1.0), ("a", np.str_("a"))])
def test_equal_aux_of_another_type_is_not_the_memos_when_jax_retraces(old, new):
    # the memo compared aux data with ==; on a retrace the traced function
    # then rebuilt the value with the memo's collection (1 for True)
    f = refx.jit(bump)
    r = refx.Ref({"p": refx.Value(jnp.ones(2), 0, old)})
    f(r)
    r.value = {"p": refx.Value(jnp.ones(3), 0, new)}  # a new shape: jax.jit retraces
    oracle = refx.Ref({"p": refx.Value(jnp.ones(3), 0, new)})
    check_same(f(r), bump(oracle))
    got = r.value["p"].collection
    assert type(got) is type(new) and got == new


def test_partition_paths_of_another_type_are_not_the_memos():
    def part(i, n):
        return refx.Partition({("layers", i, "w"): jnp.ones(n)})

    f = refx.jit(bump)
    r = refx.Ref(part(1, 2))
    f(r)
    r.value = part(np.int64(1), 3)
    f(r)
    (path,) = r.value.keys()
    assert type(path[1]) is np.int64


class _Coll:
    armed = False
    fn = None

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        if _Coll.armed:
            _Coll.armed = False
            _Coll.fn._clear_cache()  # frees the per-number memo list mid-walk
            [[object() for _ in range(8)] for _ in range(2000)]
            return False
        return isinstance(other, _Coll) and self.name == other.name


def test_the_memo_list_cleared_during_the_walk_is_not_used_freed():
    f = _Coll.fn = refx.jit(bump)
    r = refx.Ref({"p": refx.Value(jnp.ones(2), 0, _Coll("a"))})
    f(r)
    for _ in range(4):
        r.value = {"p": refx.Value(jnp.ones(2), 0, _Coll("a"))}  # equal, not the same
        _Coll.armed = True
        f(r)
    np.testing.assert_allclose(r.value["p"].value, 3.0)


def test_jax_messages_name_the_path_inside_the_value():
    nt = collections.namedtuple("NT", "mu nu")
    r = refx.Ref(nt({"w": jnp.ones(2), "bad": np.array(["a", "b"])}, [jnp.zeros(1)]))
    with pytest.raises(TypeError, match=r"\.mu\['bad'\]"):
        refx.jit(bump)(r)


def test_lower_shows_the_values_own_structure():
    r = refx.Ref(State(jnp.ones(2), {"q": jnp.zeros(1)}, jnp.zeros(())))
    lowered = refx.jit(bump).lower(r)
    (vals, _), _ = lowered.args_info
    assert type(vals[0]) is State and set(vals[0].nu) == {"q"}


def test_a_structure_back_every_third_call_gives_up_its_memo():
    a, b = refx.Ref({"a": jnp.ones(2)}), refx.Ref([jnp.ones(2)])
    oa, ob = refx.Ref({"a": jnp.ones(2)}), refx.Ref([jnp.ones(2)])
    f = refx.jit(bump)
    for i in range(15):  # A A B A A B ...: a memo made twice every three calls
        r, o = (b, ob) if i % 3 == 2 else (a, oa)
        check_same(f(r), bump(o))
    assert f._value_memos[0] is False
    check_same(a.value, oa.value)
    check_same(b.value, ob.value)
