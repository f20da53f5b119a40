"""refx: a reference system for JAX.

Shared, mutable references (`Ref`) that live in ordinary pytrees and cross
JAX transforms through `deref`/`reref`, plus semantic partitioning
(`tree_partition`, `get_partition`, `merge_partitions`) and `update_refs`.
The core is the C extension `refx._core`; this module only re-exports it.
"""

from . import _compat  # noqa: F401  (links the C core to JAX)
from ._core import (
    NOTHING,
    All,
    Any,
    Deref,
    Index,
    Not,
    Nothing,
    Partition,
    Ref,
    Value,
    clone,
    deref,
    get_partition,
    merge_partitions,
    reref,
    tree_partition,
    update_refs,
)

__version__ = "0.1.0"

__all__ = [
    "NOTHING",
    "All",
    "Any",
    "Deref",
    "Index",
    "Not",
    "Nothing",
    "Partition",
    "Ref",
    "Value",
    "clone",
    "deref",
    "get_partition",
    "merge_partitions",
    "reref",
    "tree_partition",
    "update_refs",
]
