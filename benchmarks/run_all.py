"""Run every benchmark (`make bench`), or all of them quickly (`--smoke`).

Each question is its own script, run here in its own process so that one
competitor's import state (flax, equinox) cannot skew another's.  The full
run writes benchmarks/results/*.json and *.md, a log-log plot of time vs
tree size (results/scaling.png), results/all.json, and benchmarks/README.md
(machine, every table, the plot; NOTES.md is appended to it if present).
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
SCRIPTS = ["bench_floor.py", "bench_nnx.py", "bench_equinox.py", "bench_pure_python.py", "bench_step.py",
           "bench_lines.py", "bench_eager.py"]


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
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
    ax.set(title="refx vs Equinox", xlabel="distinct Refs", ylabel="µs per call", xscale="log", yscale="log")
    ax.legend(fontsize=8)
    pure = json.loads((RESULTS / "pure_python.json").read_text())
    ax = axes[3]
    for op in ("deref", "reref", "tree_partition", "merge_partitions", "update_refs"):
        xs = [s["refs"] for s in pure["sizes"]]
        line, = ax.plot(xs, [s["seconds"][f"C {op}"] * 1e6 for s in pure["sizes"]], "o-", label=f"C {op}")
        ax.plot(xs, [s["seconds"][f"Python {op}"] * 1e6 for s in pure["sizes"]], "s--", color=line.get_color(),
                label=f"pure Python {op}")
    ax.set(title="C core vs pure Python", xlabel="distinct Refs", ylabel="µs per call", xscale="log", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=110)
    plt.close(fig)


QUESTIONS = ["floor", "nnx", "equinox", "pure_python", "step", "step_nn", "lines", "eager"]


def _x(values, fmt="{:.2f}x") -> str:
    return ", ".join(fmt.format(v) for v in values)


def goals(r: dict) -> str:
    """The table of each goal against the latest results, met or missed."""
    rows = []

    def row(goal, values, ok, detail):
        rows.append(f"| {goal} | {detail} | {'met' if all(ok(v) for v in values) else 'missed'} |")

    floor = r["floor"]["sizes"]
    names = " / ".join(s["tree"].replace(" Refs", "") for s in floor)
    row("deref <= 1.5x floor", [s["ratio"]["deref"] for s in floor], lambda v: v <= 1.5,
        f"{_x(s['ratio']['deref'] for s in floor)} ({names})")
    row("reref <= 1.5x floor of its input (the deref'ed tree)", [s["ratio"]["reref"] for s in floor],
        lambda v: v <= 1.5, _x(s["ratio"]["reref"] for s in floor))
    row("reref <= 1.5x floor of the Ref tree it builds", [s["ratio"]["reref_vs_ref_floor"] for s in floor],
        lambda v: v <= 1.5, _x(s["ratio"]["reref_vs_ref_floor"] for s in floor))
    for op in ("deref", "reref"):
        row(f"{op} <= 1.5x floor of the Ref tree (GC off, CPU time, median of per-round ratios)",
            [s["paired_gc_off_cpu"][op] for s in floor], lambda v: v <= 1.5,
            _x(s["paired_gc_off_cpu"][op] for s in floor))
    nnx = r["nnx"]["sizes"]
    for op in nnx[0]["refx_speedup"]:
        row(f"refx >= 20x faster than NNX: {op}", [s["refx_speedup"][op] for s in nnx], lambda v: v >= 20,
            _x((s["refx_speedup"][op] for s in nnx), "{:.1f}x") + " (" + " / ".join(f"~{s['refs']:,}" for s in nnx)
            + " Refs)")
    eqx = r["equinox"]["sizes"]
    row("refx >= 3x faster than Equinox", [s["refx_speedup"] for s in eqx], lambda v: v >= 3,
        _x((s["refx_speedup"] for s in eqx), "{:.1f}x"))
    pure = r["pure_python"]["sizes"]
    for op in pure[0]["speedup"]:
        row(f"C >= 10x faster than pure Python: {op}", [s["speedup"][op] for s in pure], lambda v: v >= 10,
            _x((s["speedup"][op] for s in pure), "{:.1f}x")
            + f" (pure Python / floor: {_x((s['python_over_floor'][op] for s in pure), '{:.1f}x')})")
    steps = r["step"]["depths"]

    def ratios(num, den, kinds, clock):
        vals, cells = [], []
        for d in steps:
            for kind in kinds:
                t = d[clock][kind]
                vals.append(t[num] / t[den])
                cells.append(f"{vals[-1]:.2f}x ({kind.split()[0]}, depth {d['depth']})")
        return vals, ", ".join(cells)

    for num, den, kinds, goal, ok in (
        ("refx.jit", "bare jax.jit", ("SGD step", "eval step"), "refx.jit / bare jax.jit <= 1.05x",
         lambda v: v <= 1.05),
        ("refx.jit_partial", "bare jax.jit", ("SGD step", "eval step"),
         "refx.jit_partial / bare jax.jit <= 1.00x", lambda v: v <= 1.00),
        ("refx.jit_partial", "nnx.jit_partial graph=False", ("SGD step", "eval step", "no-op step"),
         "refx.jit_partial / nnx.jit_partial(graph=False) <= 1.0x, every row", lambda v: v <= 1.0),
        ("nnx.jit", "refx.jit", ("SGD step", "eval step", "no-op step"),
         "nnx.jit (default) / refx.jit >= 3x, every row", lambda v: v >= 3),
    ):
        for clock, what in (("seconds", "wall time"), ("cpu_seconds", "CPU time")):
            vals, detail = ratios(num, den, kinds, clock)
            row(f"{goal} ({what})", vals, ok, detail)
    models = r["step_nn"]["models"]
    for num, den, goal, ok in (
        ("refx.jit", "bare jax.jit", "refx.nn model: refx.jit / bare jax.jit <= 1.05x", lambda v: v <= 1.05),
        ("refx.jit", "nnx.jit_partial graph=False",
         "refx.nn model: refx.jit / nnx.jit_partial(graph=False) <= 1.0x", lambda v: v <= 1.0),
        ("refx.jit", "nnx.jit", "refx.nn model: refx.jit / nnx.jit <= 1.0x", lambda v: v <= 1.0),
    ):
        for clock, what in (("seconds", "wall time"), ("cpu_seconds", "CPU time")):
            vals = [m[clock][num] / m[clock][den] for m in models]
            row(f"{goal} ({what})", vals, ok,
                ", ".join(f"{v:.2f}x ({m['model']})" for v, m in zip(vals, models, strict=True)))
    if all("paired_vs_nnx_jit_partial" in m for m in models):
        for clock, what in (("wall", "wall time"), ("cpu", "CPU time")):
            vals = [m["paired_vs_nnx_jit_partial"]["refx.jit"][clock] for m in models]
            row(f"refx.nn model: refx.jit / nnx.jit_partial(graph=False) <= 1.0x ({what}, median of "
                "per-round paired ratios)", vals, lambda v: v <= 1.0,
                ", ".join(f"{v:.3f}x ({m['model']})" for v, m in zip(vals, models, strict=True)))
    eager = r["eager"]
    pairs = (("refx.scan", "jax.lax.scan"), ("refx.cond", "jax.lax.cond"),
             ("refx.fori_loop", "jax.lax.fori_loop"))
    for clock, what in (("seconds", "wall time"), ("cpu_seconds", "CPU time")):
        if clock in eager:
            vals = [eager[clock][a] / eager[clock][b] for a, b in pairs]
            row(f"eager refx transform, second and later calls / reused JAX function <= 1.5x "
                f"({what})", vals, lambda v: v <= 1.5,
                ", ".join(f"{v:.2f}x ({a.split('.')[1]})" for v, (a, _) in zip(vals, pairs, strict=True)))
    lines = r["lines"]["rows"]
    row("lines: refx.nn <= Flax NNX, model and step, every program", [x["met"] for x in lines], bool,
        ", ".join(f"{x['program']} {x['refx.nn']['model']}/{x['refx.nn']['step'] or '-'} vs "
                  f"{x['Flax NNX']['model']}/{x['Flax NNX']['step'] or '-'}" for x in lines))
    return "| goal | latest run | verdict |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def write_readme() -> None:
    """benchmarks/README.md: the machine, every table and the plot of the
    latest full run, plus all results in one JSON file."""
    results = {q: json.loads((RESULTS / f"{q}.json").read_text()) for q in QUESTIONS}
    m = results["floor"]["machine"]
    (RESULTS / "all.json").write_text(json.dumps(results, indent=1))
    tables = "\n".join((RESULTS / f"{q}.md").read_text() for q in QUESTIONS)
    notes = (HERE / "NOTES.md").read_text() if (HERE / "NOTES.md").exists() else ""
    text = f"""# refx benchmarks

`make bench` runs every question below ({", ".join(f"`{s}`" for s in SCRIPTS)}), each in
its own process, and writes `results/*.json`, `results/*.md` and `results/scaling.png`; this file
is regenerated from them by `benchmarks/run_all.py`.  `make bench-smoke` runs all of them at tiny
sizes with few repeats (a few seconds each), still checking that competitors agree, and keeps no results.

Method: every competitor is checked to give the same answer before it is timed; tree sizes are
stated as leaves / pytree nodes / distinct Refs / fraction of Ref leaves that repeat a shared Ref;
competitors of a question run in one process, in interleaved rounds (A B C, B C A, C A B, ...), each
competitor's turn a batch of calls after a `gc.collect()`; tables give the median seconds per call
over rounds and the ratios of medians, with the garbage collector on (as in a training loop).  The machine is small
and shared, so single numbers are noisy; ratios within one run are what to read.  Trees are model-like (layers of `{{w, b, bs}}` Refs, every fourth layer and
the output head tied to the first layer's weight) at ~30, ~3,000 and ~100,000 Refs, plus a flat list
of distinct Refs.

## Machine (latest full run)

| | |
|---|---|
| CPU | {m["cpu"]} |
| cores (`nproc`) | {m["cores"]} |
| platform | {m["platform"]} |
| Python | {m["python"]} |
| JAX | {m["jax"]} |
| Flax | {m.get("flax", "-")} |
| Equinox | {m.get("equinox", "-")} |
| optax | {m.get("optax", "-")} |
| refx | {m["refx"]} |

![log-log time vs tree size per competitor](results/scaling.png)

## Against the goals (the latest run of each question)

{goals(results)}
## Tables (the latest run of each question: tables 5 and 5b may come from a later run of bench_step.py alone, see NOTES)
{tables}
{notes}"""
    (HERE / "README.md").write_text(text)


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
        write_readme()
        print(f"plot: {RESULTS / 'scaling.png'}; tables: {HERE / 'README.md'}")
    if failed:
        print("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
