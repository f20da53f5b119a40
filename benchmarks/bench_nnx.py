"""Question 2: refx against Flax NNX on the same model.

The NNX model has the same parameters and the same sharing as the refx
tree: layers of {w: Param, b: Param, bs: BatchStat}, every fourth layer and
the head holding the first layer's weight Variable.  Both hold the very
same arrays.  Compared:

  nnx.split + nnx.merge            vs  refx.deref + refx.reref
  nnx.state(model, nnx.Param)      vs  refx.get_partition(model, "params")
  nnx.update(model, state)         vs  refx.update_refs(partition, values)

Goal: refx 20x faster or more.
"""

from __future__ import annotations

import jax
from flax import nnx

import refx
from common import SIZE_HEADER, SIZES, bench, check, fmt_time, model_tree, print_table, save, size_str, tree_stats


class Layer(nnx.Module):
    def __init__(self, w, b, bs):
        self.w, self.b, self.bs = w, b, bs


class Model(nnx.Module):
    def __init__(self, layers, head):
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else layers
        self.head = head


def nnx_twin(tree):
    """An NNX model with the same arrays and the same sharing as `tree`."""
    made = {}

    def var(ref):
        if id(ref) not in made:
            cls = nnx.Param if ref.collection == "params" else nnx.BatchStat
            made[id(ref)] = cls(ref.value)
        return made[id(ref)]

    layers = [Layer(var(L["w"]), var(L["b"]), var(L["bs"])) for L in tree["layers"]]
    return Model(layers, var(tree["head"]))


def arrays(x):
    return sorted(id(a) for a in jax.tree_util.tree_leaves(x))


def main() -> None:
    rows, data = [], {"question": "nnx", "sizes": []}
    for n in SIZES:
        tree = model_tree(n)
        model = nnx_twin(tree)
        stats = tree_stats(tree)

        graphdef, state = nnx.split(model)
        d = refx.deref(tree)
        nparams = nnx.state(model, nnx.Param)
        rparams = refx.get_partition(tree, "params")
        (dparams, _), _ = refx.tree_partition(d, "params")
        # same answer: the same arrays, shared Variables/Refs counted once
        check(arrays(state) == arrays(d), "split state vs deref'ed tree hold the same arrays")
        check(arrays(nparams) == arrays(refx.get_partition(d, "params")), "param states hold the same arrays")
        m2 = nnx.merge(graphdef, state)
        check(m2.head is m2.layers[0].w and m2.layers[4].w is m2.head if len(m2.layers) > 4 else True,
              "nnx keeps sharing")
        r2 = refx.reref(d)
        check(r2["head"] is r2["layers"][0]["w"], "refx keeps sharing")

        t = bench({
            "nnx split+merge": lambda: nnx.merge(*nnx.split(model)),
            "refx deref+reref": lambda: refx.reref(refx.deref(tree)),
            "nnx.state(Param)": lambda: nnx.state(model, nnx.Param),
            "refx get_partition": lambda: refx.get_partition(tree, "params"),
            "nnx.update": lambda: nnx.update(model, nparams),
            "refx update_refs": lambda: refx.update_refs(rparams, dparams),
        }, rounds=3 if n >= 100_000 else None)  # NNX takes ~5 s a call at 100k
        pairs = [("split+merge", "nnx split+merge", "refx deref+reref"),
                 ("state(Param) / get_partition", "nnx.state(Param)", "refx get_partition"),
                 ("update / update_refs", "nnx.update", "refx update_refs")]
        speed = {}
        for label, a, b in pairs:
            speed[label] = t[a] / t[b]
            rows.append([f"~{n:,}", size_str(stats), label, fmt_time(t[a]), fmt_time(t[b]), f"{speed[label]:.1f}x"])
        data["sizes"].append({"refs": n, **stats, "seconds": t, "refx_speedup": speed})
    table = print_table("2. refx vs Flax NNX, same model and sharing (goal: refx >= 20x faster)",
                        ["Refs", SIZE_HEADER, "operation", "Flax NNX", "refx", "refx speedup"], rows)
    save("nnx", data, table)


if __name__ == "__main__":
    main()
