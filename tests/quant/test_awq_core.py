"""AWQ core: llm-awq's quantizer, scale and clip searches, and scale folding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant import awq_core as A
from qdlm_jax.quant import quantizer_core as qc
from tests.quant import numpy_awq as R


def outlier_inputs(n_tokens=1024, n_in=256, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((n_in, 8))
    x = rng.standard_normal((n_tokens, 8)) @ basis.T * 0.5 + rng.standard_normal(
        (n_tokens, n_in))
    x[:, rng.choice(n_in, 6, replace=False)] *= 25.0  # salient (outlier) channels
    return x.astype(np.float32)


def weights(kind, shape, seed):
    """fp32: N(0, 0.05); bf16: the same rounded to bf16 values (what checkpoints hold);
    ties: the integers -6..6 / 32 (range 12/32 per group), so w / scale = 1.25 j at 4 bits
    lands exactly on .5 for j = +-2, +-6 (min / scale = -7.5: the zero point is a tie too)
    while the scale itself is inexact;
    clipped: bf16 values clamped per group of 128 at 0.8 of the max (as the clip search does:
    the group then spans exactly [-m, m] and min / scale is exactly -maxq / 2)."""
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "ties":
        return (rng.integers(-6, 7, shape) / 32).astype(np.float32)
    if kind in ("bf16", "clipped"):
        w = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
    if kind == "clipped":
        m = 0.8 * np.abs(w.reshape(shape[0], -1, 128)).max(-1)
        w = R.apply_clip(w, m)
    return w


KINDS = ("fp32", "bf16", "ties", "clipped")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits, sym", [(3, False), (4, False), (8, False), (4, True)])
def test_quantizer_is_bit_equal_to_llm_awq(kind, bits, sym):
    w = weights(kind, (64, 256), bits)
    ref_hat, ref_q, ref_s, ref_z = R.quantize(w, bits, 128, zero_point=not sym)
    codes, scale, zero = A.awq_quantize_codes(jnp.asarray(w), bits=bits, group_size=128,
                                              sym=sym)
    half = 2 ** (bits - 1) if sym else 0  # signed AWQ value stored with offset 2^(b-1)
    np.testing.assert_array_equal(np.asarray(codes) - half, ref_q)
    np.testing.assert_array_equal(np.asarray(scale), ref_s)
    np.testing.assert_array_equal(np.asarray(zero) - half, ref_z)
    hat = A.pseudo_quantize(jnp.asarray(w), bits=bits, group_size=128, sym=sym)
    np.testing.assert_array_equal(np.asarray(hat), ref_hat)
    np.testing.assert_array_equal(np.asarray(qc.dequantize_codes(codes, scale, zero)), ref_hat)
    # jitted too (XLA's reciprocal rewrite happens under jit)
    jq = jax.jit(A.awq_quantize_codes, static_argnames=("bits", "group_size", "sym"))
    np.testing.assert_array_equal(
        np.asarray(jq(jnp.asarray(w), bits=bits, group_size=128, sym=sym)[0]) - half, ref_q)


def _reciprocal_division_quantizer(w, bits, group_size):
    """The quantizer as it was before `exact_div`: plain `/` that XLA turns into a multiply
    by a reciprocal (kept here to show the bit-equality test can fail)."""
    out, n_in = w.shape
    wg = w.reshape(out, n_in // group_size, group_size)
    mx, mn = wg.max(-1), wg.min(-1)
    scale = jnp.maximum(mx - mn, 1e-5) / (2 ** bits - 1)
    zero = jnp.clip(-jnp.round(mn / scale), 0, 2 ** bits - 1)
    q = jnp.clip(jnp.round(wg / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    return q.reshape(out, n_in), scale, zero


@pytest.mark.parametrize("kind", ["ties", "clipped"])
def test_reciprocal_division_would_fail_the_bit_equality_test(kind):
    w = weights(kind, (64, 256), 4)
    _, ref_q, ref_s, ref_z = R.quantize(w, 4, 128)
    q, s, z = jax.jit(_reciprocal_division_quantizer, static_argnums=(1, 2))(
        jnp.asarray(w), 4, 128)
    differs = (np.mean(np.asarray(q) != ref_q), np.mean(np.asarray(s) != ref_s),
               np.mean(np.asarray(z) != ref_z))
    assert differs[0] > 0.001 and differs[1] > 0.1, differs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_matches_llm_awq(kind, bits):
    """Same per-(channel, group) clip as llm-awq's auto_clip_layer, on every (n // 512)-th
    of 1500 tokens (step 2). Documented exception: a near-tie, where the reference's errors
    of the two choices are within 1e-5 relative (the output sums are accumulated in a
    different order)."""
    w = weights(kind, (64, 256), 20 + bits)
    x = outlier_inputs(1500, 256, seed=bits)
    ref, errs = R.auto_clip(w, x, bits, 128, return_errors=True)
    ours = np.asarray(jax.jit(lambda x, w: A.search_clip(x, w, bits=bits, group_size=128,
                                                         sym=False))(x, jnp.asarray(w)))
    org = np.abs(w.reshape(64, 2, 128)).max(-1)
    def step(m):  # the shrink step chosen
        return np.rint((1 - m / org) * 20).astype(int)

    i_ref, i_ours = step(ref), step(ours)
    differ = i_ref != i_ours
    np.testing.assert_array_equal(ours[~differ], ref[~differ])  # same step, same float max
    e_ref = np.take_along_axis(errs, i_ref[None], 0)[0]
    e_ours = np.take_along_axis(errs, i_ours[None], 0)[0]
    assert np.all(np.abs(e_ours - e_ref)[differ] <= 1e-5 * e_ref[differ])
    assert differ.mean() <= 0.01, differ.mean()


def _np_mlp(down):
    def block(x, ws):
        g, u = (x @ w.T for w in ws)
        return (g / (1 + np.exp(-g)) * u) @ down.T
    return block


def _jax_mlp(down):
    def block(x, ws):
        g, u = (x @ w.T for w in ws)
        return (jax.nn.silu(g) * u) @ down.T
    return block


@pytest.mark.parametrize("kind", ["fp32", "bf16", "ties"])
def test_scale_search_matches_llm_awq(kind):
    """The same ratio and scales within float rounding (pow and sums), for one linear, a
    q/k/v-like stack, and an inspected module (an MLP)."""
    x = outlier_inputs(512, 128, seed=7)
    ws = [weights(kind, (n, 128), 30 + n) for n in (64, 64, 48)]
    down = weights(kind, (128, 64), 5)
    cases = [(ws[:1], None, None), (ws, None, None), (ws[:2], _np_mlp(down), _jax_mlp(down))]
    for group, np_block, jax_block in cases:
        ref_s, ref_r, ref_hist = R.search_scale(x, group, 3, 64, True,
                                                **({"block": np_block} if np_block else {}))
        s, r, losses = A.search_scales(jnp.asarray(x), [jnp.asarray(w) for w in group], bits=3,
                                       group_size=64, sym=False, block_fn=jax_block)
        assert float(r) == np.float32(ref_r), (float(r), ref_r, ref_hist, np.asarray(losses))
        np.testing.assert_allclose(np.asarray(s), ref_s, rtol=2e-6)
        np.testing.assert_allclose(np.asarray(losses), ref_hist, rtol=2e-4)


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
