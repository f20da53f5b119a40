"""Question 4: what does the C core buy over the same algorithms in Python?

The competitor is tests/oracle.py's PURE: refx's algorithms written in plain
Python over pure-Python Ref/Value/Index/NOTHING classes (registered with
JAX), i.e. refx as it would be without a C core.  Same trees, same work.
Goal: C 10x faster or more.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import refx
from common import HERE, SIZES, SMOKE, bench, check, floor, fmt_time, model_tree, print_table, save, tree_stats

sys.path.insert(0, str(HERE.parent / "tests"))
from oracle import PURE  # noqa: E402


def pure_model(tree):
    """The same tree with PURE.Ref in place of refx.Ref (sharing kept)."""
    made = {}

    def conv(x):
        if isinstance(x, refx.Ref):
            if id(x) not in made:
                made[id(x)] = PURE.Ref(x.value, x.collection)
            return made[id(x)]
        return x

    return jax.tree_util.tree_map(conv, tree)


def leaves_of_values(tree, is_value):
    return [np.asarray(v.value).tolist() if is_value(v) else v
            for v in jax.tree_util.tree_leaves(tree, is_leaf=is_value)]


def ops(impl, tree, floors=False):
    d = impl.deref(tree)
    (params, rest), td = impl.tree_partition(tree, "params")
    (dparams, _), _ = impl.tree_partition(d, "params")
    target = impl.get_partition(tree, "params")
    if floors:  # the floor of each op's input tree (see bench_floor.py)
        return {
            "deref": floor(tree),
            "reref": floor(d),
            "tree_partition": floor(tree),
            "merge_partitions": floor((params, rest)),
            "update_refs": floor((target, dparams)),
        }
    return d, {
        "deref": lambda: impl.deref(tree),
        "reref": lambda: impl.reref(d),
        "tree_partition": lambda: impl.tree_partition(tree, "params"),
        "merge_partitions": lambda: impl.merge_partitions((params, rest), td),
        "update_refs": lambda: impl.update_refs(target, dparams),
    }


def main() -> None:
    rows, data = [], {"question": "pure_python", "sizes": []}
    for n in SIZES:
        ctree = model_tree(n)
        ptree = pure_model(ctree)
        stats = tree_stats(ctree)
        cd, cops = ops(refx, ctree)
        pd, pops = ops(PURE, ptree)
        # same answer: the deref'ed trees carry the same values in the same places
        check(leaves_of_values(cd, lambda v: isinstance(v, refx.Value))
              == leaves_of_values(pd, lambda v: isinstance(v, PURE.Value)), "deref values")
        check([type(x).__name__[-5:] for x in jax.tree_util.tree_leaves(cd, is_leaf=lambda v: isinstance(v, refx.Deref))]
              == [type(x).__name__[-5:] for x in jax.tree_util.tree_leaves(pd, is_leaf=lambda v: isinstance(v, (PURE.Value, PURE.Index)))],
              "deref Value/Index pattern")
        fops = ops(refx, ctree, floors=True)
        t = bench({**{f"C {k}": v for k, v in cops.items()}, **{f"Python {k}": v for k, v in pops.items()},
                   **{f"floor {k}": v for k, v in fops.items() if k != "tree_partition"}},
                  budget=None if SMOKE else 0.1, rounds=5 if n >= 100_000 else None)
        t["floor tree_partition"] = t["floor deref"]  # same input tree
        speedup = {k: t[f"Python {k}"] / t[f"C {k}"] for k in cops}
        bound = {k: t[f"Python {k}"] / t[f"floor {k}"] for k in cops}
        data["sizes"].append({"refs": n, **stats, "seconds": t, "speedup": speedup,
                              "python_over_floor": bound})
        for k in cops:
            rows.append([f"~{n:,}", k, fmt_time(t[f"C {k}"]), fmt_time(t[f"Python {k}"]), f"{speedup[k]:.1f}x",
                         fmt_time(t[f"floor {k}"]), f"{bound[k]:.1f}x"])
    table = print_table("4. C core vs the same algorithms in pure Python (goal: C >= 10x faster)",
                        ["Refs", "operation", "refx (C)", "pure Python", "C speedup",
                         "floor of input", "pure Python / floor (best C could do)"], rows)
    save("pure_python", data, table)


if __name__ == "__main__":
    jnp.zeros(1)
    main()
