"""Trace-time logic of refx's other transforms: vmap (with StateAxes),
scan, remat, cond, switch, fori_loop and while_loop.

Each is the lift (refx/_lift.py, shared with refx.jit and refx.grad) around one JAX
transform: the Refs of the arguments are numbered (sharing kept) and their
values read at one moment; the JAX transform runs a function that makes
new Refs of its trace holding those values (same class, collection and
metadata), rebuilds the caller's trees with them, calls `fun`, and returns
the values of the Refs `fun` may have written with its outputs; after it,
the caller's Refs that `fun` wrote get their new values, all or nothing,
through the core's one write check (trace level, refx.mutable).

What differs per transform is what flows where:

  vmap      Ref values go in at their axis (an int/None per argument, or a
            StateAxes per collection) and every Ref's value comes out at that
            axis (None: unbatched, and a batched write is a ValueError); the
            Refs fun wrote are written back (stacked, for mapped ones).
  scan      the carry's Ref values are part of scan's carry: each iteration
            sees the previous one's writes, and must keep their shapes and
            dtypes; Refs in xs get one slice per iteration, and their writes
            come out stacked in ys.
  remat     only the written values come out (jax.checkpoint's output is
            free).
  cond/switch  every operand Ref's value comes out of every branch (a
            branch that does not write a Ref returns its input); the Refs
            any branch wrote are written back with the taken branch's
            values.  Shapes and dtypes are compared branch by branch as
            JAX traces them, so the error names the Ref.
  fori_loop/while_loop  as scan's carry.

Where the written set must be known before JAX traces (vmap's out_axes,
cond's branch outputs, a loop's carry) every Ref's value comes out and
only the written ones are written back: the others are pass-through
outputs, which XLA removes under jit (an unused conditional output, a
loop-invariant carry) and which cost a buffer eagerly.

What `fun` wrote and how its outputs are built is recorded by the traced
function itself in a dict of the call (`info`): each call makes its own
closures, so JAX's trace caches (keyed by function identity) never hand
one call's trace to another.  Eager calls (outside any trace) run through
a cached refx.jit of the same call instead ("eager calls" below), so they
trace and compile once per function and structure.

Closed-over Refs (read or written by `fun` without being passed) are found
by the first trace and the call is traced again with them as a last part
of the trees, "closure" (refx/_lift.py, with_closures): in scan and the
loops they ride in the carry, in vmap they are broadcast.

Outputs: a Ref of the arguments comes back as the caller's own object, a
Ref closed over as itself, a Ref made inside as a new Ref holding the
transformed value (stacked by vmap and in scan's ys), sharing kept.  A
leaf JAX cannot trace (a str, a function) is kept out of the transform:
as an argument leaf it is closed over, as an output leaf it rides in the
plan.  A Ref must hold what JAX can trace (arrays, scalars, pytrees of
them), as with refx.jit.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat, _core, _jit, _lift, _sharding
from ._core import Ref, tree_partition
from ._lift import Trees, name_of, payload_tree, plan_out, rebuild_out, traceable, with_closures
from ._mutable import _with_mutable

_tree_flatten = jax.tree_util.tree_flatten
_name = name_of
_traceable = traceable


def _run_inner(t, inner, fun, *args, **kwargs):
    """fun(*args, **kwargs) inside the transform, with closed-over Refs
    captured, then the checks that must pass before anything leaves it:
    the trees kept their structure."""
    with t.capturing(inner):
        out = fun(*args, **kwargs)
    inner.check_structure(t.prefix(), _lift.place_name)
    return out


def _written(t, inner, exclude=()):
    return inner.written(t.prefix(), t.where, exclude)


def _plan(out, refs):
    """plan_out, with the payload in out's structure."""
    spec, td, items = plan_out(out, refs)
    return spec, td, payload_tree(spec, td, items)


def _aval(v):
    """(treedef, ((shape, dtype), ...)) of a Ref's value."""
    leaves, td = _tree_flatten(v)
    return td, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)


def _fmt(aval):
    td, leaves = aval
    items = [f"{dt}{list(shape)}".replace(" ", "") for shape, dt in leaves]
    if td.num_nodes == 1 and len(items) == 1:
        return items[0]
    return f"a pytree {td} of ({', '.join(items)})"


def _check_kept(t, k, before, after, what, rule):
    """ValueError unless Ref k's value keeps its structure, shapes, dtypes."""
    a, b = _aval(before), _aval(after)
    if a != b:
        raise ValueError(f"{t.prefix()}: {what} {t.describe(k)} with {_fmt(b)}, but it holds "
                         f"{_fmt(a)}; {rule}")


def _pair(kind, name, out):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"refx.{kind}({name}): fun must return a pair (carry, y), got "
                        f"{type(out).__name__}")
    return out


# --------------------------------------------------------------------------
# the carry of scan / fori_loop / while_loop
# --------------------------------------------------------------------------

_CARRY_RULE = ("a Ref in the carry must keep its shape and dtype from one iteration to the "
               "next (scan's rule for its carry); write a value of the same shape and dtype, "
               "or keep the Ref out of the carry")


def _check_carry_out(t, kind, carry_in, carry_out, new, label):
    """The carry fun returned must be init's structure, with the Refs it
    was given at the same places, and other leaves of the same types."""
    _label, _tree, td, pat, a, _b = t.parts[0]
    leaves, otd = _tree_flatten(carry_out)
    if otd != td:
        raise ValueError(f"{t.prefix()}: fun returned a carry of another structure than "
                         f"{label}: {otd} != {td}; return the carry with init's structure "
                         "(the same Refs at the same places)")
    in_leaves = _tree_flatten(carry_in)[0]
    traced = []
    for i, (p, x, x0) in enumerate(zip(pat, leaves, in_leaves, strict=True)):
        if p >= 0:
            if x is not new[p]:
                got = ("another Ref" if isinstance(x, Ref)
                       else f"a {type(x).__name__}")
                raise ValueError(f"{t.prefix()}: fun returned a carry holding {got} where "
                                 f"{t.at(a + i)} holds a Ref; return the carry with the Refs "
                                 "it was given at the same places (write their .value instead)")
        elif isinstance(x, Ref):
            raise ValueError(f"{t.prefix()}: fun returned a carry holding a Ref at "
                             f"{t.at(a + i)}, where {label} holds a {type(x0).__name__}; Refs "
                             f"may enter a carry only through {label}")
        elif not _traceable(x0):
            if not (x is x0 or x == x0):
                raise ValueError(f"{t.prefix()}: the carry's {type(x0).__name__} at "
                                 f"{t.at(a + i)} changed ({x0!r} -> {x!r}); leaves JAX cannot "
                                 "trace must stay as they are")
        else:
            if not _traceable(x):
                raise TypeError(f"{t.prefix()}: fun returned a {type(x).__name__} in the carry "
                                f"at {t.at(a + i)}, which JAX cannot trace")
            before, after = _aval(x0), _aval(x)
            if before != after:
                raise ValueError(f"{t.prefix()}: fun returned the carry's leaf at "
                                 f"{t.at(a + i)} as {_fmt(after)}, but {label} has "
                                 f"{_fmt(before)}; a carry must keep its shapes and dtypes")
            traced.append(x)
    return traced


class _Carry:
    """scan's, fori_loop's and while_loop's handling of the Refs of the carry
    (part 0 of `t`), for scan of xs (part 1), and of the Refs fun closes
    over (the last part, "closure"), which ride in the carry: each
    iteration sees the previous one's writes.

    carry_ks  the numbers of the Refs in the loop's carry: init's Refs
              (numbered first), then closed-over Refs not passed
    x_ks      the numbers of xs's Refs (scan)
    """

    def __init__(self, t, kind, label):
        self.t, self.kind, self.label = t, kind, label
        _lbl, _tree, _td, pat, a, b = t.parts[0]
        self.nc = len({p for p in pat if p >= 0})  # carry Refs are numbered first
        n_main = 1 + max((p for part in t.parts if part[0] != "closure" for p in part[3]),
                         default=-1)
        self.carry_ks = list(range(self.nc)) + list(range(n_main, len(t.refs)))
        self.x_ks = list(range(self.nc, n_main))
        n_other_c = sum(1 for p in pat if p < 0)
        st = t.is_static[:n_other_c]
        self.c_traced = [x for x, s in zip(t.plain[:n_other_c], st, strict=True) if not s]
        self.x_traced = t.traced[len(self.c_traced):]
        self.n_other_c = n_other_c
        self.written: set[int] = set()  # carry Refs written, over every trace

    def init(self):
        return ([self.t.vals[k] for k in self.carry_ks], self.c_traced)

    def enter(self, carry, x=None):
        """New Refs and trees inside the loop body (or cond_fun)."""
        t = self.t
        cvals, ctraced = carry
        xvals, xtraced = x if x is not None else ([], self.x_traced)
        vals = [None] * len(t.refs)
        for k, v in zip(self.carry_ks, cvals, strict=True):
            vals[k] = v
        for k, v in zip(self.x_ks, xvals, strict=True):
            vals[k] = v
        return t.lift(vals, list(ctraced) + list(xtraced))

    def leave(self, inner, carry_out):
        """Check what the body did to the carry; the next carry."""
        t = self.t
        inner.check_structure(t.prefix())
        new = inner.refs
        traced = _check_carry_out(t, self.kind, inner.trees[0], carry_out, new, self.label)
        written = _written(t, inner)
        carried = set(self.carry_ks)
        for k in written:
            if k in carried:
                _check_kept(t, k, inner.before(k), new[k].value, "fun wrote", _CARRY_RULE)
                self.written.add(k)
        inner.written_ks = written
        return ([new[k].value for k in self.carry_ks], traced)

    def result(self, final):
        """The caller's carry after the loop (before the write-back)."""
        t = self.t
        cvals, ctraced = final
        it = iter(ctraced)
        n = self.n_other_c
        others = [next(it) if not s else x
                  for x, s in zip(t.plain[:n], t.is_static[:n], strict=True)]
        carry = _lift.build(t.parts[:1], t.refs, others)[0][0]
        written = sorted(self.written)
        at = {k: j for j, k in enumerate(self.carry_ks)}
        return carry, written, [cvals[at[k]] for k in written]


# --------------------------------------------------------------------------
# eager calls: run through a cached refx.jit
# --------------------------------------------------------------------------
#
# Called outside any trace, each transform would trace and compile on every
# call (its closures are new each time, so JAX's caches never hit).  It runs
# instead through a refx.jit of the same call, kept per (transform, function,
# static options) in a small LRU: the second call with the same structures,
# Ref kinds and avals neither traces nor compiles.  Closed-over Refs are live
# in refx.jit, so a cached trace never holds a stale Ref value.  Calls whose
# trees hold leaves refx.jit cannot take (a str, a function) run as before.
#
# A hit costs a dict lookup and the refx.jit call: the cached function is
# made in "eager" mode (jit.c), where it decides itself, in C and before
# doing anything, whether to run (outside every trace, not under
# jax.disable_jit, every leaf one JAX can take) or to return _UNCACHED; and
# it stamps the time of its last run (`_used`), which is what the LRU
# evicts by, so a hit does not reorder anything.

_EAGER: dict = {}  # key -> its refx.jit function, or False: not cacheable
_EAGER_MAX = 64
_eager_lock = threading.Lock()
_MAKERS: dict = {}  # transform -> maker(*key[1:]) of its refx.jit function


_UNCACHED = object()  # the result of an eager call not run through refx.jit


def _eager(key, args, kwargs=None):
    """Run an eager call through its cached refx.jit function, or return
    _UNCACHED to run it as it is: inside a trace or under
    jax.disable_jit, an unhashable key, leaves refx.jit cannot take (its
    function returns _UNCACHED for those, having done nothing), or a
    function whose outputs refx.jit cannot return (a str; the key is then
    remembered as not cacheable).

    `key` is (transform, *what its refx.jit function is made of):
    _MAKERS[transform](*key[1:]) makes it on a miss, so a hit builds
    nothing but the key."""
    try:
        jf = _EAGER.get(key)
    except TypeError:  # an unhashable option (a list as a filter)
        return _UNCACHED
    if jf is None:
        if not _compat.eager():  # inside a trace, or jit disabled: make nothing
            return _UNCACHED
        jf = _eager_miss(key)
    if jf is False:
        return _UNCACHED
    try:
        return jf(*args) if kwargs is None else jf(*args, **kwargs)
    except _jit.ConstOutput:  # raised while tracing: nothing was written
        with _eager_lock:
            if key in _EAGER:
                _EAGER[key] = False
        return _UNCACHED


def _eager_miss(key):
    with _eager_lock:
        jf = _EAGER.get(key)
        if jf is None:
            jf = _MAKERS[key[0]](*key[1:])
            while len(_EAGER) >= _EAGER_MAX:  # the least recently run goes
                del _EAGER[min(_EAGER, key=_eager_last_run)]
            _EAGER[key] = jf
    return jf


def _eager_last_run(key):
    jf = _EAGER[key]
    return -1 if jf is False else jf._used  # not cacheable: dropped first


def _with_closures_of(once, *args):
    """with_closures(once) with more arguments: once(closure, *args)."""
    return with_closures(lambda closure: once(closure, *args))


def _eager_jit(kind, name, fun, **options):
    """refx.jit of `fun` whose messages read as the transform's:
    "refx.scan(body) wrote the Ref of argument 0 ..." ; a call with a
    leaf JAX cannot take returns _UNCACHED (see jit.c, others_traceable)."""
    fun.__name__ = fun.__qualname__ = name
    return _jit._make_jit(fun, None, options.get("static_argnums", ()),
                          options.get("static_argnames", ()), (), (), {}, kind,
                          eager=_UNCACHED)


# --------------------------------------------------------------------------
# StateAxes and vmap
# --------------------------------------------------------------------------


class _FilterTable:
    """{filter: value} pairs, first match wins: the base of StateAxes
    (refx.vmap's axes) and StateSharding (refx.shard_map's specs, in
    refx/_lifts.py).  A subclass names its values (`_what`) and checks one
    (`_check_value`)."""

    __slots__ = ("_items",)
    _what = "value"

    def _check_value(self, f, value):  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def __init__(self, table, /):
        name, what = type(self).__name__, self._what
        items = tuple(table.items()) if hasattr(table, "items") else tuple(table)
        for pair in items:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{name}: expected a mapping {{filter: {what}}} or pairs "
                                f"(filter, {what}), got {pair!r}")
            self._check_value(*pair)
            _core.All(pair[0])  # TypeError for what is not a filter
        if not items:
            raise ValueError(f"{name}: give at least one {{filter: {what}}} entry")
        self._items = items

    @property
    def filters(self):
        return tuple(f for f, _ in self._items)

    def items(self):
        return self._items

    def __iter__(self):
        return iter(self.filters)

    def __len__(self):
        return len(self._items)

    def __eq__(self, other):
        return type(other) is type(self) and self._items == other._items

    def __hash__(self):
        return hash(self._items)

    def __repr__(self):
        body = ", ".join(f"{'...' if f is ... else repr(f)}: {v!r}" for f, v in self._items)
        return f"{type(self).__name__}({{{body}}})"


class StateAxes(_FilterTable):
    """Per-collection axes for a vmap argument holding Refs.

    ``StateAxes({"params": 0, ...: None})``: the Refs (and other leaves) of
    the argument that the first filter accepts are mapped over axis 0, the
    rest broadcast.  Keys are filters of tree_partition (evaluated by the
    C core, first match wins), values an int axis or None; a leaf that no
    filter accepts is an error (end with ``...: None`` to broadcast the
    rest).
    """

    __slots__ = ()
    _what = "axis"

    def __init__(self, axes, /):
        super().__init__(axes)

    def _check_value(self, f, ax):
        if not (ax is None or isinstance(ax, int) and not isinstance(ax, bool)):
            raise TypeError(f"StateAxes: the axis of filter {f!r} must be an int or None, "
                            f"not {ax!r}")

    @property
    def axes(self):
        return tuple(a for _, a in self._items)


def _is_axis_leaf(x):
    return x is None or isinstance(x, StateAxes)


def _state_axes_leaves(t, sa, subtree, where):
    """Per jax leaf of `subtree` (starting at flat leaf `base`): its axis."""
    filters, axes = sa.filters, sa.axes
    parts, _td = tree_partition(subtree, *filters)
    out = []
    for path in parts[0]:
        hit = next((i for i, p in enumerate(parts) if p[path] is not _core.NOTHING), None)
        if hit is None:  # a NOTHING leaf of the tree itself: no leaves
            continue
        leaf = parts[hit][path]
        n = len(jax.tree_util.tree_leaves(leaf))  # a Ref: 1, a Value: its value's, an Index: 0
        if hit == len(filters) and n:
            what = (f"the {type(leaf).__name__} (collection {leaf.collection!r})"
                    if isinstance(leaf, (Ref, _core.Deref)) else f"a {type(leaf).__name__}")
            raise ValueError(f"{t.prefix()}: {where} at {path} holds {what}, which no filter "
                             f"of {sa!r} accepts; add a filter for it (end with `...: None` to "
                             "broadcast the rest)")
        out.extend([axes[hit] if hit < len(filters) else None] * n)
    return out


def _vmap_axes(t, in_axes, args, kwargs):
    """Per flat leaf of (args, kwargs): its axis."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(in_axes, tuple):
        if len(in_axes) != len(args):
            raise ValueError(f"{t.prefix()}: in_axes has {len(in_axes)} entries but "
                             f"{len(args)} positional arguments were given; give one entry per "
                             "positional argument (or one int/None/StateAxes for all)")
        specs = list(in_axes)
    else:
        specs = [in_axes] * len(args)
    axes: list = []
    for i, (spec, arg) in enumerate(zip(specs, args, strict=True)):
        ax_leaves, ax_td = _tree_flatten(spec, is_leaf=_is_axis_leaf)
        try:
            subtrees = ax_td.flatten_up_to(arg)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{t.prefix()}: in_axes[{i}] is not a prefix of argument {i}'s "
                             f"structure: {e}") from None
        for ax, sub in zip(ax_leaves, subtrees, strict=True):
            n = len(_tree_flatten(sub)[0])
            if isinstance(ax, StateAxes):
                axes.extend(_state_axes_leaves(t, ax, sub, f"argument {i}"))
            elif ax is None or isinstance(ax, int) and not isinstance(ax, bool):
                axes.extend([ax] * n)
            else:
                raise TypeError(f"{t.prefix()}: in_axes entries must be ints, None or "
                                f"StateAxes, got {ax!r}")
    n_kw = len(_tree_flatten(kwargs)[0])
    axes.extend([0] * n_kw)  # jax.vmap's rule: keyword arguments are mapped over axis 0
    return axes


def _vmap_in(t, axes, axis_size):
    """Each Ref's axis (one per Ref; a Ref at two places with two axes is an
    error), each traced leaf's, and the mapped size check."""
    ref_axis: dict[int, tuple] = {}
    other_axes = []
    sizes = []  # (size, where)
    oi = 0
    for i, (p, ax) in enumerate(zip(t.pattern, axes, strict=True)):
        if p >= 0:
            seen = ref_axis.get(p)
            if seen is None:
                ref_axis[p] = (ax, i)
                if ax is not None:
                    for leaf in _tree_flatten(t.vals[p])[0]:
                        nd = np.ndim(leaf)
                        if not -nd <= ax < nd:
                            raise ValueError(
                                f"{t.prefix()}: in_axes maps {t.describe(p)} over axis {ax}, "
                                f"but its value has shape {tuple(np.shape(leaf))}")
                        sizes.append((np.shape(leaf)[ax], f"the Ref of {t.at(i)}"))
            elif seen[0] != ax:
                raise ValueError(
                    f"{t.prefix()}: one {type(t.refs[p]).__name__} is at {t.at(seen[1])} with "
                    f"axis {seen[0]} and at {t.at(i)} with axis {ax}; a Ref shared between "
                    "places must have one axis (give both places the same in_axes)")
        else:
            if not t.is_static[oi]:
                other_axes.append(ax)
                if ax is not None:
                    leaf = t.plain[oi]
                    nd = np.ndim(leaf)
                    if not -nd <= ax < nd:
                        raise ValueError(f"{t.prefix()}: in_axes maps {t.at(i)} over axis {ax}, "
                                         f"but it has shape {tuple(np.shape(leaf))}")
                    sizes.append((np.shape(leaf)[ax], t.at(i)))
            oi += 1
    want = {s for s, _ in sizes}
    if axis_size is not None:
        want.add(axis_size)
    if len(want) > 1:
        items = [f"{w} has size {s}" for s, w in sizes]
        if axis_size is not None:
            items.insert(0, f"axis_size is {axis_size}")
        raise ValueError(f"{t.prefix()}: the mapped axes have different sizes: "
                         + "; ".join(items[:4]) + ("; ..." if len(items) > 4 else ""))
    if not want:
        raise ValueError(f"{t.prefix()}: nothing is mapped (no in_axes entry maps a Ref or an "
                         "array); pass axis_size to say how many instances to make")
    return [ref_axis[k][0] for k in range(len(t.refs))], other_axes


def _stacked(out_axes):
    """new_spec for rebuild_out: a Ref made inside vmap declares the
    sharding of one member; its stacked value gets an unsharded entry at
    the stacked axis (out_axes: an int for every output, else the
    leading axis, refx.vmap's usual case)."""
    axis = out_axes if isinstance(out_axes, int) and not isinstance(out_axes, bool) else 0

    def new_spec(spec, value):
        if not isinstance(spec, tuple):
            return spec
        leaves = _tree_flatten(value)[0]
        ndim = np.ndim(leaves[0]) if leaves else 1
        return _sharding.stacked_spec(spec, axis, ndim)

    return new_spec


def vmap(fun, *, in_axes=0, out_axes=0, axis_name=None, axis_size=None, mutable=None):
    """jax.vmap for functions of trees of Refs.

    `in_axes` is an int, None or StateAxes for every positional argument,
    or a tuple with one entry per positional argument: an int/None for all
    of it, a StateAxes giving an axis (or None) per collection/filter, or a
    prefix tree of the argument with those at its leaves.  Keyword
    arguments are mapped over axis 0 (jax.vmap's rule).  Inside, `fun`
    sees new Refs holding one instance's value (mapped Refs) or the whole
    value (None).  After the call every Ref `fun` wrote holds its new
    value: stacked at its axis for a mapped Ref; writing a value that
    depends on the mapped axis into a broadcast (None) Ref is a ValueError
    naming it.  Refs made inside and returned come out as new Refs holding
    the stacked values, so ``refx.vmap(lambda k: MLP(k))(keys)`` makes one
    model whose Refs hold stacked values.  `out_axes` applies to the
    outputs (to a new Ref's value at its place), `axis_name` and
    `axis_size` are jax.vmap's.  `mutable`: a filter; only the Refs it
    accepts may be written (see refx.mutable).
    """
    if not callable(fun):
        raise TypeError(f"refx.vmap: fun must be callable, not {type(fun).__name__}")
    run = _with_mutable(fun, mutable, "refx.vmap")
    name = _name(fun)

    @functools.wraps(fun)
    def mapped(*args, **kwargs):
        out = _eager(key, args, kwargs)
        if out is not _UNCACHED:
            return out
        return _with_closures_of(once, args, kwargs)

    key = ("vmap", mapped, name)

    def once(closure, args, kwargs):
        t = Trees("vmap", name, [(args, kwargs)], [None], closure)
        axes = _vmap_axes(t, in_axes, args, kwargs) + [None] * len(closure)
        ref_axes, other_axes = _vmap_in(t, axes, axis_size)
        info: dict = {}

        def body(vals, traced):
            inner = t.lift(vals, traced)
            new, (a, kw) = inner.refs, inner.trees[0]
            out = _run_inner(t, inner, run, *a, **kw)
            written = _written(t, inner)
            for k in written:
                if ref_axes[k] is None and _compat.is_batched(new[k].value):
                    raise ValueError(
                        f"{t.prefix()}: fun wrote {t.describe(k)}, which is broadcast (in_axes "
                        "None), with a value that depends on the mapped axis; a broadcast Ref "
                        "holds one value for all instances: map it (an int axis, or a "
                        "StateAxes entry for its collection) or write an unmapped value")
            info["written"] = written
            spec, td, payload = _plan(out, new)
            info["out"] = (spec, td)
            return [r.value for r in new], payload

        body.__name__ = body.__qualname__ = f"refx_vmap({name})"
        vals_out, payload = jax.vmap(body, in_axes=(ref_axes, other_axes),
                                     out_axes=(ref_axes, out_axes), axis_name=axis_name,
                                     axis_size=axis_size)(t.vals, t.traced)
        out = rebuild_out(*info["out"], payload, t.refs, _stacked(out_axes))
        written = info["written"]
        t.write(written, [vals_out[k] for k in written])
        return out

    return mapped


_MAKERS["vmap"] = lambda mapped, name: _eager_jit("refx.vmap", name, mapped)


# --------------------------------------------------------------------------
# scan
# --------------------------------------------------------------------------


def scan(fun, init, xs=None, length=None, *, reverse=False, unroll=1, mutable=None):
    """jax.lax.scan for a carry and xs holding Refs: fun(carry, x) -> (carry, y).

    Refs in the carry (at any depth: a whole model) may be read and written
    in the body; each iteration sees the previous one's writes, and after
    the call the caller's Refs hold the last values.  The body must return
    the carry it was given (the same Refs at the same places) and keep each
    Ref's shape and dtype (a ValueError names the Ref otherwise).  Refs in
    `xs` are scanned over their leading axis: the body sees a Ref holding
    the slice, and what it writes there is written back stacked.  A Ref may
    not be in both.  Returns (carry, ys) with the caller's own Refs in the
    carry; Refs made in the body and returned in y come out as new Refs
    holding the stacked values.  `mutable`: a filter; only the Refs it
    accepts may be written (see refx.mutable).
    """
    if not callable(fun):
        raise TypeError(f"refx.scan: fun must be callable, not {type(fun).__name__}")
    # the types too: unroll=True (all) is not unroll=1, though they are ==
    out = _eager(("scan", fun, length, type(length), reverse, unroll, type(unroll), mutable),
                 (init, xs))
    if out is not _UNCACHED:
        return out
    return _scan(fun, init, xs, length, reverse, unroll, mutable)


def _scan(fun, init, xs, length, reverse, unroll, mutable):
    """refx.scan, traced (not through the eager cache)."""
    name = _name(fun)
    run = _with_mutable(fun, mutable, "refx.scan")

    def once(closure):
        t = Trees("scan", name, [init, xs], ["init", "xs"], closure)
        nc = len({p for p in t.parts[0][3] if p >= 0})
        for i, p in enumerate(t.parts[1][3]):
            if 0 <= p < nc:
                raise ValueError(f"{t.prefix()}: {t.describe(p)} is also in xs, at "
                                 f"{t.at(t.parts[1][4] + i)}; a Ref is either carried or "
                                 "scanned over, not both")
        c = _Carry(t, "scan", "init")
        xset = set(c.x_ks)
        has_xs = bool(t.parts[1][5] - t.parts[1][4])
        info: dict = {}

        def body(carry, x):
            inner = c.enter(carry, x)
            new = inner.refs
            carry_in, xt = inner.trees[:2]
            with t.capturing(inner):
                out = run(carry_in, xt)
            carry_out, y = _pair("scan", name, out)
            nxt = c.leave(inner, carry_out)
            xw = [k for k in inner.written_ks if k in xset]
            info["xs_written"] = xw
            spec, td, payload = _plan(y, new)
            info["y"] = (spec, td)
            return nxt, ([new[k].value for k in xw], payload)

        body.__name__ = body.__qualname__ = f"refx_scan({name})"
        xs_in = ([t.vals[k] for k in c.x_ks], c.x_traced) if has_xs else None
        final, (xw_vals, payload) = jax.lax.scan(body, c.init(), xs_in, length=length,
                                                 reverse=reverse, unroll=unroll)
        carry, written, wvals = c.result(final)
        ys = rebuild_out(*info["y"], payload, t.refs)
        xw = info["xs_written"]
        t.write(written + xw, wvals + list(xw_vals))
        return carry, ys

    return with_closures(once)


def _make_scan(fun, length, _lt, reverse, unroll, _ut, mutable):
    return _eager_jit("refx.scan", _name(fun), lambda init, xs: _scan(
        fun, init, xs, length, reverse, unroll, mutable))


_MAKERS["scan"] = _make_scan


# --------------------------------------------------------------------------
# fori_loop / while_loop
# --------------------------------------------------------------------------


def fori_loop(lower, upper, body_fun, init_val, *, unroll=None):
    """jax.lax.fori_loop with Refs in init_val: body_fun(i, val) -> val.

    As refx.scan's carry: each iteration sees the previous one's writes,
    the body returns the carry it was given (the same Refs at the same
    places) with each Ref's shape and dtype kept, and after the call the
    caller's Refs hold the last iteration's values.  Returns init_val's
    structure with the caller's Refs.
    """
    if not callable(body_fun):
        raise TypeError(f"refx.fori_loop: body_fun must be callable, not "
                        f"{type(body_fun).__name__}")
    if type(lower) is int and type(upper) is int:  # bounds stay static (a scan)
        out = _eager(("fori_loop", body_fun, lower, upper, unroll, type(unroll)), (init_val,))
        if out is not _UNCACHED:
            return out
    return _fori_loop(lower, upper, body_fun, init_val, unroll)


def _fori_loop(lower, upper, body_fun, init_val, unroll):
    name = _name(body_fun)

    def once(closure):
        t = Trees("fori_loop", name, [init_val], ["init_val"], closure)
        c = _Carry(t, "fori_loop", "init_val")

        def body(i, carry):
            inner = c.enter(carry)
            with t.capturing(inner):
                out = body_fun(i, inner.trees[0])
            return c.leave(inner, out)

        body.__name__ = body.__qualname__ = f"refx_fori_loop({name})"
        kw = {} if unroll is None else {"unroll": unroll}
        final = jax.lax.fori_loop(lower, upper, body, c.init(), **kw)
        carry, written, wvals = c.result(final)
        t.write(written, wvals)
        return carry

    return with_closures(once)


_MAKERS["fori_loop"] = lambda body_fun, lower, upper, unroll, _ut: _eager_jit(
    "refx.fori_loop", _name(body_fun),
    lambda v: _fori_loop(lower, upper, body_fun, v, unroll))


def while_loop(cond_fun, body_fun, init_val):
    """jax.lax.while_loop with Refs in init_val.

    cond_fun(val) -> bool may read the Refs (writing one is a ValueError:
    JAX keeps nothing cond_fun computes but the bool); body_fun(val) -> val
    as refx.fori_loop's body.  After the call the caller's Refs hold the
    last iteration's values.
    """
    if not (callable(cond_fun) and callable(body_fun)):
        for what, f in (("cond_fun", cond_fun), ("body_fun", body_fun)):
            if not callable(f):
                raise TypeError(f"refx.while_loop: {what} must be callable, not "
                                f"{type(f).__name__}")
    out = _eager(("while_loop", cond_fun, body_fun), (init_val,))
    if out is not _UNCACHED:
        return out
    return _while_loop(cond_fun, body_fun, init_val)


def _while_loop(cond_fun, body_fun, init_val):
    name = _name(body_fun)

    def once(closure):
        t = Trees("while_loop", name, [init_val], ["init_val"], closure)
        c = _Carry(t, "while_loop", "init_val")

        def cond(carry):
            inner = c.enter(carry)
            with t.capturing(inner):
                r = cond_fun(inner.trees[0])
            inner.check_structure(t.prefix())
            for k in inner.written(t.prefix(), t.where):
                raise ValueError(f"{t.prefix()}: cond_fun ({_name(cond_fun)}) wrote "
                                 f"{t.describe(k)}; cond_fun may read Refs, not write them "
                                 "(write in body_fun)")
            return r

        def body(carry):
            inner = c.enter(carry)
            with t.capturing(inner):
                out = body_fun(inner.trees[0])
            return c.leave(inner, out)

        cond.__name__ = cond.__qualname__ = f"refx_while_cond({_name(cond_fun)})"
        body.__name__ = body.__qualname__ = f"refx_while_body({name})"
        final = jax.lax.while_loop(cond, body, c.init())
        carry, written, wvals = c.result(final)
        t.write(written, wvals)
        return carry

    return with_closures(once)


_MAKERS["while_loop"] = lambda cond_fun, body_fun: _eager_jit(
    "refx.while_loop", _name(body_fun), lambda v: _while_loop(cond_fun, body_fun, v))


# --------------------------------------------------------------------------
# remat
# --------------------------------------------------------------------------


def remat(fun=None, /, *, policy=None, prevent_cse=True, static_argnums=(), static_argnames=()):
    """jax.checkpoint (remat) for functions of trees of Refs.

    Gradients through refx.remat(f) equal those through f; the forward
    pass is recomputed in the backward pass instead of stored (`policy`
    says what may be saved; see jax.checkpoint_policies).  Refs written
    inside are written back after the call, all or nothing.  Arguments at
    `static_argnums` and keyword arguments named in `static_argnames` are
    passed as they are (not traced): a method's ``train=`` flag, say.  Usable as
    ``@refx.remat`` and ``@refx.remat(policy=...)``.
    """
    if fun is None:
        return functools.partial(remat, policy=policy, prevent_cse=prevent_cse,
                                 static_argnums=static_argnums, static_argnames=static_argnames)
    if not callable(fun):
        raise TypeError(f"refx.remat: fun must be callable, not {type(fun).__name__}")
    snums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    for s in snums:
        if not isinstance(s, int) or isinstance(s, bool):
            raise TypeError(f"refx.remat: static_argnums must hold ints, got {s!r}")
    snames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    for s in snames:
        if not isinstance(s, str):
            raise TypeError(f"refx.remat: static_argnames must hold strs, got {s!r}")
    name = _name(fun)

    @functools.wraps(fun)
    def rematted(*args, **kwargs):
        if not (snums or snames) or not _static_leaves(args, kwargs, snums, snames):
            out = _eager(key, args, kwargs)
            if out is not _UNCACHED:
                return out
        return traced(args, kwargs)

    def traced(args, kwargs):
        n = len(args)
        static = {s % n if -n <= s < n else s for s in snums}
        bad = [s for s in snums if not -n <= s < n]
        if bad:
            raise TypeError(f"refx.remat({name}): static_argnums {bad} but {n} positional "
                            "arguments were given")
        # static arguments are not looked into: None (no leaves) holds their place
        dyn = tuple(None if i in static else a for i, a in enumerate(args))
        skw = {k: v for k, v in kwargs.items() if k in snames}
        kwargs = {k: v for k, v in kwargs.items() if k not in snames}
        return _with_closures_of(once, args, dyn, kwargs, skw, static)

    def once(closure, args, dyn, kwargs, skw, static):
        t = Trees("remat", name, [(dyn, kwargs)], [None], closure)
        info: dict = {}

        def body(vals, traced):
            inner = t.lift(vals, traced)
            new, (a, kw) = inner.refs, inner.trees[0]
            full = [args[i] if i in static else x for i, x in enumerate(a)]
            out = _run_inner(t, inner, fun, *full, **kw, **skw)
            written = _written(t, inner)
            info["written"] = written
            spec, td, payload = _plan(out, new)
            info["out"] = (spec, td)
            return [new[k].value for k in written], payload

        body.__name__ = body.__qualname__ = f"refx_remat({name})"
        wvals, payload = jax.checkpoint(body, prevent_cse=prevent_cse,
                                        policy=policy)(t.vals, t.traced)
        out = rebuild_out(*info["out"], payload, t.refs)
        t.write(info["written"], wvals)
        return out

    key = ("remat", rematted, snums, snames, name)
    return rematted


_MAKERS["remat"] = lambda rematted, snums, snames, name: _eager_jit(
    "refx.remat", name, rematted, static_argnums=snums, static_argnames=snames)


# --------------------------------------------------------------------------
# cond / switch
# --------------------------------------------------------------------------


def _branches(kind, labels, funs, operands, closure):
    """The branch functions for jax.lax.switch/cond, and the finish."""
    names = [_name(f) for f in funs]
    t = Trees(kind, " / ".join(names), [operands], ["operands"], closure)
    seen: list = []  # per traced branch: (label, avals of every Ref, out plan)
    written_any: set[int] = set()

    def make(b):
        fn, label = funs[b], f"{labels[b]} ({names[b]})"

        def branch(vals, traced):
            inner = t.lift(vals, traced)
            new, ops = inner.refs, inner.trees[0]
            out = _run_inner(t, inner, fn, *ops)
            outs = [r.value for r in new]
            written = _written(t, inner)
            avals = [_aval(v) for v in outs]
            spec, td, payload = _plan(out, new)
            for other, oavals, oplan in seen:
                for k, (a, o) in enumerate(zip(avals, oavals, strict=True)):
                    if a != o:
                        raise ValueError(
                            f"{t.prefix()}: {label} leaves {t.describe(k)} as {_fmt(a)} but "
                            f"{other} as {_fmt(o)}; a Ref must have the same shape and dtype "
                            "after every branch (a branch that does not write it leaves it as "
                            "it was)")
                if oplan != (spec, td):
                    raise ValueError(
                        f"{t.prefix()}: {label} returns {_describe_plan(t, spec, td)} but "
                        f"{other} {_describe_plan(t, *oplan)}; every branch must return the "
                        "same Refs at the same places (new Refs of the same class and "
                        "collection, or the same operand Refs)")
            seen.append((label, avals, (spec, td)))
            written_any.update(written)
            return outs, payload

        branch.__name__ = branch.__qualname__ = f"refx_{kind}_branch({names[b]})"
        return branch

    def finish(outs, payload):
        spec, td = seen[-1][2]
        out = rebuild_out(spec, td, payload, t.refs)
        written = sorted(written_any)
        t.write(written, [outs[k] for k in written])
        return out

    return t, [make(b) for b in range(len(funs))], finish


def _static_leaves(args, kwargs, snums, snames):
    """Does a static argument of remat hold what refx.jit would refuse as
    static (an unhashable value)?"""
    n = len(args)
    for i in snums:
        if -n <= i < n:
            try:
                hash(args[i])
            except TypeError:
                return True
    for k in snames:
        if k in kwargs:
            try:
                hash(kwargs[k])
            except TypeError:
                return True
    return False


def _describe_plan(t, spec, td):
    if spec is None:
        return f"no Ref (structure {td})" if td is not None else "no Ref"
    items = []
    for i, s in enumerate(spec):
        if type(s) is int:
            items.append(f"leaf {i}: the Ref of {t.where(s)}")
        elif isinstance(s, Ref):
            items.append(f"leaf {i}: a Ref closed over")
        elif isinstance(s, tuple):
            items.append(f"leaf {i}: a new {getattr(s[1], '__name__', 'Ref')} (collection "
                         f"{s[2]!r})")
    return "outputs with " + (", ".join(items) if items else "no Ref") + f" (structure {td})"


def cond(pred, true_fun, false_fun, *operands):
    """jax.lax.cond for operands holding Refs.

    Each branch sees new Refs holding the operands' values.  After the
    call, a Ref written in either branch holds the taken branch's value
    (the other branch leaves it as it was); Refs must keep the same shape
    and dtype across branches, and both branches must return the same Refs
    at the same places (a ValueError names the Ref otherwise).
    """
    if not (callable(true_fun) and callable(false_fun)):
        for what, f in (("true_fun", true_fun), ("false_fun", false_fun)):
            if not callable(f):
                raise TypeError(f"refx.cond: {what} must be callable, not {type(f).__name__}")
    out = _eager(("cond", true_fun, false_fun), (pred, *operands))
    if out is not _UNCACHED:
        return out
    return _cond(pred, true_fun, false_fun, operands)


def _cond(pred, true_fun, false_fun, operands):
    def once(closure):
        t, (tb, fb), finish = _branches("cond", ["true_fun", "false_fun"],
                                        [true_fun, false_fun], operands, closure)
        outs, payload = jax.lax.cond(pred, tb, fb, t.vals, t.traced)
        return finish(outs, payload)

    return with_closures(once)


_MAKERS["cond"] = lambda true_fun, false_fun: _eager_jit(
    "refx.cond", f"{_name(true_fun)} / {_name(false_fun)}",
    lambda p, *ops: _cond(p, true_fun, false_fun, ops))


def switch(index, branches, *operands):
    """jax.lax.switch for operands holding Refs: `branches[index](*operands)`
    (index clamped to the range, as jax.lax.switch does).  Writes and
    checks as refx.cond's."""
    branches = list(branches)
    if not branches:
        raise ValueError("refx.switch: branches must hold at least one function")
    for i, f in enumerate(branches):
        if not callable(f):
            raise TypeError(f"refx.switch: branches[{i}] must be callable, not "
                            f"{type(f).__name__}")
    out = _eager(("switch", tuple(branches)), (index, *operands))
    if out is not _UNCACHED:
        return out
    return _switch(index, branches, operands)


def _switch(index, branches, operands):
    def once(closure):
        t, fns, finish = _branches("switch", [f"branches[{i}]" for i in range(len(branches))],
                                   branches, operands, closure)
        outs, payload = jax.lax.switch(index, fns, t.vals, t.traced)
        return finish(outs, payload)

    return with_closures(once)


def _make_switch(branches):
    branches = list(branches)
    return _eager_jit("refx.switch", " / ".join(_name(f) for f in branches),
                      lambda i, *ops: _switch(i, branches, ops))


_MAKERS["switch"] = _make_switch


__all__ = ["StateAxes", "cond", "fori_loop", "remat", "scan", "switch", "vmap", "while_loop"]
