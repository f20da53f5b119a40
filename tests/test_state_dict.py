"""state_dict / load_state_dict: names, sharing, filters, values that are
pytrees or scalars, every error, all-or-nothing loads, and a property test
against the oracle's paths on random trees with shared Refs."""

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refx
from oracle import keypath_to_path


def model():
    w = refx.Ref(jnp.ones((3, 3)), "params")
    return {
        "enc": {"w": w, "b": refx.Ref(jnp.zeros(3), "params")},
        "dec": {"w": w},  # tied
        "blocks": [{"linear": {"w": refx.Ref(jnp.full((2, 2), 2.0), "params")}}],
        "steps": refx.Ref(0, "state"),
        "mean": refx.Ref(np.zeros(3, np.float32), "batch_stats"),
        "act": "relu",  # not state
        "scale": jnp.ones(1),  # a plain array leaf: structure, not state
    }


def values(tree):
    """Every Ref's value, by path (to check that a failed load wrote nothing)."""
    return {p: r.value for p, r in refx.get_partition(tree, refx.Ref).items()
            if r is not refx.NOTHING}


def same_values(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]) and np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------


def test_names_are_paths_joined_with_slash_in_leaf_order():
    m = model()
    sd = refx.state_dict(m)
    # JAX's leaf order sorts dict keys, so the tied weight is first met at dec/w
    assert list(sd) == ["blocks/0/linear/w", "dec/w", "enc/b", "mean", "steps"]
    assert sd["dec/w"] is m["enc"]["w"].value  # the held object, not a copy
    assert sd["steps"] == 0 and type(sd["steps"]) is int


def test_shared_ref_stored_once_under_its_first_path():
    r = refx.Ref(jnp.ones(2))
    sd = refx.state_dict({"z": r, "a": [r, r]})
    assert list(sd) == ["a/0"]


def test_namedtuple_attrs_and_nested_sequences():
    NT = collections.namedtuple("NT", "w b")
    tree = [NT(refx.Ref(1.0), refx.Ref(2.0)), (refx.Ref(3.0),)]
    assert list(refx.state_dict(tree)) == ["0/w", "0/b", "1/0"]


def test_filter_selects_refs():
    m = model()
    assert list(refx.state_dict(m, "params")) == ["blocks/0/linear/w", "dec/w", "enc/b"]
    assert list(refx.state_dict(m, filter=refx.Not("params"))) == ["mean", "steps"]
    assert list(refx.state_dict(m, lambda r: r.collection == "state")) == ["steps"]
    assert refx.state_dict(m, False) == {}
    # a filter that matches plain leaves selects no state
    assert refx.state_dict(m, jax.Array) == {}


def test_deref_tree_gives_the_same_state_dict():
    m = model()
    a, b = refx.state_dict(m), refx.state_dict(refx.deref(m))
    assert list(a) == list(b) and all(a[k] is b[k] for k in a)
    assert list(refx.state_dict(refx.deref(m), "params")) == list(refx.state_dict(m, "params"))


def test_deref_tree_index_without_its_value_is_an_error():
    r = refx.Ref(1.0, "p")
    d = refx.deref({"a": r, "b": r})
    with pytest.raises(ValueError, match=r"state_dict: Index\(0\) at \('b',\) has no Value selected"):
        refx.state_dict(d, refx.Index)


def test_tree_that_is_one_ref_has_the_empty_name():
    assert refx.state_dict(refx.Ref(1.0)) == {"": 1.0}
    assert list(refx.state_dict(refx.Ref({"mu": 1.0, "nu": 2.0}))) == ["mu", "nu"]


def test_empty_tree():
    assert refx.state_dict({}) == {}
    assert refx.load_state_dict({}, {}) == refx.LoadResult((), ())


def test_colliding_names_are_an_error_not_an_overwrite():
    tree = {"a/b": refx.Ref(1.0), "a": {"b": refx.Ref(2.0)}}
    with pytest.raises(ValueError, match=r"state_dict: two values are named 'a/b': the Ref at \('a', 'b'\) "
                                         r"and the Ref at \('a/b',\); .*rename the key"):
        refx.state_dict(tree)
    with pytest.raises(ValueError, match="load_state_dict: two values are named 'a/b'"):
        refx.load_state_dict(tree, {"a/b": 1.0})


def test_collision_between_a_value_leaf_and_a_ref():
    tree = {"opt": refx.Ref({"mu": 1.0}), "opt/mu": refx.Ref(2.0)}
    with pytest.raises(ValueError, match=r"two values are named 'opt/mu': the Ref at \('opt',\) "
                                         r"\(at 'mu' in its value\) and the Ref at \('opt/mu',\)"):
        refx.state_dict(tree)


# ---------------------------------------------------------------------------
# values that are pytrees or not arrays
# ---------------------------------------------------------------------------


def test_pytree_value_gets_one_name_per_leaf_and_loads_back():
    params = {"w": jnp.ones(2), "b": jnp.zeros(2)}
    tx = optax.adam(1e-3)
    m = {"params": refx.Ref(params, "params"), "opt": refx.Ref(tx.init(params), "opt")}
    sd = refx.state_dict(m)
    assert list(sd) == ["opt/0/count", "opt/0/mu/b", "opt/0/mu/w", "opt/0/nu/b", "opt/0/nu/w",
                        "params/b", "params/w"]
    new = {k: v + 1 for k, v in sd.items()}
    refx.load_state_dict(m, new)
    st = m["opt"].value
    assert type(st) is type(tx.init(params))  # rebuilt with the held structure
    assert int(st[0].count) == 1 and np.array_equal(st[0].mu["w"], jnp.ones(2))
    assert np.array_equal(m["params"].value["b"], jnp.ones(2))


def test_optax_state_of_a_deref_partition_holds_values_as_nodes():
    m = model()
    tx = optax.sgd(0.1, momentum=0.9)
    m["opt"] = refx.Ref(tx.init(refx.get_partition(refx.deref(m), "params")), "opt")
    names = [n for n in refx.state_dict(m) if n.startswith("opt/")]
    # Value nodes are pytree nodes inside a value: their key is "value"
    assert names == ["opt/0/trace/blocks/0/linear/w/value", "opt/0/trace/dec/w/value",
                     "opt/0/trace/enc/b/value"]
    sd = refx.state_dict(m)
    refx.load_state_dict(m, {k: (v + 1 if k.startswith("opt/") else v) for k, v in sd.items()})
    trace = m["opt"].value[0].trace
    assert isinstance(trace, refx.Partition)
    assert isinstance(trace[("enc", "w")], refx.Index)  # structure kept
    assert np.array_equal(trace[("dec", "w")].value, jnp.ones((3, 3)))


def test_python_scalars_load_back_as_python_scalars():
    m = {"n": refx.Ref(0), "f": refx.Ref(1.5), "flag": refx.Ref(False)}
    refx.load_state_dict(m, {"n": np.int64(7), "f": np.array(2.5), "flag": np.bool_(True)})
    assert (m["n"].value, m["f"].value, m["flag"].value) == (7, 2.5, True)
    assert [type(m[k].value) for k in ("n", "f", "flag")] == [int, float, bool]
    refx.load_state_dict(m, {"n": 3, "f": 0.5, "flag": False})
    assert (m["n"].value, m["f"].value, m["flag"].value) == (3, 0.5, False)


def test_scalar_kind_mismatch_is_an_error():
    m = {"n": refx.Ref(0)}
    with pytest.raises(ValueError, match=r"'n': float64\[\] in the state, a Python int in the tree"):
        refx.load_state_dict(m, {"n": np.float64(1.0)})
    with pytest.raises(ValueError, match=r"'n': int64\[3\] in the state, a Python int in the tree"):
        refx.load_state_dict(m, {"n": np.zeros(3, np.int64)})
    assert m["n"].value == 0


def test_numpy_scalars_stay_numpy_scalars():
    m = {"x": refx.Ref(np.float32(1.0)), "y": refx.Ref(np.float64(2.0))}
    refx.load_state_dict(m, {"x": np.array(3.0, np.float32), "y": np.float64(4.0)})
    assert type(m["x"].value) is np.float32 and m["x"].value == 3.0
    assert type(m["y"].value) is np.float64 and m["y"].value == 4.0
    with pytest.raises(ValueError, match=r"'x': float64\[\] in the state, float32\[\] in the tree"):
        refx.load_state_dict(m, {"x": np.float64(1.0), "y": np.float64(1.0)})


def test_prng_key_arrays():
    m = {"rng": refx.Ref(jax.random.key(0), "rngs")}
    assert refx.state_dict(m)["rng"] is m["rng"].value
    refx.load_state_dict(m, {"rng": jax.random.key(7)})
    assert np.array_equal(jax.random.key_data(m["rng"].value), jax.random.key_data(jax.random.key(7)))
    with pytest.raises(ValueError, match=r"'rng': uint32\[2\] in the state, key<fry>\[\] in the tree"):
        refx.load_state_dict(m, {"rng": jnp.zeros(2, jnp.uint32)})


def test_python_scalar_for_an_array_is_an_error():
    m = {"x": refx.Ref(np.float64(1.0)), "y": refx.Ref(jnp.zeros((), jnp.int32))}
    with pytest.raises(ValueError) as e:
        refx.load_state_dict(m, {"x": 2.0, "y": 3})
    assert "'x': a Python scalar (float64) in the state, float64[] in the tree" in str(e.value)
    assert "'y': a Python scalar (int64) in the state, int32[] in the tree" in str(e.value)
    assert m["x"].value == 1.0


def test_values_that_are_not_arrays_or_scalars_are_refused():
    with pytest.raises(TypeError, match=r"state_dict: the Ref at \('a',\) holds a str; state dicts hold "
                                        r"arrays and Python scalars"):
        refx.state_dict({"a": refx.Ref("relu")})
    with pytest.raises(TypeError, match=r"the Ref at \('a',\) \(at 'k' in its value\) holds a object"):
        refx.state_dict({"a": refx.Ref({"k": object()})})
    with pytest.raises(TypeError, match=r"the Ref at \('a',\) holds a Ref; a Ref inside a Ref's value"):
        refx.state_dict({"a": refx.Ref(refx.Ref(1.0))})
    # the filter can leave such Refs out
    assert refx.state_dict({"a": refx.Ref("relu", "meta"), "b": refx.Ref(1.0)}, refx.Not("meta")) == {"b": 1.0}


# ---------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------


def test_round_trip_into_a_fresh_model_keeps_ties():
    src = model()
    src["enc"]["w"].value = jnp.full((3, 3), 5.0)
    src["steps"].value = 12
    dst = model()
    assert refx.load_state_dict(dst, refx.state_dict(src)) == refx.LoadResult((), ())
    same_values(values(dst), values(src))
    assert dst["enc"]["w"] is dst["dec"]["w"]  # the same Ref object, one value
    assert type(dst["mean"].value) is np.ndarray and type(dst["steps"].value) is int


def test_numpy_arrays_load_onto_the_held_jax_arrays_placement():
    m = model()
    sd = {k: np.asarray(v) for k, v in refx.state_dict(m).items()}
    refx.load_state_dict(m, sd)
    w = m["enc"]["w"].value
    assert isinstance(w, jax.Array) and w.sharding == jnp.ones(1).sharding
    assert isinstance(m["mean"].value, np.ndarray)  # a numpy Ref stays numpy


def test_strict_lists_every_problem_in_one_error_and_writes_nothing():
    m = model()
    before = values(m)
    sd = {k: v for k, v in refx.state_dict(m).items() if k != "mean"}
    sd["enc/b"] = jnp.zeros(4)
    sd["dec/w"] = jnp.ones((3, 3), jnp.bfloat16)
    sd["extra"] = jnp.ones(1)
    with pytest.raises(ValueError) as e:
        refx.load_state_dict(m, sd)
    msg = str(e.value)
    assert msg.startswith("load_state_dict: the state does not match the tree; nothing was loaded:")
    assert "'dec/w': bfloat16[3,3] in the state, float32[3,3] in the tree" in msg
    assert "'enc/b': float32[4] in the state, float32[3] in the tree" in msg
    assert "missing from the state (in the tree): 'mean'" in msg
    assert "unexpected in the state (not in the tree): 'extra'" in msg
    assert "pass strict=False" in msg
    same_values(values(m), before)


def test_non_strict_loads_what_matches_and_reports_the_rest():
    m = model()
    sd = {"enc/b": jnp.full(3, 4.0), "steps": 9, "nope": jnp.ones(1)}
    res = refx.load_state_dict(m, sd, strict=False)
    assert res.missing == ("blocks/0/linear/w", "dec/w", "mean")
    assert res.unexpected == ("nope",)
    assert np.array_equal(m["enc"]["b"].value, jnp.full(3, 4.0)) and m["steps"].value == 9
    assert np.array_equal(m["dec"]["w"].value, jnp.ones((3, 3)))


def test_non_strict_still_refuses_shape_and_dtype_mismatches():
    m = model()
    before = values(m)
    with pytest.raises(ValueError, match=r"(?s)'enc/b': float32\[4\].*even with strict=False"):
        refx.load_state_dict(m, {"enc/b": jnp.zeros(4), "steps": 3}, strict=False)
    same_values(values(m), before)


def test_non_strict_partial_pytree_value_keeps_the_other_leaves():
    m = {"p": refx.Ref({"w": jnp.ones(2), "b": jnp.zeros(2)})}
    res = refx.load_state_dict(m, {"p/w": jnp.full(2, 3.0)}, strict=False)
    assert res.missing == ("p/b",)
    assert np.array_equal(m["p"].value["w"], jnp.full(2, 3.0))
    assert np.array_equal(m["p"].value["b"], jnp.zeros(2))


def test_load_with_a_filter():
    src, dst = model(), model()
    src["enc"]["b"].value = jnp.full(3, 8.0)
    src["steps"].value = 5
    refx.load_state_dict(dst, refx.state_dict(src, "params"), filter="params")
    assert np.array_equal(dst["enc"]["b"].value, jnp.full(3, 8.0))
    assert dst["steps"].value == 0
    with pytest.raises(ValueError, match=r"missing from the state \(in the tree\): 'mean', 'steps'"):
        refx.load_state_dict(dst, refx.state_dict(src, "params"))


def test_tied_in_the_tree_but_not_in_the_state():
    untied = {"enc": {"w": refx.Ref(jnp.ones(2))}, "dec": {"w": refx.Ref(jnp.ones(2))}}
    w = refx.Ref(jnp.zeros(2))
    tied = {"enc": {"w": w}, "dec": {"w": w}}
    with pytest.raises(ValueError, match=r"unexpected in the state \(not in the tree\): 'enc/w' \(in the tree, "
                                         r"'enc/w' is the same Ref as 'dec/w'; a shared Ref is stored once"):
        refx.load_state_dict(tied, refx.state_dict(untied))
    with pytest.raises(ValueError, match=r"missing from the state \(in the tree\): 'enc/w'"):
        refx.load_state_dict(untied, refx.state_dict(tied))
    refx.load_state_dict(tied, refx.state_dict(untied), strict=False)
    assert tied["enc"]["w"] is tied["dec"]["w"] and np.array_equal(w.value, jnp.ones(2))


def test_load_into_a_deref_tree_is_refused():
    m = model()
    with pytest.raises(TypeError, match=r"load_state_dict: the tree holds deref'ed nodes \(Value at "
                                        r"\('blocks', '0', 'linear', 'w'\)\); load into the tree of Refs"):
        refx.load_state_dict(refx.deref(m), refx.state_dict(m))


def test_mixed_refs_and_deref_nodes_are_refused():
    tree = {"a": refx.Ref(1.0), "b": refx.Value(2.0, 0)}
    with pytest.raises(TypeError, match="state_dict: the tree mixes Refs and deref'ed nodes"):
        refx.state_dict(tree)


def test_bad_state_arguments():
    m = model()
    with pytest.raises(TypeError, match=r"load_state_dict: state must be a mapping \{name: array\}, got list"):
        refx.load_state_dict(m, [1, 2])
    with pytest.raises(TypeError, match=r"load_state_dict: state names must be str, got tuple \('a',\)"):
        refx.load_state_dict(m, {("a",): 1.0})
    with pytest.raises(TypeError, match=r"load_state_dict: 'steps' is a str; a state dict holds arrays"):
        refx.load_state_dict(m, {"steps": "x"})


def test_write_goes_through_update_refs_trace_check():
    m = {"w": refx.Ref(jnp.ones(2))}

    @jax.jit
    def f(x):
        refx.load_state_dict(m, {"w": x})  # m's Ref belongs to the outer trace
        return x

    with pytest.raises(ValueError, match="Cannot mutate Ref from a different trace level"):
        f(jnp.zeros(2))
    assert np.array_equal(m["w"].value, jnp.ones(2))


def test_load_inside_jit_on_rerefed_tree():
    w = refx.Ref(jnp.ones(3), "params")
    m = {"enc": {"b": refx.Ref(jnp.zeros(3), "params"), "w": w}, "dec": w}

    @jax.jit
    def f(d, x):
        t = refx.reref(d)
        refx.load_state_dict(t, {"enc/b": x}, strict=False)
        return refx.deref(t)

    out = f(refx.deref(m), jnp.full(3, 2.0))
    refx.update_refs(m, out)
    assert np.array_equal(m["enc"]["b"].value, jnp.full(3, 2.0))
    assert m["enc"]["w"] is m["dec"] and np.array_equal(w.value, jnp.ones(3))


def test_orbax_missing_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"save: refx checkpoints need orbax-checkpoint: pip install 'refx\[orbax\]'"):
        refx.save(tmp_path / "c", model())
    with pytest.raises(ImportError, match=r"restore: refx checkpoints need orbax-checkpoint"):
        refx.restore(tmp_path / "c", model())


# ---------------------------------------------------------------------------
# properties on random trees
# ---------------------------------------------------------------------------

NT = collections.namedtuple("NT", "x y")


@st.composite
def trees(draw):
    pool = [refx.Ref(float(draw(st.integers(-5, 5))), draw(st.sampled_from([None, "params", "stats"])))
            for _ in range(draw(st.integers(0, 5)))]
    leaves = st.integers(-3, 3) | st.none()
    if pool:
        leaves = leaves | st.sampled_from(pool) | st.sampled_from(pool)

    def extend(children):
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.text("ab/", min_size=1, max_size=2), children, max_size=4),
            st.tuples(children, children).map(lambda t: NT(*t)),
        )

    return draw(st.recursive(leaves, extend, max_leaves=20))


def expected_names(tree, filter_):
    """First path of each distinct selected Ref, by the oracle's path rules."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, refx.Ref))
    out, seen = [], set()
    for kp, x in pairs:
        if isinstance(x, refx.Ref) and refx.All(filter_)(x) and id(x) not in seen:
            seen.add(id(x))
            out.append(("/".join(keypath_to_path(kp)), x))
    return out


@settings(max_examples=300, deadline=None)
@given(trees(), st.sampled_from([..., "params", refx.Not("stats")]))
def test_names_match_the_oracle_and_round_trip(tree, filter_):
    expected = expected_names(tree, filter_)
    names = [n for n, _ in expected]
    if len(set(names)) < len(names):  # keys with '/' that collide
        with pytest.raises(ValueError, match="two values are named"):
            refx.state_dict(tree, filter_)
        return
    sd = refx.state_dict(tree, filter_)
    assert list(sd) == names
    assert all(sd[n] is r.value for n, r in expected)
    # load shifted values: every selected Ref (hence every occurrence) moves
    refx.load_state_dict(tree, {n: v + 1.0 for n, v in sd.items()}, filter=filter_)
    for n, r in expected:
        assert r.value == sd[n] + 1.0


@settings(max_examples=200, deadline=None)
@given(trees())
def test_keypath_to_path_gives_the_partition_keys_and_agrees_with_the_oracle(tree):
    part = refx.get_partition(tree, ...)
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, refx.Ref))
    assert list(part) == [refx.keypath_to_path(kp) for kp, _ in pairs]
    assert [refx.keypath_to_path(kp) for kp, _ in pairs] == [keypath_to_path(kp) for kp, _ in pairs]
