"""The XLA path of qmatmul against the NumPy statement (tests/kernels/numpy_qmatmul.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.kernels import quantize_activations, xla
from qdlm_jax.models import project
from qdlm_jax.quant import QuantizedArray, QuantSpec
from tests.kernels import numpy_qmatmul as ref


@pytest.mark.parametrize("bits, group_size, sym", [(4, 128, False), (4, 64, True),
                                                    (8, 128, True), (8, -1, False)])
def test_weight_only_matches_numpy_and_the_old_project_path(bits, group_size, sym):
    rng = np.random.default_rng(bits + group_size)
    w = ref.random_weight(rng, 256, 96, bits=bits, group_size=group_size, sym=sym)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    y = jax.jit(xla.qmatmul)(x, w)
    assert y.shape == (2, 3, 96) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y).reshape(6, 96),
                               ref.weight_only(x.reshape(6, 256), w), rtol=2e-5, atol=2e-5)
    # What quantized_matmul computed before it was routed through qmatmul, bit for bit.
    before = jnp.einsum("...i,oi->...o", x, w.dequantize_storage(x.dtype),
                        preferred_element_type=jnp.float32).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(before))
    np.testing.assert_array_equal(np.asarray(project(x, w)), np.asarray(before))


def test_weight_only_bf16_and_out_in_and_g_idx():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((256, 64)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    w = QuantizedArray.quantize(kernel, QuantSpec(bits=4, group_size=128, sym=False))
    y = xla.qmatmul(x, w)
    assert y.dtype == jnp.bfloat16
    expect = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.dequantize(jnp.bfloat16),
                                                            np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), expect, rtol=1e-2, atol=1e-2)
    # "out_in": x contracts with the stored output axis.
    w_oi = QuantizedArray.quantize(kernel.T, QuantSpec(bits=8, group_size=64),
                                   orientation="out_in")
    x2 = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    np.testing.assert_allclose(np.asarray(xla.qmatmul(x2, w_oi)),
                               np.asarray(x2) @ np.asarray(w_oi.dequantize()), rtol=1e-5,
                               atol=1e-5)
    # act-order group map: column j uses group g_idx[j].
    g_idx = jnp.asarray(rng.permutation(256) // 128, jnp.int32)
    w_g = w.replace(g_idx=g_idx)
    scale = np.asarray(w.scale)[:, np.asarray(g_idx)]
    zero = np.asarray(w.zeros())[:, np.asarray(g_idx)]
    w_hat = scale * (np.asarray(w.codes(), np.float64) - zero)
    x3 = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    np.testing.assert_allclose(np.asarray(xla.qmatmul(x3, w_g)), np.asarray(x3) @ w_hat.T,
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_quantization_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((6, 200)).astype(np.float32) * rng.uniform(0.1, 10, (6, 1))
    x[2] = 0.0  # an all-zero row gets scale 1 and zero codes
    x_q, s_x = quantize_activations(jnp.asarray(x), bits)
    e_q, e_s = ref.quantize_activations(x, bits)
    assert x_q.dtype == jnp.int8 and s_x.shape == (6, 1)
    np.testing.assert_array_equal(np.asarray(x_q), e_q)
    np.testing.assert_array_equal(np.asarray(s_x), e_s)
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(np.asarray(x_q)).max() == qmax  # the largest |x| of a row hits qmax
    assert s_x[2, 0] == 1.0 and not np.asarray(x_q[2]).any()


@pytest.mark.parametrize("act_bits, w_bits, group_size, sym",
                         [(8, 8, -1, True), (4, 4, -1, True), (8, 4, 128, False),
                          (4, 8, 64, True)])
def test_act_quant_matches_integer_formula_and_fake_quant(act_bits, w_bits, group_size, sym):
    rng = np.random.default_rng(act_bits * 10 + w_bits)
    w = ref.random_weight(rng, 256, 48, bits=w_bits, group_size=group_size, sym=sym)
    x = jnp.asarray(rng.standard_normal((7, 256)), jnp.float32)
    y = np.asarray(jax.jit(xla.qmatmul, static_argnames="act_bits")(x, w, act_bits=act_bits))
    expect = ref.act_quant(x, w, act_bits)
    if w.n_groups == 1:  # one int32 dot and two float products: bit-exact
        np.testing.assert_array_equal(y, expect)
    else:  # per-group float sums: the same up to float rounding (contraction, fusion)
        np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())
    x_q, s_x = ref.quantize_activations(x, act_bits)
    fake = (x_q * s_x.astype(np.float64)) @ ref.dequantize(w).T
    np.testing.assert_allclose(y, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())


@pytest.mark.parametrize("act_bits, w_bits, group_size, ags", [
    (4, 4, -1, 32), (8, 8, -1, 128), (4, 4, 128, 32), (8, 4, 32, 128), (4, 8, 64, 64)])
def test_act_groups_match_the_numpy_statement(act_bits, w_bits, group_size, ags):
    """Per-channel weights, activation groups finer and coarser than the weight groups."""
    rng = np.random.default_rng(act_bits + ags + group_size)
    w = ref.random_weight(rng, 256, 48, bits=w_bits, group_size=group_size, sym=True)
    x = rng.standard_normal((7, 256)).astype(np.float32)
    x[:, 3::97] *= 30.0
    x[4, 32:64] = 0.0  # an all-zero group: scale 1, zero codes
    x_q, s_x = quantize_activations(jnp.asarray(x), act_bits, ags)
    e_q, e_s = ref.quantize_activations(x, act_bits, ags)
    assert s_x.shape == (7, 256 // ags)
    np.testing.assert_array_equal(np.asarray(x_q), e_q)
    np.testing.assert_array_equal(np.asarray(s_x), e_s)
    fn = jax.jit(xla.qmatmul, static_argnames=("act_bits", "act_group_size"))
    y = np.asarray(fn(jnp.asarray(x), w, act_bits=act_bits, act_group_size=ags))
    np.testing.assert_array_equal(y, ref.act_quant(x, w, act_bits, ags))
    fake = (e_q * np.repeat(e_s, ags, axis=1).astype(np.float64)) @ ref.dequantize(w).T
    np.testing.assert_allclose(y, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())
    per_token = np.asarray(fn(jnp.asarray(x), w, act_bits=act_bits))
    one_group = np.asarray(fn(jnp.asarray(x), w, act_bits=act_bits, act_group_size=256))
    if group_size == -1:  # one group per row is the per-token formula, bit for bit
        np.testing.assert_array_equal(one_group, per_token)
    else:
        np.testing.assert_allclose(one_group, per_token, rtol=1e-6,
                                   atol=1e-6 * np.abs(per_token).max())


def test_act_group_errors_name_the_value():
    rng = np.random.default_rng(3)
    x = jnp.ones((2, 192), jnp.float32)
    w = ref.random_weight(rng, 192, 16, bits=4, group_size=64, sym=True)
    with pytest.raises(ValueError, match="act_group_size=48 and the weight's group_size=64 "
                                         "do not nest"):
        xla.qmatmul(x, w, act_bits=4, act_group_size=48)
    with pytest.raises(ValueError, match="act_group_size=128 must be a positive divisor of "
                                         "K=192"):
        xla.qmatmul(x, w, act_bits=4, act_group_size=128)
    with pytest.raises(ValueError, match="needs act_bits"):
        xla.qmatmul(x, w, act_group_size=64)


def test_act_quant_bf16_output_dtype_and_leading_dims():
    rng = np.random.default_rng(1)
    w = ref.random_weight(rng, 128, 32, bits=8, group_size=-1, sym=True)
    x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.bfloat16)
    y = xla.qmatmul(x, w, act_bits=8)
    assert y.shape == (2, 3, 32) and y.dtype == jnp.bfloat16
    expect = ref.act_quant(x.reshape(6, 128), w, 8).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y).reshape(6, 32), np.asarray(expect))


def test_bad_operands_raise_value_errors_naming_the_value():
    rng = np.random.default_rng(2)
    w = ref.random_weight(rng, 128, 32, bits=4, group_size=128, sym=True)
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(ValueError, match="act_bits=3"):
        xla.qmatmul(x, w, act_bits=3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        xla.qmatmul(jnp.ones((2, 64)), w)
    with pytest.raises(ValueError, match="int32"):
        xla.qmatmul(jnp.ones((2, 128), jnp.int32), w)
    with pytest.raises(ValueError, match="QuantizedArray"):
        xla.qmatmul(x, jnp.ones((128, 32)))
    w_oi = QuantizedArray.quantize(jnp.ones((32, 128)), QuantSpec(bits=4, group_size=128),
                                   orientation="out_in")
    with pytest.raises(ValueError, match="in_out"):
        xla.qmatmul(jnp.ones((2, 32)), w_oi, act_bits=8)
    with pytest.raises(ValueError, match="g_idx"):
        xla.qmatmul(x, w.replace(g_idx=jnp.zeros((128,), jnp.int32)), act_bits=8)


def test_a_chain_of_packed_matmuls_unpacks_one_weight_at_a_time():
    """`after_input`: a jitted chain of packed matmuls holds about one unpacked weight at a
    time, not all of them (XLA's CPU scheduler otherwise unpacks every weight first, since
    the unpacking depends on the weight alone)."""
    d = 512
    ws = [QuantizedArray.quantize(jnp.asarray(np.random.default_rng(i).normal(size=(d, d)),
                                              jnp.float32), QuantSpec(bits=4, group_size=128))
          for i in range(6)]
    x = jnp.ones((4, d), jnp.float32)

    def temp_bytes(n):
        def chain(x, ws):
            for w in ws:
                x = jnp.tanh(xla.qmatmul(x, w))
            return x
        return jax.jit(chain).lower(x, ws[:n]).compile().memory_analysis().temp_size_in_bytes

    one_weight = d * d * 4
    assert temp_bytes(6) - temp_bytes(1) < one_weight, (temp_bytes(1), temp_bytes(6))
