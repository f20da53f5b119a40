"""Trace-time logic of refx's transforms: jit, jit_partial, grad,
value_and_grad, Dag and Static.

The per-call path of ``refx.jit`` is C (``_core.JitFunction``, see jit.c's
essay).  What runs here runs once per cache entry (per argument structure,
sharing pattern, collections and static arguments) or once per trace:
building the function handed to ``jax.jit``, rebuilding the caller's trees
with new Refs inside the trace, finding out which Refs ``fun`` wrote, and
describing the outputs.  The pieces of that "lift" (Refs in -> flat values
-> new Refs of the inner trace -> run -> written values and outputs out)
are the functions ``_number_refs``, ``_lift``, ``_written`` and
``_out_plan``, kept apart so other transforms can reuse them.

``refx.grad`` and ``refx.value_and_grad`` are Python: they run once per
call eagerly and once per trace under jit.
"""

from __future__ import annotations

import functools
import inspect
from typing import Generic, TypeVar

import jax
import numpy as np

from . import _core, _sharding
from ._core import NOTHING, Deref, JitFunction, Ref, Static, deref, get_partition, reref
from ._mutable import _with_mutable

_tree_flatten = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten


def _name(fun) -> str:
    return getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or repr(fun)


# --------------------------------------------------------------------------
# the lift layer
# --------------------------------------------------------------------------


def _number_refs(leaves):
    """(distinct Refs in leaf order, per-leaf Ref number or -1)."""
    refs, index, pattern = [], {}, []
    for leaf in leaves:
        if isinstance(leaf, Ref):
            k = index.get(id(leaf))
            if k is None:
                k = index[id(leaf)] = len(refs)
                refs.append(leaf)
            pattern.append(k)
        else:
            pattern.append(-1)
    return refs, pattern


def _lift(values, collections, types):
    """New Refs of the current trace holding `values` (no __init__ call)."""
    return _core._make_refs(list(values), tuple(collections), tuple(types))


def _fill(pattern, refs, others_iter):
    return [refs[p] if p >= 0 else next(others_iter) for p in pattern]


def _written(refs, values, exclude=()):
    """Numbers of the Refs whose value is no longer the one they were given."""
    return [k for k, r in enumerate(refs) if k not in exclude and r.value is not values[k]]


def _out_plan(out, refs):
    """Describe an output tree that may hold Refs (see jit.c's essay).

    Returns (spec, treedef, payload): spec None and payload `out` itself when
    it holds no Ref; otherwise one spec item per leaf (None: a plain leaf
    taken from payload; k: the caller's Ref number k; a Ref: a Ref closed
    over, returned as is; (j, spec, collection): the j-th Ref made inside
    (spec: its class, or its kind with metadata/attributes),
    whose first occurrence takes its value from payload).
    """
    leaves, treedef = _tree_flatten(out)
    if not any(isinstance(x, Ref) for x in leaves):
        return None, None, out
    index = {id(r): k for k, r in enumerate(refs)}
    new: dict[int, int] = {}
    spec, payload = [], []
    for x in leaves:
        if not isinstance(x, Ref):
            spec.append(None)
            payload.append(x)
        elif id(x) in index:
            spec.append(index[id(x)])
        elif _core._ref_is_current(x):
            j = new.get(id(x))
            if j is None:
                j = new[id(x)] = len(new)
                payload.append(x.value)
            spec.append((j, _core._ref_spec(x), x.collection))
        else:
            spec.append(x)  # closed over: the very object
    return tuple(spec), treedef, payload


def _rebuild_out(spec, treedef, payload, refs):
    """Outside the trace: the outputs described by _out_plan."""
    if spec is None:
        return payload
    it = iter(payload)
    new: dict[int, Ref] = {}
    leaves = []
    for s in spec:
        if s is None:
            leaves.append(next(it))
        elif isinstance(s, int):
            leaves.append(refs[s])
        elif isinstance(s, Ref):
            leaves.append(s)
        else:
            j, tp, coll = s
            if j not in new:
                new[j] = _lift([next(it)], (coll,), (tp,))[0]
            leaves.append(new[j])
    return _tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------
# refx.jit: the entry builder (called by jit.c on a cache miss)
# --------------------------------------------------------------------------


def _child_leaf_ranges(treedef):
    """[(start, stop)] of each child's leaves."""
    out, start = [], 0
    for child in treedef.children():
        out.append((start, start + child.num_leaves))
        start += child.num_leaves
    return out


def _donation_candidates(jf, treedef, has_kwargs, statics, pattern, kwnames):
    """Numbers of the Refs in the donated arguments (None if none)."""
    dnums, dnames = jf._donate_argnums, jf._donate_argnames
    if not dnums and not dnames:
        return None
    bound = jf._bound or ()
    nb = len(bound)
    static_pos = {s[0] for s in statics or () if isinstance(s[0], int)}
    args_td, kwargs_td = treedef.children() if has_kwargs else (treedef, None)
    ndyn = len(args_td.children())
    total = nb + ndyn + len(static_pos)
    donated = {d + total if d < 0 else d for d in dnums}
    cand: set[int] = set()
    if nb:
        btd, bpattern = jf._bound_desc
        for g, (a, b) in enumerate(_child_leaf_ranges(btd)):
            if g in donated:
                cand.update(p for p in bpattern[a:b] if p >= 0)
    ranges = _child_leaf_ranges(args_td)
    dyn_positions = [g for g in range(nb, total) if g not in static_pos]
    for i, (a, b) in enumerate(ranges):
        if dyn_positions[i] in donated:
            cand.update(p for p in pattern[a:b] if p >= 0)
    if kwargs_td is not None:
        base = args_td.num_leaves
        names = sorted(kwnames)
        for name, (a, b) in zip(names, _child_leaf_ranges(kwargs_td), strict=True):
            if name in dnames:
                cand.update(p for p in pattern[base + a : base + b] if p >= 0)
    return tuple(sorted(cand)) or None


def _traceable(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) or hasattr(
        x, "__jax_array__")


def _check_leaves(jf, desc, kind):
    """A leaf jax cannot trace (a str, an object) is a TypeError naming where
    it sits; jax's own error would name a position in refx's flat lists."""
    treedef, has_kwargs, statics, pattern, colls, types, kwnames, vals, others = desc
    name = _name(jf._fun)
    nbo = len(jf._bound_desc[1]) - sum(p >= 0 for p in jf._bound_desc[1]) if jf._bound else 0
    for k, v in enumerate(vals):
        for leaf in _tree_flatten(v)[0]:
            if not _traceable(leaf):
                if k < len(jf._bound_refs or ()):
                    where = _describe_leaf(jf._bound, jf._bound_desc[1].index(k), bound=True)
                else:
                    where = _where(jf, treedef, has_kwargs, statics, pattern.index(k))
                raise TypeError(f"{kind}({name}): the Ref of {where} holds a "
                                f"{type(leaf).__name__}, which JAX cannot trace; keep arrays in "
                                "Refs, or pass other values as static arguments or in refx.Static")
    call_others = [i for i, p in enumerate(pattern) if p < 0]
    for j, leaf in enumerate(others[nbo:]):
        if not _traceable(leaf):
            where = _where(jf, treedef, has_kwargs, statics, call_others[j])
            raise TypeError(f"{kind}({name}): {where} is a {type(leaf).__name__}, which JAX "
                            "cannot trace; pass it as a static argument (static_argnums/"
                            "static_argnames) or wrap it in refx.Static")


def _where(jf, treedef, has_kwargs, statics, leaf_index):
    """Describe a call leaf from the treedef alone (the tree is not kept)."""
    try:
        tree = treedef.unflatten([object() for _ in range(treedef.num_leaves)])
        return _describe_jit_leaf(jf, tree, has_kwargs, statics, leaf_index, False)
    except Exception:  # noqa: BLE001 - a custom node that rejects placeholders
        return f"argument leaf {leaf_index}"


def _build_jit_entry(jf, desc):
    """Make the (jitted, donation candidates) entry for one cache key."""
    treedef, has_kwargs, statics, pattern, colls, types, kwnames, _vals, _others = desc
    _check_leaves(jf, desc, "refx.jit_partial" if jf._bound is not None else "refx.jit")
    fun = jf._fun
    name = _name(fun)
    bound = jf._bound
    if bound is not None:
        bound_td, bound_pattern = jf._bound_desc
        nb = len(bound)
    else:
        bound_td, bound_pattern, nb = None, (), 0
    statics = statics or ()
    static_pos = {s[0]: s[2] for s in statics if isinstance(s[0], int)}
    static_kw = {s[0]: s[2] for s in statics if isinstance(s[0], str)}
    nrefs = len(colls)
    cand = _donation_candidates(jf, treedef, has_kwargs, statics, pattern, kwnames)
    # declared shardings: the mesh the Refs' arrays are on now, for a step
    # traced outside any mesh context (see _sharding.constrain_values)
    mesh = _sharding.mesh_of(_vals) if _sharding.any_declared(types) else None
    where = f"refx.jit({name})"

    def flat_fn(*lists):
        if cand is None:
            vals, others = lists
            vals = list(vals)
            donated = frozenset()
        else:
            mask, dvals, kept, others = lists
            donated = frozenset(k for k, m in zip(cand, mask, strict=True) if m)
            vals = [None] * nrefs
            dit, kit = iter(dvals), iter(kept)
            for k in range(nrefs):
                vals[k] = next(dit) if k in donated else next(kit)
        vals = _sharding.constrain_values(vals, types, where, mesh)
        refs = _lift(vals, colls, types)
        it = iter(others)
        bargs = bound_td.unflatten(_fill(bound_pattern, refs, it)) if nb else ()
        tree = treedef.unflatten(_fill(pattern, refs, it))
        args, kwargs = tree if has_kwargs else (tree, {})
        args_it = iter(args)
        full = []
        for g in range(nb + len(args) + len(static_pos)):
            if g < nb:
                full.append(bargs[g])
            elif g in static_pos:
                full.append(static_pos[g])
            else:
                full.append(next(args_it))
        kwargs = {**kwargs, **static_kw}
        out = fun(*full, **kwargs)
        written = sorted(set(_written(refs, vals)) | donated)
        spec, out_td, payload = _out_plan(out, refs)
        plan = (tuple(written), spec, out_td)
        wvals = _sharding.constrain_values([refs[k].value for k in written],
                                           [types[k] for k in written], where, mesh)
        return Static(plan), wvals, payload

    flat_fn.__name__ = flat_fn.__qualname__ = f"refx_jit({name})"
    options = dict(jf._options)
    if cand is not None:
        jitted = jax.jit(flat_fn, static_argnums=(0,), donate_argnums=(1,), **options)
    else:
        jitted = jax.jit(flat_fn, **options)
    return (jitted, cand)


# --------------------------------------------------------------------------
# refx.jit / refx.jit_partial
# --------------------------------------------------------------------------

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_UNSUPPORTED = ("in_shardings", "out_shardings")


def _as_tuple(x, kind, what):
    if isinstance(x, kind):
        return (x,)
    try:
        t = tuple(x)
    except TypeError:
        raise TypeError(f"refx.jit: {what} must be a {kind.__name__} or a sequence of them, "
                        f"not {type(x).__name__}") from None
    for v in t:
        if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
            raise TypeError(f"refx.jit: {what} must hold {kind.__name__}s, got {v!r}")
    return t


def _argnums_and_names(fun, nums, names, what):
    """jax.jit's rule: given only numbers, infer the names (so the argument
    may be passed by keyword), and the other way round."""
    nums = _as_tuple(nums, int, f"{what}_argnums")
    names = _as_tuple(names, str, f"{what}_argnames")
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return nums, names
    pos = [p for p in params if p.kind in _POSITIONAL]
    if nums and not names:
        names = tuple(p.name for i, p in enumerate(pos)
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                      and (i in nums or i - len(pos) in nums)
                      and not any(q.kind is inspect.Parameter.VAR_POSITIONAL for q in params))
    elif names and not nums:
        nums = tuple(i for i, p in enumerate(pos) if p.name in names)
    return nums, names


def _make_jit(fun, bound, static_argnums, static_argnames, donate_argnums, donate_argnames,
              options, kind, mutable=None):
    if not callable(fun):
        raise TypeError(f"{kind}: fun must be callable, not {type(fun).__name__}")
    for k in _UNSUPPORTED:
        if options.get(k) is not None:
            raise TypeError(f"{kind}: {k} is not supported: refx.jit keeps each Ref's value "
                            "on the sharding the Ref declares (Ref(x, sharding=...)) and takes "
                            "other arguments as they are placed (jax.device_put them); for "
                            "explicit shardings use jax.jit on deref'ed trees with "
                            "refx.shardings(tree)")
        options.pop(k, None)
    snums, snames = _argnums_and_names(fun, static_argnums, static_argnames, "static")
    dnums, dnames = _argnums_and_names(fun, donate_argnums, donate_argnames, "donate")
    if bound is not None:
        bad = [n for n in snums if 0 <= n < len(bound)]
        if bad:
            raise ValueError(f"{kind}: static_argnums {bad} name bound arguments; a bound "
                             "argument cannot be static")
    if set(snums) & set(dnums) or set(snames) & set(dnames):
        raise ValueError(f"{kind}: an argument cannot be both static and donated")
    run = _with_mutable(fun, mutable, kind)  # refx.mutable's option (refx/_mutable.py)
    jf = JitFunction(run, static_argnums=snums, static_argnames=snames,
                     donate_argnums=dnums, donate_argnames=dnames, options=options,
                     bound=bound)
    try:
        functools.update_wrapper(jf, fun)
    except AttributeError:  # pragma: no cover - objects without __dict__
        pass
    return jf


def jit(fun=None, /, *, static_argnums=(), static_argnames=(), donate_argnums=(),
        donate_argnames=(), mutable=None, **jax_jit_options):
    """Compile `fun` with jax.jit; its arguments may be trees holding Refs.

    Inside, `fun` sees new Refs (of the jit trace, same sharing and
    collections) and may read and write them and make new ones.  After the
    call every argument Ref `fun` wrote holds its final value and the others
    are untouched; if `fun` raises, no Ref is written.  An argument Ref that
    `fun` returns comes back as the caller's own Ref; Refs made inside come
    back as new Refs.  Calls with the same argument structure, sharing,
    collections, static arguments and shapes/dtypes do not retrace.

    A Ref closed over (not passed) may be read: its value is traced as a
    constant, as jax.jit does with globals, and so is stale if it changes
    later; writing it raises the trace-level ValueError.

    `donate_argnums`/`donate_argnames` donate the buffers of the Refs of
    those arguments (each donated Ref gets a new value, so none holds a
    deleted array).  `mutable`: a filter; only the Refs it accepts may be
    written while `fun` traces (see refx.mutable).  Other options go to
    jax.jit.  Usable as `@refx.jit` and `@refx.jit(...)`.
    """
    if fun is None:
        return functools.partial(jit, static_argnums=static_argnums,
                                 static_argnames=static_argnames, donate_argnums=donate_argnums,
                                 donate_argnames=donate_argnames, mutable=mutable,
                                 **jax_jit_options)
    return _make_jit(fun, None, static_argnums, static_argnames, donate_argnums,
                     donate_argnames, dict(jax_jit_options), "refx.jit", mutable)


def jit_partial(fun, /, *bound_args, static_argnums=(), static_argnames=(), donate_argnums=(),
                donate_argnames=(), mutable=None, **jax_jit_options):
    """refx.jit(fun) with its first arguments bound to `bound_args`.

    Binds the Refs of the bound trees once: each call reads their current
    values and writes back the ones `fun` wrote, and flattens only the
    remaining arguments (the fast path for a training loop).  The bound
    trees' containers are not looked at again: a Ref added to, removed from
    or replaced in a bound container after binding is not seen (bind again).
    Argument numbers (static_argnums, donate_argnums) count the bound
    arguments first.
    """
    return _make_jit(fun, tuple(bound_args), static_argnums, static_argnames, donate_argnums,
                     donate_argnames, dict(jax_jit_options), "refx.jit_partial", mutable)


# --------------------------------------------------------------------------
# refx.grad / refx.value_and_grad
# --------------------------------------------------------------------------


def _key_str(k) -> str:
    for field in ("idx", "key", "name"):
        if hasattr(k, field):
            return str(getattr(k, field))
    return str(k)


def _describe_leaf(tree, leaf_index, *, has_kwargs=True, bound=False, nbound=0, static_pos=()):
    """'argument 0 at ('enc', 'w')' for leaf `leaf_index` of the flattened
    (args, kwargs) tree (or args tuple, or bound tuple); for error messages."""
    keys = list(jax.tree_util.tree_flatten_with_path(tree)[0][leaf_index][0])
    if bound:
        where = f"bound argument {_key_str(keys[0])}"
    else:
        if has_kwargs:
            top, keys = int(_key_str(keys[0])), keys[1:]
            if top == 1:
                where = f"keyword argument {_key_str(keys[0])!r}"
                keys = keys[1:]
                return where + (f" at {tuple(_key_str(k) for k in keys)}" if keys else "")
        i = int(_key_str(keys[0]))
        positions = [g for g in range(nbound, nbound + i + 1 + len(static_pos))
                     if g not in static_pos]
        where = f"argument {positions[i]}"
    keys = keys[1:]
    return where + (f" at {tuple(_key_str(k) for k in keys)}" if keys else "")


def _describe_jit_leaf(jf, tree, has_kwargs, statics, leaf_index, bound):
    """jit.c's error path: where Ref leaf `leaf_index` sits."""
    if bound:
        return _describe_leaf(jf._bound, leaf_index, bound=True)
    nb = len(jf._bound or ())
    static_pos = {s[0] for s in statics or () if isinstance(s[0], int)}
    return _describe_leaf(tree, leaf_index, has_kwargs=has_kwargs, nbound=nb,
                          static_pos=static_pos)


def _check_first_paths(kind, chosen, every, accepted):
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


def _value_and_grad_impl(fun, argnums, wrt, has_aux, kind):
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise TypeError(f"refx.{kind}: argnums must be an int, not {argnums!r}")
    from ._core import All  # the filter is applied to Refs only

    only_refs = All(Ref, wrt)  # validates wrt (TypeError for a bad filter)
    name = _name(fun)

    def run(*args, **kwargs):
        if not -len(args) <= argnums < len(args):
            raise TypeError(f"refx.{kind}({name}): argnums={argnums} but {len(args)} "
                            "positional arguments were given")
        arg = args[argnums]
        tree = (args, kwargs)
        leaves, treedef = _tree_flatten(tree)
        refs, pattern = _number_refs(leaves)
        index = {id(r): k for k, r in enumerate(refs)}
        # the differentiated Refs, in deref(arg)'s numbering
        local, _ = _number_refs(_tree_flatten(arg)[0])
        chosen = get_partition(arg, only_refs)
        accepted = {id(r) for r in chosen.values() if isinstance(r, Ref)}
        _check_first_paths(kind, chosen, get_partition(arg, Ref), accepted)
        take = [id(r) in accepted for r in local]
        diff = [index[id(r)] for r, t in zip(local, take, strict=True) if t]
        diffset = frozenset(diff)
        vals = [r.value for r in refs]
        colls = [r.collection for r in refs]
        types = [_core._ref_spec(r) for r in refs]
        info = {}

        def f(dvals):
            cur = list(vals)
            for k, v in zip(diff, dvals, strict=True):
                cur[k] = v
            new = _lift(cur, colls, types)
            a, kw = treedef.unflatten([new[p] if p >= 0 else leaf
                                       for p, leaf in zip(pattern, leaves, strict=True)])
            out = fun(*a, **kw)
            if has_aux:
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError(f"refx.{kind}({name}) with has_aux=True: fun must return "
                                    f"(value, aux), got {type(out).__name__}")
                loss, aux = out
            else:
                loss, aux = out, None
            for k in diff:
                if new[k].value is not cur[k]:
                    where = _describe_leaf(tree, pattern.index(k))
                    raise ValueError(
                        f"refx.{kind}({name}): fun wrote the Ref of {where} (collection "
                        f"{colls[k]!r}), which is being differentiated (wrt={wrt!r}); a "
                        "differentiated Ref may be read, not written, inside fun")
            written = _written(new, cur, diffset)
            info["written"] = written
            spec, aux_td, aux_payload = _out_plan(aux, new)
            info["aux"] = (spec, aux_td)
            wvals = _sharding.constrain_values([new[k].value for k in written],
                                               [types[k] for k in written], f"refx.{kind}")
            return loss, (wvals, aux_payload)

        dvals = [vals[k] for k in diff]
        (loss, (wvals, aux_payload)), g = jax.value_and_grad(f, has_aux=True)(dvals)
        g = _sharding.constrain_values(list(g), [types[k] for k in diff], f"refx.{kind}")
        written = info["written"]
        aux = _rebuild_out(*info["aux"], aux_payload, refs) if has_aux else None
        try:
            _core._write_refs([refs[k] for k in written], list(wvals))
        except ValueError as e:
            if len(e.args) == 2 and isinstance(e.args[1], int):
                k = written[e.args[1]]
                where = _describe_leaf(tree, pattern.index(k))
                head = e.args[0]
                seed = "Cannot mutate Ref from a different trace level"
                if head.startswith(seed):
                    head = seed  # where the Ref is says more than its own account
                raise ValueError(f"{head}: refx.{kind}({name}) wrote the Ref of {where}, "
                                 "which belongs to another JAX trace than the call's; nothing "
                                 "was written (pass the Refs a function writes to it as "
                                 "arguments)") from None
            raise
        # the gradient: the structure of get_partition(deref(arg), wrt)
        d = deref(arg)
        gp = get_partition(d, lambda x: isinstance(x, Deref) and take[x.index])
        grads = _tree_unflatten(jax.tree_util.tree_structure(gp), list(g))
        return (loss, aux) if has_aux else loss, grads

    return run


def value_and_grad(fun, argnums=0, *, wrt="params", has_aux=False):
    """Like jax.value_and_grad, with respect to the values of the Refs of
    argument `argnums` that the filter `wrt` accepts.

    The gradient has the structure of get_partition(deref(args[argnums]),
    wrt) (a Partition of Values/Indexes; a Ref tied at several places is one
    Value, whose gradient sums every use), so optax and update_refs take it
    directly.  Sharing across arguments is kept.  Other Refs that `fun`
    writes (batch statistics, RNG keys) are written back after the call, all
    or nothing; writing a differentiated Ref inside `fun` is a ValueError.
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


# --------------------------------------------------------------------------
# Dag
# --------------------------------------------------------------------------


_T = TypeVar("_T")


class Dag(Generic[_T]):
    """A pytree node around a tree of Refs: flattening derefs it,
    unflattening rerefs it (lazily, on the first `.tree`).

    So plain JAX transforms take trees of Refs: ``jax.jit(f)(refx.Dag(model))``
    where ``f`` reads ``dag.tree``: inside, `.tree` gives new Refs of the
    transform's trace (with the sharing intact) that `f` may write; a Dag
    returned by `f` comes out with new Refs holding the results (write them
    back with update_refs).  The deref'ed tree's treedef, which records the
    sharing and collections, is part of jax.jit's cache key.
    """

    __slots__ = ("_tree", "_deref")

    def __init__(self, tree):
        self._tree = tree
        self._deref = None

    @property
    def tree(self):
        """The tree of Refs (rebuilt with reref on first access after
        unflattening, in the trace current then)."""
        if self._tree is None and self._deref is not None:
            self._tree = reref(self._deref)
            self._deref = None
        return self._tree

    def __repr__(self):
        return f"Dag({self.tree!r})"

    def _children(self):
        return deref(self._tree) if self._deref is None else self._deref


def _dag_unflatten(aux, children):
    d = object.__new__(Dag)
    d._tree = None
    (d._deref,) = children
    return d


_TREE_KEY = jax.tree_util.GetAttrKey("tree")

jax.tree_util.register_pytree_with_keys(
    Dag,
    lambda d: (((_TREE_KEY, d._children()),), None),
    _dag_unflatten,
    lambda d: ((d._children(),), None),
)

jax.tree_util.register_pytree_node(Static, _core._static_flatten, _core._static_unflatten)


def _array_type():
    from jax._src.array import ArrayImpl

    return ArrayImpl


_core._install_jit(builder=_build_jit_entry, describe=_describe_jit_leaf,
                   array_type=_array_type())
