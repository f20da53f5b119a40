"""Declared shardings: ``Ref(x, "params", sharding=("model", None))``.

A Ref's ``sharding`` is ordinary metadata (hashable, read-only, carried by
deref into the Value/Index aux data and so into every jit cache key).  It
is one of

* a tuple with one entry per leading dimension of the value: a mesh axis
  name, a tuple of names, or None (``("model", None)``); fewer entries
  than dimensions leave the rest unsharded, as a PartitionSpec does;
* a ``jax.sharding.PartitionSpec``;
* a ``jax.sharding.NamedSharding`` (a spec with its own mesh, used as is);
* None: no declared sharding (as if the entry were absent).

A tuple or PartitionSpec names mesh axes, not a mesh: it takes effect under
an *active mesh* (``jax.set_mesh(mesh)``, ``jax.sharding.use_mesh``,
``with mesh:``; refx/_compat.py knows which the installed JAX has), and is
inert metadata without one.  What uses it:

* creating the Ref (``Ref(...)``, ``replace``, unpickling) places its value
  on it: ``jax.device_put`` outside a trace, a sharding constraint on a
  traced value (``place``, the hook the C core calls; see ref.c's
  ``ref_place``);
* ``refx.jit`` constrains every declared Ref's value to it where the value
  enters the compiled function and where a written value leaves it, so
  after a step every written Ref still has its declared sharding; refx.grad
  does the same for written values and gradients (``constrain_values``);
* ``refx.shardings(tree)`` gives the NamedSharding of every Ref, in the
  shape of ``deref(tree)``, for jax.jit and orbax;
* ``refx.restore`` / ``load_state_dict`` read each array onto it
  (``restore_sharding``).

A Ref's value may be a pytree (an optax state): the Ref's sharding then
applies to each of its array leaves, except under a deref'ed node
(Value/Index) inside the value, which has its own: an optax state built
from ``get_partition(deref(model), "params")`` holds Values carrying each
parameter's metadata, so its moments follow their parameter's sharding.

Explicit mesh axes (``jax.make_mesh``'s default from JAX 0.9) make an
array's sharding part of its type: a traced value is moved to a declared
sharding over such axes with ``jax.sharding.reshard`` (with_sharding_
constraint only asserts there), over Auto axes with with_sharding_
constraint.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import _compat
from ._core import Deref, Ref, Value, deref  # type: ignore[import-not-found]
from ._core import _value_flatten, _value_unflatten  # type: ignore[import-not-found]

SHARDING = "sharding"
_tree_flatten = jax.tree_util.tree_flatten


def _is_deref(x: Any) -> bool:
    return isinstance(x, Deref)


def _is_refx(x: Any) -> bool:
    return isinstance(x, (Ref, Deref))


# --------------------------------------------------------------------------
# what a declaration is
# --------------------------------------------------------------------------


def as_spec(sharding: Any, fname: str) -> PartitionSpec | NamedSharding:
    """The PartitionSpec (or NamedSharding) a `sharding` metadata value
    stands for; TypeError naming `fname` for anything else."""
    if isinstance(sharding, (PartitionSpec, NamedSharding)):
        return sharding
    if isinstance(sharding, tuple):
        for entry in sharding:
            if entry is None or isinstance(entry, str):
                continue
            if isinstance(entry, tuple) and all(isinstance(n, str) for n in entry):
                continue
            raise TypeError(
                f"{fname}: sharding={sharding!r}: each entry is a mesh axis name, a tuple of "
                f"names or None (one per dimension), got {entry!r}")
        return PartitionSpec(*sharding)
    raise TypeError(
        f"{fname}: sharding must be a tuple of mesh axis names (one entry per dimension: a "
        f"name, a tuple of names or None), a PartitionSpec or a NamedSharding, not "
        f"{type(sharding).__name__} {sharding!r}")


def _from_pairs(pairs: tuple) -> Any:
    """The sharding entry of a kind's metadata: (name, value, type) entries."""
    for entry in pairs:
        if entry[0] == SHARDING:
            return entry[1]
    return None


def declared(x: Any) -> PartitionSpec | NamedSharding | None:
    """The sharding a Ref, a deref'ed node or a Ref spec (a class, or the
    kind (class, metadata pairs, attribute pairs) of _core._ref_spec)
    declares, or None."""
    if isinstance(x, (Ref, Deref)):
        raw = x.metadata.get(SHARDING)
        fname = f"the {type(x).__name__}"
    elif isinstance(x, tuple):
        raw = _from_pairs(x[1])
        fname = f"the {x[0].__name__}"
    else:  # a plain Ref class: no metadata
        return None
    return None if raw is None else as_spec(raw, fname)


def _spec_of(sharding: PartitionSpec | NamedSharding) -> PartitionSpec:
    return sharding.spec if isinstance(sharding, NamedSharding) else sharding


def _axes(spec: PartitionSpec) -> set[str]:
    names: set[str] = set()
    for entry in spec:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, tuple):
            names.update(entry)
    return names


def _check(sharding: PartitionSpec | NamedSharding, x: Any, mesh: Any, fname: str,
           where: str) -> None:
    """The spec fits `x` (no more entries than dimensions) and names only
    axes of `mesh`; ValueError otherwise."""
    spec = _spec_of(sharding)
    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
    ndim = getattr(x, "ndim", None)
    if ndim is not None and len(spec) > ndim:
        raise ValueError(
            f"{fname}: sharding {tuple(spec)!r} has {len(spec)} entries but {where} is "
            f"{_describe(x)}; give at most one entry (a mesh axis name, a tuple of names or "
            f"None) per dimension")
    missing = sorted(_axes(spec) - set(mesh.axis_names))
    if missing:
        raise ValueError(
            f"{fname}: sharding {tuple(spec)!r} names mesh axes {missing} that the mesh does "
            f"not have (its axes: {tuple(mesh.axis_names)!r})")


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return f"a {type(x).__name__}"
    return f"{dtype}[{','.join(map(str, shape))}]"


def _is_array(x: Any) -> bool:
    # jax.Array covers tracers too
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


# --------------------------------------------------------------------------
# placing values
# --------------------------------------------------------------------------


class _Placer:
    """How to put values on declared shardings, here and now: device_put on
    a NamedSharding of the active mesh outside a trace; inside one, a
    constraint to the spec under the context mesh (jax.set_mesh's abstract
    mesh, or `with mesh:`), or to a NamedSharding of `fallback` (a concrete
    mesh) when there is no context mesh.  No mesh at all: only NamedSharding
    declarations, which bring their mesh, take effect."""

    __slots__ = ("traced", "mesh", "bare")

    def __init__(self, fallback: Any = None) -> None:
        self.traced = _compat.in_trace()
        self.mesh = _compat.context_mesh() if self.traced else _compat.active_mesh()
        # inside a trace, a bare spec is resolved by JAX against the abstract
        # context mesh (jax.set_mesh); a concrete one (`with mesh:`, or the
        # fallback) goes into a NamedSharding
        self.bare = self.traced and self.mesh is not None and not isinstance(
            self.mesh, jax.sharding.Mesh)
        if self.mesh is None:
            self.mesh = fallback

    def leaf(self, x: Any, sharding: Any, fname: str, where: str) -> Any:
        """`x` on `sharding` (a PartitionSpec or NamedSharding), or `x`
        itself when it is not an array or there is no mesh for it."""
        if not _is_array(x):
            return x  # Python scalars, None, strings: not placed
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
        elif self.mesh is None:
            return x
        else:
            mesh = self.mesh
        _check(sharding, x, mesh, fname, where)
        if isinstance(sharding, NamedSharding) or self.bare:
            target = sharding
        else:
            target = NamedSharding(mesh, sharding)
        try:
            if self.traced or isinstance(x, jax.core.Tracer):
                return _compat.constrain(x, target, mesh)
            return jax.device_put(x, target)
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"{fname}: cannot put {where} ({_describe(x)}) on sharding "
                f"{tuple(_spec_of(sharding))!r} of mesh {dict(mesh.shape)}: {e}") from e

    def tree(self, value: Any, sharding: Any, fname: str, where: str) -> Any:
        """`value` (any pytree) with its array leaves on `sharding` (None:
        left alone), and the leaves under Values inside it on their own
        declared sharding.  Returns `value` itself when nothing changed."""
        if _is_array(value):
            return value if sharding is None else self.leaf(value, sharding, fname, where)
        items, treedef = _tree_flatten(value, is_leaf=_is_refx)
        out, changed = [], False
        for x in items:
            if isinstance(x, Value):
                y = self.tree(x.value, declared(x), fname, f"{where} (a Value inside it)")
                if y is not x.value:
                    x = _value_unflatten(_value_flatten(x)[1], (y,))
                    changed = True
            elif sharding is not None and not isinstance(x, (Ref, Deref)):
                y = self.leaf(x, sharding, fname, where)
                changed |= y is not x
                x = y
            out.append(x)
        return jax.tree_util.tree_unflatten(treedef, out) if changed else value


def place(value: Any, sharding: Any, fname: str) -> Any:
    """The C core's hook: the value a new Ref declaring `sharding` holds
    (ref.c, ref_place).  Validates the declaration even without a mesh."""
    spec = as_spec(sharding, fname)
    return _Placer().tree(value, spec, fname, "the value")


def constrain_values(values: list[Any], specs: list[Any], fname: str,
                     fallback: Any = None) -> list[Any]:
    """refx.jit / refx.grad: each Ref's value on the sharding its spec (a
    class or kind, as _core._ref_spec gives) declares.  The list itself
    when no value changed."""
    placer = _Placer(fallback)
    out, changed = list(values), False
    for k, (v, spec) in enumerate(zip(values, specs, strict=True)):
        y = placer.tree(v, declared(spec), fname, f"the value of Ref number {k}")
        if y is not v:
            out[k] = y
            changed = True
    return out if changed else values


def stacked_spec(spec: Any, axis: int, ndim: int) -> Any:
    """The spec of a Ref made inside refx.vmap, for its stacked value (of
    `ndim` dimensions, stacked at `axis`): its declared sharding with an
    unsharded entry for the new axis, so each member keeps the layout it
    declared (Flax NNX's rule for vmap'ed variables)."""
    sharding = declared(spec)
    if sharding is None:
        return spec
    axis = axis % ndim if ndim else 0
    entries = list(_spec_of(sharding))
    entries += [None] * max(0, ndim - 1 - len(entries))
    entries.insert(axis, None)
    new: Any = PartitionSpec(*entries)
    if isinstance(sharding, NamedSharding):
        new = NamedSharding(sharding.mesh, new)
    pairs = tuple((n, new, type(new)) if n == SHARDING else (n, v, t) for n, v, t in spec[1])
    return (spec[0], pairs, spec[2])


def any_declared(specs: Any) -> bool:
    """Does any Ref spec (class or kind) declare a sharding?"""
    return any(isinstance(s, tuple) and _from_pairs(s[1]) is not None for s in specs)


def mesh_of(values: Any) -> Any:
    """The mesh of the first array among `values` that has a NamedSharding
    (a concrete, non-traced array), or None."""
    for leaf in _tree_flatten(values)[0]:
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and not isinstance(leaf, jax.core.Tracer):
            return s.mesh
    return None


# --------------------------------------------------------------------------
# refx.shardings
# --------------------------------------------------------------------------


def shardings(tree: Any, /, mesh: Any = None) -> Any:
    """The NamedSharding of every Ref of `tree`, in the shape of
    ``deref(tree)``: each Value holds, at each leaf of its value, the
    sharding its Ref declares on `mesh` (default: the active mesh; a
    declared NamedSharding brings its own), or the replicated
    ``NamedSharding(mesh, PartitionSpec())`` when it declares none.  Leaves
    that are not in Refs get None (jax.jit's "unspecified").  `tree` may be
    a tree of Refs or a deref'ed tree (a Partition, an optax state built
    on one); deref'ed nodes inside a Ref's value use their own
    declaration.  For ``jax.jit(f, in_shardings=refx.shardings(model))``
    on ``deref(model)``, and as orbax restore targets.
    """
    if mesh is not None and not isinstance(mesh, (jax.sharding.Mesh, _abstract_mesh_type())):
        raise TypeError(f"refx.shardings: mesh must be a jax.sharding.Mesh, not "
                        f"{type(mesh).__name__}")
    items = _tree_flatten(tree, is_leaf=_is_refx)[0]
    has_refs = any(isinstance(x, Ref) for x in items)
    if has_refs and any(isinstance(x, Deref) for x in items):
        raise TypeError("refx.shardings: the tree mixes Refs and deref'ed nodes; give a tree "
                        "of Refs or a deref'ed tree")
    d = deref(tree) if has_refs else tree
    if mesh is None:
        mesh = _compat.active_mesh()
    leaves, treedef = _tree_flatten(d)
    out: list[Any] = []
    with_path = jax.tree_util.tree_flatten_with_path(d, is_leaf=_is_deref)[0]
    for keypath, x in with_path:
        _assign(x, None, mesh, jax.tree_util.keystr(keypath), out, top=True)
    if len(out) != len(leaves):  # pragma: no cover - the walk follows tree_flatten
        raise SystemError("refx/_sharding.py: shardings() walked another tree than deref's")
    return jax.tree_util.tree_unflatten(treedef, out)


def _abstract_mesh_type() -> type:
    return getattr(jax.sharding, "AbstractMesh", jax.sharding.Mesh)


def _assign(x: Any, inherited: Any, mesh: Any, where: str, out: list[Any], *,
            top: bool = False) -> None:
    """Append the sharding of each leaf of `x` (a leaf, or a deref'ed node)."""
    if isinstance(x, Deref):
        if not isinstance(x, Value):
            return  # an Index: no leaves
        spec = declared(x)
        if not isinstance(spec, NamedSharding) and mesh is None:
            raise ValueError(
                f"refx.shardings: no mesh for the Ref at {where or 'the root'}: pass "
                f"mesh=..., or call it under jax.set_mesh(mesh) (or `with mesh:`)")
        leaves = jax.tree_util.tree_flatten_with_path(x.value, is_leaf=_is_deref)[0]
        if spec is not None:
            for keypath, leaf in leaves:
                if _is_array(leaf):
                    inner = where + jax.tree_util.keystr(keypath)
                    _check(spec, leaf, mesh, "refx.shardings",
                           f"the value of the Ref at {inner or 'the root'}")
        if isinstance(spec, NamedSharding):
            sharding = spec
        else:
            sharding = NamedSharding(mesh, spec if spec is not None else PartitionSpec())
        for keypath, leaf in leaves:
            _assign(leaf, sharding, mesh, where + jax.tree_util.keystr(keypath), out)
        return
    out.append(None if top else inherited)


def restore_sharding(sharding: Any, current: Any) -> NamedSharding | None:
    """Where a checkpointed leaf declaring `sharding` goes: on the active
    mesh, else on the mesh of the array the Ref holds now, else None (no
    mesh: the caller falls back to the current array's sharding)."""
    if isinstance(sharding, NamedSharding):
        return sharding
    mesh = _compat.active_mesh()
    if mesh is None:
        s = getattr(current, "sharding", None)
        mesh = s.mesh if isinstance(s, NamedSharding) else None
    if mesh is None:
        return None
    return NamedSharding(mesh, sharding)


def leaf_specs(node: Any) -> tuple[Any, ...]:
    """The declared sharding (or None) of each leaf of a Value's value, in
    tree_flatten order: the Value's own, or that of a deref'ed node inside
    the value."""
    out: list[Any] = []

    def walk(value: Any, inherited: Any) -> None:
        for x in _tree_flatten(value, is_leaf=_is_deref)[0]:
            if isinstance(x, Value):
                walk(x.value, declared(x))
            elif not isinstance(x, Deref):
                out.append(inherited)

    walk(node.value, declared(node))
    return tuple(out)
