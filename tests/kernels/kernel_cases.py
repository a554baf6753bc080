"""Cases shared by the TPU and GPU kernel tests: interpret-mode comparisons, the real layer
shapes for lowering checks, and abstract (ShapeDtypeStruct-only) weights."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdlm_jax.kernels import xla
from qdlm_jax.quant import packing
from qdlm_jax.quant.qarray import QuantizedArray
from tests.kernels import numpy_qmatmul as ref

# (K, N) of every quantized linear: q/k/v/o, gate/up, down.
LLADA_8B = ((4096, 4096), (4096, 12288), (12288, 4096))
DREAM_7B = ((3584, 3584), (3584, 512), (3584, 18944), (18944, 3584))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lead: tuple  # x.shape[:-1]
    k: int
    n: int
    bits: int
    group_size: int  # -1: per channel
    sym: bool
    act_bits: int | None = None
    dtype: str = "float32"
    scale_dtype: str = "float32"
    act_group_size: int | None = None  # activation scales per group of columns (act_bits)


# Small and non-multiple shapes for the fast suite: M, N and K that need padding, several
# groups per K block and several K steps per group, leading dims, bf16, int paths.
FAST_CASES = (
    Case("w4a16_asym_g128_edges", (5,), 512, 200, 4, 128, False),
    Case("w8a16_sym_g128_bf16_lead", (3, 2), 384, 128, 8, 128, True, dtype="bfloat16"),
    Case("w4a16_asym_channel_bf16_scale", (9,), 256, 136, 4, -1, False,
         scale_dtype="bfloat16"),
    Case("w8a8_channel_bf16", (17,), 256, 128, 8, -1, True, act_bits=8, dtype="bfloat16"),
    Case("w4a4_channel_kpad", (3,), 768, 130, 4, -1, True, act_bits=4),
)
# Per-group activation scales (per-channel weights): groups of 32 / 64 / 128 columns,
# several groups per K block, M / N / K padding, bf16, leading dims.
ACT_GROUP_CASES = (
    Case("w4a4_ag32_edges", (5,), 512, 200, 4, -1, True, act_bits=4, act_group_size=32),
    Case("w8a8_ag64_bf16", (17,), 256, 128, 8, -1, True, act_bits=8, dtype="bfloat16",
         act_group_size=64),
    Case("w4a4_ag128_kpad_lead", (3, 1), 768, 130, 4, -1, True, act_bits=4,
         act_group_size=128),
    Case("w8a8_ag128_kpad", (9,), 384, 136, 8, -1, True, act_bits=8, act_group_size=128),
)


def make_operands(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = ref.random_weight(rng, case.k, case.n, bits=case.bits, group_size=case.group_size,
                          sym=case.sym, scale_dtype=jnp.dtype(case.scale_dtype))
    x = rng.standard_normal((*case.lead, case.k))
    if case.act_group_size is not None:  # outlier columns, so groups' scales differ a lot
        x[..., 3::97] *= 30.0
    return jnp.asarray(x, jnp.dtype(case.dtype)), w


def interpreted(kernel_module, blocks=None, act_group_size=None):
    """fn(x, w, act_bits): the module's qmatmul in interpret mode, jitted (so each case
    compiles once instead of dispatching every op eagerly)."""
    @functools.partial(jax.jit, static_argnames="act_bits")
    def run(x, w, act_bits):
        return kernel_module.qmatmul(x, w, act_bits=act_bits, act_group_size=act_group_size,
                                     interpret=True, blocks=blocks)
    return lambda x, w, act_bits: run(x, w, act_bits=act_bits)


def first_columns(w: QuantizedArray, n: int) -> QuantizedArray:
    """The weight restricted to its first `n` output columns (an "in_out" weight)."""
    return w.replace(packed=w.packed[:n], scale=w.scale[:n],
                     zero=None if w.zero is None else w.zero[:n], shape=(w.shape[0], n))


def check_against_xla_and_numpy(kernel_fns, case: Case, *, numpy_rows: int | None = None,
                                numpy_cols: int | None = None, float_sums: bool = False):
    """Each kernel_fn(x, w, act_bits) vs the XLA path (exact for integer accumulation,
    within float / bf16 rounding otherwise, or with `float_sums`, where a kernel adds scaled
    fp32 partials in another order: within a few ulps of fp32), and the XLA path vs the
    NumPy statement (on the first `numpy_rows` x `numpy_cols` outputs: a row's result only
    needs its row)."""
    x, w = make_operands(case)
    y_xla = jax.jit(xla.qmatmul, static_argnames=("act_bits", "act_group_size"))(
        x, w, act_bits=case.act_bits, act_group_size=case.act_group_size)
    y_xla = np.asarray(y_xla.astype(jnp.float32)).reshape(-1, case.n)
    scale = np.abs(y_xla).max()
    eps = 2.0 ** -7 if case.dtype == "bfloat16" else 1e-5  # bf16: one rounding of the output
    for kernel_fn in kernel_fns:
        y = kernel_fn(x, w, case.act_bits)
        assert y.shape == (*case.lead, case.n) and y.dtype == x.dtype
        y = np.asarray(y.astype(jnp.float32)).reshape(-1, case.n)
        if float_sums:
            rtol = 2.0 ** -7 if case.dtype == "bfloat16" else 1e-6  # bf16: a rounding flip
            np.testing.assert_allclose(y, y_xla, rtol=rtol, atol=rtol * scale)
        elif case.act_bits is not None:
            np.testing.assert_array_equal(y, y_xla)
        else:
            np.testing.assert_allclose(y, y_xla, rtol=eps, atol=eps * scale)
    x2 = x.reshape(-1, case.k)[:numpy_rows]
    cols = slice(0, numpy_cols)
    w_sub = w if numpy_cols is None else first_columns(w, numpy_cols)
    if case.act_bits is not None:
        expect = ref.act_quant(x2, w_sub, case.act_bits, case.act_group_size)
        expect = np.asarray(jnp.asarray(expect).astype(x.dtype).astype(jnp.float32))
        np.testing.assert_array_equal(y_xla[:numpy_rows, cols], expect)
    else:
        # bf16 also rounds w_hat to bf16 before the dot, as every path does.
        tol = 2.0 ** -6 if case.dtype == "bfloat16" else 2e-5
        np.testing.assert_allclose(y_xla[:numpy_rows, cols], ref.weight_only(x2, w_sub),
                                   rtol=tol, atol=tol * scale)


def abstract_weight(k: int, n: int, *, bits: int = 4, group_size: int = 128,
                    sym: bool = False, orientation: str = "in_out", g_idx: bool = False,
                    scale_dtype=jnp.bfloat16) -> QuantizedArray:
    """A QuantizedArray made of ShapeDtypeStructs only (logical [k, n] for "in_out")."""
    n_out, n_in = (n, k) if orientation == "in_out" else (k, n)
    gs = n_in if group_size == -1 else group_size
    groups = n_in // gs
    sds = jax.ShapeDtypeStruct
    return QuantizedArray(
        packed=sds((n_out, packing.packed_length(n_in, bits)), jnp.uint8),
        scale=sds((n_out, groups), scale_dtype),
        zero=None if sym else sds((n_out, packing.packed_length(groups, bits)), jnp.uint8),
        g_idx=sds((n_in,), jnp.int32) if g_idx else None,
        bits=bits, group_size=gs, shape=(k, n), orientation=orientation)


# One lowering per (layer shape, config): decode (16 tokens) W4A16 asym g128 and prefill
# (256 / 2048 tokens) W8A8, plus W8A16 and W4A4 once per model.
def export_cases():
    cases = []
    for model, shapes in (("llada8b", LLADA_8B), ("dream7b", DREAM_7B)):
        for k, n in shapes:
            cases.append((f"{model}_{k}x{n}_w4a16_m16", 16, k, n, 4, 128, False, None))
            cases.append((f"{model}_{k}x{n}_w8a8_m256", 256, k, n, 8, -1, True, 8))
        k, n = shapes[1]
        cases.append((f"{model}_{k}x{n}_w8a16_m1", 1, k, n, 8, 128, True, None))
        cases.append((f"{model}_{k}x{n}_w4a4_m2048", 2048, k, n, 4, -1, True, 4))
    return cases


# Per-group activations (per-channel weights): prefill W4A4 / W8A8 and decode W4A4, with a
# group count that is not a power of two (3584 / 128 = 28).
def export_act_group_cases():
    return [("llada8b_4096x12288_w4a4_ag128_m2048", 2048, 4096, 12288, 4, -1, True, 4, 128),
            ("llada8b_12288x4096_w8a8_ag64_m256", 256, 12288, 4096, 8, -1, True, 8, 64),
            ("dream7b_3584x18944_w4a4_ag128_m16", 16, 3584, 18944, 4, -1, True, 4, 128),
            ("dream7b_3584x512_w4a4_ag32_m1", 1, 3584, 512, 4, -1, True, 4, 32)]


def export_kernel(qmatmul_fn, platform: str, case, **export_kwargs):
    """jax.export of qmatmul_fn for one platform on ShapeDtypeStruct inputs; the module text.
    A case is (name, m, k, n, bits, group_size, sym, act_bits[, act_group_size])."""
    _, m, k, n, bits, group_size, sym, act_bits, *act_group = case
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w = abstract_weight(k, n, bits=bits, group_size=group_size, sym=sym)
    fn = jax.jit(lambda x, w: qmatmul_fn(x, w, act_bits=act_bits,
                                         act_group_size=act_group[0] if act_group else None))
    exported = jax.export.export(fn, platforms=[platform], **export_kwargs)(x, w)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == (m, n)
    assert exported.mlir_module_serialized  # StableHLO bytecode (the artifact a runtime loads)
    return exported.mlir_module()
