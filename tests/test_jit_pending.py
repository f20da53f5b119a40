"""A pytree value refx.jit writes may stay in its Ref as a Flat, pending,
until something reads it (src/refx/flatvalue.c, "Pending values").  Every
way of reading a Ref must see the value itself, equal to what the same
function gives run without refx.jit (the oracle), and nothing may see a
Flat.  Which values may stay pending (rebuilt later without running Python
code) and which are rebuilt at the call is checked here too."""

from __future__ import annotations

import collections
import copy
import gc
import pickle
import threading
import typing
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_jit_flat_values import bump, check_nodes, check_same

import refx
from refx import _core

State = collections.namedtuple("State", "mu nu count")


def pending(r) -> bool:
    return any(type(o) is _core._Flat for o in gc.get_referents(r))


def model():
    return {"l1": {"w": refx.Ref(jnp.arange(6.0).reshape(2, 3), "params"),
                   "mean": refx.Ref(jnp.zeros(3), "batch_stats")},
            "l2": {"w": refx.Ref(jnp.ones((3, 2)), "params")}}


def sgd_state():
    params = refx.get_partition(refx.deref(model()), "params")
    return optax.sgd(0.1, momentum=0.9).init(params)


def kinds():
    return {
        "optax over a Partition of Values": sgd_state(),
        "adam over dicts": optax.adam(1e-3).init({"b": jnp.ones(2), "a": jnp.zeros((2, 2))}),
        "namedtuple, list, None": State([jnp.ones(2), None], {"q": jnp.zeros(1)}, jnp.zeros(())),
        "Value and Index": refx.deref({"a": refx.Ref(jnp.ones(2)), "c": refx.Ref(jnp.zeros(1))}),
    }


def written_twice(name):
    r, oracle = refx.Ref(kinds()[name]), refx.Ref(kinds()[name])
    f = refx.jit(bump)
    f(r), f(r)
    bump(oracle), bump(oracle)
    return f, r, oracle


@pytest.mark.parametrize("name", list(kinds()))
def test_a_written_value_stays_pending_and_reads_as_the_oracle(name):
    f, r, oracle = written_twice(name)
    assert pending(r)
    for _ in range(3):  # passed on untouched, still right
        check_same(f(r), bump(oracle))
        assert pending(r)
    got = r.value
    assert not pending(r)  # made once, then kept: the same object each read
    assert r.value is got
    check_same(got, oracle.value)
    check_nodes(got, jax.tree.map(jnp.asarray, oracle.value))


def test_the_value_made_is_the_one_passed_next():
    f, r, oracle = written_twice("optax over a Partition of Values")
    v = r.value
    check_same(f(r), bump(oracle))
    assert pending(r) and r.value is not v
    check_same(r.value, oracle.value)


READERS = {
    "repr": lambda r: repr(r),
    "deref": lambda r: refx.deref({"s": r})["s"].value,
    "clone": lambda r: refx.clone({"s": r})["s"].value,
    "deepcopy": lambda r: copy.deepcopy(r).value,
    "pickle": lambda r: pickle.loads(pickle.dumps(r)).value,
    "tree_leaves": lambda r: jax.tree.leaves(refx.deref(r)),
    "summary": lambda r: refx.summary({"s": r}),
    "eval_shape": lambda r: refx.eval_shape(lambda m: m["s"].value, {"s": r}),
}


@pytest.mark.parametrize("how", list(READERS))
def test_every_reader_sees_the_value_not_the_flat(how):
    f, r, oracle = written_twice("optax over a Partition of Values")
    assert pending(r)
    out = READERS[how](r)
    assert "Flat" not in repr(out)
    assert not any(type(x) is _core._Flat
                   for x in jax.tree.leaves(out, is_leaf=lambda x: True))
    check_same(r.value, oracle.value)
    if how in ("deref", "clone", "deepcopy", "pickle"):
        check_same(out, oracle.value)
        check_nodes(out, jax.tree.map(jnp.asarray, oracle.value))


def test_update_refs_reads_a_pending_source_and_writes_a_pending_target():
    f, src, oracle = written_twice("adam over dicts")
    _, dst, _ = written_twice("adam over dicts")
    assert pending(src) and pending(dst)
    refx.update_refs({"a": dst, "b": dst}, {"a": src, "b": src})
    assert dst.value is src.value  # the one made value, at both places
    check_same(dst.value, oracle.value)
    _, dst2, _ = written_twice("adam over dicts")
    refx.update_refs({"s": dst2}, refx.deref({"s": src}))
    check_same(dst2.value, oracle.value)


def test_update_refs_by_path_onto_a_pending_ref():
    r, oracle = refx.Ref(kinds()["adam over dicts"], "opt"), refx.Ref(kinds()["adam over dicts"])
    f = refx.jit(bump)
    f(r), f(r), bump(oracle), bump(oracle)
    assert pending(r)
    new = jax.tree.map(lambda x: x + 1, oracle.value)
    refx.update_refs(refx.get_partition({"s": r}, "opt"), {("s",): new})
    assert r.value is new


def test_another_function_a_grad_and_a_closure_read_the_pending_value():
    f, r, oracle = written_twice("adam over dicts")

    def total(ref):
        return sum(jnp.sum(x) for x in jax.tree.leaves(ref.value))

    want = total(oracle)
    np.testing.assert_allclose(refx.jit(total)(r), want, rtol=1e-6)
    assert pending(r)  # g read it for its call; the Ref keeps what f wrote
    np.testing.assert_allclose(refx.jit(lambda: total(r))(), want, rtol=1e-6)
    np.testing.assert_allclose(refx.jit_partial(total, r)(), want, rtol=1e-6)
    np.testing.assert_allclose(total(r), want, rtol=1e-6)
    check_same(f(r), bump(oracle))  # and f, after all of them
    check_same(r.value, oracle.value)


def test_lower_and_donation_after_a_pending_write():
    f, r, oracle = written_twice("adam over dicts")
    low = f.lower(r)
    assert "Flat" not in repr(low.args_info)
    g = refx.jit(bump, donate_argnums=0)
    before = jax.tree.leaves(r.value)
    _, r2, _ = written_twice("adam over dicts")
    assert pending(r2)
    check_same(g(r2), bump(oracle))
    check_same(r2.value, oracle.value)
    assert not pending(r2)  # donation passes values as they are
    del before


def test_nested_jit_writes_tracers_so_nothing_is_left_pending_inside():
    r, oracle = refx.Ref(kinds()["adam over dicts"]), refx.Ref(kinds()["adam over dicts"])
    inner = refx.jit(bump)
    outer = refx.jit(lambda ref: inner(ref) + inner(ref))
    for _ in range(3):
        check_same(outer(r), bump(oracle) + bump(oracle))
        check_same(r.value, oracle.value)


def test_threads_reading_one_pending_value_get_one_object():
    f, r, oracle = written_twice("optax over a Partition of Values")
    seen, barrier = [], threading.Barrier(4)

    def read():
        barrier.wait()
        seen.append(r.value)

    ts = [threading.Thread(target=read) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len({id(v) for v in seen}) == 1
    check_same(seen[0], oracle.value)


class Counted(typing.NamedTuple):
    a: jax.Array
    b: jax.Array


class WithInit(collections.namedtuple("WithInit", "a b")):
    made = 0

    def __init__(self, *args):
        type(self).made += 1


class WithNew(collections.namedtuple("WithNew", "a b")):
    made = 0

    def __new__(cls, a, b):
        cls.made += 1
        return super().__new__(cls, a, b)


class Hashable:
    def __hash__(self):
        return 7

    def __eq__(self, other):
        return isinstance(other, Hashable)


@pytest.mark.parametrize("cls", [WithInit, WithNew])
def test_a_namedtuple_with_code_of_its_own_is_made_at_the_call(cls):
    # its class runs at every call, as jax.jit's unflatten would run it
    r, oracle = refx.Ref(cls(jnp.ones(2), jnp.zeros(2))), refx.Ref(cls(jnp.ones(2), jnp.zeros(2)))
    f = refx.jit(bump)
    f(r)
    n = cls.made
    f(r)
    assert cls.made > n
    assert not pending(r)
    bump(oracle), bump(oracle)
    check_same(r.value, oracle.value)
    assert type(r.value) is cls


def test_a_plain_namedtuple_is_made_as_its_class_makes_it():
    f = refx.jit(bump)
    r = refx.Ref(Counted(jnp.ones(2), jnp.zeros(2)))
    f(r), f(r)
    assert pending(r)
    v = r.value
    assert type(v) is Counted and v._fields == ("a", "b")
    np.testing.assert_allclose(v.a, 7.0)
    np.testing.assert_allclose(v.b, 3.0)


def test_a_collection_of_the_users_type_is_made_at_the_call():
    # its __hash__/__eq__ are Python code: not to be run later, by a reader
    value = refx.deref({"a": refx.Ref(jnp.ones(2), Hashable())})
    r, oracle = refx.Ref(value), refx.Ref(refx.deref({"a": refx.Ref(jnp.ones(2), Hashable())}))
    f = refx.jit(bump)
    f(r), f(r)
    assert not pending(r)
    bump(oracle), bump(oracle)
    check_same(r.value, oracle.value)


def test_a_written_structure_other_than_the_given_is_made_at_the_call():
    def grow(ref):
        ref.value = {**ref.value, f"k{len(ref.value)}": jnp.zeros(len(ref.value))}

    r, oracle = refx.Ref({"a": jnp.ones(2)}), refx.Ref({"a": jnp.ones(2)})
    f = refx.jit(grow)
    for _ in range(3):
        f(r), grow(oracle)
        assert not pending(r)
        check_same(r.value, oracle.value)


def test_equal_aux_of_another_type_written_back_is_not_the_given_spec():
    # the written Values' collection True where the given ones had 1: equal,
    # not the same; the value must come back with True
    def recollect(ref):
        ref.value = jax.tree.map(lambda v: refx.Value(v.value * 2, 0, True), ref.value,
                                 is_leaf=lambda x: isinstance(x, refx.Value))

    r = refx.Ref({"a": refx.Value(jnp.ones(2), 0, 1)})
    f = refx.jit(recollect)
    f(r)
    assert r.value["a"].collection is True
    f(r)
    assert r.value["a"].collection is True
    np.testing.assert_allclose(r.value["a"].value, 4.0)


def test_a_pending_value_is_released_with_its_ref():
    f, r, _ = written_twice("optax over a Partition of Values")
    assert pending(r)
    wr = weakref.ref(r)
    del r
    gc.collect()
    assert wr() is None


# ---- found by the hostile review of pending values ----


def test_a_namedtuple_given_a_new_after_the_first_call_runs_it():
    # plainness was kept in the memo: the new __new__ was skipped (a=30
    # where the oracle gives 300)
    S = collections.namedtuple("S", "a b")
    f = refx.jit(bump)
    r, oracle = refx.Ref(S(jnp.ones(()), jnp.zeros(()))), refx.Ref(S(jnp.ones(()), jnp.zeros(())))
    for _ in range(2):
        f(r), bump(oracle)
    assert pending(r)
    orig = S.__new__
    S.__new__ = lambda cls, a, b: orig(cls, a * 10, b)
    f(r), bump(oracle)
    assert not pending(r)
    assert type(r.value) is S
    np.testing.assert_allclose(r.value.a, oracle.value.a)
    np.testing.assert_allclose(r.value.a, 150.0)


def test_a_namedtuple_given_an_init_after_the_first_call_runs_it():
    S = collections.namedtuple("S", "a b")
    runs = []
    f = refx.jit(bump)
    r = refx.Ref(S(jnp.ones(()), jnp.zeros(())))
    f(r), f(r)
    S.__init__ = lambda self, *a: runs.append(1)
    f(r)
    assert not pending(r) and runs


def test_a_module_defining_tuple_new_does_not_make_a_class_plain():
    # plainness was read from __new__'s globals alone
    src = ("import collections\n_tuple_new = tuple.__new__\n"
           "class C(collections.namedtuple('C', 'a b')):\n"
           "    def __new__(cls, a, b):\n"
           "        MADE.append(1)\n"
           "        return super().__new__(cls, a, b)\n")
    ns = {"MADE": []}
    exec(src, ns)
    C = ns["C"]
    f = refx.jit(bump)
    r = refx.Ref(C(jnp.ones(()), jnp.zeros(())))
    f(r), f(r)
    n = len(ns["MADE"])
    f(r)
    assert not pending(r)
    assert len(ns["MADE"]) > n


class _Clearing(collections.namedtuple("_Clearing", "a")):
    fn = None
    armed = False

    def __new__(cls, a):
        if cls.armed:
            cls.armed = False
            cls.fn._clear_cache()  # frees the per-number memo list mid-write-back
            [[object() for _ in range(8)] for _ in range(2000)]
        return super().__new__(cls, a)


def test_a_rebuild_that_clears_the_cache_does_not_free_the_memos_in_use():
    def step(a, b):
        bump(a), bump(b)

    f = _Clearing.fn = refx.jit(step)
    a, b = refx.Ref(_Clearing(jnp.ones(2))), refx.Ref({"x": jnp.ones(2)})
    oa, ob = refx.Ref(_Clearing(jnp.ones(2))), refx.Ref({"x": jnp.ones(2)})
    for _ in range(4):
        _Clearing.armed = True
        f(a, b), step(oa, ob)
        check_same(a.value, oa.value)
        check_same(b.value, ob.value)


# ---- found by the second reader of the change ----

_hash_calls: list = []


class _Meta:
    """Ref metadata with a Python __hash__ that records when it runs."""

    armed = False

    def __eq__(self, other):
        return type(other) is _Meta

    def __hash__(self):
        if _Meta.armed:
            _hash_calls.append(1)
            raise RuntimeError("a pending value's making ran Python code")
        return 1


class _Tagged(refx.Ref):
    pass


def test_making_a_value_with_metadata_runs_none_of_its_code():
    # the making went through refx_parse_aux, which hashes the kind: user
    # code ran inside deref's moment, and a later .value could raise
    r = refx.Ref(refx.deref({"w": _Tagged(jnp.ones(2), m=_Meta())}))
    oracle = refx.Ref(refx.deref({"w": _Tagged(jnp.ones(2), m=_Meta())}))
    f = refx.jit(bump)
    for _ in range(2):
        f(r), bump(oracle)
    assert pending(r)
    _hash_calls.clear()
    _Meta.armed = True
    try:
        d = refx.deref({"s": r})["s"].value
        v = r.value
    finally:
        _Meta.armed = False
    assert _hash_calls == []
    check_same(v, oracle.value)
    assert d is v
    assert type(v["w"]) is refx.Value and v["w"].ref_type is _Tagged


def test_update_refs_takes_every_source_at_one_moment():
    # the review's case: code run while a pending source was made wrote the
    # other source, and the snapshot took the later value; now the making
    # runs none, and each source is the value it held at the moment
    r1 = refx.Ref(refx.deref({"w": _Tagged(jnp.ones(2), m=_Meta())}))
    r2 = refx.Ref(jnp.zeros(2))
    f = refx.jit(bump)
    f(r1), f(r1)
    assert pending(r1)
    want = jax.tree.map(lambda x: x * 2 + 1, refx.deref({"w": _Tagged(jnp.full(2, 3.0), m=_Meta())}))
    d1, d2 = refx.Ref(None), refx.Ref(None)
    refx.update_refs({"a": d1, "b": d2}, {"a": r1, "b": r2})
    check_same(d1.value, want)
    np.testing.assert_allclose(d2.value, 0.0)


def test_flat_out_checks_the_inputs_it_is_given():
    with pytest.raises(TypeError, match=r"_flat_out\(values, inputs=None\) expects a list \(and a list as long\)"):
        _core._flat_out([jnp.ones(1)], [None, None])
    with pytest.raises(TypeError, match=r"expects a list"):
        _core._flat_out([jnp.ones(1)], (None,))
    assert _core._flat_out([jnp.ones(1)], None)[0].shape == (1,)
