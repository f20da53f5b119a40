"""Every example of the seed README, verbatim but for the typos noted.

- `jax.deref` in the jit example is `refx.deref`.
- `jax.tree_map` (removed from JAX) is `jax.tree_util.tree_map`.
- The gradient-descent example filters a deref'ed tree, whose leaves are
  Value/Index, not Ref; it is run with the seed's Ref-only predicate (as
  written, it selects nothing) and with the `str` shorthand, which accepts
  Values/Indexes of a collection.
"""

import jax
import jax.numpy as jnp
import pytest

import refx


def test_getting_started():
    r1 = refx.Ref(1)
    r2 = refx.Ref(2)

    pytree = {
        'a': [r1, r1, r2],
        'b': r2
    }

    pytree['a'][0].value = 10

    assert pytree['a'][1].value == 10


def test_deref_reref_through_jit():
    r1 = refx.Ref(1)
    r2 = refx.Ref(2)
    pytree = {
        'a': [r1, r1, r2],
        'b': r2
    }

    pytree = refx.deref(pytree)

    @jax.jit
    def f(pytree):
        pytree = refx.reref(pytree)
        # perform some computation / update the references
        pytree['a'][2].value = 50
        return refx.deref(pytree)

    pytree = f(pytree)
    pytree = refx.reref(pytree)

    assert pytree['b'].value == 50


def test_trace_level_awareness():
    r = refx.Ref(1)

    @jax.jit
    def f():
        # ValueError: Cannot mutate ref from different trace level
        r.value = jnp.array(1.0)
        ...

    with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level"):
        f()


def test_partitioning():
    r1 = refx.Ref(1, collection="params")
    r2 = refx.Ref(2, collection="batch_stats")

    pytree = {
        'a': [r1, r1, r2],
        'b': r2
    }

    (params, rest), treedef = refx.tree_partition(
        pytree, lambda x: isinstance(x, refx.Ref) and x.collection == "params")

    assert params == {
        ('a', '0'): r1,
        ('a', '1'): r1,
        ('a', '2'): refx.NOTHING,
        ('b',): refx.NOTHING
    }
    assert rest == {
        ('a', '0'): refx.NOTHING,
        ('a', '1'): refx.NOTHING,
        ('a', '2'): r2,
        ('b',): r2,
    }

    partitions = (params, rest)
    pytree = refx.merge_partitions(partitions, treedef)
    assert pytree == {'a': [r1, r1, r2], 'b': r2}


def test_get_partition():
    r1 = refx.Ref(1, collection="params")
    r2 = refx.Ref(2, collection="batch_stats")

    pytree = {
        'a': [r1, r1, r2],
        'b': r2
    }

    params = refx.get_partition(
        pytree, lambda x: isinstance(x, refx.Ref) and x.collection == "params")

    assert params == {
        ('a', '0'): r1,
        ('a', '1'): r1,
        ('a', '2'): refx.NOTHING,
        ('b',): refx.NOTHING
    }


def _gradient_descent(pytree, by_collection):
    (params, rest), treedef = refx.tree_partition(
        refx.deref(pytree), by_collection("params"))

    def loss(params):
        pytree = refx.merge_partitions((params, rest), treedef)
        pytree = refx.reref(pytree)
        w = pytree['a'][0].value
        return jnp.sum((w - 3.0) ** 2)

    grads = jax.grad(loss)(params)

    # gradient descent
    params = jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, params, grads)

    refx.update_refs(
        refx.get_partition(pytree, by_collection("params")), params)


def test_updating_references_str_filter():
    w = jnp.array([1.0, 2.0])
    r1 = refx.Ref(w, collection="params")
    r2 = refx.Ref(jnp.array(0.5), collection="batch_stats")
    pytree = {'a': [r1, r1, r2], 'b': r2}

    def by_collection(c):
        return c  # the str shorthand: Ref/Value/Index of collection c

    _gradient_descent(pytree, by_collection)
    # d/dw sum((w-3)^2) = 2(w-3); w - 0.1 * 2 (w - 3)
    expected = w - 0.2 * (w - 3.0)
    assert jnp.allclose(pytree['a'][0].value, expected)
    assert pytree['a'][1] is pytree['a'][0]
    assert pytree['b'].value == 0.5


def test_updating_references_seed_predicate():
    # As written in the seed: the predicate accepts Refs only, so on the
    # deref'ed tree the params partition is empty and update_refs writes
    # nothing -- but the whole pipeline still runs.
    w = jnp.array([1.0, 2.0])
    r1 = refx.Ref(w, collection="params")
    r2 = refx.Ref(jnp.array(0.5), collection="batch_stats")
    pytree = {'a': [r1, r1, r2], 'b': r2}

    def by_collection(c):
        return lambda x: isinstance(x, refx.Ref) and x.collection == c

    (params, rest), _ = refx.tree_partition(refx.deref(pytree), by_collection("params"))
    assert all(v is refx.NOTHING for v in params.values())
    with pytest.raises(ValueError, match="update_refs: at .*target has a Ref but source has NOTHING"):
        # the target partition (Refs) holds r1 where the source has NOTHING
        refx.update_refs(refx.get_partition(pytree, by_collection("params")), params)
    assert r1.value is w
