"""summary(tree) and the treescope renderings of Ref, Value, Index,
Partition and NOTHING (the treescope tests skip without treescope)."""

import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refx


def model():
    w = refx.Ref(jnp.ones((64, 64)), "params")
    return {
        "enc": {"w": w, "b": refx.Ref(jnp.zeros(64), "params")},
        "dec": {"w": w},  # tied
        "steps": refx.Ref(0, "state"),
        "act": refx.Ref("relu", "meta"),
        "mean": refx.Ref(np.zeros(64, np.float16), "batch_stats"),
        "plain": jnp.ones(3),  # not in a Ref: not counted
    }


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


def test_summary_counts_per_collection():
    s = refx.summary(model())
    rows = {r.collection: r for r in s.rows}
    assert rows["params"] == refx.CollectionSummary("params", refs=2, ties=1, params=64 * 64 + 64,
                                                    bytes=4 * (64 * 64 + 64))
    assert rows["state"] == ("state", 1, 0, 0, 0)  # a Python int: a Ref with no parameters
    assert rows["meta"] == ("meta", 1, 0, 0, 0)
    assert rows["batch_stats"] == ("batch_stats", 1, 0, 64, 128)
    # leaf order (dict keys sorted): act, dec, enc, mean, steps
    assert [r.collection for r in s.rows] == ["meta", "params", "batch_stats", "state"]
    assert (s.refs, s.ties, s.params, s.bytes) == (5, 1, 4224, 4 * 4160 + 128)


def test_summary_table_text():
    text = str(refx.summary(model()))
    lines = text.splitlines()
    assert lines[0].split() == ["collection", "refs", "ties", "params", "bytes"]
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    assert lines[3].split() == ["params", "2", "1", "4,160", "16.2", "KiB"]
    assert lines[-1].split() == ["total", "5", "1", "4,224", "16.4", "KiB"]
    assert repr(refx.summary(model())) == text
    # the columns line up
    assert len({len(line) for line in lines if set(line) != {"-"}} | {len(lines[1])}) <= 2


def test_summary_of_a_deref_tree_and_of_an_abstract_tree_agree():
    m = model()
    del m["act"]  # eval_shape needs array leaves
    del m["steps"]  # and makes a Python int an int32 array (1 parameter)
    s = refx.summary(m)
    assert refx.summary(refx.deref(m)).rows == s.rows
    abstract = jax.eval_shape(lambda d: d, refx.deref(m))
    assert refx.summary(abstract).rows == s.rows


def test_summary_of_pytree_values():
    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    tree = {"p": refx.Ref(params, "params"),
            "opt": refx.Ref(optax.adam(1e-3).init(params), "opt_state")}
    rows = {r.collection: r for r in refx.summary(tree).rows}
    assert rows["params"].params == 20
    assert rows["opt_state"].params == 2 * 20 + 1  # mu, nu and the int32 count
    assert rows["opt_state"].bytes == 4 * 41


def test_summary_collections_of_any_hashable_and_empty():
    s = refx.summary([refx.Ref(1.0), refx.Ref(jnp.ones(2), ("a", 1))])
    assert [r.collection for r in s.rows] == [None, ("a", 1)]
    text = str(s)
    assert "None" in text and "('a', 1)" in text
    empty = refx.summary({})
    assert empty.rows == () and (empty.refs, empty.params) == (0, 0)
    assert str(empty).splitlines()[-1].split() == ["total", "0", "0", "0", "0", "B"]


def test_summary_human_bytes():
    big = refx.summary({"w": refx.Ref(jax.ShapeDtypeStruct((1024, 1024, 3), jnp.float32))})
    assert big.bytes == 12 * 2**20 and "12.0 MiB" in str(big)


def test_summary_of_prng_keys():
    s = refx.summary({"rng": refx.Ref(jax.random.key(0), "rngs")})
    assert s.rows == (refx.CollectionSummary("rngs", 1, 0, 1, 8),)


def test_summary_refuses_mixed_trees():
    with pytest.raises(TypeError, match="summary: the tree mixes Refs and deref'ed nodes"):
        refx.summary([refx.Ref(1), refx.Value(1, 0)])


# ---------------------------------------------------------------------------
# the __treescope_repr__ hook
# ---------------------------------------------------------------------------


def test_hook_is_a_bound_python_method_on_every_type():
    # treescope accepts only a types.MethodType (not a builtin method)
    r = refx.Ref(1.0)
    d = refx.deref([r, r])
    class Sub(refx.Ref):
        pass
    for obj in (r, Sub(1), d[0], d[1], refx.NOTHING, refx.Partition({("a",): 1})):
        m = obj.__treescope_repr__
        assert isinstance(m, types.MethodType) and m.__self__ is obj


def test_importing_refx_imports_neither_treescope_nor_orbax():
    code = ("import sys, refx; r = refx.Ref(1); r.__treescope_repr__; "
            "refx.summary([r]); refx.state_dict([r]); "
            "print(sorted(m for m in ('treescope', 'orbax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# treescope renderings
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def treescope():
    return pytest.importorskip("treescope", reason="treescope is not installed")


def tied():
    w = refx.Ref(jnp.ones((3, 3)), "params")
    return {"enc": {"w": w, "b": refx.Ref(jnp.zeros(3), "params")}, "dec": {"w": w},
            "n": refx.Ref(0, "state")}, w


def test_ref_shows_value_shape_and_collection(treescope):
    text = treescope.render_to_text({"b": refx.Ref(jnp.zeros((2, 5)), "params")})
    assert "Ref(" in text and "collection='params'" in text
    assert "float32(2, 5)" in text  # treescope's array summary: dtype and shape


def test_shared_ref_second_occurrence_refers_to_the_first(treescope):
    m, w = tied()
    text = treescope.render_to_text(m)
    # treescope renders dicts in insertion order: enc first
    assert "'dec': {'w': Ref(<same Ref as ['enc']['w']>, collection='params')}" in text
    assert text.count("<same Ref as") == 1
    assert text.count("float32(3, 3)") == 1  # the value is shown once
    # a fresh render starts afresh: the first occurrence is again shown in full
    assert treescope.render_to_text(m) == text
    assert "<same Ref as" not in treescope.render_to_text(m["dec"])


def test_shared_ref_in_another_order(treescope):
    m, w = tied()
    text = treescope.render_to_text({"dec": m["dec"], "enc": m["enc"]})
    assert "'w': Ref(<same Ref as ['dec']['w']>, collection='params')" in text


def test_refs_in_a_list_and_a_ref_subclass(treescope):
    class Param(refx.Ref):
        pass

    p = Param(jnp.ones(2), "params")
    text = treescope.render_to_text([p, p, refx.Ref(1.0)])
    assert "Param(" in text and "Param(<same Ref as [0]>, collection='params')" in text
    assert "Ref(value=1.0, collection=None)" in text


def test_deref_tree(treescope):
    m, _ = tied()
    text = treescope.render_to_text(refx.deref(m))
    assert "Value(" in text and "index=0" in text and "collection='params'" in text
    assert "Index(index=0, collection='params')" in text
    assert "# same Ref as Value(index=0)" in text


def test_partition_and_nothing(treescope):
    m, _ = tied()
    text = treescope.render_to_text(refx.get_partition(m, "params"))
    assert text.startswith("Partition({")
    assert "('n',):" in text and "NOTHING" in text
    assert "Ref(<same Ref as [('dec', 'w')]>, collection='params')" in text
    rt = treescope.render_to_text(refx.get_partition(m, "params"), roundtrip_mode=True)
    assert "refx.NOTHING" in rt and "refx.Partition({" in rt
    assert treescope.render_to_text(refx.NOTHING) == "NOTHING"


def test_html_rendering(treescope):
    m, _ = tied()
    html = treescope.render_to_html(m, compressed=False)
    assert "same Ref as" in html and "collection=" in html


def test_hook_getter_keeps_refcounts():
    import refx._inspect as mod

    r, p = refx.Ref(1.0), refx.Partition({("a",): 1})
    r.__treescope_repr__, p.__treescope_repr__  # warm up
    before = [sys.getrefcount(o) for o in (mod, r, p, mod.treescope_method)]
    for _ in range(1000):
        r.__treescope_repr__, p.__treescope_repr__, refx.NOTHING.__treescope_repr__
    assert [sys.getrefcount(o) for o in (mod, r, p, mod.treescope_method)] == before
