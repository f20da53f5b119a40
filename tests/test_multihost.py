"""Two processes on 127.0.0.1 joined with jax.distributed (CPU collectives
over gloo, 4 CPU devices each, one global 2x4 mesh) train a refx model
with sharded Refs for a few refx.jit steps; both report the losses of the
same run in one process with 8 devices, and every Ref on its declared
sharding of the global mesh (multihost_worker.py).

Robustness: the coordinator's port is picked free just before the start
(a run that finds it taken after all is retried once on a new port), the
workers get a deadline and are killed with their process groups when they
miss it or when one fails, and a failure prints both workers' output.
"""

import time

import numpy as np

import multidevice

TIMEOUT = 240  # seconds for both workers together (each takes ~10 s alone)


def _two_processes():
    """[result of process 0, result of process 1]; AssertionError with
    their output otherwise (after one retry on a port clash)."""
    for attempt in range(2):
        port = multidevice.free_port()
        workers = [multidevice.Worker("multihost_worker.py", "process", i, 2, port, devices=4)
                   for i in range(2)]
        t0 = time.monotonic()
        if multidevice.wait_all(workers, TIMEOUT):
            return [w.result() for w in workers]
        text = "\n".join(w.report() for w in workers)
        clash = "address already in use" in text.lower() or "failed to bind" in text.lower()
        if not (clash and attempt == 0):
            took = time.monotonic() - t0
            raise AssertionError(
                f"two-process run on port {port} failed after {took:.0f} s"
                f"{f' (killed at the {TIMEOUT} s limit)' if took >= TIMEOUT else ''}:\n{text}")
    raise AssertionError("unreachable")  # pragma: no cover


def test_two_processes_train_like_one():
    single = multidevice.run("multihost_worker.py", "single", devices=8, timeout=TIMEOUT)
    assert single["process_count"] == 1 and single["global_devices"] == 8
    assert single["problems"] == [], "\n".join(single["problems"])

    results = _two_processes()
    for i, res in enumerate(results):
        assert res["process_index"] == i and res["process_count"] == 2, res
        assert res["local_devices"] == 4 and res["global_devices"] == 8, res
        # each process holds its 4 of the 8 shards of a sharded weight
        assert res["local_shards_of_l1_w"] == 4, res
        assert res["problems"] == [], f"process {i}:\n" + "\n".join(res["problems"])
        np.testing.assert_allclose(res["losses"], single["losses"], rtol=1e-5, atol=1e-6,
                                   err_msg=f"process {i} vs the single-process run")
    assert results[0]["losses"] == results[1]["losses"]
    assert single["losses"][-1] < single["losses"][0]
