"""The transform examples (`make examples`), at small sizes: the GRU trained
with refx.scan, the refx.vmap ensemble, the refx.remat deep MLP."""

import pathlib
import sys

import jax
import numpy as np
import pytest

import refx

pytest.importorskip("optax")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import char_gru  # noqa: E402
import remat_mlp  # noqa: E402


def test_char_gru_counts_every_character_and_learns():
    model, losses, read, text = char_gru.train(40, seq=16, batch=8, hidden=32)
    assert read == 40 * 16  # the counter Ref written inside refx.scan's body, every time
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert len(text) == 121 and text[0] == "T"
    assert int(model.chars_read.value) == 40 * 16 + 120  # sampling reads too


def test_ensemble_of_mlps_made_and_trained_with_vmap():
    pytest.importorskip("sklearn")
    import ensemble

    ens, losses, member_acc, ensemble_acc = ensemble.train(80)
    assert losses.shape == (80, ensemble.MEMBERS)
    assert np.all(losses[-1] < losses[0])  # every member learned
    w = ens.members.hidden.kernel
    assert w.value.shape == (ensemble.MEMBERS, 64, 64) and w.collection == "params"
    assert ens.members.drop.rngs.key.value.shape == (ensemble.MEMBERS,)
    assert int(ens.steps.value) == 80
    assert member_acc > 0.8 and ensemble_acc > 0.8
    # members differ (their own keys and dropout masks)
    assert not np.allclose(w.value[0], w.value[1])
    # one Ref per weight, shared structure: refx.deref sees 6 distinct Refs
    # (2 kernels, 2 biases, the dropout stream's key and counter)
    assert len(jax.tree_util.tree_leaves(refx.deref(ens.members))) == 6


def test_remat_mlp_gradients_equal_and_fewer_residuals():
    r = remat_mlp.run(40, depth=4, width=16)
    assert r["grad_diff"] < 1e-5
    assert r["floats_remat"] < r["floats_plain"] and r["kept_remat"] < r["kept_plain"]
    assert r["last_loss"] < r["first_loss"] and r["last_rms"] > 0
