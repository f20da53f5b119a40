"""Train an MLP on scikit-learn's handwritten digits with refx (`make demo`).

The model is built from `refx.nn` layers (Flax NNX's signatures) and has
BatchNorm, Dropout and a tied weight: a decoder that reconstructs the input
from the first hidden layer using the first layer's kernel Ref, transposed.
Its state sits in collections: "params" (`nn.Param`, trained),
"batch_stats" (`nn.BatchStat`, BatchNorm running averages), "rngs" (the
dropout stream's key and counter) and "opt_state" (`nn.Optimizer`'s optax
state, one Ref per array).  One training step is a `refx.jit` function of
the model and the optimiser: `refx.value_and_grad` differentiates the
`nn.Param` Refs (the forward pass writes the batch stats and advances the
dropout counter, and they are written back), the optimiser updates the
params in place, and refx.jit writes every Ref the step wrote back into the
caller's model.  `model.train()` / `model.eval()` switch Dropout and
BatchNorm.  No functional plumbing reaches the code.

Afterwards the script checks the tied weight is still one Ref, plots the
loss, and round-trips an orbax checkpoint (params + batch stats, named by
path, through refx.save / refx.restore) into a freshly built model.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import refx
import refx.nn as nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
Array = jax.Array
Sharding = tuple[str | None, ...]  # mesh axis names (or None) per dimension


# --------------------------------------------------------------- the model


def declare(sharding: Sharding | None) -> dict[str, Any]:
    """A parameter's metadata: its sharding, or nothing."""
    return {} if sharding is None else {"sharding": sharding}


class Block(nn.Module):
    def __init__(
        self, din: int, dout: int, *, dropout: float, rngs: nn.Rngs,
        sharding: Sharding | None = None,
    ):
        features = declare(sharding and sharding[1:])  # of the output features
        self.linear = nn.Linear(din, dout, rngs=rngs, kernel_metadata=declare(sharding),
                                bias_metadata=features)
        self.norm = nn.BatchNorm(dout, momentum=0.9, rngs=rngs, scale_metadata=features,
                                 bias_metadata=features)
        self.drop = nn.Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.drop(nn.relu(self.norm(self.linear(x))))


class TiedDecoder(nn.Module):
    """Maps a layer's outputs back to its inputs with the *same* kernel Ref
    (used transposed) and a bias of its own."""

    def __init__(self, layer: nn.Linear, sharding: Sharding | None = None):
        self.kernel = layer.kernel  # shared: one Ref, two layers
        self.bias = nn.Param(jnp.zeros(layer.in_features), **declare(sharding))

    def __call__(self, h: Array) -> Array:
        y: Array = h @ self.kernel.T + self.bias  # Refs in array code: their current values
        return y


class MLP(nn.Module):
    """64 pixels -> 2 hidden blocks -> 10 logits, plus a tied decoder
    (hidden -> 64 pixels) sharing the first layer's kernel Ref.

    ``sharded=True`` declares model-parallel shardings over a mesh axis
    "model" (train_sharded.py): the first block's outputs split over it,
    the second block contracting them back, the head replicated."""

    def __init__(
        self, din: int = 64, hidden: int = 128, classes: int = 10, *, seed: int = 0,
        sharded: bool = False,
    ):
        rngs = nn.Rngs(seed)  # one stream: parameters at init, dropout masks after
        s0, s1 = ((None, "model"), ("model", None)) if sharded else (None, None)
        self.blocks = [
            Block(din, hidden, dropout=0.1, rngs=rngs, sharding=s0),
            Block(hidden, hidden, dropout=0.1, rngs=rngs, sharding=s1),
        ]
        self.head = nn.Linear(hidden, classes, rngs=rngs)
        self.decoder = TiedDecoder(self.blocks[0].linear)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        h1 = self.blocks[0](x)
        h2 = self.blocks[1](h1)
        return self.head(h2), self.decoder(h1)  # logits, reconstruction of x


def loss_fn(model: MLP, x: Array, y: Array) -> Array:
    logits, recon = model(x)
    xent: Array = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent + 0.1 * jnp.mean((recon - x) ** 2)


# ------------------------------------------------------------ the training


@refx.jit
def train_step(model: MLP, opt: nn.Optimizer, x: Array, y: Array) -> Array:
    loss: Array
    loss, grads = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)  # stats, rng written
    opt.update(model, grads)  # params and optimiser state, in place
    return loss


@refx.jit
def _predict(model: MLP, x: Array) -> Array:
    logits, _ = model(x)
    return jnp.argmax(logits, axis=-1)


def predict(model: MLP, x: Array) -> Array:
    """Class predictions in evaluation mode (the model is left in the mode it
    was in: the mode flags are static, so each mode is traced once)."""
    was_training = not model.blocks[0].drop.deterministic
    model.eval()
    try:
        return _predict(model, x)
    finally:
        if was_training:
            model.train()


def accuracy(model: MLP, x: Array, y: Array) -> float:
    return float(jnp.mean(predict(model, x) == y))


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Shuffled minibatch indices, epoch after epoch (full batches only, so
    jit traces the step once)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def train(
    model: MLP,
    x: Array,
    y: Array,
    *,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `model` in place; return the loss of every step."""
    opt = nn.Optimizer(model, optax.adam(lr), wrt=nn.Param)
    model.train()
    losses: list[float] = []
    running = None
    with tqdm(total=steps, desc="train", disable=not progress, ncols=80) as bar:
        for step, idx in zip(range(steps), batches(len(x), batch_size, seed), strict=False):
            loss = train_step(model, opt, x[idx], y[idx])
            losses.append(float(loss))
            running = losses[-1] if running is None else 0.95 * running + 0.05 * losses[-1]
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{running:.4f}")
            bar.update()
    return losses


# ---------------------------------------------------------- checkpointing

CHECKPOINTED = ("params", "batch_stats")  # a tuple filter: either collection


def save_checkpoint(model: nn.Module, directory: pathlib.Path) -> None:
    """An orbax checkpoint of the params and batch stats, named as
    refx.state_dict names them ("blocks/0/linear/kernel"): a tied Ref is stored
    once, under its first path."""
    refx.save(directory, model, filter=CHECKPOINTED, force=True)


def load_checkpoint(model: nn.Module, directory: pathlib.Path) -> None:
    """Restore a checkpoint into `model`'s Refs: names, shapes and dtypes are
    checked first and every Ref is written at once (all or nothing); a tied
    Ref gets its one value back at every place it sits."""
    refx.restore(directory, model, filter=CHECKPOINTED)


# ------------------------------------------------------------------- main


def load_data(seed: int = 0) -> tuple[Array, Array, Array, Array]:
    digits = load_digits()  # 1797 8x8 images shipped inside scikit-learn
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return jnp.asarray(xtr), jnp.asarray(ytr), jnp.asarray(xte), jnp.asarray(yte)


def plot_losses(losses: list[float], test_accuracy: float, file: pathlib.Path) -> None:
    steps = np.arange(1, len(losses) + 1)
    window = 20
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.3, lw=1, label="per step")
    ax.plot(steps[window - 1 :], smooth, lw=2, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss (cross-entropy + 0.1 * reconstruction)", yscale="log")
    ax.set_title(f"refx MLP on sklearn digits: test accuracy {test_accuracy:.1%}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    xtr, ytr, xte, yte = load_data(args.seed)
    print(f"digits: {len(xtr)} train / {len(xte)} test images, 64 pixels, 10 classes")
    model = MLP(seed=args.seed)
    print(refx.summary(model))  # per collection; the tied weight counted once

    t0 = time.perf_counter()
    losses = train(model, xtr, ytr, steps=args.steps, seed=args.seed)
    elapsed = time.perf_counter() - t0
    acc = accuracy(model, xte, yte)
    print(f"trained {args.steps} steps in {elapsed:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"test accuracy: {acc:.2%}")

    assert model.decoder.kernel is model.blocks[0].linear.kernel, "the tied weight came apart"
    print("tied weight: decoder.kernel is blocks[0].linear.kernel (one Ref) after training")

    RESULTS.mkdir(exist_ok=True)
    plot_losses(losses, acc, RESULTS / "loss_curve.png")
    print(f"loss curve: {RESULTS / 'loss_curve.png'}")

    ckpt = RESULTS / "digits_checkpoint"
    save_checkpoint(model, ckpt)
    fresh = MLP(seed=args.seed + 1)  # different random init
    load_checkpoint(fresh, ckpt)
    acc2 = accuracy(fresh, xte, yte)
    assert fresh.decoder.kernel is fresh.blocks[0].linear.kernel
    assert bool(jnp.all(predict(fresh, xte) == predict(model, xte)))
    print(f"checkpoint: {ckpt.name} reloaded into a fresh model: test accuracy {acc2:.2%}")
    assert acc >= 0.95, f"test accuracy {acc:.2%} is below 95%"


if __name__ == "__main__":
    main()
