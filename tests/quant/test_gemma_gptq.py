"""GPTQ of DiffusionGemma with per-expert Hessians: every tensor the plan names is packed
(the coverage guard passes), the layer's experts are GPTQ of the rows the two-mode
calibration routed to each of them, each weight's GPTQ objective is below RTN's, and the
decoder logits are closer to fp than RTN's at 3 bits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models.diffusion_gemma import init_cache, init_model, model_from_params
from qdlm_jax.models.experts import sort_by_expert
from qdlm_jax.models.params import get_params
from qdlm_jax.quant.gemma_calibration import (
    GemmaCalibSpec,
    gemma_layer_stats,
    noised_canvases,
)
from qdlm_jax.quant.gemma_gptq import GemmaGPTQSettings, gptq_quantize_gemma
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, hook_name
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.gptq_experts_core import ThinExperts, expert_grams, gptq_experts
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec

# slow: the driver compiles GPTQ for every linear and expert shape of two layers (about a
# minute); its parts (per-expert GPTQ, two-mode statistics) are checked in `make test`
pytestmark = pytest.mark.slow

# 88 calibration rows (4 x 6 prompt tokens + 2 levels x 4 x 8 canvas tokens): more than the
# widest input (64), so every Hessian has full rank before dampening
B, P, L = 4, 6, 8
SPEC = GemmaPTQSpec(method="gptq", weight=QuantSpec(bits=3, group_size=8, sym=False))
SETTINGS = GemmaGPTQSettings(block_size=16, thin=ThinExperts(min_rows=4),
                             calib=GemmaCalibSpec(levels=(0.5, 1.0)))


@pytest.fixture(scope="module")
def setup():
    config = tiny_config("diffusion_gemma")
    params = get_params(init_model(config, seed=5))
    for path in params:  # outlier channels in every normed linear input: H is far from I
        if path[-1] == "scale" and "pre_feedforward" in str(path) or "input_layernorm" in \
                str(path):
            params[path] = params[path].at[jnp.asarray([1, 5])].multiply(12.0)
    model = model_from_params(config, params)
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (B, P)), jnp.int32)
    canvases = jnp.asarray(rng.integers(3, config.vocab_size, (B, L)), jnp.int32)
    qparams, plan, how = gptq_quantize_gemma(model, prompts, canvases, SPEC, SETTINGS)
    return model, prompts, canvases, qparams, plan, how


def test_every_planned_tensor_is_packed(setup):
    model, _, _, qparams, plan, how = setup
    for p in plan.paths("QuantizedExperts"):
        assert isinstance(qparams[p], QuantizedExperts) and qparams[p].bits == 3
    assert sorted(how) == sorted(".".join(map(str, p)) for p in plan.paths("QuantizedExperts"))
    assert all(set(v) <= {"routed", "thin-damped", "thin-identity"} for v in how.values())


def test_first_layers_experts_are_gptq_of_their_routed_rows(setup):
    """Layer 0's gate_up codes equal per-expert GPTQ on the rows that layer's experts were
    routed (layer 0's input depends only on the quantized self-conditioning MLP)."""
    model, prompts, canvases, qparams, _, _ = setup
    config = model.config
    params = get_params(model)
    upstream = dict(qparams)  # the parts before layer 0 quantized, layer 0 itself fp
    for p in params:
        if p[0] == "layers":
            upstream[p] = params[p]
    stats = gemma_layer_stats(model_from_params(config, upstream), prompts, canvases,
                              SETTINGS.calib, expert_layers=(0,))
    x, top, _ = stats.experts[0]
    _, token, sizes = sort_by_expert(top, config.num_experts)
    grams, counts = expert_grams(x.astype(jnp.float32)[token], sizes)
    w = jnp.swapaxes(params[("layers", 0, "experts", "gate_up")].astype(jnp.float32), 1, 2)
    want, _ = gptq_experts(w, grams, counts, bits=3, group_size=8, sym=False,
                           rule=SETTINGS.thin, block_size=16)
    got = qparams[("layers", 0, "experts", "gate_up")].codes()
    np.testing.assert_array_equal(np.asarray(got), np.stack([np.asarray(r.codes)
                                                             for r in want]))


def test_each_linear_and_expert_errs_less_than_rtn_on_its_calibration_inputs(setup):
    """GPTQ's objective, ||X (W - Q)||^2 on the inputs each weight was calibrated on (the fp
    model's here), is below RTN's for every dense linear and every expert of layer 0."""
    model, prompts, canvases, qparams, plan, _ = setup
    rtn, _ = rtn_quantize_gemma(get_params(model), dataclasses.replace(SPEC, method="rtn"))
    params = get_params(model)
    paths = plan.paths("QuantizedArray")
    stats = gemma_layer_stats(model, prompts, canvases, SETTINGS.calib,
                              names=tuple(hook_name(p) for p in paths), expert_layers=(0,))

    def err(q, w, gram):
        d = jnp.asarray(w, jnp.float32) - q.dequantize(jnp.float32)
        return float(jnp.trace(d.T @ gram @ d))

    for p in paths:
        gram = stats.grams[hook_name(p)][0]
        assert err(qparams[p], params[p], gram) < err(rtn[p], params[p], gram), p
    x, top, _ = stats.experts[0]
    _, token, sizes = sort_by_expert(top, model.config.num_experts)
    grams, _ = expert_grams(x.astype(jnp.float32)[token], sizes)
    p = ("layers", 0, "experts", "gate_up")
    ours, theirs = qparams[p].dequantize(jnp.float32), rtn[p].dequantize(jnp.float32)
    for e in range(model.config.num_experts):
        w = params[p][e].astype(jnp.float32)
        assert float(jnp.trace((w - ours[e]).T @ grams[e] @ (w - ours[e]))) < \
            float(jnp.trace((w - theirs[e]).T @ grams[e] @ (w - theirs[e]))), e


def test_gptq_logits_are_closer_to_fp_than_rtn(setup):
    """End to end, on canvases a quarter noised (fresh draws), averaged over three draws."""
    model, prompts, canvases, qparams, _, _ = setup
    config = model.config
    rtn, _ = rtn_quantize_gemma(get_params(model), dataclasses.replace(SPEC, method="rtn"))

    def logits(m, seed):
        cache = m.encode(prompts, None, init_cache(config, B, P))
        x = noised_canvases(canvases, 0.25, jax.random.key(seed), config.vocab_size)
        return m.decode(x, None, cache)

    err = {}
    for name, q in (("gptq", qparams), ("rtn", rtn)):
        m = model_from_params(config, q)
        err[name] = sum(float(jnp.mean((logits(m, s) - logits(model, s)) ** 2))
                        for s in (11, 12, 13))
    assert err["gptq"] < 0.85 * err["rtn"], err
