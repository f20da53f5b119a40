"""update_refs is all or nothing: whatever the failure and wherever it sits
(first, middle, last position), no Ref changes."""

import jax
import jax.numpy as jnp
import pytest

import refx

N = 5
POSITIONS = [0, N // 2, N - 1]


def fresh():
    refs = [refx.Ref(float(i), "c") for i in range(N)]
    return refs, [r.value for r in refs]


def good_source(refs):
    return [refx.Value(100.0 + i, i, "c") for i in range(len(refs))]


def unchanged(refs, before):
    return all(r.value is v for r, v in zip(refs, before, strict=True))


def corrupt(kind, p, refs):
    """(target, source, message regex) failing at position p."""
    src = good_source(refs)
    target = list(refs)
    if kind == "nothing":
        src[p] = refx.NOTHING
        return target, src, r"target has a Ref but source has NOTHING"
    if kind == "mix":
        # a Ref where Values are used elsewhere (at 0: Values come later)
        src[p] = refx.Ref(1.0, "c")
        return target, src, r"may not mix Refs with Values/Indexes"
    if kind == "index-before-value":
        src[p] = refx.Index(N + 7, "c")
        return target, src, rf"Index\({N + 7}\) comes before any Value"
    if kind == "duplicate-value":
        src[p] = refx.Value(1.0, (p + 1) % N if p == N - 1 else p, "c")
        if p == N - 1:
            src[p] = refx.Value(1.0, 0, "c")
            return target, src, r"source has two Values with index 0"
        src[p + 1] = refx.Value(1.0, p, "c")
        return target, src, rf"source has two Values with index {p}"
    if kind == "collection":
        src[p] = refx.Value(1.0, p, "other")
        return target, src, r"source Value has collection 'other' but the target Ref has collection 'c'"
    if kind == "sharing":
        # the target repeats Ref p-1 at p, the source gives a new Value there
        q = p - 1 if p > 0 else 1
        target[p] = refs[q]
        return target, src, r"the target repeats a Ref here but the source has a new Value|source has Index"
    if kind == "plain-target":
        target[p] = 3
        return target, src, r"target has int, not a Ref, but source has a Value"
    if kind == "count":
        return target, src + [1.0], r"the source's structure differs from the target's at \('5',\): the source has a leaf at \('5',\), the target none"
    raise AssertionError(kind)


KINDS = ["nothing", "mix", "index-before-value", "duplicate-value", "collection",
         "sharing", "plain-target", "count"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", POSITIONS)
def test_failure_changes_no_ref(kind, p):
    refs, before = fresh()
    target, src, msg = corrupt(kind, p, refs)
    with pytest.raises(ValueError, match="update_refs: .*(" + msg + ")"):
        refx.update_refs(target, src)
    assert unchanged(refs, before)
    # and the good source then works: the failure left nothing half-done
    refx.update_refs(refs, good_source(refs))
    assert [r.value for r in refs] == [100.0 + i for i in range(N)]


@pytest.mark.parametrize("p", POSITIONS)
def test_trace_violation_changes_no_ref(p):
    outer = refx.Ref(-1.0, "c")
    seen = []

    @jax.jit
    def f(x):
        refs = [refx.Ref(x + i, "c") for i in range(N)]
        target = list(refs)
        target[p] = outer  # a Ref of another trace
        values = [r.value for r in refs]
        with pytest.raises(ValueError, match=rf"update_refs: at \('{p}',\): Cannot mutate Ref from a different trace level"):
            refx.update_refs(target, [x * 10 for _ in range(N)])
        seen.append(all(r.value is v for r, v in zip(refs, values, strict=True)))
        return x

    f(jnp.ones(()))
    assert seen == [True] and outer.value == -1.0


@pytest.mark.parametrize("p", POSITIONS)
def test_foreign_tracer_changes_no_ref(p):
    refs, before = fresh()
    leaked = []

    @jax.jit
    def g(x):
        leaked.append(x)
        return x

    g(jnp.ones(()))
    src = [float(i) for i in range(N)]
    src[p] = leaked[0]
    with pytest.raises(ValueError, match=rf"update_refs: at \('{p}',\): Cannot set a Ref to a value holding a tracer of another trace"):
        refx.update_refs(refs, src)
    assert unchanged(refs, before)


@pytest.mark.parametrize("p", POSITIONS)
def test_by_path_failures_change_no_ref(p):
    refs, before = fresh()
    target = refx.get_partition(refs, "c")
    good = {k: jnp.asarray(i + 100.0) for i, k in enumerate(target)}
    missing = dict(good)
    del missing[(str(p),)]
    with pytest.raises(ValueError, match=rf"update_refs: at \('{p}',\): the source has no value for the Ref here"):
        refx.update_refs(target, missing)
    extra = dict(good)
    extra[("x", str(p))] = 1.0
    with pytest.raises(ValueError, match=rf"update_refs: path \('x', '{p}'\) is in the source but not in the target"):
        refx.update_refs(target, extra)
    assert unchanged(refs, before)


def test_user_exception_mid_validation_changes_no_ref():
    class Boom(Exception):
        pass

    class Coll:
        def __hash__(self):
            return 1

        def __eq__(self, other):
            raise Boom("collection eq")

    refs = [refx.Ref(1.0, "c"), refx.Ref(2.0, Coll())]
    with pytest.raises(Boom):
        refx.update_refs(refs, [refx.Value(5.0, 0, "c"), refx.Value(6.0, 1, "c")])
    assert [r.value for r in refs] == [1.0, 2.0]
