"""refx.nn: layers, Module, Rngs and Optimizer built on refx Refs.

``import refx.nn as nn``.  Constructor signatures, parameter names and
layouts follow Flax NNX, so a model moves from NNX by changing imports and
each layer is tested against NNX on the same weights.  A model is an
ordinary object (``nn.Module`` subclasses are pytrees with no decorator):
pass it to ``refx.jit``, ``refx.grad(..., wrt=nn.Param)``, ``refx.vmap``,
``refx.scan``, ``refx.state_dict``, ``refx.summary``.

Ref types: ``Param`` ("params"), ``BatchStat`` ("batch_stats"), ``Cache``
("cache"), ``RngKey``/``RngCount`` ("rngs", base ``RngState``), ``OptState``
("opt_state"), ``Intermediate``; all subclass ``Variable`` (a ``refx.Ref``).
"""

from ._attention import (
    MultiHeadAttention,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    make_attention_mask,
    make_causal_mask,
)
from ._bridge import Wrapped, from_equinox, wrap
from ._linear import (
    Conv,
    ConvTranspose,
    Einsum,
    Embed,
    Linear,
    LinearGeneral,
    Partitioned,
    promote_dtype,
    with_partitioning,
)
from ._module import Module
from ._norm import BatchNorm, Dropout, GroupNorm, LayerNorm, RMSNorm
from ._optim import Optimizer
from ._recurrent import RNN, Fn, GRUCell, LSTMCell, Sequential, SimpleCell
from ._refs import (
    BatchStat,
    Cache,
    Intermediate,
    OptState,
    Param,
    RngCount,
    RngKey,
    RngState,
    Variable,
)
from ._rngs import Rngs, RngStream

from . import initializers  # jax.nn.initializers + zeros_init/ones_init

# -- activations, as NNX re-exports them (jax.nn's; tanh is jnp.tanh) --
from jax.nn import (  # noqa: E402
    celu,
    elu,
    gelu,
    glu,
    hard_sigmoid,
    hard_silu,
    hard_swish,
    hard_tanh,
    leaky_relu,
    log_sigmoid,
    log_softmax,
    logsumexp,
    one_hot,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    soft_sign,
    softmax,
    softplus,
    standardize,
    swish,
)
from jax.numpy import tanh  # noqa: E402

__all__ = [
    "BatchNorm", "BatchStat", "Cache", "Conv", "ConvTranspose", "Dropout", "Einsum", "Embed",
    "Fn", "GRUCell", "GroupNorm", "Intermediate", "LSTMCell", "LayerNorm", "Linear",
    "LinearGeneral", "Module", "MultiHeadAttention", "OptState", "Optimizer", "Param",
    "Partitioned", "RMSNorm", "RNN", "RngCount", "RngKey", "RngState", "RngStream", "Rngs",
    "Sequential", "SimpleCell", "Variable", "Wrapped", "combine_masks", "dot_product_attention",
    "dot_product_attention_weights", "from_equinox", "initializers", "make_attention_mask",
    "make_causal_mask", "promote_dtype", "tanh", "with_partitioning", "wrap",
    # activations
    "celu", "elu", "gelu", "glu", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
    "leaky_relu", "log_sigmoid", "log_softmax", "logsumexp", "one_hot", "relu", "relu6",
    "selu", "sigmoid", "silu", "soft_sign", "softmax", "softplus", "standardize", "swish",
]
