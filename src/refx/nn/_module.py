"""nn.Module: a Python object whose attributes are its pytree children.

Every subclass is registered with ``jax.tree_util.register_pytree_with_keys``
when it is defined (``__init_subclass__``), so refx's functions and the
transforms take models directly, with no decorator or registration.

Flattening looks at ``vars(module)`` in insertion order.  An attribute is a
*child* when it holds state: a Ref, a Module, an array (or tracer), a
deref'ed ``Value``/``Index``/``NOTHING``, or a list/tuple/dict with one of
those inside (at any depth; any other pytree is looked into with
``jax.tree_util.tree_leaves``).  Every other attribute (sizes, rates, flags
such as ``deterministic``, dtypes, functions, None) is *static*: it rides in
the aux data as ``(name, type(value), value)``, so it is part of
``refx.jit``'s cache key and a changed flag (``model.eval()``) retraces
once, then hits the cache; with its type, as static arguments are compared,
since ``2 == 2.0`` and a trace made for one is wrong for the other.  An
unhashable static (a list of ints) is compared by a frozen copy (lists,
tuples, dicts, sets and bytearrays; any other unhashable value by its
identity: assign a new object to change it).  After an unflatten, the
attributes that were children stay children whatever they hold (JAX
flattens trees of placeholders, ``tree_map(lambda _: None, model)``).

The flatten is C (``_core._ModuleFlatten``, ``refx/nnmodule.c``): jaxlib
calls it for every submodule on every ``refx.jit`` call, where the Python
loop was most of refx.nn's per-call cost.  The rule stays here:
``_is_state`` below.  The C side answers the common cases exactly as it
would (the type caches are the same sets; Refs, Modules, Derefs, NOTHING
and atoms by their type; lists, tuples, dicts and namedtuples by their
elements) and calls it for anything else.  It reads ``vars(module)`` as
``for k, v in vars(module).items()`` would (a dict that changes size
under it raises the same RuntimeError) and keeps nothing about a module
between calls: every call looks at every attribute, so a flag flipped,
``set_attributes`` or a static turned into a Ref is seen on the next call.

Children are keyed by attribute name (``GetAttrKey``), so partition paths
and ``state_dict`` names read ``("encoder", "layers", "0", "kernel")`` and
``"encoder/layers/0/kernel"``.  A Ref or a layer assigned to two attributes
is one object at two places: deref numbers it once, so it stays shared
through every refx transform, checkpoint and summary.  (Inside a transform
a layer reached twice is rebuilt as two Module objects holding the same
Refs: the sharing that matters, of state, is kept.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from jax.tree_util import GetAttrKey

from .. import NOTHING, Deref, Ref
from .._core import _module_changed, _ModuleFlatten  # type: ignore[import-not-found]
from .._inspect import short_repr

M = TypeVar("M", bound="Module")

_ATOMS = (bool, int, float, complex, str, bytes, type(None), type)


# Decisions by type, cached: a Ref/Module/Deref/array type is always state,
# a leaf type that is none of those (a function, a dtype, an enum) never is.
# Containers are not cached (their contents decide).  Flattening a model
# decides this for every attribute on every refx.jit call, and jax.Array's
# isinstance is a Python __instancecheck__: the cache makes it one set
# lookup.  The C flatten shares these very sets (it reads both and adds a
# Ref/Module/Deref type to the first, as this function would): it relies
# on them being private and only growing, by this function's rule alone.
_STATE_TYPES: set[type] = set()
_STATIC_TYPES: set[type] = set(_ATOMS)


def _is_state(v: Any) -> bool:
    """Does `v` hold state (and so is a pytree child of a Module)?"""
    t = type(v)
    if t in _STATE_TYPES:
        return True
    if t in _STATIC_TYPES:
        return v is NOTHING
    if isinstance(v, Ref | Module | Deref) or v is NOTHING:
        _STATE_TYPES.add(t)
        return True
    if isinstance(v, list | tuple):
        return any(_is_state(x) for x in v)
    if isinstance(v, dict):
        return any(_is_state(x) for x in v.values())
    if isinstance(v, jax.Array | np.ndarray):
        _STATE_TYPES.add(t)
        return True
    try:
        leaves = jax.tree_util.tree_leaves(v)
    except Exception:  # noqa: BLE001 - not a pytree JAX can flatten: static
        return False
    if len(leaves) == 1 and leaves[0] is v:
        _STATIC_TYPES.add(t)  # a leaf type that is not an array: static
        return False
    return any(_is_state(x) for x in leaves)


class _Child:
    """Marks a child slot in a Module's aux data."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<child>"


_CHILD = _Child()


def _freeze(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return (type(v).__name__, tuple(_freeze(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, set):  # its elements are hashable
        return ("set", frozenset(v))
    if isinstance(v, bytearray):
        return ("bytearray", bytes(v))
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return v


class _Frozen:
    """An unhashable static attribute, hashed and compared by a frozen copy."""

    __slots__ = ("value", "key")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = _freeze(value)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and self.key == other.key

    def __repr__(self) -> str:
        return repr(self.value)


# Set by unflatten: the names that were children.  JAX unflattens trees with
# placeholder leaves (jax.vmap's out_axes, tree_map to None...) and flattens
# them again; a placeholder is not state by _is_state's rule, so without the
# mark those attributes would turn static and the structure would change.
_MARK = "__refx_children__"


def _make_unflatten(cls: type) -> Any:
    def unflatten(aux: tuple[tuple[Any, ...], ...], children: Any) -> Any:
        module: Any = object.__new__(cls)
        d = module.__dict__
        it = iter(children)
        names = []
        for entry in aux:  # (name, _CHILD) or (name, type(static), static)
            name, static = entry[0], entry[-1]
            if static is _CHILD:
                d[name] = next(it)
                names.append(name)
            elif type(static) is _Frozen:
                d[name] = static.value
            else:
                d[name] = static
        d[_MARK] = frozenset(names)
        return module

    return unflatten


def _register(cls: type) -> None:
    jax.tree_util.register_pytree_with_keys(
        cls, _flatten_with_keys, _make_unflatten(cls), flatten_func=_flatten
    )


def _walk(v: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(v, Module):
        yield path, v
        for k, x in vars(v).items():
            if k != _MARK:
                yield from _walk(x, (*path, k))
    elif isinstance(v, list | tuple):
        for i, x in enumerate(v):
            yield from _walk(x, (*path, str(i)))
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _walk(x, (*path, str(k)))


def _noting(method: Any) -> Any:
    """`method` (a __setattr__ or __delattr__), then _module_changed()."""

    @functools.wraps(method)
    def noting(self: Any, *args: Any) -> None:
        method(self, *args)
        _module_changed()

    noting._refx_notes = True  # type: ignore[attr-defined]
    return noting


#: The mode flags `train()` / `eval()` set, NNX's names.
MODE_FLAGS = ("deterministic", "use_running_average")


class Module:
    """Base class of layers and models: a pytree node without registration.

    Subclass it and assign layers, Refs (``nn.Param(...)``), lists/dicts of
    them and plain settings in ``__init__``; call it like a function.
    ``train()``/``eval()`` set the mode flags of every submodule, and layers
    take the same flags as call keywords (``dropout(x, deterministic=True)``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)
        # a subclass's own __setattr__/__delattr__ (one calling
        # object.__setattr__, say) still notes the change
        for name in ("__setattr__", "__delattr__"):
            own = cls.__dict__.get(name)
            if own is not None and not getattr(own, "_refx_notes", False):
                setattr(cls, name, _noting(own))

    # Every attribute change is noted (_module_changed): refx.jit_partial
    # checks its bound trees again at its next call, and refuses a call
    # whose bound model is no longer what it bound (model.eval() after
    # binding a training step) instead of running the old trace.
    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        _module_changed()

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        _module_changed()

    __setattr__._refx_notes = True  # type: ignore[attr-defined]
    __delattr__._refx_notes = True  # type: ignore[attr-defined]

    # -- traversal --------------------------------------------------------

    def iter_modules(self) -> Iterator[tuple[tuple[str, ...], Module]]:
        """``(path, module)`` for this module and every submodule, each once
        (a layer on two attributes is yielded at its first path)."""
        seen: set[int] = set()
        for path, m in _walk(self, ()):
            if id(m) not in seen:
                seen.add(id(m))
                yield path, m

    def iter_children(self) -> Iterator[tuple[str, Module]]:
        """``(name, module)`` for the direct submodule attributes."""
        for k, v in vars(self).items():
            if isinstance(v, Module):
                yield k, v

    # -- modes --------------------------------------------------------------

    def set_attributes(self, *, raise_if_not_found: bool = True, **attributes: Any) -> None:
        """Set each attribute on every submodule that has it (NNX's
        ``set_attributes``); one that no submodule has is a ValueError."""
        found = set()
        for _, m in self.iter_modules():
            for name, value in attributes.items():
                if name in vars(m):
                    vars(m)[name] = value
                    found.add(name)
        _module_changed()
        missing = set(attributes) - found
        if missing and raise_if_not_found:
            raise ValueError(
                f"set_attributes: no submodule of this {type(self).__name__} has the "
                f"attribute(s) {sorted(missing)}"
            )

    def train(self, **attributes: Any) -> None:
        """Training mode: ``deterministic=False`` (Dropout, attention dropout)
        and ``use_running_average=False`` (BatchNorm) on every submodule."""
        self.set_attributes(
            deterministic=False, use_running_average=False, **attributes,
            raise_if_not_found=False,
        )

    def eval(self, **attributes: Any) -> None:
        """Evaluation mode: ``deterministic=True`` and ``use_running_average=True``."""
        self.set_attributes(
            deterministic=True, use_running_average=True, **attributes,
            raise_if_not_found=False,
        )

    # -- repr ---------------------------------------------------------------

    def __repr__(self) -> str:
        return _repr(self, {}, (), 0)


# The flatten and flatten_with_keys, in C (refx/nnmodule.c): they run for
# every submodule on every refx.jit call.  Each reads vars(m) as the loop
# `for k, v in vars(m).items()` would, decides what it can exactly as
# _is_state would (the two type caches above, shared; Refs, Modules, Derefs,
# NOTHING and atoms by their types; lists, tuples and dicts by their
# elements) and calls _is_state for the rest.
_flatten = _ModuleFlatten(_STATE_TYPES, _STATIC_TYPES, _CHILD, _Frozen, _is_state, _MARK, Module)
_flatten_with_keys = _ModuleFlatten(
    _STATE_TYPES, _STATIC_TYPES, _CHILD, _Frozen, _is_state, _MARK, Module, key=GetAttrKey
)
_register(Module)


def _ref_repr(r: Any, seen: dict[int, str], path: tuple[str, ...]) -> str:
    name = type(r).__name__
    if id(r) in seen:
        return f"{name}(<same as {seen[id(r)]}>)"
    seen[id(r)] = ".".join(path) or "<root>"
    extra = "".join(f", {k}={v!r}" for k, v in r.metadata.items())
    default = getattr(type(r), "default_collection", None)
    coll = "" if r.collection == default else f", collection={r.collection!r}"
    return f"{name}({short_repr(r.value)}{coll}{extra})"


def _repr(v: Any, seen: dict[int, str], path: tuple[str, ...], depth: int) -> str:
    if isinstance(v, Ref):
        return _ref_repr(v, seen, path)
    if isinstance(v, Module):
        if id(v) in seen:
            return f"{type(v).__name__}(<same as {seen[id(v)]}>)"
        seen[id(v)] = ".".join(path) or "<root>"
        items = []
        nested = False
        for k, x in vars(v).items():
            if k.startswith("_") or k in _HIDDEN or x is None:
                continue
            nested = nested or any(isinstance(m, Module) for _, m in _walk(x, ()))
            items.append((k, _repr(x, seen, (*path, k), depth + 1)))
        if not nested:
            return f"{type(v).__name__}({', '.join(f'{k}={s}' for k, s in items)})"
        pad = "  " * (depth + 1)
        body = "".join(f"{pad}{k}={s},\n" for k, s in items)
        return f"{type(v).__name__}(\n{body}{'  ' * depth})"
    if isinstance(v, list | tuple) and _is_state(v):
        inner = [_repr(x, seen, (*path, str(i)), depth + 1) for i, x in enumerate(v)]
        if any("\n" in s for s in inner):
            pad = "  " * (depth + 1)
            body = "".join(f"{pad}{s},\n" for s in inner)
            open_, close = ("[", "]") if isinstance(v, list) else ("(", ")")
            return f"{open_}\n{body}{'  ' * depth}{close}"
        return ("[{}]" if isinstance(v, list) else "({})").format(", ".join(inner))
    if isinstance(v, dict) and _is_state(v):
        inner2 = [(k, _repr(x, seen, (*path, str(k)), depth + 1)) for k, x in v.items()]
        pad = "  " * (depth + 1)
        body = "".join(f"{pad}{k!r}: {s},\n" for k, s in inner2)
        return f"{{\n{body}{'  ' * depth}}}"
    if isinstance(v, type) or (callable(v) and hasattr(v, "__name__")):
        return str(v.__name__)
    return short_repr(v)


#: settings left out of a Module's repr (the same for almost every layer)
_HIDDEN = frozenset({"param_dtype", "axis_index_groups", "use_fast_variance", "precision"})


def first_from(*values: Any, error: str) -> Any:
    """The first of `values` that is not None; all None is a ValueError."""
    for v in values:
        if v is not None:
            return v
    raise ValueError(error)
