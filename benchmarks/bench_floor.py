"""Question 1: how close is refx to the floor?

The floor is jax.tree_util.tree_flatten + tree_unflatten of the tree an
operation takes: JAX's own C++ pytree code, which anything that must
traverse and rebuild a tree pays too.  Goal: deref and reref at most 1.5x
their floor at every size.

Each operation is judged against the floor of its own input tree:

  deref, tree_partition   the Ref tree
  reref                   the deref'ed tree (Value/Index are custom pytree
                          nodes, so this floor is ~2x the Ref tree's); the
                          table also gives reref / Ref-tree floor, since
                          reref builds the Ref tree
  merge_partitions        the partitions (two Partition dicts)
  update_refs             (target partition, source partition)

and, for the last two, also against the Ref tree they rebuild or write
into, in brackets.

Table 1b measures deref and reref against the Ref tree's floor a second
way, the way the issue that set the goal did: garbage collector off,
process CPU time, each round a floor batch then the op's batch, median of
the per-round ratios (common.paired_ratios).  Table 1 is the GC-on, wall
clock view a training loop sees.
"""

from __future__ import annotations

import jax

import refx
from common import (SIZE_HEADER, SIZES, bench, check, flat_tree, floor, fmt_time, model_tree, paired_ratios,
                    print_table, save, size_str, tree_stats)


def ops_for(tree):
    d = refx.deref(tree)
    (params, rest), td = refx.tree_partition(tree, "params")
    target = refx.get_partition(tree, "params")
    (dparams, _), _ = refx.tree_partition(d, "params")
    # equal answers before timing
    back = refx.reref(d)
    check(jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree), "reref structure")
    check(refx.merge_partitions((params, rest), td) == tree, "merge_partitions round trip")
    check(refx.deref(back) == d, "deref(reref(deref(t))) == deref(t)")
    return {
        "floor (Ref tree)": floor(tree),
        "floor (deref'ed tree)": floor(d),
        "floor (partitions)": floor((params, rest)),
        "floor (target, source)": floor((target, dparams)),
        "deref": lambda: refx.deref(tree),
        "reref": lambda: refx.reref(d),
        "tree_partition": lambda: refx.tree_partition(tree, "params"),
        "merge_partitions": lambda: refx.merge_partitions((params, rest), td),
        "update_refs": lambda: refx.update_refs(target, dparams),
    }


def main() -> None:
    rows, rows_b, data = [], [], {"question": "floor", "sizes": []}
    # one tree alive at a time: a bigger heap would slow the small cases' GC
    cases = [(f"model, ~{n:,} Refs", model_tree, n) for n in SIZES]
    cases += [(f"flat list, {n:,} Refs", flat_tree, n) for n in SIZES[1:]]
    for label, make, n in cases:
        tree = make(n)
        stats = tree_stats(tree)
        ops = ops_for(tree)
        big = stats["leaves"] >= 50_000
        t = bench(ops, rounds=9 if big else None)
        paired = paired_ratios(ops["floor (Ref tree)"], {k: ops[k] for k in ("deref", "reref")},
                               rounds=9 if big else None)
        f, fd = t["floor (Ref tree)"], t["floor (deref'ed tree)"]
        ratio = {
            "deref": t["deref"] / f,
            "reref": t["reref"] / fd,
            "reref_vs_ref_floor": t["reref"] / f,
            "tree_partition": t["tree_partition"] / f,
            "merge_partitions": t["merge_partitions"] / t["floor (partitions)"],
            "merge_partitions_vs_ref_floor": t["merge_partitions"] / f,
            "update_refs": t["update_refs"] / t["floor (target, source)"],
            "update_refs_vs_ref_floor": t["update_refs"] / f,
        }
        data["sizes"].append({"tree": label, **stats, "seconds": t, "ratio": ratio,
                              "paired_gc_off_cpu": paired})
        rows_b.append([label, size_str(stats), f"{paired['deref']:.2f}x", f"{paired['reref']:.2f}x"])
        rows.append([
            label, size_str(stats),
            fmt_time(f), f"{ratio['deref']:.2f}x", f"{ratio['reref']:.2f}x ({ratio['reref_vs_ref_floor']:.2f}x)",
            f"{ratio['tree_partition']:.2f}x",
            f"{ratio['merge_partitions']:.2f}x ({ratio['merge_partitions_vs_ref_floor']:.2f}x)",
            f"{ratio['update_refs']:.2f}x ({ratio['update_refs_vs_ref_floor']:.2f}x)",
        ])
    table = print_table(
        "1. refx / floor (tree_flatten + tree_unflatten of the op's input tree; goal: deref, reref <= 1.5x)",
        ["tree", SIZE_HEADER, "floor (Ref tree)", "deref", "reref (vs Ref-tree floor)",
         "tree_partition", "merge_partitions (vs Ref-tree)", "update_refs (vs Ref-tree)"],
        rows,
    )
    table += print_table(
        "1b. deref and reref / floor of the Ref tree, GC off, CPU time, median of per-round ratios (goal <= 1.5x)",
        ["tree", SIZE_HEADER, "deref", "reref"],
        rows_b,
    )
    save("floor", data, table)


if __name__ == "__main__":
    main()
