"""refx.nn layers against Flax NNX on the same weights.

Each test builds the NNX layer and the refx.nn layer with the same
constructor arguments, copies NNX's parameters into the refx layer *by name*
(so the names and shapes of every parameter must agree: a different layout
fails the copy), and compares outputs and parameter gradients to float32
tolerance.  Skipped where flax is not installed for the JAX under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refx
import refx.nn as nn

nnx = pytest.importorskip("flax.nnx")

TOL = dict(rtol=2e-5, atol=2e-5)


def nnx_params(m):
    """{path (tuple of str): array} of an NNX module's Params."""
    flat = flat_state(nnx.state(m, nnx.Param))
    out = {}
    for path, v in dict(flat).items():
        val = v.get_value() if hasattr(v, "get_value") else v.value
        out[tuple(str(p) for p in path)] = val
    return out


def flat_state(state):
    if hasattr(nnx, "to_flat_state"):
        return nnx.to_flat_state(state)
    return state.flat_state()


def refx_params(m):
    return {p: r for p, r in refx.get_partition(m, nn.Param).items() if r is not refx.NOTHING}


def copy_params(src_nnx, dst):
    """Write NNX's parameters into the refx.nn module, by name; the two sets of
    names and every shape must agree."""
    src = nnx_params(src_nnx)
    dst_refs = refx_params(dst)
    assert set(src) == set(dst_refs), (sorted(src), sorted(dst_refs))
    for path, r in dst_refs.items():
        assert r.value.shape == src[path].shape, path
        assert r.value.dtype == src[path].dtype, path
        r.value = jnp.asarray(src[path])


def make(name, *args, **kwargs):
    """The NNX layer and the refx.nn layer, same arguments (NNX skipped when
    this flax version lacks the option)."""
    try:
        a = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(0))
    except TypeError as e:  # an option this flax version does not have
        pytest.skip(f"flax {name} has no such option: {e}")
    b = getattr(nn, name)(*args, **kwargs, rngs=nn.Rngs(1))
    copy_params(a, b)
    return a, b


def grads_equal(a, b, f):
    """Parameter gradients of sum(f(layer)**2) agree (by name)."""
    ga = nnx.grad(lambda m: jnp.sum(f(m) ** 2))(a)
    ga = {tuple(str(p) for p in path): (v.get_value() if hasattr(v, "get_value") else v.value)
          for path, v in dict(flat_state(ga)).items()}
    gb = refx.grad(lambda m: jnp.sum(f(m) ** 2), wrt=nn.Param)(b)
    gb = {p: v.value for p, v in gb.items() if isinstance(v, refx.Value)}
    assert set(ga) == set(gb)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-4, err_msg=str(k))


def x_of(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("kw", [{}, {"use_bias": False}, {"dtype": jnp.float16},
                                {"precision": jax.lax.Precision.HIGHEST}])
def test_linear(kw):
    a, b = make("Linear", 3, 5, **kw)
    x = x_of(4, 2, 3)
    np.testing.assert_allclose(a(x), b(x), **(TOL if "dtype" not in kw else dict(rtol=2e-3, atol=2e-3)))
    assert b(x).dtype == a(x).dtype
    if "dtype" not in kw:
        grads_equal(a, b, lambda m: m(x))


def test_linear_general():
    a, b = make("LinearGeneral", (3, 2), (4, 5), axis=(-2, -1))
    x = x_of(6, 3, 2)
    np.testing.assert_allclose(a(x), b(x), **TOL)
    grads_equal(a, b, lambda m: m(x))


@pytest.mark.parametrize("bias", [None, (8, 7)])
def test_einsum(bias):
    a, b = make("Einsum", "nta,hab->nthb", (8, 3, 7), bias)
    x = x_of(2, 4, 3)
    np.testing.assert_allclose(a(x), b(x), **TOL)
    grads_equal(a, b, lambda m: m(x))


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2),
    dict(kernel_size=(3, 3), padding="VALID"),
    dict(kernel_size=(3, 3), padding=1),
    dict(kernel_size=(3, 3), padding=((1, 2), (0, 1))),
    dict(kernel_size=(3,), padding="CAUSAL"),
    dict(kernel_size=(3, 3), kernel_dilation=2),
    dict(kernel_size=(3, 3), input_dilation=2, padding=1),
    dict(kernel_size=(3, 3), feature_group_count=2),
    dict(kernel_size=(3, 3), padding="CIRCULAR"),
    dict(kernel_size=(2, 2, 2)),
    dict(kernel_size=(3, 3), use_bias=False),
]


@pytest.mark.parametrize("kw", CONV_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_conv(kw):
    ks = kw["kernel_size"]
    nd = 1 if isinstance(ks, int) else len(ks)
    a, b = make("Conv", 4, 6, **kw)
    x = x_of(2, *([7] * nd), 4)
    np.testing.assert_allclose(a(x), b(x), **TOL)
    grads_equal(a, b, lambda m: m(x))


def test_conv_batch_dims_and_feature_check():
    a, b = make("Conv", 4, 6, (3, 3))
    x = x_of(2, 3, 5, 5, 4)  # two batch dims
    np.testing.assert_allclose(a(x), b(x), **TOL)
    with pytest.raises(ValueError, match=r"Conv\(in_features=4\): the input's last \(feature\) axis has size 3"):
        b(x_of(2, 5, 5, 3))


@pytest.mark.parametrize("kw", [dict(kernel_size=(3, 3)), dict(kernel_size=(3, 3), strides=2),
                                dict(kernel_size=(3, 3), padding="VALID"),
                                dict(kernel_size=(3, 3), transpose_kernel=True),
                                dict(kernel_size=(3, 3), kernel_dilation=2),
                                dict(kernel_size=(3, 3), strides=2, padding="CIRCULAR"),
                                dict(kernel_size=(3,), strides=2)])
def test_conv_transpose(kw):
    nd = len(kw["kernel_size"])
    a, b = make("ConvTranspose", 4, 6, **kw)
    x = x_of(2, *([5] * nd), 4)
    np.testing.assert_allclose(a(x), b(x), **TOL)
    grads_equal(a, b, lambda m: m(x))


def test_embed_and_attend():
    a, b = make("Embed", 10, 4)
    ids = jnp.array([[1, 2, 9], [0, 0, 3]])
    np.testing.assert_allclose(a(ids), b(ids), **TOL)
    q = x_of(3, 4)
    np.testing.assert_allclose(a.attend(q), b.attend(q), **TOL)
    grads_equal(a, b, lambda m: m.attend(m(ids)))
    with pytest.raises(ValueError, match="integer"):
        b(jnp.ones(3))


@pytest.mark.parametrize("kw", [{}, {"use_bias": False, "use_scale": False}, {"epsilon": 1e-3},
                                {"use_fast_variance": False}, {"reduction_axes": (-2, -1), "feature_axes": -1}])
def test_layer_norm(kw):
    a, b = make("LayerNorm", 6, **kw)
    x = x_of(3, 5, 6) * 3 + 1
    np.testing.assert_allclose(a(x), b(x), **TOL)
    if "use_scale" not in kw:
        grads_equal(a, b, lambda m: m(x) * jnp.arange(6.0))


@pytest.mark.parametrize("kw", [{}, {"use_scale": False}, {"epsilon": 1e-2}])
def test_rms_norm(kw):
    a, b = make("RMSNorm", 6, **kw)
    x = x_of(3, 6) * 2 + 0.5
    np.testing.assert_allclose(a(x), b(x), **TOL)
    if "use_scale" not in kw:
        grads_equal(a, b, lambda m: m(x) * jnp.arange(6.0))


@pytest.mark.parametrize("kw", [dict(num_groups=2), dict(num_groups=None, group_size=3),
                                dict(num_groups=3, use_bias=False)])
def test_group_norm(kw):
    a, b = make("GroupNorm", 6, **kw)
    x = x_of(2, 4, 4, 6) * 2 + 1
    np.testing.assert_allclose(a(x), b(x), **TOL)
    grads_equal(a, b, lambda m: m(x) * jnp.arange(6.0))


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "epsilon": 1e-3}, {"axis": 1},
                                {"use_bias": False, "use_scale": False}, {"use_fast_variance": False}])
def test_batch_norm_running_stats_follow_nnx(kw):
    """Training steps on NHWC conv-shaped inputs: outputs and running mean/var
    equal NNX's after every step; then evaluation uses them."""
    axis = kw.get("axis", -1)
    a, b = make("BatchNorm", 5, **kw)
    shape = (4, 5, 3, 3) if axis == 1 else (4, 3, 3, 5)
    for step in range(4):
        x = x_of(*shape, seed=step) * (step + 1) + step
        np.testing.assert_allclose(a(x), b(x), **TOL)
        np.testing.assert_allclose(a.mean.value, b.mean.value, **TOL)
        np.testing.assert_allclose(a.var.value, b.var.value, **TOL)
    assert b.mean.value.shape == (5,)
    a.eval()
    b.eval()
    x = x_of(*shape, seed=9)
    np.testing.assert_allclose(a(x), b(x), **TOL)


def test_batch_norm_under_refx_jit_and_grad_matches_nnx():
    a, b = make("BatchNorm", 5, momentum=0.8)
    x = x_of(8, 5)
    f = refx.jit(lambda m, x: m(x))
    for _ in range(3):
        np.testing.assert_allclose(a(x), f(b, x), **TOL)
    np.testing.assert_allclose(a.var.value, b.var.value, **TOL)
    grads_equal(a, b, lambda m: m(x) * jnp.arange(5.0))


def test_batch_norm_feature_axis_mismatch_is_an_error():
    bn = nn.BatchNorm(16, rngs=nn.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm\(num_features=16, axis=-1\): the input's feature "
                       r"axis -1 has size 8, not 16 \(input shape \(2, 16, 16, 8\)\)"):
        bn(jnp.ones((2, 16, 16, 8)))
    assert bn.mean.value.shape == (16,)  # nothing written


def test_dropout_matches_nnx_semantics():
    d = nn.Dropout(0.5, rngs=nn.Rngs(0))
    x = jnp.ones((1000,))
    y = d(x)
    assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}
    assert 400 < int((y == 0).sum()) < 600
    assert not np.array_equal(np.asarray(d(x)), np.asarray(y))  # a fresh key each call
    np.testing.assert_array_equal(d(x, deterministic=True), x)
    d.eval()
    np.testing.assert_array_equal(d(x), x)
    db = nn.Dropout(0.5, broadcast_dims=(0,), rngs=nn.Rngs(0))
    yb = db(jnp.ones((4, 50)))
    assert (yb == yb[0]).all()


def test_dropout_without_rngs_in_training_is_an_error():
    d = nn.Dropout(0.1)
    with pytest.raises(ValueError, match=r"Dropout\(rate=0.1\) in training mode \(deterministic=False\) "
                       r"has no random keys: pass rngs=nn.Rngs"):
        d(jnp.ones(3))
    np.testing.assert_array_equal(d(jnp.ones(3), deterministic=True), jnp.ones(3))
    assert d(jnp.ones(3), rngs=nn.Rngs(0)).shape == (3,)


MHA_CASES = [
    dict(),
    dict(qkv_features=8, out_features=5),
    dict(use_bias=False),
    dict(normalize_qk=True),
    dict(num_kv_heads=1),
]


@pytest.mark.parametrize("kw", MHA_CASES, ids=lambda kw: ",".join(kw) or "default")
def test_multi_head_attention(kw):
    a, b = make("MultiHeadAttention", 2, 6, decode=False, **kw)
    x = x_of(2, 5, 6)
    np.testing.assert_allclose(a(x), b(x), **TOL)
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(a(x, mask=mask), b(x, mask=mask), **TOL)
    kv = x_of(2, 7, 6, seed=1)
    np.testing.assert_allclose(a(x, kv), b(x, kv), **TOL)
    grads_equal(a, b, lambda m: m(x, mask=mask))


def test_causal_mask_matches_nnx():
    x = jnp.ones((3, 6))
    np.testing.assert_array_equal(nnx.make_causal_mask(x), nn.make_causal_mask(x))
    np.testing.assert_array_equal(nnx.make_attention_mask(x > 0, x > 0), nn.make_attention_mask(x > 0, x > 0))


def test_attention_decode_with_cache_matches_full_causal_pass_and_nnx():
    a, b = make("MultiHeadAttention", 2, 6, decode=False)
    x = x_of(2, 5, 6)
    full = b(x, mask=nn.make_causal_mask(jnp.ones((2, 5))))
    b.init_cache((2, 5, 6))
    a.init_cache((2, 5, 6))
    assert isinstance(b.cached_key, nn.Cache) and b.cached_key.collection == "cache"
    step = refx.jit(lambda m, t: m(t, decode=True))
    outs = []
    for t in range(5):
        outs.append(step(b, x[:, t:t + 1]))
        np.testing.assert_allclose(a(x[:, t:t + 1], decode=True), outs[-1], **TOL)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(b.cache_index.value) == 5


def test_attention_dropout_needs_rngs_and_is_deterministic_in_eval():
    m = nn.MultiHeadAttention(2, 4, dropout_rate=0.5, deterministic=False, rngs=nn.Rngs(0))
    x = x_of(2, 3, 4)
    assert not np.allclose(m(x), m(x))
    m.eval()
    np.testing.assert_allclose(m(x), m(x))


def test_lstm_cell_and_gru_cell():
    for name in ("LSTMCell", "GRUCell", "SimpleCell"):
        a, b = make(name, 3, 4)
        x = x_of(2, 3)
        carry = b.initialize_carry((2, 3))
        ca, ya = a(carry, x)
        cb, yb = b(carry, x)
        np.testing.assert_allclose(ya, yb, **TOL)
        for u, v in zip(jax.tree.leaves(ca), jax.tree.leaves(cb), strict=True):
            np.testing.assert_allclose(u, v, **TOL)
        grads_equal(a, b, lambda m, carry=carry, x=x: m(carry, x)[1])


@pytest.mark.parametrize("kw", [{}, {"reverse": True}, {"reverse": True, "keep_order": True},
                                {"time_major": True}, {"return_carry": True}])
def test_rnn_over_refx_scan_matches_nnx(kw):
    cell_a = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    cell_b = nn.LSTMCell(3, 4, rngs=nn.Rngs(1))
    copy_params(cell_a, cell_b)
    a = nnx.RNN(cell_a, **kw)
    b = nn.RNN(cell_b, **kw)
    x = x_of(6, 2, 3) if kw.get("time_major") else x_of(2, 6, 3)
    ya, yb = a(x), b(x)
    for u, v in zip(jax.tree.leaves(ya), jax.tree.leaves(yb), strict=True):
        np.testing.assert_allclose(u, v, **TOL)
    if not kw:
        grads_equal(a, b, lambda m: m(x))


def test_sequential_and_activations():
    s = nn.Sequential(nn.Linear(3, 4, rngs=nn.Rngs(0)), nn.relu, nn.Linear(4, 2, rngs=nn.Rngs(1)))
    x = x_of(5, 3)
    l1, l2 = s.layers[0], s.layers[2]
    np.testing.assert_allclose(s(x), l2(jax.nn.relu(l1(x))), **TOL)
    y = refx.jit(lambda m, x: m(x))(s, x)
    np.testing.assert_allclose(y, s(x), **TOL)
    for name in ("relu", "gelu", "silu", "softmax", "sigmoid", "tanh", "log_softmax", "elu"):
        assert getattr(nn, name) is getattr(nnx, name) or callable(getattr(nn, name))
