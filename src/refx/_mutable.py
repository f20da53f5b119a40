"""refx.mutable: which Refs may be written inside a block.

``with refx.mutable("batch_stats"): ...`` lets only the Refs that filter
accepts be written inside the block; any other write (``ref.value = ...``,
update_refs, a transform writing back) is a ValueError naming the Ref's
class and collection, raised before anything is written.  The check is in
the C core's one write check (ref.c, refx_check_write), so no write path
can skip it.

The blocks a thread is in are a tuple of filters, innermost last, in a
ContextVar the core owns (``_core._mutable_var``): per thread (a new thread
starts outside every block) and per asyncio task.  Blocks nest by
narrowing: a write must pass every enclosing block's filter, so an inner
``mutable(...)`` cannot re-allow what an outer one refused.  JAX traces
run in the calling thread, so writes made while a transform traces
(refx.jit's body on its first call, refx.scan's body) are checked, and so
are the write-backs of cached calls.

The ``mutable=`` option of refx.jit, refx.vmap and refx.scan runs the
function inside ``refx.mutable(filter)`` while it traces: the Refs a trace
writes are fixed by the trace, so every later call of a cached refx.jit
entry writes only what that check allowed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

from . import _core

_var = _core._mutable_var
_PATH_FILTERS = (_core.PathContains, _core.PathFilter)


def _check_filter(f, where="refx.mutable"):
    """TypeError for what is not a filter, or is a path filter (a write has
    a Ref, not a path)."""
    _core.All(f)  # TypeError for anything that is not a filter
    stack = [f]
    while stack:
        g = stack.pop()
        if isinstance(g, _PATH_FILTERS):
            raise TypeError(f"{where}: {type(g).__name__} is a path filter, but a write has no "
                            "path (a Ref may sit at many); use collections, Ref classes or "
                            "callables of the Ref")
        if isinstance(g, (_core.Not, _core.All, _core.Any)):
            stack.extend(g.filters)
        elif isinstance(g, tuple):
            stack.extend(g)


class mutable(contextlib.ContextDecorator):  # noqa: N801 - a function-like name
    """``with refx.mutable(filter):`` only Refs that `filter` accepts may be
    written inside the block (also usable as a decorator).

    `filter` is any filter of tree_partition except path filters, applied
    to the Ref written: a collection name, a Ref class, a tuple (any of
    them), Not/All/Any, a callable of the Ref, ``...``/True (everything) or
    False (nothing: a block that must write nothing).  Blocks nest by
    narrowing: a write must pass every enclosing block.  The state is per
    thread.
    """

    def __init__(self, filter, /):  # noqa: A002 - the name of the concept
        _check_filter(filter)
        self.filter = filter

    def __enter__(self):
        # no token kept on the object: one block object may be entered by
        # several threads or asyncio tasks at once (each has its own
        # context), so __exit__ undoes its own entry in the current context
        _var.set(_var.get(()) + (self.filter,))
        return self

    def __exit__(self, *exc_info):
        blocks = _var.get(())
        if not blocks or blocks[-1] is not self.filter:  # pragma: no cover - misuse
            raise RuntimeError(f"{self!r}: exited out of order (blocks must nest)")
        _var.set(blocks[:-1])
        return False

    def __call__(self, func):
        """As a decorator: the block is entered around each call, and
        around the whole run of a coroutine (an async def)."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args, **kwargs):
                with self:
                    return await func(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run(*args, **kwargs):
            with self:
                return func(*args, **kwargs)

        return run

    def __repr__(self):
        return f"refx.mutable({self.filter!r})"


def _with_mutable(fun, filter, kind):  # noqa: A002
    """`fun` run inside refx.mutable(filter) (the transforms' option), or
    `fun` itself for filter None."""
    if filter is None:
        return fun
    _check_filter(filter, f"{kind}: mutable")
    block = mutable(filter)

    @functools.wraps(fun)
    def run(*args, **kwargs):
        with block:
            return fun(*args, **kwargs)

    return run
