"""AWQ of DiffusionGemma: the routed experts' scales and packed weights against a NumPy
statement (one scale shared by every expert's gate_up scored on the routed output, one per
expert for down, an expert with no rows and one with a single row), zero padding with
`n_valid` is exact, every group's fold leaves the fp model unchanged, and the whole pass
packs every planned tensor closer to fp than RTN."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import qdlm_jax  # noqa: F401  (binds the packed types to their ops)
from qdlm_jax.models.diffusion_gemma import init_model, model_from_params
from qdlm_jax.models.params import get_params
from qdlm_jax.quant import awq_core
from qdlm_jax.quant.gemma_awq import (
    GemmaAWQSettings,
    awq_experts,
    awq_quantize_gemma,
    fold_into,
    layer_groups,
    self_conditioning_groups,
)
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, gemma_plan
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.quant import numpy_awq
from tests.quant.test_gemma_rtn import CONFIG  # [sliding, full], 4 experts top-2
from tests.quant.test_gemma_rtn import logits as _logits

F32 = np.float32


def _gelu(x):
    x = np.asarray(x, F32)
    return (F32(0.5) * x * (F32(1) + np.tanh(F32(np.sqrt(2 / np.pi)) * (x + F32(0.044715)
                                                                         * x ** 3)))).astype(F32)


def _moe(x, gate_up, down, ids, wts):
    """sum_j w_j (gelu(x G_e) * (x U_e)) D_e, e = ids[:, j]: the routed experts' output."""
    inter = gate_up.shape[-1] // 2
    y = np.zeros((x.shape[0], down.shape[-1]), F32)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], wts[t]):
            h = x[t] @ gate_up[e]
            y[t] += w * ((_gelu(h[:inter]) * h[inter:]) @ down[e])
    return y


def test_experts_awq_equals_a_numpy_statement():
    """Expert 3 is never chosen, expert 2 once; s_gate_up is the NumPy search scored on the
    routed output, s_down[e] the search on expert e's own rows, and each packed expert is
    the NumPy clip + quantization of the folded weight."""
    rng = np.random.default_rng(0)
    e_num, h, inter, n, bits, g = 4, 16, 8, 20, 3, 8
    x = rng.standard_normal((n, h)).astype(F32) * np.where(np.arange(h) == 3, 8, 1).astype(F32)
    gate_up = (rng.standard_normal((e_num, h, 2 * inter)) * 0.3).astype(F32)
    down = (rng.standard_normal((e_num, inter, h)) * 0.3).astype(F32)
    ids = np.where(np.arange(n)[:, None] % 2 == 0, [0, 1], [1, 0])  # even rows [0, 1]
    ids[5] = [2, 0]  # expert 2: a single row; expert 3: none
    wts = rng.uniform(0.2, 1.0, (n, 2)).astype(F32)
    weight = QuantSpec(bits=bits, group_size=g, sym=False)
    r = awq_experts(jnp.asarray(gate_up), jnp.asarray(down), jnp.asarray(x),
                    jnp.asarray(ids, jnp.int32), jnp.asarray(wts), weight, clip=True)
    assert r.rows.tolist() == [20, 19, 1, 0]

    def block(xf, ws):
        return _moe(xf, np.stack([w.T for w in ws]), down, ids, wts)

    s_ref, _, _ = numpy_awq.search_scale(x, [gate_up[e].T for e in range(e_num)], bits, g,
                                         block=block)
    np.testing.assert_allclose(np.asarray(r.s_gate_up), s_ref, rtol=1e-5)
    s_gu = np.asarray(r.s_gate_up, F32)
    gu_deq = np.asarray(r.gate_up.dequantize(jnp.float32))
    down_deq = np.asarray(r.down.dequantize(jnp.float32))
    for e in range(e_num):
        rows = x[[t for t in range(n) for j in range(2) if ids[t, j] == e]]
        hh = rows @ gate_up[e]
        a = _gelu(hh[:, :inter]) * hh[:, inter:]
        if e == 3:
            np.testing.assert_array_equal(np.asarray(r.s_down[e]), np.ones(inter, F32))
        else:
            s_e, _, _ = numpy_awq.search_scale(a, [down[e].T], bits, g)
            np.testing.assert_allclose(np.asarray(r.s_down[e]), s_e, rtol=1e-5)
        s_e = np.asarray(r.s_down[e], F32)
        w_gu = (gate_up[e] * s_gu[:, None]).astype(F32)
        w_gu[:, inter:] = w_gu[:, inter:] / s_e[None, :]
        w_d = (down[e] * s_e[:, None]).astype(F32)
        for w, xs, deq in ((w_gu.T, rows / s_gu, gu_deq[e]), (w_d.T, a / s_e, down_deq[e])):
            if len(rows):
                w = numpy_awq.apply_clip(w, numpy_awq.auto_clip(w, xs, bits, g))
            np.testing.assert_allclose(deq, numpy_awq.pseudo_quantize(w, bits, g).T,
                                       rtol=1e-6, atol=1e-6, err_msg=f"expert {e}")


def test_zero_padding_with_n_valid_is_the_unpadded_search():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((11, 16)).astype(F32)
    w = rng.standard_normal((8, 16)).astype(F32)
    ref = awq_core.search_scales(jnp.asarray(x), [jnp.asarray(w)], bits=3, group_size=8,
                                 sym=False)
    got = awq_core.search_scales(jnp.asarray(np.pad(x, ((0, 21), (0, 0)))), [jnp.asarray(w)],
                                 bits=3, group_size=8, sym=False, n_valid=11)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=1e-5)


def test_every_groups_fold_leaves_the_fp_model_unchanged():
    """Random scales folded into every group (router included) and into the experts as the
    module states (norm_2 / s, gate_up rows * s; up columns / s_e, down rows * s_e): the
    float model's logits are unchanged, so each producer is the one that feeds its group."""
    params = get_params(init_model(CONFIG, seed=3))
    ref = _logits(model_from_params(CONFIG, params))
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()},
                      GemmaPTQSpec(method="awq", weight=QuantSpec(bits=4, group_size=8),
                                   quantize_router=True))
    dense = plan.paths("QuantizedArray")
    groups = self_conditioning_groups(dense)
    for i in range(CONFIG.num_layers):
        groups += layer_groups(i, dense)
    assert {m for g in groups for m in g.members} == set(dense)
    rng = np.random.default_rng(2)
    out = dict(params)
    for g in groups:
        if g.producer is not None:
            fold_into(out, g, jnp.asarray(rng.uniform(0.5, 2.0, params[g.members[0]].shape[0]),
                                          jnp.float32))
    for i in range(CONFIG.num_layers):
        gu, dn = ("layers", i, "experts", "gate_up"), ("layers", i, "experts", "down")
        norm = ("layers", i, "pre_feedforward_layernorm_2", "scale")
        inter = params[dn].shape[1]
        s = rng.uniform(0.5, 2.0, params[norm].shape).astype(F32)
        s_e = rng.uniform(0.5, 2.0, (params[gu].shape[0], inter)).astype(F32)
        out[norm] = out[norm] / s
        w = out[gu] * s[None, :, None]
        out[gu] = w.at[:, :, inter:].set(w[:, :, inter:] / s_e[:, None, :])
        out[dn] = out[dn] * s_e[:, :, None]
    np.testing.assert_allclose(_logits(model_from_params(CONFIG, out)), ref, rtol=2e-4,
                               atol=2e-4)
    changed = [p for p in params if p[-1] == "scale" and not np.array_equal(out[p], params[p])]
    assert len(changed) == 3 * CONFIG.num_layers + 1 + CONFIG.num_layers  # norms, router


@pytest.mark.slow
def test_awq_packs_every_planned_tensor_and_is_closer_to_fp_than_rtn():
    """The whole pass at 3 bits on a random model with outlier input channels."""
    params = get_params(init_model(CONFIG, seed=5))
    for path in params:
        if path[-1] == "scale" and ("pre_feedforward" in str(path)
                                    or "input_layernorm" in str(path)):
            params[path] = params[path].at[jnp.asarray([1, 5])].multiply(12.0)
    model = model_from_params(CONFIG, params)
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(3, CONFIG.vocab_size, (4, 6)), jnp.int32)
    canvases = jnp.asarray(rng.integers(3, CONFIG.vocab_size, (4, 8)), jnp.int32)
    spec = GemmaPTQSpec(method="awq", weight=QuantSpec(bits=3, group_size=8, sym=False))
    qparams, plan, info = awq_quantize_gemma(
        model, prompts, canvases, spec,
        GemmaAWQSettings(calib=GemmaCalibSpec(levels=(0.5, 1.0))))
    for p in plan.paths("QuantizedExperts"):
        assert isinstance(qparams[p], QuantizedExperts) and qparams[p].bits == 3
    for p in plan.paths("QuantizedArray"):
        assert isinstance(qparams[p], QuantizedArray) and qparams[p].bits == 3
    assert info["ratios"]
    rtn, _ = rtn_quantize_gemma(params, dataclasses.replace(spec, method="rtn"))
    ref = _logits(model)
    err = {name: float(np.mean((_logits(model_from_params(CONFIG, q)) - ref) ** 2))
           for name, q in (("awq", qparams), ("rtn", rtn))}
    assert err["awq"] < err["rtn"], err
