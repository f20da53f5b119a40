"""Question 6: how many lines of user code does one training step take?

The same step in refx, Flax NNX and Equinox: an MLP with BatchNorm (running
statistics, state written by the forward pass) and Dropout (a random key
that must advance), trained with optax's adam on the digits task's shapes
(64 inputs, 10 classes).  Counted, per library: the loss function, the
jitted step function (decorator included) and what the training loop
writes per step to call it; the model's own code is left out (every
library has its layers).  Lines are counted from the source that runs
(`inspect.getsource`, blank lines and comments dropped), and before
counting each step is run and must bring the loss down.

The tied weight of examples/train_digits.py is left out of this model:
Equinox cannot hold one array in two places of a pytree, and needs
`eqx.nn.Shared` for it (more lines again).
"""

from __future__ import annotations

import inspect
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import refx
from common import SMOKE, check, print_table, save

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from nn import BatchNorm, Dropout, Linear, Module, Optimizer  # noqa: E402

H = 64
STEPS = 5 if SMOKE else 60
TX = optax.adam(1e-2)


def data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 64), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, 128), dtype=jnp.int32)
    return x, y


def count(*objs) -> int:
    """Lines of code of these functions/strings: no blanks, no comments."""
    n = 0
    for o in objs:
        src = o if isinstance(o, str) else inspect.getsource(o)
        n += sum(1 for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#"))
    return n


# ------------------------------------------------------------------ refx


class RefxMLP(Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1, self.bn = Linear(64, H, key=k1), BatchNorm(H)
        self.drop = Dropout(0.1, rng=refx.Ref(jax.random.key(1), "rng"))
        self.l2 = Linear(H, 10, key=k2)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x), train=True)), train=True))


def refx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@refx.jit
def refx_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(refx_loss)(model, x, y)
    opt.update(model, grads)
    return loss


REFX_CALL = "loss = refx_step(model, opt, x, y)"


def run_refx(x, y):
    model = RefxMLP(jax.random.key(0))
    opt = Optimizer(model, TX)
    losses = []
    for _ in range(STEPS):
        ns = {"refx_step": refx_step, "model": model, "opt": opt, "x": x, "y": y}
        exec(REFX_CALL, ns)
        losses.append(float(ns["loss"]))
    return losses, count(refx_loss, refx_step, REFX_CALL)


# ----------------------------------------------------------------- Flax NNX


def run_nnx(x, y):
    from flax import nnx

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.bn = nnx.Linear(64, H, rngs=rngs), nnx.BatchNorm(H, rngs=rngs)
            self.drop, self.l2 = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(H, 10, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    def nnx_loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    call = "loss = nnx_step(model, optimizer, x, y)"
    model = NNXMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    losses = []
    for _ in range(STEPS):
        ns = {"nnx_step": nnx_step, "model": model, "optimizer": optimizer, "x": x, "y": y}
        exec(call, ns)
        losses.append(float(ns["loss"]))
    return losses, count(nnx_loss, nnx_step, call)


# ------------------------------------------------------------------ Equinox


def run_equinox(x, y):
    import equinox as eqx

    class EqxMLP(eqx.Module):
        l1: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        drop: eqx.nn.Dropout
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.l1, self.bn = eqx.nn.Linear(64, H, key=k1), eqx.nn.BatchNorm(H, axis_name="batch", mode="batch")
            self.drop, self.l2 = eqx.nn.Dropout(0.1), eqx.nn.Linear(H, 10, key=k2)

        def __call__(self, x, state, key):
            h, state = self.bn(self.l1(x), state)
            return self.l2(self.drop(jax.nn.relu(h), key=key)), state

    def eqx_loss(model, state, x, y, key):
        keys = jax.random.split(key, x.shape[0])
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
        logits, state = batched(x, state, keys)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    @eqx.filter_jit
    def eqx_step(model, state, opt_state, x, y, key):
        (loss, state), grads = eqx.filter_value_and_grad(eqx_loss, has_aux=True)(
            model, state, x, y, key)
        updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model = eqx.apply_updates(model, updates)
        return model, state, opt_state, loss

    call = ("key, sub = jax.random.split(key)\n"
            "model, state, opt_state, loss = eqx_step(model, state, opt_state, x, y, sub)")
    model, state = eqx.nn.make_with_state(EqxMLP)(jax.random.key(0))
    opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))
    ns = {"eqx_step": eqx_step, "jax": jax, "model": model, "state": state,
          "opt_state": opt_state, "key": jax.random.key(1), "x": x, "y": y}
    losses = []
    for _ in range(STEPS):
        exec(call, ns)
        losses.append(float(ns["loss"]))
    return losses, count(eqx_loss, eqx_step, call)


def main() -> None:
    x, y = data()
    rows, data_out = [], {"question": "lines", "rows": []}
    for name, run in [("refx", run_refx), ("Flax NNX", run_nnx), ("Equinox", run_equinox)]:
        losses, lines = run(x, y)
        check(all(np.isfinite(losses)) and losses[-1] < losses[0],
              f"{name}: the step must bring the loss down ({losses[0]:.3f} -> {losses[-1]:.3f})")
        rows.append([name, str(lines), f"{losses[0]:.3f} -> {losses[-1]:.3f}"])
        data_out["rows"].append({"library": name, "lines": lines, "first_loss": losses[0],
                                 "last_loss": losses[-1]})
    table = print_table("6. lines of user code for one training step (loss function + jitted step + "
                "the loop's call), MLP with BatchNorm and Dropout, adam",
                ["library", "lines", f"loss over {STEPS} steps (checked to fall)"], rows)
    if not SMOKE:
        save("lines", data_out, table)


if __name__ == "__main__":
    main()
