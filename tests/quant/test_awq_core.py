"""AWQ core: llm-awq's quantizer, scale and clip searches, and scale folding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant import awq_core as A
from qdlm_jax.quant import quantizer_core as qc


def numpy_pseudo_quantize(w, bits, group_size, zero_point=True):
    """llm-awq pseudo_quantize_tensor, stated in NumPy."""
    shape = w.shape
    w = w.reshape(-1, group_size).astype(np.float32)
    if zero_point:
        max_val, min_val = w.max(1, keepdims=True), w.min(1, keepdims=True)
        max_int, min_int = 2 ** bits - 1, 0
        scales = np.maximum(max_val - min_val, 1e-5) / max_int
        zeros = np.clip(-np.round(min_val / scales), min_int, max_int)
    else:
        max_val = np.maximum(np.abs(w).max(1, keepdims=True), 1e-5)
        max_int, min_int = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scales, zeros = max_val / max_int, 0
    return ((np.clip(np.round(w / scales) + zeros, min_int, max_int) - zeros) * scales).reshape(
        shape)


def outlier_inputs(n_tokens=1024, n_in=256, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((n_in, 8))
    x = rng.standard_normal((n_tokens, 8)) @ basis.T * 0.5 + rng.standard_normal(
        (n_tokens, n_in))
    x[:, rng.choice(n_in, 6, replace=False)] *= 25.0  # salient (outlier) channels
    return x.astype(np.float32)


@pytest.mark.parametrize("bits, sym", [(3, False), (4, True), (8, False)])
def test_pseudo_quantize_matches_llm_awq(bits, sym):
    w = (0.05 * np.random.default_rng(bits).standard_normal((16, 256))).astype(np.float32)
    ours = A.pseudo_quantize(jnp.asarray(w), bits=bits, group_size=128, sym=sym)
    np.testing.assert_allclose(np.asarray(ours), numpy_pseudo_quantize(w, bits, 128, not sym),
                               rtol=1e-6, atol=1e-7)
    codes, scale, zero = A.awq_quantize_codes(jnp.asarray(w), bits=bits, group_size=128, sym=sym)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    deq = np.asarray(qc.dequantize_codes(codes, scale, zero))
    np.testing.assert_allclose(deq, np.asarray(ours), rtol=1e-6, atol=1e-7)


def test_folding_scales_leaves_the_float_function_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(outlier_inputs(64, 128))
    gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(128), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((n, 128)), jnp.float32) for n in (32, 48)]
    s = A.scales_for_ratio(A.activation_scale(x), 0.5)

    def norm_then_linears(x, gamma, ws):
        n = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * gamma
        return [n @ w.T for w in ws]

    gamma2, ws2, _ = A.fold_scales(gamma, ws, s)
    for a, b in zip(norm_then_linears(x, gamma, ws), norm_then_linears(x, gamma2, ws2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # linear -> linear (e.g. up_proj -> down_proj), model layout [in, out] kernels
    w_prev = jnp.asarray(rng.standard_normal((96, 128)), jnp.float32)  # [in_prev, in]
    b_prev = jnp.asarray(rng.standard_normal(128), jnp.float32)
    w_next = jnp.asarray(rng.standard_normal((128, 40)), jnp.float32)  # [in, out]
    p2, (n2,), b2 = A.fold_scales(w_prev, [w_next], s, prev_bias=b_prev, layout="in_out")
    z = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    np.testing.assert_allclose(np.asarray((z @ p2 + b2) @ n2),
                               np.asarray((z @ w_prev + b_prev) @ w_next), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_output_error_is_below_rtn(bits):
    x = outlier_inputs(seed=bits)
    w = (0.05 * np.random.default_rng(10 + bits).standard_normal((64, 256))).astype(np.float32)
    kw = dict(bits=bits, group_size=128, sym=False)
    search = jax.jit(lambda x, w: A.search_scales(x, [w], **kw))
    s, ratio, losses = search(jnp.asarray(x), jnp.asarray(w))
    assert losses.shape == (20,) and float(losses.min()) < float(losses[0])  # r > 0 helps
    ws = A.apply_scales([jnp.asarray(w)], s)[0]
    x_in = jnp.asarray(x) / s  # what the scaled weights see after folding
    max_val = jax.jit(lambda x, w: A.search_clip(x, w, **kw))(x_in, ws)
    w_awq = A.pseudo_quantize(A.apply_clip(ws, max_val), **kw)
    y = x @ w.T
    err_awq = np.linalg.norm(y - np.asarray(x_in @ w_awq.T))
    err_rtn = np.linalg.norm(y - x @ np.asarray(A.pseudo_quantize(jnp.asarray(w), **kw)).T)
    err_rtn_gptq_grid = np.linalg.norm(y - x @ np.asarray(qc.rtn(jnp.asarray(w), **kw)).T)
    assert err_awq < 0.8 * min(err_rtn, err_rtn_gptq_grid), (err_awq, err_rtn,
                                                               err_rtn_gptq_grid)


def test_shared_input_group_and_block_fn():
    x = jnp.asarray(outlier_inputs(256, 128, seed=5))
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(0.05 * rng.standard_normal((n, 128)), jnp.float32)
               for n in (64, 32, 32))

    def block(x, ws):  # a toy attention-like module: output depends on q k^T and v
        qq, kk, vv = (x @ w.T for w in ws)
        return jax.nn.softmax(qq[:, :32] @ kk.T / 8.0, axis=-1) @ vv

    s, ratio, losses = A.search_scales(x, [q, k, v], bits=4, group_size=64, sym=True,
                                       block_fn=block)
    assert s.shape == (128,) and bool(jnp.all(s > 0)) and 0 <= float(ratio) < 1
    assert float(losses[jnp.argmin(losses)]) <= float(losses[0])
    # clip search never increases the per-group error relative to no clipping
    max_val = A.search_clip(x, q, bits=4, group_size=64, sym=True, n_sample=64)
    assert bool(jnp.all(max_val <= jnp.abs(q).reshape(64, 2, 64).max(-1) + 1e-7))


def test_bad_bits_and_group():
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        A.search_scales(jnp.ones((4, 64)), [jnp.ones((8, 64))], bits=5, group_size=32, sym=True)
    with pytest.raises(ValueError, match="does not divide the input width 64"):
        A.search_clip(jnp.ones((4, 64)), jnp.ones((8, 64)), bits=4, group_size=48, sym=True)
