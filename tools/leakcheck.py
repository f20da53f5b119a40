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
  gc objs   len(gc.get_objects()): GC-tracked objects, per call.
  refcount  sys.getrefcount of the objects refx holds on to (values,
            collections, treedefs, cached paths, a Partition, a Value, Refs
            of this and of a finished trace, a tracer), before and after
            each operation: the "refs" column is the total drift over all
            its calls.  A missing DECREF shows here even when the object
            stays alive anyway (checked: deleting one Py_DECREF in deref's
            loop reads "deref ... 2400  LEAK (refs of shared Ref in TREE)"
            over 1,200 calls and nothing else).

Why not Debian's debug interpreter (python3.11-dbg) and
sys.gettotalrefcount()?  JAX imports and runs under it, but jaxlib is
compiled against release headers: its Py_DECREFs do not update the debug
interpreter's total, so plain jax.tree_util.tree_flatten "drifts" +3
references per call with nothing leaked (measured), swamping the signal.

A Python-level equivalent of a debug build's total refcount, then: every
operation's drift is measured on the objects it can touch, plus every
allocation, which is where a leak on a fresh object lands.

Prints one row per operation and exits 1 if anything drifts.
"""

from __future__ import annotations

import collections
import copy
import gc
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

import refx
import refx.nn as nn

N = 20000  # calls measured per operation
WARMUP = 200
# blocks per call above which an operation counts as leaking: a real leak is
# >= 1 block per call; allocator noise stays below 0.001.
LIMIT = 0.01


# The collection of the model's parameters.  Built at run time, so not the
# interned "params" that any other module may hold and release while an
# operation is measured (CI saw its count move by one: not refx's doing).
PARAMS = "-".join(["params", "leakcheck"])


def model():
    w0 = refx.Ref(jnp.ones(2), PARAMS)
    layers = [{"w": w0 if i % 4 == 0 else refx.Ref(jnp.ones(2), PARAMS),
               "b": refx.Ref(jnp.zeros(2), PARAMS),
               "m": refx.Ref(jnp.zeros(2), "stats")} for i in range(8)]
    return {"layers": layers, "head": w0, "n": 3}


def deref_after_write():
    R.value = R.value + 1.0
    return refx.deref([R, TREE])


TREE = model()
D = refx.deref(TREE)
PARTS, TD = refx.tree_partition(D, PARAMS)
TARGET = refx.get_partition(TREE, PARAMS)
CKPT = {k: v.value for k, v in refx.get_partition(D, PARAMS).items() if isinstance(v, refx.Value)}
R = refx.Ref(1.0, "c")
DTD = jax.tree_util.tree_structure(D)
OTHER = list(range(len(PARTS[0])))  # another tree with as many leaves
P_KIDS, P_AUX = refx._core._partition_flatten(PARTS[1])


class _AuxTuple(tuple):  # aux data of this type is unflattened item by item
    pass


# aux data equal to P_AUX but of other objects (new path tuples too, so the
# probed paths are not held by their entries): more of them than the cache
# has slots, so entries are evicted and made again on every call, while the
# set of slots in use stays fixed once each has been unflattened once
P_AUX_POOL = [(tuple(tuple(list(p)) for p in P_AUX[0]), tuple(P_AUX[1])) for _ in range(150)]
_pool_at = [0]


def partition_unflatten_churn():
    """Partition unflatten through the template cache: an entry evicting
    another, the cached one, and the item-by-item path (crafted aux)."""
    _pool_at[0] = (_pool_at[0] + 1) % len(P_AUX_POOL)
    refx._core._partition_unflatten(P_AUX_POOL[_pool_at[0]], P_KIDS)
    refx._core._partition_unflatten(P_AUX, P_KIDS)
    refx._core._partition_unflatten(_AuxTuple(P_AUX), P_KIDS)
    refx._core._partition_unflatten(((("a",), ("a",)), ()), [1, 2])  # two paths alike
    refx._core._partition_unflatten((((1,),), ()), [1])  # a non-str path


COLL = ("unique", "collection")  # a collection no one else holds


class Boom(Exception):
    pass


class BadEq:
    def __hash__(self):
        return 7

    def __eq__(self, other):
        raise Boom("eq")


BADEQ_TREE = [refx.Ref(1.0, BadEq())]
COLL_TREE = [refx.Ref(jnp.ones(2), COLL), refx.Ref(jnp.ones(2), COLL)]
LEAKED = []  # a Ref of a finished jit trace, and one of its tracers


@jax.jit
def _leak(x):
    LEAKED.append(refx.Ref(x))
    LEAKED.append(x)
    return x


_leak(jnp.ones(()))
OTHER_TRACE_REF, TRACER = LEAKED


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
    # refused after two Refs were made: they are released unseen
    "reref refused late": lambda: expect(
        ValueError, refx.reref, [refx.Value(jnp.ones(2), 0), refx.Value(2.0, 1), refx.Index(5)]),
    # each write drops the Value deref kept in the Ref; each deref makes one
    "deref after a write": deref_after_write,
    "clone": lambda: refx.clone(TREE),
    # deref/clone's and reref's memos: two structures in turn, each call
    # hitting the memo the other put second
    "deref/reref, two structures in turn": lambda: (
        refx.reref(refx.deref(TREE)), refx.reref(refx.deref([R, R]))),
    "tree_partition": lambda: refx.tree_partition(TREE, PARAMS, refx.Ref),
    "tree_partition deref'ed": lambda: refx.tree_partition(D, PARAMS),
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
    "Ref.value set, other trace": lambda: expect(ValueError, setattr, OTHER_TRACE_REF, "value", 1.0),
    "Ref.value set, foreign tracer": lambda: expect(ValueError, setattr, R, "value", [TRACER]),
    "Ref() raising __hash__": lambda: expect(Boom, refx.Ref, 1, BadHashColl()),
    "clone of deref'ed": lambda: expect(ValueError, refx.clone, D),
    "deref/reref/clone, tuple collection": lambda: refx.reref(refx.deref(refx.clone(COLL_TREE))),
    "reref Index collection mismatch": lambda: expect(
        ValueError, refx.reref, [refx.Value(1, 0, "a"), refx.Index(0, "b")]),
    "get_partition bad filter": lambda: expect(TypeError, refx.get_partition, TREE, [1]),
    "get_partition raising __eq__": lambda: expect(Boom, refx.get_partition, BADEQ_TREE, "c"),
    "tree_partition raising is_leaf": lambda: expect(
        ZeroDivisionError, refx.tree_partition, TREE, is_leaf=lambda x: 1 / 0),
    # tree_partition(OTHER) puts its treedef in the path cache (other tests
    # clear it), which is what lets merge_partitions check the paths
    "merge_partitions other treedef": lambda: expect(
        ValueError, refx.merge_partitions, PARTS, refx.tree_partition(OTHER)[1]),
    "merge_partitions missing path": lambda: expect(
        ValueError, refx.merge_partitions, (PARTS[0], {("x",): 1}), TD),
    "update_refs by path error": lambda: expect(ValueError, refx.update_refs, TARGET, {("nope",): 1.0}),
    "update_refs trace error": lambda: expect(ValueError, refx.update_refs, [OTHER_TRACE_REF], [1.0]),
    "update_refs raising __eq__": lambda: expect(
        Boom, refx.update_refs, BADEQ_TREE, [refx.Value(1.0, 0, "c")]),
    "Value/Index flatten+unflatten": lambda: jax.tree_util.tree_unflatten(DTD, jax.tree_util.tree_leaves(D)),
    "Partition flatten_with_path": lambda: jax.tree_util.tree_flatten_with_path(PARTS[1]),
    "Partition unflatten, template cache": partition_unflatten_churn,
    "Partition unflatten error": lambda: expect(ValueError, refx._core._partition_unflatten, P_AUX, [1]),
    "Not/All/Any()": lambda: (refx.Not("c"), refx.All(refx.Ref, "c"), refx.Any(int, ("c", refx.Ref))),
    "Not() bad filter": lambda: expect(TypeError, refx.Not, []),
    "filter raising": lambda: expect(ZeroDivisionError, refx.Any(lambda x: 1 / 0), R),
    # issue 10: merge by path with a treedef the cache does not hold, paths
    # of non-canonical trees, structure errors, by-path subtrees and shape
    # checks, tracers refused by reref, pickle/copy of subclasses
    "merge_partitions, jax treedef": lambda: refx.merge_partitions(
        (dict(reversed(list(JAX_PART.items()))),), JAX_TD),
    # (a bool key: float keys warm up CPython's dtoa free lists, ~2 MB once)
    "tree_partition, non-canonical keys": lambda: refx.merge_partitions(
        *refx.tree_partition({True: R, 2: 2}, "c")),
    "update_refs structure error": lambda: expect(ValueError, refx.update_refs, TREE, [1.0]),
    "update_refs by path, subtree entry": lambda: refx.update_refs(SUB_PART, SUB_SRC),
    "update_refs by path, wrong shape": lambda: expect(ValueError, refx.update_refs, SHAPE_PART, SHAPE_SRC),
    "reref of a dead tracer": lambda: expect(ValueError, refx.reref, DEAD),
    # (pickle takes the same __reduce__/__setstate__ path)
    "copy/deepcopy of a Ref subclass": lambda: (copy.copy(SUB_REF), copy.deepcopy(SUB_REF)),
    "Ref.__init__ on a live Ref": lambda: expect(TypeError, R.__init__, 1.0, "other"),
    "Value index too large": lambda: expect(ValueError, refx.Value, 1, 2**70),
    # the hostile review's fixes: a subclass's attributes read afresh, a
    # scalar refused for an int array, a Ref of another class refused
    "deref of a subclass with attributes": lambda: refx.deref([SUB_REF, SUB_REF]),
    "update_refs by path, scalar of another kind": lambda: expect(
        ValueError, refx.update_refs, INT_PART, {("s",): 2.5}),
    "update_refs, source Ref of another class": lambda: expect(
        ValueError, refx.update_refs, [R], [SUB_REF]),
    # issue 13: a declared sharding calls the place hook (refx/_sharding.py)
    # from Ref()/replace: no mesh here, so it returns the value; a bad
    # declaration is the hook's TypeError
    "Ref() with sharding": lambda: refx.Ref(1.0, "c", sharding=("model", None)),
    "Ref() bad sharding": lambda: expect(TypeError, refx.Ref, 1.0, sharding="model"),
    "Ref.replace(sharding=...)": lambda: R.replace(sharding=("data",)),
    # the getter binds refx._inspect's renderer (treescope is not imported)
    "__treescope_repr__ getter": lambda: (
        R.__treescope_repr__, refx.NOTHING.__treescope_repr__, PARTS[0].__treescope_repr__,
        refx.Index(0, "c").__treescope_repr__),
}

JAX_TD = jax.tree_util.tree_structure({"x": 0, "y": [0, 0]})
JAX_PART = {("x",): 1.0, ("y", "0"): 2.0, ("y", "1"): 3.0}
_SUB = (refx.Ref(1.0, "c"), refx.Ref(2.0, "c"))
SUB_PART = refx.get_partition({"block": _SUB}, ..., is_leaf=lambda x: isinstance(x, tuple))
SUB_SRC = {("block",): (1.0, 2.0)}
SHAPE_PART = refx.get_partition({"w": refx.Ref(np.ones((3, 2), np.float32), "c")}, "c")
SHAPE_SRC = {("w",): np.ones((2, 3), np.float32)}


def _dead_tracer_tree():
    out = {}

    @jax.jit
    def f(x):
        out["d"] = refx.deref({"w": refx.Ref(x)})
        return x

    f(jnp.ones(2))
    return out["d"]


DEAD = _dead_tracer_tree()


class SubRef(refx.Ref):
    pass


SUB_REF = SubRef([1.0], "c")
INT_PART = refx.get_partition({"s": refx.Ref(np.array(0, np.int32), "c")}, "c")
SUB_REF.note = "kept"


class BadHashColl:
    def __hash__(self):
        raise Boom("hash")


# ---- refx.jit / jit_partial / Static / Dag / grad helpers (jit.c) ----
# Their own trees: a jitted step writes some Refs, so TREE's probed values
# would change hands on purpose.


def jmodel():
    w = refx.Ref(jnp.ones(2), PARAMS)
    return {"w": w, "tied": w, "b": refx.Ref(jnp.zeros(2), PARAMS),
            "keep": refx.Ref(jnp.full(2, 3.0), "stats"), "n": refx.Ref(jnp.array(0), "count")}


JTREE = jmodel()
JKEEP = JTREE["keep"].value  # never written: its refcount must not move
JX = jnp.ones(2)


def _jstep(m, x):
    m["n"].value = m["n"].value + 1
    m["b"].value = m["b"].value + x
    return m["w"], refx.Ref(x, "new"), m["keep"].value.sum()


def _jeval(m, x, *, scale):
    return m["w"].value * scale + x


JSTEP = refx.jit(_jstep)
JEVAL = refx.jit(_jeval, static_argnames="scale")
JPART = refx.jit_partial(_jstep, JTREE)
DONATED = {"d": refx.Ref(jnp.ones(2), PARAMS)}
JDONATE = refx.jit(lambda m, x: m["d"].value.sum() + x.sum(), donate_argnums=0)
JWRITE_OTHER = refx.jit(lambda r: setattr(r, "value", r.value + 1))
_OTHER = []
jax.jit(lambda x: _OTHER.append(refx.Ref(np.ones(2, np.float32))) or x)(1.0)
OTHER_TRACE_CONCRETE = _OTHER[0]  # a Ref of a finished trace, concrete value
try:
    JWRITE_OTHER(OTHER_TRACE_CONCRETE)  # compiles; the write is refused
except ValueError:
    pass
STATIC = refx.Static(("relu", 3))
SDEF = jax.tree_util.tree_structure([STATIC, 1.0])
DAG_TD = jax.tree_util.tree_structure(refx.Dag(JTREE))
GRAD_R = refx.Ref(jnp.ones(2), PARAMS)
for _f, _a in ((JSTEP, (JTREE, JX)), (JPART, (JX,)), (JDONATE, (DONATED, JX))):
    _f(*_a)  # compile before measuring (the gc-object count spans the warm-up)
JEVAL(JTREE, JX, scale=2.0)

OPS.update({
    "refx.jit call (writes, Refs out)": lambda: JSTEP(JTREE, JX),
    "refx.jit call (static kwarg, no write)": lambda: JEVAL(JTREE, JX, scale=2.0),
    "refx.jit_partial call": lambda: JPART(JX),
    "refx.jit donating call": lambda: JDONATE(DONATED, JX),
    "refx.jit unhashable static": lambda: expect(TypeError, JEVAL, JTREE, JX, scale=[1]),
    "refx.jit writes other-trace Ref": lambda: expect(ValueError, JWRITE_OTHER, OTHER_TRACE_CONCRETE),
    "refx.jit(...) and jit_partial(...)": lambda: (refx.jit(_jstep), refx.jit_partial(_jstep, JTREE)),
    "Static()/flatten/unflatten": lambda: jax.tree_util.tree_unflatten(
        SDEF, jax.tree_util.tree_leaves([refx.Static(("a", 1)), 1.0])),
    "Static() unhashable": lambda: expect(TypeError, refx.Static, [1]),
    "Dag flatten/unflatten": lambda: jax.tree_util.tree_unflatten(
        DAG_TD, jax.tree_util.tree_leaves(refx.Dag(JTREE))).tree,
    "_make_refs/_write_refs": lambda: refx._core._write_refs(
        refx._core._make_refs([JX], (PARAMS,), (refx.Ref,)), [JX]),
    "_write_refs other trace": lambda: expect(
        ValueError, refx._core._write_refs, [GRAD_R, OTHER_TRACE_REF], [JX, JX]),
})


# ---- closed-over Refs (ref.c's capture, jit.c's closure entries), donation ----
CLOSED = refx.Ref(jnp.ones(2), PARAMS)
CLOSED_N = refx.Ref(jnp.array(0), "count")


def _jclose(x):
    CLOSED_N.value = CLOSED_N.value + 1  # closed over, written
    return CLOSED.value * x  # closed over, read


JCLOSE = refx.jit(_jclose)
PYTREE = {"s": refx.Ref({"a": jnp.ones(2), "b": [jnp.zeros(2)]}, "opt")}
JDONATE_W = refx.jit(lambda m: setattr(m["s"], "value", jax.tree_util.tree_map(
    lambda v: v + 1, m["s"].value)), donate_argnums=0)


class Tagged(refx.Ref):
    pass


TAGGED = Tagged(jnp.ones(2), PARAMS)
TAGGED.tags = [1, 2]  # unhashable: part of the cache key
JTAGGED = refx.jit(lambda r: r.value * 2)
CAP_STAND = refx.Ref(jnp.ones(2), PARAMS)  # a stand-in, as a capturing trace makes


def _captured_read_write():
    # the C getter and setter asking the capture hook (ref.c), without the
    # cost of a trace: a frame whose stand-in for CLOSED is CAP_STAND
    with refx._lift.capturing({CLOSED: CAP_STAND}):
        CLOSED.value = CLOSED.value  # read and written through CAP_STAND


JPART_CL = refx.jit_partial(lambda m, x: m["c"].value * x, {"c": CLOSED})


def _captured_c_paths():
    # deref, update_refs, copy, replace and a jit_partial's bound Refs
    # through the stand-in (ref.c refx_substitute_captured, jit.c
    # substitute_bound)
    with refx._lift.capturing({CLOSED: CAP_STAND}):
        refx.deref([CLOSED, CLOSED_N])
        refx.update_refs([CLOSED], [CAP_STAND.value])
        copy.copy(CLOSED)
        CLOSED.replace(collection="other")
        JPART_CL(JX)


for _f, _a in ((JCLOSE, (JX,)), (JDONATE_W, (PYTREE,)), (JPART_CL, (JX,))):
    _f(*_a)

# ---- a Ref's pytree value through refx.jit as a Flat (flatvalue.c) ----
_FState = collections.namedtuple("_FState", "mu part")
FSTATE = refx.Ref(_FState({"a": jnp.ones(2)}, refx.get_partition(refx.deref(jmodel()), PARAMS)),
                  "opt")
JFLAT = refx.jit(lambda r: setattr(r, "value", jax.tree_util.tree_map(lambda v: v * 1, r.value)))
FTURN = [refx.Ref({"a": jnp.ones(2)}), refx.Ref([jnp.ones(2), (jnp.zeros(1),)])]
JFTURN = refx.jit(lambda r: setattr(r, "value", jax.tree_util.tree_map(lambda v: v + 1, r.value)))
_fturn_at = [0]


def _flat_alternating():
    # the same Ref number sees two structures in turn: memos made again,
    # then the number given up (and passed as it is)
    _fturn_at[0] ^= 1
    JFTURN(FTURN[_fturn_at[0]])


class _Touchy(collections.namedtuple("_Touchy", "a")):
    fail = False

    def __new__(cls, a):
        if cls.fail:
            raise Boom("touchy")
        return super().__new__(cls, a)


TOUCHY = refx.Ref(_Touchy(jnp.ones(2)))
JTOUCHY = refx.jit(lambda r: setattr(r, "value", _Touchy(r.value.a + 1)))


def _flat_rebuild_raises():
    _Touchy.fail = True
    try:
        expect(Boom, JTOUCHY, TOUCHY)
    finally:
        _Touchy.fail = False


for _f, _a in ((JFLAT, (FSTATE,)), (JFTURN, (FTURN[0],)), (JFTURN, (FTURN[1],)),
               (JTOUCHY, (TOUCHY,))):
    _f(*_a)

# ---- pending values: a written Flat left in its Ref until read ----
FPEND = [refx.Ref(_FState({"a": jnp.ones(2)}, refx.get_partition(refx.deref(jmodel()), PARAMS)),
                  "opt") for _ in range(3)]
JFLAT_DONATE = refx.jit(lambda r: setattr(r, "value", jax.tree_util.tree_map(lambda v: v * 1, r.value)),
                        donate_argnums=0)
_FIN = refx._core._flat_out([FSTATE.value])


def _pending_read():
    JFLAT(FPEND[0])
    return FPEND[0].value, repr(FPEND[0])


def _pending_c_readers():
    JFLAT(FPEND[1])
    refx.deref({"s": FPEND[1]})
    JFLAT(FPEND[1])
    refx.clone({"s": FPEND[1]})
    JFLAT(FPEND[1])
    refx.update_refs({"s": FPEND[2]}, {"s": FPEND[1]})


def _pending_donated():
    JFLAT(FPEND[2])
    JFLAT_DONATE(FPEND[2])


for _op in (_pending_read, _pending_c_readers, _pending_donated):
    _op()

OPS.update({
    "refx.jit pending write, then .value/repr": _pending_read,
    "refx.jit pending write, deref/clone/update": _pending_c_readers,
    "refx.jit pending write, then donated": _pending_donated,
    "_flat_out given the input Flats": lambda: refx._core._flat_out([FSTATE.value], _FIN),
})

OPS.update({
    "refx.jit call, pytree value as a Flat": lambda: JFLAT(FSTATE),
    "refx.jit call, pytree values alternating": _flat_alternating,
    "refx.jit call, a Flat's rebuild raising": _flat_rebuild_raises,
    "_flat_out/_flat_restore": lambda: refx._core._flat_restore(
        refx._core._flat_out([FSTATE.value, JX])),
})

OPS.update({
    "refx.jit call with closed-over Refs": lambda: JCLOSE(JX),
    "refx.jit donating a written pytree": lambda: JDONATE_W(PYTREE),
    "refx.jit unhashable Ref attribute": lambda: expect(TypeError, JTAGGED, TAGGED),
    "Ref.value through a capture stand-in": _captured_read_write,
    "deref/update_refs/copy/jit_partial through a stand-in": _captured_c_paths,
})


# ---- refx.mutable (the write check in ref.c, and jit.c's refused write-back) ----
MUT_COLL = "-".join(["stats", "leakcheck"])  # built at run time: not an interned str
MUT_STATS = refx.mutable(MUT_COLL)
MUT_R = refx.Ref(1.0, MUT_COLL)
MUT_JTREE = jmodel()
JSTEP(MUT_JTREE, JX)  # compiled outside the block: the refusal is the write-back's


def _mutable_set(ref, value):
    with MUT_STATS:
        ref.value = value


def _mutable_jit_refused():
    with MUT_STATS:
        expect(ValueError, JSTEP, MUT_JTREE, JX)


MUT_DONATED = {"d": refx.Ref(jnp.ones(2), PARAMS)}
JDONATE_MUT = refx.jit(lambda m: setattr(m["d"], "value", m["d"].value + 1), donate_argnums=0)
JDONATE_MUT(MUT_DONATED)  # compiled outside the block: the refusal is before the call


def _mutable_donate_refused():
    with MUT_STATS:
        expect(ValueError, JDONATE_MUT, MUT_DONATED)


OPS.update({
    "Ref.value set in refx.mutable, accepted": lambda: _mutable_set(MUT_R, 2.0),
    "Ref.value set in refx.mutable, refused": lambda: expect(ValueError, _mutable_set, R, 2.0),
    "update_refs in refx.mutable, refused": lambda: expect(
        ValueError, _mutable_set_all, [MUT_R, R], [1.0, 2.0]),
    "refx.jit write-back refused by refx.mutable": _mutable_jit_refused,
    "refx.jit donation refused by refx.mutable": _mutable_donate_refused,
})


def _mutable_set_all(refs, values):
    with MUT_STATS:
        refx.update_refs(refs, values)


# ---- refx.nn.Module's flatten (nnmodule.c), through jaxlib and refx.jit ----
NN_RNGS = nn.Rngs(0)
NN_MODEL = nn.Sequential(nn.Linear(2, 3, rngs=NN_RNGS), nn.BatchNorm(3, rngs=NN_RNGS),
                         nn.Dropout(0.5, rngs=NN_RNGS), nn.Linear(3, 2, rngs=NN_RNGS))
NN_STATIC = ("-".join(["static", "leakcheck"]), 3)  # a hashable static, not an atom
NN_CFG = [1, {"a": [2]}]  # an unhashable static: a _Frozen in the aux data
NN_NAME = "-".join(["attr", "leakcheck"])  # an attribute name built at run time
vars(NN_MODEL).update({"static": NN_STATIC, "cfg": NN_CFG, NN_NAME: 7})
NN_MODEL.eval()
NN_TD = jax.tree_util.tree_structure(NN_MODEL)
NN_NONES = jax.tree_util.tree_map(lambda _: None, NN_MODEL)  # forced children


class _BadHash:
    def __hash__(self):
        raise Boom("hash")


class _ResizingHash:
    """A static whose hash resizes its module's dict: the RuntimeError."""

    def __init__(self):
        self.d = None

    def __hash__(self):
        if self.d.pop("extra", None) is None:
            self.d["extra"] = 1
        return 1


# attributes the C flatten walks by _is_state's isinstance steps, called
# directly (jaxlib's own flatten of a namedtuple allocates a few blocks
# now and then for a while: not refx's)
NN_ODD = nn.Sequential()
vars(NN_ODD).update(state=collections.namedtuple("S", "n w")(1, refx.Ref(jnp.ones(2))),
                    opts=collections.OrderedDict(a=1, b=(2, 3)), fn=len,
                    nested=[{"x": (1, [2, NN_STATIC])}])
NN_BADHASH = nn.Sequential()
vars(NN_BADHASH)["h"] = _BadHash()
NN_RESIZING = nn.Sequential()
vars(NN_RESIZING)["h"] = _ResizingHash()
vars(NN_RESIZING)["h"].d = vars(NN_RESIZING)
JNN = refx.jit(lambda m, x: m(x))
JNN(NN_MODEL, JX.reshape(1, 2))

OPS.update({
    "nn.Module flatten/unflatten": lambda: jax.tree_util.tree_unflatten(
        NN_TD, jax.tree_util.tree_leaves(NN_MODEL)),
    "nn.Module flatten_with_path": lambda: jax.tree_util.tree_flatten_with_path(NN_MODEL),
    "nn.Module flatten, forced children": lambda: jax.tree_util.tree_flatten(NN_NONES),
    "nn.Module flatten (C, direct), subclass walks": lambda: (
        nn._module._flatten(NN_ODD), nn._module._flatten_with_keys(NN_ODD)),
    "nn.Module flatten, hash raising": lambda: expect(Boom, jax.tree_util.tree_flatten, NN_BADHASH),
    "nn.Module flatten, dict resized": lambda: expect(RuntimeError, jax.tree_util.tree_flatten, NN_RESIZING),
    "refx.jit call, nn model": lambda: JNN(NN_MODEL, JX.reshape(1, 2)),
})


# ---- refx.jit's argument flatten memo (flatmemo.c): hits, misses, rebuilds ----
MEMO_TREE = ({"a": JX, "m": NN_MODEL, "l": [None, 1.0]},)
MEMO_BOX, MEMO_BOX2 = [None], [None]
refx._core._memo_flatten(MEMO_BOX, MEMO_TREE)
MEMO_ALT = [({"a": JX},), ({"a": 1.0},)]  # leaf types alternate: every call rebuilds


def _memo_alternate():
    MEMO_ALT.reverse()
    return refx._core._memo_flatten(MEMO_BOX2, MEMO_ALT[0])


OPS.update({
    "refx.jit flatten memo, hit": lambda: refx._core._memo_flatten(MEMO_BOX, MEMO_TREE),
    "refx.jit flatten memo, miss and rebuild": _memo_alternate,
    "refx.jit flatten memo, not memoized (Partition)": lambda: refx._core._memo_flatten(
        [None], (refx.deref(JTREE),)),
    "refx.jit flatten memo, hash raising": lambda: expect(
        Boom, refx._core._memo_flatten, [None], (NN_BADHASH,)),
})


DEEP = refx.Ref(0)
for _ in range(20000):  # beyond 3.13's C recursion limit (10,000) too
    DEEP = [DEEP]


PROBES = {
    "array value": TREE["layers"][1]["w"].value,
    "collection PARAMS": PARAMS,
    "collection tuple": COLL,
    "treedef": TD,
    "deref'ed treedef": DTD,
    "paths": next(iter(PARTS[0])),
    "Partition": PARTS[0],
    "Value in D": D["head"],
    "Ref R": R,
    "shared Ref in TREE": TREE["head"],
    "other-trace Ref": OTHER_TRACE_REF,
    "tracer": TRACER,
    "unwritten jit value": JKEEP,
    "jit shared Ref": JTREE["w"],
    "JitFunction": JSTEP,
    "jit cache": JSTEP._cache,
    "jit cache entry": next(iter(JSTEP._cache.values())),
    "jit static-kwarg entry": next(iter(JEVAL._cache.values())),
    "jit_partial entry": next(iter(JPART._cache.values())),
    "jit donating entry": next(iter(JDONATE._cache.values())),
    "jit closure entry": next(iter(JCLOSE._cache.values())),
    "closed-over Ref": CLOSED,
    "closed-over value": CLOSED.value,
    "jit_partial bound Refs": JPART._bound_refs,
    "jit_partial": JPART,
    "Static": STATIC,
    "refx.mutable filter": MUT_STATS.filter,
    "refx.mutable Ref": MUT_R,
    "nn model": NN_MODEL,
    "nn Param": NN_MODEL.layers[0].kernel,
    "nn static": NN_STATIC,
    "nn unhashable static": NN_CFG,
    "nn attribute name": NN_NAME,
}


def warm(op):
    """Call op WARMUP times: what its first calls cache (the path cache
    keeps a treedef, say) is not a leak."""
    for _ in range(WARMUP):
        op()


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
    # Partition unflatten's templates hold aux data (and so paths) of
    # whichever Partitions were unflattened last, and an op may evict
    # another op's entry: read the probes with that cache empty
    refx._core._clear_unflatten_cache()
    # likewise deref/clone's and reref's flatten memos (the last tree's
    # treedef, with its aux data)
    refx._core._clear_flatten_memos()
    return {k: sys.getrefcount(v) for k, v in PROBES.items()}


_KEEP: list = []


def _control_leak():
    """A deliberate leak of one small object per call: must be flagged."""
    _KEEP.append(object())


def main(n: int = N) -> int:
    tracemalloc.start()
    cb, cm = measure(_control_leak, n)
    _KEEP.clear()
    if cb <= LIMIT and (sys.getallocatedblocks() or cm <= 8.0):  # 0 blocks: PYTHONMALLOC=malloc
        print(f"leakcheck is blind: a deliberate leak read {cb:.5f} blocks/call, {cm:.2f} bytes/call")
        return 2
    print(f"refx leakcheck: {n} calls per operation after {WARMUP} warm-up calls")
    print("blocks = pymalloc blocks, bytes = tracemalloc bytes, gc objs = GC-tracked")
    print("objects, per call; refs = total refcount drift of the probe objects")
    print(f"({', '.join(PROBES)}) over all calls of the operation.")
    hdr = f"{'operation':38s} {'blocks':>9s} {'bytes':>7s} {'gc objs':>8s} {'refs':>5s}  verdict"
    print(hdr)
    print(f"{'(control: a deliberate leak)':38s} {cb:9.5f} {cm:7.2f} {'':8s} {'':5s}  LEAK, as it must")
    bad = []
    # every op warmed once before the probes are first read: what the first
    # calls cache (the Value deref keeps in each Ref, holding its
    # collection; refx.nn's kept aux pairs, holding attribute names) is not
    # drift, here as in each op's own measure
    for name, op in OPS.items():
        if name == "deep tree" and hasattr(sys, "gettotalrefcount"):
            continue
        warm(op)
    start = probe_refcounts()
    for name, op in OPS.items():
        if name == "deep tree" and hasattr(sys, "gettotalrefcount"):
            continue  # jaxlib aborts debug interpreters on too-deep trees
        warm(op)  # caches filled by the first calls are not drift
        before = probe_refcounts()  # empties Partition unflatten's cache: fill it again
        warm(op)
        objs = len(gc.get_objects())
        dblocks, dmem = measure(op, n)
        dobjs = (len(gc.get_objects()) - objs) / n
        after = probe_refcounts()
        drift = sum(after[k] - before[k] for k in PROBES)
        which = [k for k in PROBES if after[k] != before[k]]
        leak = dblocks > LIMIT or dmem > 8.0 or dobjs > LIMIT or bool(which)
        if leak:
            bad.append(name)
        verdict = "LEAK" + (f" (refs of {', '.join(which)})" if which else "") if leak else "ok"
        print(f"{name:38s} {dblocks:9.5f} {dmem:7.2f} {dobjs:8.4f} {drift:5d}  {verdict}")
    end = probe_refcounts()
    total = sum(end[k] - start[k] for k in PROBES)
    print(f"total refcount drift of the probes over all operations: {total}")
    print(f"{len(OPS) - len(bad)}/{len(OPS)} operations without drift" if not bad
          else f"drifting: {', '.join(bad)}")
    return 1 if bad or total else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else N))
