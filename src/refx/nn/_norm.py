"""BatchNorm, LayerNorm, RMSNorm, GroupNorm and Dropout.

The statistics follow Flax NNX (flax/nnx/nn/normalization.py, Apache-2.0):
same parameter names (``scale``, ``bias``, running ``mean``/``var`` as
BatchStat Refs), same defaults (BatchNorm momentum 0.99, epsilon 1e-5; the
others epsilon 1e-6), the fast variance ``E[x^2] - E[x]^2``, and
``axis_name`` for statistics averaged across devices (``lax.pmean``).
BatchNorm keeps running statistics over every axis but the feature axis
(NHWC after a conv: over batch, height and width) and checks that the
input's feature axis has ``num_features`` entries, a ValueError otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import _compat
from ._linear import _NO_METADATA, Initializer, initializers, param, promote_dtype
from ._module import Module, first_from
from ._refs import BatchStat, Param


def _canonicalize_axes(rank: int, axes: Any) -> tuple[int, ...]:
    if not isinstance(axes, Sequence):
        axes = (axes,)
    return tuple({rank + a if a < 0 else a for a in axes})


def _abs_sq(x: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def _compute_stats(
    x: jax.Array, axes: Any, dtype: Any, axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_mean: bool = True, use_fast_variance: bool = True, mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    if dtype is None:
        dtype = jnp.result_type(x)
    dtype = jnp.promote_types(dtype, jnp.float32)
    x = jnp.asarray(x, dtype)
    axes = _canonicalize_axes(x.ndim, axes)

    def mean(*xs: jax.Array, mask: jax.Array | None = None) -> Any:
        mus = tuple(v.mean(axes, where=mask) for v in xs)
        if axis_name is None:
            return mus if len(xs) > 1 else mus[0]
        if len(xs) > 1:
            reduced = lax.pmean(jnp.stack(mus, axis=0), axis_name,
                                axis_index_groups=axis_index_groups)
            return tuple(reduced[i] for i in range(len(xs)))
        return lax.pmean(mus[0], axis_name, axis_index_groups=axis_index_groups)

    if use_mean:
        if use_fast_variance:
            mu, mu2 = mean(x, _abs_sq(x), mask=mask)
            var = jnp.maximum(0.0, mu2 - _abs_sq(mu))
        else:
            mu = mean(x, mask=mask)
            var = mean(_abs_sq(x - jnp.expand_dims(mu, axes)), mask=mask)
    else:
        var = mean(_abs_sq(x), mask=mask)
        mu = jnp.zeros_like(var)
    return mu, var


def _normalize(
    x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
    reduction_axes: Any, feature_axes: Any, dtype: Any, epsilon: float,
) -> jax.Array:
    reduction_axes = _canonicalize_axes(x.ndim, reduction_axes)
    feature_axes = _canonicalize_axes(x.ndim, feature_axes)
    stats_shape = list(x.shape)
    for axis in reduction_axes:
        stats_shape[axis] = 1
    mean = mean.reshape(stats_shape)
    var = var.reshape(stats_shape)
    feature_shape = [1] * x.ndim
    for ax in feature_axes:
        feature_shape[ax] = x.shape[ax]
    y = x - mean
    mul = lax.rsqrt(var + epsilon)
    args = [x]
    if scale is not None:
        scale = scale.reshape(feature_shape)
        mul *= scale
        args.append(scale)
    y *= mul
    if bias is not None:
        bias = bias.reshape(feature_shape)
        y += bias
        args.append(bias)
    if dtype is None:
        dtype = jnp.result_type(*args)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.asarray(y, dtype)


def _scale_bias(
    self: Any, n: int, use_scale: bool, use_bias: bool, scale_init: Initializer,
    bias_init: Initializer, param_dtype: Any, rngs: Any, scale_metadata: Mapping[str, Any],
    bias_metadata: Mapping[str, Any],
) -> None:
    self.scale = (param(scale_init, rngs.params(), (n,), param_dtype, scale_metadata)
                  if use_scale else None)
    self.bias = (param(bias_init, rngs.params(), (n,), param_dtype, bias_metadata)
                 if use_bias else None)


class BatchNorm(Module):
    """Batch normalization.  Training mode (``use_running_average=False``,
    ``model.train()``) normalizes by the batch's statistics and moves the
    running ``mean``/``var`` (BatchStat Refs) by ``momentum``; evaluation mode
    (``model.eval()``) uses the running statistics."""

    scale: Param | None
    bias: Param | None

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: Any,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        stats_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        smd = dict(stats_metadata)
        if not smd and "sharding" in scale_metadata:
            smd["sharding"] = scale_metadata["sharding"]
        self.mean = BatchStat(jnp.zeros((num_features,), jnp.float32), **smd)
        self.var = BatchStat(jnp.ones((num_features,), jnp.float32), **smd)
        _scale_bias(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                    rngs, scale_metadata, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error="BatchNorm: no use_running_average given (to the constructor, the call, "
            "or by model.train()/model.eval())",
        )
        feature_axes = _canonicalize_axes(x.ndim, self.axis)
        if x.shape[feature_axes[0]] != self.num_features:
            raise ValueError(
                f"BatchNorm(num_features={self.num_features}, axis={self.axis}): the input's "
                f"feature axis {self.axis} has size {x.shape[feature_axes[0]]}, not "
                f"{self.num_features} (input shape {tuple(x.shape)}); for NHWC conv outputs the "
                "features are the last axis (axis=-1)"
            )
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = self.scale.value if self.scale is not None else None
        bias = self.bias.value if self.bias is not None else None
        x, mean, var, scale, bias = promote_dtype(
            (x, self.mean.value, self.var.value, scale, bias), dtype=self.dtype)
        if not use_running_average:
            mean, var = _compute_stats(
                x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance, mask=mask,
            )
            m = self.momentum
            sg = lax.stop_gradient
            self.mean.value = sg(m * self.mean.value + (1 - m) * mean)
            self.var.value = sg(m * self.var.value + (1 - m) * var)
        return _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype,
                          self.epsilon)


class LayerNorm(Module):
    """Layer normalization over ``reduction_axes`` (default the last)."""

    scale: Param | None
    bias: Param | None

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: Any,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _scale_bias(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                    rngs, scale_metadata, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        scale = self.scale.value if self.scale is not None else None
        bias = self.bias.value if self.bias is not None else None
        x, scale, bias = promote_dtype((x, scale, bias), dtype=self.dtype)
        mean, var = _compute_stats(x, self.reduction_axes, self.dtype, self.axis_name,
                                   self.axis_index_groups,
                                   use_fast_variance=self.use_fast_variance, mask=mask)
        return _normalize(x, mean, var, scale, bias, self.reduction_axes, self.feature_axes,
                          self.dtype, self.epsilon)


class RMSNorm(Module):
    """Root-mean-square normalization (no mean subtraction, no bias)."""

    scale: Param | None

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: Any,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.scale = (param(scale_init, rngs.params(), (num_features,), param_dtype,
                            scale_metadata) if use_scale else None)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        scale = self.scale.value if self.scale is not None else None
        x, scale = promote_dtype((x, scale), dtype=self.dtype)
        mean, var = _compute_stats(x, self.reduction_axes, self.dtype, self.axis_name,
                                   self.axis_index_groups, use_mean=False,
                                   use_fast_variance=self.use_fast_variance, mask=mask)
        return _normalize(x, mean, var, scale, None, self.reduction_axes, self.feature_axes,
                          self.dtype, self.epsilon)


class GroupNorm(Module):
    """Group normalization: statistics per group of ``group_size`` channels."""

    scale: Param | None
    bias: Param | None

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Any = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: Any,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                "Either `num_groups` or `group_size` should be specified. If `group_size` is to "
                "be specified, pass `num_groups=None` as argument to override the default "
                "`num_groups` value of 32."
            )
        if group_size is not None:
            if num_features % group_size != 0:
                raise ValueError(
                    f"Number of features ({num_features}) is not multiple of the group size "
                    f"({group_size})."
                )
            self.num_groups = num_features // group_size
            self.group_size = group_size
        else:
            if not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups:
                raise ValueError(
                    f"Number of groups ({num_groups}) does not divide the number of channels "
                    f"({num_features})."
                )
            self.num_groups = num_groups
            self.group_size = num_features // num_groups
        _scale_bias(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype,
                    rngs, scale_metadata, bias_metadata)
        self.feature_axis = -1
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if self.reduction_axes is not None:
            reduction_axes = self.reduction_axes
        else:
            reduction_axes = list(range(1, x.ndim - 1)) + [-1]
        reduction_axes = _canonicalize_axes(x.ndim, reduction_axes)
        group_shape = x.shape[:-1] + (self.num_groups, self.group_size)
        if mask is not None:
            mask = mask.reshape(mask.shape[:-1] + (self.num_groups, self.group_size))
        scale = self.scale.value if self.scale is not None else None
        bias = self.bias.value if self.bias is not None else None
        x, scale, bias = promote_dtype((x, scale, bias), dtype=self.dtype)
        mean, var = _compute_stats(
            x.reshape(group_shape), list(reduction_axes[:-1]) + [-1], self.dtype, self.axis_name,
            self.axis_index_groups, use_fast_variance=self.use_fast_variance, mask=mask,
        )
        mean = jnp.repeat(mean, self.group_size, axis=1)
        var = jnp.repeat(var, self.group_size, axis=1)
        return _normalize(x, mean, var, scale, bias, reduction_axes[:-1], (self.feature_axis,),
                          self.dtype, self.epsilon)


class Dropout(Module):
    """Inverted dropout: in training mode (``deterministic=False``) zeroes each
    entry with probability ``rate`` and scales the rest by ``1 / (1 - rate)``,
    with keys from ``rngs`` (its ``rng_collection`` stream, default
    ``"dropout"``, falling back to the Rngs' default stream)."""

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: Any = None,
    ) -> None:
        self.rate = rate
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _stream(rngs, rng_collection)

    def __call__(
        self, inputs: jax.Array, *, deterministic: bool | None = None, rngs: Any = None
    ) -> jax.Array:
        deterministic = first_from(
            deterministic, self.deterministic,
            error=f"Dropout(rate={self.rate}): no deterministic given (to the constructor, "
            "the call, or by model.train()/model.eval())",
        )
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        stream = _stream(rngs, self.rng_collection) if rngs is not None else self.rngs
        if stream is None:
            raise ValueError(
                f"Dropout(rate={self.rate}) in training mode (deterministic=False) has no random "
                "keys: pass rngs=nn.Rngs(...) to its constructor or to the call, or turn it off "
                "with model.eval() / deterministic=True"
            )
        key = stream() if callable(stream) else stream
        keep_prob = 1.0 - self.rate
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        sharding = _compat.explicit_sharding(inputs)
        if sharding is None:
            mask = jax.random.bernoulli(key, p=keep_prob, shape=shape)
            mask = jnp.broadcast_to(mask, inputs.shape)
        else:  # Explicit mesh axes: lax.select wants the mask on the inputs' sharding
            mask = _explicit_mask(key, keep_prob, shape, inputs.shape, sharding)
        return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def _explicit_mask(
    key: Any, p: float, shape: list[int], full: tuple[int, ...], sharding: Any
) -> jax.Array:
    """A keep mask of shape `full` on `sharding` (the inputs', naming
    Explicit axes), as NNX makes it: drawn at `shape` (1 at the broadcast
    dimensions, left unsharded) on that sharding, then broadcast.  The
    values are those drawn without a sharding (threefry is partitionable)."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    spec = tuple(None if n != m else e for e, n, m in zip(spec, shape, full, strict=True))
    drawn = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if _compat.takes_out_sharding(jax.random.bernoulli, "jax.random.bernoulli"):
        kw: dict[str, Any] = {"out_sharding": drawn}  # (older JAX's stubs lack it)
        mask = jax.random.bernoulli(key, p=p, shape=shape, **kw)
    else:  # JAX before 0.8.1: drawn whole, then resharded
        mask = _compat.reshard(jax.random.bernoulli(key, p=p, shape=shape), drawn)
    if tuple(shape) != tuple(full):
        mask = _compat.reshard(jnp.broadcast_to(mask, full), sharding)
    return mask


def _stream(rngs: Any, name: str) -> Any:
    """The stream `name` of a Rngs, a stream itself, a key array, or None."""
    from ._rngs import Rngs, RngStream

    if rngs is None or isinstance(rngs, RngStream):
        return rngs
    if isinstance(rngs, Rngs):
        return rngs[name]
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"rngs must be an nn.Rngs, an nn.RngStream or a key, not {type(rngs).__name__}")
