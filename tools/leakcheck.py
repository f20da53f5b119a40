"""Leak check: drift per call of every public refx operation and error path.

Run by `make leakcheck` (and, with fewer calls, by tests/test_leaks.py).
After a warm-up, each operation runs N times and three things must not
grow:

  blocks    sys.getallocatedblocks(): every live pymalloc block, i.e. every
            small Python object.  A leaked object or reference cycle shows
            as >= 1 block per call (measured: a deliberate one-object leak
            reads 2.0/call; jax.tree_util.tree_flatten reads 0.00005).
  bytes     tracemalloc: Python allocations of any size (large lists and
            buffers bypass pymalloc), per call.
  refcount  sys.getrefcount of the objects refx holds on to: values,
            collections, the treedef, the cached paths.  A missing DECREF
            shows here even when the object stays alive anyway.

Why not Debian's debug interpreter (python3.11-dbg) and
sys.gettotalrefcount()?  JAX imports and runs under it, but jaxlib is
compiled against release headers: its Py_DECREFs do not update the debug
interpreter's total, so plain jax.tree_util.tree_flatten "drifts" +3
references per call with nothing leaked (measured), swamping the signal.

Prints one row per operation and exits 1 if anything drifts.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import jax
import jax.numpy as jnp

import refx

N = 20000  # calls measured per operation
WARMUP = 200
# blocks per call above which an operation counts as leaking: a real leak is
# >= 1 block per call; allocator noise stays below 0.001.
LIMIT = 0.01


def model():
    w0 = refx.Ref(jnp.ones(2), "params")
    layers = [{"w": w0 if i % 4 == 0 else refx.Ref(jnp.ones(2), "params"),
               "b": refx.Ref(jnp.zeros(2), "params"),
               "m": refx.Ref(jnp.zeros(2), "stats")} for i in range(8)]
    return {"layers": layers, "head": w0, "n": 3}


TREE = model()
D = refx.deref(TREE)
PARTS, TD = refx.tree_partition(D, "params")
TARGET = refx.get_partition(TREE, "params")
CKPT = {k: v.value for k, v in refx.get_partition(D, "params").items() if isinstance(v, refx.Value)}
R = refx.Ref(1.0, "c")


def expect(exc, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except exc:
        return
    raise AssertionError(f"{f} did not raise {exc}")


def set_value():
    R.value = 2.0
    return R.value


OPS = {
    "Ref()": lambda: refx.Ref(1.0, "c"),
    "Ref() unhashable": lambda: expect(TypeError, refx.Ref, 1, []),
    "Ref.value get/set": set_value,
    "Value()/Index()": lambda: (refx.Value(1, 0, "c"), refx.Index(0, "c")),
    "Value() bad index": lambda: expect(ValueError, refx.Value, 1, -1),
    "deref": lambda: refx.deref(TREE),
    "deref of deref'ed": lambda: expect(ValueError, refx.deref, D),
    "reref": lambda: refx.reref(D),
    "reref of Refs": lambda: expect(ValueError, refx.reref, TREE),
    "reref Index first": lambda: expect(ValueError, refx.reref, [refx.Index(0), refx.Value(1, 0)]),
    "clone": lambda: refx.clone(TREE),
    "tree_partition": lambda: refx.tree_partition(TREE, "params", refx.Ref),
    "tree_partition deref'ed": lambda: refx.tree_partition(D, "params"),
    "tree_partition is_leaf": lambda: refx.tree_partition(TREE, is_leaf=lambda x: False),
    "tree_partition bad filter": lambda: expect(TypeError, refx.tree_partition, TREE, 5),
    "tree_partition raising filter": lambda: expect(ZeroDivisionError, refx.tree_partition, TREE, lambda x: 1 / 0),
    "get_partition": lambda: refx.get_partition(TREE, refx.Not("stats")),
    "merge_partitions": lambda: refx.merge_partitions(PARTS, TD),
    "merge_partitions two values": lambda: expect(ValueError, refx.merge_partitions, (PARTS[0], PARTS[0]), TD),
    "update_refs Values": lambda: refx.update_refs(TARGET, PARTS[0]),
    "update_refs by path": lambda: refx.update_refs(TARGET, CKPT),
    "update_refs count error": lambda: expect(ValueError, refx.update_refs, TREE, [1]),
    "update_refs sharing error": lambda: expect(ValueError, refx.update_refs, [R, R], [1.0, 2.0]),
    "Partition tree_map": lambda: jax.tree_util.tree_map(lambda x: x, PARTS[0]),
    "Partition mutate": lambda: expect(TypeError, PARTS[0].__setitem__, ("a",), 1),
    "filters call": lambda: (refx.Not("c")(R), refx.All(refx.Ref, "c")(R), refx.Any(int)(R)),
    "deep tree": lambda: expect(RecursionError, refx.deref, DEEP),
}

DEEP = refx.Ref(0)
for _ in range(5000):
    DEEP = [DEEP]


PROBES = {
    "array value": TREE["layers"][1]["w"].value,
    "collection 'params'": "params",
    "treedef": TD,
    "paths": next(iter(PARTS[0])),
    "Ref R": R,
}


def measure(op, n=N):
    """(pymalloc blocks, tracemalloc bytes) per call over n calls."""
    for _ in range(WARMUP):
        op()
    gc.collect()
    blocks = sys.getallocatedblocks()
    mem = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    for _ in range(n):
        op()
    gc.collect()
    dblocks = (sys.getallocatedblocks() - blocks) / n
    dmem = (tracemalloc.get_traced_memory()[0] - mem) / n if tracemalloc.is_tracing() else 0.0
    return dblocks, dmem


def probe_refcounts():
    return {k: sys.getrefcount(v) for k, v in PROBES.items()}


_KEEP: list = []


def _control_leak():
    """A deliberate leak of one small object per call: must be flagged."""
    _KEEP.append(object())


def main(n: int = N) -> int:
    tracemalloc.start()
    cb, cm = measure(_control_leak, n)
    _KEEP.clear()
    if cb <= LIMIT:
        print(f"leakcheck is blind: a deliberate leak read {cb:.5f} blocks/call")
        return 2
    print(f"refx leakcheck: {n} calls per operation after {WARMUP} warm-up calls")
    print(f"{'operation':32s} {'blocks/call':>12s} {'bytes/call':>11s}  verdict")
    print(f"{'(control: a deliberate leak)':32s} {cb:12.5f} {cm:11.2f}  LEAK, as it must")
    bad = []
    before = probe_refcounts()
    for name, op in OPS.items():
        if name == "deep tree" and hasattr(sys, "gettotalrefcount"):
            continue  # jaxlib aborts debug interpreters on too-deep trees
        dblocks, dmem = measure(op, n)
        leak = dblocks > LIMIT or dmem > 8.0
        if leak:
            bad.append(name)
        print(f"{name:32s} {dblocks:12.5f} {dmem:11.2f}  {'LEAK' if leak else 'ok'}")
    after = probe_refcounts()
    for k in PROBES:
        drift = after[k] - before[k]
        print(f"refcount of {k:22s} {before[k]:6d} -> {after[k]:6d}  {'DRIFT' if drift else 'ok'}")
        if drift:
            bad.append(f"refcount of {k}")
    print(f"{len(OPS) - len(bad)}/{len(OPS)} operations without drift" if not bad
          else f"drifting: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else N))
