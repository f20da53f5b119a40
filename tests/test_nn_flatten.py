"""refx.nn.Module's pytree flatten (C, refx/nnmodule.c) against the Python
flatten it replaced (tests/oracle.py, make_module_flatten): the same
children, the same aux data, the same errors, on fixed and generated
modules; refx.jit's retrace/hit behaviour on changed statics; mutation
under the flatten, threads, and references."""

import collections
import enum
import functools
import gc
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import make_module_flatten

import refx
import refx.nn as nn
from refx.nn import _module

ORACLE = make_module_flatten(_module)
_NT = collections.namedtuple("_NT", "a b")
FLATTENS = ((_module._flatten, ORACLE.flatten), (_module._flatten_with_keys, ORACLE.flatten_with_keys))


class Plain(nn.Module):
    """A module whose attributes the tests set directly (vars(m)[k] = v)."""

    def __init__(self, **attrs):
        vars(self).update(attrs)


def _same_static(a, b):
    """The same object, or (a _Frozen) an equal one around the same value."""
    if type(b) is _module._Frozen:
        return type(a) is _module._Frozen and a.value is b.value and a == b
    return a is b


def assert_same_flatten(m):
    """Each C flatten returns what its Python oracle returns (the same
    objects), or raises the same exception type."""
    for c_flatten, py_flatten in FLATTENS:
        keys = c_flatten is _module._flatten_with_keys
        try:
            want = py_flatten(m)
        except Exception as e:  # noqa: BLE001 - compared below
            with pytest.raises(type(e)):
                c_flatten(m)
            continue
        got = c_flatten(m)
        assert type(got) is tuple and len(got) == 2
        children, aux = got
        assert type(children) is list and type(aux) is tuple
        assert len(children) == len(want[0]) and len(aux) == len(want[1])
        for a, b in zip(children, want[0], strict=True):
            if keys:
                assert type(a) is tuple and len(a) == 2 and a[0] == b[0] and a[1] is b[1], (a, b)
            else:
                assert a is b, (a, b)
        for a, b in zip(aux, want[1], strict=True):
            assert type(a) is tuple and len(a) == len(b), (a, b)
            assert a[0] is b[0] and _same_static(a[-1], b[-1]), (a, b)
            assert a[1:-1] == b[1:-1] and all(x is y for x, y in zip(a[1:-1], b[1:-1], strict=True)), (a, b)
        assert aux == want[1]
        try:
            h = hash(want[1])
        except TypeError:
            with pytest.raises(TypeError):
                hash(aux)
        else:
            assert hash(aux) == h


def fn(x):
    return x


Pair = collections.namedtuple("Pair", "a b")


class Registered:
    """A custom pytree node: _is_state looks inside with tree_leaves."""

    def __init__(self, *xs):
        self.xs = xs


jax.tree_util.register_pytree_node(Registered, lambda r: (r.xs, None), lambda _, xs: Registered(*xs))


class Opaque:
    """A leaf type no cache knows yet (a fresh class per test)."""


class EqMeta(type):
    """A metaclass comparing its classes its own way: a type cache's answer
    for them may change, so the C flatten keeps none."""

    def __eq__(cls, other):
        return isinstance(other, EqMeta) and cls.__name__ == other.__name__

    def __hash__(cls):
        return hash(cls.__name__)


class OddlyTyped(metaclass=EqMeta):
    pass


def values():
    """Attribute values of every kind, static and state."""
    r = refx.Ref(jnp.ones(2), "params")
    return [
        # statics
        3, 2.5, True, None, "relu", b"x", 1j, int, jnp.float32, np.dtype("float32"), fn, jax.nn.relu,
        functools.partial(fn), (1, 2), ("a", (1, None)), (), [], {}, [1, 2], {"a": [1]}, [[1], (2,)],
        Pair(1, 2), collections.OrderedDict(a=1), Opaque(), Registered(1, "a"), frozenset({1}),
        OddlyTyped(), OddlyTyped, EqMeta,
        # state
        r, nn.Param(jnp.zeros(3)), refx.NOTHING, np.ones(2), jnp.ones(2), refx.Value(1.0, 0, "c"),
        refx.Index(0, "c"), [r], (1, r), {"w": r}, [[1, {"x": (r,)}]], Pair(1, r),
        collections.OrderedDict(w=r), Registered(r), Plain(a=1), [Plain(b=r)],
    ]


def test_every_kind_of_value_alone_and_together():
    vals = values()
    for i, v in enumerate(vals):
        assert_same_flatten(Plain(x=v))
        assert_same_flatten(Plain(a=1, x=v, z=[2]))
        assert _module._flatten.is_state(v) == _module._is_state(v), (i, v)
    assert_same_flatten(Plain(**{f"a{i}": v for i, v in enumerate(vals)}))


def test_the_layers_of_refx_nn():
    optax = pytest.importorskip("optax")
    rngs = nn.Rngs(0, dropout=1)
    mlp = nn.Sequential(nn.Linear(3, 4, rngs=rngs), nn.BatchNorm(4, rngs=rngs), nn.relu,
                        nn.Dropout(0.1, rngs=rngs), nn.LayerNorm(4, rngs=rngs), nn.Linear(4, 2, rngs=rngs))
    opt = nn.Optimizer(mlp, optax.adam(1e-3), wrt=nn.Param)
    tops = [mlp, opt, rngs, nn.Conv(1, 2, (3, 3), rngs=rngs), nn.Embed(5, 3, rngs=rngs),
            nn.MultiHeadAttention(2, 4, rngs=rngs, decode=False), nn.LSTMCell(2, 3, rngs=rngs),
            nn.GRUCell(2, 3, rngs=rngs), nn.GroupNorm(4, num_groups=2, rngs=rngs), nn.RMSNorm(4, rngs=rngs)]
    for top in tops:
        for mode in (top.train, top.eval):
            mode()
            for _, sub in top.iter_modules():
                assert_same_flatten(sub)


def test_forced_children_after_unflatten_with_placeholders():
    r = refx.Ref(jnp.ones(2))
    m = Plain(w=r, ws=[r, 3], n=4, cfg=[1, 2], sub=Plain(b=nn.Param(jnp.ones(1)), k=1))
    leaves, td = jax.tree_util.tree_flatten(m)
    nones = jax.tree_util.tree_map(lambda _: None, m)
    assert _module._MARK in vars(nones) and vars(nones)[_module._MARK] == {"w", "ws", "sub"}
    assert_same_flatten(nones)
    assert_same_flatten(nones.sub)
    # the placeholders stay children: the same structure, leaves None
    assert jax.tree_util.tree_structure(nones, is_leaf=lambda x: x is None) == td
    assert _module._flatten(nones)[0] == [None, [None, None], vars(nones)["sub"]]
    # a forced child whose value is now an unhashable static stays a child
    vars(nones)["ws"] = [1, 2]
    assert_same_flatten(nones)
    again = jax.tree_util.tree_unflatten(td, leaves)
    assert_same_flatten(again)
    assert jax.tree_util.tree_structure(again) == td
    # a mark naming an attribute that is gone, and one that is not a set
    vars(again)[_module._MARK] = frozenset({"gone", "n"})
    assert_same_flatten(again)
    vars(again)[_module._MARK] = ("n",)
    assert_same_flatten(again)
    vars(again)[_module._MARK] = 5  # `k in 5`: the same TypeError
    assert_same_flatten(again)


# -- generated modules ---------------------------------------------------------

names = st.one_of(st.sampled_from(["w", "b", "rate", "deterministic", "layers", "cfg", "_x", "k"]),
                  st.text(min_size=0, max_size=6))
atoms = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=4),
                  st.just(refx.NOTHING), st.sampled_from([int, jnp.float32, np.dtype("int8"), fn, jax.nn.relu]))


@st.composite
def leaves_(draw):
    kind = draw(st.sampled_from(["atom", "ref", "param", "array", "value", "index", "module", "opaque"]))
    if kind == "atom":
        return draw(atoms)
    if kind == "ref":
        return refx.Ref(draw(st.integers(0, 3)), draw(st.sampled_from(["params", "stats", None])))
    if kind == "param":
        return nn.Param(jnp.zeros(draw(st.integers(0, 2))))
    if kind == "array":
        return np.zeros(draw(st.integers(0, 2)))
    if kind == "value":
        return refx.Value(1.0, draw(st.integers(0, 3)), "c")
    if kind == "index":
        return refx.Index(draw(st.integers(0, 3)), "c")
    if kind == "module":
        return Plain(**draw(st.dictionaries(names, atoms, max_size=2)))
    return Opaque()


attr_values = st.recursive(
    leaves_(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.tuples(inner, inner).map(lambda t: Pair(*t)),
        st.lists(inner, max_size=2).map(lambda xs: Registered(*xs)),
        st.dictionaries(st.text(max_size=3), inner, max_size=2).map(collections.OrderedDict),
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(names, attr_values), max_size=8), st.booleans())
def test_generated_modules(attrs, nested):
    m = Plain()
    for k, v in attrs:
        vars(m)[k] = v
    if nested:
        m = Plain(inner=m, n=len(attrs))
    assert_same_flatten(m)
    for _, v in attrs:
        assert _module._flatten.is_state(v) == ORACLE.is_state(v)
    # and again after an unflatten, with leaves and with placeholders
    leaves, td = jax.tree_util.tree_flatten(m)
    again = jax.tree_util.tree_unflatten(td, leaves)
    assert_same_flatten(again)
    assert jax.tree_util.tree_structure(again) == td
    nones = jax.tree_util.tree_map(lambda _: None, m)
    assert_same_flatten(nones)
    for _, sub in nones.iter_modules():
        assert_same_flatten(sub)


# -- refx.jit's cache key --------------------------------------------------------


def test_refx_jit_retraces_on_a_changed_static_and_hits_on_an_equal_one():
    traces = []

    @refx.jit
    def f(m, x):
        traces.append(1)
        return m.w.value * x

    m = Plain(w=nn.Param(jnp.ones(2)), rate=0.5, flag=True, sizes=[1, 2], act=fn)
    x = jnp.ones(2)
    f(m, x)
    f(m, x)
    assert len(traces) == 1
    vars(m)["rate"] = float("0.5")  # an equal float: a hit
    vars(m)["sizes"] = [1, 2]  # an equal unhashable list (a new object): a hit
    f(m, x)
    assert len(traces) == 1
    for change, expect in ((lambda: vars(m).__setitem__("flag", False), 2),
                           (lambda: vars(m).__setitem__("flag", False), 2),
                           (lambda: vars(m).__setitem__("sizes", [1, 3]), 3),
                           (lambda: vars(m).__setitem__("act", jax.nn.relu), 4),
                           (lambda: vars(m).__setitem__("act", fn), 4),  # seen before: cached
                           (lambda: vars(m).__setitem__("rate", nn.Param(jnp.ones(()))), 5),  # static -> Ref
                           (lambda: m.set_attributes(flag=True), 6)):
        change()
        f(m, x)
        f(m, x)
        assert len(traces) == expect


class _Mode(enum.StrEnum):
    fast = "fast"


@pytest.mark.parametrize("old, new", [(2, 2.0), (1, True), (0.0, 0), ("fast", _Mode.fast), ((1, 2), _NT(1, 2))],
                         ids=["int-float", "int-bool", "float-int", "str-strenum", "tuple-namedtuple"])
def test_a_static_changed_to_an_equal_value_of_another_type_retraces(old, new):
    """2 == 2.0, but a trace made for one is wrong for the other (an int32
    array where float32 is due): statics are keyed with their type, as
    static arguments are, in refx.jit, the eager transforms and jax.jit of
    a Dag."""
    assert old == new and type(old) is not type(new)

    def out(m):  # an array that tells the types apart
        v = m.v
        if isinstance(v, tuple):
            return jnp.asarray(v[0]) + (10 if hasattr(v, "_fields") else 0)
        if isinstance(v, str):
            return jnp.asarray(1 if isinstance(v, _Mode) else 0)
        return jnp.asarray(v)

    j = refx.jit(lambda m: (out(m), refx.Static(type(m.v))))
    dag = jax.jit(lambda d: out(d.tree))
    runs = {
        "refx.jit": lambda m: j(m)[0],
        "refx.scan": lambda m: refx.scan(lambda c, _: (c, out(c)), m, None, length=1)[1][0],
        "refx.cond": lambda m: refx.cond(True, out, out, m),
        "jax.jit of a Dag": lambda m: dag(refx.Dag(m)),
    }
    for name, run in runs.items():
        for v in (old, new, old):
            m = Plain(w=nn.Param(jnp.ones(())), v=v)
            want = out(m)
            got = run(m)
            assert got.dtype == want.dtype and got == want, (name, v, got, want)
    # and the trace sees the new value's own type
    for v in (old, new):
        assert j(Plain(w=nn.Param(jnp.ones(())), v=v))[1].value is type(v)


@pytest.mark.parametrize("change", ["set", "bytearray"])
def test_a_set_or_bytearray_static_changed_in_place_retraces(change):
    v = {1} if change == "set" else bytearray(b"a")
    m = Plain(w=nn.Param(jnp.ones(())), v=v)
    f = refx.jit(lambda m: m.w.value * len(m.v))
    assert float(f(m)) == 1.0
    v.add(2) if change == "set" else v.extend(b"b")
    assert float(f(m)) == 2.0


def test_a_numpy_scalar_static_replaced_by_a_tuple_retraces():
    """The type is compared before the value: np.int32(2) == (1, 2) is an
    array whose truth raises, and must not be asked."""
    m = Plain(w=nn.Param(jnp.ones(())), s=np.int32(2))
    f = refx.jit(lambda m: m.w.value * (m.s if not isinstance(m.s, tuple) else sum(m.s)))
    assert float(f(m)) == 2.0
    vars(m)["s"] = (1, 2)
    assert float(f(m)) == 3.0


def test_train_eval_through_refx_jit():
    rngs = nn.Rngs(0)
    m = Plain(l=nn.Linear(2, 2, rngs=rngs), bn=nn.BatchNorm(2, rngs=rngs), drop=nn.Dropout(0.5, rngs=rngs))
    traces = []

    @refx.jit
    def f(m, x):
        traces.append(1)
        return m.drop(m.bn(m.l(x)))

    x = jnp.ones((3, 2))
    for mode, n in ((m.train, 1), (m.train, 1), (m.eval, 2), (m.eval, 2), (m.train, 2)):
        mode()
        f(m, x)
        assert len(traces) == n
        assert_same_flatten(m.drop)


# -- hostile values ----------------------------------------------------------------


class Mutating:
    """A static whose __hash__ runs `action` (once)."""

    def __init__(self, action):
        self.action = action

    def __hash__(self):
        action, self.action = self.action, None
        if action is not None:
            action()
        return 1

    def __eq__(self, other):
        return self is other


@pytest.mark.parametrize("what", ["add", "delete", "replace", "delete+add", "clear"])
def test_a_hash_that_mutates_the_module_under_the_flatten(what):
    for c_flatten, py_flatten in FLATTENS:
        results = []
        for flatten in (py_flatten, c_flatten):
            m = Plain()
            d = vars(m)
            actions = {
                "add": lambda d=d: d.__setitem__("new", 1),
                "delete": lambda d=d: d.pop("z"),
                "replace": lambda d=d: d.__setitem__("z", refx.Ref(1)),
                "delete+add": lambda d=d: (d.pop("z"), d.__setitem__("new", 1)),
                "clear": lambda d=d: d.clear(),
            }
            d.update(a=1, h=Mutating(actions[what]), z=2, w=refx.Ref(2))
            try:
                children, aux = flatten(m)
                results.append(("ok", [type(c) for c in children], [(e[0], type(e[-1])) for e in aux]))
            except RuntimeError as e:
                results.append(("raised", str(e)))
        assert results[0] == results[1], (what, results)


def test_a_hash_that_mutates_a_dict_attribute_under_the_flatten():
    for c_flatten, py_flatten in FLATTENS:
        for flatten in (py_flatten, c_flatten):
            inner = {}

            class Leaf:
                pass

            jax.tree_util.register_pytree_node(
                Leaf, lambda x, inner=inner: (inner.__setitem__(len(inner), 1) or (), None), lambda _, __: Leaf())
            inner.update(a=Leaf(), b=2)
            with pytest.raises(RuntimeError, match="changed size"):
                flatten(Plain(cfg=inner))


def test_hash_errors_and_unhashable_statics():
    class BadHash:
        def __hash__(self):
            raise ValueError("no")

    class TypeErrorHash:
        def __hash__(self):
            raise TypeError("unhashable here")

    class WeirdHash:
        def __hash__(self):
            return "not an int"  # hash() raises TypeError: unhashable

    for v in (BadHash(), TypeErrorHash(), WeirdHash(), [1, {"a": [2]}], {"x": {1, 2}}, Pair([1], 2)):
        assert_same_flatten(Plain(a=1, v=v))
    with pytest.raises(ValueError, match="no"):
        _module._flatten(Plain(v=BadHash()))
    aux = _module._flatten(Plain(v=[1, 2]))[1]
    assert type(aux[0][-1]) is _module._Frozen and aux == _module._flatten(Plain(v=[1, 2]))[1]


def test_odd_modules():
    class WithGetattribute(nn.Module):
        def __getattribute__(self, name):
            return object.__getattribute__(self, name)

    class WithSlotsToo(nn.Module):
        __slots__ = ("s",)

    class DictSubclass(dict):
        pass

    a = WithGetattribute()
    vars(a).update(w=refx.Ref(1), n=2)
    b = WithSlotsToo()
    b.s = refx.Ref(1)  # a slot: not in vars(), so not a child (as before)
    vars(b)["n"] = 3
    for m in (a, b, Plain(), Plain(**{_module._MARK: frozenset()})):
        assert_same_flatten(m)
    c = Plain(w=refx.Ref(1))
    vars(c)[1] = refx.Ref(2)  # a key that is not a str
    vars(c)[("t",)] = 3
    with pytest.raises(TypeError):  # GetAttrKey(1), in both
        ORACLE.flatten_with_keys(c)
    with pytest.raises(TypeError):
        _module._flatten_with_keys(c)
    assert_same_flatten(c)
    # vars() that is not a dict: the one case the C flatten refuses outright
    d = Plain()
    d.__dict__ = DictSubclass(w=refx.Ref(1))
    with pytest.raises(TypeError, match="not a dict"):
        _module._flatten(d)
    with pytest.raises(TypeError, match="one argument"):
        _module._flatten()
    with pytest.raises(TypeError, match="one argument"):
        _module._flatten(c, c)
    with pytest.raises(AttributeError):
        _module._flatten(3)


def test_deep_nesting_is_a_recursion_error_not_a_crash():
    deep = [refx.Ref(1)]
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        _module._flatten(Plain(x=deep))
    static = [1]
    for _ in range(100_000):
        static = [static]
    with pytest.raises(RecursionError):
        _module._flatten(Plain(x=static))


def test_no_python_code_sees_a_half_built_result():
    seen = []

    class Peek:
        def __hash__(self):
            # every list and tuple alive, read item by item
            for o in gc.get_objects():
                if type(o) in (list, tuple):
                    seen.append(len(list(o)))
            return 1

    m = Plain(**{f"w{i}": refx.Ref(i) for i in range(30)}, p=Peek(), **{f"s{i}": i for i in range(30)})
    assert_same_flatten(m)
    assert seen


def test_threads_flatten_while_flags_flip():
    rngs = nn.Rngs(0)
    m = Plain(layers=[nn.Linear(2, 2, rngs=rngs) for _ in range(4)], drop=nn.Dropout(0.5, rngs=rngs))
    td_train = jax.tree_util.tree_structure(m)
    m.eval()
    td_eval = jax.tree_util.tree_structure(m)
    assert td_train != td_eval
    errors = []
    stop = threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def flatten():
        try:
            while not stop.is_set():
                td = jax.tree_util.tree_structure(m)
                if td not in (td_train, td_eval):  # each submodule read whole
                    # (a flip between two submodules' flattens mixes modes)
                    assert td.num_leaves == td_train.num_leaves
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def flip():
        try:
            for i in range(300):
                (m.train if i % 2 else m.eval)()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=flatten) for _ in range(3)] + [threading.Thread(target=flip)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors


def test_references_do_not_drift():
    r, arr, static, name = refx.Ref(jnp.ones(2)), np.ones(3), (fn, 3.5), "attr-" + str(id(fn))
    unhashable = [1, 2]
    m = Plain(w=r, a=arr, s=static, u=unhashable, sub=Plain(w=r))
    vars(m)[name] = 7
    nones = jax.tree_util.tree_map(lambda _: None, m)
    objs = [r, arr, static, unhashable, name, m, nones, vars(m), _module._CHILD]
    for _ in range(100):  # warm: caches, kept pairs
        _module._flatten(m), _module._flatten_with_keys(m), _module._flatten(nones)
    gc.collect()
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(2000):
        jax.tree_util.tree_flatten(m)
        jax.tree_util.tree_flatten_with_path(m)
        jax.tree_util.tree_flatten(nones)
        _module._flatten(m)
        try:
            _module._flatten(Plain(w=r, h=Mutating(lambda: vars(m).__setitem__("x", 1))))
        except RuntimeError:
            pass
        vars(m).pop("x", None)
    gc.collect()
    assert [sys.getrefcount(o) for o in objs] == before


def test_a_module_is_collected_after_it_is_flattened():
    import weakref

    class Big:
        pass

    big = Big()
    m = Plain(w=refx.Ref(1), big=big, n=3, f=fn)
    jax.tree_util.tree_flatten(m)
    wm, wb = weakref.ref(m), weakref.ref(big)
    del m, big
    gc.collect()
    assert wm() is None and wb() is None  # the flatten keeps neither
