"""Shared pieces of the refx benchmarks: trees, timing, tables, results.

Timing: every competitor of a question runs in the same process; rounds
interleave the competitors (A B C, B C A, C A B, ...) so drift of a noisy
machine hits all of them alike, and each round times a batch of calls of
each.  We report the median per-call time over rounds.  The garbage
collector stays on (as in a training loop); each batch starts after a
gc.collect().
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

import refx

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
SMOKE = os.environ.get("REFX_BENCH_SMOKE") == "1"

# ~30, ~3,000 and ~100,000 Refs (smoke: tiny)
SIZES = [30, 300] if SMOKE else [30, 3_000, 100_000]


# --------------------------------------------------------------------- trees


def _arrays(n: int, shape: tuple[int, ...], rng) -> list:
    """n distinct jax arrays: one transfer, then split (100k arrays in ~1.5 s
    where 100k jnp calls take ~5 s)."""
    return list(jax.device_put(rng.standard_normal((n, *shape), dtype=np.float32)))


def model_tree(n_refs: int, seed: int = 0):
    """Layers of {w, b, bs} Refs; every fourth layer and the output head
    share the first layer's weight Ref.  About n_refs distinct Refs."""
    n_layers = max(2, n_refs // 3)
    rng = np.random.default_rng(seed)
    ws, bs, stats = (iter(_arrays(n_layers, (4,), rng)) for _ in range(3))
    w0 = refx.Ref(next(ws), "params")
    layers = []
    for i in range(n_layers):
        w = w0 if i % 4 == 0 else refx.Ref(next(ws), "params")
        layers.append({
            "w": w,
            "b": refx.Ref(next(bs), "params"),
            "bs": refx.Ref(next(stats), "batch_stats"),
        })
    return {"layers": layers, "head": w0}


def flat_tree(n_refs: int, seed: int = 0):
    """A flat list of distinct Refs, no sharing."""
    return [refx.Ref(a, "params") for a in _arrays(n_refs, (2,), np.random.default_rng(seed))]


def tree_stats(tree) -> dict:
    leaves = jax.tree_util.tree_leaves(tree)
    refs = [x for x in leaves if isinstance(x, refx.Ref)]
    distinct = len({id(r) for r in refs})
    nodes = jax.tree_util.tree_structure(tree).num_nodes
    return {
        "leaves": len(leaves),
        "nodes": nodes,
        "distinct_refs": distinct,
        "shared_fraction": round(1 - distinct / len(refs), 3) if refs else 0.0,
    }


def size_str(stats: dict) -> str:
    """leaves / nodes / distinct Refs / shared fraction, for a table cell."""
    return (f"{stats['leaves']:,} / {stats['nodes']:,} / {stats['distinct_refs']:,} / "
            f"{stats['shared_fraction']:.0%}")


SIZE_HEADER = "leaves / nodes / Refs / shared"


# -------------------------------------------------------------------- timing


def floor(tree) -> Callable[[], object]:
    """jax.tree_util.tree_flatten + tree_unflatten of the same tree."""
    flatten, unflatten = jax.tree_util.tree_flatten, jax.tree_util.tree_unflatten

    def f():
        leaves, td = flatten(tree)
        return unflatten(td, leaves)

    return f


def batch_sizes(fns: dict[str, Callable[[], object]], budget: float, clock: Callable[[], float],
                 min_dt: float) -> dict[str, int]:
    """Each fn runs twice untimed (jit compiles, path caches); the second
    run, timed on `clock`, sizes its batch: as many calls as fit in
    `budget` seconds, at least one."""
    numbers = {}
    for name, fn in fns.items():
        fn()
        t0 = clock()
        fn()
        numbers[name] = max(1, int(budget / max(clock() - t0, min_dt)))
    return numbers


def rotated(names: list[str], r: int) -> list[str]:
    """Round r's order: drift and warm caches favour no competitor."""
    return names[r % len(names):] + names[:r % len(names)]


def time_batch(fn: Callable[[], object], n: int, clock: Callable[[], float], gc_off: bool = False) -> float:
    """Seconds per call of n calls of fn on `clock`, after a gc.collect()
    (no competitor pays for collecting another's garbage), with the
    collector off during the batch if gc_off."""
    gc.collect()
    was_enabled = gc.isenabled()
    if gc_off:
        gc.disable()
    try:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n
    finally:
        if was_enabled:
            gc.enable()


def bench(fns: dict[str, Callable[[], object]], rounds: int | None = None,
          budget: float | None = None) -> dict[str, float]:
    """Median seconds per call of each fn over `rounds` interleaved rounds.

    Batches are sized by batch_sizes; rounds run the competitors in a
    rotated order; each batch starts after a gc.collect() (at 100k Refs one
    full collection costs more than some of the calls timed).
    """
    rounds = rounds or (3 if SMOKE else 15)
    budget = budget or (0.002 if SMOKE else 0.05)
    numbers = batch_sizes(fns, budget, time.perf_counter, 1e-7)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name].append(time_batch(fns[name], numbers[name], time.perf_counter))
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_wall_cpu(fns: dict[str, Callable[[], object]], rounds: int,
                   budget: float, samples: dict | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """bench's method (interleaved rotated rounds, a gc.collect()
    before each batch, medians), timing each batch with two clocks: wall
    time, and this process's CPU time (all its threads, XLA's included).
    The machine is shared: when other jobs load it, wall-time medians of
    millisecond calls swing by 2x while CPU time stays put, so both are kept
    and the goals are judged on both.  `samples`, if given, receives each
    competitor's per-round (wall, cpu) lists, for paired_median."""
    numbers = batch_sizes(fns, budget, time.perf_counter, 1e-7)
    names = list(fns)
    wall: dict = {n: [] for n in fns}
    cpu: dict = {n: [] for n in fns}
    for r in range(rounds):
        for name in rotated(names, r):
            fn, n = fns[name], numbers[name]
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            wall[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((time.process_time() - c0) / n)
    if samples is not None:
        samples.update({n: (wall[n], cpu[n]) for n in fns})
    return ({n: statistics.median(v) for n, v in wall.items()},
            {n: statistics.median(v) for n, v in cpu.items()})


def paired_median(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[r] / b[r]: two competitors timed in the same
    round of bench_wall_cpu see the same machine, so drift between rounds
    cancels in each ratio (a ratio of the two medians does not pair them)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def paired_ratios(base: Callable[[], object], fns: dict[str, Callable[[], object]],
                  rounds: int | None = None, budget: float | None = None) -> dict[str, float]:
    """Median over rounds of (CPU time of fn / CPU time of base), GC off.

    The method of the issue that set the floor goals: each round times a
    batch of `base` and, right after it, a batch of each fn (rotated order),
    in process CPU time with the garbage collector disabled (collected
    before each batch), and takes their ratio; the result is the median of
    those per-round ratios.  A pair measured back to back sees the same
    machine, so a shared machine's drift cancels in each ratio.
    """
    rounds = rounds or (3 if SMOKE else 15)
    budget = budget or (0.002 if SMOKE else 0.05)
    allfns = {"base": base, **fns}
    numbers = batch_sizes(allfns, budget, time.process_time, 1e-6)
    names = list(fns)
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        per_call = {name: time_batch(allfns[name], numbers[name], time.process_time, gc_off=True)
                    for name in ["base"] + rotated(names, r)}
        for name in names:
            ratios[name].append(per_call[name] / per_call["base"])
    return {name: statistics.median(v) for name, v in ratios.items()}


# -------------------------------------------------------------------- output


def fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    if us < 1000:
        return f"{us:.1f} µs"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = "\n".join("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
                     for r in rows)
    text = f"\n### {title}\n\n{line}\n{sep}\n{body}\n"
    print(text, flush=True)
    return text


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": sys.version.split()[0], "jax": jax.__version__, "refx": refx.__version__}
    for mod in ("flax", "equinox", "optax"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(), **versions}


def save(name: str, data: dict, table: str) -> None:
    if SMOKE:
        return  # smoke runs check that the scripts work; they keep no results
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **data}, indent=1))
    (RESULTS / f"{name}.md").write_text(table)


def check(cond: bool, what: str) -> None:
    """Competitors must agree before they are timed."""
    if not cond:
        raise SystemExit(f"benchmark check failed: {what}")
