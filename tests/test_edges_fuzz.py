"""A differential fuzz of refx's transforms against eager execution (issue 18).

Hypothesis draws small programs over a fixed pool of five Refs:

    0  "params"  float32[2]                  (differentiated under grad)
    1  "state"   float32[2]
    2  "state"   {"a": float32[2], "b": float32[]}   a dict, mutated in place
    3  "state"   [float32[2]]                        a list, mutated in place
    4  "state"   float32[2], the SAME array object as Ref 0 holds
                 (what refx.clone makes: two Refs, one array)

placed in two arguments (dicts; a Ref may sit at several keys and in both
arguments: sharing within and across arguments), and a list of operations,
each reading a Ref through one of its places and writing another one:
rebinding `.value`, changing the container in place (`v["a"] = ...`,
`v[0] = ...`) or growing it (`v["z"] = ...`, `.append`).  The program runs
through refx.jit (twice, with donate_argnums drawn), jit_partial (twice,
argument 0 bound, donate_argnums drawn), scan (length 2), cond (the other
branch another drawn program), vmap (every Ref broadcast, a mapped x),
value_and_grad (wrt="params") and value_and_grad inside refx.jit (twice),
and the same program runs eagerly on a second copy built the same way (for
the gradient, jax.grad of the program over fresh Refs holding the current
state, Ref 0's value the differentiated input).

The outcome of each call must be one of:
  * the eager result and the eager Ref states (same structures, equal
    leaves), no Ref holding a tracer or a deleted array, every argument
    still holding the caller's own Refs; or
  * a ValueError/TypeError, with no Ref written (each Ref holds the very
    objects it held before the call, none deleted).
A program made only of reads and `.value` rebinds (and, under grad, not
writing the differentiated Ref) must take the first outcome: refusing it
would be a regression, not a safe answer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refx

Tracer = jax.core.Tracer
F32 = jnp.float32
NREFS = 5
KINDS = ("read", "rebind", "inplace", "grow")
CONSTS = (0.5, 1.0, 2.0)


def make_pool(p0=None):
    base = jnp.array([1.0, 2.0], F32)
    return [
        refx.Ref(base if p0 is None else p0, "params"),
        refx.Ref(jnp.array([0.5, -1.0], F32), "state"),
        refx.Ref({"a": jnp.array([3.0, 1.0], F32), "b": jnp.array(2.0, F32)}, "state"),
        refx.Ref([jnp.array([1.0, 1.0], F32)], "state"),
        refx.Ref(base, "state"),
    ]


def build(spec, p0=None):
    pool = make_pool(p0)
    args = tuple({f"k{j}": pool[i] for j, i in enumerate(ids)} for ids in spec["args"])
    return pool, args


def places(spec):
    """{ref id: [(argument, key), ...]} in leaf order."""
    occ = {}
    for a, ids in enumerate(spec["args"]):
        for j, i in enumerate(ids):
            occ.setdefault(i, []).append((a, f"k{j}"))
    return occ


def at(args, occ, i, via):
    a, k = occ[i][via % len(occ[i])]
    return args[a][k]


def read(r):
    v = r.value
    if isinstance(v, dict):
        return v["a"]
    if isinstance(v, list):
        return v[0]
    return v


def write(kind, r, x, c):
    v = r.value
    if kind == "read":
        return
    if isinstance(v, dict):
        if kind == "rebind":
            r.value = {**v, "a": v["a"] * c + x, "b": v["b"] * c}
        elif kind == "inplace":
            v["a"] = v["a"] * c + x
        else:
            v["z"] = x * c
    elif isinstance(v, list):
        if kind == "rebind":
            r.value = [v[0] * c + x] + v[1:]
        elif kind == "inplace":
            v[0] = v[0] * c + x
        else:
            v.append(x * c)
    else:
        r.value = v * c + x


def run_ops(ops, args, occ):
    total = jnp.zeros(2, F32)
    for kind, i, via, src, via_src, c in ops:
        x = read(at(args, occ, src, via_src))
        total = total + x
        write(kind, at(args, occ, i, via), x, c)
    return total


# --- comparing states ------------------------------------------------------------------


def snapshot(pool):
    return [(r.value, jax.tree_util.tree_structure(r.value),
             tuple(jax.tree_util.tree_leaves(r.value))) for r in pool]


def untouched(pool, snap):
    for r, (v, td, leaves) in zip(pool, snap, strict=False):
        if r.value is not v or jax.tree_util.tree_structure(r.value) != td:
            return False
        now = jax.tree_util.tree_leaves(r.value)
        if len(now) != len(leaves) or any(a is not b for a, b in zip(now, leaves, strict=False)):
            return False
        if any(isinstance(x, jax.Array) and x.is_deleted() for x in now):
            return False
    return True


def healthy(pool):
    for n, r in enumerate(pool):
        for x in jax.tree_util.tree_leaves(r.value):
            assert not isinstance(x, Tracer), f"Ref {n} holds a tracer: {r.value}"
            assert not (isinstance(x, jax.Array) and x.is_deleted()), \
                f"Ref {n} holds a deleted array"


def same_state(pool_t, pool_e):
    for n, (rt, re_) in enumerate(zip(pool_t, pool_e, strict=False)):
        td_t = jax.tree_util.tree_structure(rt.value)
        td_e = jax.tree_util.tree_structure(re_.value)
        assert td_t == td_e, f"Ref {n}: structure {td_t}, eager {td_e}"
        for a, b in zip(jax.tree_util.tree_leaves(rt.value), jax.tree_util.tree_leaves(re_.value), strict=False):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                       err_msg=f"Ref {n}")


def same_args(spec, pool, args):
    for a, ids in enumerate(spec["args"]):
        assert list(args[a]) == [f"k{j}" for j in range(len(ids))], f"argument {a} changed keys"
        for j, i in enumerate(ids):
            assert args[a][f"k{j}"] is pool[i], f"argument {a} at k{j}: not the caller's Ref"


def plain(ops):
    return all(k in ("read", "rebind") for k, *_ in ops)


# --- the programs ----------------------------------------------------------------------


@st.composite
def programs(draw, mode):
    a0 = draw(st.lists(st.integers(0, NREFS - 1), min_size=1, max_size=3))
    if mode in ("grad", "jit_grad") and 0 not in a0:
        a0 = a0 + [0]  # grad needs a "params" Ref in argument 0
    a1 = draw(st.lists(st.integers(0, NREFS - 1), min_size=0, max_size=3))
    present = sorted(set(a0) | set(a1))
    op = st.tuples(st.sampled_from(KINDS), st.sampled_from(present), st.integers(0, 5),
                   st.sampled_from(present), st.integers(0, 5), st.sampled_from(CONSTS))
    spec = {"args": (a0, a1), "ops": draw(st.lists(op, min_size=1, max_size=4))}
    if mode == "jit":
        spec["donate"] = draw(st.sampled_from([(), (0,), (1,), (0, 1)]))
    if mode == "jit_partial":  # argument 0 is the bound one
        spec["donate"] = draw(st.sampled_from([(), (0,), (1,), (0, 1)]))
    if mode == "cond":
        spec["pred"] = draw(st.booleans())
        spec["other"] = draw(st.lists(op, min_size=0, max_size=3))
    return spec


def transformed(mode, spec, occ, args):
    """The calls of `mode` on `args`: a list of thunks, each returning an output."""
    ops = spec["ops"]
    body = lambda a0, a1: run_ops(ops, (a0, a1), occ)  # noqa: E731
    if mode == "jit":
        f = refx.jit(body, donate_argnums=spec["donate"])
        return [lambda: f(*args)] * 2
    if mode == "jit_partial":
        f = refx.jit_partial(body, args[0], donate_argnums=spec["donate"])
        return [lambda: f(args[1])] * 2
    if mode == "scan":
        def step(carry, _):
            return carry, body(*carry)
        return [lambda: refx.scan(step, args, length=2)[1]]
    if mode == "cond":
        other = lambda a0, a1: run_ops(spec["other"], (a0, a1), occ)  # noqa: E731
        return [lambda: refx.cond(jnp.array(spec["pred"]), body, other, *args)]
    if mode == "vmap":
        xs = jnp.arange(3, dtype=F32)
        return [lambda: refx.vmap(lambda a0, a1, x: body(a0, a1) + x,
                                  in_axes=(None, None, 0))(*args, xs)]
    if mode == "grad":
        loss = lambda a0, a1: jnp.sum(body(a0, a1))  # noqa: E731
        return [lambda: refx.value_and_grad(loss)(*args)]
    if mode == "jit_grad":
        loss = lambda a0, a1: jnp.sum(body(a0, a1))  # noqa: E731
        f = refx.jit(lambda a0, a1: refx.value_and_grad(loss)(a0, a1))
        return [lambda: f(*args)] * 2
    raise AssertionError(mode)


def eager(mode, spec, occ, pool, args):
    """The same calls run eagerly: a list of thunks."""
    ops = spec["ops"]
    if mode in ("jit", "jit_partial"):
        return [lambda: run_ops(ops, args, occ)] * 2
    if mode == "scan":
        return [lambda: jnp.stack([run_ops(ops, args, occ) for _ in range(2)])]
    if mode == "cond":
        return [lambda: run_ops(ops if spec["pred"] else spec["other"], args, occ)]
    if mode == "vmap":
        return [lambda: run_ops(ops, args, occ)[None, :] + jnp.arange(3, dtype=F32)[:, None]]
    if mode in ("grad", "jit_grad"):
        def functional(p, values):
            # fresh Refs of the gradient trace holding the current state
            # (containers rebuilt, so in-place writes stay in here), Ref 0's
            # value replaced by p
            fresh = [refx.Ref(p if n == 0 else jax.tree_util.tree_map(lambda x: x, v),
                              r.collection) for n, (r, v) in enumerate(zip(pool, values, strict=True))]
            a = tuple({f"k{j}": fresh[i] for j, i in enumerate(ids)} for ids in spec["args"])
            return jnp.sum(run_ops(ops, a, occ))

        def call():
            values = [r.value for r in pool]
            g = jax.grad(functional)(pool[0].value, values)
            return jnp.sum(run_ops(ops, args, occ)), g
        return [call] * (2 if mode == "jit_grad" else 1)
    raise AssertionError(mode)


def compare_outputs(mode, spec, got, want):
    if mode in ("grad", "jit_grad"):
        (lt, gt), (le, ge) = got, want
        np.testing.assert_allclose(lt, le, rtol=1e-5, atol=1e-6)
        first = min(f"k{j}" for j, i in enumerate(spec["args"][0]) if i == 0)
        np.testing.assert_allclose(gt[(first,)].value, ge, rtol=1e-5, atol=1e-6)
        return
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def writes_params(spec):
    return any(k != "read" and i == 0 for k, i, *_ in spec["ops"])


MODES = ["jit", "jit_partial", "scan", "cond", "vmap", "grad", "jit_grad"]


def check(mode, spec):
    occ = places(spec)
    pool_t, args_t = build(spec)
    pool_e, args_e = build(spec)
    calls_t = transformed(mode, spec, occ, args_t)
    calls_e = eager(mode, spec, occ, pool_e, args_e)
    must_work = plain(spec["ops"]) and plain(spec.get("other", ()))
    if mode in ("grad", "jit_grad") and writes_params(spec):
        must_work = False  # writing a differentiated Ref is a ValueError naming it
    for n, (ct, ce) in enumerate(zip(calls_t, calls_e, strict=False)):
        snap, snap_e = snapshot(pool_t), snapshot(pool_e)
        try:
            got = ct()
        except (ValueError, TypeError) as e:
            assert not must_work, f"call {n}: a program of reads and rebinds was refused: {e!r}"
            assert untouched(pool_t, snap), f"call {n} refused ({e!r}) but a Ref was written"
            same_args(spec, pool_t, args_t)
            return
        want = ce()
        healthy(pool_t)
        same_args(spec, pool_t, args_t)
        compare_outputs(mode, spec, got, want)
        same_state(pool_t, pool_e)
        # a Ref the eager program did not write keeps its very objects (under
        # cond, one that no branch writes: the other branch's write makes it
        # an output of lax.cond)
        either = ({i for k, i, *_ in spec["ops"] + spec["other"] if k != "read"}
                  if mode == "cond" else set())
        for r, no, t_snap, e_snap in zip(pool_t, range(NREFS), snap, snap_e, strict=False):
            if no not in either and untouched([pool_e[no]], [e_snap]):
                assert untouched([r], [t_snap]), f"call {n}: Ref {no} was not written but " \
                    f"holds new objects (or a deleted array)"


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=50, deadline=None, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_transforms_agree_with_eager(mode, data):
    # today: fails for every mode within 50 examples on most seeds: in-place
    # container writes dropped (jit, jit_partial, scan, cond, vmap, jit_grad)
    # or left as a tracer in the caller's container (grad), a refusal after
    # an in-place write under grad that leaves the write in place, the array
    # Refs 0 and 4 share deleted by a donated step (jit, jit_partial), a
    # donated Ref the step only read given a new array.  Programs of reads and
    # rebinds without donation pass on every mode today (the harness agrees
    # with refx where refx is right).
    check(mode, data.draw(programs(mode)))


# --- the fixed programs the issue is about, so a regression names itself ----------------

EXAMPLES = {
    # case 1 and 16: Ref 4 (not passed) holds Ref 0's array; argument 0 donated
    "donate-aliased": ("jit", {"args": ([0], []), "ops": [("rebind", 0, 0, 0, 0, 2.0)],
                               "donate": (0,)}),
    # case 16: a donated Ref the step only reads keeps its array
    "donate-read-only": ("jit", {"args": ([1], []), "ops": [("read", 1, 0, 1, 0, 1.0)],
                                 "donate": (0,)}),
    # case 2: a dict changed in place inside refx.jit
    "jit-inplace-dict": ("jit", {"args": ([2], []), "ops": [("inplace", 2, 0, 2, 0, 2.0)],
                                 "donate": ()}),
    # case 2: a list changed in place inside refx.vmap (broadcast Ref)
    "vmap-inplace-list": ("vmap", {"args": ([3], []), "ops": [("inplace", 3, 0, 3, 0, 2.0)]}),
    # case 3: a dict changed in place under value_and_grad, from the params
    "grad-inplace-dict": ("grad", {"args": ([0, 2], []), "ops": [("inplace", 2, 0, 0, 0, 1.0)]}),
    # guard (passes today): a list appended to inside scan is refused, nothing written
    "scan-append": ("scan", {"args": ([3], []), "ops": [("grow", 3, 0, 3, 0, 1.0)]}),
    # guard (passes today): shared across arguments, written through the second place
    "shared-across": ("jit", {"args": ([1], [1]), "ops": [("rebind", 1, 1, 1, 0, 2.0)],
                              "donate": (0, 1)}),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_known_programs_agree_with_eager(name):
    # today: donate-aliased, donate-read-only, jit-inplace-dict,
    # vmap-inplace-list and grad-inplace-dict fail; scan-append and
    # shared-across pass (guards of what works).
    mode, spec = EXAMPLES[name]
    check(mode, spec)
