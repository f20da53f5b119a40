# Hand-written stubs for refx (the implementation is the C module refx._core).
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any as _Any
from typing import Generic, TypeAlias, TypeVar, final

from jax.tree_util import PyTreeDef

__version__: str

T = TypeVar("T")
_Path: TypeAlias = tuple[str, ...]

class Ref(Generic[T]):
    """A shared, mutable reference; a pytree leaf."""

    def __init__(self, value: T, collection: Hashable = None) -> None: ...
    @property
    def value(self) -> T: ...
    @value.setter
    def value(self, value: T) -> None: ...
    @property
    def collection(self) -> Hashable: ...

class Deref:
    @property
    def index(self) -> int: ...
    @property
    def collection(self) -> Hashable: ...

@final
class Value(Deref, Generic[T]):
    def __init__(self, value: T, index: int, collection: Hashable = None) -> None: ...
    @property
    def value(self) -> T: ...

@final
class Index(Deref):
    def __init__(self, index: int, collection: Hashable = None) -> None: ...
    def __hash__(self) -> int: ...

@final
class Nothing: ...

NOTHING: Nothing

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
    def __init__(self, filter: Filter, /) -> None: ...
    def __call__(self, leaf: _Any, /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class All:
    def __init__(self, *filters: Filter) -> None: ...
    def __call__(self, leaf: _Any, /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class Any:
    def __init__(self, *filters: Filter) -> None: ...
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
