"""Question 6: how many lines of user code do a model and its training step take?

The eight programs of issue 20's trial, each written three times, with
refx.nn, Flax NNX (`flax.nnx`) and Equinox, in each library's own idiom:

  mlp         an MLP with BatchNorm and Dropout
  cnn         a CNN (two convolutions, BatchNorm, a linear head)
  lstm        an LSTM over a sequence (nn.RNN / nnx.RNN: a scan; Equinox: lax.scan)
  ensemble    3 MLPs made and trained as one vmapped model
  sharded     an MLP declaring model-parallel shardings (the model definition
              only: its step is the plain one)
  checkpoint  an MLP with BatchNorm saved and restored into a fresh model
              (its "step" is the save/restore code)
  remat       a deep residual MLP whose blocks are rematerialised
  tied        an MLP whose decoder shares (transposed) the encoder's kernel

Two counts per program and library: the model definition (the classes and
the line that builds the model) and the training step (the loss function,
the jitted step with its decorator, the optimiser's construction and the
loop's call; for `checkpoint` the save and restore lines).  Lines are
non-blank, non-comment lines of the source text that runs: each program's
source is a string below, executed as written, then each version takes one
training step on tiny inputs and is checked (finite loss, parameters
changed, plus what the program is about: running statistics, a different
member per ensemble slot, the declared shardings, the restored values, the
tie kept) before anything is counted.  Imports are not counted.  Goal (issue
20): refx.nn <= Flax NNX on both counts, for every program.
"""

from __future__ import annotations

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import refx
import refx.nn as nn
from common import SMOKE, check, print_table, save

TX = optax.adam(1e-2)
LIBS = ["refx.nn", "Flax NNX", "Equinox"]


def count(src: str) -> int:
    """Lines of code of a source text: no blanks, no comments."""
    return sum(1 for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#"))


def data():
    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "x": jnp.asarray(rng.standard_normal((4, 8), dtype=f32)),
        "img": jnp.asarray(rng.standard_normal((4, 8, 8, 1), dtype=f32)),
        "seq": jnp.asarray(rng.standard_normal((4, 5, 8), dtype=f32)),
        "y": jnp.asarray(rng.integers(0, 4, 4), dtype=jnp.int32),
    }


# -------------------------------------------------------------------- steps
# The step most programs share, per library ({X}: the program's input).

REFX_STEP = """\
def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
@refx.jit
def train_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nn.Optimizer(model, TX, wrt=nn.Param)
loss = train_step(model, opt, {X}, y)
"""

NNX_STEP = """\
def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
loss = train_step(model, opt, {X}, y)
"""

EQX_STEP = """\
def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss
opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))
model, opt_state, loss = train_step(model, opt_state, {X}, y)
"""

EQX_STATE_STEP = """\
def loss_fn(model, state, x, y, key):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    logits, state = batched(x, state, jax.random.split(key, x.shape[0]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state
@eqx.filter_jit
def train_step(model, state, opt_state, x, y, key):
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, x, y, key)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss
opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))
key, sub = jax.random.split(key)
model, state, opt_state, loss = train_step(model, state, opt_state, {X}, y, sub)
"""

# ----------------------------------------------------------------- programs
# PROGRAMS[name][library] = (model source, step source, check source); the
# check source is not counted.

PROGRAMS: dict[str, dict[str, tuple[str, str, str]]] = {}

PROGRAMS["mlp"] = {
    "refx.nn": ("""\
class MLP(nn.Module):
    def __init__(self, rngs):
        self.l1 = nn.Linear(8, 16, rngs=rngs)
        self.bn = nn.BatchNorm(16, rngs=rngs)
        self.drop = nn.Dropout(0.1, rngs=rngs)
        self.l2 = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(self.drop(nn.relu(self.bn(self.l1(x)))))
model = MLP(nn.Rngs(0))
""", REFX_STEP.format(X="x"), "stats = model.bn.mean.value"),
    "Flax NNX": ("""\
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))
model = MLP(nnx.Rngs(0))
""", NNX_STEP.format(X="x"), "stats = model.bn.mean[...]"),
    "Equinox": ("""\
class MLP(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(8, 16, key=k1)
        self.bn = eqx.nn.BatchNorm(16, axis_name="batch", mode="ema")
        self.drop = eqx.nn.Dropout(0.1)
        self.l2 = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, x, state, key):
        h, state = self.bn(self.l1(x), state)
        return self.l2(self.drop(jax.nn.relu(h), key=key)), state
model, state = eqx.nn.make_with_state(MLP)(jax.random.key(0))
key = jax.random.key(1)
""", EQX_STATE_STEP.format(X="x"), "stats = state.get(model.bn.ema_state_index)[0]"),
}

PROGRAMS["cnn"] = {
    "refx.nn": ("""\
class CNN(nn.Module):
    def __init__(self, rngs):
        self.conv1 = nn.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nn.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn = nn.BatchNorm(16, rngs=rngs)
        self.head = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        x = nn.relu(self.bn(self.conv2(nn.relu(self.conv1(x)))))
        return self.head(x.mean(axis=(1, 2)))
model = CNN(nn.Rngs(0))
""", REFX_STEP.format(X="img"), "stats = model.bn.mean.value"),
    "Flax NNX": ("""\
class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv2(nnx.relu(self.conv1(x)))))
        return self.head(x.mean(axis=(1, 2)))
model = CNN(nnx.Rngs(0))
""", NNX_STEP.format(X="img"), "stats = model.bn.mean[...]"),
    "Equinox": ("""\
class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    head: eqx.nn.Linear
    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding="SAME", key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 16, 3, padding="SAME", key=k2)
        self.bn = eqx.nn.BatchNorm(16, axis_name="batch", mode="ema")
        self.head = eqx.nn.Linear(16, 4, key=k3)
    def __call__(self, x, state, key):
        x = jnp.transpose(x, (2, 0, 1))  # HWC -> CHW
        h, state = self.bn(self.conv2(jax.nn.relu(self.conv1(x))), state)
        return self.head(jax.nn.relu(h).mean(axis=(1, 2))), state
model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
key = jax.random.key(1)
""", EQX_STATE_STEP.format(X="img"), "stats = state.get(model.bn.ema_state_index)[0]"),
}

PROGRAMS["lstm"] = {
    "refx.nn": ("""\
class LSTM(nn.Module):
    def __init__(self, rngs):
        self.rnn = nn.RNN(nn.LSTMCell(8, 16, rngs=rngs))
        self.head = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])
model = LSTM(nn.Rngs(0))
""", REFX_STEP.format(X="seq"), ""),
    "Flax NNX": ("""\
class LSTM(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.LSTMCell(8, 16, rngs=rngs))
        self.head = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])
model = LSTM(nnx.Rngs(0))
""", NNX_STEP.format(X="seq"), ""),
    "Equinox": ("""\
class LSTM(eqx.Module):
    cell: eqx.nn.LSTMCell
    head: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.cell = eqx.nn.LSTMCell(8, 16, key=k1)
        self.head = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, xs):
        def step(carry, x):
            return self.cell(x, carry), None
        init = (jnp.zeros(16), jnp.zeros(16))
        (h, _), _ = jax.lax.scan(step, init, xs)
        return self.head(h)
model = LSTM(jax.random.key(0))
""", EQX_STEP.format(X="seq"), ""),
}

PROGRAMS["ensemble"] = {
    "refx.nn": ("""\
class Member(nn.Module):
    def __init__(self, rngs):
        self.l1 = nn.Linear(8, 16, rngs=rngs)
        self.l2 = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(nn.relu(self.l1(x)))
model = refx.vmap(Member)(nn.Rngs(0).split(3))
""", """\
def loss_fn(model, x, y):
    per_member = refx.vmap(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    return per_member.sum()
@refx.jit
def train_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nn.Optimizer(model, TX, wrt=nn.Param)
loss = train_step(model, opt, x, y)
""", "kernels = model.l1.kernel.value"),
    "Flax NNX": ("""\
class Member(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))
@nnx.split_rngs(splits=3)
@nnx.vmap
def make(rngs):
    return Member(rngs)
model = make(nnx.Rngs(0))
""", """\
def loss_fn(model, x, y):
    per_member = nnx.vmap(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    return per_member.sum()
@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
loss = train_step(model, opt, x, y)
""", "kernels = model.l1.kernel[...]"),
    "Equinox": ("""\
class Member(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(8, 16, key=k1)
        self.l2 = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))
model = eqx.filter_vmap(Member)(jax.random.split(jax.random.key(0), 3))
""", """\
def loss_fn(model, x, y):
    per_member = eqx.filter_vmap(lambda m: optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(x), y).mean())(model)
    return per_member.sum()
@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss
opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))
model, opt_state, loss = train_step(model, opt_state, x, y)
""", "kernels = model.l1.weight"),
}

PROGRAMS["sharded"] = {
    "refx.nn": ("""\
class MLP(nn.Module):
    def __init__(self, rngs):
        self.l1 = nn.Linear(8, 16, kernel_metadata={"sharding": (None, "model")}, rngs=rngs)
        self.l2 = nn.Linear(16, 4, kernel_metadata={"sharding": ("model", None)}, rngs=rngs)
    def __call__(self, x):
        return self.l2(nn.relu(self.l1(x)))
model = MLP(nn.Rngs(0))
""", None, "sp = refx.shardings(model, mesh); specs = [sp.l1.kernel.value.spec, sp.l2.kernel.value.spec]"),
    "Flax NNX": ("""\
class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
        self.l2 = nnx.Linear(16, 4, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs)
    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))
with jax.set_mesh(mesh):  # NNX places a declared sharding at construction
    model = MLP(nnx.Rngs(0))
""", None, "sp = nnx.get_partition_spec(nnx.state(model)); specs = [sp['l1']['kernel'], sp['l2']['kernel']]"),
    "Equinox": ("""\
class MLP(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(8, 16, key=k1)
        self.l2 = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))
def partition_specs(model):
    specs = jax.tree.map(lambda _: P(), model)
    specs = eqx.tree_at(lambda m: m.l1.weight, specs, P("model", None))
    return eqx.tree_at(lambda m: m.l2.weight, specs, P(None, "model"))
model = MLP(jax.random.key(0))
""", None, "sp = partition_specs(model); specs = [P(*reversed(sp.l1.weight)), P(*reversed(sp.l2.weight))]"),
}

PROGRAMS["checkpoint"] = {
    "refx.nn": ("""\
class MLP(nn.Module):
    def __init__(self, rngs):
        self.l1 = nn.Linear(8, 16, rngs=rngs)
        self.bn = nn.BatchNorm(16, rngs=rngs)
        self.l2 = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(nn.relu(self.bn(self.l1(x))))
model = MLP(nn.Rngs(0))
""", """\
refx.save(path, model)
fresh = MLP(nn.Rngs(1))
refx.restore(path, fresh)
""", "saved, restored = refx.state_dict(model), refx.state_dict(fresh)"),
    "Flax NNX": ("""\
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))
model = MLP(nnx.Rngs(0))
""", """\
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(path, nnx.state(model))
checkpointer.wait_until_finished()
fresh = MLP(nnx.Rngs(1))
nnx.update(fresh, checkpointer.restore(path, nnx.state(fresh)))
""", "saved, restored = nnx.state(model), nnx.state(fresh)"),
    "Equinox": ("""\
class MLP(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    l2: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(8, 16, key=k1)
        self.bn = eqx.nn.BatchNorm(16, axis_name="batch", mode="ema")
        self.l2 = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, x, state):
        h, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(h)), state
model, state = eqx.nn.make_with_state(MLP)(jax.random.key(0))
""", """\
eqx.tree_serialise_leaves(path, (model, state))
fresh = eqx.nn.make_with_state(MLP)(jax.random.key(1))
fresh = eqx.tree_deserialise_leaves(path, fresh)
""", "saved, restored = eqx.filter((model, state), eqx.is_array), eqx.filter(fresh, eqx.is_array)"),
}

PROGRAMS["remat"] = {
    "refx.nn": ("""\
class Block(nn.Module):
    def __init__(self, rngs):
        self.linear = nn.Linear(16, 16, rngs=rngs)
    def __call__(self, x):
        return x + nn.relu(self.linear(x))
class Deep(nn.Module):
    def __init__(self, rngs):
        self.inp = nn.Linear(8, 16, rngs=rngs)
        self.blocks = [Block(rngs) for _ in range(4)]
        self.head = nn.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = refx.remat(Block.__call__)(block, x)
        return self.head(x)
model = Deep(nn.Rngs(0))
""", REFX_STEP.format(X="x"), ""),
    "Flax NNX": ("""\
class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(16, 16, rngs=rngs)
    def __call__(self, x):
        return x + nnx.relu(self.linear(x))
class Deep(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(4)])
        self.head = nnx.Linear(16, 4, rngs=rngs)
    def __call__(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = nnx.remat(Block.__call__)(block, x)
        return self.head(x)
model = Deep(nnx.Rngs(0))
""", NNX_STEP.format(X="x"), ""),
    "Equinox": ("""\
class Block(eqx.Module):
    linear: eqx.nn.Linear
    def __init__(self, key):
        self.linear = eqx.nn.Linear(16, 16, key=key)
    def __call__(self, x):
        return x + jax.nn.relu(self.linear(x))
class Deep(eqx.Module):
    inp: eqx.nn.Linear
    blocks: list
    head: eqx.nn.Linear
    def __init__(self, key):
        keys = jax.random.split(key, 6)
        self.inp = eqx.nn.Linear(8, 16, key=keys[0])
        self.blocks = [Block(k) for k in keys[1:5]]
        self.head = eqx.nn.Linear(16, 4, key=keys[5])
    def __call__(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = eqx.filter_checkpoint(Block.__call__)(block, x)
        return self.head(x)
model = Deep(jax.random.key(0))
""", EQX_STEP.format(X="x"), ""),
}

PROGRAMS["tied"] = {
    "refx.nn": ("""\
class Decoder(nn.Module):
    def __init__(self, layer):
        self.kernel = layer.kernel  # the encoder's kernel: one Ref in two places
        self.bias = nn.Param(jnp.zeros(layer.in_features))
    def __call__(self, h):
        return h @ self.kernel.T + self.bias
class Tied(nn.Module):
    def __init__(self, rngs):
        self.enc = nn.Linear(8, 16, rngs=rngs)
        self.head = nn.Linear(16, 4, rngs=rngs)
        self.dec = Decoder(self.enc)
    def __call__(self, x):
        h = nn.relu(self.enc(x))
        return self.head(h), self.dec(h)
model = Tied(nn.Rngs(0))
""", """\
def loss_fn(model, x, y):
    logits, recon = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + jnp.mean((recon - x) ** 2)
@refx.jit
def train_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nn.Optimizer(model, TX, wrt=nn.Param)
loss = train_step(model, opt, x, y)
""", "tied = model.dec.kernel is model.enc.kernel"),
    "Flax NNX": ("""\
class Decoder(nnx.Module):
    def __init__(self, layer):
        self.kernel = layer.kernel  # the encoder's kernel: one Variable in two places
        self.bias = nnx.Param(jnp.zeros(layer.in_features))
    def __call__(self, h):
        return h @ self.kernel[...].T + self.bias[...]
class Tied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)
        self.dec = Decoder(self.enc)
    def __call__(self, x):
        h = nnx.relu(self.enc(x))
        return self.head(h), self.dec(h)
model = Tied(nnx.Rngs(0))
""", """\
def loss_fn(model, x, y):
    logits, recon = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + jnp.mean((recon - x) ** 2)
@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss
opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
loss = train_step(model, opt, x, y)
""", "tied = model.dec.kernel is model.enc.kernel"),
    "Equinox": ("""\
class Decoder(eqx.Module):
    kernel: jax.Array
    bias: jax.Array
    def __init__(self, layer):
        self.kernel = layer.weight
        self.bias = jnp.zeros(layer.in_features)
    def __call__(self, h):
        return h @ self.kernel + self.bias
class Tied(eqx.Module):
    shared: eqx.nn.Shared
    head: eqx.nn.Linear
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        enc = eqx.nn.Linear(8, 16, key=k1)
        where = lambda pair: pair[1].kernel  # noqa: E731
        self.shared = eqx.nn.Shared((enc, Decoder(enc)), where, lambda pair: pair[0].weight)
        self.head = eqx.nn.Linear(16, 4, key=k2)
    def __call__(self, x):
        enc, dec = self.shared()
        h = jax.nn.relu(enc(x))
        return self.head(h), dec(h)
model = Tied(jax.random.key(0))
""", """\
def loss_fn(model, x, y):
    logits, recon = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + jnp.mean((recon - x) ** 2)
@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss
opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))
model, opt_state, loss = train_step(model, opt_state, x, y)
""", "enc, dec = model.shared(); tied = bool(jnp.all(dec.kernel == enc.weight))"),
}

# ------------------------------------------------------------------ running


def namespace(lib: str, d: dict, tmp: pathlib.Path) -> dict:
    from jax.sharding import PartitionSpec as P
    ns = {"jax": jax, "jnp": jnp, "optax": optax, "TX": TX, "P": P, "path": tmp,
          "mesh": jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,)), **d}
    if lib == "refx.nn":
        ns.update(refx=refx, nn=nn)
    elif lib == "Flax NNX":
        import orbax.checkpoint as ocp
        from flax import nnx
        ns.update(nnx=nnx, ocp=ocp)
    else:
        import equinox as eqx
        ns.update(eqx=eqx)
    return ns


def params_of(lib: str, model) -> list:
    """The model's parameter arrays (copies, to compare before/after a step)."""
    if lib == "refx.nn":
        return [np.array(v) for v in jax.tree.leaves(refx.deref(refx.get_partition(model, nn.Param)))]
    if lib == "Flax NNX":
        from flax import nnx
        return [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    import equinox as eqx
    return [np.array(v) for v in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


PLAIN_STEP = {"refx.nn": REFX_STEP, "Flax NNX": NNX_STEP, "Equinox": EQX_STEP}


def run(prog: str, lib: str, d: dict) -> tuple[int, int | None]:
    """Execute one program's source, take its step, check it; its line counts."""
    model_src, step_src, check_src = PROGRAMS[prog][lib]
    where = f"{prog} / {lib}"
    with tempfile.TemporaryDirectory() as tmp:
        ns = namespace(lib, d, pathlib.Path(tmp) / "ckpt")
        exec(model_src, ns)
        before = params_of(lib, ns["model"])
        if prog == "checkpoint":
            exec(step_src, ns)
            exec(check_src, ns)
            saved = jax.tree.leaves(ns["saved"])
            restored = jax.tree.leaves(ns["restored"])
            fresh_init = ns["fresh"][0] if lib == "Equinox" else ns["fresh"]
            check(len(saved) == len(restored) > 0 and all(
                np.array_equal(a, b) for a, b in zip(saved, restored, strict=True)),
                f"{where}: the restored model differs from the saved one")
            check(all(np.array_equal(a, b) for a, b in zip(before, params_of(lib, fresh_init),
                                                           strict=True)),
                  f"{where}: restore did not bring back the saved parameters")
            return count(model_src), count(step_src)
        if prog == "sharded":  # its plain step, on the model's (one-device) mesh
            with jax.set_mesh(ns["mesh"]):
                exec(PLAIN_STEP[lib].format(X="x"), ns)
        else:
            exec(step_src, ns)
        loss = float(ns["loss"])
        after = params_of(lib, ns["model"])
        check(np.isfinite(loss), f"{where}: loss {loss}")
        check(any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)),
              f"{where}: the step changed no parameter")
        if check_src:
            exec(check_src, ns)
        if prog in ("mlp", "cnn"):
            check(float(jnp.abs(ns["stats"]).sum()) > 0, f"{where}: running mean not updated")
        if prog == "ensemble":
            k = np.asarray(ns["kernels"])
            check(k.shape[0] == 3 and not np.allclose(k[0], k[1]), f"{where}: members alike")
        if prog == "sharded":
            from jax.sharding import PartitionSpec as P
            check(list(ns["specs"]) == [P(None, "model"), P("model", None)],
                  f"{where}: shardings {ns['specs']}")
        if prog == "tied":
            check(bool(ns["tied"]), f"{where}: the tie came apart")
        return count(model_src), (None if step_src is None else count(step_src))


def main() -> None:
    d = data()
    rows, out = [], {"question": "lines", "rows": []}
    for prog in PROGRAMS:
        counts = {lib: run(prog, lib, d) for lib in LIBS}
        (rm, rs), (nm, ns_) = counts["refx.nn"], counts["Flax NNX"]
        met = rm <= nm and (rs is None or ns_ is None or rs <= ns_)
        cell = lambda c: "-" if c is None else str(c)  # noqa: E731
        rows.append([prog, *(f"{cell(counts[lib][0])} / {cell(counts[lib][1])}" for lib in LIBS),
                     "yes" if met else "NO"])
        out["rows"].append({"program": prog, "met": met,
                            **{lib: {"model": counts[lib][0], "step": counts[lib][1]} for lib in LIBS}})
    table = print_table(
        "6. lines of user code, model definition / training step, the eight programs of issue 20 "
        "(each run one step and checked; '-': not counted)",
        ["program", *(f"{lib} model / step" for lib in LIBS), "refx.nn <= NNX on both"], rows)
    missed = [r["program"] for r in out["rows"] if not r["met"]]
    print("goal refx.nn <= Flax NNX on both counts, every program: "
          + ("met" if not missed else f"NOT met for {', '.join(missed)}"))
    if not SMOKE:
        save("lines", out, table)


if __name__ == "__main__":
    main()
