"""A small neural-network library on refx: the whole thing, in one page.

A `Module` is an ordinary Python object whose attributes hold Refs, other
Modules, or lists/dicts of them.  Every subclass is registered as a JAX
pytree node (keyed by attribute name), so refx's functions apply to models
directly and partition paths read like ``('hidden', 'w')`` or
``('blocks', '0', 'norm', 'mean')``.

State lives in Refs, sorted into collections by what updates it:

    "params"       trained by the optimiser (weights, biases, BatchNorm scale/bias)
    "batch_stats"  BatchNorm running mean/var, written in training mode
    "rng"          the dropout key, split and written back on every call
    "opt_state"    the optax state of an `Optimizer`

Nothing here knows about jit or grad.  Layers read and write ``ref.value``;
sharing is ordinary Python sharing (`Linear.tied` reuses another layer's
weight Ref); the training script passes models to `refx.jit` functions and
takes gradients with `refx.value_and_grad`.

Nor about devices: `Linear` and `BatchNorm` take an optional ``sharding``
(mesh axis names per dimension of the weight, or of the feature vector),
which their Refs declare; under an active mesh each Ref is created on it and
refx.jit keeps it there (`train_sharded.py`).
"""

from __future__ import annotations

import math
from typing import Any, Self, cast

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import GetAttrKey

import refx

Array = jax.Array

# Attributes holding these are static (part of the pytree structure, not
# leaves): layer sizes, rates, flags.  Everything else is a child.
_STATIC = (bool, int, float, str, type(None))


class Module:
    """Base class: a pytree node whose children are its attributes, in order.

    Attributes holding Python scalars, strings or None are static (aux data).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls, _flatten_with_keys, cls._unflatten, flatten_func=_flatten
        )

    @classmethod
    def _unflatten(cls, aux: tuple[tuple[str, Any], ...], children: Any) -> Self:
        module = object.__new__(cls)
        it = iter(children)
        for name, static in aux:
            module.__dict__[name] = next(it) if static is _CHILD else static
        return module


class _Child:
    """Marks a child slot in a Module's aux data."""

    def __repr__(self) -> str:
        return "<child>"


_CHILD = _Child()


def _aux(m: Module) -> tuple[tuple[str, Any], ...]:
    return tuple((name, v if isinstance(v, _STATIC) else _CHILD) for name, v in vars(m).items())


def _flatten(m: Module) -> tuple[list[Any], tuple[tuple[str, Any], ...]]:
    return [v for v in vars(m).values() if not isinstance(v, _STATIC)], _aux(m)


def _flatten_with_keys(
    m: Module,
) -> tuple[list[tuple[GetAttrKey, Any]], tuple[tuple[str, Any], ...]]:
    children = [(GetAttrKey(k), v) for k, v in vars(m).items() if not isinstance(v, _STATIC)]
    return children, _aux(m)


Sharding = tuple[str | None, ...]  # mesh axis names (or None) per dimension


def _declare(sharding: Sharding | None) -> dict[str, Sharding]:
    """Ref metadata declaring `sharding`, or none at all."""
    return {} if sharding is None else {"sharding": sharding}


class Linear(Module):
    """y = x @ w + b; with ``transpose=True``, y = x @ w.T + b (for tying).

    ``sharding``: the weight's, e.g. ``(None, "model")`` (the bias gets the
    output dimension's)."""

    def __init__(self, din: int, dout: int, *, key: Array, sharding: Sharding | None = None):
        bound = 1.0 / math.sqrt(din)
        self.w: refx.Ref[Array] = refx.Ref(
            jax.random.uniform(key, (din, dout), minval=-bound, maxval=bound), "params",
            **_declare(sharding),
        )
        self.b: refx.Ref[Array] = refx.Ref(
            jnp.zeros(dout), "params", **_declare(sharding and sharding[1:])
        )
        self.transpose = False

    @classmethod
    def tied(cls, other: Linear) -> Linear:
        """A layer mapping other's outputs back to its inputs with the *same*
        weight Ref (used transposed) and a bias of its own."""
        layer = object.__new__(cls)
        layer.w = other.w  # shared: one Ref, two layers
        sharding = cast("Sharding | None", other.w.metadata.get("sharding"))
        layer.b = refx.Ref(
            jnp.zeros(other.w.value.shape[0]), "params", **_declare(sharding and sharding[:1])
        )
        layer.transpose = True
        return layer

    def __call__(self, x: Array) -> Array:
        w = self.w.value
        return x @ (w.T if self.transpose else w) + self.b.value


class BatchNorm(Module):
    """Batch normalisation; running statistics in collection "batch_stats"."""

    def __init__(
        self, n: int, *, momentum: float = 0.9, eps: float = 1e-5,
        sharding: Sharding | None = None,
    ) -> None:
        meta = _declare(sharding)  # of the feature vectors, e.g. ("model",)
        self.scale: refx.Ref[Array] = refx.Ref(jnp.ones(n), "params", **meta)
        self.bias: refx.Ref[Array] = refx.Ref(jnp.zeros(n), "params", **meta)
        self.mean: refx.Ref[Array] = refx.Ref(jnp.zeros(n), "batch_stats", **meta)
        self.var: refx.Ref[Array] = refx.Ref(jnp.ones(n), "batch_stats", **meta)
        self.momentum = momentum
        self.eps = eps

    def __call__(self, x: Array, *, train: bool) -> Array:
        if train:
            mean, var = x.mean(axis=0), x.var(axis=0)
            m = self.momentum
            # running statistics are state, not part of the gradient
            self.mean.value = m * self.mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            self.var.value = m * self.var.value + (1 - m) * jax.lax.stop_gradient(var)
        else:
            mean, var = self.mean.value, self.var.value
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.scale.value + self.bias.value


class Dropout(Module):
    """Inverted dropout; draws from a key Ref (collection "rng") it may share."""

    def __init__(self, rate: float, *, rng: refx.Ref[Array]) -> None:
        self.rate = rate
        self.rng = rng

    def __call__(self, x: Array, *, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        key, sub = jax.random.split(self.rng.value)
        self.rng.value = key  # the next call (and the next step) gets fresh bits
        keep = jax.random.bernoulli(sub, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class Optimizer(Module):
    """An optax optimiser whose state is a Ref (collection "opt_state"), so a
    refx.jit step updates it in place: ``opt.update(model, grads)`` with the
    gradient Partition of ``refx.grad(..., wrt=opt.wrt)``."""

    def __init__(self, model: Module, tx: optax.GradientTransformation, wrt: str = "params"):
        self.tx = refx.Static(tx)  # static: part of the pytree structure
        self.wrt = wrt
        params = refx.get_partition(refx.deref(model), wrt)
        self.state: refx.Ref[optax.OptState] = refx.Ref(tx.init(params), "opt_state")

    def update(self, model: Module, grads: refx.Partition) -> None:
        params = refx.get_partition(refx.deref(model), self.wrt)
        updates, self.state.value = self.tx.value.update(grads, self.state.value, params)
        refx.update_refs(refx.get_partition(model, self.wrt), optax.apply_updates(params, updates))
