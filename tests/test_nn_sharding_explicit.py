"""refx.nn on Explicit mesh axes (jax.make_mesh's default from JAX 0.9),
against Flax NNX on the same program.

A contraction over a sharded dimension on Explicit axes must say where its
output goes (JAX's ShardingTypeError otherwise); NNX's layers take
``out_sharding`` in ``__call__`` for it, and so do refx.nn's.  On 8
simulated CPU devices (this file run as a script in a subprocess, see
multidevice.py): each layer with ``out_sharding`` gives NNX's output on the
asked sharding, without it the same JAX error as NNX; an MLP with
BatchNorm and Dropout trains through refx.jit with nn.Optimizer exactly as
NNX's does, needing the same out_sharding arguments and no more; the
optimizer's moments, refx.shardings, refx.eval_shape and a sharded init
all give the declared shardings; on Auto axes nothing changed.  In this
process (one device): what a JAX too old for an op's out_sharding says,
and that a layer's own dot_general gets out_sharding only when it is given.
"""

import contextlib
import json
import os
import re
import sys

if __name__ == "__main__":  # the 8-device scenarios: XLA_FLAGS before jax
    assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import refx
import refx.nn as nn
from refx import _compat

AxisType = getattr(jax.sharding, "AxisType", None)
EXPLICIT_AXES = AxisType is not None and hasattr(jax, "set_mesh") and _compat._reshard is not None


# --------------------------------------------------------------------------
# one device: out_sharding passed through only when given, old JAX refused
# --------------------------------------------------------------------------


def test_a_custom_dot_general_gets_out_sharding_only_when_given():
    seen = []

    def dot_general(x, y, dims, precision=None, **kw):
        seen.append(kw)
        return jax.lax.dot_general(x, y, dims, precision=precision)

    layer = nn.Linear(3, 2, dot_general=dot_general, rngs=nn.Rngs(0))
    layer(jnp.ones((4, 3)))
    general = nn.LinearGeneral(3, (2, 2), dot_general=dot_general, rngs=nn.Rngs(0))
    general(jnp.ones((4, 3)))
    assert seen == [{}, {}]  # None: not passed (a dot_general without the parameter works)
    marker = object()
    layer(jnp.ones((4, 3)), out_sharding=marker)
    general(jnp.ones((4, 3)), out_sharding=marker)
    assert seen[2:] == [{"out_sharding": marker}] * 2  # given: passed as it is, unchecked


JAX_FUNCTIONS = {name: fn for fn, name, _ in _compat._OUT_SHARDING_SINCE}


def _version(v):
    return tuple(int(p) for p in v.split(".")[:3])


def test_the_release_table_agrees_with_this_jax():
    have = _version(jax.__version__)
    for fn, name, since in _compat._OUT_SHARDING_SINCE:
        assert _compat.takes_out_sharding(fn, name) == (have >= _version(since)), (name, since)
    assert (_compat._auto_axes is not None) == (have >= (0, 7, 0))


def _pretend_jax_lacks(monkeypatch, name):
    cache = dict(_compat._takes_cache)
    cache[name] = False
    monkeypatch.setattr(_compat, "_takes_cache", cache)


@pytest.mark.parametrize("case", [
    ("Linear.__call__", "jax.lax.dot_general", "0.5.0",
     lambda: nn.Linear(3, 2, rngs=nn.Rngs(0))(jnp.ones((4, 3)), out_sharding=P())),
    ("LinearGeneral.__call__", "jax.lax.dot_general", "0.5.0",
     lambda: nn.LinearGeneral(3, 2, rngs=nn.Rngs(0))(jnp.ones((4, 3)), out_sharding=P())),
    ("Einsum.__call__", "jax.numpy.einsum", "0.5.0",
     lambda: nn.Einsum("ab,bc->ac", (3, 2), rngs=nn.Rngs(0))(jnp.ones((4, 3)),
                                                           out_sharding=P())),
    ("Conv.__call__", "jax.lax.conv_general_dilated", "0.7.2",
     lambda: nn.Conv(3, 2, 3, rngs=nn.Rngs(0))(jnp.ones((1, 5, 3)), out_sharding=P())),
    ("Embed.attend", "jax.numpy.dot", "0.6.1",
     lambda: nn.Embed(5, 3, rngs=nn.Rngs(0)).attend(jnp.ones((4, 3)), out_sharding=P())),
    # MultiHeadAttention's projections are LinearGeneral layers
    ("LinearGeneral.__call__", "jax.lax.dot_general", "0.5.0",
     lambda: nn.MultiHeadAttention(2, 4, rngs=nn.Rngs(0))(jnp.ones((1, 3, 4)),
                                                          qkv_sharding=P())),
], ids=["Linear", "LinearGeneral", "Einsum", "Conv", "Embed.attend", "MultiHeadAttention"])
def test_a_jax_without_the_parameter_is_a_type_error_naming_the_release(monkeypatch, case):
    where, fn, since, call = case
    if _compat.takes_out_sharding(JAX_FUNCTIONS[fn], fn):  # this JAX has it: pretend not
        _pretend_jax_lacks(monkeypatch, fn)
    msg = (f"{where}: out_sharding needs {fn}(..., out_sharding=), which JAX has from "
           f"release {since}; this is JAX {jax.__version__}")
    with pytest.raises(TypeError, match="^" + re.escape(msg) + r" \(upgrade JAX, or call "
                                                               r"without out_sharding\)$"):
        call()


@pytest.mark.parametrize("rows", [5, 1])
def test_embed_lookup_without_auto_axes_is_a_type_error(monkeypatch, rows):
    monkeypatch.setattr(_compat, "_auto_axes", None)
    with pytest.raises(TypeError, match=r"^Embed.__call__: out_sharding needs "
                                        r"jax.sharding.auto_axes, which JAX has from release "
                                        r"0\.7\.0; this is JAX "):
        nn.Embed(rows, 3, rngs=nn.Rngs(0))(jnp.zeros(4, jnp.int32), out_sharding=P())


def test_without_out_sharding_the_layers_compute_as_before():
    # no mesh: out_sharding=None is not passed anywhere, outputs unchanged
    x = jax.random.normal(jax.random.key(1), (4, 3))
    layer = nn.Linear(3, 2, rngs=nn.Rngs(0))
    want = x @ layer.kernel.value + layer.bias.value
    np.testing.assert_allclose(layer(x), want, rtol=1e-6)
    np.testing.assert_allclose(layer(x, out_sharding=None), want, rtol=1e-6)


# --------------------------------------------------------------------------
# 8 devices
# --------------------------------------------------------------------------


def _mesh(explicit):
    t = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(t, t))


def _err(e):
    return f"{type(e).__name__}: {e}".split("\n")[0]


def _spec(x):
    """x's PartitionSpec, one entry per dimension, as JSON (None: not a
    NamedSharding, e.g. on one device)."""
    spec = getattr(x.sharding, "spec", None)
    if spec is None:
        return None
    return [list(e) if isinstance(e, tuple) else e for e in
            tuple(spec) + (None,) * (x.ndim - len(spec))]


def _layer_cases():
    """(name, build(m, rngs) for m = refx.nn or flax.nnx, the input (numpy),
    its PartitionSpec, call(layer, x, **kw), the call's sharding keywords)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.normal(size=shape).astype(np.float32)

    def apply(layer, x, **kw):
        return layer(x, **kw)

    def attend(layer, x, **kw):
        return layer.attend(x, **kw)

    return [
        # the contraction is not sharded: JAX needs no out_sharding, takes one
        ("Linear/unsharded_contraction",
         lambda m, r: m.Linear(8, 16, kernel_metadata={"sharding": (None, "model")}, rngs=r),
         f32(16, 8), P("data", None), apply, {"out_sharding": P("data", None)}),
        ("Linear", lambda m, r: m.Linear(16, 4, kernel_metadata={"sharding": ("model", None)},
                                         rngs=r),
         f32(16, 16), P("data", "model"), apply, {"out_sharding": P("data", None)}),
        ("LinearGeneral",
         lambda m, r: m.LinearGeneral(16, (2, 4), kernel_metadata={
             "sharding": ("model", None, None)}, rngs=r),
         f32(16, 16), P("data", "model"), apply, {"out_sharding": P("data", None, None)}),
        ("Einsum", lambda m, r: m.Einsum("ab,bc->ac", (16, 4), (4,), kernel_metadata={
            "sharding": ("model", None)}, rngs=r),
         f32(16, 16), P("data", "model"), apply, {"out_sharding": P("data", None)}),
        ("Conv", lambda m, r: m.Conv(16, 8, (3,), kernel_metadata={
            "sharding": (None, "model", None)}, rngs=r),
         f32(8, 10, 16), P("data", None, "model"), apply,
         {"out_sharding": P("data", None, None)}),
        # a gather from a table sharded over features into a batch over "data"
        ("Embed", lambda m, r: m.Embed(32, 16, embedding_metadata={
            "sharding": (None, "model")}, rngs=r),
         rng.integers(0, 32, size=(8, 5)).astype(np.int32), P("data", None), apply,
         {"out_sharding": P("data", None, None)}),
        ("Embed.attend", lambda m, r: m.Embed(32, 16, embedding_metadata={
            "sharding": (None, "model")}, rngs=r),
         f32(8, 16), P("data", "model"), attend, {"out_sharding": P("data", None)}),
        # heads over "model": the output projection contracts them
        ("MultiHeadAttention", lambda m, r: m.MultiHeadAttention(
            4, 16, kernel_metadata={"sharding": (None, "model", None)},
            out_kernel_metadata={"sharding": ("model", None, None)}, decode=False, rngs=r),
         f32(4, 6, 16), P("data", None, None), apply,
         {"out_sharding": P("data", None, None), "qkv_sharding": P("data", None, "model", None)}),
    ]


def _params(lib, layer):
    """{name: numpy} of the layer's parameters."""
    if lib == "refx":
        return {p: np.asarray(v) for p, v in
                refx.state_dict(refx.get_partition(layer, nn.Param)).items()}
    from flax import nnx

    return {"/".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def scenario_layers(kind):
    """Each layer, refx.nn's and NNX's from the same seed (the same
    weights), called in their jit without and with the sharding keywords,
    under a mesh with Explicit (kind "explicit") or Auto axes."""
    from flax import nnx

    mesh = _mesh(kind == "explicit")
    res = {}
    with jax.set_mesh(mesh):
        for name, build, x, spec, call, kw in _layer_cases():
            out = {}
            layers = {"refx": build(nn, nn.Rngs(0)), "nnx": build(nnx, nnx.Rngs(0))}
            pr, pn = _params("refx", layers["refx"]), _params("nnx", layers["nnx"])
            out["same_weights"] = pr.keys() == pn.keys() and all(
                np.array_equal(pr[k], pn[k]) for k in pr)
            xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
            for lib, layer in layers.items():
                jit = refx.jit if lib == "refx" else nnx.jit
                for label, given in (("plain", {}), ("out", kw)):
                    try:
                        y = jit(lambda m, x, call=call, given=given: call(m, x, **given))(layer, xs)
                        out[f"{lib}_{label}"] = {"spec": _spec(y),
                                                 "value": np.asarray(y).tolist()}
                    except Exception as e:  # noqa: BLE001 - the error is the result
                        out[f"{lib}_{label}"] = {"error": _err(e)}
            res[name] = out
    return res


def scenario_dropout():
    """nn.Dropout on inputs sharded over both axes (Explicit, then Auto),
    with broadcast dimensions sharded or not, against NNX and against the
    mask drawn on one device with the same key."""
    from flax import nnx

    x0 = np.random.default_rng(0).normal(size=(8, 4, 16)).astype(np.float32) + 3
    res = {}
    for kind in ("explicit", "auto"):
        mesh = _mesh(kind == "explicit")
        with jax.set_mesh(mesh):
            x = jax.device_put(jnp.asarray(x0), NamedSharding(mesh, P("data", None, "model")))
            for dims in ((), (1,), (0,), (-1,), (0, 2)):
                key = jax.random.key(3)
                one = nn.Dropout(0.5, broadcast_dims=dims)(jnp.asarray(x0), rngs=key)
                out = {}
                for lib, layer in (("refx", nn.Dropout(0.5, broadcast_dims=dims)),
                                   ("nnx", nnx.Dropout(0.5, broadcast_dims=dims))):
                    try:
                        y = jax.jit(lambda x, layer=layer, key=key: layer(x, rngs=key))(x)
                        out[lib] = {"spec": _spec(y),
                                    "as_one_device": bool(np.array_equal(y, one))}
                    except Exception as e:  # noqa: BLE001 - the error is the result
                        out[lib] = {"error": _err(e)}
                if kind == "explicit":  # as on JAX 0.7-0.8.0: drawn whole, then resharded
                    saved = dict(_compat._takes_cache)
                    _compat._takes_cache["jax.random.bernoulli"] = False
                    try:
                        layer = nn.Dropout(0.5, broadcast_dims=dims)
                        y = jax.jit(lambda x, layer=layer, key=key: layer(x, rngs=key))(x)
                        out["refx_resharded"] = {"spec": _spec(y),
                                                 "as_one_device": bool(np.array_equal(y, one))}
                    finally:
                        _compat._takes_cache.clear()
                        _compat._takes_cache.update(saved)
                res[f"{kind} {dims}"] = out
    return res


TX_LR = 1e-2
DIN, HIDDEN, DOUT, BATCH = 8, 32, 4, 16
SPECS = {"l1/kernel": (None, "model"), "l1/bias": ("model",), "bn/scale": ("model",),
         "bn/bias": ("model",), "l2/kernel": ("model", None)}


def mlp_class(m):
    """The same MLP in refx.nn (m = refx.nn) and in NNX (m = flax.nnx)."""

    class MLP(m.Module):
        def __init__(self, rngs):
            self.l1 = m.Linear(DIN, HIDDEN, kernel_metadata={"sharding": SPECS["l1/kernel"]},
                               bias_metadata={"sharding": SPECS["l1/bias"]}, rngs=rngs)
            self.bn = m.BatchNorm(HIDDEN, scale_metadata={"sharding": SPECS["bn/scale"]},
                                  bias_metadata={"sharding": SPECS["bn/bias"]}, rngs=rngs)
            self.drop = m.Dropout(0.25)
            self.l2 = m.Linear(HIDDEN, DOUT, kernel_metadata={"sharding": SPECS["l2/kernel"]},
                               rngs=rngs)

        def __call__(self, x, key, out_sharding=None):
            h = self.drop(m.relu(self.bn(self.l1(x))), rngs=key)
            # l2 contracts the "model"-sharded hidden axis: on Explicit axes
            # JAX wants to be told where the logits go
            return self.l2(h, out_sharding=out_sharding)

    return MLP


def _train(lib, mesh, steps, out_sharding):
    """`steps` steps of adam on the MLP under `mesh`: the losses, the
    parameters, and the sharding of every parameter and optimizer array."""
    import optax

    if lib == "refx":
        m, jit, vag = nn, refx.jit, lambda f: refx.value_and_grad(f, wrt=nn.Param)
    else:
        from flax import nnx

        m, jit, vag = nnx, nnx.jit, nnx.value_and_grad
    rng = np.random.default_rng(1)
    out = {"losses": []}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model = mlp_class(m)(m.Rngs(0))
        opt = m.Optimizer(model, optax.adam(TX_LR), wrt=m.Param)

        @jit
        def step(model, opt, x, y, key):
            def loss_fn(model):
                logits = model(x, key, out_sharding=out_sharding)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = vag(loss_fn)(model)
            opt.update(model, grads)
            return loss

        try:
            for i in range(steps):
                x = rng.normal(size=(BATCH, DIN)).astype(np.float32)
                y = rng.integers(0, DOUT, size=BATCH).astype(np.int32)
                if mesh is not None:  # the batch over "data"
                    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                    y = jax.device_put(y, NamedSharding(mesh, P("data")))
                out["losses"].append(float(step(model, opt, x, y, jax.random.key(i))))
        except Exception as e:  # noqa: BLE001 - the error is the result
            out["error"] = _err(e)
            return out
    out["params"] = {k: v.tolist() for k, v in _params(lib, model).items()}
    if lib == "refx":
        out["specs"] = {p: _spec(v) for p, v in refx.state_dict({"model": model, "opt": opt})
                        .items() if hasattr(v, "sharding")}
    else:
        from flax import nnx

        out["specs"] = {"/".join(map(str, p)): _spec(v[...]) for p, v in nnx.to_flat_state(
            nnx.state({"model": model, "opt": opt})) if hasattr(v[...], "sharding")}
    return out


def scenario_train():
    """The MLP trained by refx.nn and by NNX on Explicit axes, with and
    without out_sharding; and (refx) on Auto axes and on one device."""
    mesh = _mesh(True)
    res = {}
    for lib in ("refx", "nnx"):
        res[lib] = _train(lib, mesh, 3, P("data", None))
        res[lib + "_without"] = _train(lib, mesh, 1, None)
    res["refx_auto"] = _train("refx", _mesh(False), 3, None)
    res["nnx_auto"] = _train("nnx", _mesh(False), 3, None)
    res["refx_one_device"] = _train("refx", None, 3, None)
    return res


def scenario_init():
    """Where an Explicit mesh puts the MLP and its optimizer: made eagerly,
    inside refx.jit (a sharded init), abstractly (refx.eval_shape), and
    refx.shardings of each."""
    import optax

    mesh = _mesh(True)
    MLP = mlp_class(nn)
    tx = optax.adam(TX_LR)

    def make():
        model = MLP(nn.Rngs(0))
        return {"model": model, "opt": nn.Optimizer(model, tx)}

    def specs_of(tree):
        return {p: _spec(v) if hasattr(v, "sharding") and v.sharding is not None else None
                for p, v in refx.state_dict(tree).items()}

    res = {}
    with jax.set_mesh(mesh):
        eager = make()
        res["eager"] = specs_of(eager)
        jitted = refx.jit(make)()
        res["jit"] = specs_of(jitted)
        abstract = refx.eval_shape(make)
        res["abstract"] = specs_of(abstract)
        res["shardings"] = {  # refx.shardings: NamedShardings in the shape of deref
            p: [list(e) if isinstance(e, tuple) else e for e in s.spec]
            for p, s in zip(refx.state_dict(eager), jax.tree_util.tree_leaves(
                refx.shardings(eager)), strict=True)}
        res["explicit_mesh"] = [str(t) for t in eager["model"].l1.kernel.value.sharding
                                .mesh.axis_types]
    want, got = _params("refx", eager["model"]), _params("refx", jitted["model"])
    res["same_values"] = want.keys() == got.keys() and all(
        np.array_equal(want[k], got[k]) for k in want)
    return res


def scenario_embed_one_row():
    """Embed(1, ...) (a broadcast, not a gather) asked for out_sharding on
    Explicit axes: refx puts it there; NNX ignores the argument."""
    from flax import nnx

    mesh = _mesh(True)
    asked = P("data", None, None)
    res = {}
    with jax.set_mesh(mesh):
        ids = jax.device_put(jnp.zeros((8, 5), jnp.int32), NamedSharding(mesh, P("data", None)))
        for lib, m, jit in (("refx", nn, refx.jit), ("nnx", nnx, nnx.jit)):
            layer = m.Embed(1, 16, embedding_metadata={"sharding": (None, "model")}, rngs=m.Rngs(0))
            y = jit(lambda e, i: e(i, out_sharding=asked))(layer, ids)
            res[lib] = {"spec": _spec(y), "value": np.asarray(y).tolist()}
    return res


def scenario_all():
    """Every scenario, in one process (one JAX start-up)."""
    return {"layers_explicit": scenario_layers("explicit"), "layers_auto": scenario_layers("auto"),
            "dropout": scenario_dropout(), "train": scenario_train(), "init": scenario_init(),
            "embed_one_row": scenario_embed_one_row()}


_RESULT = {}


def results():
    """scenario_all's result, from one subprocess with 8 CPU devices."""
    if not EXPLICIT_AXES:
        pytest.skip(f"JAX {jax.__version__} has no Explicit mesh axes with jax.set_mesh "
                    "and jax.sharding.reshard (JAX 0.7+)")
    for module in ("flax.nnx", "optax"):
        pytest.importorskip(module)
    if not _RESULT:  # run once: a failure is every test's failure, not a rerun each
        import multidevice

        try:
            _RESULT["all"] = multidevice.run(os.path.basename(__file__), "all", devices=8,
                                             timeout=600)
        except AssertionError as e:
            _RESULT["failed"] = e
    if "failed" in _RESULT:
        raise _RESULT["failed"]
    return _RESULT["all"]


def _close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _jax_error(out):
    """The error, without the source location JAX appends (it names the file)."""
    return out["error"].split(" This error occurs at source")[0]


LAYERS = [c[0] for c in _layer_cases()]


@pytest.mark.parametrize("name", LAYERS)
def test_with_out_sharding_each_layer_gives_nnx_output_on_the_asked_sharding(name):
    out = results()["layers_explicit"][name]
    assert out["same_weights"]
    asked = {n: kw for n, _, _, _, _, kw in _layer_cases()}[name]["out_sharding"]
    want = [list(e) if isinstance(e, tuple) else e for e in asked]
    assert out["refx_out"].get("spec") == want, out["refx_out"].get("error")
    assert out["nnx_out"]["spec"] == want
    # the same program on the same weights: the same numbers
    _close(out["refx_out"]["value"], out["nnx_out"]["value"])


@pytest.mark.parametrize("name", LAYERS)
def test_without_out_sharding_a_sharded_contraction_is_jaxs_error_as_in_nnx(name):
    out = results()["layers_explicit"][name]
    if name == "Linear/unsharded_contraction":  # nothing ambiguous: both compute
        assert out["refx_plain"]["spec"] == out["nnx_plain"]["spec"] == ["data", "model"]
        _close(out["refx_plain"]["value"], out["nnx_plain"]["value"])
        return
    assert "error" in out["refx_plain"], out["refx_plain"].get("spec")
    assert out["refx_plain"]["error"].startswith("ShardingTypeError: ")
    assert "out_sharding" in out["refx_plain"]["error"]
    assert out["refx_plain"]["error"] == out["nnx_plain"]["error"]


@pytest.mark.parametrize("name", LAYERS)
def test_on_auto_axes_nothing_changed_and_out_sharding_is_refused_as_in_nnx(name):
    out = results()["layers_auto"][name]
    # no sharding keywords: NNX's numbers and sharding (JAX propagates)
    assert "value" in out["refx_plain"], out["refx_plain"]
    assert out["refx_plain"]["spec"] == out["nnx_plain"]["spec"]
    _close(out["refx_plain"]["value"], out["nnx_plain"]["value"])
    # out_sharding naming Auto axes: whatever JAX says, as NNX (jnp.take under
    # auto_axes accepts it; dot_general, einsum and conv refuse it)
    if "error" in out["nnx_out"]:
        assert _jax_error(out["refx_out"]) == _jax_error(out["nnx_out"])
    else:
        assert out["refx_out"]["spec"] == out["nnx_out"]["spec"]
        _close(out["refx_out"]["value"], out["nnx_out"]["value"])


def test_a_one_row_embed_is_put_on_the_asked_sharding():
    res = results()["embed_one_row"]
    assert res["refx"]["spec"] == ["data", None, None]
    assert res["nnx"]["spec"] == [None, None, "model"]  # NNX ignores out_sharding here
    _close(res["refx"]["value"], res["nnx"]["value"])


def test_dropout_draws_its_mask_on_the_inputs_sharding():
    res = results()["dropout"]
    for case, out in res.items():
        # the values drawn on one device with the same key, on the inputs' sharding
        for lib in ("refx", "refx_resharded"):
            if lib in out:
                assert out[lib] == {"spec": ["data", None, "model"], "as_one_device": True}, (
                    case, lib, out[lib])
        if case in ("explicit ()", "explicit (1,)") or case.startswith("auto"):
            assert out["nnx"] == out["refx"], case
        else:  # a broadcast dimension NNX draws sharded with size 1: its error
            assert out["nnx"]["error"].startswith("ValueError: Sharding spec ("), case


def test_an_mlp_trains_as_in_nnx_with_the_same_out_sharding():
    res = results()["train"]
    refx_run, nnx_run = res["refx"], res["nnx"]
    assert "error" not in refx_run, refx_run["error"]
    _close(refx_run["losses"], nnx_run["losses"])
    assert refx_run["params"].keys() == nnx_run["params"].keys()
    for name in refx_run["params"]:
        _close(refx_run["params"][name], nnx_run["params"][name])
    # every parameter, batch statistic and adam moment on its declared sharding
    assert refx_run["specs"] == nnx_run["specs"]
    for path, spec in SPECS.items():
        assert refx_run["specs"]["model/" + path] == list(spec)
        for moment in ("mu", "nu"):
            assert refx_run["specs"][f"opt/opt_state/0/{moment}/{path}"] == list(spec)
    # NNX needs the out_sharding too: without it, the same JAX error in both
    assert res["refx_without"]["error"] == res["nnx_without"]["error"]
    assert res["refx_without"]["error"].startswith("ShardingTypeError: Contracting dimensions")
    # Auto axes and one device: the same numbers, no out_sharding needed
    for run in ("refx_auto", "nnx_auto", "refx_one_device"):
        _close(res[run]["losses"], refx_run["losses"], tol=1e-5)
    assert res["refx_auto"]["specs"] == refx_run["specs"]


def test_made_eagerly_in_refx_jit_or_abstractly_the_model_and_optimizer_are_on_their_shardings():
    res = results()["init"]
    assert res["explicit_mesh"] == ["AxisType.Explicit"] * 2
    assert res["jit"] == res["eager"] and res["abstract"] == res["eager"]
    assert res["same_values"]
    for path, spec in SPECS.items():
        assert res["eager"]["model/" + path] == list(spec)
        assert res["eager"]["opt/opt_state/0/mu/" + path] == list(spec)
    assert res["eager"]["model/l2/bias"] == [None]  # declared none: replicated
    # refx.shardings: the same specs (a replicated one as P())
    assert {p: s for p, s in res["shardings"].items()} == {
        p: [e for e in s if e is not None] if all(e is None for e in s) else s
        for p, s in res["eager"].items()}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    print("RESULT " + json.dumps(globals()["scenario_" + scenario](*args)))
