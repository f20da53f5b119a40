"""Random test order (pytest-randomly) that one number replays.

CI runs the suite in a random order so that coupling between tests (one
test relying on state another left: the path cache, the GC, a registered
pytree node) shows up.  pytest-randomly picks the seed, reorders modules
and tests with it, and reseeds `random` and numpy before each test; it
prints the seed in pytest's header, which `-q` hides, so it is printed
here at the start (a crash mid-run still shows it) and again at the end.

pytest-randomly leaves Hypothesis alone: Hypothesis draws each test's seed
from fresh entropy, so a failing order replayed with --randomly-seed would
not see the same examples.  While randomly is active, each Hypothesis test
gets `hypothesis.seed(randomly seed + crc32(test id))` instead: a new seed
every run (the examples still vary from run to run) and one number,
--randomly-seed=N, replays the order and every example.  (hypothesis.seed
also turns off the example database for that test: the seed is the record
of a failure, and CI's fresh clone has no database anyway.)  An explicit
--hypothesis-seed, or -p no:randomly, leaves Hypothesis as it was.
"""

import os
import zlib

import pytest


def _randomly_seed(config):
    if not config.pluginmanager.hasplugin("randomly"):
        return None
    seed = config.getoption("randomly_seed", None)
    return seed if isinstance(seed, int) else None


def pytest_sessionstart(session):
    seed = _randomly_seed(session.config)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if seed is not None and tr is not None and session.config.get_verbosity() < 0:
        tr.write_line(f"Using --randomly-seed={seed}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    seed = _randomly_seed(config)
    if seed is None or config.getoption("hypothesis_seed", None) is not None:
        return
    import hypothesis

    for item in items:
        fn = getattr(item, "obj", None)
        if getattr(fn, "is_hypothesis_test", False):
            hypothesis.seed((seed + zlib.crc32(item.nodeid.encode())) % 2**32)(fn)


def pytest_terminal_summary(terminalreporter, config):
    seed = _randomly_seed(config)
    if seed is not None:
        # The Makefile names the target that ran this venv's suite.
        make = os.environ.get("REFX_REPLAY")
        how = f"{make} PYTEST_ARGS=--randomly-seed={seed}" if make else f"--randomly-seed={seed}"
        terminalreporter.write_line(f"random order: --randomly-seed={seed}; replay it with {how}")
