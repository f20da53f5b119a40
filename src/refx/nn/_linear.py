"""Linear, LinearGeneral, Einsum, Conv, ConvTranspose, Embed.

Constructor signatures, parameter names and layouts follow Flax NNX
(flax/nnx/nn/linear.py, Apache-2.0), so NNX weights copy over by name and
the tests compare outputs with NNX's.  Per-parameter metadata, e.g. a
sharding, is given as NNX does: ``kernel_metadata={"sharding": (None,
"model")}`` or ``kernel_init=nn.with_partitioning(init, (None, "model"))``;
it becomes the Param's metadata (``refx.shardings``, ``refx.jit`` and
``refx.restore`` place the value by it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _compat
from ._module import Module
from ._refs import Param

Initializer = Callable[..., jax.Array]
initializers = jax.nn.initializers

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros
default_embed_init = initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

# out_sharding (a call argument, NNX's): where the output goes over Explicit
# mesh axes (a PartitionSpec of the context mesh or a NamedSharding), given
# to JAX's op only when not None.  With Explicit axes (jax.make_mesh's
# default from JAX 0.7) a contraction over a sharded dimension must say it:
# JAX's ShardingTypeError otherwise.


class Partitioned:
    """An initializer whose parameter declares a sharding (``with_partitioning``)."""

    def __init__(self, init: Initializer, sharding: Any) -> None:
        self.init = init
        self.sharding = tuple(sharding) if isinstance(sharding, list) else sharding

    def __call__(self, key: Any, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return self.init(key, shape, dtype)


def with_partitioning(init: Initializer, sharding: Any) -> Partitioned:
    """``init`` whose parameter is declared sharded as ``sharding`` (mesh axis
    names or None per dimension, or a PartitionSpec): NNX's
    ``nnx.with_partitioning``, carried as the Param's ``sharding=`` metadata."""
    return Partitioned(init, sharding)


def param(
    init: Initializer, key: Any, shape: Any, dtype: Any, metadata: Mapping[str, Any]
) -> Param:
    """A Param holding ``init(key, shape, dtype)`` with `metadata` (and the
    sharding of a ``with_partitioning`` initializer)."""
    md = dict(metadata)
    if isinstance(init, Partitioned) and "sharding" not in md:
        md["sharding"] = init.sharding
    for k, v in md.items():
        if isinstance(v, list):
            md[k] = tuple(v)
    return Param(init(key, shape, dtype), **md)


def canonicalize_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> Any:
    if dtype is None:
        dtype = jnp.result_type(*[jnp.asarray(x) for x in args if x is not None])
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"Dtype must be inexact: {dtype}")
    return dtype


def promote_dtype(args: tuple[Any, ...], /, *, dtype: Any = None, inexact: bool = True) -> Any:
    """All of `args` (None kept) cast to `dtype`, or to their result type."""
    dtype = canonicalize_dtype(*args, dtype=dtype, inexact=inexact)
    return tuple(jnp.asarray(x, dtype) if x is not None else None for x in args)


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(ax if ax >= 0 else ndim + ax for ax in axes))


class Linear(Module):
    """``y = x @ kernel + bias``; kernel ``(in_features, out_features)``, bias
    ``(out_features,)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        dot_general: Callable[..., jax.Array] = lax.dot_general,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.kernel = param(kernel_init, rngs.params(), (in_features, out_features),
                            param_dtype, kernel_metadata)
        self.bias = (param(bias_init, rngs.params(), (out_features,), param_dtype, bias_metadata)
                     if use_bias else None)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.value
        bias = self.bias.value if self.bias is not None else None
        inputs, kernel, bias = promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kw = _compat.out_sharding_kw(self.dot_general, out_sharding, "Linear.__call__")
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision, **kw)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class LinearGeneral(Module):
    """A linear map over several input axes to several output axes (NNX's
    LinearGeneral without ``batch_axis``): kernel ``(*in_features, *out_features)``."""

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        precision: Any = None,
        dot_general: Callable[..., jax.Array] | None = None,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.in_features = _tuple(in_features)
        self.out_features = _tuple(out_features)
        self.axis = _tuple(axis)
        if len(self.in_features) != len(self.axis):
            raise ValueError(
                "in_features and axis must have the same length. "
                f"Got {self.in_features} and {self.axis}."
            )
        n_in, n_out = len(self.in_features), len(self.out_features)

        def kernel_init_wrap(rng: Any, shape: Any, dtype: Any) -> jax.Array:
            flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[-n_out:])))
            return jnp.reshape(kernel_init(rng, flat, dtype), shape)

        def bias_init_wrap(rng: Any, shape: Any, dtype: Any) -> jax.Array:
            return jnp.reshape(bias_init(rng, (int(np.prod(shape)),), dtype), shape)

        md = dict(kernel_metadata)
        if isinstance(kernel_init, Partitioned):
            md.setdefault("sharding", kernel_init.sharding)
        self.kernel = param(kernel_init_wrap, rngs.params(),
                            (*self.in_features, *self.out_features), param_dtype, md)
        bmd = dict(bias_metadata)
        if isinstance(bias_init, Partitioned):
            bmd.setdefault("sharding", bias_init.sharding)
        self.bias = (param(bias_init_wrap, rngs.params(), self.out_features, param_dtype, bmd)
                     if use_bias else None)
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        axis = _normalize_axes(self.axis, inputs.ndim)
        contract_ind = tuple(range(len(axis)))
        kernel = self.kernel.value
        bias = self.bias.value if self.bias is not None else None
        inputs, kernel, bias = promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        dot_general = self.dot_general or lax.dot_general
        kw = _compat.out_sharding_kw(dot_general, out_sharding, "LinearGeneral.__call__")
        out = dot_general(inputs, kernel, ((axis, contract_ind), ((), ())),
                          precision=self.precision, **kw)
        if bias is not None:
            expanded = (1,) * (inputs.ndim - len(axis))
            out += jnp.reshape(bias, (*expanded, *self.out_features))
        return out


class Einsum(Module):
    """``jnp.einsum(einsum_str, inputs, kernel) + bias``; kernel ``kernel_shape``."""

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        einsum_str = einsum_str.replace(" ", "")
        _einsum_str_check(einsum_str)
        self.kernel = param(kernel_init, rngs.params(), tuple(kernel_shape), param_dtype,
                            kernel_metadata)
        self.bias = (param(bias_init, rngs.params(), tuple(bias_shape), param_dtype, bias_metadata)
                     if bias_shape is not None else None)
        self.einsum_str = einsum_str
        self.kernel_shape = tuple(kernel_shape)
        self.bias_shape = tuple(bias_shape) if bias_shape is not None else None
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
        _einsum_str_check(einsum_str)
        inputs, kernel, bias = promote_dtype(
            (inputs, self.kernel.value, self.bias.value if self.bias is not None else None),
            dtype=self.dtype,
        )
        kw = _compat.out_sharding_kw(jnp.einsum, out_sharding, "Einsum.__call__")
        y = jnp.einsum(einsum_str, inputs, kernel, precision=self.precision, **kw)
        if bias is not None:
            y += jnp.reshape(bias, self._bias_shape(einsum_str, inputs, kernel))
        return y

    def _bias_shape(self, einsum_str: str, lhs: jax.Array, rhs: jax.Array) -> list[int]:
        import opt_einsum  # type: ignore[import-untyped,unused-ignore]

        operands, result, _ = opt_einsum.parser.parse_einsum_input((einsum_str, lhs, rhs))
        rhs_dict = {c: i for i, c in enumerate(operands.split(",")[1])}
        shape = [1] * len(result)
        for i, c in enumerate(result):
            if c in rhs_dict:
                shape[i] = self.kernel_shape[rhs_dict[c]]
        return shape


def _einsum_str_check(einsum_str: str) -> None:
    if "->" not in einsum_str:
        raise ValueError('`einsum_str` equation must be explicit and include "->".')
    if einsum_str.count(",") != 1:
        raise ValueError(
            "`einsum_str` equation must have exactly two operands and therefore, exactly one "
            f"comma character, instead of {einsum_str.count(',')}"
        )


def canonicalize_padding(padding: Any, rank: int) -> Any:
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        new_pad = []
        for p in padding:
            if isinstance(p, int):
                new_pad.append((p, p))
            elif isinstance(p, tuple | list) and len(p) == 2:
                new_pad.append(tuple(p))
            else:
                break
        if len(new_pad) == rank:
            return new_pad
    raise ValueError(
        f"Invalid padding format: {padding}, should be str, int, or a sequence of len {rank} "
        "where each element is an int or pair of ints."
    )


def _conv_dimension_numbers(input_shape: Sequence[int]) -> Any:
    ndim = len(input_shape)
    lhs_spec = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs_spec = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec)


def _freeze_padding(padding: Any) -> Any:
    if isinstance(padding, list | tuple):
        return tuple(tuple(p) if isinstance(p, list | tuple) else p for p in padding)
    return padding


class Conv(Module):
    """Convolution over 1-3 spatial dimensions, NHWC (features last); kernel
    ``(*kernel_size, in_features // feature_group_count, out_features)``.
    ``out_sharding`` (a call argument) is of the output as the convolution
    makes it: several batch dimensions are flattened into one for it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = 1,
        *,
        padding: Any = "SAME",
        input_dilation: int | Sequence[int] | None = 1,
        kernel_dilation: int | Sequence[int] | None = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: jax.Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        kernel_size = _tuple(kernel_size)
        if in_features % feature_group_count:
            raise ValueError(
                f"Conv: in_features ({in_features}) must be divisible by "
                f"feature_group_count ({feature_group_count})"
            )
        self.kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
        self.kernel = param(kernel_init, rngs.params(), self.kernel_shape, param_dtype,
                            kernel_metadata)
        self.bias = (param(bias_init, rngs.params(), (out_features,), param_dtype, bias_metadata)
                     if use_bias else None)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = strides if not isinstance(strides, list) else tuple(strides)
        self.padding = _freeze_padding(padding)
        self.input_dilation = input_dilation
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel_size = self.kernel_size

        def maybe_broadcast(x: Any) -> tuple[int, ...]:
            if x is None:
                x = 1
            if isinstance(x, int):
                return (x,) * len(kernel_size)
            return tuple(x)

        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"Conv(in_features={self.in_features}): the input's last (feature) axis has "
                f"size {inputs.shape[-1]} (input shape {inputs.shape}); inputs are NHWC"
            )
        num_batch = inputs.ndim - (len(kernel_size) + 1)
        if num_batch != 1:
            input_batch_shape = inputs.shape[:num_batch]
            inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch:])
        strides = maybe_broadcast(self.strides)
        input_dilation = maybe_broadcast(self.input_dilation)
        kernel_dilation = maybe_broadcast(self.kernel_dilation)
        padding_lax = canonicalize_padding(self.padding, len(kernel_size))
        if padding_lax in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[
                padding_lax])
            padding_lax = "VALID"
        elif padding_lax == "CAUSAL":
            if len(kernel_size) != 1:
                raise ValueError("Causal padding is only implemented for 1D convolutions.")
            left_pad = kernel_dilation[0] * (kernel_size[0] - 1)
            inputs = jnp.pad(inputs, [(0, 0), (left_pad, 0), (0, 0)])
            padding_lax = "VALID"
        kernel = self.kernel.value
        if self.mask is not None:
            if self.mask.shape != self.kernel_shape:
                raise ValueError(
                    "Mask needs to have the same shape as weights. "
                    f"Shapes are: {self.mask.shape}, {self.kernel_shape}"
                )
            kernel = kernel * self.mask
        bias = self.bias.value if self.bias is not None else None
        inputs, kernel, bias = promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kw = _compat.out_sharding_kw(lax.conv_general_dilated, out_sharding, "Conv.__call__")
        y = lax.conv_general_dilated(
            inputs, kernel, strides, padding_lax,
            lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
            dimension_numbers=_conv_dimension_numbers(inputs.shape),
            feature_group_count=self.feature_group_count, precision=self.precision, **kw,
        )
        if bias is not None:
            y += bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        if num_batch != 1:
            y = jnp.reshape(y, input_batch_shape + y.shape[1:])
        return y


class ConvTranspose(Module):
    """Transposed convolution, NHWC; kernel ``(*kernel_size, in_features,
    out_features)`` (``transpose_kernel=True``: ``(..., out, in)``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        *,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] | None = None,
        use_bias: bool = True,
        mask: jax.Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        transpose_kernel: bool = False,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        kernel_size = _tuple(kernel_size)
        self.kernel_size = kernel_size
        self.in_features = in_features
        self.out_features = out_features
        self.strides = strides if not isinstance(strides, list) else tuple(strides)
        self.padding = _freeze_padding(padding)
        self.kernel_dilation = kernel_dilation
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = transpose_kernel
        self.kernel_shape = kernel_size + (
            (out_features, in_features) if transpose_kernel else (in_features, out_features))
        self.kernel = param(kernel_init, rngs.params(), self.kernel_shape, param_dtype,
                            kernel_metadata)
        self.bias = (param(bias_init, rngs.params(), (out_features,), param_dtype, bias_metadata)
                     if use_bias else None)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel_size = self.kernel_size

        def maybe_broadcast(x: Any) -> tuple[int, ...]:
            if x is None:
                x = 1
            if isinstance(x, int):
                return (x,) * len(kernel_size)
            return tuple(x)

        num_batch = inputs.ndim - (len(kernel_size) + 1)
        if num_batch != 1:
            input_batch_shape = inputs.shape[:num_batch]
            inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch:])
        strides = maybe_broadcast(self.strides)
        kernel_dilation = maybe_broadcast(self.kernel_dilation)
        kernel = self.kernel.value
        if self.mask is not None:
            kernel = kernel * self.mask
        padding_lax = canonicalize_padding(self.padding, len(kernel_size))
        if padding_lax == "CIRCULAR":
            padding_lax = "VALID"
        bias = self.bias.value if self.bias is not None else None
        inputs, kernel, bias = promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = lax.conv_transpose(inputs, kernel, strides, padding_lax,
                               rhs_dilation=kernel_dilation,
                               transpose_kernel=self.transpose_kernel, precision=self.precision)
        if self.padding == "CIRCULAR":
            scaled = [x * s for x, s in zip(jnp.shape(inputs)[1:-1], strides, strict=True)]
            diffs = [-(yd - xd) % (2 * xd) for yd, xd in zip(y.shape[1:-1], scaled, strict=True)]
            if self.transpose_kernel:
                total_pad = [(d // 2, (d + 1) // 2) for d in diffs]
            else:
                total_pad = [((d + 1) // 2, d // 2) for d in diffs]
            y = jnp.pad(y, [(0, 0)] + total_pad + [(0, 0)])
            for i in range(1, y.ndim - 1):
                y = y.reshape(y.shape[:i] + (-1, scaled[i - 1]) + y.shape[i + 1:])
                y = y.sum(axis=i)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if num_batch != 1:
            y = jnp.reshape(y, input_batch_shape + y.shape[1:])
        return y


class Embed(Module):
    """A lookup table: ``embedding`` ``(num_embeddings, features)``;
    ``attend(query)`` is ``query @ embedding.T`` (a tied output layer)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = default_embed_init,
        rngs: Any,
        embedding_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.embedding = param(embedding_init, rngs.params(), (num_embeddings, features),
                               param_dtype, embedding_metadata)
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype or self.embedding.value.dtype
        self.param_dtype = param_dtype

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = promote_dtype((self.embedding.value,), dtype=self.dtype, inexact=False)
        lookup: Callable[[jax.Array, jax.Array], jax.Array]
        if self.num_embeddings == 1:
            lookup = functools.partial(_broadcast_row, shape=inputs.shape + (self.features,))
        else:
            lookup = _take_rows
        if out_sharding is not None:
            # jnp.take has no out_sharding: the lookup runs with the mesh's
            # axes Auto, its result put on out_sharding, as NNX does (NNX
            # ignores out_sharding for a one-row table; refx does not)
            lookup = _compat.auto_axes(lookup, out_sharding, "Embed.__call__")
        return lookup(embedding, inputs)

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        query, embedding = promote_dtype((query, self.embedding.value), dtype=self.dtype)
        kw = _compat.out_sharding_kw(jnp.dot, out_sharding, "Embed.attend")
        return jnp.dot(query, embedding.T, **kw)


def _take_rows(embedding: jax.Array, inputs: jax.Array) -> jax.Array:
    return jnp.take(embedding, inputs, axis=0)


def _broadcast_row(embedding: jax.Array, inputs: jax.Array, *, shape: tuple[int, ...]) -> jax.Array:
    return jnp.broadcast_to(embedding, shape)
