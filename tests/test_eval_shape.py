"""refx.eval_shape (issue 19): abstract models (every Ref holding
jax.ShapeDtypeStructs, class/collection/metadata/sharing kept), nothing
written, usable with refx.shardings, refx.summary, refx.restore and
load_state_dict; and, on 8 simulated devices (this file run as a script
in a subprocess, see multidevice.py), a sharded init under refx.jit in
which no device ever holds a whole declared-sharded parameter.
"""

import json
import os
import sys

if __name__ == "__main__":  # the 8-device scenario: XLA_FLAGS before jax
    assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import refx

AxisType = getattr(jax.sharding, "AxisType", None)
SDS = jax.ShapeDtypeStruct


class Param(refx.Ref):
    pass


def make_model(key, din=3, dhid=5):
    k1, k2 = jax.random.split(key)
    w = Param(jax.random.normal(k1, (din, dhid)), "params", init="lecun")
    return {
        "enc": {"w": w, "b": refx.Ref(jnp.zeros(dhid), "params")},
        "dec": {"w": w},  # tied
        "steps": refx.Ref(jnp.array(0), "state"),
        "count": refx.Ref(0, "state"),  # a Python scalar
        "rng": refx.Ref(k2, "rng"),
        "name": "mlp",  # a leaf JAX cannot trace
    }


def is_sds_tree(v):
    return all(isinstance(x, SDS) for x in jax.tree_util.tree_leaves(v))


def test_abstract_model_keeps_classes_collections_metadata_and_sharing():
    m = refx.eval_shape(make_model, jax.random.key(0))
    w = m["enc"]["w"]
    assert type(w) is Param and w.collection == "params" and dict(w.metadata) == {"init": "lecun"}
    assert m["dec"]["w"] is w  # sharing kept
    assert w.value == SDS((3, 5), jnp.float32)
    assert m["enc"]["b"].value == SDS((5,), jnp.float32)
    assert m["steps"].value.dtype == jnp.int32 and m["steps"].value.shape == ()
    assert m["count"].value == SDS((), jnp.int32, weak_type=True)  # as jax.eval_shape
    assert jax.dtypes.issubdtype(m["rng"].value.dtype, jax.dtypes.prng_key)
    assert m["name"] == "mlp"
    for r in (m["enc"]["w"], m["enc"]["b"], m["steps"], m["count"], m["rng"]):
        assert is_sds_tree(r.value), r


def test_nothing_is_computed_or_written():
    calls = []
    a = refx.Ref(jnp.ones(3), "state")
    v0 = a.value

    def f(a, x):
        calls.append(type(a.value).__name__)
        a.value = jnp.ones((3, 2)) * x  # written: not written back
        return a, a.value.sum(), "tag"

    ra, s, tag = refx.eval_shape(f, a, 2.0)
    assert a.value is v0  # the argument Ref is not written
    assert ra is not a and type(ra) is refx.Ref and ra.collection == "state"
    assert ra.value == SDS((3, 2), jnp.float32)  # the value fun left in it
    assert s == SDS((), jnp.float32) and tag == "tag"
    assert len(calls) == 1 and "Tracer" in calls[0]


def test_plain_outputs_and_closed_over_refs():
    c = refx.Ref(jnp.ones((2, 2)), "consts", unit="m")

    def f(x):
        return {"y": x @ c.value, "c": c, "c2": c}

    out = refx.eval_shape(f, jnp.ones((4, 2)))
    assert out["y"] == SDS((4, 2), jnp.float32)
    assert out["c"] is out["c2"] and out["c"] is not c
    assert out["c"].value == SDS((2, 2), jnp.float32) and out["c"].metadata["unit"] == "m"
    assert refx.eval_shape(lambda: 3) == SDS((), jnp.int32, weak_type=True)


def test_a_pytree_valued_ref_and_values_inside():
    model = make_model(jax.random.key(0))
    opt = refx.eval_shape(lambda m: refx.Ref(
        jax.tree_util.tree_map(jnp.zeros_like,
                               refx.get_partition(refx.deref(m), "params")), "opt"), model)
    leaves = jax.tree_util.tree_leaves(opt.value)
    assert leaves and all(isinstance(x, SDS) for x in leaves)
    assert sorted(x.shape for x in leaves) == [(3, 5), (5,)]


def test_summary_of_an_abstract_model_equals_the_concrete_one():
    # (a Python scalar in a Ref counts 0 parameters, its abstract value, a
    # 0-d array as jax.eval_shape makes it, 1: left out)
    def arrays(key):
        return {k: v for k, v in make_model(key).items() if k != "count"}

    key = jax.random.key(0)
    assert str(refx.summary(refx.eval_shape(arrays, key))) == str(refx.summary(arrays(key)))


def test_under_other_transforms():
    keys = jax.random.split(jax.random.key(0), 4)
    stacked = refx.eval_shape(refx.vmap(lambda k: make_model(k)), keys)
    assert stacked["enc"]["w"].value == SDS((4, 3, 5), jnp.float32)
    assert stacked["dec"]["w"] is stacked["enc"]["w"]
    a = refx.Ref(jnp.ones(3))
    out = refx.eval_shape(refx.jit(lambda a: a.value * 2), a)
    assert out == SDS((3,), jnp.float32)

    @refx.jit
    def inside(a):
        m = refx.eval_shape(make_model, jax.random.key(1))
        return a.value.sum() + m["enc"]["w"].value.shape[0]

    assert float(inside(a)) == 6.0


def one_device_mesh():
    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    if AxisType is None:
        return jax.sharding.Mesh(devices, ("data", "model"))
    return jax.sharding.Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def active(mesh):
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def sharded_model(key):
    k1, k2 = jax.random.split(key)
    w = refx.Ref(jax.random.normal(k1, (4, 8)), "params", sharding=(None, "model"))
    return {"w": w, "b": refx.Ref(jnp.zeros(8), "params", sharding=("model",)),
            "e": refx.Ref(jax.random.normal(k2, (8, 8)), "params", sharding=P("data", "model")),
            "steps": refx.Ref(jnp.array(0), "state")}


def test_declared_shardings_under_a_mesh_and_refx_shardings():
    mesh = one_device_mesh()
    key = jax.random.key(0)
    no_mesh = refx.eval_shape(sharded_model, key)
    assert no_mesh["w"].value.sharding is None  # no mesh: metadata only
    assert no_mesh["w"].metadata["sharding"] == (None, "model")
    with active(mesh):
        abstract = refx.eval_shape(sharded_model, key)
        concrete = sharded_model(key)
    assert abstract["w"].value.sharding == NamedSharding(mesh, P(None, "model"))
    assert abstract["b"].value.sharding == NamedSharding(mesh, P("model"))
    assert abstract["e"].value.sharding == NamedSharding(mesh, P("data", "model"))
    assert abstract["w"].metadata["sharding"] == (None, "model")
    sa, sc = refx.shardings(abstract, mesh), refx.shardings(concrete, mesh)
    assert jax.tree_util.tree_structure(sa) == jax.tree_util.tree_structure(sc)
    assert jax.tree_util.tree_leaves(sa) == jax.tree_util.tree_leaves(sc)
    # a NamedSharding declaration brings its mesh: applies without an active one
    named = NamedSharding(mesh, P("model"))
    r = refx.eval_shape(lambda: refx.Ref(jnp.zeros(4), sharding=named))
    assert r.value.sharding == named
    with active(mesh):
        with pytest.raises(ValueError, match=r"names mesh axes \['nope'\]"):
            refx.eval_shape(lambda: refx.Ref(jnp.zeros(4), sharding=("nope",)))


def _numpy_state(tree):
    return {n: np.asarray(v) if isinstance(v, jax.Array) and not jax.dtypes.issubdtype(
        v.dtype, jax.dtypes.prng_key) else v for n, v in refx.state_dict(tree).items()}


def _same(a, b):
    def eq(x, y):
        if isinstance(x, str):
            return x == y
        if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert isinstance(x, jax.Array), type(x)
        assert x.dtype == jnp.result_type(y) and x.shape == np.shape(y)
        return bool(jnp.all(x == y))
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(eq, refx.deref(a),
                                                                refx.deref(b))))


def test_load_state_dict_into_an_abstract_model_makes_the_arrays():
    model = make_model(jax.random.key(0))
    model["name"] = "mlp"
    abstract = refx.eval_shape(make_model, jax.random.key(1))
    w = abstract["enc"]["w"]
    assert refx.load_state_dict(abstract, _numpy_state(model)) == ((), ())
    assert abstract["enc"]["w"] is w and abstract["dec"]["w"] is w  # the same Refs, filled
    assert _same(abstract, model)
    assert abstract["count"].value.weak_type  # a Python scalar: weakly typed, as jit makes it


def test_restore_into_an_abstract_model(tmp_path):
    pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not installed")
    mesh = one_device_mesh()
    with active(mesh):
        model = sharded_model(jax.random.key(0))
        model["count"] = refx.Ref(3, "state")
        model["rng"] = refx.Ref(jax.random.key(5), "rng")
    refx.save(tmp_path / "ckpt", model)
    with active(mesh):
        abstract = refx.eval_shape(lambda: {**sharded_model(jax.random.key(1)),
                                            "count": refx.Ref(0, "state"),
                                            "rng": refx.Ref(jax.random.key(0), "rng")})
        assert refx.restore(tmp_path / "ckpt", abstract) == ((), ())
    assert _same(abstract, model)
    assert abstract["w"].value.sharding == NamedSharding(mesh, P(None, "model"))
    assert int(abstract["count"].value) == 3
    # without a mesh: arrays on the default device
    plain = refx.eval_shape(make_model, jax.random.key(1))
    concrete = make_model(jax.random.key(2))
    refx.save(tmp_path / "plain", concrete)
    refx.restore(tmp_path / "plain", plain)
    assert _same(plain, concrete)


def test_mismatch_against_an_abstract_model_is_the_usual_error():
    abstract = refx.eval_shape(make_model, jax.random.key(1))
    state = _numpy_state(make_model(jax.random.key(0), dhid=6))
    with pytest.raises(ValueError, match=r"'enc/b': float32\[6\] in the state, float32\[5\] "
                                         r"in the tree"):
        refx.load_state_dict(abstract, state)
    assert isinstance(abstract["enc"]["b"].value, SDS)  # nothing loaded


def test_errors_name_the_place():
    with pytest.raises(TypeError, match=r"refx.eval_shape: fun must be callable, not int"):
        refx.eval_shape(3)
    with pytest.raises(TypeError, match=r"refx.eval_shape\(.*<lambda>\): the Ref of argument 0 "
                                        r"at \('a',\) holds a str"):
        refx.eval_shape(lambda t: t, {"a": refx.Ref("text")})

    def grow(t):
        t["new"] = refx.Ref(jnp.ones(2))

    with pytest.raises(ValueError, match=r"refx.eval_shape\(test_errors_name_the_place.<locals>."
                                         r"grow\): fun added a leaf at argument 0 at \('new',\)"):
        refx.eval_shape(grow, {"a": refx.Ref(jnp.ones(2))})
    outer = refx.Ref(jnp.ones(2))

    def write_closed(x):
        outer.value = x

    refx.eval_shape(write_closed, jnp.zeros(2))  # abstract: nothing is written
    assert float(outer.value[0]) == 1.0


# --------------------------------------------------------------------------
# 8 devices: sharded init without a whole parameter on any device
# --------------------------------------------------------------------------

SHAPES = {"w1": ((24, 40), (None, "model")), "b1": ((40,), ("model",)),
          "w2": ((40, 56), ("model", "data")), "emb": ((72, 88), ("data", None)),
          "scale": ((104,), None)}


def big_model(key):
    keys = jax.random.split(key, len(SHAPES))
    out = {}
    for k, (name, (shape, spec)) in zip(keys, sorted(SHAPES.items()), strict=True):
        meta = {} if spec is None else {"sharding": spec}
        out[name] = refx.Ref(jax.random.normal(k, shape), "params", **meta)
    out["steps"] = refx.Ref(jnp.array(0), "state")
    return out


def scenario_sharded_init():
    jax.config.update("jax_threefry_partitionable", True)  # the default from JAX 0.5
    assert len(jax.devices()) == 8
    devices = np.array(jax.devices()).reshape(2, 4)
    if AxisType is None:
        mesh = jax.sharding.Mesh(devices, ("data", "model"))
    else:
        mesh = jax.sharding.Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    key = jax.random.key(0)
    res = {"problems": []}
    with active(mesh):
        abstract = refx.eval_shape(big_model, key)
        targets = refx.shardings(abstract)
        init = refx.jit(big_model)
        hlo = init.lower(key).compile().as_text()
        model = init(key)
    for name, (shape, spec) in SHAPES.items():
        want = NamedSharding(mesh, P() if spec is None else P(*spec))
        a, v = abstract[name].value, model[name].value
        if a.sharding != want or targets[name].value != want:
            res["problems"].append(f"{name}: abstract {a.sharding}, shardings "
                                   f"{targets[name].value}")
        if not v.sharding.is_equivalent_to(want, len(shape)):
            res["problems"].append(f"{name}: made on {v.sharding}")
        shard_shape = want.shard_shape(shape)
        got = sorted({tuple(s.data.shape) for s in v.addressable_shards})
        if got != [tuple(shard_shape)]:
            res["problems"].append(f"{name}: shards {got}, want {shard_shape}")
        full = f"f32[{','.join(map(str, shape))}]"
        if spec is not None and full in hlo:
            res["problems"].append(f"{name}: the compiled init holds a whole {full}")
        if spec is not None and tuple(shard_shape) == tuple(shape):
            res["problems"].append(f"{name}: not sharded at all")
        res[name] = [list(shard_shape), len(v.addressable_shards)]
    # the same numbers as an init on one device
    ref = jax.device_get(refx.state_dict(big_model(key)))
    got = jax.device_get(refx.state_dict(model))
    res["same_values"] = all(np.allclose(ref[n], got[n]) for n in ref)
    # restore into the abstract model reads each array onto its sharding
    try:
        import tempfile

        import orbax.checkpoint  # noqa: F401
    except ImportError:
        res["restore"] = "skip: orbax-checkpoint is not installed"
    else:
        d = tempfile.mkdtemp()
        refx.save(os.path.join(d, "c"), model)
        with active(mesh):
            target = refx.eval_shape(big_model, jax.random.key(1))
            refx.restore(os.path.join(d, "c"), target)
        ok = all(target[n].value.sharding.is_equivalent_to(model[n].value.sharding,
                                                           len(SHAPES[n][0]))
                 and bool(jnp.all(target[n].value == model[n].value)) for n in SHAPES)
        res["restore"] = "ok" if ok else "mismatch"
    return res


def test_sharded_init_on_8_devices():
    import multidevice

    res = multidevice.run(os.path.basename(__file__), "sharded_init", devices=8, timeout=600)
    assert res["problems"] == [], res["problems"]
    assert res["same_values"]
    assert res["w1"] == [[24, 10], 8] and res["w2"] == [[10, 28], 8]
    assert res["emb"] == [[36, 88], 8] and res["scale"] == [[104], 8]
    assert res["restore"] in ("ok",) or res["restore"].startswith("skip"), res["restore"]


if __name__ == "__main__":
    print("RESULT " + json.dumps(globals()["scenario_" + sys.argv[1]]()))
