"""One process of test_multihost.py's run (or its single-process reference).

    python multihost_worker.py process ID COUNT PORT   (4 CPU devices each)
    python multihost_worker.py single                  (8 CPU devices)

A process joins the others on 127.0.0.1:PORT with jax.distributed (CPU
collectives over gloo), makes a global 2x4 ("data", "model") mesh of all
processes' devices, builds sharding_model's model with sharded Refs under
it and trains it for a few refx.jit steps on a global batch over "data".
"single" does the same on one process with 8 devices.  Either prints
``RESULT <json>``: the losses, every Ref off its declared sharding, the
device counts.
"""

import json
import os
import sys

import jax

MODE = sys.argv[1]
if MODE == "process":
    pid, count, port = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=pid,
                               initialization_timeout=60)

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import sharding_model as sm  # noqa: E402

warnings.simplefilter("ignore", DeprecationWarning)  # `with mesh:` on newer JAX
STEPS = 3


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    # process 0's devices are the first row: "data" spans the processes
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
    xs, ys = sm.data(steps=STEPS)
    with sm.mesh_context(mesh):
        model = sm.make_model()
        opt = sm.make_opt(model)
        problems = sm.sharding_problems(model, opt, mesh)
        losses = []
        for i in range(STEPS):
            loss = sm.train_step(model, opt, sm.shard_batch(mesh, xs[i]),
                                 sm.shard_batch(mesh, ys[i]))
            losses.append(float(loss))
            problems += [f"after step {i}: {p}" for p in sm.sharding_problems(model, opt, mesh)]
        w = model["l1"]["w"].value
    return {"losses": losses, "problems": problems, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count(),
            "local_shards_of_l1_w": len(w.addressable_shards), "pid": os.getpid()}


if __name__ == "__main__":
    result = main()
    print("RESULT " + json.dumps(result), flush=True)
    if MODE == "process":
        jax.distributed.shutdown()
