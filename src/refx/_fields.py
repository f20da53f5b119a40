"""RefField: a class attribute backed by a Ref, for dataclasses and plain
classes (``self.count += 1`` reads and writes the Ref's value).

The Ref lives in the instance's ``__dict__`` under the attribute's own name
(a data descriptor wins over the instance dict, so attribute access goes
through the field), which is where pytree registrations that flatten
``vars(obj)`` find it: the Ref is a leaf at the path of the attribute, and
deref/reref, partitions, refx.jit and the rest see an ordinary Ref.

    obj.count            the Ref's value (or, in a deref'ed or rebuilt
                         object holding a Value/Index there, that node)
    obj.count = x        the first time: binds a new Ref(x, collection,
                         **metadata) (placed on a declared sharding under
                         an active mesh); after that: writes ref.value = x,
                         with the trace checks of any write
    obj.count = ref      binds that Ref (sharing it), if none is bound yet
    vars(obj)["count"]   the Ref itself

A dataclass takes the field's `default` as the attribute's default (it
asks the descriptor for it); without one the argument is required.  A plain
class sets its fields in ``__init__``: reading an unset field is an
AttributeError, never a Ref made on the spot (which, made inside a
transform, would belong to that transform's trace).

For refx to see the Refs, the class's pytree flatten must read them where
they are, in ``vars(obj)`` (as examples/nn.py's Module does); a flatten
that reads attributes (``jax.tree_util.register_dataclass``) gets their
values instead, and the Refs are not in the tree.
"""

from __future__ import annotations

from typing import Any

from ._core import Deref, Ref  # type: ignore[import-not-found]

_MISSING: Any = object()


class RefField:
    """An attribute whose value is held by a Ref: ``count = RefField("state",
    default=0)``; ``obj.count += 1`` writes the Ref.  `collection` and
    `metadata` (e.g. ``sharding=("model", None)``) are those of the Refs it
    makes.  Works in dataclasses (``count: RefField[int] = RefField(...)``)
    and plain classes; the Ref sits in ``vars(obj)`` under the same name."""

    __slots__ = ("collection", "default", "metadata", "name", "owner")

    def __init__(self, collection: Any = None, *, default: Any = _MISSING,
                 **metadata: Any) -> None:
        Ref(None, collection, **metadata)  # checks them as Ref() would
        self.collection = collection
        self.default = default
        self.metadata = metadata
        self.name: str | None = None
        self.owner: type | None = None

    def __class_getitem__(cls, item: Any, /) -> Any:
        import types

        return types.GenericAlias(cls, item)

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner, self.name = owner, name

    def _where(self) -> str:
        owner = self.owner.__qualname__ if self.owner is not None else "?"
        return f"RefField {owner}.{self.name}"

    def _dict(self, obj: Any) -> tuple[dict[str, Any], str]:
        """(the instance dict holding the Ref, the attribute's name)."""
        if self.name is None:
            raise TypeError("RefField: not assigned to a class attribute (set in a class body)")
        d = getattr(obj, "__dict__", None)
        if d is None:
            raise TypeError(f"{self._where()}: {type(obj).__name__} objects have no __dict__ "
                            "to hold the Ref (a class with __slots__?)")
        return d, self.name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            # class access: a dataclass asks for the field's default here
            if self.default is _MISSING:
                raise AttributeError(f"{self._where()} has no default")
            return self.default
        d, name = self._dict(obj)
        held = d.get(name, _MISSING)
        if held is _MISSING:
            raise AttributeError(f"{self._where()} is not set on this "
                                 f"{type(obj).__name__} (assign a value first)")
        return held.value if isinstance(held, Ref) else held

    def __set__(self, obj: Any, value: Any) -> None:
        d, name = self._dict(obj)
        held = d.get(name, _MISSING)
        if isinstance(value, (Ref, Deref)):
            if held is value:
                return
            if isinstance(held, Ref):
                raise ValueError(
                    f"{self._where()}: this {type(obj).__name__} already holds a Ref here; "
                    f"assigning a {type(value).__name__} would replace it (assign a value to "
                    "write the Ref, or bind the new Ref on a fresh object)")
            d[name] = value  # binds a Ref (shared) or keeps a deref'ed node
            return
        if isinstance(held, Ref):
            held.value = value
        else:
            d[name] = Ref(value, self.collection, **self.metadata)

    def __delete__(self, obj: Any) -> None:
        raise AttributeError(f"{self._where()} cannot be deleted")

    def __repr__(self) -> str:
        meta = "".join(f", {k}={v!r}" for k, v in self.metadata.items())
        default = "" if self.default is _MISSING else f", default={self.default!r}"
        return f"RefField({self.collection!r}{default}{meta})"
