"""refx.jit's argument flatten memo (src/refx/flatmemo.c).

Each JitFunction keeps a memo of its last argument flatten and walks the
next call's arguments against it instead of asking jaxlib again.  The
promise: the leaves and treedef are always exactly jaxlib's (the same leaf
objects in the same order, an equal treedef), whatever changed in between.
The oracle is jax.tree_util.tree_flatten itself, after every mutation of a
tree the memo has seen: keys added, removed and reordered, keys that are
equal but not the same object, leaves whose type changes, containers
swapped for others, Module attributes changed, types registered as pytree
nodes after the memo was made, dict keys whose __eq__ mutates the dict.
"""

from __future__ import annotations

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refx
import refx.nn as nn
from refx import _core


def check(box, tree):
    """The memo flatten of `tree` equals jaxlib's; returns whether it hit."""
    leaves, td, hit = _core._memo_flatten(box, tree)
    leaves2, td2 = jax.tree_util.tree_flatten(tree)
    assert td == td2, (td, td2)
    assert len(leaves) == len(leaves2)
    for a, b in zip(leaves, leaves2, strict=True):
        assert a is b
    return hit


class Block(nn.Module):
    def __init__(self, rate=0.5):
        self.w = nn.Param(jnp.ones(2))
        self.rate = rate
        self.items = [nn.Param(jnp.zeros(1))]


# ------------------------------------------------------------ the basics


def test_second_call_hits_and_agrees():
    box = [None]
    tree = ({"b": [refx.Ref(jnp.ones(2)), None, 1.0], "a": refx.Ref(jnp.zeros(3))}, Block())
    assert not check(box, tree)
    assert check(box, tree)
    assert check(box, tree)


@pytest.mark.parametrize("mutate", [
    lambda t: t[0].__setitem__("c", 1),
    lambda t: t[0].pop("a"),
    lambda t: t[0]["b"].append(2.0),
    lambda t: t[0]["b"].pop(),
    lambda t: t[0]["b"].__setitem__(1, 0.0),           # None -> a leaf
    lambda t: t[0]["b"].__setitem__(2, None),          # a leaf -> None
    lambda t: t[0]["b"].__setitem__(2, (1.0,)),        # a leaf -> a node
    lambda t: t[0]["b"].__setitem__(0, np.ones(2)),    # a leaf of another type
    lambda t: t[0].__setitem__("b", tuple(t[0]["b"])),  # list -> tuple
    lambda t: t[0].__setitem__("b", collections.OrderedDict(x=1)),
    lambda t: setattr(t[1], "rate", 0.25),             # aux data
    lambda t: setattr(t[1], "extra", nn.Param(jnp.ones(1))),  # a new child
    lambda t: t[1].items.append(nn.Param(jnp.ones(1))),
    lambda t: delattr(t[1], "w"),
    lambda t: t[1].train(),
])
def test_every_change_is_seen(mutate):
    box = [None]
    tree = ({"b": [refx.Ref(jnp.ones(2)), None, 1.0], "a": refx.Ref(jnp.zeros(3))}, Block())
    check(box, tree)
    assert check(box, tree)
    mutate(tree)
    check(box, tree)
    check(box, tree)


def test_key_order_and_equal_keys():
    box = [None]
    d = {"b": 1.0, "a": 2.0, "c": 3.0}
    check(box, (d,))
    # delete and reinsert: another insertion order, the same sorted order
    v = d.pop("a")
    d["a"] = v
    assert check(box, (d,))
    # an equal key that is another object
    k = "".join(["c"])
    v = d.pop("c")
    d[k] = v
    assert check(box, (d,))
    # a key of a str subclass: not memoized, still agrees
    class S(str):
        pass

    d[S("z")] = 4.0
    check(box, (d,))
    check(box, (d,))


def test_same_key_set_other_keys():
    box = [None]
    check(box, ({"a": 1.0, "b": 2.0},))
    assert not check(box, ({"a": 1.0, "c": 2.0},))  # same size, another key


def test_non_str_keys_are_left_to_jaxlib():
    box = [None]
    for _ in range(3):
        assert not check(box, ({1: 1.0, 2: 2.0, 10: 3.0},))
    for _ in range(3):
        assert not check(box, ({("a", 1): "x", ("b", 0): "y"},))


def test_node_kinds_not_memoized_still_agree():
    trees = [
        (collections.OrderedDict(b=1, a=2),),
        (collections.defaultdict(list, a=[1]),),
        (refx.deref({"a": refx.Ref(1.0)}),),
        (refx.Static(3),),
        (refx.get_partition({"a": refx.Ref(1.0)}, ...),),
    ]
    for t in trees:
        box = [None]
        for _ in range(3):
            assert not check(box, t)


def test_namedtuples():
    P = collections.namedtuple("P", "a b")
    Q = collections.namedtuple("Q", "a b")  # same fields, another type
    box = [None]
    t = (P(1.0, [refx.Ref(1.0)]),)
    check(box, t)
    assert check(box, t)
    assert check(box, (P(2.0, [refx.Ref(2.0)]),))  # another instance
    assert not check(box, (Q(1.0, [refx.Ref(1.0)]),))
    assert not check(box, ((1.0, [refx.Ref(1.0)]),))  # a plain tuple
    assert not check(box, (P(1.0, (refx.Ref(1.0),)),))

    class Sub(tuple):  # without _fields: a leaf for jaxlib, until it has one
        pass

    box = [None]
    for _ in range(3):  # never memoized: jaxlib asks it for _fields each time
        assert not check(box, (Sub((1, 2)),))
    check(box, (P(1, 2),))


def test_fields_is_asked_on_every_call():
    """jaxlib makes a tuple subclass a namedtuple node when hasattr(o,
    "_fields"), asked of each object on each flatten (hostile review)."""
    class T(tuple):
        pass

    a = T((1, 2))  # a leaf
    b = T((1, 2))
    b._fields = ("x", "y")  # a namedtuple node
    for first, second in ((a, b), (b, a)):
        box = [None]
        check(box, [first])
        check(box, [second])
        check(box, [second])

    class U(tuple):
        pass

    u = U((1, 2))
    box = [None]
    check(box, [u])
    U._fields = ("x", "y")  # the class gains _fields
    check(box, [u])
    check(box, [u])

    class Row(tuple):
        _fields = ("x", "y")

        def __new__(cls, *vals):
            return tuple.__new__(cls, vals)

    body = lambda r: r[0].value + 10 * r[1].value  # noqa: E731
    r = Row(refx.Ref(jnp.float32(1)), refx.Ref(jnp.float32(2)))
    f = refx.jit(body)
    assert float(f(r)) == 21.0
    assert float(f(r)) == 21.0
    del Row._fields  # now a leaf JAX cannot take, as for a fresh refx.jit
    with pytest.raises(TypeError):
        f(r)


def test_tuple_subclass_node_registered_on_jaxlibs_registry():
    """A node registered on jax.tree_util.default_registry directly is not in
    JAX's registry dict; a tuple subclass so registered, flattening its items
    in another order, must not be taken for a namedtuple."""
    class Pair(tuple):
        pass

    jax.tree_util.default_registry.register_node(
        Pair, lambda p: ((p[1], p[0]), None), lambda aux, c: Pair((c[1], c[0])))
    p = Pair((refx.Ref(1.0), refx.Ref(2.0)))
    box = [None]
    for _ in range(3):
        check(box, p)
    body = lambda p: p[0].value * 10 + p[1].value  # noqa: E731
    f = refx.jit(body)
    assert [float(f(p)) for _ in range(3)] == [12.0] * 3


def test_the_collector_never_sees_a_half_filled_leaf_list():
    """Python code run by the walk (a static's __eq__) lists every object
    the collector tracks; the walk's leaf list, not yet filled, must not be
    among them (it was: a segfault, hostile review)."""
    import gc

    n = 7
    seen = []

    class Peek:
        armed = False

        def __eq__(self, o):
            if Peek.armed:
                Peek.armed = False
                for obj in gc.get_objects():
                    if type(obj) is list and len(obj) == n:
                        seen.append([type(x).__name__ for x in obj])
            return isinstance(o, Peek)

        __hash__ = object.__hash__

    class M(nn.Module):
        def __init__(self):
            self.cfg = Peek()
            self.ws = [nn.Param(jnp.float32(i)) for i in range(n - 1)]

    m = M()
    tree = (refx.Ref(1.0), m)
    box = [None]
    _core._memo_flatten(box, tree)
    m.cfg = Peek()  # equal, not identical: the aux comparison calls __eq__
    Peek.armed = True
    assert _core._memo_flatten(box, tree)[2]
    assert not Peek.armed


def test_registering_a_leaf_type_drops_the_memo():
    class Late:
        pass

    box = [None]
    x = Late()
    tree = ([x, 1.0],)
    check(box, tree)
    assert check(box, tree)
    jax.tree_util.register_pytree_node(Late, lambda o: ((2.0,), None), lambda a, c: Late())
    assert not check(box, tree)  # now a node with a child: jaxlib's answer
    assert jax.tree_util.tree_leaves(tree) == [2.0, 1.0]


def test_module_without_refx_rule_is_a_leaf():
    class Unregistered(nn.Module):
        pass

    # a subclass whose __init_subclass__ skips refx's registration
    class Quiet(nn.Module):
        def __init_subclass__(cls, **kw):
            pass

    class Leafy(Quiet):
        def __init__(self):
            self.w = nn.Param(jnp.ones(1))

    box = [None]
    tree = (Leafy(), Unregistered())
    for _ in range(3):
        check(box, tree)


def test_dict_keys_that_are_not_exact_str():
    """A key equal to (and hashing like) the memo's key is still another key:
    a str subclass (StrEnum, np.str_), a key ordering itself backwards, a
    non-str key whose __eq__ says yes to everything and empties the dict."""
    import enum

    class S(str):
        pass

    class E(enum.StrEnum):
        A = "a"

    class Rev(str):
        def __lt__(self, o):
            return str.__gt__(self, o)

        def __gt__(self, o):
            return str.__lt__(self, o)

        __hash__ = str.__hash__

    for key in (S("a"), E.A, np.str_("a"), Rev("a")):
        box = [None]
        check(box, ({"a": 1.0, "b": 2.0},))
        other = {key: 1.0, (Rev("b") if type(key) is Rev else "b"): 2.0}
        assert not check(box, (other,))  # jaxlib's answer: its own keys
        check(box, (other,))

    class Evil:
        def __init__(self):
            self.d = None

        def __hash__(self):
            return hash("a")

        def __eq__(self, other):
            if self.d is not None:
                self.d.clear()
            return True

    box = [None]
    check(box, ({"a": 1.0, "b": 2.0},))
    e = Evil()
    d2 = {e: 1.0, "b": 2.0}
    e.d = d2
    with pytest.raises(ValueError):  # jaxlib cannot sort an Evil and a str
        _core._memo_flatten(box, (d2,))
    with pytest.raises(ValueError):
        jax.tree_util.tree_flatten((d2,))


def test_memo_is_made_from_jaxlibs_treedef_not_a_second_walk():
    """Python code run by jaxlib's flatten (a static's __hash__) changes a
    module jaxlib has already passed: the memo must describe what the
    treedef says, so the next call (in the new state) misses."""
    class Drop(nn.Module):
        def __init__(self):
            self.w = nn.Param(jnp.ones(3))
            self.deterministic = False

    class Hook:
        armed, target = False, None

        def __hash__(self):
            if Hook.armed:
                Hook.armed = False
                Hook.target.deterministic = True
            return 0

        def __eq__(self, o):
            return isinstance(o, Hook)

    class Other(nn.Module):
        def __init__(self):
            self.v = nn.Param(jnp.zeros(2))
            self.cfg = Hook()

    body = lambda d, o, x: x * 0 + (1.0 if d.deterministic else 0.0)  # noqa: E731
    f = refx.jit(body)
    a, b = Drop(), Other()
    Hook.target, Hook.armed = a, True
    box = [None]
    _core._memo_flatten(box, (a, b))  # the mode flips during jaxlib's flatten
    check(box, (a, b))
    Hook.target, Hook.armed = a, True
    a.deterministic = False
    f(a, b, jnp.ones(1))  # flips during the call's flatten
    for n in (2, 3):  # new shapes retrace: the mode is the current one
        assert a.deterministic
        assert float(f(a, b, jnp.ones(n))[0]) == 1.0


def test_module_flatten_raising_is_jaxlibs_error():
    class Boom(Exception):
        pass

    class BadHash:
        def __hash__(self):
            raise Boom

    m = Block()
    box = [None]
    check(box, (m,))
    vars(m)["h"] = BadHash()
    with pytest.raises(Boom):
        _core._memo_flatten(box, (m,))
    with pytest.raises(Boom):
        jax.tree_util.tree_flatten((m,))


def test_deep_trees():
    box = [None]
    t = 1.0
    for _ in range(300):  # deeper than the memo goes: jaxlib's flatten
        t = [t]
    for _ in range(2):
        assert not check(box, (t,))


def test_self_containing_list_is_jaxlibs_error():
    box = [None]
    a = [1.0]
    check(box, (a,))
    a.append(a)
    with pytest.raises(RecursionError):
        _core._memo_flatten(box, (a,))


# ----------------------------------------------------- property: jaxlib's


LEAVES = st.sampled_from(["ref", "array", "float", "int", "none", "str", "np"])


def make_leaf(kind):
    return {"ref": lambda: refx.Ref(jnp.ones(1)), "array": lambda: jnp.zeros(2),
            "float": lambda: 1.5, "int": lambda: 3, "none": lambda: None,
            "str": lambda: "s", "np": lambda: np.ones(1)}[kind]()


trees = st.recursive(
    LEAVES.map(make_leaf),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), kids, max_size=4),
        st.lists(kids, max_size=3).map(lambda xs: _module_of(xs)),
        st.tuples(kids, kids).map(lambda ab: _NT(*ab)),
    ),
    max_leaves=20,
)


_NT = collections.namedtuple("_NT", "a b")


def _module_of(xs):
    m = nn.Sequential()
    for i, x in enumerate(xs):
        vars(m)[f"k{i}"] = x
    return m


def containers(tree, out):
    if isinstance(tree, list | dict) and type(tree) in (list, dict):
        out.append(tree)
    if isinstance(tree, nn.Module):
        out.append(tree)
        for v in list(vars(tree).values()):
            containers(v, out)
    elif isinstance(tree, dict):
        for v in tree.values():
            containers(v, out)
    elif isinstance(tree, list | tuple):
        for v in tree:
            containers(v, out)
    return out


def mutate(tree, op, which, leaf):
    cs = containers(tree, [])
    if not cs:
        return
    c = cs[which % len(cs)]
    if isinstance(c, nn.Module):
        d = vars(c)
        names = [k for k in d if k.startswith("k")]
        if op == 0 or not names:
            d[f"k{len(d)}"] = leaf
        elif op == 1:
            d.pop(names[which % len(names)])
        elif op == 2:
            d[names[which % len(names)]] = leaf
        else:
            d[names[which % len(names)]] = 0.5  # a static now, maybe
    elif isinstance(c, list):
        if op == 0 or not c:
            c.append(leaf)
        elif op == 1:
            c.pop(which % len(c))
        elif op == 2:
            c[which % len(c)] = leaf
        else:
            c.reverse()
    else:
        keys = list(c)
        if op == 0 or not keys:
            c["abcde"[which % 5] + "x"] = leaf
        elif op == 1:
            c.pop(keys[which % len(keys)])
        elif op == 2:
            c[keys[which % len(keys)]] = leaf
        else:  # reinsert: another insertion order
            k = keys[which % len(keys)]
            c[k] = c.pop(k)


@settings(max_examples=150, deadline=None)
@given(trees, st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), LEAVES), max_size=8))
def test_property_always_jaxlibs_flatten(tree, ops):
    box = [None]
    root = [tree]  # a list root, so the top can change too
    check(box, (root,))
    assert check(box, (root,))  # every tree here is one the memo takes
    for op, which, leaf in ops:
        mutate(root, op, which, make_leaf(leaf))
        check(box, (root,))
        assert check(box, (root,))


# ---------------------------------------------------------- through refx.jit


def test_jit_sees_a_swapped_ref_and_new_keys():
    f = refx.jit(lambda m: sum(r.value for r in jax.tree_util.tree_leaves(m)))
    m = {"a": refx.Ref(jnp.array(1.0)), "b": refx.Ref(jnp.array(2.0))}
    assert float(f(m)) == 3.0
    assert float(f(m)) == 3.0
    m["a"] = refx.Ref(jnp.array(10.0))  # same structure, another Ref
    assert float(f(m)) == 12.0
    m["c"] = refx.Ref(jnp.array(100.0))
    assert float(f(m)) == 112.0
    del m["b"]
    assert float(f(m)) == 110.0


def test_jit_module_mode_flip_retraces():
    drop = nn.Dropout(0.5, rngs=nn.Rngs(0))
    f = refx.jit(lambda d, x: d(x))
    x = jnp.ones(1000)
    drop.eval()
    assert bool(jnp.all(f(drop, x) == x))
    assert bool(jnp.all(f(drop, x) == x))
    drop.train()
    y = f(drop, x)
    assert not bool(jnp.all(y == x))
    drop.eval()
    assert bool(jnp.all(f(drop, x) == x))


def test_jit_memo_threads():
    f = refx.jit(lambda t: sum(jax.tree_util.tree_leaves(t)))
    trees = [({"a": 1.0, "b": 2.0},), ({"a": 1.0, "b": 2.0, "c": 3.0},), ([1.0, 2.0, 3.0, 4.0],)]
    expect = [3.0, 6.0, 10.0]
    for t in trees:
        f(*t)
    errors = []

    def run(i):
        try:
            for k in range(200):
                j = (i + k) % 3
                assert float(f(*trees[j])) == expect[j]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_memo_flatten_argument_errors():
    with pytest.raises(TypeError):
        _core._memo_flatten([], 1)
    with pytest.raises(TypeError):
        _core._memo_flatten([1], 1)
