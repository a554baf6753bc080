"""The grouped matmul of the experts: the CPU chunked loop and ragged_dot against a plain NumPy
statement (row r times the weight of its group), with empty groups, groups shorter and longer
than a chunk, and every row in one group (also with each group's weight given by a
function); both backends lower for TPU and GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.models.experts import (
    grouped_matmul,
    grouped_matmul_chunked,
    grouped_matmul_fetched,
    moe,
)


def _numpy_grouped(x, w, sizes):
    group = np.repeat(np.arange(len(sizes)), sizes)
    return np.einsum("mi,mio->mo", x.astype(np.float64), w[group].astype(np.float64))


@pytest.mark.parametrize("sizes,chunk", [
    ([0, 10, 0, 27, 0], 4),  # empty groups first, between and last
    ([3, 1, 5, 2, 0, 9], 4),  # shorter than a chunk, exactly a chunk's multiple, longer
    ([16, 0, 0, 0], 16),  # every row in one group, a whole number of chunks
    ([1] * 7, 3),  # one row per group
])
def test_chunked_loop_and_ragged_dot_equal_numpy(sizes, chunk):
    rng = np.random.default_rng(len(sizes) + chunk)
    m = sum(sizes)
    x = rng.standard_normal((m, 8)).astype(np.float32)
    w = rng.standard_normal((len(sizes), 8, 3)).astype(np.float32)
    want = _numpy_grouped(x, w, np.asarray(sizes))
    gs = jnp.asarray(sizes, jnp.int32)
    chunked = jax.jit(grouped_matmul_chunked, static_argnames="chunk")(x, w, gs, chunk=chunk)
    np.testing.assert_allclose(np.asarray(chunked), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(grouped_matmul)(x, w, gs)), want,
                               rtol=1e-5, atol=1e-5)
    ragged = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(ragged), want, rtol=1e-5, atol=1e-5)
    # the weight of each group given by a function (here a bf16 slice cast to float32),
    # against the same loop over the cast array: the same dots, bit for bit
    wb = jnp.asarray(w, jnp.bfloat16)

    def fetch(g):
        return jax.lax.dynamic_index_in_dim(wb, g, 0, keepdims=False).astype(jnp.float32)

    fetched = jax.jit(lambda x, gs: grouped_matmul_chunked(x, fetch, gs, chunk=chunk))(x, gs)
    np.testing.assert_array_equal(
        np.asarray(fetched),
        np.asarray(grouped_matmul_chunked(x, wb.astype(jnp.float32), gs, chunk=chunk)))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(grouped_matmul_fetched, static_argnums=(1, 2))(
            x, fetch, lambda: wb.astype(jnp.float32), gs)), np.asarray(fetched))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_moe_lowers_for_accelerators(platform):
    """On TPU and GPU the experts run as ragged_dot (the CPU loop is not in their program)."""
    x = jax.ShapeDtypeStruct((12, 8), jnp.bfloat16)
    gate_up = jax.ShapeDtypeStruct((4, 8, 12), jnp.bfloat16)
    down = jax.ShapeDtypeStruct((4, 6, 8), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((12, 2), jnp.int32)
    weights = jax.ShapeDtypeStruct((12, 2), jnp.float32)
    exported = jax.export.export(jax.jit(moe), platforms=[platform])(x, gate_up, down, ids,
                                                                     weights)
    text = exported.mlir_module()
    assert "ragged_dot" in text and "while" not in text
