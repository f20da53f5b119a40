"""Question 5: what does refx add to a training step over bare jax.jit?

The model Flax uses for its graph-overhead benchmark: an MLP of
Linear + BatchNorm blocks (width 32, depth 5 and 100), a step counter and an
SGD-with-momentum optimiser state.  Four ways to run the same step:

  bare jax.jit   params / batch stats / counter / optimiser state as plain
                 arrays, already split, passed in and returned
  refx           deref(model) -> jax.jit(step) -> update_refs(model, out)
  nnx.jit        the NNX model and nnx.Optimizer
  eqx.filter_jit the Equinox model (params) + its state, passed and returned

each as a no-op step and a real SGD step, blocking on the result every step.
All four start from the same arrays (NNX's initialisation) and must agree
after a few steps before anything is timed.  Goal: refx adds at most 10% to
bare jax.jit.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import refx
from common import SIZE_HEADER, SMOKE, bench, check, fmt_time, print_table, save, size_str, tree_stats

WIDTH, BATCH, MOMENTUM, EPS, LR = 32, 64, 0.99, 1e-5, 1e-3
DEPTHS = [5] if SMOKE else [5, 100]


def val(v):
    """A Variable's value (get_value() on newer Flax, .value on older)."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def tx():
    return optax.sgd(LR, momentum=0.9)


# ------------------------------------------------------------------ NNX


class Count(nnx.Variable):
    pass


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.bn = nnx.BatchNorm(WIDTH, momentum=MOMENTUM, epsilon=EPS, use_fast_variance=False, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.linear(x)))


class NMLP(nnx.Module):
    def __init__(self, depth, rngs):
        blocks = [NBlock(rngs) for _ in range(depth)]
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.count = Count(jnp.array(0))

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def nnx_variant(depth):
    model = NMLP(depth, nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        if hasattr(model.count, "set_value"):
            model.count.set_value(val(model.count) + 1)
        else:
            model.count.value += 1
        return loss

    @nnx.jit
    def noop(model, opt):
        return None

    def first_kernel():
        return val(model.blocks[0].linear.kernel)

    return model, (lambda x, y: step(model, opt, x, y)), (lambda: noop(model, opt)), first_kernel


def init_arrays(model):
    """The NNX model's initial arrays, as plain dicts (shared by all)."""
    params = [{"w": val(b.linear.kernel), "b": val(b.linear.bias),
               "scale": val(b.bn.scale), "bias": val(b.bn.bias)} for b in model.blocks]
    stats = [{"mean": val(b.bn.mean), "var": val(b.bn.var)} for b in model.blocks]
    return params, stats


def forward(params, stats, x):
    """Shared math: Linear -> BatchNorm (train mode) -> relu, per block."""
    new_stats = []
    for p, s in zip(params, stats, strict=True):
        h = x @ p["w"] + p["b"]
        mean, var = h.mean(0), h.var(0)
        h = (h - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]
        x = jax.nn.relu(h)
        new_stats.append({"mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * jax.lax.stop_gradient(mean),
                          "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * jax.lax.stop_gradient(var)})
    return x, new_stats


# ------------------------------------------------------------- bare jit


def bare_variant(params, stats):
    st = {"params": params, "stats": stats, "count": jnp.array(0), "opt": tx().init(params)}

    @jax.jit
    def step(params, stats, count, opt_state, x, y):
        def loss_fn(params):
            out, new_stats = forward(params, stats, x)
            return jnp.mean((out - y) ** 2), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx().update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, count + 1, opt_state, loss

    @jax.jit
    def noop(params, stats, count, opt_state):
        return params, stats, count, opt_state

    def run(x, y):
        st["params"], st["stats"], st["count"], st["opt"], loss = step(
            st["params"], st["stats"], st["count"], st["opt"], x, y)
        return loss

    def run_noop():
        st["params"], st["stats"], st["count"], st["opt"] = noop(
            st["params"], st["stats"], st["count"], st["opt"])
        return st["count"]

    return run, run_noop, lambda: st["params"][0]["w"]


# ----------------------------------------------------------------- refx


def refx_variant(params, stats):
    model = {
        "blocks": [{k: refx.Ref(v, "params") for k, v in p.items()}
                   | {k: refx.Ref(v, "batch_stats") for k, v in s.items()}
                   for p, s in zip(params, stats, strict=True)],
        "count": refx.Ref(jnp.array(0), "count"),
    }
    st = {"opt": tx().init(refx.get_partition(refx.deref(model), "params"))}

    @jax.jit
    def step(graph, opt_state, x, y):
        (params, rest), treedef = refx.tree_partition(graph, "params")

        def loss_fn(params):
            m = refx.reref(refx.merge_partitions((params, rest), treedef))
            p = [{k: b[k].value for k in ("w", "b", "scale", "bias")} for b in m["blocks"]]
            s = [{k: b[k].value for k in ("mean", "var")} for b in m["blocks"]]
            out, new_stats = forward(p, s, x)
            for b, ns in zip(m["blocks"], new_stats, strict=True):
                b["mean"].value, b["var"].value = ns["mean"], ns["var"]
            m["count"].value = m["count"].value + 1
            return jnp.mean((out - y) ** 2), refx.deref(m)

        (loss, graph), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx().update(grads, opt_state, params)
        m = refx.reref(graph)
        refx.update_refs(refx.get_partition(m, "params"), optax.apply_updates(params, updates))
        return refx.deref(m), opt_state, loss

    @jax.jit
    def noop(graph, opt_state):
        return graph, opt_state

    def run(x, y):
        graph, st["opt"], loss = step(refx.deref(model), st["opt"], x, y)
        refx.update_refs(model, graph)
        return loss

    def run_noop():
        graph, st["opt"] = noop(refx.deref(model), st["opt"])
        refx.update_refs(model, graph)
        return graph

    run.model = model  # for the table's size column
    return run, run_noop, lambda: model["blocks"][0]["w"].value


# ------------------------------------------------------------- Equinox


class EBlock(eqx.Module):
    w: jax.Array
    b: jax.Array
    scale: jax.Array
    bias: jax.Array


class EMLP(eqx.Module):
    blocks: list


def eqx_variant(params, stats):
    model = EMLP([EBlock(**p) for p in params])
    st = {"model": model, "state": {"stats": stats, "count": jnp.array(0)}}
    st["opt"] = tx().init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, opt_state, x, y):
        def loss_fn(model):
            p = [{"w": b.w, "b": b.b, "scale": b.scale, "bias": b.bias} for b in model.blocks]
            out, new_stats = forward(p, state["stats"], x)
            return jnp.mean((out - y) ** 2), new_stats

        (loss, new_stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = tx().update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, {"stats": new_stats, "count": state["count"] + 1}, opt_state, loss

    @eqx.filter_jit
    def noop(model, state, opt_state):
        return model, state, opt_state

    def run(x, y):
        st["model"], st["state"], st["opt"], loss = step(st["model"], st["state"], st["opt"], x, y)
        return loss

    def run_noop():
        st["model"], st["state"], st["opt"] = noop(st["model"], st["state"], st["opt"])
        return st["state"]["count"]

    return run, run_noop, lambda: st["model"].blocks[0].w


# ------------------------------------------------------------------ main


def main() -> None:
    rows, data = [], {"question": "step", "depths": []}
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (BATCH, WIDTH))
    y = jax.random.normal(ky, (BATCH, WIDTH))
    for depth in DEPTHS:
        nmodel, n_step, n_noop, n_w = nnx_variant(depth)
        params, stats = init_arrays(nmodel)
        variants = {
            "bare jax.jit": bare_variant(params, stats),
            "refx": refx_variant(params, stats),
            "nnx.jit": (n_step, n_noop, n_w),
            "eqx.filter_jit": eqx_variant(params, stats),
        }
        sizes = tree_stats(variants["refx"][0].model)
        # the same answer: three real steps from the same arrays
        for run, _, _ in variants.values():
            for _ in range(3):
                jax.block_until_ready(run(x, y))
        # bare jit, refx and Equinox run the same XLA program: equal to the
        # bit; NNX's layers round differently, which 100 BatchNorm layers
        # amplify (seen: up to 7e-5 relative), hence a tolerance relative to scale
        w0 = variants["bare jax.jit"][2]()
        scale = float(jnp.max(jnp.abs(w0)))
        for name, (_, _, w) in variants.items():
            err = float(jnp.max(jnp.abs(w() - w0)))
            check(err <= 1e-3 * max(scale, 1.0), f"{name} agrees with bare jit after 3 steps ({err:.2e})")
        timings = {}
        for kind, idx in (("no-op step", 1), ("SGD step", 0)):
            if idx == 1:
                fns = {name: (lambda f=v[1]: jax.block_until_ready(f())) for name, v in variants.items()}
            else:
                fns = {name: (lambda f=v[0]: jax.block_until_ready(f(x, y))) for name, v in variants.items()}
            t = bench(fns, rounds=5 if SMOKE else 21, budget=0.01 if SMOKE else 0.2)
            timings[kind] = t
            base = t["bare jax.jit"]
            for name in variants:
                over = t[name] / base - 1
                rows.append([str(depth), size_str(sizes), kind, name, fmt_time(t[name]),
                             "-" if name == "bare jax.jit" else f"{over:+.0%}"])
        data["depths"].append({"depth": depth, "width": WIDTH, **sizes, "seconds": timings})
    table = print_table(
        "5. time per training step (MLP of Linear+BatchNorm, width 32; goal: refx <= +10% over bare jit)",
        ["depth", f"refx model: {SIZE_HEADER}", "step", "variant", "per step", "over bare jit"], rows)
    save("step", data, table)


if __name__ == "__main__":
    main()
