"""Checkpoints: state_dict / load_state_dict, and save / restore with orbax.

A *state dict* is a flat ``{name: leaf}`` dict of the state held by the Refs
of a tree.  Names are refx paths (the tuples of str that partitions use as
keys; see README "Partitioning") joined with ``"/"``: the Ref at
``model["blocks"][0]["linear"]["w"]`` is ``"blocks/0/linear/w"``.

Everything here is built on the C core, not on a traversal of its own:

* ``get_partition(tree, All((Ref, Deref), filter))`` finds the Refs the
  filter selects, with their paths, in leaf order (JAX's: dict keys sorted);
* ``deref`` of that partition numbers the distinct Refs: a shared Ref is a
  ``Value`` at its first path and an ``Index`` at every later one, so it is
  stored once, under the name of its first path;
* ``update_refs(Partition({path: ref}), {path: value})`` writes a whole
  load back, all or nothing.

The value of a Ref can be any pytree (an optax state, say).  Its leaves get
names of their own: the Ref's name, then the leaf's path inside the value
(``"opt/0/mu/w"``); a Ref whose value is a single array or scalar has just
the Ref's name.  Loading rebuilds each value with the structure of the
value the Ref holds now, so the tree being loaded into is the template.
Leaves must be arrays (jax.Array, including typed PRNG keys; numpy arrays
and numpy scalars) or Python scalars (bool, int, float, complex); anything
else is refused with its path rather than stored as something else.

Checks.  Before anything is written, every leaf to load is compared with
the leaf its Ref holds: same shape and the same dtype (never a cast); a
Python scalar takes a scalar or 0-d array of its kind and stays a Python
scalar, a numpy scalar stays one.  Names are compared when strict.  One
ValueError lists every problem.

Placement (``_target_sharding``).  A leaf whose Ref declares a sharding
(``Ref(x, sharding=...)``, or a Value inside the Ref's value that does: an
optax state's moments) goes on it, on the active mesh or else on the mesh
of the array the Ref holds now (refx/_sharding.py).  Otherwise a numpy
leaf loaded where the Ref holds a ``jax.Array`` is put on that array's
sharding.  restore reads each array straight onto its sharding.  A
jax.Array given to load_state_dict is kept as given.

orbax.  save writes the state dict as orbax's PyTree checkpoint (a flat
dict of names), with the leaves orbax cannot store turned into a form it
can (``_to_storage``); restore checks the checkpoint's metadata first,
then reads only the names it loads.  orbax-checkpoint is optional
(``pip install refx[orbax]``) and imported only by save/restore (its
import took ~1.7 s here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

# the C core has no stub of its own (refx/__init__.pyi describes it)
from . import _compat, _sharding
from ._core import (  # type: ignore[import-not-found]
    All,
    Deref,
    Partition,
    Ref,
    Value,
    deref,
    keypath_to_path,
    get_partition,
    update_refs,
)

_REFX_LEAF = (Ref, Deref)
_SCALAR_TYPES = (bool, int, float, complex)
# the numpy dtype kinds a Python scalar of each type may be loaded from
_SCALAR_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}


# ---------------------------------------------------------------------------
# paths and names
# ---------------------------------------------------------------------------

# A jax key path becomes a refx path by the C core's own rule
# (refx.keypath_to_path), the one partitions are keyed by.

def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _is_ref(x: Any) -> bool:
    return isinstance(x, Ref)


def _is_array(x: Any) -> bool:
    # jax.Array covers tracers too; np.generic covers numpy scalars
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_py_scalar(x: Any) -> bool:
    # np.float64 subclasses float (and np.complex128 complex): numpy scalars
    # are arrays here, with a dtype to check
    return isinstance(x, _SCALAR_TYPES) and not isinstance(x, np.generic)


def _is_abstract(x: Any) -> bool:
    """A leaf of an abstract tree (refx.eval_shape): loading into it makes
    the array."""
    return isinstance(x, jax.ShapeDtypeStruct)


def _is_key(x: Any) -> bool:
    """A typed PRNG key array (jax.random.key), or its ShapeDtypeStruct: its
    dtype is not numpy's."""
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> Any:
    """The PRNG implementation of a key array or of its ShapeDtypeStruct
    (jax.random.key_impl takes arrays only; a tracer of an abstract
    evaluation is one)."""
    if not _is_abstract(x):
        return jax.random.key_impl(x)
    found: list[Any] = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), x)
    return found[0]


def _spec(shape: Any, dtype: Any) -> str:
    """'float32[3,3]', 'key<fry>[]' (str of a dtype: numpy's or JAX's extended ones)."""
    return f"{dtype}[{','.join(map(str, shape))}]"


def _same_dtype(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except TypeError:  # pragma: no cover - a dtype that does not compare
        return False


def _describe(x: Any) -> str:
    """'float32[3,3]' for an array, 'int' for a Python int, else the type."""
    if _is_array(x) or isinstance(x, jax.ShapeDtypeStruct):
        return _spec(np.shape(x), x.dtype)
    return type(x).__name__


# ---------------------------------------------------------------------------
# the layout of a tree's state
# ---------------------------------------------------------------------------


class _Entry(NamedTuple):
    """One distinct Ref (or deref'ed Value) selected by the filter."""

    path: tuple[str, ...]  # its first path
    ref: Any  # the Ref, or the Value of a deref'ed tree
    treedef: Any  # structure of its value
    names: tuple[str, ...]  # one name per leaf of its value
    leaves: tuple[Any, ...]  # the leaves it holds now
    repeats: list[tuple[str, ...]]  # its later paths, if shared
    specs: tuple[Any, ...] = ()  # each leaf's declared sharding or None (_sharding.leaf_specs)


class _Layout(NamedTuple):
    entries: list[_Entry]
    where: dict[str, tuple[int, int]]  # name -> (entry, leaf) indexes

    def storage_form(self) -> _Layout:
        """The layout with each leaf as orbax stores it (_to_storage)."""
        entries = [e._replace(leaves=tuple(map(_to_storage, e.leaves))) for e in self.entries]
        return _Layout(entries, self.where)

    def repeat_names(self) -> dict[str, str]:
        """{name a repeat of a shared Ref would have: the name it is stored under}"""
        out = {}
        for e in self.entries:
            base = _join(e.path)
            for rpath in e.repeats:
                rbase = _join(rpath)
                for name in e.names:
                    out[rbase + name[len(base) :]] = name
        return out


def _layout(fname: str, tree: Any, filter: Any, *, writable: bool) -> _Layout:
    part = get_partition(tree, All(_REFX_LEAF, filter))
    n_ref = n_deref = 0
    for leaf in part.values():
        if isinstance(leaf, Ref):
            n_ref += 1
        elif isinstance(leaf, Deref):
            n_deref += 1
    if n_deref and (n_ref or writable):
        where = next(p for p, x in part.items() if isinstance(x, Deref))
        if writable:
            raise TypeError(
                f"{fname}: the tree holds deref'ed nodes ({type(part[where]).__name__} at "
                f"{where!r}); load into the tree of Refs (reref a deref'ed tree first)"
            )
        raise TypeError(
            f"{fname}: the tree mixes Refs and deref'ed nodes ({type(part[where]).__name__} "
            f"at {where!r}); give a tree of Refs or a deref'ed tree"
        )
    numbered = part if n_deref else deref(part)

    entries: list[_Entry] = []
    where_name: dict[str, tuple[int, int]] = {}
    origin: dict[str, str] = {}  # name -> description of where it comes from
    by_index: dict[int, _Entry] = {}
    for (path, leaf), node in zip(part.items(), numbered.values(), strict=True):
        if isinstance(node, Deref) and not isinstance(node, Value):
            # an Index: a later occurrence of a shared Ref
            if node.index not in by_index:
                raise ValueError(
                    f"{fname}: Index({node.index}) at {path!r} has no Value selected "
                    f"before it; select the Value and its Indexes with the same filter"
                )
            by_index[node.index].repeats.append(path)
            continue
        if not isinstance(node, Value):  # NOTHING: not selected
            continue
        # Value and Index are pytree nodes inside a value (an optax state
        # made from a deref'ed partition holds them); a Ref is a leaf
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(
            node.value, is_leaf=_is_ref
        )
        base = _join(path)
        names: list[str] = []
        for keypath, x in leaves_with_paths:
            sub = _join(keypath_to_path(keypath))
            name = f"{base}/{sub}" if base and sub else base or sub
            at = f"{path!r}" + (f" (at {sub!r} in its value)" if sub else "")
            if isinstance(x, Ref):
                raise TypeError(
                    f"{fname}: the Ref at {at} holds a Ref; a Ref inside a Ref's value "
                    f"is not state a checkpoint can hold (deref the value first)"
                )
            if not (_is_array(x) or isinstance(x, _SCALAR_TYPES) or _is_abstract(x)):
                raise TypeError(
                    f"{fname}: the Ref at {at} holds a {type(x).__name__}; state dicts "
                    f"hold arrays and Python scalars (keep other values out of Refs, or "
                    f"leave their Refs out with the filter)"
                )
            if name in origin:
                raise ValueError(
                    f"{fname}: two values are named {name!r}: the Ref at {origin[name]} and "
                    f"the Ref at {at}; names join paths with '/', so a key containing '/' "
                    f"can collide (rename the key)"
                )
            origin[name] = at
            where_name[name] = (len(entries), len(names))
            names.append(name)
        ref = leaf if isinstance(leaf, Ref) else node
        entry = _Entry(
            path, ref, treedef, tuple(names), tuple(x for _, x in leaves_with_paths), [],
            _sharding.leaf_specs(node),
        )
        entries.append(entry)
        by_index[node.index] = entry
    return _Layout(entries, where_name)


# ---------------------------------------------------------------------------
# checks shared by load_state_dict and restore
# ---------------------------------------------------------------------------


def _mismatch(current: Any, shape: tuple[int, ...], dtype: Any, is_array: bool) -> str | None:
    """Why a stored leaf of this shape/dtype cannot replace `current`, or None.

    `is_array` is False for a stored Python scalar.  A Python scalar in the
    tree accepts a Python scalar of its kind or a 0-d array of its kind (it
    is loaded back as a Python scalar); an array accepts only an array of
    its own shape and dtype, never a silent cast.
    """
    if _is_abstract(current) and not is_array and current.shape == ():
        # an abstract tree's Python scalar (refx.eval_shape makes it a 0-d
        # array): a stored Python scalar of its kind
        kinds = "iu" if current.dtype.kind in "iu" else current.dtype.kind
        if getattr(dtype, "kind", None) in tuple(kinds):
            return None
        return _describe(current) + " in the tree"
    if _is_py_scalar(current):
        # the first match: bool before int (an IntEnum is an int)
        kind = next(k for t, k in _SCALAR_KINDS.items() if isinstance(current, t))
        dkind = getattr(dtype, "kind", None)  # 'f' for float64; None for a key dtype
        if shape == () and isinstance(dkind, str) and len(dkind) == 1 and dkind in kind:
            return None
        return f"a Python {type(current).__name__} in the tree"
    if (
        not is_array
        or tuple(np.shape(current)) != tuple(shape)
        or not _same_dtype(current.dtype, dtype)
    ):
        return _describe(current) + " in the tree"
    return None


def _stored_describe(shape: tuple[int, ...], dtype: Any, is_array: bool) -> str:
    if not is_array:
        return f"a Python scalar ({dtype})"
    return _spec(shape, dtype)


def _check(
    fname: str,
    layout: _Layout,
    stored: Mapping[str, tuple[tuple[int, ...], Any, bool]],
    strict: bool,
    source: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compare the names/shapes/dtypes of `stored` with the tree's.

    Returns (missing, unexpected); raises one ValueError listing every
    problem: mismatched shapes or dtypes always, missing and unexpected
    names when `strict`.
    """
    missing = tuple(n for n in layout.where if n not in stored)
    unexpected = tuple(n for n in stored if n not in layout.where)
    problems: list[str] = []
    for name, (shape, dtype, is_array) in stored.items():
        w = layout.where.get(name)
        if w is None:
            continue
        current = layout.entries[w[0]].leaves[w[1]]
        why = _mismatch(current, shape, dtype, is_array)
        if why is not None:
            problems.append(
                f"  {name!r}: {_stored_describe(shape, dtype, is_array)} in the {source}, {why}"
            )
    if strict and missing:
        problems.append(
            f"  missing from the {source} (in the tree): " + ", ".join(map(repr, missing))
        )
    if strict and unexpected:
        repeats = layout.repeat_names()
        tied = [f"{n!r} is the same Ref as {repeats[n]!r}" for n in unexpected if n in repeats]
        problems.append(
            f"  unexpected in the {source} (not in the tree): "
            + ", ".join(map(repr, unexpected))
            + (
                f" (in the tree, {', '.join(tied)}; a shared Ref is stored once, under its "
                f"first path)"
                if tied
                else ""
            )
        )
    if problems:
        fix = (
            "pass strict=False to load the names that match, or a filter to select part "
            "of the tree"
            if strict and (missing or unexpected)
            else "shapes and dtypes must match exactly, even with strict=False"
        )
        raise ValueError(
            f"{fname}: the {source} does not match the tree; nothing was loaded:\n"
            + "\n".join(problems)
            + f"\n{fix}"
        )
    return missing, unexpected


def _target_sharding(entry: _Entry, index: int, current: Any) -> Any:
    """The sharding leaf `index` loaded into `entry`'s Ref should have, or None.

    The sharding the Ref declares (or a Value inside its value does, for an
    optax state's moments) on the active mesh, else on the mesh of the
    array it holds now (_sharding.restore_sharding); without a declaration
    or a mesh, the sharding of the jax.Array the Ref holds now.
    """
    if isinstance(current, jax.core.Tracer):
        return None
    declared = entry.specs[index] if entry.specs else None
    if declared is not None and (_is_array(current) or _is_abstract(current)):
        sharding = _sharding.restore_sharding(declared, current)
        if sharding is not None:
            return sharding
    if isinstance(current, jax.Array):
        return current.sharding
    if _is_abstract(current):
        if current.sharding is not None:
            return current.sharding
        # no declaration: replicated on the active mesh (refx.shardings' rule)
        mesh = _compat.active_mesh()
        return None if mesh is None else jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec())
    return None


def _convert(entry: _Entry, index: int, current: Any, new: Any) -> Any:
    """`new` in the form of `current`: a Python or numpy scalar stays one, a
    numpy array for a jax.Array goes onto its sharding."""
    if _is_py_scalar(current):
        if isinstance(new, (np.ndarray, np.generic)):
            return type(current)(new.item())
        return new
    if isinstance(current, np.generic) and isinstance(new, np.ndarray):
        return new[()]
    sharding = _target_sharding(entry, index, current)
    if _is_abstract(current) and not isinstance(new, jax.Array):
        # loading into an abstract tree makes the array (default device
        # without a sharding), of the abstract leaf's dtype (a Python scalar)
        new = jax.device_put(np.asarray(new, dtype=current.dtype) if np.ndim(new) == 0
                             else new, sharding)
    elif sharding is not None and not isinstance(new, jax.Array):
        new = jax.device_put(new, sharding)
    if getattr(current, "weak_type", False) and isinstance(new, jax.Array) and not new.weak_type:
        # a weakly typed scalar (Ref(jnp.array(0.5))) stays one: numpy and
        # orbax have no weak types, and a strong float32 would promote a
        # bf16 parameter it multiplies
        new = _compat.weak(new)
    return new


def _write(layout: _Layout, state: Mapping[str, Any]) -> None:
    """Write `state` (names already checked) into the Refs, all or nothing."""
    target: dict[tuple[str, ...], Any] = {}
    source: dict[tuple[str, ...], Any] = {}
    for entry in layout.entries:
        if not any(n in state for n in entry.names):
            continue
        leaves = [
            _convert(entry, i, cur, state[n]) if n in state else cur
            for i, (n, cur) in enumerate(zip(entry.names, entry.leaves, strict=True))
        ]
        target[entry.path] = entry.ref
        source[entry.path] = jax.tree_util.tree_unflatten(entry.treedef, leaves)
    if target:
        update_refs(Partition(target), source)


class LoadResult(NamedTuple):
    """What load_state_dict / restore did not load (both empty when strict)."""

    #: names the tree has but the state or checkpoint does not (kept as they were)
    missing: tuple[str, ...]
    #: names the state or checkpoint has but the tree does not (ignored)
    unexpected: tuple[str, ...]


# ---------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------


def state_dict(tree: Any, /, filter: Any = ...) -> dict[str, Any]:
    """The state of the Refs of `tree` as a flat ``{name: leaf}`` dict.

    Names are the refx paths joined with "/" (``"blocks/0/linear/w"``).  A
    Ref shared by several paths is stored once, under its first path (leaf
    order, dict keys sorted).  A Ref holding a pytree gives one name per
    leaf (``"opt/0/mu/w"``).  `filter` selects Refs as in get_partition
    (``"params"``, a type, a predicate, ...); leaves that are not Refs are
    structure, not state, and are left out.  `tree` may also be a deref'ed
    tree (Values are stored, Indexes are the repeats).  The leaves are the
    held objects themselves, not copies.
    """
    return _state_dict("state_dict", tree, filter)


def _state_dict(fname: str, tree: Any, filter: Any) -> dict[str, Any]:
    layout = _layout(fname, tree, filter, writable=False)
    return {
        name: leaf
        for entry in layout.entries
        for name, leaf in zip(entry.names, entry.leaves, strict=True)
    }


def load_state_dict(
    tree: Any, state: Mapping[str, Any], /, *, filter: Any = ..., strict: bool = True
) -> LoadResult:
    """Write a state dict (as made by state_dict) into the Refs of `tree`.

    Every leaf must have the shape and dtype of the leaf the Ref holds now.
    With strict=True (the default) the names must be exactly those
    ``state_dict(tree, filter)`` has; strict=False loads the names that
    match and returns the others in the LoadResult.  All checks come first
    and the write goes through update_refs: an error changes no Ref.
    Shared Refs are written once and stay shared.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"load_state_dict: state must be a mapping {{name: array}}, got {type(state).__name__}"
        )
    layout = _layout("load_state_dict", tree, filter, writable=True)
    stored: dict[str, tuple[tuple[int, ...], Any, bool]] = {}
    for name, x in state.items():
        if not isinstance(name, str):
            raise TypeError(
                f"load_state_dict: state names must be str, got {type(name).__name__} {name!r}"
            )
        if _is_array(x):
            stored[name] = (tuple(np.shape(x)), x.dtype, True)
        elif isinstance(x, _SCALAR_TYPES):
            stored[name] = ((), np.asarray(x).dtype, False)
        else:
            raise TypeError(
                f"load_state_dict: {name!r} is a {type(x).__name__}; a state dict holds "
                f"arrays and Python scalars"
            )
    missing, unexpected = _check("load_state_dict", layout, stored, strict, "state")
    _write(layout, {n: state[n] for n in stored if n in layout.where})
    return LoadResult(missing, unexpected)


# ---------------------------------------------------------------------------
# orbax
# ---------------------------------------------------------------------------


def _orbax(fname: str) -> Any:
    try:
        import orbax.checkpoint as ocp  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as e:
        raise ImportError(
            f"{fname}: refx checkpoints need orbax-checkpoint: pip install 'refx[orbax]'"
        ) from e
    return ocp


def _directory(directory: str | os.PathLike[str]) -> str:
    # orbax wants absolute paths
    return os.path.abspath(os.fspath(directory))


def save(
    directory: str | os.PathLike[str], tree: Any, /, *, filter: Any = ..., force: bool = False
) -> None:
    """Save ``state_dict(tree, filter)`` as an orbax checkpoint in `directory`.

    The checkpoint is a flat dict of names (see state_dict), readable with
    orbax's own API too.  `force=True` replaces an existing checkpoint.
    Needs orbax-checkpoint (``pip install 'refx[orbax]'``).
    """
    ocp = _orbax("save")
    path = _directory(directory)
    state = {n: _to_storage(x) for n, x in _state_dict("save", tree, filter).items()}
    if not state:
        raise ValueError("save: the filter selects no Ref with state; nothing to save")
    if "" in state:
        # orbax 0.11.5 fails on an empty name (0.12 accepts it): refuse it everywhere
        raise ValueError(
            "save: the tree is a single Ref, whose name is the empty path ''; save a "
            "container that holds it, e.g. {'w': ref}"
        )
    if os.path.exists(path) and not force:
        raise FileExistsError(f"save: {path} already exists; pass force=True to replace it")
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(state), force=force)


# orbax stores arrays and Python bool/int/float; these leaves go in another
# form (checked against the checkpoint in that form, and turned back):
#   numpy scalars and Python complex   a 0-d numpy array
#   typed PRNG keys (jax.random.key)   their key data (orbax 0.11 cannot
#                                      store key dtypes)


def _to_storage(x: Any) -> Any:
    if _is_key(x):
        if _is_abstract(x):  # the key data's shape (and sharding)
            return jax.eval_shape(jax.random.key_data, x)
        return jax.random.key_data(x)
    if isinstance(x, np.generic) or (isinstance(x, complex) and _is_py_scalar(x)):
        return np.asarray(x)
    return x


def _from_storage(current: Any, stored: Any) -> Any:
    if _is_key(current):
        return jax.random.wrap_key_data(stored, impl=_key_impl(current))
    return stored  # scalars: _convert turns 0-d arrays back


def _stored_layout(ocp: Any, ckptr: Any, path: str) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
    """{name: (shape, dtype, is_array)} of a checkpoint, read from its metadata."""
    meta = ckptr.metadata(path)
    # orbax >= 0.11.x wraps the tree in StepMetadata.item_metadata (a
    # TreeMetadata with .tree); older versions return the tree itself
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise ValueError(
            f"restore: {path} is not a refx checkpoint (a flat dict of names, as written by "
            f"refx.save); read it with orbax's own API"
        )
    stored = {}
    for name, m in meta.items():
        shape, dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
        if shape is None or dtype is None:
            raise ValueError(
                f"restore: {name!r} in {path} is not an array or scalar "
                f"({type(m).__name__}); not a refx checkpoint"
            )
        is_array = type(m).__name__ != "ScalarMetadata"
        stored[name] = (tuple(shape), dtype, is_array)
    return stored


def _restore_target(entry: _Entry, index: int, current: Any) -> Any:
    """What orbax should restore a leaf as (in storage form): an abstract
    array with the sharding the Ref wants, or (numpy arrays, Python scalars)
    the leaf itself, which orbax reads for its type, shape and dtype."""
    if isinstance(current, jax.core.Tracer):
        raise ValueError(
            f"restore: the Ref at {entry.path!r} holds a tracer; restore outside of JAX "
            f"transforms"
        )
    stored = _to_storage(current)
    # a key's data is sharded like the key (plus a trailing axis)
    sharding = _target_sharding(entry, index, stored)
    if sharding is None and _is_abstract(stored):
        # an abstract leaf without a sharding: made on the default device
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if sharding is not None:
        return jax.ShapeDtypeStruct(stored.shape, stored.dtype, sharding=sharding)
    return stored


def restore(
    directory: str | os.PathLike[str],
    tree: Any,
    /,
    *,
    filter: Any = ...,
    strict: bool = True,
) -> LoadResult:
    """Restore a checkpoint written by save into the Refs of `tree`.

    Names, shapes and dtypes are checked against the checkpoint's metadata
    before any array is read (the rules of load_state_dict, one error
    listing every problem); each array is then read onto the sharding of
    the array its Ref holds now, and written through update_refs, all or
    nothing.  Shared Refs stay shared.  `tree` may be abstract (made by
    refx.eval_shape, its Refs holding jax.ShapeDtypeStructs): restoring
    into it makes the arrays, each read straight onto its Ref's declared
    sharding (the ShapeDtypeStruct's; the default device without one).
    """
    ocp = _orbax("restore")
    path = _directory(directory)
    layout = _layout("restore", tree, filter, writable=True)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"restore: no checkpoint at {path}")
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = _stored_layout(ocp, ckptr, path)
        # checked in storage form (a key as its key data)
        missing, unexpected = _check(
            "restore", layout.storage_form(), stored, strict, "checkpoint"
        )
        target, current = {}, {}
        for name in stored:
            w = layout.where.get(name)
            if w is not None:
                entry = layout.entries[w[0]]
                current[name] = entry.leaves[w[1]]
                target[name] = _restore_target(entry, w[1], current[name])
        if not target:
            return LoadResult(missing, unexpected)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        # transforms={} reads only the names in `target` (orbax's partial
        # restore; newer orbax also has partial_restore=True, 0.11.5 does not)
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, transforms={} if unexpected else None
        )
        state = ckptr.restore(path, args=args)
    _write(layout, {n: _from_storage(current[n], x) for n, x in state.items()})
    return LoadResult(missing, unexpected)
