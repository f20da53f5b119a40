"""Bring your own layers: hold a foreign pytree's arrays in Refs (nn.wrap).

``nn.wrap(eqx_module)`` (alias ``nn.from_equinox``) or ``nn.wrap(tree, fn)``
returns a Module that holds every array of the pytree in a Ref (a floating
array in an ``nn.Param``, any other array in a Ref of collection
``"constants"``), named by its path in the tree (``"layers.0.weight"``).  Calling
it rebuilds the pytree with the Refs' *current* values and calls it
(``wrapped(x)`` is ``module(x)``; with ``fn``, ``fn(tree, x)``), so the foreign
code runs unchanged inside refx transforms and trains with ``refx.grad`` and
``nn.Optimizer``.  The same array object at two places of the tree becomes
one Ref, so a tie stays a tie (one gradient, summed over its uses).
``wrapped.unwrap()`` gives the pytree with the current values (to hand the
trained model back to Equinox).

This exists because ``jnp``/``lax`` functions no longer call
``__jax_array__`` on their arguments, so a foreign layer cannot be handed
Refs in place of arrays: it must be handed arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import Ref
from ._module import Module
from ._refs import Param


def _name(path: Any) -> str:
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts) or "value"


class Wrapped(Module):
    """A foreign pytree (an Equinox module, a dict of arrays...) with its arrays in Refs."""

    def __init__(self, tree: Any, fn: Callable[..., Any] | None = None) -> None:
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        refs: dict[str, Any] = {}
        by_id: dict[int, Any] = {}
        slots: list[Any] = []
        for path, leaf in paths_leaves:
            if isinstance(leaf, jax.Array | np.ndarray):
                r = by_id.get(id(leaf))
                if r is None:
                    if jnp.issubdtype(leaf.dtype, jnp.inexact):
                        r = Param(jnp.asarray(leaf))
                    else:
                        r = Ref(jnp.asarray(leaf), "constants")
                    by_id[id(leaf)] = r
                name = _name(path)
                refs[name] = r
                slots.append(name)
            else:
                slots.append(_Static(leaf))
        self.refs = refs
        self.treedef: Any = treedef
        self.slots = tuple(slots)
        self.fn = fn

    def unwrap(self) -> Any:
        """The pytree with the Refs' current values."""
        leaves = [s.value if isinstance(s, _Static) else self.refs[s].value for s in self.slots]
        return self.treedef.unflatten(leaves)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tree = self.unwrap()
        if self.fn is not None:
            return self.fn(tree, *args, **kwargs)
        return tree(*args, **kwargs)


class _Static:
    """A non-array leaf of the wrapped tree (a function, an int): static."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        try:
            return hash((type(self.value), self.value))
        except TypeError:
            return id(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return False
        if self.value is other.value:
            return True
        try:
            return bool(type(self.value) is type(other.value) and self.value == other.value)
        except Exception:  # noqa: BLE001 - arrays or odd __eq__: by identity only
            return False


def wrap(tree: Any, fn: Callable[..., Any] | None = None) -> Wrapped:
    """Hold the arrays of `tree` (an Equinox module, any pytree) in Refs; the
    result calls ``tree(...)`` (or ``fn(tree, ...)``) with their current values."""
    return Wrapped(tree, fn)


from_equinox = wrap
