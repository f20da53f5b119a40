"""examples/transformer_text.py at a small size: a decoder-only transformer on
refx.nn trains, and its key/value-cached decoding (nn.Cache Refs written in
refx.jit) gives the logits of an uncached pass."""

import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("optax")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import transformer_text  # noqa: E402


def test_transformer_trains_and_cached_decoding_matches_uncached():
    out = transformer_text.main(["--steps", "12", "--batch", "8", "--seq", "16", "--d", "32",
                                 "--layers", "1", "--sample", "8"])
    assert np.isfinite(out["first_loss"]) and out["last_loss"] < out["first_loss"]
    assert out["cache_err"] < 1e-4


def test_cache_refs_are_written_in_place_by_the_jitted_decode_step():
    import jax.numpy as jnp

    import refx.nn as nn

    model = transformer_text.GPT(10, d=16, heads=2, layers=1, max_len=8, rngs=nn.Rngs(0))
    model.eval()
    model.init_cache(2)
    cache = model.blocks[0].attn.cached_key
    assert isinstance(cache, nn.Cache) and not np.asarray(cache.value).any()
    transformer_text.decode_step(model, jnp.array([1, 2]), jnp.asarray(0))
    assert model.blocks[0].attn.cached_key is cache  # the same Ref, written
    assert np.asarray(cache.value)[:, 0].any() and not np.asarray(cache.value)[:, 1:].any()
    assert int(model.blocks[0].attn.cache_index.value) == 1
