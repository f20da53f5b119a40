"""The one place that links refx's C core to JAX, imported once by
refx/__init__.py: it installs the core's hooks (the JAX calls that
refx/_compat.py picked for the installed version, the sharding hook, the
refx.jit builder) and registers the pytree nodes (Value, Index, NOTHING,
Partition, Static, Dag, Flat).  No other module has import side effects.
"""

from __future__ import annotations

import jax
import numpy as np
from jax._src import tree_util as _tu

from . import _core, _jit, _lift, _sharding
from ._compat import (
    _disable_jit_state,
    _EvalTrace,
    _flatten,
    _flatten_with_path,
    _plain_types,
    _trace_state,
    check_value,
)


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
    # declared shardings (issue 13): places a new Ref's value on the
    # sharding its metadata declares, under an active mesh
    place=_sharding.place,
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

_DAG_TREE_KEY = jax.tree_util.GetAttrKey("tree")

jax.tree_util.register_pytree_with_keys(
    _jit.Dag,
    lambda d: (((_DAG_TREE_KEY, d._children()),), None),
    _jit._dag_unflatten,
    lambda d: ((d._children(),), None),
)
jax.tree_util.register_pytree_node(_core.Static, _core._static_flatten, _core._static_unflatten)


class _InValue:
    """The key of a leaf of a Ref's pytree value passed as a Flat: its
    path inside the value, printed as jax.tree_util.keystr prints it, so
    JAX's messages name ``a[0][0].mu['w']`` as they did for the value."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path

    def __str__(self):
        return jax.tree_util.keystr(self.path)

    def __repr__(self):
        return f"_InValue({self.path!r})"

    def __eq__(self, other):
        return type(other) is _InValue and other.path == self.path

    def __hash__(self):
        return hash(self.path)


def _flat_with_keys(f):
    # key paths only (JAX's messages, explain-cache-misses), never per call:
    # the value rebuilt and flattened with its paths
    paths = jax.tree_util.tree_flatten_with_path(_core._flat_restore([f])[0])[0]
    return tuple((_InValue(p), x) for (p, _), x in zip(paths, f.leaves, strict=True)), f.spec


# a Ref's pytree value as refx.jit passes it through jax.jit (flatvalue.c)
jax.tree_util.register_pytree_with_keys(
    _core._Flat, _flat_with_keys, _core._flat_unflatten, _core._flat_flatten)


def _array_type():
    from jax._src.array import ArrayImpl

    return ArrayImpl


_core._install_jit(builder=_jit._build_jit_entry, describe=_jit._describe_jit_leaf,
                   array_type=_array_type(), traceable=_lift.traceable,
                   eval_trace=_EvalTrace, disable_jit=_disable_jit_state,
                   bound_changed=_jit._bound_changed)
_core._install_capture(_lift.capture_hook, _lift.Rediscover)
