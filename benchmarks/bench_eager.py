"""Question: what does an eager refx transform cost once it has been called
once, against the same body through a reused JAX function?

An eager (outside any jit) ``refx.scan`` over a small body that reads and
writes a Ref, second and later calls, against ``jax.lax.scan`` of the same
body written functionally through one reused function (JAX caches its
trace and executable).  Goal (issue 19): refx / JAX <= 1.5x.  Also
``refx.cond`` and ``refx.fori_loop`` against their JAX twins.  Answers are
checked equal before timing; medians of interleaved rounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from common import bench, check, fmt_time, print_table, save

import refx


def main() -> None:
    xs = jnp.arange(16.0)
    w0 = jnp.full(8, 0.5)

    # scan: a Ref carried and written every step
    state = {"w": refx.Ref(w0, "params"), "n": refx.Ref(jnp.zeros(()), "count")}

    def body(m, x):
        m["w"].value = m["w"].value * 0.9 + x
        m["n"].value = m["n"].value + 1
        return m, m["w"].value.sum()

    def jax_body(c, x):
        w, n = c
        w = w * 0.9 + x
        return (w, n + 1), w.sum()

    jax_scan = jax.jit(lambda c, xs: jax.lax.scan(jax_body, c, xs))  # a reused function

    def refx_scan():  # returns what it wrote too, so timing waits for it
        return refx.scan(body, state, xs)[1], state["w"].value, state["n"].value

    def plain_scan():
        (w, n), ys = jax_scan((w0, jnp.zeros(())), xs)
        return ys, w, n

    # cond and fori_loop
    flag = refx.Ref(jnp.zeros(3), "s")
    jax_cond = jax.jit(lambda p, v: jax.lax.cond(p, lambda v: v + 1, lambda v: v, v))
    jax_fori = jax.jit(lambda v: jax.lax.fori_loop(0, 8, lambda i, v: v * 1.01, v))

    def bump(r):
        r.value = r.value + 1

    def keep(r):
        return None

    def scale(i, r):
        r.value = r.value * 1.01
        return r

    # the same function objects every call: the cache is per function object
    def refx_cond():
        refx.cond(True, bump, keep, flag)
        return flag.value

    def plain_cond():
        return jax_cond(True, jnp.zeros(3))

    def refx_fori():
        return refx.fori_loop(0, 8, scale, flag).value

    def plain_fori():
        return jax_fori(jnp.zeros(3))

    # answers agree (fresh state each side)
    ys = refx_scan()[0]
    check(np.allclose(ys, plain_scan()[0]), "refx.scan's ys equal jax.lax.scan's")
    check(float(state["n"].value) == 16.0, "the carried counter Ref was written")
    state["w"].value, state["n"].value = w0, jnp.zeros(())
    flag.value = jnp.zeros(3)
    refx_cond()
    check(np.allclose(flag.value, plain_cond()), "refx.cond wrote what jax.lax.cond returns")
    flag.value = jnp.ones(3)
    refx_fori()
    check(np.allclose(flag.value, jax_fori(jnp.ones(3))), "refx.fori_loop matches")
    for f in (refx_scan, plain_scan, refx_cond, plain_cond, refx_fori, plain_fori):
        jax.block_until_ready(f())  # warm: the second and later calls are timed

    t = bench({k: (lambda f=f: jax.block_until_ready(f())) for k, f in {
        "refx.scan": refx_scan, "jax.lax.scan": plain_scan,
        "refx.cond": refx_cond, "jax.lax.cond": plain_cond,
        "refx.fori_loop": refx_fori, "jax.lax.fori_loop": plain_fori}.items()})
    rows = []
    for ours, theirs in (("refx.scan", "jax.lax.scan"), ("refx.cond", "jax.lax.cond"),
                         ("refx.fori_loop", "jax.lax.fori_loop")):
        ratio = t[ours] / t[theirs]
        rows.append([ours, fmt_time(t[ours]), fmt_time(t[theirs]), f"{ratio:.2f}x",
                     "met" if ratio <= 1.5 else "missed"])
    table = print_table("Eager transforms, second and later calls (goal <= 1.5x)",
                        ["transform", "refx", "reused JAX function", "ratio", "goal"], rows)
    save("eager", {"seconds": t}, table)


if __name__ == "__main__":
    main()
