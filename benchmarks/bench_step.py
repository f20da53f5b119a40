"""Question 5: what does a training step cost with refx.jit, against bare jax.jit,
Flax NNX and Equinox?

The model Flax uses for its graph-overhead benchmark: an MLP of
Linear + BatchNorm blocks (width 32, depth 5 and 100), a step counter and an
SGD-with-momentum optimiser state.  Three steps:

  SGD    loss + gradient, batch statistics and counter written, optimiser
         update: every parameter and optimiser slot written
  eval   forward pass in eval mode (running statistics), returns the
         logits, writes nothing
  no-op  Flax's overhead benchmark: does nothing (bare jax.jit, which has no
         other way to keep state, returns the state it was given)

Competitors, in one process:

  bare jax.jit            params / batch stats / counter / optimiser state as
                          dicts of arrays, passed in and returned
  refx.jit                a dict of Refs (and the optimiser state in Refs),
                          refx.value_and_grad inside
  refx.jit_partial        the same step with the model and optimiser bound
  nnx.jit                 NNX model + nnx.Optimizer, default (graph) mode
  nnx.jit graph=False     the same, tree mode
  nnx.jit_partial g=False NNX's fastest path: model and optimiser bound
  eqx.filter_jit          Equinox model (params) + state passed and returned

Every competitor starts from the same arrays (NNX's initialisation); after
three SGD steps all must agree with bare jax.jit (weights, batch statistics
and eval logits) before anything is timed.  Goals (issue 11): refx.jit <=
1.05x bare jax.jit and refx.jit_partial <= 1.00x on SGD and eval;
refx.jit_partial <= nnx.jit_partial(graph=False) on every row; nnx.jit
(default) >= 3x refx.jit on every row.

Table 5b (issue 20): models built from layers, one class body written
against refx.nn and against flax.nnx (the same signatures): an MLP
(Linear 64-128-128-10, two BatchNorms, Dropout) and a CNN (two 3x3 Convs,
two BatchNorms, a Linear head), one SGD step (softmax cross-entropy).
Competitors: bare jax.jit on the same math written functionally (dicts of
arrays, the dropout key folded with a counter as the Rngs stream does),
refx.jit and refx.jit_partial on the refx.nn model with nn.Optimizer,
nnx.jit and nnx.jit_partial(graph=False) on the NNX model with
nnx.Optimizer.  All start from NNX's arrays (parameters, batch statistics,
the dropout stream's key and counter) and after one step must agree with
bare jax.jit (loss, every parameter and statistic, to 1e-4) before timing.
Goals: refx.jit <= 1.05x bare jax.jit, and ahead of nnx.jit and
nnx.jit_partial(graph=False).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import refx
import refx.nn as rnn

from common import (SIZE_HEADER, SMOKE, bench_wall_cpu, check, fmt_time, paired_median, print_table, save,
                    size_str, tree_stats)

WIDTH, BATCH, MOMENTUM, EPS, LR = 32, 64, 0.99, 1e-5, 1e-3
DEPTHS = [5] if SMOKE else [5, 100]
PKEYS, SKEYS = ("w", "b", "scale", "bias"), ("mean", "var")
BARE = "bare jax.jit"
NNX_FAST = "nnx.jit_partial graph=False"  # NNX's fastest path
COMPETITORS = [BARE, "refx.jit", "refx.jit_partial", "nnx.jit", "nnx.jit graph=False",
               "nnx.jit_partial graph=False", "eqx.filter_jit"]
STEPS = ["SGD step", "eval step", "no-op step"]


def val(v):
    """A Variable's value (get_value() on newer Flax, .value on older)."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def tx():
    return optax.sgd(LR, momentum=0.9)


# ------------------------------------------------------------ shared math


def forward(params, stats, x, train=True):
    """Linear -> BatchNorm -> relu per block; new running stats if train."""
    new_stats = []
    for p, s in zip(params, stats, strict=True):
        h = x @ p["w"] + p["b"]
        if train:
            mean, var = h.mean(0), h.var(0)
            new_stats.append({
                "mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * jax.lax.stop_gradient(mean),
                "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * jax.lax.stop_gradient(var)})
        else:
            mean, var = s["mean"], s["var"]
        h = (h - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]
        x = jax.nn.relu(h)
    return x, new_stats


# ------------------------------------------------------------------ NNX


class Count(nnx.Variable):
    pass


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.bn = nnx.BatchNorm(WIDTH, momentum=MOMENTUM, epsilon=EPS, use_fast_variance=False, rngs=rngs)

    def __call__(self, x, train=True):
        return jax.nn.relu(self.bn(self.linear(x), use_running_average=not train))


class NMLP(nnx.Module):
    def __init__(self, depth, rngs):
        blocks = [NBlock(rngs) for _ in range(depth)]
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.count = Count(jnp.array(0))

    def __call__(self, x, train=True):
        for b in self.blocks:
            x = b(x, train)
        return x


def nnx_sgd(model, opt, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    if hasattr(model.count, "set_value"):
        model.count.set_value(val(model.count) + 1)
    else:
        model.count.value += 1
    return loss


def nnx_eval(model, x):
    return model(x, train=False)


def nnx_noop(model, opt):
    return None


def nnx_variant(depth, how):
    """how: 'default', 'tree' (graph=False) or 'partial' (jit_partial, graph=False)."""
    model = NMLP(depth, nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx(), wrt=nnx.Param)
    if how == "partial":
        sgd = nnx.jit_partial(nnx_sgd, model, opt, graph=False)
        ev = nnx.jit_partial(nnx_eval, model, graph=False)
        noop = nnx.jit_partial(nnx_noop, model, opt, graph=False)
        fns = (lambda x, y: sgd(x, y), lambda x: ev(x), lambda: noop())
    else:
        kw = {} if how == "default" else {"graph": False}
        sgd, ev, noop = (nnx.jit(f, **kw) for f in (nnx_sgd, nnx_eval, nnx_noop))
        fns = (lambda x, y: sgd(model, opt, x, y), lambda x: ev(model, x), lambda: noop(model, opt))

    def state():
        b0 = model.blocks[0]
        return val(b0.linear.kernel), val(b0.bn.mean), val(model.count)

    return (*fns, state), model


def init_arrays(model):
    """The NNX model's initial arrays, as plain dicts (shared by all)."""
    params = [{"w": val(b.linear.kernel), "b": val(b.linear.bias),
               "scale": val(b.bn.scale), "bias": val(b.bn.bias)} for b in model.blocks]
    stats = [{"mean": val(b.bn.mean), "var": val(b.bn.var)} for b in model.blocks]
    return params, stats


# ------------------------------------------------------------- bare jit


def bare_variant(params, stats):
    st = {"params": params, "stats": stats, "count": jnp.array(0), "opt": tx().init(params)}

    @jax.jit
    def sgd(params, stats, count, opt_state, x, y):
        def loss_fn(params):
            out, new_stats = forward(params, stats, x)
            return jnp.mean((out - y) ** 2), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx().update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, count + 1, opt_state, loss

    @jax.jit
    def ev(params, stats, x):
        return forward(params, stats, x, train=False)[0]

    @jax.jit
    def noop(params, stats, count, opt_state):
        return params, stats, count, opt_state

    def run_sgd(x, y):
        st["params"], st["stats"], st["count"], st["opt"], loss = sgd(
            st["params"], st["stats"], st["count"], st["opt"], x, y)
        return loss

    def run_noop():
        st["params"], st["stats"], st["count"], st["opt"] = noop(
            st["params"], st["stats"], st["count"], st["opt"])
        return st["count"]

    def state():
        return st["params"][0]["w"], st["stats"][0]["mean"], st["count"]

    return run_sgd, (lambda x: ev(st["params"], st["stats"], x)), run_noop, state


# ----------------------------------------------------------------- refx


def refx_model(params, stats, one_ref=False):
    model = {
        "blocks": [{k: refx.Ref(v, "params") for k, v in p.items()}
                   | {k: refx.Ref(v, "batch_stats") for k, v in s.items()}
                   for p, s in zip(params, stats, strict=True)],
        "count": refx.Ref(jnp.array(0), "count"),
    }
    # the optimiser state, one Ref per leaf (its structure is static)
    state = tx().init(refx.get_partition(refx.deref(model), "params"))
    if one_ref:  # as users write it: the whole optax state in one Ref
        return model, refx.Ref(state, "opt_state"), None
    leaves, treedef = jax.tree_util.tree_flatten(state)
    opt = [refx.Ref(leaf, "opt_state") for leaf in leaves]
    return model, opt, treedef


def refx_steps(opt_treedef):
    """The steps; opt_treedef None: the optimiser state is one Ref."""
    def sgd(model, opt, x, y):
        def loss_fn(m):
            p = [{k: b[k].value for k in PKEYS} for b in m["blocks"]]
            s = [{k: b[k].value for k in SKEYS} for b in m["blocks"]]
            out, new_stats = forward(p, s, x)
            for b, ns in zip(m["blocks"], new_stats, strict=True):
                b["mean"].value, b["var"].value = ns["mean"], ns["var"]
            return jnp.mean((out - y) ** 2)

        loss, grads = refx.value_and_grad(loss_fn)(model)
        params = refx.get_partition(refx.deref(model), "params")
        state = opt.value if opt_treedef is None else opt_treedef.unflatten([r.value for r in opt])
        updates, state = tx().update(grads, state, params)
        refx.update_refs(refx.get_partition(model, "params"), optax.apply_updates(params, updates))
        if opt_treedef is None:
            opt.value = state
        else:
            refx.update_refs(opt, jax.tree_util.tree_leaves(state))
        model["count"].value = model["count"].value + 1
        return loss

    def ev(model, x):
        p = [{k: b[k].value for k in PKEYS} for b in model["blocks"]]
        s = [{k: b[k].value for k in SKEYS} for b in model["blocks"]]
        return forward(p, s, x, train=False)[0]

    def noop(model, opt):
        return None

    return sgd, ev, noop


def refx_variant(params, stats, partial, one_ref=False, closure=False):
    """refx.jit (or jit_partial with the model and optimiser bound, or
    refx.jit of a closure over them) of the steps."""
    model, opt, treedef = refx_model(params, stats, one_ref)
    sgd, ev, noop = refx_steps(treedef)
    if partial:
        s, n = (refx.jit_partial(f, model, opt) for f in (sgd, noop))
        e = refx.jit_partial(ev, model)
        fns = (lambda x, y: s(x, y), lambda x: e(x), lambda: n())
    elif closure:  # closed-over Refs are live inputs of refx.jit
        s = refx.jit(lambda x, y: sgd(model, opt, x, y))
        e = refx.jit(lambda x: ev(model, x))
        n = refx.jit(lambda: noop(model, opt))
        fns = (s, e, n)
    else:
        s, e, n = (refx.jit(f) for f in (sgd, ev, noop))
        fns = (lambda x, y: s(model, opt, x, y), lambda x: e(model, x), lambda: n(model, opt))

    def state():
        b0 = model["blocks"][0]
        return b0["w"].value, b0["mean"].value, model["count"].value

    return (*fns, state), model


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

    def as_dicts(model):
        return [{"w": b.w, "b": b.b, "scale": b.scale, "bias": b.bias} for b in model.blocks]

    @eqx.filter_jit
    def sgd(model, state, opt_state, x, y):
        def loss_fn(model):
            out, new_stats = forward(as_dicts(model), state["stats"], x)
            return jnp.mean((out - y) ** 2), new_stats

        (loss, new_stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = tx().update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, {"stats": new_stats, "count": state["count"] + 1}, opt_state, loss

    @eqx.filter_jit
    def ev(model, state, x):
        return forward(as_dicts(model), state["stats"], x, train=False)[0]

    @eqx.filter_jit
    def noop(model, state, opt_state):
        return model, state, opt_state

    def run_sgd(x, y):
        st["model"], st["state"], st["opt"], loss = sgd(st["model"], st["state"], st["opt"], x, y)
        return loss

    def run_noop():
        st["model"], st["state"], st["opt"] = noop(st["model"], st["state"], st["opt"])
        return st["state"]["count"]

    def state():
        return st["model"].blocks[0].w, st["state"]["stats"][0]["mean"], st["state"]["count"]

    return run_sgd, (lambda x: ev(st["model"], st["state"], x)), run_noop, state


# ------------------------------------------------------------------ main


bench = bench_wall_cpu



def agree(variants, x, y):
    """Three SGD steps each from the same arrays: same weights, batch
    statistics, counter and eval logits as bare jax.jit."""
    for v in variants.values():
        for _ in range(3):
            jax.block_until_ready(v[0](x, y))
    w0, m0, c0 = variants[BARE][3]()
    e0 = variants[BARE][1](x)
    scale = max(float(jnp.max(jnp.abs(w0))), float(jnp.max(jnp.abs(e0))), 1.0)
    for name, v in variants.items():
        w, m, c = v[3]()
        e = v[1](x)
        # bare jit, refx and Equinox run the same XLA program: equal to the
        # bit; NNX's layers round differently, which 100 BatchNorm layers
        # amplify (seen: up to 7e-5 relative), hence a tolerance
        err = max(float(jnp.max(jnp.abs(w - w0))), float(jnp.max(jnp.abs(m - m0))),
                  float(jnp.max(jnp.abs(e - e0))) / scale)
        check(err <= 1e-3 * scale and int(c) == int(c0) == 3,
              f"{name} agrees with bare jit after 3 steps (err {err:.2e}, count {int(c)})")
        if name.startswith("refx") or name == "eqx.filter_jit":
            check(err == 0.0, f"{name} is bit-equal to bare jit ({err:.2e})")


# ------------------------------------------------------ refx.nn models
# The same model class written once against a layer library (refx.nn or
# flax.nnx: the same signatures), and bare jax.jit on the same math written
# functionally.  Every variant starts from NNX's arrays (parameters, batch
# statistics, the dropout stream's key and counter); after one SGD step all
# must agree with bare jax.jit (loss, parameters, statistics) before timing.

NN_COMPETITORS = [BARE, "refx.jit", "refx.jit_partial", "nnx.jit", "nnx.jit_partial graph=False"]
NN_RATE, NN_MOMENTUM, NN_EPS = 0.1, 0.99, 1e-5
NN_BATCH = 16 if SMOKE else 64
NN_HW = 8 if SMOKE else 16  # CNN input: NN_BATCH x NN_HW x NN_HW x 1


def nn_classes(lib):
    """MLP (Linear, BatchNorm, Dropout) and CNN (Conv, BatchNorm) on `lib`."""

    class MLP(lib.Module):
        def __init__(self, rngs):
            self.l1 = lib.Linear(64, 128, rngs=rngs)
            self.bn1 = lib.BatchNorm(128, rngs=rngs)
            self.l2 = lib.Linear(128, 128, rngs=rngs)
            self.bn2 = lib.BatchNorm(128, rngs=rngs)
            self.drop = lib.Dropout(NN_RATE, rngs=rngs)
            self.head = lib.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            x = lib.relu(self.bn1(self.l1(x)))
            return self.head(self.drop(lib.relu(self.bn2(self.l2(x)))))

    class CNN(lib.Module):
        def __init__(self, rngs):
            self.c1 = lib.Conv(1, 16, (3, 3), rngs=rngs)
            self.bn1 = lib.BatchNorm(16, rngs=rngs)
            self.c2 = lib.Conv(16, 32, (3, 3), rngs=rngs)
            self.bn2 = lib.BatchNorm(32, rngs=rngs)
            self.head = lib.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = lib.relu(self.bn2(self.c2(lib.relu(self.bn1(self.c1(x))))))
            return self.head(x.mean(axis=(1, 2)))

    return {"MLP": MLP, "CNN": CNN}


def nn_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def nnx_nn_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(nn_loss)(model, x, y)
    opt.update(model, grads)
    return loss


def refx_nn_step(model, opt, x, y):
    loss, grads = refx.value_and_grad(nn_loss, wrt=rnn.Param)(model, x, y)
    opt.update(model, grads)
    return loss


def nnx_flat(model, kind):
    """{"l1/kernel": array, ...} of one NNX Variable type."""
    flat = nnx.to_flat_state(nnx.state(model, kind))
    return {"/".join(str(k) for k in path): val(v) for path, v in flat}


def bare_bn(x, p, s):
    """refx.nn / NNX BatchNorm in training mode (fast variance)."""
    axes = tuple(range(x.ndim - 1))
    mean, mean2 = x.mean(axes), (x * x).mean(axes)
    var = jnp.maximum(0.0, mean2 - mean * mean)
    sg = jax.lax.stop_gradient
    new = {"mean": sg(NN_MOMENTUM * s["mean"] + (1 - NN_MOMENTUM) * mean),
           "var": sg(NN_MOMENTUM * s["var"] + (1 - NN_MOMENTUM) * var)}
    return (x - mean) * (jax.lax.rsqrt(var + NN_EPS) * p["scale"]) + p["bias"], new


def bare_forward(kind, p, s, rng, x):
    """The model's math on dicts: (logits, new batch stats, new rng counter)."""
    dense = lambda q, h: h @ q["kernel"] + q["bias"]  # noqa: E731
    new = {}
    if kind == "MLP":
        h, new["bn1"] = bare_bn(dense(p["l1"], x), p["bn1"], s["bn1"])
        h, new["bn2"] = bare_bn(dense(p["l2"], jax.nn.relu(h)), p["bn2"], s["bn2"])
        keep = 1.0 - NN_RATE
        mask = jax.random.bernoulli(jax.random.fold_in(rng["key"], rng["count"]), keep, h.shape)
        h = jax.lax.select(mask, jax.nn.relu(h) / keep, jnp.zeros_like(h))
        return dense(p["head"], h), new, rng["count"] + 1

    def conv(q, h):
        return jax.lax.conv_general_dilated(
            h, q["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + q["bias"]

    h, new["bn1"] = bare_bn(conv(p["c1"], x), p["bn1"], s["bn1"])
    h, new["bn2"] = bare_bn(conv(p["c2"], jax.nn.relu(h)), p["bn2"], s["bn2"])
    return dense(p["head"], jax.nn.relu(h).mean(axis=(1, 2))), new, rng["count"]


def nest(flat):
    out: dict = {}
    for k, v in flat.items():
        a, b = k.split("/", 1)
        out.setdefault(a, {})[b] = v
    return out


def nn_bare_variant(kind, nmodel, rng):
    st = {"p": nest(nnx_flat(nmodel, nnx.Param)), "s": nest(nnx_flat(nmodel, nnx.BatchStat)),
          "rng": dict(rng)}
    st["opt"] = tx().init(st["p"])

    @jax.jit
    def sgd(p, s, rng, opt_state, x, y):
        def loss_fn(p):
            logits, new_s, count = bare_forward(kind, p, s, rng, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new_s, count)

        (loss, (new_s, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx().update(grads, opt_state, p)
        return optax.apply_updates(p, updates), new_s, {**rng, "count": count}, opt_state, loss

    def run(x, y):
        st["p"], st["s"], st["rng"], st["opt"], loss = sgd(st["p"], st["s"], st["rng"], st["opt"], x, y)
        return loss

    def state():
        flat = {f"{a}/{b}": v for a, d in st["p"].items() for b, v in d.items()}
        return flat, {f"{a}/{b}": v for a, d in st["s"].items() for b, v in d.items()}

    return run, state


def nn_variants(kind):
    """{variant: (step(x, y) -> loss, state() -> (params, stats))}: every
    variant from the same arrays as NNX's model."""
    nclass, rclass = nn_classes(nnx)[kind], nn_classes(rnn)[kind]
    out, rng = {}, None
    for how in ("nnx.jit", "nnx.jit_partial graph=False"):
        m = nclass(nnx.Rngs(0))
        m.train()
        opt = nnx.Optimizer(m, tx(), wrt=nnx.Param)
        if how == "nnx.jit":
            f = nnx.jit(nnx_nn_step)
            step = (lambda f, m, opt: lambda x, y: f(m, opt, x, y))(f, m, opt)
            nmodel = m
        else:
            step = nnx.jit_partial(nnx_nn_step, m, opt, graph=False)
        out[how] = (step, (lambda m: lambda: (nnx_flat(m, nnx.Param), nnx_flat(m, nnx.BatchStat)))(m))
    if kind == "MLP":
        rng = {"key": val(nmodel.drop.rngs.key), "count": val(nmodel.drop.rngs.count)}
    out[BARE] = nn_bare_variant(kind, nmodel, rng or {"count": jnp.array(0, jnp.uint32)})

    for how in ("refx.jit", "refx.jit_partial"):
        rmodel = rclass(rnn.Rngs(1))  # other weights: all are copied from NNX's below
        rmodel.train()
        arrays = {**nnx_flat(nmodel, nnx.Param), **nnx_flat(nmodel, nnx.BatchStat)}
        refx.load_state_dict(rmodel, arrays, filter=(rnn.Param, rnn.BatchStat))
        if rng is not None:
            rmodel.drop.rngs.key.value, rmodel.drop.rngs.count.value = rng["key"], rng["count"]
        ropt = rnn.Optimizer(rmodel, tx(), wrt=rnn.Param)
        if how == "refx.jit":
            step = (lambda f, m, o: lambda x, y: f(m, o, x, y))(refx.jit(refx_nn_step), rmodel, ropt)
        else:
            step = refx.jit_partial(refx_nn_step, rmodel, ropt)
        out[how] = (step, (lambda m: lambda: (refx.state_dict(m, rnn.Param),
                                              refx.state_dict(m, rnn.BatchStat)))(rmodel))
    return {name: out[name] for name in NN_COMPETITORS}, rmodel


def nn_agree(kind, variants, x, y):
    """One SGD step each from the same arrays: the loss, every parameter and
    batch statistic as bare jax.jit's."""
    losses = {name: float(v[0](x, y)) for name, v in variants.items()}
    p0, s0 = variants[BARE][1]()
    for name, v in variants.items():
        p, s = v[1]()
        check(set(p) == set(p0) and set(s) == set(s0), f"{kind} {name}: names {sorted(p)} {sorted(s)}")
        err = max(float(jnp.max(jnp.abs(jnp.asarray(a[k]) - b[k])) / (1.0 + jnp.max(jnp.abs(b[k]))))
                  for a, b in ((p, p0), (s, s0)) for k in b)
        err = max(err, abs(losses[name] - losses[BARE]))
        check(err <= 1e-4, f"{kind} {name} agrees with bare jax.jit after one step (err {err:.2e})")


def nn_main() -> str:
    rows, data = [], {"question": "step_nn", "models": []}
    rng = np.random.default_rng(0)
    inputs = {"MLP": rng.standard_normal((NN_BATCH, 64), dtype=np.float32),
              "CNN": rng.standard_normal((NN_BATCH, NN_HW, NN_HW, 1), dtype=np.float32)}
    y = jnp.asarray(rng.integers(0, 10, NN_BATCH), dtype=jnp.int32)
    for kind in ("MLP", "CNN"):
        x = jnp.asarray(inputs[kind])
        variants, rmodel = nn_variants(kind)
        nn_agree(kind, variants, x, y)
        fns = {n: (lambda f=v[0]: jax.block_until_ready(f(x, y))) for n, v in variants.items()}
        samples: dict = {}
        t, c = bench(fns, rounds=5 if SMOKE else 21, budget=0.01 if SMOKE else 0.2, samples=samples)
        # each variant against NNX's fastest path, paired round by round
        vs_nnx = {n: [paired_median(samples[n][k], samples[NNX_FAST][k]) for k in (0, 1)]
                  for n in variants}
        what = ("Linear 64-128-128-10, BatchNorm x2, Dropout" if kind == "MLP"
                else f"Conv 3x3 1-16-32, BatchNorm x2, Linear; {NN_HW}x{NN_HW}")
        for name in variants:
            rows.append([f"{kind} ({what})", name, fmt_time(t[name]),
                         "-" if name == BARE else f"{t[name] / t[BARE]:.2f}x",
                         f"{t[name] / t['refx.jit']:.2f}x", fmt_time(c[name]),
                         "-" if name == BARE else f"{c[name] / c[BARE]:.2f}x",
                         f"{c[name] / c['refx.jit']:.2f}x",
                         "-" if name == NNX_FAST else
                         f"{vs_nnx[name][0]:.3f}x / {vs_nnx[name][1]:.3f}x"])
        data["models"].append({"model": kind, "batch": NN_BATCH, "refs": tree_stats(rmodel),
                               "seconds": t, "cpu_seconds": c,
                               "paired_vs_nnx_jit_partial": {n: {"wall": w, "cpu": cc}
                                                             for n, (w, cc) in vs_nnx.items()}})
    table = print_table(
        f"5b. time per SGD step, refx.nn models (batch {NN_BATCH}; goals: refx.jit <= 1.05x bare "
        "jax.jit on the same math, and faster than nnx.jit and nnx.jit_partial(graph=False); "
        "refx.jit_partial, with the model bound, is the like of nnx.jit_partial; "
        "wall time and CPU time, medians; the last column is the median over rounds of each "
        "round's ratio to nnx.jit_partial(graph=False), wall / CPU, timed in the same round)",
        ["model", "variant", "wall", "/ bare", "/ refx.jit", "CPU", "/ bare", "/ refx.jit",
         "/ NNX partial, paired"], rows)
    if not SMOKE:
        save("step_nn", data, table)
    return table


def main() -> None:
    rows, data = [], {"question": "step", "depths": []}
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (BATCH, WIDTH))
    y = jax.random.normal(ky, (BATCH, WIDTH))
    for depth in DEPTHS:
        nnx_default, nmodel = nnx_variant(depth, "default")
        params, stats = init_arrays(nmodel)
        rj, rmodel = refx_variant(params, stats, partial=False)
        variants = {
            BARE: bare_variant(params, stats),
            "refx.jit": rj,
            "refx.jit_partial": refx_variant(params, stats, partial=True)[0],
            "refx.jit, opt state in 1 Ref": refx_variant(params, stats, partial=False, one_ref=True)[0],
            "refx.jit_partial, opt state in 1 Ref": refx_variant(params, stats, partial=True,
                                                                 one_ref=True)[0],
            "refx.jit of a closure": refx_variant(params, stats, partial=False, closure=True)[0],
            "nnx.jit": nnx_default,
            "nnx.jit graph=False": nnx_variant(depth, "tree")[0],
            "nnx.jit_partial graph=False": nnx_variant(depth, "partial")[0],
            "eqx.filter_jit": eqx_variant(params, stats),
        }
        sizes = tree_stats(rmodel)
        agree(variants, x, y)
        timings, cpu_timings = {}, {}
        for kind in STEPS:
            if kind == "SGD step":
                fns = {n: (lambda f=v[0]: jax.block_until_ready(f(x, y))) for n, v in variants.items()}
            elif kind == "eval step":
                fns = {n: (lambda f=v[1]: jax.block_until_ready(f(x))) for n, v in variants.items()}
            else:
                fns = {n: (lambda f=v[2]: jax.block_until_ready(f())) for n, v in variants.items()}
            t, c = bench(fns, rounds=5 if SMOKE else 21, budget=0.01 if SMOKE else 0.2)
            timings[kind], cpu_timings[kind] = t, c
            for name in variants:
                rows.append([str(depth), size_str(sizes), kind, name, fmt_time(t[name]),
                             "-" if name == BARE else f"{t[name] / t[BARE]:.2f}x",
                             f"{t[name] / t['refx.jit']:.2f}x", fmt_time(c[name]),
                             "-" if name == BARE else f"{c[name] / c[BARE]:.2f}x",
                             f"{c[name] / c['refx.jit']:.2f}x"])
        data["depths"].append({"depth": depth, "width": WIDTH, **sizes, "seconds": timings,
                               "cpu_seconds": cpu_timings})
    table = print_table(
        "5. time per training step (MLP of Linear+BatchNorm, width 32; goals: refx.jit <= 1.05x "
        "and refx.jit_partial <= 1.00x bare jax.jit on SGD/eval, nnx.jit >= 3x refx.jit; wall "
        "time and CPU time, medians)",
        ["depth", f"refx model: {SIZE_HEADER}", "step", "variant", "wall", "/ bare", "/ refx.jit",
         "CPU", "/ bare", "/ refx.jit"], rows)
    save("step", data, table)
    nn_main()


if __name__ == "__main__":
    main()
