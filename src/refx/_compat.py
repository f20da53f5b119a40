"""The one place that knows JAX's versions.

The C core (refx._core) never imports jax.  This module picks the JAX
calls that fit the installed version; refx/_wiring.py hands them to the
core.  Nothing else in refx touches JAX internals.

Supported: JAX with "stackless" tracing (0.4.36 and later), where the
current trace is ``jax._src.core.trace_ctx.trace`` and every trace keeps a
precomputed weak reference to itself (``Trace._weakref``).
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import numpy as np
from jax._src import core as _jcore
from jax._src import tree_util as _tu


_registry = _tu.default_registry
_flatten = _registry.flatten
_flatten_with_path = getattr(_registry, "flatten_with_path", None)
if _flatten_with_path is None:  # older jaxlib: the Python wrapper does it

    def _flatten_with_path(tree, is_leaf=None):
        return jax.tree_util.tree_flatten_with_path(tree, is_leaf)


# ``trace_state.value`` is the current trace's weakref (one attribute read
# from C).  Older stackless versions (0.4.36-0.5) only have
# ``trace_ctx.trace`` and traces without a precomputed ``_weakref``;
# ``weakref.ref(trace)`` then returns the trace's one plain weakref, the
# same object for as long as any Ref holds it, so identity still works.
if hasattr(_jcore, "trace_state") and hasattr(_jcore.trace_state, "value"):
    _trace_state = _jcore.trace_state
else:

    class _TraceState:
        __slots__ = ()

        @property
        def value(self):
            trace = _jcore.trace_ctx.trace
            ref = getattr(trace, "_weakref", None)
            return ref if ref is not None else weakref.ref(trace)

    _trace_state = _TraceState()

_Tracer = jax.core.Tracer


def _encloses(outer, trace) -> bool:
    """True if `outer` is `trace` or one of the traces it runs inside."""
    while trace is not None:
        if trace is outer:
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def check_value(value, trace_ref) -> None:
    """Raise ValueError if `value` holds a tracer the Ref may not hold.

    A Ref of trace T may hold tracers of T and of the traces T runs inside
    (a jit tracer inside grad, say); tracers of an inner or finished trace
    would leak.  Called by the C core only for values whose type may hold
    tracers (not for arrays and scalars).
    """
    trace = trace_ref()
    for leaf in _flatten(value)[0]:
        if isinstance(leaf, _Tracer) and not _encloses(leaf._trace, trace):
            raise ValueError(
                "Cannot set a Ref to a value holding a tracer of another "
                f"trace ({type(leaf._trace).__name__}); a Ref may hold "
                "tracers of the trace it was created in or of traces "
                "enclosing it"
            )


def is_batched(value) -> bool:
    """True if `value` holds a tracer of the current trace that is mapped
    over its axis: inside refx.vmap's function (traced by jax.vmap, whose
    BatchTrace is then current), a value that depends on the mapped axis.
    A BatchTracer whose batch_dim is None (jax's not_mapped) is not."""
    trace = _jcore.trace_ctx.trace
    for leaf in _flatten(value)[0]:
        if (isinstance(leaf, _Tracer) and leaf._trace is trace
                and getattr(leaf, "batch_dim", None) is not None):
            return True
    return False


def weak(x):
    """`x` (a jax.Array) as a weakly typed array of its dtype (a Python
    scalar's type in JAX's promotion rules): the same buffers under a weak
    aval, so no computation runs (one would be refused under a context mesh
    that does not hold x's devices)."""
    from jax._src.array import ArrayImpl

    aval = _jcore.ShapedArray(x.shape, x.dtype, weak_type=True)
    return ArrayImpl(aval, x.sharding, x._arrays, committed=x._committed)


def _plain_types() -> tuple[type, ...]:
    types: list[type] = [np.ndarray]
    try:
        from jax._src.array import ArrayImpl

        types.append(ArrayImpl)
    except ImportError:  # pragma: no cover - layout changed
        pass
    return tuple(types)


# --------------------------------------------------------------------------
# sharding (issue 13): the active mesh, and how to constrain a traced value.
# refx/_sharding.py holds the logic; these are the version-dependent calls.
# --------------------------------------------------------------------------

from jax._src import mesh as _mesh_lib  # noqa: E402

# `with mesh:` (every version; deprecated from JAX 0.7): the legacy context
_resources = _mesh_lib.thread_resources
# jax.set_mesh / jax.sharding.use_mesh (0.5+): the concrete and abstract
# context meshes.  Outside traces get_mesh/get_concrete_mesh give the
# concrete one; inside a jit trace only the abstract one is known.
_get_concrete = getattr(jax.sharding, "get_mesh", None) or getattr(
    _mesh_lib, "get_concrete_mesh", None)
_get_abstract = getattr(jax.sharding, "get_abstract_mesh", None) or getattr(
    _mesh_lib, "get_abstract_mesh", None)
# Explicit mesh axes (JAX 0.6+; jax.make_mesh's default from 0.9): an
# array's sharding is part of its type, changed with reshard, and
# with_sharding_constraint only asserts it.
_AxisType = getattr(jax.sharding, "AxisType", None)
_reshard = getattr(jax.sharding, "reshard", None)
_EvalTrace = _jcore.EvalTrace


def _nonempty(mesh):
    """`mesh` if it is a mesh with axes (versions stand for "no mesh" by
    None, (), an empty Mesh or AbstractMesh), else None."""
    if mesh is None or getattr(mesh, "empty", False) or not getattr(mesh, "axis_names", ()):
        return None
    return mesh


def in_trace() -> bool:
    """True inside a JAX transform's trace (jit, grad, vmap, ...)."""
    return not isinstance(_jcore.trace_ctx.trace, _EvalTrace)


try:  # jax.config.jax_disable_jit's state: one property read instead of config lookup
    from jax._src.config import disable_jit as _disable_jit_state

    _disable_jit_state.value  # noqa: B018 - the attribute must exist
except (ImportError, AttributeError):  # pragma: no cover - other versions

    class _DisableJit:
        __slots__ = ()

        @property
        def value(self):
            return jax.config.jax_disable_jit

    _disable_jit_state = _DisableJit()


_trace_ctx = _jcore.trace_ctx


def eager() -> bool:
    """Outside every trace and not under jax.disable_jit(): where an eager
    refx transform runs through its cached refx.jit."""
    return isinstance(_trace_ctx.trace, _EvalTrace) and not _disable_jit_state.value


def active_mesh():
    """The concrete mesh made active by jax.set_mesh / jax.sharding.use_mesh
    or `with mesh:`, or None.  Outside traces only."""
    if _get_concrete is not None:
        try:
            mesh = _nonempty(_get_concrete())
        except ValueError:  # JAX 0.10+ inside jit: no concrete mesh there
            mesh = None
        if mesh is not None:
            return mesh
    return _nonempty(_resources.env.physical_mesh)


def context_mesh():
    """The mesh a traced value is constrained under: the abstract context
    mesh (jax.set_mesh), else the `with mesh:` one, else None."""
    if _get_abstract is not None:
        mesh = _nonempty(_get_abstract())
        if mesh is not None:
            return mesh
    return _nonempty(_resources.env.physical_mesh)


def explicit_axes(mesh) -> frozenset:
    """The names of `mesh`'s Explicit axes (none before JAX 0.6)."""
    if _AxisType is None or mesh is None:
        return frozenset()
    types = getattr(mesh, "axis_types", None)
    if isinstance(types, dict):  # JAX 0.6: {AxisType: name or names}
        names = types.get(_AxisType.Explicit, ())
        return frozenset((names,) if isinstance(names, str) else names)
    if types is None:
        return frozenset()
    return frozenset(n for n, t in zip(mesh.axis_names, types, strict=True)
                     if t == _AxisType.Explicit)


def _keep(sharding, names):
    """`sharding` (a PartitionSpec or NamedSharding) naming only `names`."""
    spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else sharding
    entries = []
    for e in spec:
        if isinstance(e, tuple):
            e = tuple(n for n in e if n in names) or None
        elif e is not None and e not in names:
            e = None
        entries.append(e)
    kept = jax.sharding.PartitionSpec(*entries)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, kept)
    return kept


def constrain(x, sharding, mesh):
    """`x` (traced) constrained to `sharding` (a PartitionSpec of the context
    mesh, or a NamedSharding) on `mesh`.  Over Explicit axes that is
    reshard (with_sharding_constraint only asserts them), over Auto axes
    with_sharding_constraint; a mesh with both gets both, each naming its
    own axes."""
    explicit = explicit_axes(mesh)
    if not explicit or _reshard is None:
        return jax.lax.with_sharding_constraint(x, sharding)
    auto = frozenset(mesh.axis_names) - explicit
    x = _reshard(x, _keep(sharding, explicit) if auto else sharding)
    if auto:
        x = jax.lax.with_sharding_constraint(x, _keep(sharding, auto))
    return x


# --------------------------------------------------------------------------
# out_sharding= (refx.nn): where an op's output goes over Explicit mesh
# axes.  A layer passes its caller's out_sharding to JAX's function only
# when it is given (a custom dot_general need not take it); an older JAX
# whose function lacks the parameter is a TypeError naming the release
# that has it, never a silently dropped argument.
# --------------------------------------------------------------------------

_auto_axes = getattr(jax.sharding, "auto_axes", None)  # JAX 0.7+ (public)

# (the function, its name, the first JAX release whose function takes
# out_sharding); looked up by identity, so a user's own dot_general is
# passed out_sharding unchecked.
_OUT_SHARDING_SINCE: tuple[tuple[Any, str, str], ...] = (  # (Any: jnp.dot is a PjitFunction)
    (jax.lax.dot_general, "jax.lax.dot_general", "0.5.0"),
    (jax.numpy.einsum, "jax.numpy.einsum", "0.5.0"),
    (jax.numpy.dot, "jax.numpy.dot", "0.6.1"),
    (jax.lax.conv_general_dilated, "jax.lax.conv_general_dilated", "0.7.2"),
    (jax.random.bernoulli, "jax.random.bernoulli", "0.8.1"),
)
_takes_cache: dict[str, bool] = {}


def takes_out_sharding(fn, name: str) -> bool:
    """Does this JAX's `fn` (named `name`) take out_sharding?"""
    took = _takes_cache.get(name)
    if took is None:
        import inspect

        try:
            took = "out_sharding" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # pragma: no cover - no signature
            took = False
        _takes_cache[name] = took
    return took


def _too_old(where: str, what: str, since: str) -> TypeError:
    return TypeError(
        f"{where}: out_sharding needs {what}, which JAX has from release {since}; "
        f"this is JAX {jax.__version__} (upgrade JAX, or call without out_sharding)")


def out_sharding_kw(fn, out_sharding, where: str) -> dict:
    """The keyword arguments that give `fn` `out_sharding`: none if it is
    None, else ``{"out_sharding": out_sharding}``.  `fn` one of JAX's
    functions that this JAX's lacks the parameter: a TypeError naming the
    release that has it (`where` names the layer's method)."""
    if out_sharding is None:
        return {}
    for jfn, name, since in _OUT_SHARDING_SINCE:
        if fn is jfn:
            if not takes_out_sharding(fn, name):
                raise _too_old(where, f"{name}(..., out_sharding=)", since)
            break
    return {"out_sharding": out_sharding}


def auto_axes(fn, out_sharding, where: str):
    """`fn` run with the mesh's axes Auto, its output put on `out_sharding`
    (``jax.sharding.auto_axes``: for an op such as ``jnp.take`` that takes
    no out_sharding of its own, as NNX's Embed does)."""
    if _auto_axes is None:
        raise _too_old(where, "jax.sharding.auto_axes", "0.7.0")
    return _auto_axes(fn, out_sharding=out_sharding)


_typeof = getattr(jax, "typeof", None) or getattr(_jcore, "get_aval", None)


def explicit_sharding(x):
    """`x`'s sharding as its type states it (``jax.typeof(x).sharding``) if
    that names an Explicit mesh axis, else None (no mesh, Auto axes only,
    a replicated value, or a JAX without sharding in types)."""
    sharding = getattr(_typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    explicit = explicit_axes(getattr(sharding, "mesh", None))
    for e in spec:
        for name in (e if isinstance(e, tuple) else (e,)):
            if name in explicit:
                return sharding
    return None


def reshard(x, sharding):
    """`x` (traced or not) moved to `sharding` over Explicit axes
    (``jax.sharding.reshard``, JAX 0.7+; before it, a sharding constraint)."""
    if _reshard is None:
        return jax.lax.with_sharding_constraint(x, sharding)
    return _reshard(x, sharding)
