"""The lift: how every refx transform carries trees of Refs into a JAX
transform and the writes back out.  One module, used by refx.jit and
jit_partial (_jit.py), grad and value_and_grad (_grad.py), and vmap, scan,
remat, cond/switch and the loops (_control.py).

A call of a transform, in order:

  number     the Refs of the trees the transform takes (the arguments, or
             init and xs, or the operands) are numbered in leaf order, one
             number per distinct Ref: the sharing pattern (``Trees``).
  read       every numbered Ref's value is read at one moment (one C pass:
             another thread's write lands before or after, never between).
             A value JAX cannot trace (a str inside a Ref) is a TypeError
             naming the Ref's place, before anything runs.
  lift       inside the JAX transform, new Refs of its trace hold the
             (traced) values, with each Ref's class, collection and
             metadata (its *spec*), and the trees are rebuilt around them
             (``Inner``).  A Ref whose value is a container (a dict, an
             optax state) gets a container of its own: an in-place change
             made by `fun` never reaches the caller's object.
  run        `fun` runs on the rebuilt trees.
  written    a Ref is written if its value was rebound OR changed in place
             (its value's structure, or any leaf, is not what it was
             given): both are what eager code would see (``Inner.written``).
             A Ref's attributes or metadata are fixed by the trace (they
             are part of the cache key): changing them inside is a
             ValueError, and so is a written value JAX cannot return (a
             str, a Ref), naming the Ref's place.
  structure  the trees `fun` was given must keep their structure: a Ref
             added to a dict argument, or an attribute set on a node of
             it, would be dropped by the transform, so it is a ValueError
             naming the path (``Inner.check_structure``).
  plan       the output tree is described by one plan (``plan_out``): per
             leaf, a plain value, the caller's Ref number k, a Ref closed
             over, a leaf JAX cannot trace (``Const``) or a Ref made inside.
  write back after the JAX transform: all or nothing, through the C core's
             one write check (trace level, refx.mutable), whose refusal is
             data (``_core._WriteRefused``: position and reason), turned
             into one message here (``refusal``).

Every check that can fail runs before the write-back; the write-back is
the last step of a call.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

from . import _compat, _core
from ._core import Ref

_tree_flatten = jax.tree_util.tree_flatten
_flatten_with_path = jax.tree_util.tree_flatten_with_path


def name_of(fun) -> str:
    return getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or repr(fun)


def key_str(k) -> str:
    for field in ("idx", "key", "name"):
        if hasattr(k, field):
            return str(getattr(k, field))
    return str(k)


def traceable(x) -> bool:
    """Can JAX take `x` as a leaf?  A Ref cannot (its __jax_array__ is for
    array code, not for a transform's inputs and outputs)."""
    if isinstance(x, Ref):
        return False
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) or hasattr(
        x, "__jax_array__")


_LEAF_TYPES = (jax.Array, np.ndarray, np.generic, int, float, complex)


def _is_plain_leaf(v) -> bool:
    """A value with no container of its own (an array, a scalar, a tracer)."""
    return isinstance(v, _LEAF_TYPES) or v is None


def number_refs(leaves):
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


def fresh(v):
    """`v` with containers of its own (its leaves shared)."""
    if _is_plain_leaf(v):
        return v
    return jax.tree_util.tree_map(lambda x: x, v)


def make_refs(values, colls, specs):
    """New Refs of the current trace holding `values` (no __init__ call)."""
    return _core._make_refs(list(values), tuple(colls), tuple(specs))


# --------------------------------------------------------------------------
# refusals: the C core's one write check, one message
# --------------------------------------------------------------------------


def refusal(e, prefix, what, where):
    """The ValueError for a write the core refused (`e`, a _WriteRefused
    of the Ref at `where` that `prefix` (e.g. "refx.scan(body)") `what`
    (e.g. "wrote")."""
    reason = getattr(e, "reason", None)
    msg = e.args[0] if e.args else str(e)
    if reason == "mutable":
        return ValueError(f"{msg} ({prefix} {what} the Ref of {where}); nothing was written")
    if reason == "trace":
        return ValueError(f"Cannot mutate Ref from a different trace level: {prefix} {what} "
                          f"the Ref of {where}, which belongs to another JAX trace than the "
                          "call's; nothing was written (pass the Refs a function writes to it "
                          "as arguments)")
    return ValueError(f"{msg} ({prefix} {what} the Ref of {where}); nothing was written")


def write_back(refs, values, place, prefix, what="wrote"):
    """Write values[j] into refs[j], all or nothing; `place(j)` says where
    Ref j sits, for the message of a refused write."""
    if not refs:
        return
    try:
        _core._write_refs(list(refs), list(values))
    except _core._WriteRefused as e:
        raise refusal(e, prefix, what, place(e.position)) from None


# --------------------------------------------------------------------------
# closed-over Refs
# --------------------------------------------------------------------------
#
# While a transform traces `fun`, a Capture frame is on this thread's stack
# and the C core asks `capture_hook` about every read and write of a Ref
# that is not of the current trace (ref.c, "Closed-over Refs").  A Ref of
# the trace, or of a trace inside it, is nothing special.  A Ref of a trace
# enclosing the transform's is closed over: the first trace records it
# (`found`; a write cannot be done in that trace, so it stops the trace at
# once) and the transform is traced again with it as a hidden input, whose
# stand-in (`subs`) the reads and writes then reach: its traced value, and
# a write written back after the call like an argument's.  The Refs the
# transform takes as arguments have stand-ins too, so a Ref passed and
# closed over is one Ref.

_local = threading.local()


class Rediscover(BaseException):  # noqa: N818 - a signal, not an error
    """The trace found closed-over Refs it has no stand-in for: trace again
    with them as hidden inputs.  A BaseException, so that user code's
    ``except Exception`` cannot swallow it."""

    def __init__(self, refs):
        super().__init__(refs)
        self.refs = refs


class Capture:
    __slots__ = ("trace", "subs", "found", "born")

    def __init__(self, subs):
        probe = make_refs([None], (None,), (Ref,))[0]
        self.trace = _core._ref_trace(probe)  # the transform's trace
        self.born = _core._ref_serial(probe)  # Refs made later are never captured
        self.subs = subs  # outer Ref -> its stand-in in this trace
        self.found = {}  # closed-over Refs without a stand-in, in order


def _stack():
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def capture_hook(ref, writing, value):
    """The C core's hook (installed by _wiring): the stand-in of `ref` (whose
    own value is `value`) in the innermost capturing trace of this thread,
    or None.  A closed-over Ref met for the first time gets a stand-in of
    this trace holding its value (a container of its own): the rest of the
    trace reads and writes that, so one trace finds every closed-over Ref
    and no in-place change reaches the caller's object; the transform is
    then traced again with them as hidden inputs."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return None
    f = stack[-1]
    inner = f.subs.get(ref)
    if inner is not None:
        return inner
    rt = _core._ref_trace(ref)
    if rt is f.trace or rt is None or _core._ref_serial(ref) > f.born:
        return None  # a Ref of this trace, or made while fun runs
    outer, trace = rt(), f.trace()
    if outer is None or trace is None or _compat._encloses(trace, outer):
        return None  # a finished trace's Ref, or one of a trace inside this one
    if not (_compat._encloses(outer, trace) or isinstance(outer, _compat._EvalTrace)
            or any(rt is g.trace for g in stack[:-1])):
        return None  # no link either way (older JAX's jit traces): as before
    f.found.setdefault(ref)
    tmp = make_refs([fresh(value)], (ref.collection,), (_core._ref_spec(ref),))[0]
    f.subs[ref] = tmp
    return tmp


def stand_in(ref):
    """`ref` itself, or its stand-in when a capturing trace closes over it
    (for transforms nested inside another: they take the stand-in)."""
    if not getattr(_local, "stack", None):
        return ref
    inner = capture_hook(ref, False, _core.deref([ref])[0].value)
    return ref if inner is None else inner


class capturing:  # noqa: N801 - used as a context manager
    """``with capturing(subs) as f:`` run `fun` with closed-over Refs
    captured; on leaving without an error, Rediscover if `f.found`.

    `named` (refs, where, prefix): a refx.mutable refusal of a write to
    refs[k] while `fun` traces is re-raised naming where(k)."""

    __slots__ = ("frame", "named", "rediscover")

    def __init__(self, subs, named=None, rediscover=True):
        self.frame = Capture(subs)
        self.named = named
        self.rediscover = rediscover  # False: stand-ins only (refx.eval_shape)

    def __enter__(self):
        _stack().append(self.frame)
        _core._capture_depth(1)
        return self.frame

    def __exit__(self, et, ev, tb):
        _stack().pop()
        _core._capture_depth(-1)
        if et is None and self.frame.found and self.rediscover:
            raise Rediscover(list(self.frame.found))
        if et is not None and et is not Rediscover and self.frame.found and self.rediscover:
            # the first trace may fail because a closed-over Ref's write was
            # not seen: trace again with it before reporting anything
            raise Rediscover(list(self.frame.found)) from ev
        ref = getattr(ev, "ref", None) if isinstance(ev, _core._WriteRefused) else None
        if ref is not None and self.named is not None:
            refs, where, prefix = self.named
            for k, r in enumerate(refs):
                if r is ref:
                    raise refusal(ev, prefix, "wrote", where(k)) from None
        return False


def with_closures(run):
    """Call run(closure) with the closed-over Refs found so far, until a
    trace finds no new one."""
    closure: list = []
    for _ in range(64):
        try:
            return run(tuple(closure))
        except Rediscover as e:
            new = [r for r in e.refs if not any(r is c for c in closure)]
            if not new:
                raise RuntimeError("refx: a trace asked for closed-over Refs it was "
                                   "given") from None  # pragma: no cover - a refx bug
            closure.extend(new)
    raise RuntimeError("refx: closed-over Refs kept appearing")  # pragma: no cover


# --------------------------------------------------------------------------
# the trees of one call
# --------------------------------------------------------------------------


class Trees:
    """Some trees (the arguments, or init and xs) flattened with one
    numbering of their Refs.

    refs    distinct Refs in leaf order; vals their values (read at one
            moment), colls/specs what rebuilds them in a trace
    parts   per tree: (label, tree, treedef, pattern, start, stop) where
            pattern[i] is leaf i's Ref number or -1, and start:stop its
            range in the flat leaf list
    traced  the other leaves JAX can trace, in order (the transform's
            inputs); static ones (a str, a function) are closed over
    """

    def __init__(self, kind, name, trees, labels, closure=()):
        self.kind, self.name = kind, name
        self.parts = []
        leaves = []
        if closure:  # hidden inputs: the Refs fun closes over
            trees, labels = [*trees, list(closure)], [*labels, "closure"]
        for label, tree in zip(labels, trees, strict=True):
            ls, td = _tree_flatten(tree)
            self.parts.append([label, tree, td, None, len(leaves), len(leaves) + len(ls)])
            leaves.extend(ls)
        self.originals = ()  # the Refs the stand-ins stand for
        if getattr(_local, "stack", None):  # inside a capturing trace
            subst = [stand_in(x) if isinstance(x, Ref) else x for x in leaves]
            if any(a is not b for a, b in zip(subst, leaves, strict=True)):
                self.originals = tuple(zip(leaves, subst, strict=True))
                leaves = subst
        self.refs, pattern = number_refs(leaves)
        for part in self.parts:
            part[3] = pattern[part[4]:part[5]]
        self.pattern = pattern
        others = [x for x, p in zip(leaves, pattern, strict=True) if p < 0]
        self.is_static = [not traceable(x) for x in others]
        self.plain = others  # every leaf that is not a Ref
        self.traced = [x for x, s in zip(others, self.is_static, strict=True) if not s]
        self.vals = [v.value for v in _core.deref(self.refs)]  # one moment
        self.colls = tuple(r.collection for r in self.refs)
        self.specs = tuple(_core._ref_spec(r) for r in self.refs)
        for k, v in enumerate(self.vals):
            for leaf in _tree_flatten(v)[0]:
                if not traceable(leaf):
                    raise TypeError(f"{self.prefix()}: the Ref of {self.where(k)} holds a "
                                    f"{type(leaf).__name__}, which JAX cannot trace; keep "
                                    "arrays (or pytrees of them) in Refs")

    def prefix(self):
        return f"refx.{self.kind}({self.name})"

    # -- where things are, for messages

    def leaf_path(self, i):
        """(label, path) of flat leaf i."""
        for label, tree, _td, _pat, a, b in self.parts:
            if a <= i < b:
                keys = _flatten_with_path(tree)[0][i - a][0]
                return label, tuple(key_str(key) for key in keys)
        raise AssertionError(i)  # pragma: no cover

    def at(self, i):
        label, path = self.leaf_path(i)
        return place_name(label, path)

    def where(self, k):
        """Where Ref k first sits, e.g. "argument 0 at ('enc', 'w')"."""
        return self.at(self.pattern.index(k))

    def describe(self, k):
        r = self.refs[k]
        return f"the {type(r).__name__} of {self.where(k)} (collection {r.collection!r})"

    # -- inside the transform

    def others(self, traced):
        """All non-Ref leaves, the traced ones from `traced`."""
        it = iter(traced)
        return [next(it) if not s else x
                for x, s in zip(self.plain, self.is_static, strict=True)]

    def lift(self, vals, traced, parts=None):
        """New Refs of the current trace holding `vals`, and the trees."""
        inner = Inner(vals, self.colls, self.specs)
        inner.rebuild(self.parts if parts is None else parts, self.others(traced))
        return inner

    def capturing(self, inner, rediscover=True):
        """The capture frame to run `fun` in: every Ref of the call (the
        arguments' and the closed-over ones) stands for its new Ref."""
        subs = dict(zip(self.refs, inner.refs, strict=True))
        for orig, sub in self.originals:  # closed over by name, passed as a stand-in
            if isinstance(orig, Ref):
                subs[orig] = subs[sub]
        return capturing(subs, (inner.refs, self.where, self.prefix()), rediscover)

    # -- after it

    def write(self, written, values, what="wrote"):
        """Write values[j] into Ref written[j], all or nothing."""
        write_back([self.refs[k] for k in written], values,
                   lambda j: self.where(written[j]), self.prefix(), what)


def build(parts, refs, others):
    """[(tree, its leaves)] of `parts` (Trees.parts) with Refs `refs` and
    the other leaves `others`."""
    it = iter(others)
    out = []
    for part in parts:
        td, pat = part[2], part[3]
        leaves = [refs[p] if p >= 0 else next(it) for p in pat]
        out.append((td.unflatten(leaves), leaves))
    return out


def place_name(label, path):
    """"argument 0 at ('enc', 'w')" for a leaf at `path` of the tree `label`
    names (None: the (args, kwargs) of a call)."""
    if label is None:
        if len(path) < 2:
            return "the arguments" if path[:1] != ("1",) else "the keyword arguments"
        if path[0] == "1":
            return f"keyword argument {path[1]!r}" + (f" at {path[2:]}" if path[2:] else "")
        label, path = f"argument {path[1]}", path[2:]
    elif label == "operands":
        if not path:
            return "the operands"
        label, path = f"operand {path[0]}", path[1:]
    elif label == "closure":
        return "a Ref closed over by fun"
    return label + (f" at {path}" if path else "")


class Inner:
    """The Refs of one trace of `fun` and the trees rebuilt around them.

    refs    new Refs of the current trace (one per numbered Ref)
    given   the value each was given (containers of its own, see fresh)
    leaves  per Ref: None for a plain value, else (treedef, leaves) of
            the container it was given: what `written` compares against
    trees   the rebuilt trees, and what they were built from (to check
            that `fun` kept their structure)
    """

    __slots__ = ("refs", "given", "leaves", "specs", "trees", "_built", "written_ks")

    def __init__(self, vals, colls, specs):
        given = [fresh(v) for v in vals]
        self.refs = make_refs(given, colls, specs)
        self.given = given
        self.specs = specs
        self.leaves = [None if _is_plain_leaf(v) else _tree_flatten(v)[::-1] for v in given]
        self.trees = []
        self._built = []
        self.written_ks = ()  # what a loop body wrote (set by _control's _Carry)

    def rebuild(self, parts, others):
        for part, (tree, leaves) in zip(parts, build(parts, self.refs, others), strict=True):
            self.trees.append(tree)
            self._built.append((part[0], part[2], leaves))
        return self.trees

    def before(self, k):
        """Ref k's value as it was given (its container rebuilt: `fun` may
        have changed the one it was given in place)."""
        if self.leaves[k] is None:
            return self.given[k]
        td, leaves = self.leaves[k]
        return td.unflatten(leaves)

    def changed(self, k):
        """Was Ref k rebound or changed in place?"""
        v = self.refs[k].value
        if v is not self.given[k]:
            return True
        before = self.leaves[k]
        if before is None:
            return False
        leaves, td = _tree_flatten(v)
        return td != before[0] or any(a is not b for a, b in
                                      zip(leaves, before[1], strict=True))

    def written(self, prefix, where, exclude=()):
        """Numbers of the Refs `fun` wrote (rebound or changed in place).

        ValueError if `fun` changed a Ref's attributes or metadata (they
        are fixed by the trace), TypeError if it wrote a value JAX cannot
        return; `where(k)` names Ref k's place."""
        out = []
        for k, r in enumerate(self.refs):
            spec = _core._ref_spec(r)
            if spec != self.specs[k]:
                raise ValueError(
                    f"{prefix}: fun changed the attributes or metadata of the "
                    f"{type(r).__name__} of {where(k)} (collection {r.collection!r}); they are "
                    "fixed when the transform traces (part of its cache key) and would be "
                    "dropped: change them outside the transform")
            if k in exclude or not self.changed(k):
                continue
            for leaf in _tree_flatten(r.value)[0]:
                if not (traceable(leaf) or isinstance(leaf, jax.core.Tracer)):
                    raise TypeError(
                        f"{prefix}: fun wrote a {type(leaf).__name__} into the "
                        f"{type(r).__name__} of {where(k)} (collection {r.collection!r}), "
                        "which JAX cannot return from a transform; a Ref written inside a "
                        "transform must hold arrays (or pytrees of them)")
            out.append(k)
        return out

    def check_structure(self, prefix, names=None):
        """ValueError if `fun` changed the structure of a tree it was given
        (a Ref added to or removed from a container, an attribute set on a
        node): the transform would drop the change.  names(label, path)
        names a place."""
        names = names or place_name
        for tree, (label, td, leaves) in zip(self.trees, self._built, strict=True):
            now, td2 = _tree_flatten(tree)
            if td2 == td and all(a is b for a, b in zip(now, leaves, strict=True)):
                continue
            before = dict(_paths(td.unflatten(leaves)))
            after = dict(_paths(tree))
            added = [p for p in after if p not in before]
            removed = [p for p in before if p not in after]
            replaced = [p for p in after if p in before and after[p] is not before[p]]
            if added:
                how, p = "added a leaf at", added[0]
            elif removed:
                how, p = "removed the leaf at", removed[0]
            elif replaced:
                how, p = "replaced the leaf at", replaced[0]
            else:
                how, p = "changed the structure (a node's static data) of", ()
            raise ValueError(
                f"{prefix}: fun {how} {names(label, p)}; a transform cannot carry a change "
                "of its arguments' structure out of its trace, so it would be lost: build the "
                "new structure outside the transform (or return it), and write only Ref "
                "values inside")


def _paths(tree):
    return [(tuple(key_str(k) for k in path), leaf) for path, leaf in
            _flatten_with_path(tree)[0]]


# --------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------


class Const:
    """A leaf JAX cannot trace, kept out of a transform's outputs."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is Const and (self.value is other.value or self.value == other.value)

    def __hash__(self):  # pragma: no cover - never hashed
        return 0


def plan_out(out, refs):
    """(spec, treedef, items) of an output tree that may hold Refs.

    spec None: items is `out` itself (no Ref, every leaf traceable).
    Otherwise spec has one item per leaf of `out`: None (a plain leaf),
    k (Ref number k of the call), a Ref (closed over: itself), Const (a
    leaf JAX cannot trace), or (j, ref spec, collection) (the j-th Ref made
    inside); items has one entry per leaf: the leaf's value where the
    transform must carry one (a plain leaf, and the first occurrence of
    each Ref made inside), else None.
    """
    leaves, td = _tree_flatten(out)
    if not any(isinstance(x, Ref) or not traceable(x) for x in leaves):
        return None, None, out
    index = {id(r): k for k, r in enumerate(refs)}
    new: dict[int, int] = {}
    spec, items = [], []
    for x in leaves:
        if isinstance(x, Ref):
            k = index.get(id(x))
            if k is not None:
                spec.append(k)
                items.append(None)
            elif _core._ref_is_current(x):
                j = new.get(id(x))
                if j is None:
                    j = new[id(x)] = len(new)
                    items.append(x.value)
                else:
                    items.append(None)
                spec.append((j, _core._ref_spec(x), x.collection))
            else:
                spec.append(x)  # closed over: the very object
                items.append(None)
        elif traceable(x):
            spec.append(None)
            items.append(x)
        else:
            spec.append(Const(x))
            items.append(None)
    return tuple(spec), td, items


def payload_tree(spec, td, items):
    """The items in out's structure (so out_axes-style prefixes apply)."""
    return items if spec is None else td.unflatten(items)


def rebuild_out(spec, td, payload, refs, new_spec=None):
    """Outside the transform: the outputs described by plan_out, from the
    payload in out's structure.  new_spec(spec, value) may adjust the spec
    of a Ref made inside (refx.vmap: its sharding for the stacked value)."""
    if spec is None:
        return payload
    subs = td.flatten_up_to(payload)
    made: dict[int, Ref] = {}
    leaves = []
    for s, sub in zip(spec, subs, strict=True):
        if s is None:
            leaves.append(sub)
        elif type(s) is int:
            leaves.append(refs[s])
        elif isinstance(s, Ref):
            leaves.append(s)
        elif type(s) is Const:
            leaves.append(s.value)
        else:
            j, tp, coll = s
            if j not in made:
                if new_spec is not None:
                    tp = new_spec(tp, sub)
                made[j] = make_refs([sub], (coll,), (tp,))[0]
            leaves.append(made[j])
    return td.unflatten(leaves)
