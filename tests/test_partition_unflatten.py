"""Partition's pytree unflatten and its template cache (partition.c,
"Unflatten's templates").

jaxlib unflattens a Partition from its aux data (paths, positions of
NOTHING) wherever one leaves a transform.  Aux data of exact tuples whose
paths are exact tuples of exact str gets a cached template; anything else is
stored item by item.  The oracle here is that item-by-item path (aux data
wrapped in a tuple subclass takes it), and a plain dict built in order.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refx
from refx import _core


class AuxTuple(tuple):
    """aux data of this type never gets a template"""


def unflatten(aux, children):
    return _core._partition_unflatten(aux, children)


def oracle(aux, children):
    """The Partition, stored item by item (no template)."""
    return _core._partition_unflatten(AuxTuple(aux), children)


def expected_items(aux, children):
    paths, holes = aux
    kids = iter(children)
    return [(p, refx.NOTHING if i in holes else next(kids)) for i, p in enumerate(paths)]


def check(aux, children):
    p = unflatten(aux, children)
    assert type(p) is refx.Partition
    assert list(p.items()) == expected_items(aux, children)
    assert list(p.items()) == list(oracle(aux, children).items())
    # flattening it again gives the very aux data and the children back
    kids, aux2 = _core._partition_flatten(p)
    assert list(kids) == list(children)
    assert aux2 == aux
    return p


paths_st = st.lists(st.tuples(st.sampled_from("abcxyz"), st.text("0123", max_size=2)),
                    unique=True, max_size=40)


@settings(max_examples=200, deadline=None)
@given(paths_st, st.data())
def test_unflatten_matches_item_by_item(paths, data):
    paths = tuple(tuple(p) for p in paths)
    holes = tuple(sorted(data.draw(st.sets(st.integers(0, max(len(paths) - 1, 0)),
                                           max_size=len(paths))) if paths else ()))
    children = [object() for _ in range(len(paths) - len(holes))]
    aux = (paths, holes)
    check(aux, children)
    check(aux, children)  # the second time from the cached template


def test_flatten_returns_the_cached_aux():
    model = {"a": refx.Ref(jnp.ones(2), "params"), "b": refx.Ref(jnp.ones(2), "stats"),
             "c": [refx.Ref(jnp.zeros(3), "params")]}
    p = refx.get_partition(refx.deref(model), "params")
    kids, aux = _core._partition_flatten(p)
    for _ in range(3):
        q = jax.tree_util.tree_map(lambda x: x, p)
        assert q == p and list(q) == list(p)
        assert _core._partition_flatten(q)[1] is aux


def test_eviction_and_collisions():
    # far more aux objects than slots, cycled: every result is still right
    auxes = [(tuple((f"k{i}", str(j)) for j in range(i % 7 + 1)), (0,) if i % 3 == 0 else ())
             for i in range(500)]
    for _ in range(3):
        for aux in auxes:
            n = len(aux[0]) - len(aux[1])
            check(aux, list(range(n)))


def test_equal_aux_objects_are_independent():
    a = ((("x",), ("y",)), (1,))
    b = ((("x",), ("y",)), (0,))  # the same paths, NOTHING elsewhere
    assert list(unflatten(a, [1]).items()) == [(("x",), 1), (("y",), refx.NOTHING)]
    assert list(unflatten(b, [1]).items()) == [(("x",), refx.NOTHING), (("y",), 1)]
    assert list(unflatten(a, [2]).items()) == [(("x",), 2), (("y",), refx.NOTHING)]


def test_mutating_a_result_does_not_reach_the_template():
    aux = ((("a",), ("b",)), ())
    p = unflatten(aux, [1, 2])
    dict.__setitem__(p, ("a",), 99)
    dict.__setitem__(p, ("z",), 5)
    dict.__delitem__(p, ("b",))
    assert list(unflatten(aux, [1, 2]).items()) == [(("a",), 1), (("b",), 2)]


class StrSub(str):
    calls = 0

    def __hash__(self):
        StrSub.calls += 1
        return str.__hash__(self)

    def __eq__(self, other):
        return str.__eq__(self, other)


@pytest.mark.parametrize("aux, children", [
    ((((1,), ("b",)), ()), [1, 2]),                 # a non-str path item
    ((((StrSub("a"),), ("b",)), ()), [1, 2]),      # a str subclass with its own hash
    (((("a",), ("a",)), ()), [1, 2]),               # two paths alike
    (((["a"], ("b",)), ()), [1, 2]),                # a path that is no tuple
])
def test_crafted_aux_is_stored_item_by_item(aux, children):
    try:
        want = oracle(aux, children)
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            unflatten(aux, children)
        return
    for _ in range(2):
        got = unflatten(aux, children)
        assert list(got.items()) == list(want.items())
        assert type(got) is refx.Partition


def test_str_subclass_paths_are_hashed_every_time():
    # a template would have frozen the first hash; item by item asks again
    aux = (((StrSub("a"),), ("b",)), ())
    before = StrSub.calls
    unflatten(aux, [1, 2])
    unflatten(aux, [1, 2])
    assert StrSub.calls >= before + 2


def test_errors_with_a_cached_aux():
    aux = ((("a",), ("b",), ("c",)), (1,))
    unflatten(aux, [1, 2])  # cached
    with pytest.raises(ValueError, match=r"3 paths, 1 of them NOTHING, but 3 children"):
        unflatten(aux, [1, 2, 3])
    with pytest.raises(ValueError, match=r"but 1 children"):
        unflatten(aux, [1])
    with pytest.raises(ValueError, match=r"positions of NOTHING must be increasing"):
        unflatten(((("a",), ("b",)), (1, 0)), [])
    with pytest.raises(ValueError, match=r"positions of NOTHING must be increasing"):
        unflatten(((("a",),), (5,)), [])
    with pytest.raises(TypeError, match=r"aux must be"):
        unflatten((("a",),), [])
    assert list(unflatten(aux, [1, 2]).items()) == [(("a",), 1), (("b",), refx.NOTHING),
                                                     (("c",), 2)]


def test_children_of_any_sequence():
    aux = ((("a",), ("b",)), ())
    for kids in ([1, 2], (1, 2), range(1, 3)):
        assert list(unflatten(aux, kids).values()) == [1, 2]


def test_threads():
    auxes = [(tuple((f"t{i}", str(j)) for j in range(5)), (2,)) for i in range(200)]
    errors = []

    def work(seed):
        try:
            for r in range(20):
                for i in range(seed, len(auxes), 4):
                    aux = auxes[(i + r) % len(auxes)]
                    p = unflatten(aux, [seed, r, i, 0])
                    if list(p.items()) != expected_items(aux, [seed, r, i, 0]):
                        errors.append((seed, r, i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_optimizer_state_in_one_ref_through_jit():
    # the path that motivated the cache: a pytree-valued Ref written by
    # refx.jit comes back as Partitions built from the traced aux data
    import optax

    model = {"w": refx.Ref(jnp.arange(3.0), "params"), "s": refx.Ref(jnp.zeros(2), "stats"),
             "v": [refx.Ref(jnp.ones(2), "params")]}
    tx = optax.adam(0.1)
    opt = refx.Ref(tx.init(refx.get_partition(refx.deref(model), "params")), "opt")

    def step(model, opt):
        params = refx.get_partition(refx.deref(model), "params")
        grads = jax.tree_util.tree_map(lambda x: 2 * x, params)
        updates, opt.value = tx.update(grads, opt.value, params)
        refx.update_refs(refx.get_partition(model, "params"), optax.apply_updates(params, updates))

    # the same steps eagerly, on a clone
    m2, o2 = refx.clone((model, opt))
    jstep = refx.jit(step)
    for _ in range(4):
        jstep(model, opt)
        step(m2, o2)
        a = jax.tree_util.tree_leaves(refx.deref((model, opt)))
        b = jax.tree_util.tree_leaves(refx.deref((m2, o2)))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if isinstance(x, refx.Value):
                x, y = x.value, y.value
            assert jnp.allclose(jnp.asarray(x), jnp.asarray(y), rtol=1e-6), (x, y)
        mu = opt.value[0].mu
        assert type(mu) is refx.Partition
        assert list(mu) == list(o2.value[0].mu)


# --- found by the hostile review of the cache (each failed before its fix)


def test_cache_is_bounded_by_paths():
    # a one-off Partition of many paths kept its template alive (50 MB for
    # 300,000 paths) until its slot was reused; now at most 100,000 paths
    # are held in all, and larger aux data is never cached
    import gc
    import tracemalloc

    def once(n, tag):
        aux = (tuple((f"{tag}{i}", "w") for i in range(n)), ())
        return len(unflatten(aux, range(n)))

    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        assert once(150_000, "big") == 150_000
        for k in range(6):  # several under the cap alone, over it together
            assert once(40_000, f"mid{k}_") == 40_000
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # at most 100,000 paths' templates (~10 MB with their path tuples)
    assert held < 20e6, f"{held / 1e6:.1f} MB held after the Partitions are gone"


def test_templates_are_out_of_gc_reach():
    # gc.get_referrers handed out the cache entry and its template, whose
    # edits showed in every later unflatten of that aux data
    import gc

    aux = ((("a",), ("b",)), (1,))
    unflatten(aux, [1])
    holders = [o for o in gc.get_referrers(aux) if o is not aux]
    for o in holders:
        assert not (type(o) is tuple and len(o) == 3 and o[0] is aux), "cache entry reachable"
    for path in aux[0]:
        for o in gc.get_referrers(path):
            if type(o) is dict and list(o.values()) == [refx.NOTHING] * len(o):
                pytest.fail("template reachable through gc")
    assert list(unflatten(aux, [1]).items()) == [(("a",), 1), (("b",), refx.NOTHING)]


@pytest.mark.parametrize("crafted", [False, True])
def test_children_list_emptied_by_a_gc_callback(crafted):
    # a gc callback run by an allocation inside the call cleared the
    # children list after its length was checked: a read past its end
    import gc

    state = {"kids": None}

    def cb(phase, info):
        if phase == "start" and state["kids"] is not None:
            state["kids"].clear()

    paths = tuple((f"p{i}",) for i in range(50))
    aux = AuxTuple((paths, ())) if crafted else (paths, ())
    unflatten(aux, list(range(50)))
    old = gc.get_threshold()
    gc.callbacks.append(cb)
    try:
        for r in range(200):
            kids = [object() for _ in range(50)]
            gc.collect()
            state["kids"] = kids
            gc.set_threshold(1 + r % 6)
            try:
                p = unflatten(aux, kids)
            except ValueError as e:  # the list was emptied before the copy
                assert "but 0 children" in str(e)
            else:
                assert len(p) == 50 and all(v is not refx.NOTHING for v in p.values())
            finally:
                state["kids"] = None
                gc.set_threshold(*old)
    finally:
        gc.callbacks.remove(cb)
        gc.set_threshold(*old)


def test_clear_releases_what_the_cache_holds():
    import sys

    path = ("only", "here")
    aux = ((path, ("b",)), ())
    _core._clear_unflatten_cache()
    before = sys.getrefcount(path)
    unflatten(aux, [1, 2])
    assert sys.getrefcount(path) > before  # the entry holds aux, its template the path
    _core._clear_unflatten_cache()
    assert sys.getrefcount(path) == before
    assert list(unflatten(aux, [1, 2]).items()) == [(path, 1), (("b",), 2)]
