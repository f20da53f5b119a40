"""Random streams held in Refs: nn.Rngs and nn.RngStream.

A stream is a key Ref (``RngKey``, a typed JAX key) and a counter Ref
(``RngCount``, uint32).  Drawing (``stream()``) returns
``fold_in(key, count)`` and writes ``count + 1``: a fresh key on every call,
eagerly and inside ``refx.jit``/``scan``/``vmap``/``cond`` (the counter is
ordinary Ref state, written back by the transform).  Pass the Rngs (or the
model holding it) to the transform: a closed-over counter can be read but
not written inside a trace, which is the trace-level ``ValueError``.

``rngs.split(n)`` (alias ``rngs.fork(split=n)``) gives a new Rngs whose every
stream holds ``n`` independent keys (and ``n`` counters): map it with
``refx.vmap`` (``in_axes=0``) and each member draws its own numbers, for an
ensemble made with ``refx.vmap(lambda r: Model(rngs=r))(rngs.split(8))`` or
per-example dropout.  A Rngs passed *unmapped* (``in_axes=None``) to a vmap
gives every member the same key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._module import Module
from ._refs import RngCount, RngKey


def _as_key(seed: Any) -> jax.Array:
    if isinstance(seed, int):
        return jax.random.key(seed)
    seed = jnp.asarray(seed) if not isinstance(seed, jax.Array) else seed
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if seed.dtype == jnp.uint32 and seed.shape[-1:] == (2,):
        return jax.random.wrap_key_data(seed)
    return jax.random.key(seed)


class RngStream(Module):
    """One named random stream: ``stream()`` returns a fresh key."""

    def __init__(self, seed: Any, *, tag: str) -> None:
        key = _as_key(seed)
        self.key = RngKey(key, tag=tag)
        self.count = RngCount(jnp.zeros(key.shape, jnp.uint32), tag=tag)
        self.tag = tag

    def __call__(self) -> jax.Array:
        count = self.count.value
        key = jax.random.fold_in(self.key.value, count) if count.ndim == 0 else (
            jax.vmap(jax.random.fold_in)(self.key.value, count)
        )
        self.count.value = count + 1
        return key

    def split(self, n: int) -> RngStream:
        """A new stream holding ``n`` independent keys (draws this one once)."""
        keys = jax.random.split(self(), n)
        return RngStream(keys, tag=self.tag)

    def fork(self, *, split: int | None = None) -> RngStream:
        """A new independent stream (``split=n``: one holding n keys)."""
        if split is None:
            return RngStream(self(), tag=self.tag)
        return self.split(split)


class Rngs(Module):
    """Named random streams: ``Rngs(0)``, ``Rngs(0, dropout=1)``, ``Rngs(params=0)``.

    ``rngs.params()``, ``rngs.dropout()``, ``rngs["name"]()`` draw from a
    stream; a stream that was not given falls back to ``default`` (the
    positional seed); without a default it is an AttributeError naming the
    streams there are.  ``rngs()`` draws from ``default``.
    """

    def __init__(self, default: Any = None, /, **streams: Any) -> None:
        if default is not None:
            streams = {"default": default, **streams}
        if not streams:
            raise ValueError(
                "Rngs: give a seed or a key (Rngs(0)) or named streams (Rngs(params=0))")
        for name, seed in streams.items():
            if isinstance(seed, RngStream):
                vars(self)[name] = seed
            else:
                vars(self)[name] = RngStream(seed, tag=name)

    def __getattr__(self, name: str) -> RngStream:
        if name.startswith("_"):
            raise AttributeError(name)
        d = vars(self)
        if "default" in d:
            return d["default"]  # type: ignore[no-any-return]
        raise AttributeError(
            f"Rngs has no stream {name!r} and no 'default' stream to fall back to; "
            f"its streams: {sorted(k for k, v in d.items() if isinstance(v, RngStream))}"
        )

    def __getitem__(self, name: str) -> RngStream:
        return getattr(self, name)  # type: ignore[no-any-return]

    def __contains__(self, name: str) -> bool:
        return isinstance(vars(self).get(name), RngStream)

    def __call__(self) -> jax.Array:
        return self.default()

    def streams(self) -> dict[str, RngStream]:
        return {k: v for k, v in vars(self).items() if isinstance(v, RngStream)}

    def split(self, n: int) -> Rngs:
        """A new Rngs whose every stream holds ``n`` independent keys, for the
        members of a ``refx.vmap`` (map it with ``in_axes=0``)."""
        return Rngs(**{k: s.split(n) for k, s in self.streams().items()})

    def fork(self, *, split: int | None = None) -> Rngs:
        """A new independent Rngs (``split=n``: ``split(n)``)."""
        return Rngs(**{k: s.fork(split=split) for k, s in self.streams().items()})
