"""Question 3: refx against Equinox's partition/combine.

Equinox works on the equivalent tree of arrays: the refx tree with each Ref
replaced by its array (a tied weight is then the same array twice, which is
how Equinox trees express it).  Compared:

  eqx.partition(tree, eqx.is_array) + eqx.combine(a, b)
  refx.tree_partition(refs, "params") + refx.merge_partitions(parts, treedef)

Both split a tree in two and rebuild it.  Goal: refx 3x faster or more.
"""

from __future__ import annotations

import equinox as eqx
import jax

import refx
from common import SIZE_HEADER, SIZES, bench, check, fmt_time, model_tree, print_table, save, size_str, tree_stats


def array_tree(tree):
    return jax.tree_util.tree_map(lambda r: r.value, tree)


def main() -> None:
    rows, data = [], {"question": "equinox", "sizes": []}
    for n in SIZES:
        tree = model_tree(n)
        arrays = array_tree(tree)
        stats = tree_stats(tree)

        def eqx_roundtrip():
            a, b = eqx.partition(arrays, eqx.is_array)
            return eqx.combine(a, b)

        def refx_roundtrip():
            parts, td = refx.tree_partition(tree, "params")
            return refx.merge_partitions(parts, td)

        check(jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: x is y, eqx_roundtrip(), arrays)),
              "equinox round trip")
        back = refx_roundtrip()
        check(jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: x is y, back, tree)),
              "refx round trip keeps the same Refs")
        a, _ = eqx.partition(arrays, eqx.is_array)
        p = refx.get_partition(tree, "params")
        check(len([x for x in jax.tree_util.tree_leaves(a)]) ==
              len([v for v in p.values() if v is not refx.NOTHING]) +
              len([v for v in refx.get_partition(tree, "batch_stats").values() if v is not refx.NOTHING]),
              "both see every leaf once per position")

        t = bench({"equinox partition+combine": eqx_roundtrip,
                   "refx tree_partition+merge_partitions": refx_roundtrip},
                  rounds=11 if n >= 100_000 else None)
        speed = t["equinox partition+combine"] / t["refx tree_partition+merge_partitions"]
        data["sizes"].append({"refs": n, **stats, "seconds": t, "refx_speedup": speed})
        rows.append([f"~{n:,}", size_str(stats), fmt_time(t["equinox partition+combine"]),
                     fmt_time(t["refx tree_partition+merge_partitions"]), f"{speed:.1f}x"])
    table = print_table("3. refx vs Equinox, split a tree in two and rebuild it (goal: refx >= 3x faster)",
                        ["Refs", SIZE_HEADER, "eqx partition+combine", "refx tree_partition+merge", "refx speedup"],
                        rows)
    save("equinox", data, table)


if __name__ == "__main__":
    main()
