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
               value); every Ref of the output, an argument's, one closed
               over or one made inside, comes out as a new Ref (same class,
               collection, metadata) holding jax.ShapeDtypeStructs, with
               the NamedSharding its declaration names (replicated if none)
               under an active mesh.
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
from ._control import _FilterTable
from ._core import Ref, Value, tree_partition  # type: ignore[import-not-found]
from ._lift import Trees, make_refs, name_of, payload_tree, plan_out, rebuild_out, traceable
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
        # closed-over Refs read and written through stand-ins (copies of their
        # containers): nothing reaches the caller's objects, nothing is retraced
        with t.capturing(inner, rediscover=False) as frame:
            out = fun(*a, **kw)
        inner.check_structure(prefix)
        inner.written(prefix, t.where)  # its checks; nothing is written back
        # every Ref of the output leaves as one made inside: an argument's
        # (a Ref of this trace already) with the value it has now, one
        # closed over through its stand-in of this trace (the capture
        # frame's: the argument's new Ref when it was passed too, so one Ref
        # passed and closed over comes back as one Ref), else a new Ref of
        # this trace holding its value
        leaves, td = _tree_flatten(out)
        stand_in = {}  # type: ignore[var-annotated]
        for x in leaves:
            if isinstance(x, Ref) and id(x) not in stand_in and not _core._ref_is_current(x):
                sub = frame.subs.get(x)
                stand_in[id(x)] = sub if sub is not None else make_refs(
                    [x.value], (x.collection,), (_core._ref_spec(x),))[0]
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



# --------------------------------------------------------------------------
# custom_vjp / custom_jvp
# --------------------------------------------------------------------------


def _positional(kind, name, fun, args, kwargs):
    """args with kwargs resolved to positions (jax.custom_vjp's rule)."""
    if not kwargs:
        return tuple(args)
    try:
        ba = inspect.signature(fun).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise TypeError(f"refx.{kind}({name}): {e}") from None
    ba.apply_defaults()
    if ba.kwargs:
        raise TypeError(f"refx.{kind}({name}): keyword arguments {sorted(ba.kwargs)} could not "
                        "be resolved to positions; pass them positionally")
    return tuple(ba.args)


def _nondiff_positions(kind, nondiff_argnums):
    nums = (nondiff_argnums,) if isinstance(nondiff_argnums, int) else tuple(nondiff_argnums)
    for n in nums:
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"refx.{kind}: nondiff_argnums must hold ints, got {n!r}")
    return nums


_HOLE = object()  # where bwd's rebuilt arguments hold a differentiable leaf (not passed)


class _Call:
    """One call of a custom_vjp/custom_jvp function: its Trees, which
    arguments are differentiable, where each leaf is."""

    def __init__(self, kind, name, fun, nondiff, args, kwargs):
        args = _positional(kind, name, fun, args, kwargs)
        n = len(args)
        bad = [i for i in nondiff if not -n <= i < n]
        if bad:
            raise TypeError(f"refx.{kind}({name}): nondiff_argnums {bad} but {n} positional "
                            "arguments were given")
        self.nondiff = sorted({i % n for i in nondiff})
        self.diff = [i for i in range(n) if i not in self.nondiff]
        self.args = args
        self.t = t = Trees(kind, name, [(args, {})], [None])
        self.prefix = t.prefix()
        # each argument's leaf range and treedef (Refs are leaves)
        self.ranges, self.tds, start = [], [], 0
        for a in args:
            leaves, td = _tree_flatten(a)
            self.ranges.append((start, start + len(leaves)))
            self.tds.append(td)
            start += len(leaves)
        # flat leaf i -> position in t.traced (or -1: a Ref or a static leaf)
        self.traced_at, j, oi = [], 0, 0
        for p in t.pattern:
            if p >= 0:
                self.traced_at.append(-1)
            else:
                self.traced_at.append(-1 if t.is_static[oi] else j)
                j += 0 if t.is_static[oi] else 1
                oi += 1
        self.info = {}  # type: ignore[var-annotated]

    def enter(self, vals, traced):
        inner = self.t.lift(vals, traced)
        ((a, _kw),) = inner.trees
        return inner, a

    def leave(self, inner, what, out):
        """The checks after fun (or fwd, or the jvp rule) ran; the values
        of the Refs it wrote."""
        t = self.t
        inner.check_structure(self.prefix)
        written = inner.written(self.prefix, t.where)
        seen = self.info.get("written")
        if seen is not None and seen[1] != written:
            names = lambda ks: ", ".join(t.describe(k) for k in ks) or "no Ref"  # noqa: E731
            raise ValueError(f"{self.prefix}: {seen[0]} writes {names(seen[1])} but {what} "
                             f"writes {names(written)}; both must write the same Refs (the "
                             "written values are outputs of the function)")
        self.info["written"] = (what, written)
        self.check_out(what, out)
        return [inner.refs[k].value for k in written]

    def check_out(self, what, out):
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            where = jax.tree_util.keystr(path) or "the output"
            if isinstance(leaf, Ref):
                raise TypeError(f"{self.prefix}: {what} returned a {type(leaf).__name__} at "
                                f"{where}; a function with a custom derivative returns values "
                                "(return r.value), and writes Refs to change them")
            if not traceable(leaf):
                raise TypeError(f"{self.prefix}: {what} returned a {type(leaf).__name__} at "
                                f"{where}, which JAX cannot differentiate; return arrays")

    def by_argument(self, vals, traced, args):
        """The trees of arguments `args` with each Ref replaced by vals[k]
        and each traced leaf by traced[j] (tangents, in the argument's
        structure); static leaves are None."""
        out = []
        for a in args:
            lo, hi = self.ranges[a]
            leaves = []
            for i in range(lo, hi):
                p = self.t.pattern[i]
                j = self.traced_at[i]
                leaves.append(vals[p] if p >= 0 else traced[j] if j >= 0 else None)
            out.append(self.tds[a].unflatten(leaves))
        return tuple(out)

    def cotangents(self, what, cts):
        """Per Ref and per traced leaf: the cotangent `cts` (one tree per
        differentiable argument, in its structure with each Ref replaced
        by its value's cotangent) gives, or None (zero).  A Ref at several
        places gets the sum."""
        t = self.t
        if not isinstance(cts, (tuple, list)) or len(cts) != len(self.diff):
            got = (f"a {type(cts).__name__} of length {len(cts)}"
                   if isinstance(cts, (tuple, list)) else f"a {type(cts).__name__}")
            raise TypeError(f"{self.prefix}: {what} must return a tuple with one cotangent per "
                            f"differentiable argument ({len(self.diff)}: arguments "
                            f"{self.diff}), got {got}")
        ref_ct = [None] * len(t.refs)
        traced_ct = [None] * len(t.traced)
        for a, ct in zip(self.diff, cts, strict=True):
            if ct is None:
                continue
            lo, _hi = self.ranges[a]
            try:
                subs = self.tds[a].flatten_up_to(ct)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.prefix}: {what} returned a cotangent for argument {a} "
                                 "that does not have the argument's structure (each Ref "
                                 "replaced by the cotangent of its value, None for zero): "
                                 f"{e}") from None
            for off, sub in enumerate(subs):
                i = lo + off
                if sub is None:
                    continue
                p, j = t.pattern[i], self.traced_at[i]
                if p >= 0:
                    want = t.vals[p]
                    a_td = jax.tree_util.tree_structure(want)
                    b_td = jax.tree_util.tree_structure(sub)
                    if a_td != b_td or any(np.shape(x) != np.shape(y) for x, y in zip(
                            jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(sub),
                            strict=True)):
                        raise ValueError(
                            f"{self.prefix}: {what} returned a cotangent for {t.describe(p)} "
                            f"at {t.at(i)} with structure {b_td} and shapes "
                            f"{[np.shape(x) for x in jax.tree_util.tree_leaves(sub)]}, but "
                            f"its value has {a_td} and "
                            f"{[np.shape(x) for x in jax.tree_util.tree_leaves(want)]}")
                    ref_ct[p] = sub if ref_ct[p] is None else jax.tree_util.tree_map(
                        jnp.add, ref_ct[p], sub)
                elif j >= 0:
                    traced_ct[j] = sub
        return ref_ct, traced_ct

    def nondiff_args(self, ref_vals, traced):
        """The nondiff arguments, rebuilt (inside bwd or the jvp rule) with
        new Refs holding `ref_vals` (a dict k -> value)."""
        vals = [ref_vals.get(k) for k in range(len(self.t.refs))]
        inner = self.t.lift(vals, traced)
        ((a, _kw),) = inner.trees
        return inner, [a[i] for i in self.nondiff]

    def nondiff_refs(self):
        out = set()
        for a in self.nondiff:
            lo, hi = self.ranges[a]
            out.update(p for p in self.t.pattern[lo:hi] if p >= 0)
        return sorted(out)

    def finish(self, wvals):
        self.t.write(self.info["written"][1], list(wvals))


class custom_vjp:
    """jax.custom_vjp for functions of trees of Refs: a function with a
    backward pass of your own.

    ``f = refx.custom_vjp(fun, nondiff_argnums=())``, then
    ``f.defvjp(fwd, bwd)``; usable as a decorator.  The differentiable
    inputs are the values of the Refs in the arguments (those not in
    `nondiff_argnums`) and their other array leaves, as refx.grad sees
    them; keyword arguments are resolved to positions.

    fun(*args)          the primal: runs on new Refs holding the arguments'
                        values (sharing kept) and returns arrays (a pytree
                        of them, no Refs).
    fwd(*args)          the same arguments, same Refs; returns (out,
                        residuals): out as fun's, residuals a pytree of
                        arrays (values, not Refs) for bwd.
    bwd(*nondiff, residuals, g)
                        g: the cotangent of out; the nondiff arguments come
                        first, rebuilt with new Refs holding their values
                        (read them, do not write them).  Returns a tuple
                        with one entry per differentiable argument: the
                        argument's structure with each Ref replaced by the
                        cotangent of its value (a pytree like its value)
                        and each array leaf by its cotangent; None stands
                        for zero (a whole argument, a Ref, a leaf).  A Ref
                        at several places gets the sum of its entries.

    fun and fwd may write Refs (a counter, a batch statistic), and must
    write the same ones: they are written back after the call, all or
    nothing, as by refx.jit; a written value is an output without
    derivative (bwd is not given its cotangent; no gradient flows through
    a write).  Refs closed over are read as constants: pass the Refs whose
    values are differentiated as arguments.  Works eagerly, under
    refx.jit/jax.jit, refx.grad/jax.grad and refx.vmap.
    """

    def __init__(self, fun, nondiff_argnums=()):
        _check_callable("custom_vjp", fun)
        self.fun = fun
        self.nondiff_argnums = _nondiff_positions("custom_vjp", nondiff_argnums)
        self.fwd = None
        self.bwd = None
        functools.update_wrapper(self, fun)

    def defvjp(self, fwd, bwd):
        """Set the forward and backward functions (see the class)."""
        _check_callable("custom_vjp", fwd, "fwd")
        _check_callable("custom_vjp", bwd, "bwd")
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args, **kwargs):
        name = name_of(self.fun)
        if self.fwd is None:
            raise TypeError(f"refx.custom_vjp({name}): no VJP defined; call "
                            ".defvjp(fwd, bwd) on it first")
        c = _Call("custom_vjp", name, self.fun, self.nondiff_argnums, args, kwargs)
        fun, ufwd, ubwd = self.fun, self.fwd, self.bwd
        nd_refs = c.nondiff_refs()
        nd_traced = [c.traced_at[i] for a in c.nondiff for i in range(*c.ranges[a])
                     if c.traced_at[i] >= 0]

        def primal(vals, traced):
            inner, a = c.enter(vals, traced)
            out = fun(*a)
            return out, c.leave(inner, "fun", out)

        def fwd(vals, traced):
            inner, a = c.enter(vals, traced)
            r = ufwd(*a)
            if not (isinstance(r, (tuple, list)) and len(r) == 2):
                raise TypeError(f"{c.prefix}: fwd must return a pair (out, residuals), got "
                                f"{type(r).__name__}")
            out, res = r
            for path, leaf in jax.tree_util.tree_flatten_with_path(res)[0]:
                if isinstance(leaf, Ref) or not traceable(leaf):
                    raise TypeError(f"{c.prefix}: fwd returned a {type(leaf).__name__} in its "
                                    f"residuals at {jax.tree_util.keystr(path) or 'the root'}; "
                                    "residuals are arrays (put a Ref's value, r.value, in them)")
            wvals = c.leave(inner, "fwd", out)
            keep = ([vals[k] for k in nd_refs], [traced[j] for j in nd_traced])
            return (out, wvals), (res, keep)

        def bwd(resid, cts):
            res, (nvals, ntraced) = resid
            g, _written_cts = cts  # no gradient flows through a write
            nd = []
            if c.nondiff:
                traced = [_HOLE] * len(c.t.traced)  # a leaf (None is no leaf)
                for j, v in zip(nd_traced, ntraced, strict=True):
                    traced[j] = v
                inner, nd = c.nondiff_args(dict(zip(nd_refs, nvals, strict=True)), traced)
            cts_in = ubwd(*nd, res, g)
            if c.nondiff:
                inner.check_structure(c.prefix)
                for k in inner.written(c.prefix, c.t.where):
                    raise ValueError(f"{c.prefix}: bwd wrote {c.t.describe(k)}, a Ref of a "
                                     "nondiff argument; bwd may read them, not write them")
            return c.cotangents("bwd", cts_in)

        primal.__name__ = primal.__qualname__ = f"refx_custom_vjp({name})"
        f = jax.custom_vjp(primal)
        f.defvjp(fwd, bwd)
        out, wvals = f(c.t.vals, c.t.traced)
        c.finish(wvals)
        return out


# --------------------------------------------------------------------------
# shard_map
# --------------------------------------------------------------------------

try:  # JAX 0.7+: jax.shard_map(f, *, mesh, in_specs, out_specs, axis_names, check_vma)
    _jax_shard_map = jax.shard_map
    _NEW_SHARD_MAP = True
except AttributeError:  # JAX 0.4.36-0.6: shard_map(f, mesh, in_specs, out_specs, check_rep)
    from jax.experimental.shard_map import shard_map as _jax_shard_map  # type: ignore[no-redef,assignment,unused-ignore]
    _NEW_SHARD_MAP = False


def _call_shard_map(f, mesh, in_specs, out_specs, check_vma, axis_names):
    if _NEW_SHARD_MAP:
        kw = {} if axis_names is None else {"axis_names": frozenset(axis_names)}
        return _jax_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                              check_vma=check_vma, **kw)
    kw = {}
    if axis_names is not None:  # the axes not named stay automatic
        kw["auto"] = frozenset(mesh.axis_names) - frozenset(axis_names)
    return _jax_shard_map(f, mesh, in_specs, out_specs, check_rep=check_vma, **kw)


class StateSharding(_FilterTable):
    """Per-collection PartitionSpecs for a refx.shard_map argument holding
    Refs: ``StateSharding({"params": P(None, "model"), ...: P()})``.

    The Refs (and other leaves) of the argument that the first filter
    accepts enter (and leave) fun split by that filter's spec.  Keys are
    filters of tree_partition (first match wins), values PartitionSpecs; a
    leaf no filter accepts is an error (end with ``...: P()`` to replicate
    the rest).
    """

    __slots__ = ()
    _what = "PartitionSpec"

    def __init__(self, specs, /):
        super().__init__(specs)

    def _check_value(self, f, spec):
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"StateSharding: the spec of filter {f!r} must be a "
                            f"jax.sharding.PartitionSpec (P() replicates), not {spec!r}")

    @property
    def specs(self):
        return tuple(s for _, s in self._items)


def _is_spec_leaf(x):
    return isinstance(x, (PartitionSpec, StateSharding))


def _state_sharding_leaves(t, ss, subtree, where):
    """Per leaf of `subtree`: its spec by the first filter of `ss` that
    accepts it (refx.vmap's StateAxes rule)."""
    parts, _td = tree_partition(subtree, *ss.filters)
    out = []
    for path in parts[0]:
        hit = next((i for i, p in enumerate(parts) if p[path] is not _core.NOTHING), None)
        if hit is None:
            continue
        leaf = parts[hit][path]
        n = len(jax.tree_util.tree_leaves(leaf))
        if hit == len(ss.filters) and n:
            what = (f"the {type(leaf).__name__} (collection {leaf.collection!r})"
                    if isinstance(leaf, (Ref, _core.Deref)) else f"a {type(leaf).__name__}")
            raise ValueError(f"{t.prefix()}: {where} at {path} holds {what}, which no filter "
                             f"of {ss!r} accepts; add a filter for it (end with `...: P()` to "
                             "replicate the rest)")
        out.extend([ss.specs[hit] if hit < len(ss.filters) else None] * n)
    return out


def _leaf_specs(t, in_specs, args):
    """Per flat leaf of (args, {}): its PartitionSpec."""
    if isinstance(in_specs, list):
        in_specs = tuple(in_specs)
    if isinstance(in_specs, tuple) and not isinstance(in_specs, PartitionSpec):
        if len(in_specs) != len(args):
            raise ValueError(f"{t.prefix()}: in_specs has {len(in_specs)} entries but "
                             f"{len(args)} positional arguments were given; give one entry per "
                             "argument (or one PartitionSpec/StateSharding for all)")
        per_arg = list(in_specs)
    else:
        per_arg = [in_specs] * len(args)
    specs = []  # type: ignore[var-annotated]
    for i, (spec, arg) in enumerate(zip(per_arg, args, strict=True)):
        sp_leaves, sp_td = _tree_flatten(spec, is_leaf=_is_spec_leaf)
        try:
            subtrees = sp_td.flatten_up_to(arg)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{t.prefix()}: in_specs[{i}] is not a prefix of argument {i}'s "
                             f"structure: {e}") from None
        for sp, sub in zip(sp_leaves, subtrees, strict=True):
            if isinstance(sp, StateSharding):
                specs.extend(_state_sharding_leaves(t, sp, sub, f"argument {i}"))
            elif isinstance(sp, PartitionSpec):
                specs.extend([sp] * len(_tree_flatten(sub)[0]))
            else:
                raise TypeError(f"{t.prefix()}: in_specs entries must be PartitionSpecs or "
                                f"StateSharding, got {sp!r} for argument {i} (P() replicates)")
    return specs


def _fmt_spec(spec):
    """P('data', None): the same text on every JAX (reprs differ)."""
    return "P(" + ", ".join(repr(e) for e in spec) + ")"


def _spec_axes(spec):
    names = []
    for e in spec:
        if isinstance(e, str):
            names.append(e)
        elif isinstance(e, tuple):
            names.extend(e)
    return names


def _check_split(t, spec, value, mesh, what):
    """ValueError naming `what` unless `spec` splits every leaf of `value`."""
    sizes = dict(mesh.shape)
    missing = sorted(set(_spec_axes(spec)) - set(sizes))
    if missing:
        raise ValueError(f"{t.prefix()}: in_specs gives {what} the spec {_fmt_spec(spec)}, "
                         f"which names mesh axes {missing} that the mesh does not have (its axes: "
                         f"{tuple(sizes)})")
    for leaf in _tree_flatten(value)[0]:
        shape = np.shape(leaf)
        if len(spec) > len(shape):
            raise ValueError(f"{t.prefix()}: in_specs gives {what} the spec "
                             f"{_fmt_spec(spec)}, with {len(spec)} entries, but its value has "
                             f"shape {tuple(shape)}")
        for d, e in enumerate(spec):
            if e is None:
                continue
            n = int(np.prod([sizes[a] for a in ((e,) if isinstance(e, str) else e)]))
            if shape[d] % n:
                raise ValueError(f"{t.prefix()}: in_specs splits dimension {d} of {what} "
                                 f"(shape {tuple(shape)}) over {e!r}, {n} ways; {shape[d]} is "
                                 f"not a multiple of {n}")


def _varying(x):
    """The mesh axes a traced value varies over inside shard_map (JAX 0.7+),
    or None where JAX does not say."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    try:
        aval = typeof(x)
    except (TypeError, AttributeError):  # pragma: no cover - not an array
        return None
    vma = getattr(aval, "vma", None)  # JAX 0.7-0.9
    if vma is None:  # JAX 0.10: the aval's manual axis type
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return None if vma is None else frozenset(vma)


def shard_map(fun, mesh=None, in_specs=None, out_specs=None, *, check_vma=True,
              axis_names=None, mutable=None):
    """jax.shard_map for functions of trees of Refs.

    `in_specs` gives each Ref's value (and each other array leaf) its
    PartitionSpec: a PartitionSpec for every positional argument, or a
    tuple with one entry per positional argument: a PartitionSpec for all
    of it, a ``StateSharding({filter: PartitionSpec, ...})`` choosing a spec
    per collection/class/filter, or a prefix tree of the argument with
    those at its leaves.  Inside, `fun` runs once per device (or group of
    devices) on new Refs holding its block of each value (same sharing,
    classes, collections, metadata) and may read and write them.  Each
    Ref's value leaves at the spec it entered with: after the call every
    Ref `fun` wrote holds the blocks it wrote, assembled, all or nothing
    (refx.jit's write rules).  Writing a Ref whose spec replicates it over
    a mesh axis with a value that varies over that axis is a ValueError
    naming it (with check_vma, on JAX that tracks it): reduce it first
    (``jax.lax.pmean``).  `out_specs` is jax.shard_map's, for fun's output
    (a Ref made inside and returned comes out as a new Ref holding the
    assembled value, at the spec out_specs gives its place).  `mesh`: the
    mesh (default: the active one); `check_vma` (check_rep on older JAX),
    `axis_names` as jax.shard_map's; `mutable`: a filter, only the Refs
    it accepts may be written (see refx.mutable).  Keyword arguments are
    not supported (jax.shard_map's rule): pass them positionally.
    """
    _check_callable("shard_map", fun)
    if out_specs is None:
        raise TypeError("refx.shard_map: out_specs is required (a PartitionSpec, or a prefix "
                        "tree of fun's output with them)")
    if in_specs is None:
        raise TypeError("refx.shard_map: in_specs is required (a PartitionSpec per argument, "
                        "or StateSharding)")
    run = _with_mutable(fun, mutable, "refx.shard_map")
    name = name_of(fun)

    @functools.wraps(fun)
    def mapped(*args, **kwargs):
        if kwargs:
            raise TypeError(f"refx.shard_map({name}): keyword arguments {sorted(kwargs)} are "
                            "not supported (no in_specs for them); pass them positionally")
        m = mesh
        if m is None:
            m = _compat.active_mesh()
            if m is None:
                m = _compat.context_mesh()
            if m is None:
                raise TypeError(f"refx.shard_map({name}): no mesh: pass mesh=, or call it "
                                "under jax.set_mesh(mesh)")
        t = Trees("shard_map", name, [(args, {})], [None])
        specs = _leaf_specs(t, in_specs, args)
        ref_spec = {}  # type: ignore[var-annotated]
        other_specs = []
        oi = 0
        for i, (p, sp) in enumerate(zip(t.pattern, specs, strict=True)):
            if p >= 0:
                seen = ref_spec.get(p)
                if seen is None:
                    ref_spec[p] = (sp, i)
                    _check_split(t, sp, t.vals[p], m, t.describe(p))
                elif seen[0] != sp:
                    raise ValueError(
                        f"{t.prefix()}: one {type(t.refs[p]).__name__} is at {t.at(seen[1])} "
                        f"with spec {_fmt_spec(seen[0])} and at {t.at(i)} with spec "
                        f"{_fmt_spec(sp)}; a Ref shared "
                        "between places must have one spec")
            else:
                if not t.is_static[oi]:
                    _check_split(t, sp, t.plain[oi], m, t.at(i))
                    other_specs.append(sp)
                oi += 1
        rspecs = [ref_spec[k][0] for k in range(len(t.refs))]
        info = {}  # type: ignore[var-annotated]

        def body(vals, traced):
            inner = t.lift(vals, traced)
            new, ((a, _kw),) = inner.refs, inner.trees
            out = run(*a)
            inner.check_structure(t.prefix())
            written = inner.written(t.prefix(), t.where)
            if check_vma:
                for k in written:
                    allowed = set(_spec_axes(rspecs[k]))
                    for leaf in _tree_flatten(new[k].value)[0]:
                        vary = _varying(leaf)
                        extra = sorted(vary - allowed) if vary is not None else []
                        if extra:
                            raise ValueError(
                                f"{t.prefix()}: fun wrote {t.describe(k)}, whose spec "
                                f"{_fmt_spec(rspecs[k])} replicates it over mesh axes {extra}, "
                                f"with a value that varies over {extra}; write a value that is "
                                "the "
                                "same on every device of those axes (jax.lax.pmean/psum it), "
                                "or split the Ref over them in in_specs")
            info["written"] = written
            spec, td, items = plan_out(out, new)
            info["out"] = (spec, td)
            return [r.value for r in new], payload_tree(spec, td, items)

        body.__name__ = body.__qualname__ = f"refx_shard_map({name})"
        f = _call_shard_map(body, m, (rspecs, other_specs), (rspecs, out_specs), check_vma,
                            axis_names)
        vals_out, payload = f(t.vals, t.traced)
        out = rebuild_out(*info["out"], payload, t.refs)
        written = info["written"]
        t.write(written, [vals_out[k] for k in written])
        return out

    return mapped


def _zero_tangent(v):
    """A zero tangent for a value without derivative (float0 for integers)."""
    def zero(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(np.shape(x), jax.dtypes.float0)
    return jax.tree_util.tree_map(zero, v)


class custom_jvp:
    """jax.custom_jvp for functions of trees of Refs: a function with a
    forward-mode derivative rule of your own (reverse mode follows by
    JAX's transposition, so refx.grad uses it too).

    ``f = refx.custom_jvp(fun, nondiff_argnums=())``, then
    ``f.defjvp(jvp)`` (usable as ``@f.defjvp``).  As with refx.custom_vjp,
    the differentiable inputs are the values of the Refs of the arguments
    not in `nondiff_argnums`, and their other array leaves.

    fun(*args)      the primal: new Refs holding the arguments' values;
                    returns arrays (no Refs).
    jvp(*nondiff, primals, tangents)
                    primals: the tuple of differentiable arguments, with
                    new Refs holding their values (the nondiff arguments
                    come first, as they are, with new Refs); tangents: the
                    same structure with each Ref replaced by its value's
                    tangent (float0 zeros for integer values) and each
                    array leaf by its tangent (None for leaves JAX cannot
                    trace).  Returns (out, tangent of out).

    fun and the jvp rule may write Refs, and must write the same ones:
    written back after the call, all or nothing; a written value has a
    zero tangent (no derivative flows through a write).  Refs closed over
    are read as constants.
    """

    def __init__(self, fun, nondiff_argnums=()):
        _check_callable("custom_jvp", fun)
        self.fun = fun
        self.nondiff_argnums = _nondiff_positions("custom_jvp", nondiff_argnums)
        self.jvp = None
        functools.update_wrapper(self, fun)

    def defjvp(self, jvp):
        """Set the jvp rule (see the class); returns it (a decorator)."""
        _check_callable("custom_jvp", jvp, "jvp")
        self.jvp = jvp
        return jvp

    def __call__(self, *args, **kwargs):
        name = name_of(self.fun)
        if self.jvp is None:
            raise TypeError(f"refx.custom_jvp({name}): no JVP rule defined; call "
                            ".defjvp(jvp) on it first")
        c = _Call("custom_jvp", name, self.fun, self.nondiff_argnums, args, kwargs)
        fun, ujvp = self.fun, self.jvp

        def primal(vals, traced):
            inner, a = c.enter(vals, traced)
            out = fun(*a)
            return out, c.leave(inner, "fun", out)

        def rule(primals, tangents):
            vals, traced = primals
            tvals, ttraced = tangents
            inner, a = c.enter(list(vals), list(traced))
            nd = [a[i] for i in c.nondiff]
            r = ujvp(*nd, tuple(a[i] for i in c.diff),
                     c.by_argument(list(tvals), list(ttraced), c.diff))
            if not (isinstance(r, (tuple, list)) and len(r) == 2):
                raise TypeError(f"{c.prefix}: the jvp rule must return a pair (out, "
                                f"tangent_out), got {type(r).__name__}")
            out, tout = r
            wvals = c.leave(inner, "the jvp rule", out)
            return (out, wvals), (tout, [_zero_tangent(v) for v in wvals])

        primal.__name__ = primal.__qualname__ = f"refx_custom_jvp({name})"
        f = jax.custom_jvp(primal)
        f.defjvp(rule)
        out, wvals = f(c.t.vals, c.t.traced)
        c.finish(wvals)
        return out
