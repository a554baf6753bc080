"""BinaryPlanesExperts: each expert's planes dequantize as a NumPy sum of scaled sign planes,
the grouped matmul inside `moe` equals the dequantized float experts (empty experts
included), experts with different plane counts are refused, and an orbax checkpoint holds
the packed leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdlm_jax  # noqa: F401  (binds the packed types to their ops)
from qdlm_jax.checkpoints.orbax_format import load_checkpoint, save_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models.experts import expert_project, grouped_matmul, moe
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts

E, N_IN, N_OUT, BLOCK = 3, 24, 16, 8


def _random_planes(rng, slot_blocks):
    """(signs +-1 [E, S, out, block], row [E, S, out], col [E, S, block]) in fp16 values."""
    s = len(slot_blocks[0])
    signs = np.where(rng.random((E, s, N_OUT, BLOCK)) < 0.5, -1.0, 1.0).astype(np.float32)
    row = rng.random((E, s, N_OUT)).astype(np.float16).astype(np.float32)
    col = rng.standard_normal((E, s, BLOCK)).astype(np.float16).astype(np.float32)
    return signs, row, col


def numpy_w_hat(signs, row, col, slot_block):
    """w_hat [in, out] of one expert: sum over each block's slots of diag(r) B diag(c)."""
    w = np.zeros((N_OUT, N_IN), np.float64)
    for s, b in enumerate(slot_block):
        w[:, b * BLOCK:(b + 1) * BLOCK] += row[s][:, None] * signs[s] * col[s][None, :]
    return w.T


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    # 6 slots = 2 planes x 3 blocks on average; each expert spreads them its own way (ABMP)
    slot_blocks = [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 2, 2]]
    signs, row, col = _random_planes(rng, slot_blocks)
    experts = [BinaryPlanesArray.from_planes(signs[e], row[e], col[e], slot_blocks[e])
               for e in range(E)]
    return BinaryPlanesExperts.from_experts(experts), (signs, row, col, slot_blocks)


def test_dequantize_equals_the_numpy_sum_of_planes(packed):
    q, (signs, row, col, slot_blocks) = packed
    assert q.shape == (E, N_IN, N_OUT) and q.ndim == 3 and q.mean_planes == 2.0
    assert q.signs.dtype == jnp.uint8 and q.signs.shape == (E, 6, N_OUT, 1)
    w = np.asarray(q.dequantize(jnp.float32))
    for e in range(E):
        want = numpy_w_hat(signs[e], row[e], col[e], slot_blocks[e])
        np.testing.assert_allclose(w[e], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(q.expert(e).dequantize(jnp.float32)), w[e])
    assert q.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(q))


def test_grouped_matmul_equals_the_dequantized_experts(packed):
    q, _ = packed
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([5, 0, 9], jnp.int32)  # expert 1 empty
    rows = jnp.asarray(rng.standard_normal((14, N_IN)), jnp.float32)
    got = jax.jit(expert_project)(rows, q, sizes)
    want = grouped_matmul(rows, q.dequantize(jnp.float32), sizes)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    w = np.asarray(q.dequantize(jnp.float32), np.float64)
    ref = np.concatenate([np.asarray(rows[:5]) @ w[0], np.asarray(rows[5:]) @ w[2]])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)

    # inside `moe` (gate_up of the same packed type): the dequantized float experts' output
    gate_up = BinaryPlanesExperts.from_experts([q.expert(e) for e in range(E)])
    down = jnp.asarray(rng.standard_normal((E, N_OUT // 2, N_IN)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((7, N_IN)), jnp.float32)
    top = jnp.asarray(rng.integers(0, E, (7, 2)), jnp.int32)
    top_w = jnp.asarray(rng.random((7, 2)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(moe)(x, gate_up, down, top, top_w)),
        np.asarray(jax.jit(moe)(x, gate_up.dequantize(jnp.float32), down, top, top_w)))


def test_experts_with_different_plane_counts_are_refused():
    rng = np.random.default_rng(2)
    signs, row, col = _random_planes(rng, [[0, 1, 2, 2]])
    a = BinaryPlanesArray.from_planes(signs[0][:3], row[0][:3], col[0][:3], [0, 1, 2])
    b = BinaryPlanesArray.from_planes(signs[1], row[1], col[1], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="expert 1 holds 4 planes, expert 0 3"):
        BinaryPlanesExperts.from_experts([a, b])


def test_an_orbax_checkpoint_holds_the_packed_leaves(packed, tmp_path):
    q, _ = packed
    path = ("layers", 0, "experts", "gate_up")
    save_checkpoint(tmp_path / "ck", tiny_config("llada"), {path: q})
    _, loaded = load_checkpoint(tmp_path / "ck")
    got = loaded[path]
    assert isinstance(got, BinaryPlanesExperts) and got.shape == q.shape
    assert got.block == q.block
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(got)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
