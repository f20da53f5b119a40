"""refx.eval_shape, refx.custom_vjp / refx.custom_jvp and refx.shard_map:
more JAX transforms for functions of trees of Refs, each one the lift of
refx/_lift.py around one JAX transform, built as refx/_control.py builds
vmap and scan:

  number/read  the Refs of the arguments, sharing kept, read at one moment
               (``Trees``);
  lift         inside the JAX transform, new Refs of its trace hold the
               (traced) values and the trees are rebuilt around them
               (``Trees.lift``), `fun` runs, the trees must keep their
               structure (``Inner.check_structure``) and what `fun` wrote
               is found (``Inner.written``);
  out          the outputs are described by ``plan_out`` and rebuilt by
               ``rebuild_out``;
  write back   the Refs `fun` wrote, all or nothing, last (``Trees.write``).

What differs per transform:

  eval_shape   nothing is written back (abstract evaluation computes no
               value); every Ref of the output, an argument's or one made
               inside, comes out as a new Ref (same class, collection,
               metadata) holding jax.ShapeDtypeStructs, with the
               NamedSharding its declaration names under an active mesh.
  custom_vjp   the Ref values of the differentiable arguments are inputs of
  custom_jvp   one jax.custom_vjp / jax.custom_jvp function; values `fun`
               wrote leave it as extra outputs without derivative (bwd never
               sees their cotangents; the jvp rule's tangent for them is
               zero).
  shard_map    each Ref's value enters at the PartitionSpec its argument's
               in_specs entry (or a StateSharding filter) gives it, and
               every Ref's value leaves at the same spec; the written ones
               are written back.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# the C core has no stub of its own (refx/__init__.pyi describes it)
from . import _compat, _core, _sharding  # type: ignore[attr-defined]
from ._core import Ref, Value, tree_partition  # type: ignore[import-not-found]
from ._lift import (Const, Trees, make_refs, name_of, payload_tree, place_name, plan_out,
                    rebuild_out, traceable)
from ._mutable import _with_mutable

_tree_flatten = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten


def _check_callable(kind, fun, what="fun"):
    if not callable(fun):
        raise TypeError(f"refx.{kind}: {what} must be callable, not {type(fun).__name__}")


# --------------------------------------------------------------------------
# eval_shape
# --------------------------------------------------------------------------


def _is_deref(x):
    return isinstance(x, _core.Deref)


def _abstract_leaf(x, sharding, mesh, fname, where):
    """A ShapeDtypeStruct of `x` (one already), on `sharding` (a
    PartitionSpec or NamedSharding, None: as it is) of `mesh`."""
    if not isinstance(x, jax.ShapeDtypeStruct):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x  # not an array (None, a Python scalar the Ref held)
        x = jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=getattr(x, "weak_type", False))
    if sharding is None:
        if mesh is None:
            return x
        sharding = PartitionSpec()  # declared none: replicated (refx.shardings' rule)
    if isinstance(sharding, NamedSharding):
        target = sharding
    elif mesh is None:
        return x  # no mesh: a declaration is inert metadata (as on a Ref)
    else:
        target = NamedSharding(mesh, sharding)
    _sharding._check(sharding, x, target.mesh, fname, where)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target, weak_type=x.weak_type)


def _abstract_value(value, sharding, mesh, fname, where):
    """`value` (a pytree) with ShapeDtypeStruct leaves on `sharding`, those
    under a Value inside it (an optax state's moments) on the Value's."""
    items, td = _tree_flatten(value, is_leaf=_is_deref)
    out = []
    for x in items:
        if isinstance(x, Value):
            inner = _abstract_value(x.value, _sharding.declared(x), mesh, fname,
                                    f"{where} (a Value inside it)")
            x = _core._value_unflatten(_core._value_flatten(x)[1], (inner,))
        elif not isinstance(x, (Ref, _core.Deref)):
            x = _abstract_leaf(x, sharding, mesh, fname, where)
        out.append(x)
    return _tree_unflatten(td, out)


def eval_shape(fun, /, *args, **kwargs):
    """jax.eval_shape for functions of trees of Refs: the shapes and dtypes
    of fun(*args, **kwargs), computed without computing anything.

    `fun` runs once, abstractly, on new Refs holding the arguments' values
    as abstract values (same sharing, classes, collections and metadata);
    it may read and write them and make new Refs, with refx.jit's checks.
    The result has the structure of fun's output with every array leaf a
    ``jax.ShapeDtypeStruct``, and every Ref in it, whether made inside
    (``refx.eval_shape(lambda k: MLP(k), key)``: an abstract model), an
    argument's or one closed over, is a *new* Ref of its class, collection
    and metadata holding ShapeDtypeStructs of the value it has when `fun`
    returns (sharing kept: one Ref at several places is one new Ref).
    A Ref that declares a sharding (``Ref(x, sharding=...)``) holds
    ShapeDtypeStructs with that NamedSharding: on the active mesh, or the
    NamedSharding it declares; under an active mesh a Ref that declares
    none gets the replicated NamedSharding (refx.shardings' rule, so the
    abstract model's shardings are refx.shardings'); without a mesh a
    declaration stays metadata only.  Leaves JAX cannot trace are returned as they are.

    Nothing is written: an argument Ref `fun` writes keeps its value
    (abstract evaluation has no value to write back); only the checks of
    a write run (a changed structure or metadata is an error, as in
    refx.jit).  The abstract model works with refx.shardings (the target
    shardings of a sharded init), refx.summary (counts without memory) and
    refx.restore / load_state_dict (loading into it makes the arrays, on
    each Ref's declared sharding).
    """
    _check_callable("eval_shape", fun)
    name = name_of(fun)
    t = Trees("eval_shape", name, [(args, kwargs)], [None])
    prefix = t.prefix()
    info = {}  # type: ignore[var-annotated]

    def body(vals, traced):
        inner = t.lift(vals, traced)
        ((a, kw),) = inner.trees
        out = fun(*a, **kw)
        inner.check_structure(prefix)
        inner.written(prefix, t.where)  # its checks; nothing is written back
        # every Ref of the output leaves as one made inside: an argument's
        # (a Ref of this trace already) with the value it has now, one
        # closed over through a stand-in of this trace holding its value
        leaves, td = _tree_flatten(out)
        stand_in = {}  # type: ignore[var-annotated]
        for x in leaves:
            if isinstance(x, Ref) and id(x) not in stand_in and not _core._ref_is_current(x):
                stand_in[id(x)] = make_refs([x.value], (x.collection,),
                                            (_core._ref_spec(x),))[0]
        if stand_in:
            out = td.unflatten([stand_in.get(id(x), x) if isinstance(x, Ref) else x
                                for x in leaves])
        spec, td, items = plan_out(out, ())
        info["out"] = (spec, td)
        return payload_tree(spec, td, items)

    body.__name__ = body.__qualname__ = f"refx_eval_shape({name})"
    payload = jax.eval_shape(body, t.vals, t.traced)
    spec, td = info["out"]
    if spec is None:
        return payload
    mesh = _compat.context_mesh() if _compat.in_trace() else _compat.active_mesh()
    subs = td.flatten_up_to(payload)
    for i, (s, sub) in enumerate(zip(spec, subs, strict=True)):
        if type(s) is tuple and sub is not None:
            subs[i] = _abstract_value(sub, _sharding.declared(s[1]), mesh, prefix,
                                      f"the value of the Ref at output leaf {i}")
    return rebuild_out(spec, td, td.unflatten(subs), ())

