"""Refs in array code: operators, indexing and array attributes on `refx.Ref`.

A Ref stands for its current value in an array expression, the idiom of
JAX's ``jax.Ref`` and Flax NNX's ``Variable``::

    w = refx.Ref(jnp.ones((3, 3)), "params")
    y = x @ w + 1          # arrays of w's current value
    w[...] = w * 0.9       # an in-place write: shape and dtype checked
    w[0, 0] = 2.0          # w.value.at[0, 0].set(2.0)

What is defined, all in terms of ``ref.value`` (read through the Ref at the
moment of the call, so a traced value is fine):

* arithmetic, matmul, bitwise, unary and ordering operators (``<``, ``<=``,
  ``>``, ``>=``), both ways round (``x + ref`` and ``ref + x``); the result
  is an array, never a Ref;
* ``shape``, ``dtype``, ``ndim``, ``size``, ``T``, ``astype``, ``reshape``,
  ``sum``, ``mean``;
* ``ref[idx]`` reads ``ref.value[idx]``; ``ref[idx] = x`` writes
  ``ref.value.at[idx].set(x)`` (``ref[...] = x`` replaces the value), with
  every check of a ``.value`` write (trace level, ``refx.mutable``) and these:
  ``ref[...] = x`` keeps the value's shape (``ValueError``) and dtype
  (``TypeError``), an array written at an index must have the value's dtype
  (``TypeError``; JAX's ``.at[].set`` would cast it silently), and a Python
  scalar is taken at the value's dtype;
* ``__jax_array__`` and ``__array__``, so ``jnp.asarray(ref)`` and
  ``np.asarray(ref)`` give the value; ``float(ref)``, ``int(ref)``, and
  iterating over the value's first axis.

``==`` and ``!=`` stay *identity* and a Ref stays hashable by identity
(refx keys Refs by identity everywhere: ties, partitions, dict keys); compare
values with ``ref.value == x``.  There is no ``len(ref)`` and no
``bool(ref)`` by value, so ``if ref:`` keeps meaning "is there a Ref".

``jnp``/``lax`` *functions* do not call ``__jax_array__`` on their
arguments on the JAX versions refx supports ("Triggering __jax_array__()
during abstractification is no longer supported"), so ``jnp.sum(ref)`` is an
error: write ``jnp.sum(ref.value)`` or ``jnp.sum(ref[...])``.  Operators and
``jnp.asarray`` do work.

Ref is a heap type without Py_TPFLAGS_IMMUTABLETYPE, so these are ordinary
Python methods set on it here, once, when refx is imported; subclasses
inherit them.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ._core import Ref  # type: ignore[import-not-found]


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Ref) else x


def _describe(ref: Any) -> str:
    return f"this {type(ref).__name__} (collection {ref.collection!r})"


def _spec(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def _binary(op: Any, name: str) -> tuple[Any, Any]:
    def forward(self: Any, other: Any) -> Any:
        return op(self.value, _value(other))

    def reflected(self: Any, other: Any) -> Any:
        return op(_value(other), self.value)

    forward.__name__ = f"__{name}__"
    reflected.__name__ = f"__r{name}__"
    forward.__doc__ = f"``{name}`` of the current value (an array, not a Ref)."
    reflected.__doc__ = forward.__doc__
    return forward, reflected


_BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
    "lshift": operator.lshift,
    "rshift": operator.rshift,
}

_COMPARE = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}
_UNARY = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert}


def _getitem(self: Any, idx: Any) -> Any:
    return self.value[idx]


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, bool | int | float | complex)


def _setitem(self: Any, idx: Any, x: Any) -> None:
    old = self.value
    x = _value(x)
    if not (hasattr(old, "shape") and hasattr(old, "dtype")):
        if idx is Ellipsis:
            self.value = x
            return
        raise TypeError(
            f"ref[{idx!r}] = x: {_describe(self)} holds a {type(old).__name__}, not an "
            "array; only ref[...] = x (a whole new value) is defined for it"
        )
    import jax.numpy as jnp

    if _is_python_scalar(x):
        if idx is Ellipsis:
            self.value = jnp.full(old.shape, x, old.dtype)
        else:
            self.value = old.at[idx].set(jnp.asarray(x, old.dtype))
        return
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or shape is None:
        x = jnp.asarray(x)
        dtype, shape = x.dtype, x.shape
    if dtype != old.dtype:
        raise TypeError(
            f"ref[{'...' if idx is Ellipsis else repr(idx)}] = x: x is {_spec(x)} but "
            f"{_describe(self)} holds {_spec(old)}; the dtype must match (nothing is cast: "
            "use x.astype(ref.dtype), or assign ref.value to change the dtype)"
        )
    if idx is Ellipsis:
        if tuple(shape) != tuple(old.shape):
            raise ValueError(
                f"ref[...] = x: x is {_spec(x)} but {_describe(self)} holds {_spec(old)}; "
                "ref[...] = x keeps the shape (assign ref.value to change it)"
            )
        self.value = x
        return
    if isinstance(old, np.ndarray):
        new = old.copy()
        new[idx] = x
        self.value = new
    else:
        self.value = old.at[idx].set(x)


def _jax_array(self: Any) -> Any:
    import jax.numpy as jnp

    return jnp.asarray(self.value)


def _array(self: Any, dtype: Any = None, copy: Any = None) -> Any:
    out = np.asarray(self.value, dtype=dtype)
    return out.copy() if copy else out


def _iter(self: Any) -> Any:
    return iter(self.value)


def _unary(op: Any, name: str) -> Any:
    def unary(self: Any) -> Any:
        return op(self.value)

    unary.__name__ = f"__{name}__"
    return unary


def _attribute(attr: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.value, attr)

    return property(get, doc=f"``ref.value.{attr}``")


def _method(meth: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.value, meth)(*args, **kwargs)

    method.__name__ = meth
    method.__doc__ = f"``ref.value.{meth}(...)``"
    return method


def _float(self: Any) -> float:
    return float(self.value)


def _int(self: Any) -> int:
    return int(self.value)


def _complex(self: Any) -> complex:
    return complex(self.value)


#: The attributes this module sets on Ref (Python by design; the rest of Ref is C).
NAMES = frozenset(
    [f"__{n}__" for n in _BINARY] + [f"__r{n}__" for n in _BINARY]
    + [f"__{n}__" for n in (*_COMPARE, *_UNARY)]
    + ["__getitem__", "__setitem__", "__iter__", "__jax_array__", "__array__",
       "__array_priority__", "__float__", "__int__", "__complex__",
       "shape", "dtype", "ndim", "size", "T", "astype", "reshape", "sum", "mean"]
)


def _install() -> None:
    for name, op in _BINARY.items():
        forward, reflected = _binary(op, name)
        setattr(Ref, f"__{name}__", forward)
        setattr(Ref, f"__r{name}__", reflected)
    for name, op in _COMPARE.items():
        forward, _ = _binary(op, name)
        setattr(Ref, f"__{name}__", forward)
    for name, unary_op in _UNARY.items():
        setattr(Ref, f"__{name}__", _unary(unary_op, name))
    Ref.__getitem__ = _getitem
    Ref.__setitem__ = _setitem
    Ref.__iter__ = _iter
    Ref.__jax_array__ = _jax_array
    Ref.__array__ = _array
    # numpy defers `ndarray + ref` to Ref.__radd__ instead of converting the
    # Ref with __array__ (which would fail on a traced value)
    Ref.__array_priority__ = 100
    Ref.__float__ = _float
    Ref.__int__ = _int
    Ref.__complex__ = _complex
    for attr in ("shape", "dtype", "ndim", "size", "T"):
        setattr(Ref, attr, _attribute(attr))
    for meth in ("astype", "reshape", "sum", "mean"):
        setattr(Ref, meth, _method(meth))


_install()
