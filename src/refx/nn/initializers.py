"""Initializers: ``jax.nn.initializers``, plus NNX's ``zeros_init()`` / ``ones_init()``."""

from typing import Any

from jax.nn.initializers import *  # noqa: F403
from jax.nn.initializers import ones, zeros


def zeros_init() -> Any:
    """The zeros initializer (NNX's spelling)."""
    return zeros


def ones_init() -> Any:
    """The ones initializer (NNX's spelling)."""
    return ones
