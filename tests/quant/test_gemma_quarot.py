"""QuaRot on DiffusionGemma with online Hadamard transforms: the rotation leaves the fp model's
output unchanged, W4A8 quantizes the rotated inputs of every planned tensor (a NumPy
statement of one routed layer), the guard names a tensor without its transform, the packed
model saves and loads, and the plan refuses a width with no Hadamard matrix."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import save_checkpoint
from qdlm_jax.models.diffusion_gemma import model_from_params, param_shapes
from qdlm_jax.models.experts import moe
from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b
from qdlm_jax.models.params import get_params
from qdlm_jax.quant import gemma_rtn, hadamard_core
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel
from qdlm_jax.quant.coverage import CoverageError, check_coverage
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, gemma_plan
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.quant.test_act_core import _numpy_fake_quant
from tests.quant.test_gemma_awq import _gelu
from tests.quant.test_gemma_rtn import CONFIG, fp_model, logits  # noqa: F401  (fixture)

W4A8 = GemmaPTQSpec(method="quarot", weight=QuantSpec(bits=4, group_size=8),
                    act=ActSpec(bits=8))


@pytest.fixture(scope="module")
def quarot(fp_model):  # noqa: F811
    params = get_params(fp_model)
    return (params, *gemma_rtn.rtn_quantize_gemma(params, W4A8))


def test_the_rotation_leaves_the_fp_model_unchanged(fp_model):  # noqa: F811
    params = get_params(fp_model)
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, W4A8)
    rotated = gemma_rtn.hadamard_rotate(params, plan.paths())
    assert len(rotated) == len(plan.paths()) > 0
    got = logits(model_from_params(CONFIG, {**params, **rotated}))
    np.testing.assert_allclose(got, logits(fp_model), rtol=0, atol=2e-5)


def test_w4a8_rotates_and_quantizes_every_planned_input(quarot):
    params, out, plan = quarot
    assert {t.action for t in plan.tensors if t.quantized} == {"quarot W4A8 g8"}
    for t in plan.tensors:
        v = out[t.path]
        assert isinstance(v, ActKernel) == t.quantized
        if t.quantized:
            assert v.transform.kind == "hadamard" and v.act.bits == 8
            assert type(v.weight).__name__ == t.packed_type
    path = ("layers", 1, "experts", "gate_up")
    with pytest.raises(CoverageError, match=r"layers.1.experts.gate_up .*planned quarot W4A8 "
                                            r"g8 with input transform hadamard, but the result "
                                            r"has None"):
        check_coverage(plan, params, {**out, path: out[path].replace(transform=None)})

    # the routed layer, stated in NumPy: x H quantized per row, times H^T W_e as packed
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 4, (6, 2)), jnp.int32)
    wts = jnp.asarray(rng.uniform(0.2, 1.0, (6, 2)), jnp.float32)
    gu, dn = out[path], out[("layers", 1, "experts", "down")]
    got = np.asarray(moe(x, gu, dn, ids, wts))
    h_in = hadamard_core.hadamard_matrix(32) / np.sqrt(32)
    h_mid = hadamard_core.hadamard_matrix(24) / np.sqrt(24)
    gu_w = np.asarray(gu.weight.dequantize(jnp.float32), np.float64)
    dn_w = np.asarray(dn.weight.dequantize(jnp.float32), np.float64)
    xq, _ = _numpy_fake_quant(np.asarray(x, np.float64) @ h_in, 8, True, 1.0, True)
    want = np.zeros((6, 32))
    for t in range(6):
        for e, w in zip(np.asarray(ids[t]), np.asarray(wts[t])):
            h = xq[t] @ gu_w[e]
            a = _gelu(h[:24]).astype(np.float64) * h[24:]
            aq, _ = _numpy_fake_quant((a @ h_mid)[None], 8, True, 1.0, True)
            want[t] += w * (aq[0] @ dn_w[e])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    # and the rotated, unquantized weights are the fp experts' own: H^T W_e ~ W_e after H
    fp_gu = np.asarray(params[path], np.float64)
    np.testing.assert_allclose(np.einsum("ij,ejk->eik", h_in, gu_w), fp_gu,
                               atol=0.6 * np.abs(fp_gu).max())


def test_quarot_model_saves_and_loads(quarot, tmp_path):
    _, out, _ = quarot
    save_checkpoint(tmp_path / "q", CONFIG, out)
    loaded = load_model(tmp_path / "q")
    gate_up = loaded.layers[1].experts.gate_up[...]
    assert isinstance(gate_up.weight, QuantizedExperts)
    assert gate_up.transform.kind == "hadamard" and gate_up.act.bits == 8
    np.testing.assert_array_equal(logits(loaded), logits(model_from_params(CONFIG, out)))


def test_widths_without_a_hadamard_matrix_are_refused_before_any_work():
    shapes = {("layers", 0, "self_attn", "q_proj", "kernel"): (52, 64)}
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj.kernel \(attention\): no "
                                         r"Hadamard transform of its input width 52"):
        gemma_plan(shapes, dataclasses.replace(W4A8, weight=QuantSpec(bits=4, group_size=4)))
    # DiffusionGemma-26B-A4B's widths (2816 = 44 * 2^6, 704 = 44 * 2^4, 2112 = 132 * 2^4) are
    # all covered
    big = gemma_plan(param_shapes(diffusion_gemma_26b_a4b()),
                     dataclasses.replace(W4A8, weight=QuantSpec(bits=4, group_size=64)))
    assert {t.shape[-2] for t in big.tensors if t.quantized} >= {2816, 704, 2112}
