"""RefField (issue 13, optional): a class attribute backed by a Ref, so
module code writes ``self.count += 1``; in plain classes and dataclasses,
with pytree registrations that flatten ``vars(obj)``."""

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx


class Module:
    """A pytree node whose children are its instance attributes (vars), as
    a Module that flattens vars(obj): the Refs of RefFields are its leaves."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls,
            lambda m: ([(jax.tree_util.GetAttrKey(k), v) for k, v in vars(m).items()],
                       tuple(vars(m))),
            cls._unflatten,
            lambda m: (list(vars(m).values()), tuple(vars(m))))

    @classmethod
    def _unflatten(cls, names, children):
        m = object.__new__(cls)
        m.__dict__.update(zip(names, children, strict=True))
        return m


class Counter(Module):
    count = refx.RefField("state", default=0)
    w = refx.RefField("params", sharding=("model",))

    def __init__(self, n):
        self.w = jnp.ones(n)
        self.count = jnp.array(0)  # a plain class sets its fields (default= is for dataclasses)

    def __call__(self, x):
        self.count += 1
        return x @ self.w


@dataclasses.dataclass
class Linear(Module):
    w: refx.RefField = refx.RefField("params")
    b: refx.RefField = refx.RefField("params", default=0.0)


def test_reads_and_writes_go_through_the_ref():
    c = Counter(3)
    ref = vars(c)["count"]
    assert isinstance(ref, refx.Ref) and ref.collection == "state" and c.count == 0
    c.count += 1
    assert c.count == 1 and vars(c)["count"] is ref and ref.value == 1
    assert dict(vars(c)["w"].metadata) == {"sharding": ("model",)}
    part = refx.get_partition(c, "state")
    assert part[("count",)] is ref


def test_module_code_under_refx_jit():
    c = Counter(3)

    @refx.jit
    def step(m, x):
        return m(x)

    for i in range(3):
        out = step(c, jnp.ones(3))
        assert float(out) == 3.0 and c.count == i + 1
    assert step._cache_size() == 1
    # refx.grad differentiates the params Ref behind the field
    g = refx.grad(lambda m, x: m(x))(c, jnp.arange(3.0))
    assert np.array_equal(g[("w",)].value, np.arange(3.0)) and c.count == 4


def test_dataclass_defaults_and_required_fields():
    lin = Linear(w=jnp.ones(2))
    assert lin.b == 0.0 and isinstance(vars(lin)["b"], refx.Ref)
    assert np.array_equal(lin.w, np.ones(2))
    assert repr(lin).startswith("Linear(w=Array([1., 1.]")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'w'"):
        Linear()
    assert Linear.b == 0.0  # class access gives the default
    with pytest.raises(AttributeError, match="RefField Linear.w has no default"):
        Linear.w


def test_binding_a_ref_shares_it_and_a_second_ref_is_refused():
    r = refx.Ref(jnp.zeros(2), "params")
    a, b = Linear(w=r), Linear(w=r)
    assert vars(a)["w"] is r is vars(b)["w"]
    a.w = jnp.ones(2)
    assert np.array_equal(b.w, np.ones(2))
    a.w = r  # the same Ref: nothing happens
    with pytest.raises(ValueError, match=r"RefField Linear.w: this Linear already holds a Ref here; assigning a Ref would replace it"):
        a.w = refx.Ref(jnp.zeros(2))


def test_deref_reref_clone_and_pickle_keep_the_field():
    c = Counter(2)
    c.count = 5
    d = refx.deref(c)
    assert isinstance(d.count, refx.Value) and d.count.value == 5  # a deref'ed object
    back = refx.reref(d)
    assert type(back) is Counter and back.count == 5 and vars(back)["count"] is not vars(c)["count"]
    back.count += 1
    assert back.count == 6 and c.count == 5
    assert refx.clone(c).count == 5
    p = pickle.loads(pickle.dumps(c))
    assert p.count == 5 and isinstance(vars(p)["count"], refx.Ref)


def test_errors():
    class Slotted:
        __slots__ = ()
        x = refx.RefField()

    with pytest.raises(TypeError, match="RefField .*Slotted.x: Slotted objects have no __dict__"):
        Slotted().x = 1
    c = Counter(2)
    with pytest.raises(AttributeError, match="cannot be deleted"):
        del c.count
    with pytest.raises(AttributeError, match=r"RefField .*Unset.x is not set on this Unset \(assign a value first\)"):
        class Unset:
            x = refx.RefField()

        Unset().x
    with pytest.raises(TypeError, match="must be hashable"):
        refx.RefField([])
    with pytest.raises(TypeError, match="sharding must be a tuple"):
        refx.RefField(sharding="model")
    # a write from another trace is the usual trace-level error
    with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level"):
        jax.jit(lambda x: setattr(c, "count", x))(1)
    assert c.count == 0
    assert repr(Counter.__dict__["w"]) == "RefField('params', sharding=('model',))"
