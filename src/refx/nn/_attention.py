"""MultiHeadAttention with masks, dropout and a key/value cache in nn.Cache Refs.

Follows Flax NNX (flax/nnx/nn/attention.py, Apache-2.0): ``query``, ``key``,
``value`` are LinearGeneral layers with kernels ``(in, heads, head_dim)``,
``out`` one with kernel ``(heads, head_dim, out)``; grouped-query attention
with ``num_kv_heads``; ``normalize_qk``.  Autoregressive decoding as NNX:
``init_cache(input_shape)`` makes ``cached_key``/``cached_value`` (shape
``(*batch, max_length, kv_heads, head_dim)``) and ``cache_index`` Cache Refs,
and a call with ``decode=True`` on one token writes them (inside
``refx.jit`` too, which writes them back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._linear import (
    _NO_METADATA,
    Initializer,
    LinearGeneral,
    default_kernel_init,
    initializers,
    promote_dtype,
)
from ._module import Module
from ._norm import LayerNorm, _stream
from ._refs import Cache


def _validate_qkv_shapes(query: jax.Array, key: jax.Array, value: jax.Array | None = None) -> None:
    arrays = (query, key, value) if value is not None else (query, key)
    names = "q, k, v" if value is not None else "q, k"
    if not all(a.ndim == arrays[0].ndim for a in arrays[1:]):
        raise ValueError(f"{names} must have same rank, but got "
                         f"{', '.join(str(a.ndim) for a in arrays)}.")
    if not all(a.shape[:-3] == arrays[0].shape[:-3] for a in arrays[1:]):
        raise ValueError(f"{names} batch dims must match, but got shapes "
                         f"{', '.join(str(a.shape) for a in arrays)}.")


def combine_masks(*masks: jax.Array | None, dtype: Any = jnp.float32) -> jax.Array | None:
    """The logical and of the masks that are not None (None if all are)."""
    ms = [m for m in masks if m is not None]
    if not ms:
        return None
    if not all(m.ndim == ms[0].ndim for m in ms):
        raise ValueError(f"masks must have same rank, but got {tuple(m.ndim for m in ms)}.")
    mask, *others = ms
    for other in others:
        mask = jnp.logical_and(mask, other)
    return mask.astype(dtype)


def make_attention_mask(
    query_input: jax.Array, key_input: jax.Array, pairwise_fn: Callable[..., Any] = jnp.multiply,
    extra_batch_dims: int = 0, dtype: Any = jnp.float32,
) -> jax.Array:
    """``(*batch, 1, q_len, kv_len)`` mask from per-position query/key inputs."""
    mask = pairwise_fn(jnp.expand_dims(query_input, axis=-1), jnp.expand_dims(key_input, axis=-2))
    mask = jnp.expand_dims(mask, axis=-3)
    mask = jnp.expand_dims(mask, axis=tuple(range(extra_batch_dims)))
    return mask.astype(dtype)


def make_causal_mask(
    x: jax.Array, extra_batch_dims: int = 0, dtype: Any = jnp.float32
) -> jax.Array:
    """The causal mask ``(*batch, 1, len, len)`` of inputs ``x`` of shape ``(*batch, len)``."""
    idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(idxs, idxs, jnp.greater_equal, extra_batch_dims=extra_batch_dims,
                               dtype=dtype)


def dot_product_attention_weights(
    query: jax.Array, key: jax.Array, bias: jax.Array | None = None, mask: jax.Array | None = None,
    broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0,
    deterministic: bool = False, dtype: Any = None, precision: Any = None,
) -> jax.Array:
    query, key = promote_dtype((query, key), dtype=dtype)
    dtype = query.dtype
    _validate_qkv_shapes(query, key)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"q, k depths must match, but got {query.shape[-1]} and "
                         f"{key.shape[-1]}.")
    q_heads, k_heads = query.shape[-2], key.shape[-2]
    gqa = q_heads != k_heads
    if gqa:
        if q_heads % k_heads:
            raise ValueError(f"Query heads ({q_heads}) must be multiple of Key heads "
                             f"({k_heads}) for Grouped Query Attention.")
        query = query.reshape(query.shape[:-2] + (k_heads, q_heads // k_heads, query.shape[-1]))
        key = jnp.expand_dims(key, axis=-2)
        spec = "...qhgd,...kh1d->...hgqk"
    else:
        spec = "...qhd,...khd->...hqk"
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    w = jnp.einsum(spec, query, key, precision=precision)
    if gqa:
        w = w.reshape(w.shape[:-4] + (q_heads, w.shape[-2], w.shape[-1]))
    if bias is not None:
        w = w + bias
    if mask is not None:
        w = jnp.where(mask, w, jnp.finfo(dtype).min)
    w = jax.nn.softmax(w).astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        ndim_base = key.ndim - 1 if gqa else key.ndim
        if broadcast_dropout:
            shape = tuple([1] * (ndim_base - 2)) + w.shape[-2:]
        else:
            shape = w.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)  # type: ignore[arg-type]
        w = w * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    return w


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0,
    deterministic: bool = False, dtype: Any = None, precision: Any = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + bias, masked) v over ``(..., len, heads, depth)`` inputs."""
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    _validate_qkv_shapes(query, key, value)
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"k, v lengths must match, but got {key.shape[-3]} and "
                         f"{value.shape[-3]}.")
    w = dot_product_attention_weights(query, key, bias, mask, broadcast_dropout, dropout_rng,
                                      dropout_rate, deterministic, dtype, precision)
    if w.shape[-3] != value.shape[-2]:
        q_heads, v_heads = w.shape[-3], value.shape[-2]
        w = w.reshape(w.shape[:-3] + (v_heads, q_heads // v_heads) + w.shape[-2:])
        value = jnp.expand_dims(value, axis=-2)
        out = jnp.einsum("...hgqk,...kh1d->...qhgd", w, value, precision=precision)
        return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


class MultiHeadAttention(Module):
    """Multi-head attention (NNX's signature): ``mha(inputs_q, inputs_k=None,
    inputs_v=None, *, mask=None, deterministic=None, rngs=None, decode=None,
    out_sharding=None, qkv_sharding=None)``; ``qkv_sharding`` is the
    ``out_sharding`` of the query, key and value projections, ``out_sharding``
    that of the output projection (Explicit mesh axes)."""

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = initializers.zeros,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., jax.Array] = dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features if qkv_features is not None else in_features
        self.out_features = out_features if out_features is not None else in_features
        self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                             f"({self.num_kv_heads}).")
        if self.qkv_features % self.num_heads:
            raise ValueError(f"Memory dimension ({self.qkv_features}) must be divisible by "
                             f"'num_heads' heads ({self.num_heads}).")
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.attention_fn = attention_fn
        self.decode = decode
        self.normalize_qk = normalize_qk
        self.head_dim = self.qkv_features // self.num_heads
        linear = functools.partial(
            LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, precision=precision, rngs=rngs,
            kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
        )
        self.query = linear(in_features, (num_heads, self.head_dim))
        self.key = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        self.value = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        if normalize_qk:
            self.query_ln: LayerNorm | None = LayerNorm(
                self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.key_ln: LayerNorm | None = LayerNorm(
                self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.query_ln = None
            self.key_ln = None
        self.out = LinearGeneral(
            (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            rngs=rngs, kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata,
        )
        self.rngs = _stream(rngs, "dropout") if dropout_rate > 0 else None
        self.cached_key: Cache | None = None
        self.cached_value: Cache | None = None
        self.cache_index: Cache | None = None

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: Any = None,
        decode: bool | None = None,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
    ) -> jax.Array:
        stream = _stream(rngs, "dropout") if rngs is not None else self.rngs
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None. To have "
                                 "both `inputs_k` and `inputs_v` be the same value, pass in the "
                                 "value to `inputs_k` and leave `inputs_v` as None.")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but "
                             f"module expects {self.in_features}.")
        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.query_ln is not None and self.key_ln is not None:
            query = self.query_ln(query)
            key = self.key_ln(key)
        decode = decode if decode is not None else self.decode
        if decode:
            if self.cached_key is None or self.cached_value is None or self.cache_index is None:
                raise ValueError("MultiHeadAttention: decode=True needs a cache; call "
                                 "init_cache(input_shape) first")
            *batch_dims, max_length, num_kv_heads, depth = self.cached_key.value.shape
            expected = (*batch_dims, 1, num_kv_heads, depth)
            if expected != key.shape:
                raise ValueError(f"expected key shape {expected} instead got {key.shape}.")
            cur = self.cache_index.value
            zero = jnp.array(0, dtype=lax.dtype(cur.dtype))
            indices = (zero,) * len(batch_dims) + (cur, zero, zero)
            key = lax.dynamic_update_slice(self.cached_key.value, key, indices)
            value = lax.dynamic_update_slice(self.cached_value.value, value, indices)
            self.cached_key.value = key
            self.cached_value.value = value
            self.cache_index.value = cur + 1
            mask = combine_masks(
                mask,
                jnp.broadcast_to(jnp.arange(max_length) <= cur,
                                 (*batch_dims, 1, 1, max_length)),
            )
        if self.dropout_rate > 0.0:
            deterministic = deterministic if deterministic is not None else self.deterministic
            if deterministic is None:
                raise ValueError("MultiHeadAttention: no deterministic given (to the "
                                 "constructor, the call, or by model.train()/model.eval())")
            if not deterministic:
                if stream is None:
                    raise ValueError(
                        f"MultiHeadAttention(dropout_rate={self.dropout_rate}) in training mode "
                        "has no random keys: pass rngs= to its constructor or to the call")
                dropout_rng = stream() if callable(stream) else stream
            else:
                dropout_rng = None
        else:
            deterministic = True
            dropout_rng = None
        x = self.attention_fn(
            query, key, value, mask=mask, dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
            deterministic=deterministic, dtype=self.dtype, precision=self.precision,
        )
        return self.out(x, out_sharding=out_sharding)

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> None:
        """Make the key/value cache for inputs of ``input_shape`` =
        ``(*batch, max_length, features)``: Cache Refs, index 0."""
        shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
        self.cached_key = Cache(jnp.zeros(shape, dtype))
        self.cached_value = Cache(jnp.zeros(shape, dtype))
        self.cache_index = Cache(jnp.array(0, dtype=jnp.int32))
