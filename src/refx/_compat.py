"""The one place that knows JAX's versions.

The C core (refx._core) never imports jax.  This module picks the JAX
calls that fit the installed version, hands them to the core, and
registers Value, Index, NOTHING and Partition as pytree nodes with the
core's C flatten/unflatten functions.  Nothing else in refx touches JAX
internals.

Supported: JAX with "stackless" tracing (0.4.36 and later), where the
current trace is ``jax._src.core.trace_ctx.trace`` and every trace keeps a
precomputed weak reference to itself (``Trace._weakref``).
"""

from __future__ import annotations

import weakref

import jax
import numpy as np
from jax._src import core as _jcore
from jax._src import tree_util as _tu

from . import _core

_registry = _tu.default_registry
_flatten = _registry.flatten
_flatten_with_path = getattr(_registry, "flatten_with_path", None)
if _flatten_with_path is None:  # older jaxlib: the Python wrapper does it

    def _flatten_with_path(tree, is_leaf=None):
        return jax.tree_util.tree_flatten_with_path(tree, is_leaf)


# ``trace_state.value`` is the current trace's weakref (one attribute read
# from C).  Older stackless versions (0.4.36-0.5) only have
# ``trace_ctx.trace`` and traces without a precomputed ``_weakref``;
# ``weakref.ref(trace)`` then returns the trace's one plain weakref, the
# same object for as long as any Ref holds it, so identity still works.
if hasattr(_jcore, "trace_state") and hasattr(_jcore.trace_state, "value"):
    _trace_state = _jcore.trace_state
else:

    class _TraceState:
        __slots__ = ()

        @property
        def value(self):
            trace = _jcore.trace_ctx.trace
            ref = getattr(trace, "_weakref", None)
            return ref if ref is not None else weakref.ref(trace)

    _trace_state = _TraceState()

_Tracer = jax.core.Tracer


def _encloses(outer, trace) -> bool:
    """True if `outer` is `trace` or one of the traces it runs inside."""
    while trace is not None:
        if trace is outer:
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def check_value(value, trace_ref) -> None:
    """Raise ValueError if `value` holds a tracer the Ref may not hold.

    A Ref of trace T may hold tracers of T and of the traces T runs inside
    (a jit tracer inside grad, say); tracers of an inner or finished trace
    would leak.  Called by the C core only for values whose type may hold
    tracers (not for arrays and scalars).
    """
    trace = trace_ref()
    for leaf in _flatten(value)[0]:
        if isinstance(leaf, _Tracer) and not _encloses(leaf._trace, trace):
            raise ValueError(
                "Cannot set a Ref to a value holding a tracer of another "
                f"trace ({type(leaf._trace).__name__}); a Ref may hold "
                "tracers of the trace it was created in or of traces "
                "enclosing it"
            )


def is_batched(value) -> bool:
    """True if `value` holds a tracer of the current trace that is mapped
    over its axis: inside refx.vmap's function (traced by jax.vmap, whose
    BatchTrace is then current), a value that depends on the mapped axis.
    A BatchTracer whose batch_dim is None (jax's not_mapped) is not."""
    trace = _jcore.trace_ctx.trace
    for leaf in _flatten(value)[0]:
        if (isinstance(leaf, _Tracer) and leaf._trace is trace
                and getattr(leaf, "batch_dim", None) is not None):
            return True
    return False


def _plain_types() -> tuple[type, ...]:
    types: list[type] = [np.ndarray]
    try:
        from jax._src.array import ArrayImpl

        types.append(ArrayImpl)
    except ImportError:  # pragma: no cover - layout changed
        pass
    return tuple(types)


_core._install_jax(
    flatten=_flatten,
    flatten_with_path=_flatten_with_path,
    treedef_type=_tu.PyTreeDef,
    sequence_key=jax.tree_util.SequenceKey,
    dict_key=jax.tree_util.DictKey,
    getattr_key=jax.tree_util.GetAttrKey,
    flattened_index_key=jax.tree_util.FlattenedIndexKey,
    trace_state=_trace_state,
    check_value=check_value,
    plain_types=_plain_types(),
    # every type registered with jax.tree_util, by any of its functions; the
    # core looks for Ref subclasses in it (they must stay leaves)
    pytree_registry=getattr(_tu, "_registry", None),
    # what update_refs by path accepts for a Ref holding an array (tracers
    # are jax.Arrays too); a ShapeDtypeStruct is not one
    array_types=(np.ndarray, np.generic, jax.Array),
)

_VALUE_KEY = jax.tree_util.GetAttrKey("value")

jax.tree_util.register_pytree_with_keys(
    _core.Value,
    # keys only for key paths (JAX error messages read "...[0].value");
    # plain flattening uses the C function, whose aux data this reuses
    lambda v: (((_VALUE_KEY, v.value),), _core._value_flatten(v)[1]),
    _core._value_unflatten,
    _core._value_flatten,
)
jax.tree_util.register_pytree_node(
    _core.Index, _core._index_flatten, _core._index_unflatten
)
jax.tree_util.register_pytree_node(
    type(_core.NOTHING), _core._nothing_flatten, _core._nothing_unflatten
)
jax.tree_util.register_pytree_with_keys(
    _core.Partition,
    _core._partition_flatten_with_keys,
    _core._partition_unflatten,
    _core._partition_flatten,
)
