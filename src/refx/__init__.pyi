# Hand-written stubs for refx (the implementation is the C module refx._core).
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import ContextDecorator
from os import PathLike
from types import GenericAlias
from typing import Any as _Any
from typing import Generic, Literal, NamedTuple, ParamSpec, Self, TypeAlias, TypeVar, final, overload

from jax.tree_util import PyTreeDef
from typing_extensions import disjoint_base

__version__: str

_T = TypeVar("_T")
_Path: TypeAlias = tuple[str, ...]
# treescope's rendering hook: (path, subtree_renderer) -> a rendering
_TreescopeRepr: TypeAlias = Callable[[str | None, _Any], _Any]

@disjoint_base
class Ref(Generic[_T]):
    """A shared, mutable reference; a pytree leaf."""

    def __init__(self, value: _T, collection: Hashable = None, **metadata: Hashable) -> None: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    @property
    def value(self) -> _T: ...
    @value.setter
    def value(self, value: _T) -> None: ...
    @property
    def collection(self) -> Hashable: ...
    @property
    def metadata(self) -> Mapping[str, Hashable]: ...
    def replace(self, **changes: _Any) -> Ref[_Any]: ...
    def __setstate__(self, state: tuple[_Any, ...], /) -> None: ...
    @property
    def __treescope_repr__(self) -> _TreescopeRepr: ...
    # Refs in array code (refx/_arrays.py): operators and attributes of the
    # current value; results are arrays.  == and hash stay identity.
    def __add__(self, other: _Any) -> _Any: ...
    def __radd__(self, other: _Any) -> _Any: ...
    def __sub__(self, other: _Any) -> _Any: ...
    def __rsub__(self, other: _Any) -> _Any: ...
    def __mul__(self, other: _Any) -> _Any: ...
    def __rmul__(self, other: _Any) -> _Any: ...
    def __truediv__(self, other: _Any) -> _Any: ...
    def __rtruediv__(self, other: _Any) -> _Any: ...
    def __floordiv__(self, other: _Any) -> _Any: ...
    def __rfloordiv__(self, other: _Any) -> _Any: ...
    def __mod__(self, other: _Any) -> _Any: ...
    def __rmod__(self, other: _Any) -> _Any: ...
    def __pow__(self, other: _Any) -> _Any: ...
    def __rpow__(self, other: _Any) -> _Any: ...
    def __matmul__(self, other: _Any) -> _Any: ...
    def __rmatmul__(self, other: _Any) -> _Any: ...
    def __and__(self, other: _Any) -> _Any: ...
    def __rand__(self, other: _Any) -> _Any: ...
    def __or__(self, other: _Any) -> _Any: ...
    def __ror__(self, other: _Any) -> _Any: ...
    def __xor__(self, other: _Any) -> _Any: ...
    def __rxor__(self, other: _Any) -> _Any: ...
    def __lshift__(self, other: _Any) -> _Any: ...
    def __rlshift__(self, other: _Any) -> _Any: ...
    def __rshift__(self, other: _Any) -> _Any: ...
    def __rrshift__(self, other: _Any) -> _Any: ...
    def __lt__(self, other: _Any) -> _Any: ...
    def __le__(self, other: _Any) -> _Any: ...
    def __gt__(self, other: _Any) -> _Any: ...
    def __ge__(self, other: _Any) -> _Any: ...
    def __neg__(self) -> _Any: ...
    def __pos__(self) -> _Any: ...
    def __abs__(self) -> _Any: ...
    def __invert__(self) -> _Any: ...
    def __getitem__(self, idx: _Any) -> _Any: ...
    def __setitem__(self, idx: _Any, x: _Any) -> None: ...
    def __iter__(self) -> Iterator[_Any]: ...
    def __jax_array__(self) -> _Any: ...
    def __array__(self, dtype: _Any = None, copy: _Any = None) -> _Any: ...
    __array_priority__: int
    def __float__(self) -> float: ...
    def __int__(self) -> int: ...
    def __complex__(self) -> complex: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> _Any: ...
    @property
    def ndim(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def T(self) -> _Any: ...
    def astype(self, *args: _Any, **kwargs: _Any) -> _Any: ...
    def reshape(self, *args: _Any, **kwargs: _Any) -> _Any: ...
    def sum(self, *args: _Any, **kwargs: _Any) -> _Any: ...
    def mean(self, *args: _Any, **kwargs: _Any) -> _Any: ...

@disjoint_base
class Deref:
    @property
    def index(self) -> int: ...
    @property
    def collection(self) -> Hashable: ...
    @property
    def ref_type(self) -> type[Ref[_Any]]: ...
    @property
    def metadata(self) -> Mapping[str, Hashable]: ...
    @property
    def __treescope_repr__(self) -> _TreescopeRepr: ...

@final
class Value(Deref, Generic[_T]):
    def __new__(
        cls,
        value: _T,
        index: int,
        collection: Hashable = None,
        *,
        ref_type: type[Ref[_Any]] | None = None,
        metadata: Mapping[str, Hashable] | None = None,
    ) -> Value[_T]: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    @property
    def value(self) -> _T: ...

@final
class Index(Deref):
    def __new__(
        cls,
        index: int,
        collection: Hashable = None,
        *,
        ref_type: type[Ref[_Any]] | None = None,
        metadata: Mapping[str, Hashable] | None = None,
    ) -> Index: ...
    def __hash__(self) -> int: ...

@final
class Nothing:
    @property
    def __treescope_repr__(self) -> _TreescopeRepr: ...

NOTHING: Nothing

@disjoint_base
class Partition(dict[_Path, _Any]):
    """An immutable dict from paths to leaves or NOTHING."""

    def __init__(
        self, mapping: Mapping[_Path, _Any] | Iterable[tuple[_Path, _Any]] = ..., /
    ) -> None: ...
    @property
    def __treescope_repr__(self) -> _TreescopeRepr: ...

Filter: TypeAlias = (
    Callable[[_Any], bool] | str | type | tuple[_Any, ...] | Not | All | Any
    | PathContains | PathFilter | bool
    | ellipsis  # noqa: F821
)

@final
class Not:
    def __new__(cls, filter: Filter, /) -> Not: ...
    def __call__(self, leaf_or_path: _Any, leaf: _Any = ..., /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class All:
    def __new__(cls, *filters: Filter) -> All: ...
    def __call__(self, leaf_or_path: _Any, leaf: _Any = ..., /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class Any:
    def __new__(cls, *filters: Filter) -> Any: ...
    def __call__(self, leaf_or_path: _Any, leaf: _Any = ..., /) -> bool: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...

@final
class PathContains:
    def __new__(cls, *parts: str) -> PathContains: ...
    def __call__(self, leaf_or_path: _Any, leaf: _Any = ..., /) -> bool: ...
    @property
    def filters(self) -> tuple[str, ...]: ...

@final
class PathFilter:
    def __new__(cls, fn: Callable[[_Path, _Any], bool], /) -> PathFilter: ...
    def __call__(self, leaf_or_path: _Any, leaf: _Any = ..., /) -> bool: ...
    @property
    def filters(self) -> tuple[Callable[[_Path, _Any], bool]]: ...

def keypath_to_path(keypath: Sequence[_Any], /) -> _Path: ...

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

# -- checkpoints and inspection (refx/_state.py, refx/_inspect.py) --

class LoadResult(NamedTuple):
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

def state_dict(tree: _Any, /, filter: Filter = ...) -> dict[str, _Any]: ...
def load_state_dict(
    tree: _Any, state: Mapping[str, _Any], /, *, filter: Filter = ..., strict: bool = True
) -> LoadResult: ...
def save(
    directory: str | PathLike[str], tree: _Any, /, *, filter: Filter = ..., force: bool = False
) -> None: ...
def restore(
    directory: str | PathLike[str], tree: _Any, /, *, filter: Filter = ..., strict: bool = True
) -> LoadResult: ...

class CollectionSummary(NamedTuple):
    collection: Hashable
    refs: int
    ties: int
    params: int
    bytes: int

class Summary:
    rows: tuple[CollectionSummary, ...]
    def __init__(self, rows: tuple[CollectionSummary, ...]) -> None: ...
    @property
    def refs(self) -> int: ...
    @property
    def ties(self) -> int: ...
    @property
    def params(self) -> int: ...
    @property
    def bytes(self) -> int: ...

def summary(tree: _Any, /) -> Summary: ...
# ---- transforms (refx.jit's per-call path is the C type JitFunction) ----

_P = ParamSpec("_P")
_R = TypeVar("_R")
_R_co = TypeVar("_R_co", covariant=True)

@final
class JitFunction(Generic[_P, _R_co]):
    """A function compiled by refx.jit or refx.jit_partial."""

    def __new__(
        cls,
        fun: Callable[..., _Any],
        *,
        static_argnums: tuple[int, ...],
        static_argnames: tuple[str, ...],
        donate_argnums: tuple[int, ...],
        donate_argnames: tuple[str, ...],
        options: dict[str, _Any],
        bound: tuple[_Any, ...] | None = None,
        kind: str | None = None,
        eager: object = None,
    ) -> JitFunction[_P, _R_co]: ...
    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R_co: ...
    def __get__(self, instance: _Any, owner: type | None = None, /) -> _Any: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    def lower(self, *args: _Any, **kwargs: _Any) -> _Any: ...

@overload
def jit(
    fun: Callable[_P, _R],
    /,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Iterable[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_argnames: str | Iterable[str] = (),
    mutable: Filter | None = None,
    **jax_jit_options: _Any,
) -> JitFunction[_P, _R]: ...
@overload
def jit(
    fun: None = None,
    /,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Iterable[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_argnames: str | Iterable[str] = (),
    mutable: Filter | None = None,
    **jax_jit_options: _Any,
) -> Callable[[Callable[_P, _R]], JitFunction[_P, _R]]: ...
def jit_partial(
    fun: Callable[..., _R],
    /,
    *bound_args: _Any,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Iterable[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_argnames: str | Iterable[str] = (),
    mutable: Filter | None = None,
    **jax_jit_options: _Any,
) -> JitFunction[..., _R]: ...
def grad(
    fun: Callable[..., _Any], argnums: int = 0, *, wrt: Filter = "params", has_aux: bool = False
) -> Callable[..., _Any]: ...
def value_and_grad(
    fun: Callable[..., _Any], argnums: int = 0, *, wrt: Filter = "params", has_aux: bool = False
) -> Callable[..., tuple[_Any, Partition]]: ...

@final
class Static(Generic[_T]):
    """A pytree node with no children; the hashable value rides in the aux data."""

    def __new__(cls, value: _T) -> Static[_T]: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    @property
    def value(self) -> _T: ...
    def __hash__(self) -> int: ...

class Dag(Generic[_Tree]):
    """A pytree node around a tree of Refs: flattening derefs, unflattening rerefs."""

    def __init__(self, tree: _Tree) -> None: ...
    @property
    def tree(self) -> _Tree: ...
    @property
    def value(self) -> _Tree: ...

# ---- vmap, scan, remat, cond/switch, loops (refx/_control.py); mutable (refx/_mutable.py) ----

_C = TypeVar("_C")
_X = TypeVar("_X")
_Y = TypeVar("_Y")

class StateAxes:
    """Per-collection axes for a refx.vmap argument: {filter: axis or None}."""

    def __init__(
        self, axes: Mapping[_Any, int | None] | Iterable[tuple[_Any, int | None]], /
    ) -> None: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...
    @property
    def axes(self) -> tuple[int | None, ...]: ...
    def items(self) -> tuple[tuple[Filter, int | None], ...]: ...
    def __iter__(self) -> Iterator[Filter]: ...
    def __len__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

def vmap(
    fun: Callable[_P, _R],
    *,
    in_axes: int | StateAxes | Sequence[_Any] | None = 0,
    out_axes: _Any = 0,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    mutable: Filter | None = None,
) -> Callable[_P, _R]: ...
def scan(
    fun: Callable[[_C, _X], tuple[_C, _Y]],
    init: _C,
    xs: _X = ...,
    length: int | None = None,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
    mutable: Filter | None = None,
) -> tuple[_C, _Y]: ...
@overload
def remat(
    fun: Callable[_P, _R],
    /,
    *,
    policy: Callable[..., bool] | None = None,
    prevent_cse: bool = True,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
) -> Callable[_P, _R]: ...
@overload
def remat(
    fun: None = None,
    /,
    *,
    policy: Callable[..., bool] | None = None,
    prevent_cse: bool = True,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]: ...
def cond(
    pred: _Any, true_fun: Callable[..., _R], false_fun: Callable[..., _R], *operands: _Any
) -> _R: ...
def switch(index: _Any, branches: Sequence[Callable[..., _R]], *operands: _Any) -> _R: ...
def fori_loop(
    lower: _Any,
    upper: _Any,
    body_fun: Callable[[_Any, _C], _C],
    init_val: _C,
    *,
    unroll: int | bool | None = None,
) -> _C: ...
def while_loop(
    cond_fun: Callable[[_C], _Any], body_fun: Callable[[_C], _C], init_val: _C
) -> _C: ...

class mutable(ContextDecorator):
    """``with refx.mutable(filter):`` only Refs the filter accepts may be written."""

    filter: Filter
    def __init__(self, filter: Filter, /) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> Literal[False]: ...

# ---- eval_shape, custom_vjp/custom_jvp, shard_map (issue 19; refx/_lifts.py) ----

def eval_shape(fun: Callable[..., _Any], /, *args: _Any, **kwargs: _Any) -> _Any: ...

class custom_vjp(Generic[_P, _R]):
    """jax.custom_vjp for functions of trees of Refs; set the rule with defvjp(fwd, bwd)."""

    fun: Callable[_P, _R]
    nondiff_argnums: tuple[int, ...]
    fwd: Callable[..., tuple[_Any, _Any]] | None
    bwd: Callable[..., _Any] | None
    def __init__(self, fun: Callable[_P, _R], nondiff_argnums: int | Sequence[int] = ()) -> None: ...
    def defvjp(self, fwd: Callable[..., tuple[_Any, _Any]], bwd: Callable[..., _Any]) -> None: ...
    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...

class custom_jvp(Generic[_P, _R]):
    """jax.custom_jvp for functions of trees of Refs; set the rule with defjvp(jvp)."""

    fun: Callable[_P, _R]
    nondiff_argnums: tuple[int, ...]
    jvp: Callable[..., tuple[_Any, _Any]] | None
    def __init__(self, fun: Callable[_P, _R], nondiff_argnums: int | Sequence[int] = ()) -> None: ...
    def defjvp(
        self, jvp: Callable[..., tuple[_Any, _Any]]
    ) -> Callable[..., tuple[_Any, _Any]]: ...
    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...

class StateSharding:
    """Per-collection PartitionSpecs for a refx.shard_map argument: {filter: PartitionSpec}."""

    def __init__(self, specs: Mapping[_Any, _Any] | Iterable[tuple[_Any, _Any]], /) -> None: ...
    @property
    def filters(self) -> tuple[Filter, ...]: ...
    @property
    def specs(self) -> tuple[_Any, ...]: ...
    def items(self) -> tuple[tuple[Filter, _Any], ...]: ...
    def __iter__(self) -> Iterator[Filter]: ...
    def __len__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

def shard_map(
    fun: Callable[_P, _R],
    mesh: _Any = None,
    in_specs: _Any = None,
    out_specs: _Any = None,
    *,
    check_vma: bool = True,
    axis_names: Iterable[Hashable] | None = None,
    mutable: Filter | None = None,
) -> Callable[_P, _R]: ...

# ---- sharding (issue 13; refx/_sharding.py) ----

def shardings(tree: _Any, /, mesh: _Any = None) -> _Any: ...

# ---- attributes backed by Refs (issue 13; refx/_fields.py) ----

class RefField(Generic[_T]):
    """A class attribute whose value is held by a Ref (in vars(obj), same name)."""

    collection: Hashable
    default: _Any
    metadata: dict[str, Hashable]
    name: str | None
    owner: type | None
    def __init__(
        self, collection: Hashable = None, *, default: _T = ..., **metadata: Hashable
    ) -> None: ...
    def __class_getitem__(cls, item: _Any, /) -> GenericAlias: ...
    def __set_name__(self, owner: type, name: str) -> None: ...
    def __get__(self, obj: object, objtype: type | None = None) -> _T: ...
    def __set__(self, obj: object, value: _T | Ref[_T] | Deref) -> None: ...
    def __delete__(self, obj: object) -> None: ...

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
    "CollectionSummary",
    "LoadResult",
    "Summary",
    "load_state_dict",
    "restore",
    "save",
    "state_dict",
    "summary",
    "Dag",
    "JitFunction",
    "Static",
    "grad",
    "jit",
    "jit_partial",
    "value_and_grad",
    "StateAxes",
    "cond",
    "fori_loop",
    "mutable",
    "remat",
    "scan",
    "switch",
    "vmap",
    "while_loop",
    "StateSharding",
    "custom_jvp",
    "custom_vjp",
    "eval_shape",
    "shard_map",
    "shardings",
    "RefField",
]
