# Hand-written stubs for refx (the implementation is the C module refx._core).
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from types import GenericAlias
from typing import Any as _Any
from typing import Generic, TypeAlias, TypeVar, final

from jax.tree_util import PyTreeDef
from typing_extensions import disjoint_base

__version__: str

_T = TypeVar("_T")
_Path: TypeAlias = tuple[str, ...]

@disjoint_base
class Ref(Generic[_T]):
    """A shared, mutable reference; a pytree leaf."""

    def __init__(self, value: _T, collection: Hashable = None) -> None: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    @property
    def value(self) -> _T: ...
    @value.setter
    def value(self, value: _T) -> None: ...
    @property
    def collection(self) -> Hashable: ...

@disjoint_base
class Deref:
    @property
    def index(self) -> int: ...
    @property
    def collection(self) -> Hashable: ...

@final
class Value(Deref, Generic[_T]):
    def __new__(cls, value: _T, index: int, collection: Hashable = None) -> Value[_T]: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    @property
    def value(self) -> _T: ...

@final
class Index(Deref):
    def __new__(cls, index: int, collection: Hashable = None) -> Index: ...
    def __hash__(self) -> int: ...

@final
class Nothing: ...

NOTHING: Nothing

@disjoint_base
class Partition(dict[_Path, _Any]):
    """An immutable dict from paths to leaves or NOTHING."""

    def __init__(
        self, mapping: Mapping[_Path, _Any] | Iterable[tuple[_Path, _Any]] = ..., /
    ) -> None: ...

Filter: TypeAlias = (
    Callable[[_Any], bool] | str | type | tuple[_Any, ...] | Not | All | Any | bool
    | ellipsis  # noqa: F821
)

@final
class Not:
    def __new__(cls, filter: Filter, /) -> Not: ...
    def __call__(self, leaf: _Any, /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class All:
    def __new__(cls, *filters: Filter) -> All: ...
    def __call__(self, leaf: _Any, /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class Any:
    def __new__(cls, *filters: Filter) -> Any: ...
    def __call__(self, leaf: _Any, /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

_Tree = TypeVar("_Tree")

def deref(tree: _Tree, /) -> _Tree: ...
def reref(tree: _Tree, /) -> _Tree: ...
def clone(tree: _Tree, /) -> _Tree: ...
def tree_partition(
    tree: _Any, /, *filters: Filter, is_leaf: Callable[[_Any], bool] | None = None
) -> tuple[tuple[Partition, ...], PyTreeDef]: ...
def get_partition(
    tree: _Any, filter: Filter, /, *, is_leaf: Callable[[_Any], bool] | None = None
) -> Partition: ...
def merge_partitions(
    partitions: Sequence[Mapping[_Path, _Any]], treedef: PyTreeDef, /
) -> _Any: ...
def update_refs(target: _Any, source: _Any, /) -> None: ...

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
