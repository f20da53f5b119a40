"""Looking at state: short reprs, summary(tree) and treescope renderings.

Short reprs.  The reprs of Ref, Value, Index and Partition (in C) show a
value through ``short_repr``: an array as ``float32[64,64]`` (a tracer as
``Traced<float32[64,64]>``), arrays inside lists, tuples, dicts and
namedtuples likewise, anything else as its repr.  A model's repr then
fits on a screen.

summary.  Counts the Refs of a tree per collection, built like state_dict
on the C core: ``get_partition`` finds the Refs (or the Value/Index nodes
of a deref'ed tree) in leaf order, ``deref`` numbers the distinct ones, so
a shared Ref is one Value (counted once) plus an Index per extra
occurrence (a *tie*).  Parameters are the elements of the arrays in a
Ref's value (anything with ``shape`` and ``dtype``, including
``jax.ShapeDtypeStruct`` of an abstract tree); values that are not arrays
(Python scalars, strings) count as a Ref with 0 parameters.

treescope.  treescope (optional) renders an object through its
``__treescope_repr__(path, subtree_renderer)`` method, and only when that is
a bound Python method (``types.MethodType``: treescope's
``safely_get_real_method``), so a C method would be ignored.  Its
alternative, ``treescope.type_registries.TREESCOPE_HANDLER_REGISTRY``,
needs refx to import treescope (or to be imported after it) to register.
So the C types have a ``__treescope_repr__`` *attribute* whose getter
(ref.c, ``refx_treescope_repr_get``) calls ``treescope_method`` below,
which binds the renderer to the object; treescope is imported only when it
renders.

A Ref renders as ``Ref(value=..., collection=...)``, coloured by its
collection, with its value rendered by treescope (arrays as dtype, shape
and statistics).  A Ref shared by several paths is shown in full at its
first position and as ``Ref(<same Ref as PATH>, collection=...)`` at
later ones (treescope itself also marks every occurrence of a
shared object).  Spotting the first position uses treescope's per-render
table of seen objects (private: ``_shared_object_ids_seen``); if a
treescope version lacks it, every occurrence is shown in full.
"""

from __future__ import annotations

import types
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import numpy as np

# the C core has no stub of its own (refx/__init__.pyi describes it)
from ._core import (  # type: ignore[import-not-found]
    Deref,
    Nothing,
    Partition,
    Ref,
    Value,
    deref,
    get_partition,
)

# ---------------------------------------------------------------------------
# short reprs
# ---------------------------------------------------------------------------


def _array_str(x: Any) -> str | None:
    """dtype[shape] for an array or a tracer, else None."""
    if not isinstance(x, jax.Array | np.ndarray | np.generic):
        return None
    try:
        text = f"{x.dtype}[{','.join(str(d) for d in x.shape)}]"
    except Exception:  # noqa: BLE001 - a deleted or odd array: its own repr
        return None
    return f"Traced<{text}>" if isinstance(x, jax.core.Tracer) else text


def short_repr(value: Any) -> str:
    """repr(value) with every array (also inside builtin containers and
    namedtuples) written as dtype[shape]."""
    short = _array_str(value)
    if short is not None:
        return short
    if isinstance(value, list | tuple | dict) and _holds_array(value, 0):
        return _container_repr(value)
    return repr(value)


def _holds_array(value: Any, depth: int) -> bool:
    if depth > 20:
        return False
    if _array_str(value) is not None:
        return True
    items = value.values() if isinstance(value, dict) else value
    return isinstance(value, list | tuple | dict) and any(
        _holds_array(v, depth + 1) for v in items)


def _container_repr(value: Any) -> str:
    if isinstance(value, dict):
        body = ", ".join(f"{k!r}: {short_repr(v)}" for k, v in value.items())
        return f"{{{body}}}" if type(value) is dict else f"{type(value).__name__}({{{body}}})"
    parts = [short_repr(v) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        args = ", ".join(f"{f}={p}" for f, p in zip(value._fields, parts, strict=True))
        return f"{type(value).__name__}({args})"
    if isinstance(value, tuple):
        return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
    return f"[{', '.join(parts)}]"


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


class CollectionSummary(NamedTuple):
    """One row of a Summary: the state of one collection."""

    collection: Hashable
    refs: int  # distinct Refs
    ties: int  # extra occurrences of shared Refs
    params: int  # array elements in their values
    bytes: int  # bytes of those arrays


def _count(value: Any) -> tuple[int, int]:
    params = nbytes = 0
    for leaf in jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, Ref)):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if isinstance(leaf, Ref) or shape is None or dtype is None:
            continue
        size = int(np.prod(shape, dtype=np.int64))
        params += size
        # numpy dtypes and JAX's extended ones (PRNG keys) have an itemsize
        itemsize = getattr(dtype, "itemsize", None)
        nbytes += size * (np.dtype(dtype).itemsize if itemsize is None else itemsize)
    return params, nbytes


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


class Summary:
    """The state of a tree per collection; ``print`` it for a table.

    ``rows`` holds one CollectionSummary per collection, in order of first
    appearance (leaf order); ``refs``, ``ties``, ``params`` and ``bytes``
    are the totals.
    """

    __slots__ = ("rows",)

    def __init__(self, rows: tuple[CollectionSummary, ...]) -> None:
        self.rows = rows

    @property
    def refs(self) -> int:
        return sum(r.refs for r in self.rows)

    @property
    def ties(self) -> int:
        return sum(r.ties for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def __str__(self) -> str:
        head = ("collection", "refs", "ties", "params", "bytes")
        body = [
            (
                r.collection if isinstance(r.collection, str) else repr(r.collection),
                f"{r.refs:,}",
                f"{r.ties:,}",
                f"{r.params:,}",
                _human_bytes(r.bytes),
            )
            for r in self.rows
        ]
        total = ("total", f"{self.refs:,}", f"{self.ties:,}", f"{self.params:,}",
                 _human_bytes(self.bytes))
        table = [head, *body, total]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]

        def line(row: tuple[str, ...]) -> str:
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(head))
        return "\n".join([line(head), rule, *map(line, body), rule, line(total)])

    __repr__ = __str__


def summary(tree: Any, /) -> Summary:
    """Refs, ties, parameters and bytes per collection of `tree`.

    A shared Ref is counted once; each extra occurrence is a tie.  Works on
    a tree of Refs or a deref'ed tree.  ``print(refx.summary(model))``
    prints a table.
    """
    part = get_partition(tree, (Ref, Deref))
    has_ref = any(isinstance(x, Ref) for x in part.values())
    if has_ref and any(isinstance(x, Deref) for x in part.values()):
        raise TypeError(
            "summary: the tree mixes Refs and deref'ed nodes; give a tree of Refs or a "
            "deref'ed tree"
        )
    numbered = deref(part) if has_ref else part
    counts: dict[Any, list[int]] = {}
    for node in numbered.values():
        if not isinstance(node, Deref):  # NOTHING
            continue
        row = counts.setdefault(node.collection, [0, 0, 0, 0])
        if isinstance(node, Value):
            params, nbytes = _count(node.value)
            row[0] += 1
            row[2] += params
            row[3] += nbytes
        else:
            row[1] += 1
    return Summary(tuple(CollectionSummary(c, *r) for c, r in counts.items()))


# ---------------------------------------------------------------------------
# treescope
# ---------------------------------------------------------------------------


def treescope_method(obj: Any) -> types.MethodType:
    """``obj.__treescope_repr__``: the renderer below bound to `obj` (called
    by the C getter; treescope accepts only a bound Python method)."""
    return types.MethodType(_treescope_repr, obj)


def _seen_table() -> dict[int, tuple[Any, str | None]] | None:
    """{id(ref): (ref, path of its first rendering)} for the current render.

    Kept on treescope's per-render tracker of seen objects, so it lives
    exactly as long as one render; None outside a render or if treescope's
    internals moved.
    """
    try:
        from treescope._internal.handlers import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            shared_value_postprocessor as svp,
        )

        tracker = svp._shared_object_ids_seen.get()
    except (ImportError, AttributeError):  # pragma: no cover - treescope changed
        return None
    if tracker is None:
        return None
    table = getattr(tracker, "_refx_first_paths", None)
    if table is None:
        table = {}
        tracker._refx_first_paths = table
    return table


def _collection_color(collection: Any) -> str:
    from treescope import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        formatting_util,
    )

    return formatting_util.color_from_string(repr(collection))


def _treescope_repr(obj: Any, path: str | None, subtree_renderer: Any) -> Any:
    from treescope import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        rendering_parts as rp,
    )
    from treescope import repr_lib  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if isinstance(obj, Ref):
        seen = _seen_table()
        if seen is not None:
            first = seen.get(id(obj))
            if first is not None and first[0] is obj:
                # in the text itself, not an annotation: treescope drops the
                # annotations of children of a node it shows on one line
                where = f"same Ref as {first[1]}" if first[1] else "same Ref as above"
                return rp.build_one_line_tree_node(
                    rp.siblings(
                        rp.roundtrip_condition(roundtrip=rp.text("<")),
                        rp.maybe_qualified_type_name(type(obj)),
                        "(",
                        rp.comment_color(rp.text(f"<{where}>")),
                        f", collection={obj.collection!r})",
                        rp.roundtrip_condition(roundtrip=rp.text(">")),
                    ),
                    path,
                    background_color=_collection_color(obj.collection),
                )
            seen[id(obj)] = (obj, path)
        return repr_lib.render_object_constructor(
            type(obj),
            {"value": obj.value, "collection": obj.collection},
            path,
            subtree_renderer,
            color=_collection_color(obj.collection),
        )
    if isinstance(obj, Value):
        return repr_lib.render_object_constructor(
            type(obj),
            {"value": obj.value, "index": obj.index, "collection": obj.collection},
            path,
            subtree_renderer,
            color=_collection_color(obj.collection),
        )
    if isinstance(obj, Deref):  # Index
        return rp.build_one_line_tree_node(
            rp.siblings_with_annotations(
                rp.maybe_qualified_type_name(type(obj)),
                f"(index={obj.index!r}, collection={obj.collection!r})",
                extra_annotations=[
                    rp.comment_color(rp.text(f"  # same Ref as Value(index={obj.index!r})"))
                ],
            ),
            path,
            background_color=_collection_color(obj.collection),
        )
    if isinstance(obj, Partition):
        return repr_lib.render_dictionary_wrapper(type(obj), dict(obj), path, subtree_renderer)
    if isinstance(obj, Nothing):
        return rp.build_one_line_tree_node(
            rp.comment_color(
                rp.siblings(rp.roundtrip_condition(roundtrip=rp.text("refx.")), "NOTHING")
            ),
            path,
        )
    return NotImplemented  # pragma: no cover - only the types above have the getter
