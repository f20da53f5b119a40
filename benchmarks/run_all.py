"""Run every benchmark (`make bench`), or all of them quickly (`--smoke`).

Each question is its own script, run here in its own process so that one
competitor's import state (flax, equinox) cannot skew another's.  The full
run writes benchmarks/results/*.json and *.md, a log-log plot of time vs
tree size (results/scaling.png), and the summary benchmarks/README.md shows.
--smoke runs tiny sizes with few repeats (a few seconds each) and keeps no
results: `make test` runs it so the scripts cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = ["bench_floor.py", "bench_nnx.py", "bench_equinox.py", "bench_pure_python.py", "bench_step.py"]


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    floor = json.loads((RESULTS / "floor.json").read_text())
    model = [s for s in floor["sizes"] if s["tree"].startswith("model")]
    refs = [s["distinct_refs"] for s in model]
    ax = axes[0]
    for key, label in [("floor (Ref tree)", "tree_flatten+tree_unflatten (floor)"), ("deref", "refx.deref"),
                       ("reref", "refx.reref"), ("tree_partition", "refx.tree_partition"),
                       ("merge_partitions", "refx.merge_partitions"), ("update_refs", "refx.update_refs")]:
        ax.plot(refs, [s["seconds"][key] * 1e6 for s in model], "o-", label=label,
                lw=3 if "floor" in key else 1.5, color="black" if "floor" in key else None)
    ax.set(title="refx vs the pytree floor", xlabel="distinct Refs", ylabel="µs per call",
           xscale="log", yscale="log")
    ax.legend(fontsize=8)
    nnx = json.loads((RESULTS / "nnx.json").read_text())
    ax = axes[1]
    for key, label in [("nnx split+merge", "nnx.split + nnx.merge"), ("refx deref+reref", "refx.deref + refx.reref"),
                       ("nnx.update", "nnx.update"), ("refx update_refs", "refx.update_refs")]:
        ax.plot([s["refs"] for s in nnx["sizes"]], [s["seconds"][key] * 1e6 for s in nnx["sizes"]], marker="o",
                label=label, ls="--" if key.startswith("nnx") else "-")
    ax.set(title="refx vs Flax NNX", xlabel="distinct Refs / Variables", ylabel="µs per call",
           xscale="log", yscale="log")
    ax.legend(fontsize=8)
    eqx = json.loads((RESULTS / "equinox.json").read_text())
    ax = axes[2]
    for key, label in [("equinox partition+combine", "eqx.partition + eqx.combine"),
                       ("refx tree_partition+merge_partitions", "refx.tree_partition + merge_partitions")]:
        ax.plot([s["refs"] for s in eqx["sizes"]], [s["seconds"][key] * 1e6 for s in eqx["sizes"]], marker="o",
                label=label, ls="--" if key.startswith("equinox") else "-")
    ax.set(title="refx vs Equinox", xlabel="leaves", ylabel="µs per call", xscale="log", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats, no results kept")
    ap.add_argument("only", nargs="*", help="run only these scripts")
    args = ap.parse_args()
    env = dict(os.environ, REFX_BENCH_SMOKE="1" if args.smoke else "0")
    failed = []
    for script in args.only or SCRIPTS:
        t0 = time.perf_counter()
        print(f"== {script}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / script)], env=env, cwd=HERE)
        print(f"== {script}: {'ok' if r.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f}s",
              flush=True)
        if r.returncode:
            failed.append(script)
    if not args.smoke and not failed and not args.only:
        plot()
        print(f"plot: {RESULTS / 'scaling.png'}")
    if failed:
        print("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
