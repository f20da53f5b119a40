"""Running test scripts in subprocesses with simulated CPU devices (for
test_sharding.py and test_multihost.py).  Not a test module itself.

The suite keeps one device: XLA_FLAGS must be set before jax is imported,
so every multi-device run is a fresh interpreter with its own environment.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def env_with_devices(n):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def start(script, *args, devices):
    """Start `script` (a file in tests/) in a new process group."""
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *map(str, args)], cwd=HERE,
        env=env_with_devices(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)


def kill(proc):
    """Kill a process started by `start` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that will not die
        return "", "(no output: the process did not exit after SIGKILL)"


def result(name, proc, out, err):
    """The RESULT json a worker printed, or an AssertionError showing its
    output."""
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            if proc.returncode == 0:
                return json.loads(line[len("RESULT "):])
            break
    raise AssertionError(
        f"{name} exited with {proc.returncode} and no result\n--- stdout ---\n{out[-5000:]}"
        f"\n--- stderr ---\n{err[-10000:]}")


def run(script, *args, devices=8, timeout=300):
    """Run `script` to completion; its RESULT."""
    proc = start(script, *args, devices=devices)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill(proc)
        raise AssertionError(
            f"{script} {' '.join(map(str, args))}: no answer in {timeout} s (killed)\n"
            f"--- stdout ---\n{out[-5000:]}\n--- stderr ---\n{err[-10000:]}") from None
    return result(f"{script} {' '.join(map(str, args))}", proc, out, err)


def free_port():
    """A TCP port nothing listens on now (the coordinator binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
