"""Threads: 8 threads doing the same refx work, on their own trees and on
one shared tree, each get exactly the serial answer."""

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

import refx

THREADS = 8
ROUNDS = 150


def model(seed):
    w0 = refx.Ref(np.full(2, float(seed)), "params")
    layers = []
    for i in range(12):
        w = w0 if i % 4 == 0 else refx.Ref(np.full(2, float(seed + i)), "params")
        layers.append({"w": w, "b": refx.Ref(np.zeros(2), "params"),
                       "m": refx.Ref(np.zeros(2), "stats")})
    return {"layers": layers, "head": w0, "n": seed}


def signature(tree):
    """A comparable digest of a Ref tree: sharing pattern, values, collections."""
    leaves = jax.tree_util.tree_leaves(tree)
    first = {}
    return [(first.setdefault(id(x), i), x.collection, x.value.tolist())
            if isinstance(x, refx.Ref) else x for i, x in enumerate(leaves)]


def work(tree):
    """deref -> partition -> merge -> reref -> update; returns digests."""
    d = refx.deref(tree)
    (p, s, rest), td = refx.tree_partition(d, "params", "stats")
    merged = refx.merge_partitions((p, s, rest), td)
    back = refx.reref(merged)
    c = refx.clone(tree)
    bumped = jax.tree_util.tree_map(lambda v: v + 1, refx.get_partition(d, "params"))
    refx.update_refs(refx.get_partition(c, "params"), bumped)
    return (signature(back), signature(c), list(p), [type(v).__name__ for v in s.values()])


def run_threads(fn):
    results, errors = [None] * THREADS, []
    barrier = threading.Barrier(THREADS)

    def target(k):
        try:
            barrier.wait()
            results[k] = fn(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        ts = [threading.Thread(target=target, args=(k,)) for k in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    return results


def test_own_trees_match_serial():
    trees = [model(k) for k in range(THREADS)]
    expected = [[work(trees[k]) for _ in range(3)] for k in range(THREADS)]
    got = run_threads(lambda k: [work(trees[k]) for _ in range(ROUNDS)])
    for k in range(THREADS):
        assert all(r == expected[k][0] for r in got[k])


def test_shared_tree_matches_serial():
    tree = model(3)
    expected = work(tree)
    got = run_threads(lambda k: [work(tree) for _ in range(ROUNDS)])
    assert all(r == expected for rs in got for r in rs)


def test_concurrent_writers_never_interleave():
    # update_refs validates, then writes every Ref without running Python
    # code (so without letting another thread in): after all writers finish,
    # every Ref holds the same writer's last value set.
    refs = [refx.Ref(0.0, "c") for _ in range(50)]
    target = refx.get_partition(refs, "c")
    last = {}

    def fn(k):
        for i in range(ROUNDS):
            v = float(k * 1000 + i)
            refx.update_refs(target, {p: v for p in target})
        last[k] = v
        return True

    run_threads(fn)
    final = {r.value for r in refs}
    assert len(final) == 1 and final.pop() in last.values()


def test_ref_made_in_a_thread_keeps_its_trace_in_that_thread():
    out = {}

    def fn(k):
        r = refx.Ref(float(k))
        r.value = r.value + 1  # top level in this thread: allowed

        msgs = []

        @jax.jit
        def f(x):
            try:
                r.value = x
            except ValueError as e:
                msgs.append(str(e))
            return x

        f(jnp.full((), float(k)))  # a new trace per thread (distinct values)
        out[k] = (r.value, [m.split(":")[0] for m in msgs])
        return True

    run_threads(fn)
    assert out == {k: (float(k) + 1, ["Cannot mutate Ref from a different trace level"])
                   for k in range(THREADS)}


def test_writers_never_interleave_even_when_old_values_run_del():
    # Releasing a Ref's old value may run a __del__ that releases the GIL.
    # update_refs used to release each old value right after its store, so
    # another writer could run in the middle of the update and the Refs
    # ended holding a mix of two writers' values (seen: [1029, 2029]).
    import time

    class Slow:
        def __init__(self, g):
            self.g = g

        def __del__(self):
            time.sleep(0.0002)  # lets other threads in

    refs = [refx.Ref(Slow(-1), "c") for _ in range(20)]
    target = refx.get_partition(refs, "c")

    def fn(k):
        for i in range(15):
            refx.update_refs(target, {p: Slow(k * 1000 + i) for p in target})
        return True

    run_threads(fn)
    assert len({r.value.g for r in refs}) == 1


# --- reads see all values from one moment (issue 10, defect 7) ---------------

gc_inside_c_calls = __import__("pytest").mark.skipif(
    sys.version_info >= (3, 12),
    reason="CPython >= 3.12 never runs the GC inside a C call",
)


class _Yield:
    """Cyclic garbage whose finalizer lets other threads in: a GC run that
    an allocation inside a refx call triggers ends up releasing the GIL."""

    def __init__(self):
        self.me = self

    def __del__(self):
        import time

        time.sleep(0)


def _torn_reads(read, nrefs=64, rounds=400):
    """A writer thread sets all Refs to one generation at a time with
    update_refs; `read(tree)` returns the values it saw.  Returns how many
    reads mixed two generations."""
    import gc

    refs = [refx.Ref(0.0, "c") for _ in range(nrefs)]
    target = refx.get_partition(refs, "c")
    stop = threading.Event()

    def writer():
        g = 0.0
        while not stop.is_set():
            g += 1.0
            refx.update_refs(target, {p: g for p in target})

    torn = 0
    old_threshold = gc.get_threshold()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(20)
    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(rounds):
            for _ in range(5):
                _Yield()
            seen = read(refs)
            torn += len(set(seen)) > 1
    finally:
        stop.set()
        t.join()
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_interval)
    return torn


@gc_inside_c_calls
def test_deref_takes_every_value_at_one_moment():
    assert _torn_reads(lambda refs: [v.value for v in refx.deref(refs)]) == 0


@gc_inside_c_calls
def test_clone_takes_every_value_at_one_moment():
    assert _torn_reads(lambda refs: [r.value for r in refx.clone(refs)]) == 0


@gc_inside_c_calls
def test_update_refs_reads_source_refs_at_one_moment():
    # the source values are tuples, so update_refs runs Python code per Ref
    # (the tracer check) while it reads them; a writer moves the sources
    refs = [refx.Ref((0.0,), "c") for _ in range(64)]
    src_target = refx.get_partition(refs, "c")
    stop = threading.Event()

    def writer():
        g = 0.0
        while not stop.is_set():
            g += 1.0
            refx.update_refs(src_target, {p: (g,) for p in src_target})

    import gc

    torn = 0
    old_threshold = gc.get_threshold()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(20)
    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            dst = [refx.Ref((0.0,), "c") for _ in refs]
            for _ in range(5):
                _Yield()
            refx.update_refs(dst, refs)
            torn += len({d.value for d in dst}) > 1
    finally:
        stop.set()
        t.join()
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_interval)
    assert torn == 0
