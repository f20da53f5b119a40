"""A small model with declared shardings, shared by the multi-device tests
(sharding_worker.py, multihost_worker.py; run in subprocesses by
test_sharding.py and test_multihost.py).  Not a test module itself.

Two dense layers, Megatron style over the "model" axis (the first layer's
outputs sharded, the second layer contracting them), a batch statistic
written every step, a step counter with no declared sharding, and an adam
state in a Ref (its moments are Values carrying each parameter's sharding).
The batch goes over "data".  Everything is deterministic numpy, so a run on
one device and a run on a mesh see the same numbers.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import refx

DIN, HIDDEN, DOUT, BATCH = 16, 32, 8, 32
SPECS = {  # path -> declared sharding
    ("l1", "w"): (None, "model"),
    ("l1", "b"): ("model",),
    ("l1", "mean"): ("model",),
    ("l2", "w"): ("model", None),
    ("l2", "b"): (None,),
}
TX = optax.adam(3e-2)


def make_model(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

    return {
        "l1": {"w": refx.Ref(normal(DIN, HIDDEN), "params", sharding=SPECS["l1", "w"]),
               "b": refx.Ref(jnp.zeros(HIDDEN), "params", sharding=SPECS["l1", "b"]),
               "mean": refx.Ref(jnp.zeros(HIDDEN), "batch_stats", sharding=SPECS["l1", "mean"])},
        "l2": {"w": refx.Ref(normal(HIDDEN, DOUT), "params", sharding=SPECS["l2", "w"]),
               "b": refx.Ref(jnp.zeros(DOUT), "params", sharding=SPECS["l2", "b"])},
        "steps": refx.Ref(jnp.array(0), "state"),
    }


def make_opt(model):
    return refx.Ref(TX.init(refx.get_partition(refx.deref(model), "params")), "opt")


def data(seed=1, steps=4):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, BATCH, DIN)).astype(np.float32)
    ys = rng.normal(size=(steps, BATCH, DOUT)).astype(np.float32)
    return xs, ys


def _explicit_context():
    """Does the context mesh have Explicit axes (JAX 0.6+)?"""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if get is None or axis_type is None:
        return False
    mesh = get()
    types = getattr(mesh, "axis_types", None) or ()
    return isinstance(types, tuple) and axis_type.Explicit in types


def loss_fn(m, x, y):
    h = jnp.tanh(x @ m["l1"]["w"].value + m["l1"]["b"].value)
    m["l1"]["mean"].value = 0.9 * m["l1"]["mean"].value + 0.1 * jax.lax.stop_gradient(h.mean(0))
    m["steps"].value += 1
    if _explicit_context():
        # Explicit axes: a matmul contracting a sharded dimension must say
        # where its output goes (JAX's rule, not refx's)
        out = jnp.matmul(h, m["l2"]["w"].value, out_sharding=P("data", None))
    else:
        out = h @ m["l2"]["w"].value
    return jnp.mean((out + m["l2"]["b"].value - y) ** 2)


@refx.jit
def train_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(loss_fn)(model, x, y)
    params = refx.get_partition(refx.deref(model), "params")
    updates, opt.value = TX.update(grads, opt.value, params)
    refx.update_refs(refx.get_partition(model, "params"), optax.apply_updates(params, updates))
    return loss


def mesh_context(mesh):
    """Make `mesh` the active mesh: jax.set_mesh where JAX has it, else
    `with mesh:` (JAX 0.4.36)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return mesh


def no_context():
    return contextlib.nullcontext()


def shard_batch(mesh, x):
    """The global batch `x` (numpy, the same in every process) over "data"."""
    sharding = NamedSharding(mesh, P("data", None))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def sharding_problems(model, opt, mesh):
    """Every declared Ref (and adam moment) whose array is not on its
    declared sharding of `mesh`, as readable strings."""
    problems = []
    for path, spec in SPECS.items():
        r = model[path[0]][path[1]]
        _check(problems, "/".join(path), r.value, NamedSharding(mesh, P(*spec)))
    # adam's moments mirror the params: Values carrying their sharding
    for i, part in enumerate(opt.value):
        for field in ("mu", "nu"):
            moments = getattr(part, field, None)
            if moments is None:
                continue
            for path, v in moments.items():
                if isinstance(v, refx.Value):
                    _check(problems, f"opt[{i}].{field}/{'/'.join(path)}", v.value,
                           NamedSharding(mesh, P(*SPECS[path])))
    return problems


def _check(problems, name, value, want):
    got = value.sharding
    if not got.is_equivalent_to(want, value.ndim):
        problems.append(f"{name}: {got} (want {want.spec})")


def spec_strings(model):
    return {"/".join(p): str(model[p[0]][p[1]].value.sharding.spec) for p in SPECS}
