"""A pure-Python reference implementation of refx's algorithms.

Used two ways, never imported by refx itself:

* as the test oracle: ``make_oracle(refx.Ref, refx.Value, refx.Index,
  refx.NOTHING, refx.Partition)`` runs these algorithms over refx's own C
  types, so its results compare directly with the C core's;
* as the benchmark baseline: ``PURE`` runs them over the pure-Python
  classes defined here (``PyRef`` & co., registered with JAX), i.e. refx
  as it would be without a C core.

It follows the spec plainly (jax.tree_util with is_leaf, Python dicts,
one pass per concern) and is written for clarity, not speed.
"""

from __future__ import annotations

import types
import weakref
from typing import Any
from collections.abc import Callable

import jax
from jax._src import core as _jcore

tu = jax.tree_util


def _current_trace_ref():
    # the trace's one plain weakref (the same object while anyone holds it)
    return weakref.ref(_jcore.trace_ctx.trace)


# ---------------------------------------------------------------------------
# pure-Python node types (the benchmark's "refx without C")
# ---------------------------------------------------------------------------


class PyRef:
    __slots__ = ("_value", "collection", "_trace", "__weakref__")

    def __init__(self, value, collection=None):
        hash(collection)
        self._value = value
        self.collection = collection
        self._trace = _current_trace_ref()

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        if self._trace is not _current_trace_ref():
            raise ValueError("Cannot mutate Ref from a different trace level")
        self._value = value

    def __repr__(self):
        return f"PyRef(value={self._value!r}, collection={self.collection!r})"


class PyDeref:
    __slots__ = ("index", "collection")


class PyValue(PyDeref):
    __slots__ = ("value",)

    def __init__(self, value, index, collection=None):
        self.value = value
        self.index = index
        self.collection = collection


class PyIndex(PyDeref):
    def __init__(self, index, collection=None):
        self.index = index
        self.collection = collection


class _PyNothing:
    def __repr__(self):
        return "PY_NOTHING"


PY_NOTHING = _PyNothing()

tu.register_pytree_node(
    PyValue,
    lambda v: ((v.value,), (v.index, v.collection)),
    lambda aux, ch: PyValue(ch[0], *aux),
)
tu.register_pytree_node(
    PyIndex, lambda v: ((), (v.index, v.collection)), lambda aux, ch: PyIndex(*aux)
)
tu.register_pytree_node(_PyNothing, lambda n: ((), None), lambda aux, ch: PY_NOTHING)


# ---------------------------------------------------------------------------
# the algorithms
# ---------------------------------------------------------------------------


def _key_str(k) -> list[str]:
    if isinstance(k, tu.SequenceKey):
        return [str(k.idx)]
    if isinstance(k, tu.DictKey):
        if isinstance(k.key, tuple):
            return [str(p) for p in k.key]
        return [str(k.key)]
    if isinstance(k, tu.GetAttrKey):
        return [k.name]
    if isinstance(k, tu.FlattenedIndexKey):
        return [str(k.key)]
    return [str(k)]


def keypath_to_path(kp) -> tuple[str, ...]:
    out: list[str] = []
    for k in kp:
        out.extend(_key_str(k))
    return tuple(out)


def make_oracle(Ref, Value, Index, NOTHING, Partition=dict) -> types.SimpleNamespace:
    """The refx algorithms over the given node types."""
    Deref = (Value, Index)

    def is_deref(x):
        return isinstance(x, Deref)

    def is_refx_leaf(x):
        return x is NOTHING or isinstance(x, (Ref, Value, Index))

    def new_ref(value, collection):
        return Ref(value, collection)

    def deref(tree):
        leaves, treedef = tu.tree_flatten(tree, is_leaf=is_deref)
        seen: dict[int, int] = {}
        out = []
        for leaf in leaves:
            if isinstance(leaf, Deref):
                raise ValueError("deref: found a Value/Index; already deref'ed?")
            if isinstance(leaf, Ref):
                if id(leaf) in seen:
                    out.append(Index(seen[id(leaf)], leaf.collection))
                else:
                    seen[id(leaf)] = len(seen)
                    out.append(Value(leaf.value, seen[id(leaf)], leaf.collection))
            else:
                out.append(leaf)
        return treedef.unflatten(out)

    def reref(tree):
        leaves, treedef = tu.tree_flatten(tree, is_leaf=is_deref)
        refs: list[Any] = []
        out = []
        for leaf in leaves:
            if isinstance(leaf, Value):
                if leaf.index != len(refs):
                    raise ValueError("reref: Value index out of order")
                refs.append(new_ref(leaf.value, leaf.collection))
                out.append(refs[-1])
            elif isinstance(leaf, Index):
                if leaf.index >= len(refs):
                    raise ValueError("reref: Index before its Value")
                if refs[leaf.index].collection != leaf.collection:
                    raise ValueError("reref: Index collection differs")
                out.append(refs[leaf.index])
            elif isinstance(leaf, Ref):
                raise ValueError("reref: found a Ref")
            else:
                out.append(leaf)
        return treedef.unflatten(out)

    def to_predicate(f) -> Callable[[Any], bool]:
        if f is Ellipsis or f is True:
            return lambda x: True
        if f is False:
            return lambda x: False
        if isinstance(f, str):
            return lambda x: (
                isinstance(x, (Ref, Value, Index)) and x.collection == f
            )
        if isinstance(f, type):
            if issubclass(f, Ref):
                # a Ref class also matches what was deref'ed from its Refs
                return lambda x: isinstance(x, f) or (
                    isinstance(x, (Value, Index))
                    and issubclass(getattr(x, "ref_type", Ref), f))
            return lambda x: isinstance(x, f)
        if isinstance(f, tuple):
            preds = [to_predicate(g) for g in f]
            return lambda x: any(p(x) for p in preds)
        if callable(f):
            return lambda x: bool(f(x))
        raise TypeError(f"bad filter {f!r}")

    def _leaves_with_paths(tree, is_leaf=None):
        if is_leaf is None:
            pred = is_refx_leaf
        else:
            pred = lambda x: is_refx_leaf(x) or bool(is_leaf(x))  # noqa: E731
        pairs, treedef = tu.tree_flatten_with_path(tree, is_leaf=pred)
        paths = [keypath_to_path(kp) for kp, _ in pairs]
        if len(set(paths)) != len(paths):
            raise ValueError("two leaves map to the same path")
        return paths, [leaf for _, leaf in pairs], treedef

    def tree_partition(tree, *filters, is_leaf=None):
        paths, leaves, treedef = _leaves_with_paths(tree, is_leaf)
        preds = [to_predicate(f) for f in filters]
        parts: list[dict] = [{} for _ in range(len(filters) + 1)]
        for path, leaf in zip(paths, leaves, strict=True):
            k = next((i for i, p in enumerate(preds) if p(leaf)), len(preds))
            for j, part in enumerate(parts):
                part[path] = leaf if j == k else NOTHING
        return tuple(Partition(p) for p in parts), treedef

    def get_partition(tree, filter, is_leaf=None):
        (first, _rest), _ = tree_partition(tree, filter, is_leaf=is_leaf)
        return first

    def merge_partitions(partitions, treedef):
        # by path, always: the treedef's own paths (its tree rebuilt with
        # placeholder leaves), looked up in every partition
        marks = list(range(treedef.num_leaves))
        pairs, _ = tu.tree_flatten_with_path(treedef.unflatten(marks))
        leaves = []
        for kp, _ in pairs:
            path = keypath_to_path(kp)
            if any(path not in p for p in partitions):
                raise ValueError(f"merge_partitions: path {path} is not in every partition")
            values = [p[path] for p in partitions if p[path] is not NOTHING]
            if len(values) != 1:
                raise ValueError(f"merge_partitions: {len(values)} values at {path}")
            leaves.append(values[0])
        if any(len(p) != len(leaves) for p in partitions):
            raise ValueError("merge_partitions: partitions have other paths")
        return treedef.unflatten(leaves)

    def update_refs(target, source):
        if isinstance(target, Partition) and isinstance(target, dict) and isinstance(
            source, dict
        ):
            if set(target) != set(source):
                raise ValueError("update_refs: paths differ")
            pairs = [(target[p], source[p]) for p in target]
        else:
            # the source must have the target's structure (anything at a
            # Ref's place): flattened up to the target's treedef
            tl, ttd = tu.tree_flatten(target, is_leaf=is_refx_leaf)
            sl = ttd.flatten_up_to(source)
            pairs = list(zip(tl, sl, strict=True))
        plan: dict[int, tuple[Any, Any]] = {}
        by_index: dict[int, Any] = {}
        first_source: dict[int, Any] = {}
        mode = None
        for t, s in pairs:
            if t is NOTHING or s is NOTHING:
                if t is not s:
                    raise ValueError("update_refs: NOTHING mismatch")
                continue
            if not isinstance(t, Ref):
                if isinstance(s, (Ref, Value, Index)):
                    raise ValueError("update_refs: target is not a Ref")
                continue
            if isinstance(s, (Ref, Value, Index)):
                m = "ref" if isinstance(s, Ref) else "deref"
                if mode not in (None, m):
                    raise ValueError("update_refs: source mixes Refs and Values")
                mode = m
            if isinstance(s, Index):
                if by_index.get(s.index) is not t:
                    raise ValueError("update_refs: Index does not line up")
                continue
            if isinstance(s, Value):
                if s.index in by_index or id(t) in first_source:
                    raise ValueError("update_refs: sharing does not line up")
                if s.collection != t.collection:
                    raise ValueError("update_refs: collection differs")
                by_index[s.index] = t
                first_source[id(t)] = s
                plan[id(t)] = (t, s.value)
                continue
            if id(t) in first_source:
                if first_source[id(t)] is not s:
                    raise ValueError("update_refs: sharing does not line up")
                continue
            first_source[id(t)] = s
            plan[id(t)] = (t, s.value if isinstance(s, Ref) else s)
        trace = _current_trace_ref()
        for t, _ in plan.values():
            if getattr(t, "_trace", trace) is not trace:
                raise ValueError("Cannot mutate Ref from a different trace level")
        for t, v in plan.values():
            t.value = v

    return types.SimpleNamespace(
        deref=deref,
        reref=reref,
        clone=lambda tree: reref(deref(tree)),
        tree_partition=tree_partition,
        get_partition=get_partition,
        merge_partitions=merge_partitions,
        update_refs=update_refs,
        to_predicate=to_predicate,
        Ref=Ref,
        Value=Value,
        Index=Index,
        NOTHING=NOTHING,
    )


PURE = make_oracle(PyRef, PyValue, PyIndex, PY_NOTHING)


# ---------------------------------------------------------------------------
# refx.nn.Module's pytree flatten, as it was in Python
# ---------------------------------------------------------------------------


def make_module_flatten(_module) -> types.SimpleNamespace:
    """refx.nn.Module's flatten and flatten_with_keys as Python code, the
    implementation refx/nnmodule.c replaced: the oracle of
    tests/test_nn_flatten.py.  The rule itself (_is_state, _Frozen, _CHILD,
    the mark) is taken from `_module` (refx.nn._module), which still uses
    it; this is the loop around it."""
    _is_state, _Frozen, _CHILD, _MARK = (
        _module._is_state, _module._Frozen, _module._CHILD, _module._MARK)

    def _static(v):
        try:
            hash(v)
        except TypeError:
            return _Frozen(v)
        return v

    def flatten(m):
        children = []
        aux = []
        d = vars(m)
        forced = d.get(_MARK, ())
        for k, v in d.items():
            if k == _MARK:
                continue
            if k in forced or _is_state(v):
                children.append(v)
                aux.append((k, _CHILD))
            else:
                aux.append((k, type(v), _static(v)))
        return children, tuple(aux)

    def flatten_with_keys(m):
        children = []
        aux = []
        d = vars(m)
        forced = d.get(_MARK, ())
        for k, v in d.items():
            if k == _MARK:
                continue
            if k in forced or _is_state(v):
                children.append((tu.GetAttrKey(k), v))
                aux.append((k, _CHILD))
            else:
                aux.append((k, type(v), _static(v)))
        return children, tuple(aux)

    return types.SimpleNamespace(flatten=flatten, flatten_with_keys=flatten_with_keys,
                                 is_state=_is_state)
