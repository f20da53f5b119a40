"""refx.save / refx.restore: real orbax checkpoints in tmp_path (round trip,
tied weights, wrong shapes and dtypes, missing and unexpected names,
filters, optax state) and a restore onto 8 simulated CPU devices in a
subprocess.  Skipped where orbax-checkpoint is not installed."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx

ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not installed")


def model(scale=1.0):
    w = refx.Ref(jnp.full((3, 3), scale), "params")
    return {
        "enc": {"w": w, "b": refx.Ref(jnp.full(3, scale), "params")},
        "dec": {"w": w},  # tied
        "steps": refx.Ref(int(scale), "state"),
        "lr": refx.Ref(0.5 * scale, "state"),
        "mean": refx.Ref(np.full(2, scale, np.float32), "batch_stats"),
    }


def read_with_orbax(path):
    """The checkpoint as orbax's own API reads it, without a target."""
    with warnings.catch_warnings():  # "Sharding info not provided when restoring"
        warnings.simplefilter("ignore", UserWarning)
        return ocp.PyTreeCheckpointer().restore(str(path))


def values(tree):
    return {p: r.value for p, r in refx.get_partition(tree, refx.Ref).items()
            if r is not refx.NOTHING}


def same_values(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]) and np.array_equal(a[k], b[k]), k


def test_round_trip(tmp_path):
    src, dst = model(2.0), model(0.0)
    refx.save(tmp_path / "ckpt", src)
    assert refx.restore(tmp_path / "ckpt", dst) == refx.LoadResult((), ())
    same_values(values(dst), values(src))
    # types come back as the tree holds them: jax, numpy, Python scalars
    assert isinstance(dst["enc"]["b"].value, jax.Array)
    assert type(dst["mean"].value) is np.ndarray
    assert type(dst["steps"].value) is int and type(dst["lr"].value) is float


def test_tied_weight_is_stored_once_and_comes_back_tied(tmp_path):
    src, dst = model(3.0), model(0.0)
    refx.save(str(tmp_path / "ckpt"), src)  # str or PathLike
    stored = read_with_orbax(tmp_path / "ckpt")
    assert sorted(stored) == ["dec/w", "enc/b", "lr", "mean", "steps"]
    refx.restore(tmp_path / "ckpt", dst)
    assert dst["enc"]["w"] is dst["dec"]["w"]
    assert np.array_equal(dst["enc"]["w"].value, jnp.full((3, 3), 3.0))


def test_checkpoint_is_plain_orbax(tmp_path):
    src = model(2.0)
    refx.save(tmp_path / "ckpt", src)
    stored = read_with_orbax(tmp_path / "ckpt")
    sd = refx.state_dict(src)
    assert stored.keys() == sd.keys()
    for k in sd:
        assert np.array_equal(stored[k], sd[k])


def test_wrong_shape_file_is_a_clear_error_and_writes_nothing(tmp_path):
    src = model(2.0)
    src["enc"]["b"] = refx.Ref(jnp.ones(4), "params")
    refx.save(tmp_path / "ckpt", src)
    dst = model(0.0)
    before = values(dst)
    with pytest.raises(ValueError) as e:
        refx.restore(tmp_path / "ckpt", dst)
    msg = str(e.value)
    assert msg.startswith("restore: the checkpoint does not match the tree; nothing was loaded:")
    assert "'enc/b': float32[4] in the checkpoint, float32[3] in the tree" in msg
    same_values(values(dst), before)
    # even with strict=False: a mismatch is never loaded
    with pytest.raises(ValueError, match="even with strict=False"):
        refx.restore(tmp_path / "ckpt", dst, strict=False)
    same_values(values(dst), before)


def test_wrong_dtype_is_refused_not_cast(tmp_path):
    # orbax itself would cast float32 to the requested bfloat16 silently
    src = model(2.0)
    refx.save(tmp_path / "ckpt", src)
    dst = model(0.0)
    dst["enc"]["b"] = refx.Ref(jnp.zeros(3, jnp.bfloat16), "params")
    with pytest.raises(ValueError, match=r"'enc/b': float32\[3\] in the checkpoint, bfloat16\[3\] in the tree"):
        refx.restore(tmp_path / "ckpt", dst)
    assert np.array_equal(dst["dec"]["w"].value, jnp.zeros((3, 3)))


def test_scalar_mismatch(tmp_path):
    refx.save(tmp_path / "ckpt", {"n": refx.Ref(1.5)})
    dst = {"n": refx.Ref(0)}
    with pytest.raises(ValueError, match=r"'n': a Python scalar \(float64\) in the checkpoint, a Python int"):
        refx.restore(tmp_path / "ckpt", dst)


def test_missing_and_unexpected_names(tmp_path):
    src = model(2.0)
    src["extra"] = refx.Ref(jnp.ones(2), "params")
    del src["mean"]
    refx.save(tmp_path / "ckpt", src)
    dst = model(0.0)
    before = values(dst)
    with pytest.raises(ValueError) as e:
        refx.restore(tmp_path / "ckpt", dst)
    msg = str(e.value)
    assert "missing from the checkpoint (in the tree): 'mean'" in msg
    assert "unexpected in the checkpoint (not in the tree): 'extra'" in msg
    same_values(values(dst), before)
    res = refx.restore(tmp_path / "ckpt", dst, strict=False)
    assert res == refx.LoadResult(missing=("mean",), unexpected=("extra",))
    assert np.array_equal(dst["enc"]["b"].value, jnp.full(3, 2.0)) and dst["steps"].value == 2
    assert np.array_equal(dst["mean"].value, np.zeros(2))


def test_filters(tmp_path):
    src = model(2.0)
    refx.save(tmp_path / "params", src, filter="params")
    assert sorted(read_with_orbax(tmp_path / "params")) == ["dec/w", "enc/b"]
    dst = model(0.0)
    refx.restore(tmp_path / "params", dst, filter="params")
    assert np.array_equal(dst["dec"]["w"].value, jnp.full((3, 3), 2.0)) and dst["steps"].value == 0
    # the params of a full checkpoint, into a tree's params
    refx.save(tmp_path / "full", model(5.0))
    res = refx.restore(tmp_path / "full", dst, filter="params", strict=False)
    assert res.unexpected == ("lr", "mean", "steps") and res.missing == ()
    assert np.array_equal(dst["enc"]["b"].value, jnp.full(3, 5.0)) and dst["steps"].value == 0


def test_optax_state_in_a_ref(tmp_path):
    def build(v):
        params = {"w": jnp.full(2, v)}
        tx = optax.adam(1e-2)
        return {"params": refx.Ref(params, "params"), "opt": refx.Ref(tx.init(params), "opt")}

    src = build(1.0)
    src["opt"].value = jax.tree_util.tree_map(lambda x: x + 1, src["opt"].value)
    refx.save(tmp_path / "ckpt", src)
    dst = build(0.0)
    refx.restore(tmp_path / "ckpt", dst)
    assert type(dst["opt"].value) is type(src["opt"].value)
    assert int(dst["opt"].value[0].count) == 1
    assert np.array_equal(dst["opt"].value[0].mu["w"], jnp.ones(2))


def test_leaves_orbax_cannot_store_as_they_are(tmp_path):
    # numpy scalars, Python complex and typed PRNG keys go in another form
    def build(v):
        return {"f32": refx.Ref(np.float32(v)), "i32": refx.Ref(np.int32(v)),
                "b": refx.Ref(np.bool_(v)), "c": refx.Ref(complex(v, v)),
                "flag": refx.Ref(bool(v)), "rng": refx.Ref(jax.random.key(int(v)), "rngs")}

    src, dst = build(3), build(0)
    refx.save(tmp_path / "ckpt", src)
    refx.restore(tmp_path / "ckpt", dst)
    for k in ("f32", "i32", "b", "c", "flag"):
        assert type(dst[k].value) is type(src[k].value) and dst[k].value == src[k].value, k
    assert jax.dtypes.issubdtype(dst["rng"].value.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(dst["rng"].value), jax.random.key_data(jax.random.key(3)))
    unsafe = {"rng": refx.Ref(jax.random.key(0, impl="rbg"), "rngs")}
    with pytest.raises(ValueError, match=r"'rng': uint32\[2\] in the checkpoint, uint32\[4\] in the tree"):
        refx.restore(tmp_path / "ckpt", unsafe, filter="rngs")


def test_save_refuses_to_overwrite_unless_forced(tmp_path):
    refx.save(tmp_path / "ckpt", model(1.0))
    with pytest.raises(FileExistsError, match=r"save: .*ckpt already exists; pass force=True to replace it"):
        refx.save(tmp_path / "ckpt", model(2.0))
    refx.save(tmp_path / "ckpt", model(2.0), force=True)
    dst = model(0.0)
    refx.restore(tmp_path / "ckpt", dst)
    assert dst["steps"].value == 2


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="save: the filter selects no Ref with state; nothing to save"):
        refx.save(tmp_path / "a", model(), filter="nope")
    with pytest.raises(ValueError, match=r"save: the tree is a single Ref, whose name is the empty path ''"):
        refx.save(tmp_path / "b", refx.Ref(jnp.ones(2)))
    with pytest.raises(TypeError, match=r"save: the Ref at \('a',\) holds a str"):
        refx.save(tmp_path / "c", {"a": refx.Ref("x")})
    assert not os.listdir(tmp_path)


def test_restore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"restore: no checkpoint at .*nowhere"):
        refx.restore(tmp_path / "nowhere", model())
    # an orbax checkpoint of a nested tree is not a refx checkpoint
    with ocp.PyTreeCheckpointer() as c:
        c.save(str(tmp_path / "nested"), args=ocp.args.PyTreeSave({"a": {"b": np.ones(2)}}))
    with pytest.raises(ValueError, match=r"restore: 'a' in .*nested is not an array or scalar|"
                                         r"restore: .*nested is not a refx checkpoint"):
        refx.restore(tmp_path / "nested", {"a/b": refx.Ref(np.zeros(2))})
    refx.save(tmp_path / "ckpt", model())
    with pytest.raises(TypeError, match="restore: the tree holds deref'ed nodes"):
        refx.restore(tmp_path / "ckpt", refx.deref(model()))


def test_restore_is_all_or_nothing_on_a_trace_error(tmp_path):
    refx.save(tmp_path / "ckpt", {"a": refx.Ref(np.ones(2)), "b": refx.Ref(np.ones(2))})
    a = refx.Ref(np.zeros(2))  # of the outer trace: not writable inside jit
    out = {}

    @jax.jit
    def f(x):
        b = refx.Ref(np.zeros(2))  # of the jit trace: writable
        try:
            refx.restore(tmp_path / "ckpt", {"a": a, "b": b})
        except ValueError as e:
            out["error"] = str(e)
        out["b"] = b.value
        return x

    f(jnp.zeros(2))
    assert "Cannot mutate Ref from a different trace level" in out["error"]
    assert np.array_equal(a.value, np.zeros(2)) and np.array_equal(out["b"], np.zeros(2))


def test_restore_refuses_refs_holding_tracers(tmp_path):
    refx.save(tmp_path / "ckpt", {"a": refx.Ref(jnp.ones(2))})
    out = {}

    @jax.jit
    def f(x):
        try:
            refx.restore(tmp_path / "ckpt", {"a": refx.Ref(x)})
        except ValueError as e:
            out["error"] = str(e)
        return x

    f(jnp.zeros(2))
    assert out["error"] == "restore: the Ref at ('a',) holds a tracer; restore outside of JAX transforms"


EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import refx

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    saved_sharding = NamedSharding(mesh, P("x", "y"))
    w = refx.Ref(jax.device_put(jnp.arange(64.0).reshape(8, 8), saved_sharding), "params")
    src = {"enc": {"w": w}, "dec": {"w": w}, "b": refx.Ref(jnp.arange(8.0), "params")}
    refx.save(sys.argv[1], src)

    # the new tree holds its arrays sharded differently: restore follows the tree
    target_sharding = NamedSharding(mesh, P(None, "x"))
    w2 = refx.Ref(jax.device_put(jnp.zeros((8, 8)), target_sharding), "params")
    b_sharding = NamedSharding(mesh, P("x"))
    dst = {"enc": {"w": w2}, "dec": {"w": w2},
           "b": refx.Ref(jax.device_put(jnp.zeros(8), b_sharding), "params")}
    refx.restore(sys.argv[1], dst)

    got = dst["enc"]["w"].value
    assert dst["enc"]["w"] is dst["dec"]["w"]
    assert np.array_equal(np.asarray(got), np.arange(64.0).reshape(8, 8))
    assert got.sharding.is_equivalent_to(target_sharding, 2), got.sharding
    assert len(got.addressable_shards) == 8
    assert {s.data.shape for s in got.addressable_shards} == {(8, 2)}
    b = dst["b"].value
    assert np.array_equal(np.asarray(b), np.arange(8.0))
    assert b.sharding.is_equivalent_to(b_sharding, 1), b.sharding
    print("OK 8 devices")
""")


def test_restore_onto_eight_simulated_devices(tmp_path):
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICES)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK 8 devices" in r.stdout
