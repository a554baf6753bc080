"""QuantizedExperts: per-expert group RTN against a NumPy statement, real packed storage, the
packed expert matmul inside `moe` against the dequantized float experts, pytree and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdlm_jax  # noqa: F401  (binds the packed types to their ops)
from qdlm_jax.models.experts import expert_project, grouped_matmul, moe
from qdlm_jax.quant.packing import packed_length
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec

E, N_IN, N_OUT = 4, 32, 24


def numpy_expert_rtn(w, *, bits, group_size, sym):
    """Per-expert group RTN of w [E, in, out] on AutoGPTQ's grid, in float32 NumPy (true
    divisions, round half to even): codes [E, out, in], scale and zero [E, out, groups] and
    w_hat [E, in, out]."""
    w = np.asarray(w, np.float32)
    e, n_in, n_out = w.shape
    g = n_in if group_size == -1 else group_size
    maxq = np.float32(2 ** bits - 1)
    wg = w.transpose(0, 2, 1).reshape(e, n_out, n_in // g, g)  # [E, out, groups, g]
    xmin = np.minimum(wg.min(-1), 0)
    xmax = np.maximum(wg.max(-1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, -1, xmin), np.where(dead, 1, xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float32)
    zero = (np.full_like(scale, (maxq + 1) / 2) if sym
            else np.round(-xmin / scale).astype(np.float32))
    q = np.clip(np.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    w_hat = (scale[..., None] * (q - zero[..., None])).reshape(e, n_out, n_in)
    return (q.reshape(e, n_out, n_in).astype(np.int64), scale, zero,
            w_hat.transpose(0, 2, 1).astype(np.float32))


def _experts(seed=0, shape=(E, N_IN, N_OUT)):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[1, :8, 3] = 0.0  # an all-zero group of expert 1, output 3
    w[2, :, 5] = np.abs(w[2, :, 5])  # a channel with no negative weight (xmin = 0)
    return jnp.asarray(w)


@pytest.mark.parametrize("bits, group_size, sym", [(4, 8, False), (3, -1, True),
                                                   (2, 16, False), (8, 8, True)])
def test_dequantize_equals_the_numpy_statement(bits, group_size, sym):
    w = _experts()
    q = QuantizedExperts.quantize(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    codes, scale, zero, w_hat = numpy_expert_rtn(w, bits=bits, group_size=group_size, sym=sym)
    groups = N_IN // (N_IN if group_size == -1 else group_size)
    assert q.shape == (E, N_IN, N_OUT) and q.ndim == 3 and q.num_experts == E
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (E, N_OUT, packed_length(N_IN, bits))
    assert q.scale.shape == (E, N_OUT, groups) and q.sym == sym
    assert (q.zero is None) == sym
    if not sym:
        assert q.zero.shape == (E, N_OUT, packed_length(groups, bits))
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    np.testing.assert_array_equal(np.asarray(q.zeros()), zero)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), w_hat)
    for e in range(E):  # each expert is its own 2-D QuantizedArray
        np.testing.assert_array_equal(np.asarray(q.expert(e).dequantize()), w_hat[e])


def test_from_codes_and_storage_bytes():
    w = _experts(1)
    q = QuantizedExperts.quantize(w, QuantSpec(bits=4, group_size=8))
    again = QuantizedExperts.from_codes(q.codes().astype(jnp.int32), q.scale, q.zeros(), bits=4,
                                        group_size=8, sym=False)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # half a byte per weight, a fp32 scale and half a byte of zero point per group
    assert q.nbytes == E * N_OUT * (N_IN // 2 + 4 * (N_IN // 8) + (N_IN // 8) // 2)
    with pytest.raises(ValueError, match="does not divide the input width 32"):
        QuantizedExperts.quantize(w, QuantSpec(bits=4, group_size=12))
    with pytest.raises(TypeError, match=r"only supports \[...\]"):
        q[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moe_on_packed_experts_equals_moe_on_the_dequantized_experts(dtype):
    h, inter = 32, 24
    gate_up = _experts(2, (E, h, 2 * inter))
    down = _experts(3, (E, inter, h))
    spec = QuantSpec(bits=4, group_size=8)
    q_gate_up, q_down = QuantizedExperts.quantize(gate_up, spec), QuantizedExperts.quantize(
        down, spec)
    rng = np.random.default_rng(4)
    n, k = 37, 2  # ragged groups; expert 3 never chosen
    x = jnp.asarray(rng.standard_normal((n, h)), dtype)
    top_ids = jnp.asarray(np.stack([rng.permutation(3)[:k] for _ in range(n)]), jnp.int32)
    top_w = jnp.asarray(rng.random((n, k)), jnp.float32)

    packed = jax.jit(moe)(x, q_gate_up, q_down, top_ids, top_w)
    ref = jax.jit(moe)(x, q_gate_up.dequantize(dtype), q_down.dequantize(dtype), top_ids, top_w)
    assert packed.dtype == dtype
    np.testing.assert_array_equal(np.asarray(packed, np.float32), np.asarray(ref, np.float32))

    sizes = jnp.asarray([10, 0, 20, 7], jnp.int32)
    rows = jnp.asarray(rng.standard_normal((37, h)), dtype)
    np.testing.assert_array_equal(
        np.asarray(expert_project(rows, q_gate_up, sizes), np.float32),
        np.asarray(grouped_matmul(rows, q_gate_up.dequantize(dtype), sizes).astype(dtype),
                   np.float32))


def test_groups_of_experts_concatenated_equal_the_layer_packed_at_once():
    w = _experts(5)
    spec = QuantSpec(bits=4, group_size=8, sym=False)
    whole = QuantizedExperts.quantize(w, spec)
    parts = QuantizedExperts.concatenate([QuantizedExperts.quantize(w[:1], spec),
                                          QuantizedExperts.quantize(w[1:], spec)])
    assert parts.shape == whole.shape and parts.bits == 4 and parts.group_size == 8
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
