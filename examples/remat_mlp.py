"""A deep residual MLP whose blocks are rematerialised with refx.remat
(`make examples`).

`refx.remat(Block.__call__)` is `jax.checkpoint` for a function of Refs:
in the backward pass each block's activations are recomputed from its
input instead of being kept from the forward pass.  Each block also
records the RMS of its output in a Ref (collection "stats", written
inside the rematerialised call; the write comes back through refx.remat,
refx.value_and_grad and refx.jit).  The script checks that the gradients
with and without remat are equal, shows how many arrays the backward pass
keeps in each case (`jax.ad_checkpoint.print_saved_residuals`), and trains
the model to fit a smooth function.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import print_saved_residuals

import refx
import refx.nn as nn

Array = jax.Array

DIN = 8


class Block(nn.Module):
    """x + 0.5 * tanh(linear(x)); remembers the RMS of its last output."""

    def __init__(self, width: int, *, rngs: nn.Rngs) -> None:
        self.linear = nn.Linear(width, width, rngs=rngs)
        self.rms: refx.Ref[Array] = refx.Ref(jnp.zeros(()), "stats")

    def __call__(self, x: Array) -> Array:
        y = x + 0.5 * jnp.tanh(self.linear(x))
        self.rms.value = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(y**2)))
        return y


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int, *, seed: int) -> None:
        rngs = nn.Rngs(seed)
        self.inp = nn.Linear(DIN, width, rngs=rngs)
        self.blocks = [Block(width, rngs=rngs) for _ in range(depth)]
        self.out = nn.Linear(width, 1, rngs=rngs)

    def __call__(self, x: Array, *, remat: bool) -> Array:
        block: Callable[[Block, Array], Array] = (
            refx.remat(Block.__call__) if remat else Block.__call__)
        h = self.inp(x)
        for b in self.blocks:
            h = block(b, h)
        return self.out(h)[:, 0]


def loss_fn(model: DeepMLP, x: Array, y: Array, remat: bool) -> Array:
    return jnp.mean((model(x, remat=remat) - y) ** 2)


@refx.jit(static_argnums=3)
def gradients(model: DeepMLP, x: Array, y: Array, remat: bool) -> refx.Partition:
    grads: refx.Partition = refx.grad(loss_fn)(model, x, y, remat)
    return grads


@refx.jit
def train_step(model: DeepMLP, opt: nn.Optimizer, x: Array, y: Array) -> Array:
    loss: Array
    loss, grads = refx.value_and_grad(loss_fn)(model, x, y, True)
    opt.update(model, grads)
    return loss


def saved_residuals(model: DeepMLP, x: Array, y: Array, remat: bool) -> tuple[int, int]:
    """(arrays, floats) the backward pass keeps, besides the arguments."""

    def f(params: refx.Partition) -> Array:
        m = refx.clone(model)  # Refs of this trace, holding the traced params
        refx.update_refs(refx.get_partition(m, "params"), params)
        return loss_fn(m, x, y, remat)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        params = refx.get_partition(refx.deref(model), "params")
        print_saved_residuals(f, params)  # type: ignore[no-untyped-call]
    kept = [line for line in out.getvalue().splitlines()
            if line and "from the argument" not in line]
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d]))
             for line in kept if (m := re.match(r"\w+\[([\d,]*)\]", line))]
    return len(kept), sum(sizes)


def data(n: int, seed: int) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIN)).astype(np.float32)
    a = rng.normal(size=(DIN,)).astype(np.float32) / np.sqrt(DIN)
    return jnp.asarray(x), jnp.asarray(np.sin(2.0 * x @ a))


def run(steps: int, *, depth: int = 12, width: int = 64, seed: int = 0) -> dict[str, float]:
    x, y = data(256, seed)
    model = DeepMLP(depth, width, seed=seed)
    g_remat = gradients(model, x, y, True)
    g_plain = gradients(model, x, y, False)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain), strict=True))
    kept_remat = saved_residuals(model, x, y, True)
    kept_plain = saved_residuals(model, x, y, False)
    opt = nn.Optimizer(model, optax.adam(3e-3), wrt=nn.Param)
    losses = [float(train_step(model, opt, x, y)) for _ in range(steps)]
    rms = float(model.blocks[-1].rms.value)
    assert diff < 1e-5, f"remat changed the gradients by {diff}"
    assert kept_remat[1] < kept_plain[1], (kept_remat, kept_plain)
    assert rms > 0.0, "the write inside refx.remat did not come back"
    return {"grad_diff": diff, "kept_remat": kept_remat[0], "floats_remat": kept_remat[1],
            "kept_plain": kept_plain[0], "floats_plain": kept_plain[1],
            "first_loss": losses[0], "last_loss": losses[-1], "last_rms": rms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = run(args.steps, depth=args.depth, seed=args.seed)
    elapsed = time.perf_counter() - t0
    print(f"{args.depth}-block residual MLP, every block under refx.remat ({elapsed:.1f}s, "
          "compiling included)")
    print(f"gradients with and without remat: max difference {r['grad_diff']:.1e}")
    print(f"kept for the backward pass: {r['kept_remat']} arrays ({r['floats_remat']:,.0f} "
          f"floats) with remat, {r['kept_plain']} arrays ({r['floats_plain']:,.0f} floats) "
          "without")
    print(f"training loss: {r['first_loss']:.4f} -> {r['last_loss']:.4f}; last block's output "
          f"RMS, written inside refx.remat: {r['last_rms']:.3f}")
    assert r["last_loss"] < 0.5 * r["first_loss"]


if __name__ == "__main__":
    main()
