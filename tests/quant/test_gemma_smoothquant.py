"""SmoothQuant on DiffusionGemma: the experts' scales equal a NumPy statement (the routing,
an expert with no rows), folding every group leaves the fp model's logits unchanged, and W8A8
packs and quantizes the inputs of every planned tensor."""

import jax.numpy as jnp
import numpy as np

from qdlm_jax.models.diffusion_gemma import model_from_params
from qdlm_jax.models.params import get_params
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, gemma_plan
from qdlm_jax.quant.gemma_smoothquant import smooth_experts, smooth_gemma, smoothquant_gemma
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.quant.test_gemma_awq import _gelu
from tests.quant.test_gemma_rtn import CONFIG, fp_model, logits  # noqa: F401  (fixture)

W8A8 = GemmaPTQSpec(method="smoothquant", weight=QuantSpec(bits=8, group_size=-1),
                    act=ActSpec(bits=8))


def _calibration(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CONFIG.vocab_size, (3, 6)),
            rng.integers(0, CONFIG.vocab_size, (3, CONFIG.canvas_length)))


def test_expert_scales_equal_a_numpy_statement():
    rng = np.random.default_rng(1)
    e, h, inter, n, alpha = 4, 8, 6, 10, 0.5
    gate_up = rng.standard_normal((e, h, 2 * inter)).astype(np.float32)
    down = rng.standard_normal((e, inter, h)).astype(np.float32)
    x = (rng.standard_normal((n, h)) * np.linspace(0.1, 5, h)).astype(np.float32)
    top = rng.integers(0, 3, (n, 2)).astype(np.int32)  # expert 3 gets no row
    s_gu, s_down = smooth_experts(gate_up, down, x, top, alpha=alpha)
    want_gu = np.abs(x).max(0) ** alpha / np.abs(gate_up).max(axis=(0, 2)) ** (1 - alpha)
    np.testing.assert_allclose(np.asarray(s_gu), want_gu, rtol=1e-5)
    for k in range(e):
        rows = x[(top == k).any(1)]  # the tokens that chose expert k (a max: once is enough)
        if len(rows) == 0:
            np.testing.assert_array_equal(np.asarray(s_down[k]), 1.0)
            continue
        hh = rows @ gate_up[k]
        a = _gelu(hh[:, :inter]) * hh[:, inter:]
        want = np.abs(a).max(0) ** alpha / np.abs(down[k]).max(1) ** (1 - alpha)
        np.testing.assert_allclose(np.asarray(s_down[k]), want, rtol=1e-4)


def test_folding_leaves_the_fp_model_unchanged(fp_model):  # noqa: F811
    params = get_params(fp_model)
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, W8A8)
    smoothed = smooth_gemma(fp_model, *_calibration(), plan, alpha=0.5)
    changed = [p for p in params if not np.array_equal(np.asarray(smoothed[p]),
                                                       np.asarray(params[p]))]
    assert ("layers", 1, "pre_feedforward_layernorm_2", "scale") in changed
    assert ("layers", 1, "experts", "down") in changed
    got = logits(model_from_params(CONFIG, smoothed))
    np.testing.assert_allclose(got, logits(fp_model), rtol=0, atol=5e-5)


def test_w8a8_packs_every_planned_tensor(fp_model):  # noqa: F811
    out, plan = smoothquant_gemma(fp_model, *_calibration(), W8A8)
    assert {t.action for t in plan.tensors if t.quantized} == {"smoothquant W8A8 per-channel"}
    for t in plan.tensors:
        v = out[t.path]
        assert isinstance(v, ActKernel) == t.quantized
        if t.quantized:
            assert v.act.bits == 8 and type(v.weight).__name__ == t.packed_type
    q = logits(model_from_params(CONFIG, out))
    assert 0 < np.abs(q - logits(fp_model)).max() < 0.5
    assert np.isfinite(q).all() and jnp.asarray(q).shape == logits(fp_model).shape
