"""LSTMCell, GRUCell, SimpleCell, RNN (a cell over a sequence with refx.scan) and Sequential.

Cells follow Flax NNX (flax/nnx/nn/recurrent.py, Apache-2.0): LSTMCell has
the eight Linear layers ``ii, if_, ig, io`` (input, no bias) and ``hi, hf,
hg, ho`` (hidden, with bias), carry ``(c, h)``; GRUCell has ``dense_i``
(``3 * hidden``, bias) and ``dense_h`` (no bias), gates ``r, z, n``.
``RNN(cell)(inputs)`` scans the cell over the time axis with ``refx.scan``,
the cell in the carry: a cell that writes Refs (a counter, a random
stream) writes them per step and the caller's Refs get the last values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .. import scan
from ._linear import _NO_METADATA, Initializer, Linear, default_kernel_init, initializers
from ._module import Module

_orthogonal = initializers.orthogonal()
_lecun_normal = initializers.lecun_normal()


def modified_orthogonal(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
    return initializers.orthogonal()(key, shape).astype(dtype)


def _carry_init(cell: Any, carry_init: Initializer | None, rngs: Any) -> tuple[Initializer, Any]:
    init = carry_init or cell.carry_init or initializers.zeros
    if rngs is None:
        return init, lambda: jax.random.key(0)
    from ._norm import _stream

    stream = _stream(rngs, "carry")
    return init, stream


class LSTMCell(Module):
    """Long short-term memory cell; carry ``(c, h)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = jax.nn.sigmoid,
        activation_fn: Callable[..., Any] = jnp.tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = modified_orthogonal,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        carry_init: Initializer | None = None,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype

        def dense_i() -> Linear:
            return Linear(in_features, hidden_features, use_bias=False, kernel_init=kernel_init,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          kernel_metadata=kernel_metadata)

        def dense_h() -> Linear:
            return Linear(hidden_features, hidden_features, use_bias=True,
                          kernel_init=recurrent_kernel_init, bias_init=bias_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs,
                          kernel_metadata=recurrent_kernel_metadata, bias_metadata=bias_metadata)

        self.ii, self.if_, self.ig, self.io = dense_i(), dense_i(), dense_i(), dense_i()
        self.hi, self.hf, self.hg, self.ho = dense_h(), dense_h(), dense_h(), dense_h()
        self.carry_init = carry_init

    def __call__(
        self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array
    ) -> tuple[Any, jax.Array]:
        c, h = carry
        i = self.gate_fn(self.ii(inputs) + self.hi(h))
        f = self.gate_fn(self.if_(inputs) + self.hf(h))
        g = self.activation_fn(self.ig(inputs) + self.hg(h))
        o = self.gate_fn(self.io(inputs) + self.ho(h))
        new_c = f * c + i * g
        new_h = o * self.activation_fn(new_c)
        return (new_c, new_h), new_h

    def initialize_carry(
        self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Initializer | None = None
    ) -> tuple[jax.Array, jax.Array]:
        init, key = _carry_init(self, carry_init, rngs)
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        return init(key(), shape, self.param_dtype), init(key(), shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class GRUCell(Module):
    """Gated recurrent unit cell; carry ``h``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = jax.nn.sigmoid,
        activation_fn: Callable[..., Any] = jnp.tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = _orthogonal,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        carry_init: Initializer | None = None,
        rngs: Any,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.dense_i = Linear(in_features, 3 * hidden_features, use_bias=True,
                              kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs,
                              kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
        self.dense_h = Linear(hidden_features, 3 * hidden_features, use_bias=False,
                              kernel_init=recurrent_kernel_init, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs,
                              kernel_metadata=recurrent_kernel_metadata)
        self.carry_init = carry_init

    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = carry
        xi_r, xi_z, xi_n = jnp.split(self.dense_i(inputs), 3, axis=-1)
        hh_r, hh_z, hh_n = jnp.split(self.dense_h(h), 3, axis=-1)
        r = self.gate_fn(xi_r + hh_r)
        z = self.gate_fn(xi_z + hh_z)
        n = self.activation_fn(xi_n + r * hh_n)
        new_h = (1.0 - z) * n + z * h
        return new_h, new_h

    def initialize_carry(
        self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Initializer | None = None
    ) -> jax.Array:
        init, key = _carry_init(self, carry_init, rngs)
        return init(key(), tuple(input_shape[:-1]) + (self.hidden_features,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class SimpleCell(Module):
    """``h' = activation(dense_i(x) + dense_h(h))``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        carry_init: Initializer | None = None,
        residual: bool = False,
        activation_fn: Callable[..., Any] = jnp.tanh,
        kernel_init: Initializer = _lecun_normal,
        recurrent_kernel_init: Initializer = _orthogonal,
        bias_init: Initializer = initializers.zeros,
        rngs: Any,
    ) -> None:
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.residual = residual
        self.activation_fn = activation_fn
        self.dense_h = Linear(hidden_features, hidden_features, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=recurrent_kernel_init,
                              rngs=rngs)
        self.dense_i = Linear(in_features, hidden_features, use_bias=True, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=kernel_init,
                              bias_init=bias_init, rngs=rngs)
        self.carry_init = carry_init

    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        new = self.dense_i(inputs) + self.dense_h(carry)
        if self.residual:
            new += carry
        new = self.activation_fn(new)
        return new, new

    def initialize_carry(
        self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Initializer | None = None
    ) -> jax.Array:
        init, key = _carry_init(self, carry_init, rngs)
        return init(key(), tuple(input_shape[:-1]) + (self.hidden_features,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class RNN(Module):
    """A cell over a sequence (``refx.scan``): inputs ``(*batch, time, features)``
    (``time_major=True``: ``(time, *batch, features)``); returns the outputs,
    or ``(carry, outputs)`` with ``return_carry=True``."""

    def __init__(
        self,
        cell: Module,
        *,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int = 1,
    ) -> None:
        self.cell = cell
        self.time_major = time_major
        self.return_carry = return_carry
        self.reverse = reverse
        self.keep_order = keep_order
        self.unroll = unroll

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        rngs: Any = None,
    ) -> Any:
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        nfa = self.cell.num_feature_axes  # type: ignore[attr-defined]
        time_axis = 0 if time_major else inputs.ndim - (nfa + 1)
        if initial_carry is None:
            step_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1:]
            initial_carry = self.cell.initialize_carry(step_shape, rngs)  # type: ignore[attr-defined]
        xs = jnp.moveaxis(inputs, time_axis, 0)

        def body(state: Any, x: jax.Array) -> Any:
            cell, carry = state
            carry, y = cell(carry, x)
            return (cell, carry), y

        (_, carry), ys = scan(body, (self.cell, initial_carry), xs, reverse=reverse,
                              unroll=self.unroll)
        if reverse and not keep_order:
            ys = jnp.flip(ys, axis=0)
        outputs = jnp.moveaxis(ys, 0, time_axis)
        return (carry, outputs) if return_carry else outputs


class Sequential(Module):
    """``Sequential(f, g, h)(x) == h(g(f(x)))``; layers in ``self.layers``."""

    def __init__(self, *fns: Callable[..., Any]) -> None:
        # a plain function (nn.relu) is wrapped in a Module holding it as a
        # static attribute: inside the list it would otherwise be a pytree leaf
        self.layers = [f if isinstance(f, Module) else Fn(f) for f in fns]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.layers:
            raise ValueError("Empty Sequential module")
        output: Any = None
        for i, f in enumerate(self.layers):
            output = f(*args, **kwargs) if i == 0 else f(output)
            args, kwargs = (output,), {}
        return output


class Fn(Module):
    """A function as a layer (what Sequential wraps plain functions in)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)
