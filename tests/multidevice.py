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
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent


def env_with_devices(n):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Worker:
    """A script of tests/ running in its own process group, its output
    going to temporary files (a pipe nobody reads could fill and block it)."""

    def __init__(self, script, *args, devices):
        """`script`: a path relative to tests/ (or absolute)."""
        self.name = " ".join([str(script), *map(str, args)])
        self._out = tempfile.TemporaryFile(mode="w+")
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *map(str, args)], cwd=(HERE / script).parent,
            env=env_with_devices(devices), stdout=self._out, stderr=self._err, text=True,
            start_new_session=True)

    def poll(self):
        return self.proc.poll()

    def kill(self):
        """Kill it and everything it started (no-op once it has exited)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def output(self):
        """(stdout, stderr) so far; all of it once the process has exited
        (then the files are closed)."""
        if self._out is None:
            return self._texts
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read())
        self._texts = tuple(texts)
        if self.proc.poll() is not None:
            self._out.close()
            self._err.close()
            self._out = self._err = None
        return self._texts

    def report(self):
        out, err = self.output()
        return (f"=== {self.name} (exit {self.proc.returncode}) ===\n--- stdout ---\n"
                f"{out[-5000:]}\n--- stderr ---\n{err[-10000:]}")

    def result(self):
        """The RESULT json it printed; AssertionError showing its output if
        it failed or printed none."""
        out, _ = self.output()
        if self.proc.returncode == 0:
            for line in reversed(out.splitlines()):
                if line.startswith("RESULT "):
                    return json.loads(line[len("RESULT "):])
        raise AssertionError(f"{self.name}: no result\n{self.report()}")


def wait_all(workers, timeout):
    """Wait until every worker has exited, one has failed, or `timeout`
    seconds have passed; then kill whatever still runs.  True if all of
    them exited with 0 in time."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [w.poll() for w in workers]
            if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    finally:
        for w in workers:
            w.kill()
    return all(w.proc.returncode == 0 for w in workers)


def run(script, *args, devices=8, timeout=300, result=True):
    """Run `script` to completion; its RESULT (or, with result=False, its
    stdout, if it exited with 0)."""
    w = Worker(script, *args, devices=devices)
    if not wait_all([w], timeout) and w.proc.returncode in (None, -signal.SIGKILL):
        raise AssertionError(f"{w.name}: no answer in {timeout} s (killed)\n{w.report()}")
    if not result:
        if w.proc.returncode != 0:
            raise AssertionError(f"{w.name} failed\n{w.report()}")
        return w.output()[0]
    return w.result()


def free_port():
    """A TCP port nothing listens on now (the coordinator binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
