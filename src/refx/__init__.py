"""refx: a reference system for JAX.

Shared, mutable references (`Ref`) that live in ordinary pytrees and cross
JAX transforms through `deref`/`reref`, plus semantic partitioning
(`tree_partition`, `get_partition`, `merge_partitions`) and `update_refs`.
The core is the C extension `refx._core`; this module only re-exports it,
and the Python helpers built on it: checkpoints (`state_dict`, `save`, ...)
and inspection (`summary`, treescope renderings).
"""

from collections.abc import Callable as _Callable
from types import EllipsisType as _EllipsisType
from typing import Any as _Any

from . import _wiring  # noqa: F401  (links the C core to JAX: hooks, pytree nodes)
from ._core import (
    NOTHING,
    All,
    Any,
    Deref,
    Index,
    Not,
    Nothing,
    Partition,
    PathContains,
    PathFilter,
    Ref,
    Value,
    clone,
    deref,
    get_partition,
    keypath_to_path,
    merge_partitions,
    reref,
    tree_partition,
    update_refs,
)

# Refs in array code: operators, ref[...], __jax_array__ (refx/_arrays.py)
from . import _arrays  # noqa: F401,E402

# -- checkpoints and inspection (Python: refx/_state.py, refx/_inspect.py) --
from ._inspect import CollectionSummary, Summary, summary
from ._state import LoadResult, load_state_dict, restore, save, state_dict
# transforms: jit/jit_partial (per-call path in C), grad, Dag, Static
from ._core import JitFunction, Static
from ._grad import grad, value_and_grad
from ._jit import Dag, jit, jit_partial
# transforms: vmap, scan, remat, cond/switch, loops (refx/_control.py), mutable
from ._control import StateAxes, cond, fori_loop, remat, scan, switch, vmap, while_loop
from ._mutable import mutable
# transforms: eval_shape, custom_vjp/custom_jvp, shard_map (refx/_lifts.py)
from ._lifts import StateSharding, custom_jvp, custom_vjp, eval_shape, shard_map
# sharding (issue 13): Refs' declared shardings (refx/_sharding.py)
from ._sharding import shardings
# attributes backed by Refs (issue 13, refx/_fields.py)
from ._fields import RefField

__version__ = "0.2.0"

#: What tree_partition, get_partition, Not, All and Any accept as a filter
#: (see README, "Partitioning"); for annotations in code built on refx.
Filter = (
    _Callable[[_Any], bool] | str | type | tuple | Not | All | Any | PathContains | PathFilter
    | bool | _EllipsisType
)

__all__ = [
    "NOTHING",
    "All",
    "Any",
    "Deref",
    "Filter",
    "Index",
    "Not",
    "Nothing",
    "Partition",
    "PathContains",
    "PathFilter",
    "Ref",
    "Value",
    "clone",
    "deref",
    "get_partition",
    "keypath_to_path",
    "merge_partitions",
    "reref",
    "tree_partition",
    "update_refs",
    # checkpoints and inspection
    "CollectionSummary",
    "LoadResult",
    "Summary",
    "load_state_dict",
    "restore",
    "save",
    "state_dict",
    "summary",
    # transforms
    "Dag",
    "JitFunction",
    "Static",
    "grad",
    "jit",
    "jit_partial",
    "value_and_grad",
    # transforms: vmap, scan, remat, cond/switch, loops, mutable
    "StateAxes",
    "cond",
    "fori_loop",
    "mutable",
    "remat",
    "scan",
    "switch",
    "vmap",
    "while_loop",
    # transforms: eval_shape, custom_vjp/custom_jvp, shard_map
    "StateSharding",
    "custom_jvp",
    "custom_vjp",
    "eval_shape",
    "shard_map",
    # sharding
    "shardings",
    # attributes backed by Refs
    "RefField",
]
