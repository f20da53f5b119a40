"""refx.grad and refx.value_and_grad: trace-time logic over the lift
(refx/_lift.py).  Python: they run once per call eagerly and once per
trace under jit.

One call, in order; every step that can fail comes before the write-back:

  number/read  the Refs of (args, kwargs), sharing kept, read at one moment
               (``Trees``).
  select       the differentiated Refs: those of argument `argnums` that
               `wrt` accepts.  None is a ValueError naming what the
               argument holds; a Ref holding integers is a TypeError naming
               its place (JAX's own error names no Ref).
  structure    the gradient's structure, get_partition(deref(arg), wrt),
               built now: an argument refx cannot deref fails here, before
               anything is computed or written.
  run          jax.value_and_grad of the lift: fun sees new Refs; the
               differentiated ones hold the traced values; writes to other
               Refs (batch statistics, RNG counters), rebound or in place,
               come out as auxiliary outputs.
  write back   all or nothing, last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _sharding
from ._core import NOTHING, All, PathFilter, Ref, deref, get_partition
from ._lift import (
    Trees,
    name_of,
    number_refs,
    payload_tree,
    plan_out,
    rebuild_out,
    stand_in,
    with_closures,
)

_tree_flatten = jax.tree_util.tree_flatten


def _check_first_paths(kind, chosen, every):
    """A Ref that wrt selects must be selected at its first path too: deref
    puts its Value there, and the gradient is a partition of deref(arg).
    (A path filter may select a shared Ref at some paths only.)"""
    first = {}
    for path, r in every.items():
        if isinstance(r, Ref) and id(r) not in first:
            first[id(r)] = path
    for path, r in chosen.items():
        if isinstance(r, Ref) and chosen[first[id(r)]] is NOTHING:
            raise ValueError(
                f"refx.{kind}: the filter wrt selects the shared Ref at {path!r} but not at "
                f"{first[id(r)]!r}, its first path, where deref puts its Value; the gradient "
                "is a partition of deref(arg) and needs that path: select every path of a "
                "shared Ref, or none")


def _present(every):
    """'collections 'params', 'state'; classes Ref, Param' of a tree's Refs."""
    refs = [r for r in every.values() if isinstance(r, Ref)]
    colls = sorted({repr(r.collection) for r in refs})
    types = sorted({type(r).__name__ for r in refs})
    return f"collections {', '.join(colls)}; classes {', '.join(types)}"


def _value_and_grad_impl(fun, argnums, wrt, has_aux, kind):
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise TypeError(f"refx.{kind}: argnums must be an int, not {argnums!r}")
    only_refs = All(Ref, wrt)  # validates wrt (TypeError for a bad filter)
    name = name_of(fun)

    def run(*args, **kwargs):
        if not -len(args) <= argnums < len(args):
            raise TypeError(f"refx.{kind}({name}): argnums={argnums} but {len(args)} "
                            "positional arguments were given")
        return with_closures(lambda closure: once(closure, args, kwargs))

    def once(closure, args, kwargs):
        arg = args[argnums]
        t = Trees(kind, name, [(args, kwargs)], [None], closure)
        prefix = t.prefix()
        index = {id(r): k for k, r in enumerate(t.refs)}
        # the differentiated Refs, in deref(arg)'s numbering (their stand-ins
        # when a capturing trace closes over them: t.refs holds those)
        local, _ = number_refs([stand_in(x) if isinstance(x, Ref) else x
                                for x in _tree_flatten(arg)[0]])
        chosen = get_partition(arg, only_refs)
        every = get_partition(arg, Ref)
        accepted = {id(stand_in(r)) for r in chosen.values() if isinstance(r, Ref)}
        if not accepted:
            what = _present(every) if local else "no Ref at all"
            raise ValueError(
                f"{prefix}: wrt={wrt!r} selects no Ref of argument {argnums % len(args)}, "
                f"which holds {what}; nothing would be differentiated (check the collection "
                "name or class in wrt)")
        _check_first_paths(kind, chosen, every)
        diff = [index[id(r)] for r in local if id(r) in accepted]
        diffset = frozenset(diff)
        for k in diff:
            for leaf in _tree_flatten(t.vals[k])[0]:
                dt = jnp.result_type(leaf)
                if not jnp.issubdtype(dt, jnp.inexact):
                    raise TypeError(
                        f"{prefix}: {t.describe(k)} holds {dt} values, which cannot be "
                        f"differentiated, and wrt={wrt!r} selects it; keep integer state in "
                        "another collection, or narrow wrt")
        # the gradient's structure: get_partition(deref(arg), wrt), made now
        # so that nothing is computed or written for an argument it rejects
        selected = frozenset(p for p, v in chosen.items() if v is not NOTHING)
        grads_td = jax.tree_util.tree_structure(
            get_partition(deref(arg), PathFilter(lambda path, x: path in selected)))
        declared = _sharding.any_declared(t.specs)
        info = {}

        def f(dvals):
            cur = list(t.vals)
            for k, v in zip(diff, dvals, strict=True):
                cur[k] = v
            inner = t.lift(cur, t.traced)
            (a, kw) = inner.trees[0]
            with t.capturing(inner):
                out = fun(*a, **kw)
            inner.check_structure(prefix)
            if has_aux:
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError(f"{prefix} with has_aux=True: fun must return "
                                    f"(value, aux), got {type(out).__name__}")
                loss, aux = out
            else:
                loss, aux = out, None
            for k in diff:
                if inner.changed(k):
                    raise ValueError(
                        f"{prefix}: fun wrote {t.describe(k)}, which is being differentiated "
                        f"(wrt={wrt!r}); a differentiated Ref may be read, not written, "
                        "inside fun")
            written = inner.written(prefix, t.where, diffset)
            info["written"] = written
            spec, aux_td, items = plan_out(aux, inner.refs)
            info["aux"] = (spec, aux_td)
            wvals = [inner.refs[k].value for k in written]
            if declared:
                wvals = _sharding.constrain_values(wvals, [t.specs[k] for k in written], prefix)
            return loss, (wvals, payload_tree(spec, aux_td, items))

        dvals = [t.vals[k] for k in diff]
        (loss, (wvals, aux_payload)), g = jax.value_and_grad(f, has_aux=True)(dvals)
        if declared:
            g = _sharding.constrain_values(list(g), [t.specs[k] for k in diff], prefix)
        grads = jax.tree_util.tree_unflatten(grads_td, jax.tree_util.tree_leaves(list(g)))
        aux = rebuild_out(*info["aux"], aux_payload, t.refs) if has_aux else None
        t.write(info["written"], list(wvals))  # last: nothing after it can fail
        return (loss, aux) if has_aux else loss, grads

    return run


def value_and_grad(fun, argnums=0, *, wrt="params", has_aux=False):
    """Like jax.value_and_grad, with respect to the values of the Refs of
    argument `argnums` that the filter `wrt` accepts.

    The gradient has the structure of get_partition(deref(args[argnums]),
    wrt) (a Partition of Values/Indexes; a Ref tied at several places is one
    Value, whose gradient sums every use), so optax and update_refs take it
    directly.  Sharing across arguments is kept.  Other Refs that `fun`
    writes (batch statistics, RNG keys), rebound or changed in place, are
    written back after the call, all or nothing; writing a differentiated
    Ref inside `fun` is a ValueError, and so is a `wrt` that selects no Ref.
    Returns (value, grads), or ((value, aux), grads) with has_aux.
    """
    return functools.wraps(fun)(_value_and_grad_impl(fun, argnums, wrt, has_aux,
                                                     "value_and_grad"))


def grad(fun, argnums=0, *, wrt="params", has_aux=False):
    """Like jax.grad, with respect to the values of the Refs of argument
    `argnums` that `wrt` accepts; see value_and_grad.  Returns grads, or
    (grads, aux) with has_aux."""
    vg = _value_and_grad_impl(fun, argnums, wrt, has_aux, "grad")

    @functools.wraps(fun)
    def g(*args, **kwargs):
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return g
