"""A small decoder-only transformer on refx.nn, trained on a text from Python's
standard library, then generating with a key/value cache (`make examples`).

The text is the source of CPython's `difflib` module (any installed Python
has it), read character by character.  The model is GPT-shaped: token and
position embeddings, pre-LayerNorm blocks of causal `nn.MultiHeadAttention`
and a GELU MLP with Dropout, and an output layer tied to the token
embedding (`Embed.attend`: one Param used twice, its gradient summed).
Training is a `refx.jit` step of `refx.value_and_grad` and `nn.Optimizer`.

Generation uses the attention layers' key/value cache: `init_cache` gives
each layer `nn.Cache` Refs, and a `refx.jit` decode step on one token writes
them in place (refx.jit writes the Refs back).  The script checks that the
cached, one-token-at-a-time logits equal the logits of an uncached pass over
the whole sequence, then prints a sample.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import refx
import refx.nn as nn

Array = jax.Array


class Block(nn.Module):
    def __init__(self, d: int, heads: int, *, dropout: float, rngs: nn.Rngs) -> None:
        self.ln1 = nn.LayerNorm(d, rngs=rngs)
        self.attn = nn.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nn.LayerNorm(d, rngs=rngs)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, rngs=rngs), nn.gelu,
                                 nn.Linear(4 * d, d, rngs=rngs))
        self.drop = nn.Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None, decode: bool) -> Array:
        x = x + self.drop(self.attn(self.ln1(x), mask=mask, decode=decode))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(
        self, vocab: int, *, d: int = 64, heads: int = 4, layers: int = 2, max_len: int = 128,
        dropout: float = 0.1, rngs: nn.Rngs,
    ) -> None:
        self.tok = nn.Embed(vocab, d, rngs=rngs)
        self.pos = nn.Embed(max_len, d, rngs=rngs)
        self.blocks = [Block(d, heads, dropout=dropout, rngs=rngs) for _ in range(layers)]
        self.ln = nn.LayerNorm(d, rngs=rngs)
        self.d = d
        self.max_len = max_len

    def __call__(self, ids: Array, positions: Array, *, decode: bool = False) -> Array:
        x = self.tok(ids) + self.pos(positions)
        mask = None if decode else nn.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask, decode)
        return self.tok.attend(self.ln(x))  # the output layer is the token embedding

    def init_cache(self, batch: int) -> None:
        for block in self.blocks:
            block.attn.init_cache((batch, self.max_len, self.d))


def loss_fn(model: GPT, x: Array, y: Array) -> Array:
    logits = model(x, jnp.arange(x.shape[1]))
    loss: Array = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss


@refx.jit
def train_step(model: GPT, opt: nn.Optimizer, x: Array, y: Array) -> Array:
    loss: Array
    loss, grads = refx.value_and_grad(loss_fn, wrt=nn.Param)(model, x, y)
    opt.update(model, grads)
    return loss


@refx.jit
def logits_full(model: GPT, ids: Array) -> Array:
    return model(ids, jnp.arange(ids.shape[1]))


@refx.jit
def decode_step(model: GPT, token: Array, position: Array) -> Array:
    """Logits for one new token per sequence; writes every layer's cache."""
    return model(token[:, None], position[None], decode=True)[:, 0]


def load_text() -> tuple[np.ndarray, list[str]]:
    text = pathlib.Path(difflib.__file__).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], np.int32), chars


def train(
    model: GPT, data: np.ndarray, *, steps: int, batch: int, seq: int, lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    opt = nn.Optimizer(model, optax.adamw(lr, weight_decay=0.01), wrt=nn.Param)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = np.stack([data[s:s + seq] for s in starts])
        y = np.stack([data[s + 1:s + seq + 1] for s in starts])
        losses.append(float(train_step(model, opt, jnp.asarray(x), jnp.asarray(y))))
    return losses


def check_cache(model: GPT, prompt: Array) -> float:
    """Max |cached - uncached| logits over a prompt fed one token at a time."""
    model.eval()
    full = logits_full(model, prompt)
    model.init_cache(prompt.shape[0])
    cached = jnp.stack([decode_step(model, prompt[:, t], jnp.asarray(t))
                        for t in range(prompt.shape[1])], axis=1)
    index = model.blocks[0].attn.cache_index
    assert index is not None and int(index.value) == prompt.shape[1]
    return float(jnp.max(jnp.abs(cached - full)))


def generate(model: GPT, prompt: Array, n: int, *, seed: int = 0,
             temperature: float = 0.8) -> Array:
    """Sample n tokens after `prompt` with the cache (one decode step each)."""
    model.eval()
    model.init_cache(prompt.shape[0])
    logits = jnp.zeros(())
    for t in range(prompt.shape[1]):
        logits = decode_step(model, prompt[:, t], jnp.asarray(t))
    key = jax.random.key(seed)
    out = []
    for t in range(prompt.shape[1], prompt.shape[1] + n):
        key, sub = jax.random.split(key)
        token = jax.random.categorical(sub, logits / temperature)
        out.append(token)
        logits = decode_step(model, token, jnp.asarray(t))
    return jnp.stack(out, axis=1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sample", type=int, default=200)
    args = ap.parse_args(argv)

    data, chars = load_text()
    print(f"text: difflib.py, {len(data)} characters, {len(chars)} distinct")
    model = GPT(len(chars), d=args.d, layers=args.layers, max_len=args.seq + args.sample,
                rngs=nn.Rngs(0))
    print(refx.summary(model))
    t0 = time.perf_counter()
    losses = train(model, data, steps=args.steps, batch=args.batch, seq=args.seq)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f}s: "
          f"loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")

    prompt = jnp.asarray(data[None, :args.seq])
    err = check_cache(model, prompt)
    print(f"cached decoding vs an uncached pass: max |logits difference| = {err:.2e}")
    assert err < 1e-3, err

    sample = generate(model, prompt[:, :16], args.sample)
    text = "".join(chars[int(i)] for i in np.asarray(prompt[0, :16]))
    text += "".join(chars[int(i)] for i in np.asarray(sample[0]))
    print("sample:\n" + text)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "cache_err": err}


if __name__ == "__main__":
    main()
