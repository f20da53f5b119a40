"""A GRU character model trained with refx.scan (`make examples`).

It learns the Zen of Python (the text of `import this`, shipped with
CPython) one character at a time.  The model is an `nn.Module` whose
parameters are Refs; one step of the sequence is `GRU.cell`, which also
counts the characters it has read in a Ref (collection "count", written
on every call).  `refx.scan` runs the cell over the sequence with the
whole model in its carry: each iteration reads the parameters and writes
the counter, and after the scan the caller's counter holds the last
iteration's value.  The training step is `refx.value_and_grad` of that
scan inside `refx.jit`, so the counter's writes travel back through the
gradient and the compiled step to the model in place; the script checks
that the counter equals steps x sequence length at the end.  Sampling
runs the same cell in another `refx.scan`, feeding each character back.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import refx
import refx.nn as nn

Array = jax.Array


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        import this
    return codecs.decode(this.s, "rot13")


class GRU(nn.Module):
    """Embedding -> GRU cell -> logits over the vocabulary (refx.nn layers)."""

    def __init__(self, vocab: int, hidden: int, *, rngs: nn.Rngs) -> None:
        self.embed = nn.Embed(vocab, hidden, rngs=rngs)
        self.gru = nn.GRUCell(hidden, hidden, rngs=rngs)
        self.head = nn.Linear(hidden, vocab, rngs=rngs)
        self.chars_read: refx.Ref[Array] = refx.Ref(jnp.array(0), "count")
        self.hidden = hidden

    def cell(self, h: Array, ids: Array) -> tuple[Array, Array]:
        """One time step for a batch: (new hidden state, logits)."""
        h, _ = self.gru(h, self.embed(ids))
        self.chars_read.value = self.chars_read.value + 1  # a write inside scan's body
        logits: Array = self.head(h)
        return h, logits


Carry = tuple[GRU, Array]


def loss_fn(model: GRU, inputs: Array, targets: Array) -> Array:
    """Mean next-character cross-entropy; inputs/targets are (time, batch)."""

    def body(carry: Carry, ids: Array) -> tuple[Carry, Array]:
        model, h = carry
        h, logits = model.cell(h, ids)
        return (model, h), logits  # the carry: the same model (its Refs), a new h

    h0 = jnp.zeros((inputs.shape[1], model.hidden))
    _, logits = refx.scan(body, (model, h0), inputs)
    loss: Array = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss


@refx.jit
def train_step(model: GRU, opt: nn.Optimizer, inputs: Array, targets: Array) -> Array:
    loss: Array
    loss, grads = refx.value_and_grad(loss_fn)(model, inputs, targets)
    opt.update(model, grads)
    return loss


@refx.jit(static_argnums=2)
def sample(model: GRU, first: Array, length: int, key: Array) -> Array:
    """`length` characters after `first`, drawn at temperature 0.5."""

    def body(carry: tuple[GRU, Array, Array, Array], _: None) -> tuple[
            tuple[GRU, Array, Array, Array], Array]:
        model, h, ids, key = carry
        key, sub = jax.random.split(key)
        h, logits = model.cell(h, ids)
        ids = jax.random.categorical(sub, logits / 0.5)
        return (model, h, ids, key), ids[0]

    h0 = jnp.zeros((1, model.hidden))
    _, chars = refx.scan(body, (model, h0, first[None], key), None, length=length)
    return chars


def windows(data: np.ndarray, length: int, batch: int, seed: int) -> tuple[Array, Array]:
    """Random windows of the text: (inputs, targets), each (length, batch)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, len(data) - length - 1, size=batch)
    idx = start[None, :] + np.arange(length)[:, None]
    return jnp.asarray(data[idx]), jnp.asarray(data[idx + 1])


def train(steps: int, *, seq: int = 48, batch: int = 32, hidden: int = 64, seed: int = 0,
          ) -> tuple[GRU, list[float], int, str]:
    """Train a fresh model; (model, losses, characters read in training, a sample)."""
    text = zen_of_python()
    vocab = sorted(set(text))
    data = np.array([vocab.index(c) for c in text], np.int32)
    model = GRU(len(vocab), hidden, rngs=nn.Rngs(seed))
    opt = nn.Optimizer(model, optax.adam(1e-2), wrt=nn.Param)
    losses = []
    for step in range(steps):
        inputs, targets = windows(data, seq, batch, seed * 100_003 + step)
        losses.append(float(train_step(model, opt, inputs, targets)))
    read = int(model.chars_read.value)
    assert read == steps * seq, f"the counter missed writes: {read} != {steps} x {seq}"
    chars = sample(model, jnp.asarray(data[0]), 120, jax.random.key(seed))
    return model, losses, read, text[0] + "".join(vocab[int(i)] for i in chars)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, losses, read, text = train(args.steps, seed=args.seed)
    elapsed = time.perf_counter() - t0
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"GRU on the Zen of Python: {args.steps} steps in {elapsed:.1f}s (compiling included)")
    print(f"loss (mean of 10 steps): {first:.3f} -> {last:.3f}")
    print(f"characters read in training, counted by a Ref written inside refx.scan: {read} "
          f"(= {args.steps} steps x 48)")
    print(f"sample: {text!r}")
    assert last < 0.6 * first, f"the loss did not fall enough: {first:.3f} -> {last:.3f}"


if __name__ == "__main__":
    main()
