"""Hostile review of the 2026-12-07 changes: deref reusing each Ref's last
Value, reref making Refs in its plan, closed-over Refs substituted by their
stand-ins in deref/clone/update_refs/replace, and the C write check of plain
containers.  Each test asserts the documented behaviour; each failed when
this file was written, and a comment says what it expects and what refx did
then ("today: ...").  All pass since the fixes of the same day (jit.c:
jit_partial's bound Refs take their stand-ins and every value is read again
at one moment before the call; Ref.__reduce__ reads as .value; a cached kind
is made anew after a __class__ assignment; reref makes a subclass's Ref in
its apply step; refx.eval_shape returns a Ref passed and closed over as one
Ref)."""

import copy
import gc

import jax.numpy as jnp
import pytest

import refx

# ------------------------------------------- jit_partial inside a transform
#
# The bound Refs of a jit_partial function are read in jit.c's snapshot
# straight from the Refs (r->value), never through stand_in() as refx.jit's
# argument and closed-over Refs are.  Called inside another refx transform
# (refx.jit, grad, the eager-cached loops, scan, vmap...), the call reads the
# caller's Ref value, which the enclosing trace bakes in as a constant: a
# stale read on every later call, and a zero gradient under refx.grad.
# Severity: silent wrong result.


def test_jit_partial_inside_refx_jit_reads_bound_refs_live():
    # expected: 2.0 then 11.0 (the bound Ref as the enclosing trace sees it,
    # after the write just before the call, as for a closed-over Ref)
    # today: 1.0 then 1.0 (the first trace's value of w, baked in)
    w = refx.Ref(jnp.array(1.0), "p")
    ev = refx.jit_partial(lambda m, x: m["w"].value * x, {"w": w})

    @refx.jit
    def outer(x):
        w.value = w.value + 1
        return ev(x)

    assert float(outer(1.0)) == 2.0
    w.value = jnp.array(10.0)
    assert float(outer(1.0)) == 11.0


def test_grad_through_jit_partial_of_the_differentiated_model():
    # expected: d(w * 2)/dw = 2.0, as through refx.jit of a closure over the
    # same model (which gives 2.0)
    # today: 0.0 (jit_partial reads the outer Ref, a constant for grad)
    w = refx.Ref(jnp.array(1.0), "params")
    model = {"w": w}
    ev = refx.jit_partial(lambda m, x: m["w"].value * x, model)
    closure = refx.jit(lambda x: model["w"].value * x)
    assert float(refx.grad(lambda m: closure(2.0))(model)[("w",)].value) == 2.0
    assert float(refx.grad(lambda m: ev(2.0))(model)[("w",)].value) == 2.0


def test_eager_fori_loop_over_jit_partial_sees_later_writes():
    # expected: 3.0, then 30.0 after w is set to 10 (a direct ev(1.0) says 10)
    # today: 3.0 then 3.0: the eager loop's cached refx.jit baked w's first
    # value in
    w = refx.Ref(jnp.array(1.0), "p")
    ev = refx.jit_partial(lambda m, x: m["w"].value * x, {"w": w})

    def body(i, c):
        return c + ev(1.0)

    assert float(refx.fori_loop(0, 3, body, jnp.array(0.0))) == 3.0
    w.value = jnp.array(10.0)
    assert float(ev(1.0)) == 10.0
    assert float(refx.fori_loop(0, 3, body, jnp.array(0.0))) == 30.0


def test_jit_partial_writing_its_bound_refs_inside_scan():
    # expected: each iteration's write is seen by the next and written back
    # (w: 1 -> 4), as refx.jit of a closure over w does inside scan
    # today: ValueError "Cannot mutate Ref from a different trace level:
    # refx.jit_partial(<lambda>) wrote the Ref of bound argument 0"
    w = refx.Ref(jnp.array(1.0), "p")
    bump = refx.jit_partial(lambda m: setattr(m["w"], "value", m["w"].value + 1), {"w": w})

    def body(c, x):
        bump()
        return c, w.value

    _, ys = refx.scan(body, None, None, length=3)
    assert float(w.value) == 4.0
    assert [float(y) for y in ys] == [2.0, 3.0, 4.0]


# ------------------------------------- copy of a closed-over Ref in a trace
#
# deref, clone, update_refs and Ref.replace now see a closed-over Ref's
# stand-in inside a refx transform; Ref.__reduce__ (copy.copy, deepcopy,
# pickle) still reads self->value, the caller's value.  Severity: silent
# wrong result (a stale constant of the first trace; inside scan, not even
# the body's own earlier writes).


def test_copy_of_closed_over_ref_inside_refx_jit_is_live():
    # expected: 3.0 then 15.0 (like refx.clone, which gives 15.0)
    # today: copy.copy and copy.deepcopy give 3.0 after the write
    w = refx.Ref(jnp.ones(3), "p")
    f_clone = refx.jit(lambda: refx.clone(w).value.sum())
    f_copy = refx.jit(lambda: copy.copy(w).value.sum())
    f_deep = refx.jit(lambda: copy.deepcopy(w).value.sum())
    assert float(f_clone()) == float(f_copy()) == float(f_deep()) == 3.0
    w.value = jnp.full(3, 5.0)
    assert float(f_clone()) == 15.0
    assert float(f_copy()) == 15.0
    assert float(f_deep()) == 15.0


def test_copy_of_closed_over_ref_inside_scan_sees_the_body_writes():
    # expected: [1, 2, 3] (what acc.value, clone and replace read)
    # today: [0, 0, 0] (the caller's value before the scan)
    acc = refx.Ref(jnp.array(0.0), "s")

    def body(c, x):
        acc.value = acc.value + 1
        return c, (copy.copy(acc).value, refx.clone(acc).value)

    _, (copied, cloned) = refx.scan(body, None, jnp.arange(3.0))
    assert [float(v) for v in cloned] == [1.0, 2.0, 3.0]
    assert [float(v) for v in copied] == [1.0, 2.0, 3.0]


# --------------------------------------------- refx.jit's "one moment" read
#
# transforms.md: "each call reads its Refs' values in one pass that no other
# thread can interleave with".  jit.c reads the argument Refs in snapshot(),
# then compares the cache key (Python __eq__ of static arguments, or a
# trace on a miss, or the capture hook while any thread traces) and only
# then reads the closed-over Refs (append_closure).  A write landing in
# between (another thread; here a static argument's __eq__, deterministic)
# is seen half.  Severity: silent wrong result (torn read), needs threads.


def test_refx_jit_reads_argument_and_closed_over_refs_at_one_moment():
    # expected: (0, 0) or (1, 1): one update_refs wrote a and c together
    # today: (0.0, 1.0): a read before the key compare, c after it
    a = refx.Ref(jnp.array(0.0), "s")
    c = refx.Ref(jnp.array(0.0), "s")
    armed = [False]

    class Key:  # stands for another thread writing during the key compare
        def __hash__(self):
            return 1

        def __eq__(self, other):
            if armed[0]:
                armed[0] = False
                refx.update_refs([a, c], [jnp.array(1.0), jnp.array(1.0)])
            return isinstance(other, Key)

    @refx.jit
    def f(x, key):
        return x.value, c.value

    f(a, refx.Static(Key()))
    armed[0] = True
    got_a, got_c = f(a, refx.Static(Key()))
    assert not armed[0]  # the write happened during the call
    assert float(got_a) == float(got_c), (float(got_a), float(got_c))


# ------------------------------------------------------------ stale kinds
#
# kinds.c caches a Ref's kind (class, metadata) in RefObject.kind, on the
# premise that "the class and metadata of a Ref never change"; but
# `ref.__class__ = Other` is allowed between Python subclasses.  deref then
# gives (and now reuses) a Value naming the old class, reref/refx.jit rebuild
# the old class, and update_refs(r, deref(r)) is refused.  Pre-existing
# (the kind cache predates the Value reuse).  Severity: silent wrong result
# (adversarial: needs a __class__ assignment; refusing it would also do).


def test_class_assignment_is_seen_by_deref_and_transforms():
    class A(refx.Ref):
        pass

    class B(refx.Ref):
        pass

    r = A(jnp.ones(2), "p")
    refx.deref([r])  # caches the kind (A, (), ())
    try:
        r.__class__ = B
    except TypeError:
        return  # refusing the assignment is a fix too
    # expected: B everywhere; today: A (deref, reref, inside refx.jit)
    assert refx.deref([r])[0].ref_type is B
    assert type(refx.reref(refx.deref([r]))[0]) is B
    assert bool(refx.jit(lambda t: jnp.asarray(isinstance(t, B)))(r))
    refx.update_refs(r, refx.deref(r))  # today: "source Value stands for a A"


# --------------------------------------------------- reref refused late
#
# deref.c: "a reref refused for its input releases the Refs it made, which
# nothing ever saw".  Since reref makes each Ref in its plan pass, a refused
# reref makes (then frees) Refs, and a Ref subclass's __del__ sees them, and
# can keep one: a Ref made by a call that raised survives.  Before
# a0b93bc no Ref was made for a refused input.  Severity: low (a visible,
# half-applied side effect of a refused call; needs a __del__).


def test_refused_reref_makes_no_ref_a_finalizer_can_see():
    seen = []

    class Sub(refx.Ref):
        def __del__(self):
            seen.append(self)

    s = Sub(jnp.ones(2), "p")
    d = refx.deref([s])
    seen.clear()
    with pytest.raises(ValueError, match="Index"):
        refx.reref([d[0], refx.Index(5, "p", ref_type=Sub)])
    gc.collect()
    made = [x for x in seen if x is not s]
    seen.clear()  # (do not keep them past the test)
    # expected: []; today: [Sub(float32[2], collection='p')], a live Ref
    assert made == []


# ----------------------------------------- eval_shape of a closed-over Ref
#
# refx.eval_shape turns each Ref it returns into a new abstract Ref: an
# argument's holds "the value fun left in it" (test_eval_shape), and since
# 4449608 deref(w) of a closed-over Ref reads its stand-in too; but a
# closed-over Ref returned as itself is read after the capture frame has
# closed (x.value in _lifts.eval_shape), so it gets the caller's value.  One
# Ref passed and closed over then comes back as two Refs of two shapes.
# Pre-existing.  Severity: silent wrong result (abstract shapes, lost sharing).


def test_eval_shape_returns_a_ref_passed_and_closed_over_as_one_ref():
    w = refx.Ref(jnp.ones(2), "p")

    def f(m):
        w.value = jnp.zeros(5)
        return m, w, refx.deref(w)

    a, b, d = refx.eval_shape(f, w)
    assert a.value.shape == (5,) and d.value.shape == (5,)
    # expected: b is a, holding shape (5,) (the value fun left, as for a and
    # as deref(w) says); today: a new Ref holding shape (2,)
    assert b.value.shape == (5,)
    assert b is a
