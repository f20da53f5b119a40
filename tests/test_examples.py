"""The demo (examples/train_digits.py on refx.nn), a few steps of it."""

import pathlib
import re
import sys

import jax
import numpy as np
import pytest

import refx
import refx.nn as nn

pytest.importorskip("sklearn")
pytest.importorskip("optax")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_digits as td  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return td.load_data(seed=0)


def snapshot(model):
    """path -> numpy copy of every Ref's value, except the random stream's."""
    part = refx.get_partition(model, refx.Ref)
    return {p: np.asarray(r.value) for p, r in part.items() if r.collection != "rngs"}


def test_module_paths_and_sharing():
    model = td.MLP(seed=0)
    params = refx.get_partition(model, nn.Param)
    assert params[("blocks", "0", "linear", "kernel")] is model.blocks[0].linear.kernel
    assert params[("decoder", "kernel")] is params[("blocks", "0", "linear", "kernel")]
    stats = refx.get_partition(model, nn.BatchStat)
    assert {p for p, r in stats.items() if r is not refx.NOTHING} == {
        ("blocks", str(i), "norm", s) for i in (0, 1) for s in ("mean", "var")
    }
    # one random stream shared by both Dropouts
    assert model.blocks[0].drop.rngs is model.blocks[1].drop.rngs
    # clone keeps the structure and the sharing, with new Refs
    c = refx.clone(model)
    assert type(c) is td.MLP and c.decoder.kernel is c.blocks[0].linear.kernel
    assert c.decoder.kernel is not model.decoder.kernel


def test_training_steps(data):
    xtr, ytr, _, _ = data
    model = td.MLP(seed=0)
    tied = model.decoder.kernel
    stream = model.blocks[0].drop.rngs
    count0 = int(stream.count.value)
    before = snapshot(model)

    losses = td.train(model, xtr, ytr, steps=40, progress=False)

    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    # refx.jit wrote in place: the very same Refs, still shared
    assert model.decoder.kernel is tied is model.blocks[0].linear.kernel
    assert model.blocks[0].drop.rngs.count is stream.count is model.blocks[1].drop.rngs.count
    after = snapshot(model)
    for path in [("blocks", str(i), "norm", s) for i in (0, 1) for s in ("mean", "var")]:
        assert not np.allclose(before[path], after[path]), path
    for path in [("blocks", "0", "linear", "kernel"), ("head", "kernel"),
                 ("blocks", "1", "norm", "scale")]:
        assert not np.allclose(before[path], after[path]), path
    assert int(stream.count.value) == count0 + 40 * 2  # two Dropouts draw per step


def test_train_step_traces_once(data):
    xtr, ytr, _, _ = data
    model = td.MLP(seed=0)
    model.train()
    opt = nn.Optimizer(model, td.optax.adam(1e-3))
    step = refx.jit(td.train_step.__wrapped__)  # a cache of its own
    count = model.blocks[0].drop.rngs.count
    for _ in range(3):
        step(model, opt, xtr[:32], ytr[:32])
    assert step._cache_size() == 1
    assert model.blocks[0].drop.rngs.count is count  # written in place, same Ref


def test_eval_mode_is_pure(data):
    _, _, xte, _ = data
    model = td.MLP(seed=0)
    before = snapshot(model)
    count = int(model.blocks[0].drop.rngs.count.value)
    td.predict(model, xte)
    after = snapshot(model)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    assert int(model.blocks[0].drop.rngs.count.value) == count
    assert not model.blocks[0].drop.deterministic  # predict left the mode as it was


def test_checkpoint_round_trip(data, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    xtr, ytr, xte, _ = data
    model = td.MLP(seed=0)
    td.train(model, xtr, ytr, steps=20, progress=False)
    file = tmp_path / "ckpt"
    td.save_checkpoint(model, file)
    keys = set(refx.state_dict(model, td.CHECKPOINTED))
    # the tied weight is stored once, under its first path; no random stream
    assert "blocks/0/linear/kernel" in keys and "decoder/kernel" not in keys
    assert "blocks/1/norm/mean" in keys and not any("rngs" in k for k in keys)

    fresh = td.MLP(seed=1)
    td.load_checkpoint(fresh, file)
    assert fresh.decoder.kernel is fresh.blocks[0].linear.kernel
    assert np.array_equal(td.predict(fresh, xte), td.predict(model, xte))
    want, got = snapshot(model), snapshot(fresh)
    assert want.keys() == got.keys()
    for p in want:
        assert np.array_equal(want[p], got[p]), p
    # the exact eval-mode outputs, not only the argmax
    model.eval()
    fresh.eval()
    lw, rw = refx.reref(refx.deref(model))(xte)
    lf, rf = refx.reref(refx.deref(fresh))(xte)
    assert np.array_equal(lw, lf) and np.array_equal(rw, rf)


def readme_section(heading):
    text = (EXAMPLES / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_quick_start_and_checkpoint_run(tmp_path):
    ns: dict = {}
    (quick_start,) = readme_section("Quick start")
    exec(compile(quick_start, "examples/README.md", "exec"), ns)
    (checkpoint,) = readme_section("Checkpoints, and tied Refs")
    exec(compile(checkpoint, "examples/README.md", "exec"), ns)
    model = ns["model"]
    state = ns["state"]
    assert "enc/kernel" in state and "dec/kernel" not in state  # the tied weight once
    assert any(k.startswith("norm/") for k in state)  # the batch stats too
    fresh = ns["AutoEncoder"](rngs=nn.Rngs(7))
    refx.load_state_dict(fresh, state)
    assert fresh.dec.kernel is fresh.enc.kernel
    for a, b in zip(
        jax.tree_util.tree_leaves(refx.deref(refx.get_partition(model, ns["CHECKPOINTED"]))),
        jax.tree_util.tree_leaves(refx.deref(refx.get_partition(fresh, ns["CHECKPOINTED"]))),
        strict=True,
    ):
        assert np.array_equal(a, b)
