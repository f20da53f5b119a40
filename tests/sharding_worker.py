"""Scenarios on 8 simulated CPU devices, for test_sharding.py.

Run as ``python sharding_worker.py SCENARIO`` with
XLA_FLAGS=--xla_force_host_platform_device_count=8 in the environment (set
by the test before jax is imported here).  Prints one line ``RESULT
<json>`` that the test reads; a scenario that cannot run on this JAX says
so in its result ("skip": reason), never silently.
"""

import json
import os
import sys
import tempfile
import warnings

import jax

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), (
    "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
assert len(jax.devices()) == 8, jax.devices()
warnings.simplefilter("ignore", DeprecationWarning)  # `with mesh:` on newer JAX

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import refx  # noqa: E402
import sharding_model as sm  # noqa: E402

AxisType = getattr(jax.sharding, "AxisType", None)
STEPS = 4


def make_mesh(shape, explicit=False):
    if AxisType is None:
        devices = np.array(jax.devices()).reshape(shape)
        return jax.sharding.Mesh(devices, ("data", "model"))
    t = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(t, t))


def train_on(mesh):
    """A few steps under `mesh`; the losses and any Ref off its sharding."""
    xs, ys = sm.data(steps=STEPS)
    with sm.mesh_context(mesh):
        model = sm.make_model()
        opt = sm.make_opt(model)
        problems = [f"after creation: {p}" for p in sm.sharding_problems(model, opt, mesh)]
        losses = []
        for i in range(STEPS):
            x, y = sm.shard_batch(mesh, xs[i]), sm.shard_batch(mesh, ys[i])
            losses.append(float(sm.train_step(model, opt, x, y)))
            problems += [f"after step {i}: {p}" for p in sm.sharding_problems(model, opt, mesh)]
        return {"losses": losses, "problems": problems, "specs": sm.spec_strings(model),
                "steps": int(model["steps"].value)}


def scenario_train():
    """The same model on one device, then data parallel, model parallel and
    both (and both with Explicit axes, where JAX has them)."""
    xs, ys = sm.data(steps=STEPS)
    model = sm.make_model()
    opt = sm.make_opt(model)
    one = [float(sm.train_step(model, opt, jnp.asarray(xs[i]), jnp.asarray(ys[i])))
           for i in range(STEPS)]
    out = {"one_device": {"losses": one, "devices": len(model["l1"]["w"].value.devices())}}
    for name, shape in (("data", (8, 1)), ("model", (1, 8)), ("both", (2, 4))):
        out[name] = train_on(make_mesh(shape))
    if AxisType is None:
        out["explicit"] = {"skip": f"JAX {jax.__version__} has no explicit mesh axes"}
    else:
        out["explicit"] = train_on(make_mesh((2, 4), explicit=True))
    return out


def scenario_constraint():
    """A step that writes a fresh (replicated) array into a declared Ref:
    refx.jit puts it back on the declared sharding; with refx's constraint
    switched off (to show the check can fail) it stays replicated."""
    mesh = make_mesh((2, 4))

    def fresh(m):
        m["w"].value = jnp.zeros((8, 8)) + m["w"].value.sum()

    out = {}
    with sm.mesh_context(mesh):
        for label in ("refx", "unconstrained"):
            if label == "unconstrained":
                import refx._sharding as rs

                rs.constrain_values, saved = (lambda v, *a, **k: v), rs.constrain_values
            try:
                w = refx.Ref(jnp.ones((8, 8)), "params", sharding=("data", "model"))
                refx.jit(fresh)({"w": w})
                out[label] = str(w.value.sharding.spec)
                out[label + "_ok"] = w.value.sharding.is_equivalent_to(
                    NamedSharding(mesh, P("data", "model")), 2)
            finally:
                if label == "unconstrained":
                    rs.constrain_values = saved
    # the legacy `with mesh:` context (deprecated from JAX 0.7; the only one
    # before 0.5): inside a trace its mesh is concrete, not abstract
    with mesh:
        w = refx.Ref(jnp.ones((8, 8)), "params", sharding=("data", "model"))
        refx.jit(fresh)({"w": w})
        out["with_mesh_ok"] = w.value.sharding.is_equivalent_to(
            NamedSharding(mesh, P("data", "model")), 2)
    return out


def scenario_placement():
    """Where values go: Ref creation with and without a mesh, replace, a Ref
    made inside refx.jit, a NamedSharding declaration, and a jit cache entry
    first traced without a mesh then called under one."""
    mesh = make_mesh((2, 4))
    out = {}
    r = refx.Ref(jnp.ones((8, 8)), "params", sharding=("data", None))
    out["no_mesh"] = type(r.value.sharding).__name__
    named = NamedSharding(mesh, P(None, "model"))
    out["named_no_mesh"] = str(refx.Ref(jnp.ones((8, 8)), sharding=named).value.sharding.spec)

    @refx.jit
    def step(m):
        m["w"].value = m["w"].value * 2
        made = refx.Ref(m["w"].value + 1, "params", sharding=("model", "data"))
        return made

    m = {"w": r}
    step(m)  # traced without a mesh: nothing to constrain to
    out["jit_no_mesh"] = type(r.value.sharding).__name__
    with sm.mesh_context(mesh):
        out["created"] = str(refx.Ref(jnp.ones((8, 8)), sharding=("data", None))
                             .value.sharding.spec)
        out["replace"] = str(r.replace(sharding=(None, "data")).value.sharding.spec)
        made = step(m)  # the same refx.jit entry, now under the mesh: retraced
        out["jit_mesh"] = str(r.value.sharding.spec)
        out["made_inside"] = str(made.value.sharding.spec)
        out["made_inside_meta"] = dict(made.metadata)["sharding"]
        try:
            refx.Ref(jnp.ones((8, 8)), sharding=("batch", None))
        except ValueError as e:
            out["bad_axis"] = str(e)
        try:
            refx.Ref(jnp.ones(6), sharding=("model",))
        except ValueError as e:
            out["indivisible"] = str(e)
    return out


def scenario_shardings():
    """refx.shardings as jax.jit's in/out shardings on a deref'ed model."""
    mesh = make_mesh((2, 4))
    with sm.mesh_context(mesh):
        model = sm.make_model()
    s = refx.shardings(model, mesh)

    @jax.jit
    def double(d):
        return jax.tree_util.tree_map(lambda v: v * 2, d)

    f = jax.jit(double, in_shardings=(s,), out_shardings=s)
    out = f(refx.deref(model))
    new = refx.reref(out)
    specs = {"/".join(p): str(new[p[0]][p[1]].value.sharding.spec) for p in sm.SPECS}
    return {"specs": specs, "steps": str(new["steps"].value.sharding.spec),
            "w": float(new["l1"]["w"].value.sum() / model["l1"]["w"].value.sum())}


def scenario_restore():
    """refx.restore reads each array onto its Ref's declared sharding."""
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return {"skip": "orbax-checkpoint is not installed"}
    mesh = make_mesh((2, 4))
    ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
    with sm.mesh_context(mesh):
        src = sm.make_model(seed=3)
        src_opt = sm.make_opt(src)
        refx.save(ckpt, {"model": src, "opt": src_opt})
    out = {}
    # 1. a fresh model made without a mesh (one device), restored under one
    dst = sm.make_model(seed=4)
    dst_opt = sm.make_opt(dst)
    out["before"] = type(dst["l1"]["w"].value.sharding).__name__
    with sm.mesh_context(mesh):
        refx.restore(ckpt, {"model": dst, "opt": dst_opt})
    out["problems"] = sm.sharding_problems(dst, dst_opt, mesh)
    out["equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(refx.deref(src)),
                        jax.tree_util.tree_leaves(refx.deref(dst)), strict=True))
    # 2. no active mesh: the declared spec on the mesh the array is on now
    other = make_mesh((4, 2))
    w = refx.Ref(jax.device_put(jnp.zeros((sm.DIN, sm.HIDDEN)), NamedSharding(other, P())),
                 "params", sharding=(None, "model"))
    res = refx.restore(ckpt, {"model": {"l1": {"w": w}}}, strict=False)
    out["no_mesh_spec"] = str(w.value.sharding.spec)
    out["no_mesh_mesh"] = dict(w.value.sharding.mesh.shape)
    out["no_mesh_missing"] = list(res.missing)
    # 3. load_state_dict with numpy arrays goes onto the declared sharding
    with sm.mesh_context(mesh):
        fresh = sm.make_model(seed=5)
    sd = {k: np.asarray(v) for k, v in refx.state_dict(src).items()}
    refx.load_state_dict(fresh, sd)
    out["load_problems"] = [p for p in sm.sharding_problems(fresh, sm.make_opt(fresh), mesh)
                            if not p.startswith("opt")]
    return out


if __name__ == "__main__":
    result = globals()["scenario_" + sys.argv[1]]()
    print("RESULT " + json.dumps(result), flush=True)
