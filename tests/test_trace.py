"""Trace-level awareness: a Ref may be written only from the JAX trace it
was created in, and may not be made to hold tracers of a trace other than
its own or one enclosing it."""

import jax
import jax.numpy as jnp
import pytest

import refx

TRACE_MSG = "Cannot mutate Ref from a different trace level"


def test_outer_ref_mutated_inside_jit():
    r = refx.Ref(1.0)

    @jax.jit
    def f(x):
        r.value = x
        return x

    with pytest.raises(ValueError, match=TRACE_MSG):
        f(jnp.ones(()))
    assert r.value == 1.0


def test_outer_ref_mutated_inside_grad():
    r = refx.Ref(1.0)

    def loss(x):
        r.value = x
        return x

    with pytest.raises(ValueError, match=TRACE_MSG):
        jax.grad(loss)(1.0)
    assert r.value == 1.0


def test_outer_ref_mutated_inside_vmap():
    r = refx.Ref(1.0)

    def f(x):
        r.value = x
        return x

    with pytest.raises(ValueError, match=TRACE_MSG):
        jax.vmap(f)(jnp.ones(3))


def test_outer_ref_with_concrete_value_inside_jit():
    # even a concrete value may not be written from another trace
    r = refx.Ref(1.0)

    @jax.jit
    def f():
        r.value = 2.0
        return 0

    with pytest.raises(ValueError, match=TRACE_MSG):
        f()


def test_ref_created_inside_jit_is_mutable_there():
    @jax.jit
    def f(x):
        r = refx.Ref(x)
        r.value = r.value * 2
        r.value = r.value + 1
        return r.value

    assert f(jnp.array(3.0)) == 7.0


def test_ref_created_inside_jit_mutated_outside():
    leaked = []

    @jax.jit
    def f(x):
        leaked.append(refx.Ref(x))
        return x

    f(jnp.ones(()))
    with pytest.raises(ValueError, match=TRACE_MSG):
        leaked[0].value = 1.0


def test_reading_is_always_allowed():
    r = refx.Ref(jnp.array(2.0))

    @jax.jit
    def f(x):
        return x * r.value

    assert f(jnp.array(3.0)) == 6.0


def test_reref_inside_jit_makes_refs_of_that_trace():
    r = refx.Ref(jnp.array(1.0))
    tree = refx.deref({"a": r, "b": r})

    @jax.jit
    def f(tree):
        t = refx.reref(tree)
        t["a"].value = t["a"].value + 1
        return refx.deref(t)

    out = refx.reref(f(tree))
    assert out["b"].value == 2.0
    out["a"].value = 5.0  # the rebuilt Refs belong to the top level
    assert out["b"].value == 5.0


def test_value_with_enclosing_trace_tracer_is_allowed():
    # inside grad, values computed only from jit-level inputs are jit
    # tracers: a Ref made in grad's trace may hold them (BatchNorm stats).
    @jax.jit
    def f(x, p):
        def loss(p):
            r = refx.Ref(jnp.zeros(()))
            r.value = jax.lax.stop_gradient(x.mean())  # a jit tracer
            r.value = r.value + (p * x).sum()
            return r.value

        return jax.grad(loss)(p)

    assert f(jnp.arange(3.0), jnp.array(1.0)) == 3.0


def test_value_with_inner_trace_tracer_is_rejected():
    r = refx.Ref(0.0)
    leaked = []

    @jax.jit
    def f(x):
        leaked.append(x)
        return x

    f(jnp.ones(()))
    with pytest.raises(ValueError, match="Cannot set a Ref to a value holding a tracer of another trace"):
        r.value = leaked[0]
    with pytest.raises(ValueError, match="Cannot set a Ref to a value holding a tracer of another trace"):
        r.value = {"nested": [leaked[0]]}
    assert r.value == 0.0


def test_nested_jit_inner_tracer_into_outer_ref():
    @jax.jit
    def f(x):
        r = refx.Ref(x)
        inner = []

        @jax.jit
        def g(y):
            inner.append(y)
            return y

        g(x)
        with pytest.raises(ValueError, match="tracer of another trace"):
            r.value = inner[0]
        return r.value

    f(jnp.ones(()))


def test_update_refs_obeys_trace_check():
    r = refx.Ref(1.0)
    target = {"a": r}

    @jax.jit
    def f(x):
        refx.update_refs(target, {"a": x})
        return x

    with pytest.raises(ValueError, match=r"update_refs: at \('a',\): Cannot mutate Ref from a different trace level"):
        f(jnp.ones(()))
    assert r.value == 1.0


def test_ref_init_on_live_ref_is_refused_under_jit_too():
    # __init__ on a live Ref is refused outright (its collection is
    # read-only); it used to be a write, checked against the trace
    r = refx.Ref(1.0)

    @jax.jit
    def f(x):
        r.__init__(x)
        return x

    with pytest.raises(TypeError, match="Ref.__init__: this Ref is already initialized"):
        f(jnp.ones(()))
    assert r.value == 1.0


# --- the trace-level error says which Ref and what to do (issue 14) ------------


def test_trace_error_names_the_ref_and_the_fix():
    class Param(refx.Ref):
        pass

    p = Param(1.0, "params")

    @jax.jit
    def f(x):
        p.value = x
        return x

    with pytest.raises(ValueError) as e:
        f(jnp.ones(()))
    msg = str(e.value)
    assert msg.startswith("Cannot mutate Ref from a different trace level: this Param "
                          "(collection 'params') was created in another JAX trace")
    assert "Pass the tree holding it to the transform as an argument" in msg
    leaked = {}

    @jax.jit
    def g(x):
        leaked["r"] = refx.Ref(x)
        return x

    g(jnp.ones(()))
    import gc

    gc.collect()
    with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level: this Ref "
                                         r"\(collection None\) was created in (a JAX trace that has finished|another JAX trace)"):
        leaked["r"].value = 1.0


def test_writing_a_value_says_to_reref():
    v = refx.deref([refx.Ref(1.0)])[0]
    with pytest.raises(AttributeError, match=r"a Value is a deref'ed Ref and cannot be written: reref the tree \(refx.reref\)"):
        v.value = 2.0


# The write check skips the Python walk for containers that hold only plain
# values (ref.c, holds_only_plain): a tracer anywhere a pytree can put one
# must still be found, in every container it walks and in those it does not.

class _State(tuple):  # a tuple subclass with storage of its own (a __dict__)
    pass


jax.tree_util.register_pytree_node(
    _State, lambda s: ((*s, s.extra), None), lambda _, c: _with_extra(c[:-1], c[-1]))


def _with_extra(items, extra):
    s = _State(items)
    s.extra = extra
    return s


def _nest(x, depth):
    for _ in range(depth):
        x = [x]
    return x


class _Pair(tuple):
    """A namedtuple-like tuple subclass (no storage of its own)."""

    __slots__ = ()


@pytest.mark.parametrize("where", ["tuple", "list", "dict", "nested", "namedtuple", "optax",
                                   "partition", "tuple subclass attribute", "deep"])
def test_a_leaked_tracer_in_any_container_is_refused(where):
    import optax

    r = refx.Ref(0.0)
    leaked = []
    jax.jit(lambda x: leaked.append(x) or x)(jnp.ones(()))
    t = leaked[0]
    one = jnp.ones(())
    value = {
        "tuple": (one, t),
        "list": [one, one, t],
        "dict": {"a": one, "b": t},
        "nested": ({"a": [one, (one, t)]},),
        "namedtuple": optax.TraceState(trace=t),
        "optax": (optax.TraceState(trace={"w": one, "b": t}), optax.EmptyState()),
        "partition": refx.get_partition({"a": refx.Value(t, 0)}, refx.Deref),
        "tuple subclass attribute": _with_extra((one,), t),
        "deep": _nest(t, 20),
    }[where]
    with pytest.raises(ValueError, match="holding a tracer of another trace"):
        r.value = value
    assert r.value == 0.0


def test_containers_of_plain_values_are_accepted():
    import optax

    r = refx.Ref(0.0)
    one = jnp.ones(())
    for value in [(one, 1, None, "s"), [one], {"a": (one,)},
                  (optax.TraceState(trace={"w": one}), optax.EmptyState()),
                  _Pair((one, 2.0)), _with_extra((one,), 3.0)]:
        r.value = value
        assert r.value is value
