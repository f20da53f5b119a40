"""The Ref types of refx.nn: each a `refx.Ref` subclass with a default collection.

A class is a filter (``refx.get_partition(model, nn.Param)``), and so is its
collection name (``"params"``); both select the same Refs unless a Ref was
given another collection explicitly.  Keyword arguments are Ref metadata
(``Param(w, sharding=(None, "model"))``), carried through deref/reref, the
transforms, pickle and checkpoints.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

from .. import Ref


class Variable(Ref):  # type: ignore[type-arg]
    """Base of refx.nn's Ref types: a Ref whose collection defaults to the
    class's ``default_collection``."""

    default_collection: ClassVar[Hashable] = None

    def __init__(self, value: Any, collection: Hashable = None, **metadata: Hashable) -> None:
        if collection is None:
            collection = type(self).default_collection
        super().__init__(value, collection, **metadata)


class Param(Variable):
    """A trained parameter (collection ``"params"``)."""

    default_collection = "params"


class BatchStat(Variable):
    """A running statistic, e.g. BatchNorm's mean and var (``"batch_stats"``)."""

    default_collection = "batch_stats"


class Cache(Variable):
    """Decoding state, e.g. attention's key/value cache (``"cache"``)."""

    default_collection = "cache"


class Intermediate(Variable):
    """A value a layer records for inspection (``"intermediates"``)."""

    default_collection = "intermediates"


class RngState(Variable):
    """Base of the random-stream state (``"rngs"``)."""

    default_collection = "rngs"


class RngKey(RngState):
    """The key of a random stream (a typed JAX PRNG key)."""


class RngCount(RngState):
    """The counter of a random stream, advanced by every draw."""


class OptState(Variable):
    """An optimizer's state: one Ref per array of the optax state, and the step
    counter (``"opt_state"``)."""

    default_collection = "opt_state"
