"""Train the digits MLP data- and model-parallel on 8 simulated CPU devices
(`make demo-sharded`).

The model is train_digits.py's (BatchNorm, Dropout, a tied decoder weight),
built with ``sharded=True``: its Refs declare model-parallel shardings over
a mesh axis "model" (``Ref(w, "params", sharding=(None, "model"))``).  Made
under an active 2x4 mesh ("data", "model"), each Ref is created on its
sharding; each batch is split over "data"; the training step is
train_digits.py's own ``refx.jit`` step, which keeps every Ref it writes
(params, batch statistics, the optimiser's moments) on its declared
sharding.  The script prints the mesh, each Ref's sharding before and after
training, and the test accuracy.

JAX simulates the 8 devices on the CPU (XLA_FLAGS, set below before jax is
imported), so this shows the layout, not a speed-up.
"""

from __future__ import annotations

import os
import re

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import time  # noqa: E402
from contextlib import AbstractContextManager  # noqa: E402
from typing import Any, cast  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import refx  # noqa: E402
import refx.nn as nn  # noqa: E402
from train_digits import MLP, batches, load_data, predict, train_step  # noqa: E402


def make_mesh(shape: tuple[int, int]) -> Mesh:
    """A ("data", "model") mesh with Auto axes.  (jax.make_mesh's default
    from JAX 0.9 is Explicit axes, where a matmul contracting a sharded
    dimension must be given its output sharding: layer code JAX asks for,
    not refx, e.g. ``self.linear(h, out_sharding=P("data", None))`` as in
    NNX; refx works with both, see docs/nn.md.)"""
    devices = np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # JAX < 0.6: every axis is Auto
        return Mesh(devices, ("data", "model"))
    return Mesh(devices, ("data", "model"), axis_types=(axis_type.Auto,) * 2)


def use(mesh: Mesh) -> AbstractContextManager[Any]:
    """Make `mesh` the active mesh: jax.set_mesh, or `with mesh:` before it."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return mesh


def spec(x: jax.Array) -> str:
    """'(None, model)' for a NamedSharding's spec, whatever JAX prints."""
    s = x.sharding
    if not isinstance(s, NamedSharding):
        return type(s).__name__
    return "(" + ", ".join(re.sub(r"'", "", str(e)) for e in s.spec) + ")"


def ref_table(model: MLP) -> list[tuple[str, str, str]]:
    """(path, declared, actual) for every distinct array Ref of the model."""
    rows = []
    for path, ref in refx.get_partition(refx.deref(model), refx.Value).items():
        if isinstance(ref, refx.Value) and isinstance(ref.value, jax.Array):
            declared = ref.metadata.get("sharding")
            rows.append(("/".join(path), "-" if declared is None else str(declared),
                         spec(ref.value) if ref.collection != "rngs" else "(rng)"))
    return rows


def off_their_sharding(model: MLP, mesh: Mesh) -> list[str]:
    """Refs whose array is not on the sharding they declare, as
    refx.shardings gives it (a NamedSharding per Ref, in deref's shape)."""
    want = refx.get_partition(refx.shardings(model, mesh), refx.Value)
    bad = []
    for path, ref in refx.get_partition(refx.deref(model), refx.Value).items():
        if isinstance(ref, refx.Value) and ref.metadata.get("sharding") is not None:
            if not ref.value.sharding.is_equivalent_to(want[path].value, ref.value.ndim):
                bad.append("/".join(path))
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    mesh = make_mesh((2, 4))
    print(f"JAX {jax.__version__}, {len(jax.devices())} devices; mesh {dict(mesh.shape)}:")
    print(np.vectorize(lambda d: d.id)(mesh.devices))
    xtr, ytr, xte, yte = load_data(args.seed)
    batch_sharding = NamedSharding(mesh, cast(Any, PartitionSpec)("data"))

    with use(mesh):
        model = MLP(seed=args.seed, sharded=True)
        opt = nn.Optimizer(model, optax.adam(2e-3))
        model.train()
        print("\nRefs (declared sharding -> where the array is):")
        for path, declared, actual in ref_table(model):
            print(f"  {path:24s} {declared:18s} {actual}")

        t0 = time.perf_counter()
        loss, first = jnp.zeros(()), float("nan")
        for step, idx in zip(range(args.steps), batches(len(xtr), 64, args.seed), strict=False):
            x = jax.device_put(xtr[idx], batch_sharding)  # the batch over "data"
            y = jax.device_put(ytr[idx], batch_sharding)
            loss = train_step(model, opt, x, y)
            if step == 0:
                first = float(loss)
        elapsed = time.perf_counter() - t0
        bad = off_their_sharding(model, mesh)
        test_x = jax.device_put(xte, batch_sharding)
        acc = float(jnp.mean(predict(model, test_x) == yte))

    print(f"\ntrained {args.steps} steps in {elapsed:.1f}s; loss {first:.3f} -> {float(loss):.3f}")
    w = model.blocks[0].linear.kernel.value
    print(f"blocks/0/linear/kernel after training: {spec(w)}, {len(w.addressable_shards)} shards "
          f"of {w.addressable_shards[0].data.shape}")
    assert model.decoder.kernel is model.blocks[0].linear.kernel, "the tied weight came apart"
    assert not bad, f"Refs off their declared sharding after training: {bad}"
    print("every Ref is on its declared sharding after training; the tied weight is one Ref")
    print(f"test accuracy: {acc:.2%}")
    assert acc >= 0.9, f"test accuracy {acc:.2%} is below 90%"


if __name__ == "__main__":
    main()
