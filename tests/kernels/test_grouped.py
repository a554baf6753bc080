"""The grouped low-bit Pallas kernels (interpret mode) against the XLA path, over expert
counts, groups and ragged splits with empty and single-row experts; their lowering for TPU
and CUDA with jax.export; and the tile layout against a plain statement of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.kernels.grouped import grouped_qmatmul, supports, tile_layout
from qdlm_jax.quant.qexperts import QuantizedExperts, experts_matmul
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.kernels.test_pallas_gpu import TRITON_CALL

# (E, K, N, group size, bits, sym, group sizes of the rows)
CASES = [
    (1, 256, 128, 128, 4, False, [5]),
    (3, 256, 192, -1, 8, True, [0, 7, 1]),
    (4, 512, 128, 256, 4, True, [33, 0, 0, 2]),
    (8, 256, 128, 128, 4, False, [3, 0, 9, 1, 0, 0, 20, 6]),
]


def experts_and_rows(case, dtype=jnp.float32, seed=0):
    e, k, n, group, bits, sym, sizes = case
    rng = np.random.default_rng(seed)
    kernels = jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
    q = QuantizedExperts.quantize(kernels, QuantSpec(bits=bits, group_size=group, sym=sym))
    x = jnp.asarray(rng.standard_normal((sum(sizes), k)), dtype)
    return x, q, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", CASES, ids=[f"E{c[0]}-g{c[3]}-w{c[4]}" for c in CASES])
def test_interpret_equals_xla(backend, case):
    x, q, sizes = experts_and_rows(case)
    assert supports(x, q, backend)
    want = np.asarray(experts_matmul(x, q, sizes))
    got = np.asarray(jax.jit(lambda x, q, s: grouped_qmatmul(
        x, q, s, backend=backend, interpret=True))(x, q, sizes))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_bf16_rows_and_small_tiles():
    case = (3, 256, 128, 128, 4, False, [17, 0, 40])
    x, q, sizes = experts_and_rows(case, jnp.bfloat16)
    want = np.asarray(experts_matmul(x, q, sizes), np.float32)
    for backend, bm in (("pallas_tpu", 32), ("pallas_gpu", 16)):
        got = grouped_qmatmul(x, q, sizes, backend=backend, interpret=True, bm=bm)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=0.5)


def test_tile_layout_matches_a_plain_statement():
    sizes = [3, 0, 9, 1, 0, 4]
    bm = 4
    te, src, valid, dst = map(np.asarray, tile_layout(jnp.asarray(sizes), sum(sizes), bm))
    # plain statement: every expert's rows, then padding to whole tiles, expert after expert
    rows, experts = [], []
    start = 0
    for e, n in enumerate(sizes):
        tiles = -(-n // bm)
        for t in range(tiles):
            experts.append(e)
            rows.append([start + t * bm + i if t * bm + i < n else -1 for i in range(bm)])
        start += n
    used = len(experts)
    assert list(te[:used]) == experts and len(te) == -(-sum(sizes) // bm) + len(sizes)
    flat = np.asarray(rows).reshape(-1)
    np.testing.assert_array_equal(valid[:used * bm], flat >= 0)
    assert not valid[used * bm:].any()
    np.testing.assert_array_equal(src[:used * bm][flat >= 0], flat[flat >= 0])
    np.testing.assert_array_equal(dst, [list(flat).index(r) for r in range(sum(sizes))])


def test_unsupported_calls_are_named():
    x, q, sizes = experts_and_rows((2, 256, 128, 128, 4, False, [1, 2]))
    q3 = QuantizedExperts.quantize(jnp.ones((2, 256, 128)), QuantSpec(bits=3, group_size=128))
    assert not supports(x, q3, "pallas_tpu")
    with pytest.raises(ValueError, match="3-bit codes"):
        grouped_qmatmul(x, q3, sizes, backend="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes has shape \(3,\)"):
        grouped_qmatmul(x, q, jnp.asarray([1, 1, 1]), backend="pallas_tpu", interpret=True)


@pytest.mark.parametrize("platform,backend", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_lowers_for_the_real_targets(platform, backend):
    """DiffusionGemma-26B-A4B's expert shapes (128 experts, hidden 2816, 704 per expert), W4
    g128, 512 routed rows: jax.export for the target produces its Pallas custom call."""
    n_experts, hidden, inter = 128, 2816, 704
    q = jax.eval_shape(lambda k: QuantizedExperts.quantize(
        k, QuantSpec(bits=4, group_size=128)),
        jax.ShapeDtypeStruct((n_experts, hidden, 2 * inter), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((512, hidden), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((n_experts,), jnp.int32)
    fn = jax.jit(lambda x, q, s: grouped_qmatmul(x, q, s, backend=backend))
    call = "tpu_custom_call" if platform == "tpu" else TRITON_CALL
    waive = [] if platform == "tpu" else [jax.export.DisabledSafetyCheck.custom_call(call)]
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=waive)(x, q, sizes)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == (512, 2 * inter)
    assert exported.mlir_module_serialized
    assert exported.mlir_module().count(call) == 1


def test_expert_project_dispatches_to_the_grouped_kernels():
    """A packed experts kernel in a model (`models.experts.expert_project`) runs the grouped
    kernel of the selected implementation, and XLA on CPU by default or when the kernel does
    not take the call."""
    from qdlm_jax.kernels import select_expert_implementation, use_implementation
    from qdlm_jax.models.experts import expert_project

    x, q, sizes = experts_and_rows(CASES[3])
    want = np.asarray(experts_matmul(x, q, sizes))
    assert select_expert_implementation(x, q)[0] == "xla"
    np.testing.assert_array_equal(np.asarray(expert_project(x, q, sizes)), want)
    for name in ("pallas_tpu", "pallas_gpu"):
        with use_implementation(name, interpret=True):
            assert select_expert_implementation(x, q) == (name, f"requested {name!r}")
            got = np.asarray(expert_project(x, q, sizes))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    q3 = QuantizedExperts.quantize(jnp.ones((8, 256, 128)), QuantSpec(bits=3, group_size=128))
    with use_implementation("pallas_tpu", interpret=True):
        name, reason = select_expert_implementation(x, q3)
    assert name == "xla" and "3-bit codes" in reason
