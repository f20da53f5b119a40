"""refx.jit, refx.jit_partial and refx.Dag: trace-time logic.

The per-call path of ``refx.jit`` is C (``_core.JitFunction``, see jit.c's
essay).  What runs here runs once per cache entry (per argument structure,
sharing pattern, Ref kinds and static arguments): the builder makes the
function handed to ``jax.jit``, which lifts the call's Refs into its trace
(refx/_lift.py: numbering, fresh containers, what `fun` wrote, the output
plan) and describes the outputs to jit.c's finish step.

Donation.  ``donate_argnums``/``donate_argnames`` donate exactly the
Refs of those arguments that `fun` writes: the builder traces `fun` once
(``jax.eval_shape``) to learn what it writes, so with donation `fun` is
traced twice per compilation.  A Ref it does not write keeps its own
array, undonated.  jit.c donates a written Ref's value only if nothing
else holds it (see value_donatable): a clone sharing the array keeps it.

Declared shardings.  When a Ref declares a sharding, the values are
constrained to it where they enter the compiled function and where
written values leave it; outside a mesh context the mesh is the one the
Refs' arrays are on at each call (a static argument of the jax.jit
function, so a model moved to another mesh gets a step on that mesh).
Without a declared sharding none of this runs.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Generic, TypeVar

import jax
import numpy as np

from . import _core, _sharding
from ._core import JitFunction, Ref, Static, deref, reref
from ._lift import (
    Const,
    Inner,
    Rediscover,
    capturing,
    key_str,
    name_of,
    plan_out,
    stand_in,
    traceable,
)
from ._mutable import _with_mutable

_name = name_of
_key_str = key_str
_traceable = traceable


# --------------------------------------------------------------------------
# where things are, for messages
# --------------------------------------------------------------------------


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


def _node_names(td):
    """Names of the children of treedef node `td`, for paths."""
    data = td.node_data()
    n = len(td.children())
    if data is not None:
        kind, aux = data
        if kind is dict:
            return [str(k) for k in aux]
        if isinstance(aux, tuple) and all(isinstance(e, tuple) and e and isinstance(e[0], str)
                                          for e in aux):  # an nn.Module's entries
            names = [e[0] for e in aux if len(e) == 2]  # (name, _CHILD)
            if len(names) == n:
                return names
    return [str(i) for i in range(n)]


def _treedef_change(old, new, path=()):
    """The first place where treedefs `old` and `new` differ: (path, what)."""
    if old.node_data() != new.node_data() or len(old.children()) != len(new.children()):
        od, nd = old.node_data(), new.node_data()
        if (od is not None and nd is not None and od[0] is nd[0]
                and isinstance(od[1], tuple) and isinstance(nd[1], tuple)):
            olds = {e[0]: e for e in od[1] if isinstance(e, tuple) and e}
            news = {e[0]: e for e in nd[1] if isinstance(e, tuple) and e}
            for name in [*olds, *(k for k in news if k not in olds)]:
                a, b = olds.get(name), news.get(name)
                if a is None or b is None:
                    how = "added" if a is None else "removed"
                    return path, f"attribute {name!r} was {how}"
                if a != b:
                    if len(a) == 3 and len(b) == 3:  # (name, type, value)
                        now, was = repr(b[2]), repr(a[2])
                        if now == was:  # 2 and MyInt(2): name the types
                            now, was = f"{now} ({b[1].__name__})", f"{was} ({a[1].__name__})"
                        return path, f"static attribute {name!r} is {now}, bound as {was}"
                    return path, f"attribute {name!r} changed between a child and a static"
        return path, "its structure changed"
    for name, a, b in zip(_node_names(old), old.children(), new.children(), strict=True):
        found = _treedef_change(a, b, (*path, name))
        if found is not None:
            return found
    return None


def _bound_changed(jf, treedef, leaves):
    """jit.c's check_binding found jit_partial's bound trees changed: raise
    a ValueError saying where and how to bind again."""
    kind = jf._kind or "refx.jit_partial"
    prefix = f"{kind}({_name(jf._fun)})"
    old_td, pattern = jf._bound_desc
    fix = ("jit_partial binds its trees' structure, Refs and leaves once: bind again "
           "(refx.jit_partial(fun, *trees); one function per mode, e.g. a train step "
           "and an eval step each bound in its mode), or use refx.jit, which reads them "
           "on every call")
    if treedef != old_td:
        path, what = _treedef_change(old_td, treedef)
        where = f"bound argument {path[0]}" + (f" at {path[1:]}" if len(path) > 1 else "")
        raise ValueError(f"{prefix}: the bound trees changed since binding: at {where}, "
                         f"{what}; {fix}")
    others = iter(jf._bound_others)
    for i, (leaf, p) in enumerate(zip(leaves, pattern, strict=True)):
        was = jf._bound_refs[p] if p >= 0 else next(others)
        if leaf is not was:
            what = "Ref" if p >= 0 else "leaf"
            raise ValueError(f"{prefix}: the bound trees changed since binding: the {what} at "
                             f"{_describe_leaf(jf._bound, i, bound=True)} was replaced; {fix}")
    raise ValueError(f"{prefix}: the bound trees changed since binding; {fix}")


def _describe_jit_leaf(jf, tree, has_kwargs, statics, leaf_index, bound):
    """jit.c's error path: where Ref leaf `leaf_index` sits."""
    if bound:
        return _describe_leaf(jf._bound, leaf_index, bound=True)
    nb = len(jf._bound or ())
    static_pos = {s[0] for s in statics or () if isinstance(s[0], int)}
    return _describe_leaf(tree, leaf_index, has_kwargs=has_kwargs, nbound=nb,
                          static_pos=static_pos)




def _where(jf, treedef, has_kwargs, statics, leaf_index):
    """Describe a call leaf from the treedef alone (the tree is not kept)."""
    try:
        tree = treedef.unflatten([object() for _ in range(treedef.num_leaves)])
        return _describe_jit_leaf(jf, tree, has_kwargs, statics, leaf_index, False)
    except Exception:  # noqa: BLE001 - a custom node that rejects placeholders
        return f"argument leaf {leaf_index}"


def _ref_place(jf, desc):
    """where(k): where Ref number k of a call described by `desc` sits."""
    treedef, has_kwargs, statics, pattern = desc[:4]
    nbound = len(jf._bound_refs or ())

    def where(k):
        if k < nbound:
            return _describe_leaf(jf._bound, jf._bound_desc[1].index(k), bound=True)
        return _where(jf, treedef, has_kwargs, statics, pattern.index(k))

    return where


def _place_namer(jf, has_kwargs, statics):
    """names(label, path) for Inner.check_structure: label "bound" (a
    jit_partial bound tree) or None (the call's (args[, kwargs]) tree)."""
    nb = len(jf._bound or ())
    static_pos = sorted(s[0] for s in statics or () if isinstance(s[0], int))

    def names(label, path):
        if label == "bound":
            head, rest = f"bound argument {path[0]}" if path else "the bound arguments", path[1:]
        else:
            if has_kwargs:
                top, path = path[0] if path else "0", path[1:]
                if top == "1":
                    head = f"keyword argument {path[0]!r}" if path else "the keyword arguments"
                    rest = path[1:]
                    return head + (f" at {rest}" if rest else "")
            if not path:
                return "the arguments"
            i = int(path[0])
            g = nb
            for _ in range(i + 1):
                while g in static_pos:
                    g += 1
                g += 1
            head, rest = f"argument {g - 1}", path[1:]
        return head + (f" at {rest}" if rest else "")

    return names


def _check_leaves(jf, desc, kind):
    """A leaf jax cannot trace (a str, an object) is a TypeError naming where
    it sits; jax's own error would name a position in refx's flat lists."""
    treedef, has_kwargs, statics, pattern, colls, types, kwnames, vals, others = desc[:9]
    name = _name(jf._fun)
    where = _ref_place(jf, desc)
    nbo = len(jf._bound_desc[1]) - sum(p >= 0 for p in jf._bound_desc[1]) if jf._bound else 0
    for k, v in enumerate(vals):
        for leaf in jax.tree_util.tree_leaves(v):
            if not _traceable(leaf):
                raise TypeError(f"{kind}({name}): the Ref of {where(k)} holds a "
                                f"{type(leaf).__name__}, which JAX cannot trace; keep arrays in "
                                "Refs, or pass other values as static arguments or in refx.Static")
    call_others = [i for i, p in enumerate(pattern) if p < 0]
    for j, leaf in enumerate(others[nbo:]):
        if not _traceable(leaf):
            at = _where(jf, treedef, has_kwargs, statics, call_others[j])
            raise TypeError(f"{kind}({name}): {at} is a {type(leaf).__name__}, which JAX "
                            "cannot trace; pass it as a static argument (static_argnums/"
                            "static_argnames) or wrap it in refx.Static")


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


def _flat_payload(spec, items):
    """jit.c's payload: the items of plain leaves and of each Ref made
    inside's first occurrence, in leaf order (see jit.c's essay)."""
    seen, out = set(), []
    for s, item in zip(spec, items, strict=True):
        if s is None:
            out.append(item)
        elif type(s) is tuple and s[0] not in seen:
            seen.add(s[0])
            out.append(item)
    return out


class _PerMesh:
    """The jitted function of an entry whose Refs declare shardings: the
    mesh the Refs' arrays are on is read at every call (outside a mesh
    context it is what the constraints use) and is a static argument, so
    a model moved to another mesh is traced for that mesh."""

    __slots__ = ("jitted", "nvals")

    def __init__(self, jitted, donating):
        self.jitted = jitted
        self.nvals = (1, 2) if donating else (0,)

    def _mesh(self, args):
        return _sharding.mesh_of([args[i] for i in self.nvals])

    def __call__(self, *args):
        return self.jitted(self._mesh(args), *args)

    def lower(self, *args):
        return self.jitted.lower(self._mesh(args), *args)

    def _cache_size(self):
        return self.jitted._cache_size()


def _closure(desc, closure, prefix):
    """The closed-over Refs of an entry: (closure, positions, specs, the
    ones not passed) with closure deduplicated; positions[j] is the
    argument Ref number of closure[j], or -1 when it is not passed."""
    refs = desc[9]
    uniq: list = []
    for r in closure or ():
        if not any(r is u for u in uniq):
            uniq.append(r)
    index = {id(r): k for k, r in enumerate(refs)}
    pos = tuple(index.get(id(stand_in(r)), -1) for r in uniq)
    specs = tuple(_core._ref_spec(r) for r in uniq)
    extra = [r for r, p in zip(uniq, pos, strict=True) if p < 0]
    for r in extra:
        for leaf in jax.tree_util.tree_leaves(r.value):
            if not _traceable(leaf):
                raise TypeError(f"{prefix}: a {type(r).__name__} closed over by fun (collection "
                                f"{r.collection!r}) holds a {type(leaf).__name__}, which JAX "
                                "cannot trace; keep arrays in Refs")
    return tuple(uniq), pos, specs, extra


# --------------------------------------------------------------------------
# why refx.jit retraced (with jax.config.jax_explain_cache_misses on)
# --------------------------------------------------------------------------

_log = logging.getLogger("refx")


def _explaining():
    return bool(getattr(jax.config, "jax_explain_cache_misses", False))


def _explain_miss(jf, desc, kind):
    """Log what makes this call a new cache entry: the difference from the
    entry built last (argument structure, static argument, sharing
    pattern, a Ref's collection or class/metadata/attributes)."""
    if not jf._cache:
        _log.warning("%s: first call, tracing", kind)
        return
    key = list(jf._cache)[-1]
    treedef, has_kwargs, statics, pattern, colls, types = desc[:6]
    old_td, old_kw, old_statics, old_pat, old_colls, old_types = key
    where = _ref_place(jf, desc)
    if old_td != treedef or old_kw != has_kwargs:
        why = f"the argument structure changed: {old_td} -> {treedef}"
    elif old_statics != (statics or None):
        old = {s[0]: s[2] for s in old_statics or ()}
        new = {s[0]: s[2] for s in statics or ()}
        names = [n for n in {**old, **new} if old.get(n, _log) != new.get(n, _log)
                 or type(old.get(n)) is not type(new.get(n))]
        why = "static argument " + ", ".join(
            f"{n!r}: {old.get(n)!r} -> {new.get(n)!r}" for n in names)
    elif old_pat is not None and bytes(np.asarray(pattern, np.int32)) != old_pat:
        why = "the sharing pattern changed (which leaves are one Ref)"
    else:
        why = "a Ref's kind changed"
        old_colls = old_colls or ()
        for k, c in enumerate(colls):
            if k < len(old_colls) and old_colls[k] != c:
                why = f"the collection of the Ref of {where(k)}: {old_colls[k]!r} -> {c!r}"
                break
            o = old_types[k] if old_types is not None and k < len(old_types) else Ref
            if o != types[k]:
                why = (f"the class, metadata or attributes of the Ref of {where(k)}: "
                       f"{o!r} -> {types[k]!r}")
                break
    _log.warning("%s: cache miss, tracing again: %s", kind, why)


def _aval_str(x):
    a = getattr(x, "aval", None)  # a tracer's
    if a is None:
        return type(x).__name__
    weak = ", weak" if getattr(a, "weak_type", False) else ""
    return f"{a.str_short()}{weak}"


def _explain_retrace(prefix, seen, vals, others, where, other_where):
    """jax.jit traces an entry again for new shapes, dtypes or weak types:
    say which Ref or argument changed (the previous trace's avals are in
    `seen`)."""
    now = ([[_aval_str(x) for x in jax.tree_util.tree_leaves(v)] for v in vals],
           [_aval_str(x) for x in others])
    before = seen.get("avals")
    seen["avals"] = now
    if before is None:
        return
    for k, (a, b) in enumerate(zip(before[0], now[0], strict=False)):
        if a != b:
            _log.warning("%s: retracing: the Ref of %s changed from %s to %s", prefix,
                         where(k), ", ".join(a), ", ".join(b))
            return
    for i, (a, b) in enumerate(zip(before[1], now[1], strict=False)):
        if a != b:
            _log.warning("%s: retracing: %s changed from %s to %s", prefix, other_where(i), a, b)
            return


class ConstOutput(TypeError):
    """fun returned a leaf JAX cannot return (raised while tracing, so
    before anything is written; an eager refx transform then runs
    uncached)."""


def _build_jit_entry(jf, desc, closure=None):
    """Make the entry for one cache key: (jitted, donation candidates,
    closed-over Refs, their positions, their specs) (see jit.c)."""
    treedef, has_kwargs, statics, pattern, colls, types, kwnames, vals0, others0 = desc[:9]
    kind = jf._kind or ("refx.jit_partial" if jf._bound is not None else "refx.jit")
    _check_leaves(jf, desc, kind)
    if _explaining() and closure is None:
        _explain_miss(jf, desc, f"{kind}({_name(jf._fun)})")
    closure, cpos, cspecs, extra = _closure(desc, closure, f"{kind}({_name(jf._fun)})")
    n_args = len(colls)
    colls = tuple(colls) + tuple(r.collection for r in extra)
    types = tuple(types) + tuple(_core._ref_spec(r) for r in extra)
    vals0 = list(vals0) + [r.value for r in extra]
    it = iter(range(n_args, n_args + len(extra)))
    cnum = [p if p >= 0 else next(it) for p in cpos]  # closure[j]'s Ref number
    fun = jf._fun
    name = _name(fun)
    prefix = f"{kind}({name})"
    bound = jf._bound
    if bound is not None:
        bound_td, bound_pattern = jf._bound_desc
        nb = len(bound)
        parts = [("bound", None, bound_td, bound_pattern), (None, None, treedef, pattern)]
    else:
        nb = 0
        parts = [(None, None, treedef, pattern)]
    statics = statics or ()
    static_pos = {s[0]: s[2] for s in statics if isinstance(s[0], int)}
    static_kw = {s[0]: s[2] for s in statics if isinstance(s[0], str)}
    nrefs = len(colls)
    where_args = _ref_place(jf, desc)

    def where_ref(k):
        return where_args(k) if k < n_args else "a Ref closed over by fun"

    names = _place_namer(jf, has_kwargs, statics)
    declared = _sharding.any_declared(types)
    where = f"refx.jit({name})"

    seen: dict = {}
    call_others = [i for i, p in enumerate(pattern) if p < 0]
    nbo = len(others0) - len(call_others)

    def other_where(i):
        if i < nbo:
            return f"bound leaf {i}"
        return _where(jf, treedef, has_kwargs, statics, call_others[i - nbo])

    def trace(vals, others, donated, mesh):
        # a Ref's pytree value comes as a Flat of its leaves (flatvalue.c)
        given = vals
        vals = _core._flat_restore(vals)
        if _explaining():
            _explain_retrace(prefix, seen, vals, others, where_ref, other_where)
        if declared:
            vals = _sharding.constrain_values(vals, types, where, mesh)
        inner = Inner(vals, colls, types)
        trees = inner.rebuild(parts, others)
        bargs = trees[0] if nb else ()
        args, kwargs = trees[-1] if has_kwargs else (trees[-1], {})
        args_it = iter(args)
        full = []
        for g in range(nb + len(args) + len(static_pos)):
            if g < nb:
                full.append(bargs[g])
            elif g in static_pos:
                full.append(static_pos[g])
            else:
                full.append(next(args_it))
        subs = {r: inner.refs[k] for r, k in zip(closure, cnum, strict=True)}
        with capturing(subs, (inner.refs, where_ref, prefix)):
            out = fun(*full, **{**kwargs, **static_kw})
        inner.check_structure(prefix, names)
        written = sorted(set(inner.written(prefix, where_ref)) | donated)
        spec, out_td, items = plan_out(out, inner.refs)
        if spec is None:
            payload = items
        else:
            for i, s in enumerate(spec):
                if type(s) is Const:
                    raise ConstOutput(f"{prefix}: output leaf {i} is a "
                                      f"{type(s.value).__name__}, which JAX cannot return from "
                                      "a jitted function; return arrays (or hold other values "
                                      "in refx.Static)")
            payload = _flat_payload(spec, items)
        wvals = [inner.refs[k].value for k in written]
        if declared:
            wvals = _sharding.constrain_values(wvals, [types[k] for k in written], where, mesh)
        # and a written one goes back as a Flat, rebuilt in C (jit_finish)
        # or left in its Ref pending, when its structure is what was given
        flat = _core._flat_out(wvals, [given[k] for k in written])
        return Static((tuple(written), spec, out_td)), flat, payload

    cand = _donation_candidates(jf, treedef, has_kwargs, statics, pattern, kwnames)
    if cand is not None:
        # donate exactly what fun writes: trace it once to find out
        mesh0 = _sharding.mesh_of(vals0) if declared else None
        try:
            probe = jax.eval_shape(lambda v, o: trace(list(v), o, frozenset(), mesh0)[0],
                                   list(vals0), list(others0))
        except Rediscover as e:  # fun closes over Refs: build for them
            return _build_jit_entry(jf, desc, (*closure, *e.refs))
        written = set(probe.value[0])
        cand = tuple(k for k in cand if k in written) or None
        precheck = tuple(sorted(written)) if cand is not None else None
    else:
        precheck = None

    if cand is None:
        def flat_fn(mesh, vals, others):
            return trace(list(vals), others, frozenset(), mesh)
    else:
        def flat_fn(mesh, mask, dvals, kept, others):
            donated = frozenset(k for k, m in zip(cand, mask, strict=True) if m)
            vals = [None] * nrefs
            dit, kit = iter(dvals), iter(kept)
            for k in range(nrefs):
                vals[k] = next(dit) if k in donated else next(kit)
            return trace(vals, others, donated, mesh)

    options = dict(jf._options)
    nstatic = 1 if cand is None else 2  # mesh, then the donation mask
    if declared:
        fn = flat_fn
        static = tuple(range(nstatic))
    else:  # no mesh argument: the cached call runs no Python frame
        fn = functools.partial(flat_fn, None)
        static = tuple(range(nstatic - 1))
    donate = () if cand is None else (nstatic,) if declared else (nstatic - 1,)

    def named(*a):
        return fn(*a)

    named.__name__ = named.__qualname__ = f"refx_jit({name})"
    jitted = jax.jit(named, static_argnums=static, donate_argnums=donate, **options)
    jitted = _PerMesh(jitted, cand is not None) if declared else jitted
    if not closure:
        return (jitted, cand, None, None, None, precheck)
    return (jitted, cand, closure, cpos, cspecs, precheck)
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
              options, kind, mutable=None, eager=None):
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
                     bound=bound, kind=None if kind in ("refx.jit", "refx.jit_partial") else kind,
                     eager=eager)
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

    A Ref closed over (not passed) is live: each call reads its current
    value, and a write comes back as an argument Ref's would (the same Ref
    closed over and passed is one Ref).  A container entry replaced after
    the trace (a new layer put into a closed-over model) is not seen until
    something retraces, as with any JAX closure.

    `donate_argnums`/`donate_argnames` donate the arrays of the Refs of
    those arguments that `fun` writes (every array of a Ref holding a
    pytree), unless something else holds them (a clone's Ref, a variable):
    no Ref ever holds a deleted array, and a Ref `fun` does not write keeps
    its own array.  `mutable`: a filter; only the Refs it accepts may be
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
    An nn.Module attribute change (model.eval(), a layer or Ref assigned)
    makes the next call check the bound trees: if they changed, it raises
    ValueError saying where, and writes nothing.
    Argument numbers (static_argnums, donate_argnums) count the bound
    arguments first.
    """
    return _make_jit(fun, tuple(bound_args), static_argnums, static_argnames, donate_argnums,
                     donate_argnames, dict(jax_jit_options), "refx.jit_partial", mutable)


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

    Sharing is kept within one Dag, not across two: each Dag is flattened
    on its own, so a Ref inside two Dag arguments becomes two Refs inside
    the transform (a write through one is not seen through the other).
    Keeping it would need the Refs' identities in jax.jit's cache key
    (a retrace for every new model), and a Dag cannot see the other
    arguments to raise.  Put trees that share Refs in one Dag
    (``Dag((model, ema))``), or use refx.jit, which keeps sharing across
    all its arguments.
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

    @property
    def value(self):
        """The tree of Refs: an alias of `.tree` (refx 0.0.3's name)."""
        return self.tree

    def __repr__(self):
        return f"Dag({self.tree!r})"

    def _children(self):
        return deref(self._tree) if self._deref is None else self._deref


def _dag_unflatten(aux, children):
    d = object.__new__(Dag)
    d._tree = None
    (d._deref,) = children
    return d
