"""DAQ (binary planes) of DiffusionGemma with per-expert Hessians: each expert's planes are
the project's DAQ core run on that expert's routed rows (a NumPy statement of the routing and
of the thin-expert rule, with an expert that sees no row and one that sees a single row), and
the whole driver packs every planned tensor and lands closer to fp than RTN at 2 bits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models.diffusion_gemma import init_cache, init_model, model_from_params
from qdlm_jax.models.params import get_params
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.daq_core import daq_quantize
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec, LayerStats, noised_canvases
from qdlm_jax.quant.gemma_gptq import (
    DAQOptions,
    GemmaGPTQSettings,
    gptq_part,
    gptq_quantize_gemma,
)
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.gptq_core import hessian
from qdlm_jax.quant.gptq_experts_core import ThinExperts, expert_grams
from qdlm_jax.quant.quantizer_core import QuantSpec

SPEC = GemmaPTQSpec(method="daq", weight=QuantSpec(bits=2, group_size=8))
OPTIONS = DAQOptions(ratio=0.25, iters=4)  # ABMP moves one of 4 blocks up and one down
SETTINGS = GemmaGPTQSettings(thin=ThinExperts(min_rows=4, thin_damp=0.1),
                             calib=GemmaCalibSpec(levels=(0.5, 1.0)), daq=OPTIONS)


def test_each_expert_is_daq_of_its_routed_rows_with_the_thin_rule():
    config = tiny_config("diffusion_gemma")
    params = get_params(init_model(config, seed=5))
    gu = ("layers", 0, "experts", "gate_up")
    rng = np.random.default_rng(0)
    t = 12
    x = rng.standard_normal((t, config.hidden_size)).astype(np.float32)
    # expert 0 never chosen, expert 1 once (token 0's second choice), 2 and 3 the rest
    top = np.array([[2, 1]] + [[2, 3] if i % 2 else [3, 2] for i in range(1, t)], np.int32)
    stats = LayerStats(grams={}, experts={0: (jnp.asarray(x), jnp.asarray(top),
                                              jnp.asarray(rng.random((t, 2)), jnp.float32))})
    out, how = gptq_part(params, [], 0, stats, config, SPEC, SETTINGS, {gu})
    got = out[gu]
    assert isinstance(got, BinaryPlanesExperts) and got.mean_planes == 2
    assert how == {"layers.0.experts.gate_up": ["thin-identity", "thin-damped", "routed",
                                                "routed"]}
    w = np.asarray(params[gu], np.float32)  # [E, in, out]
    for e in range(config.num_experts):
        rows = np.asarray([x[i] for i in range(t) for k in range(2) if top[i, k] == e],
                          np.float32).reshape(-1, config.hidden_size)
        n = rows.shape[0]
        gram = expert_grams(jnp.asarray(rows), jnp.asarray([n]))[0][0]
        if n == 0:
            h, damp = jnp.eye(config.hidden_size), 0.1
        else:
            h, damp = hessian(gram, n), (0.01 if n >= 4 else 0.1)
        r = daq_quantize(jnp.asarray(w[e].T), h, bits=2, block=8, damp=damp,
                         **dataclasses.asdict(OPTIONS))
        want = BinaryPlanesArray.from_planes(r.signs, r.row, r.col, r.slot_block)
        mine = got.expert(e)
        for f in ("signs", "row", "col", "slot_block"):
            np.testing.assert_array_equal(np.asarray(getattr(mine, f)),
                                          np.asarray(getattr(want, f)), err_msg=f"{e} {f}")


def test_gptq_experts_packed_a_group_at_a_time_equal_one_group(monkeypatch):
    """The layer's experts GPTQ'd and packed one expert at a time (`GROUP_BYTES` below one
    expert's working set) hold the same packed leaves as all at once, with float32 scales
    for bf16 kernels."""
    from qdlm_jax.quant import gemma_gptq

    config = tiny_config("diffusion_gemma")
    params = get_params(init_model(config, seed=5))
    gu = ("layers", 0, "experts", "gate_up")
    params[gu] = params[gu].astype(jnp.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, config.hidden_size)).astype(np.float32)
    top = rng.integers(0, config.num_experts, (12, 2)).astype(np.int32)
    stats = LayerStats(grams={}, experts={0: (jnp.asarray(x), jnp.asarray(top),
                                              jnp.ones((12, 2), jnp.float32))})
    spec = dataclasses.replace(SPEC, method="gptq", weight=QuantSpec(bits=4, group_size=8))

    def packed():
        return gptq_part(params, [], 0, stats, config, spec, SETTINGS, {gu})[0][gu]

    whole = packed()
    monkeypatch.setattr(gemma_gptq, "GROUP_BYTES", 1)
    one_by_one = packed()
    assert whole.scale.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(one_by_one)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# slow: DAQ compiles its block fits for every linear and expert shape and plane count (about
# a minute); its per-expert part runs in `make test` above
@pytest.mark.slow
def test_the_driver_packs_every_tensor_and_beats_rtn_at_2_bits():
    config = tiny_config("diffusion_gemma")
    model = init_model(config, seed=5)
    rng = np.random.default_rng(1)
    b, p, length = 4, 6, 8
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (b, p)), jnp.int32)
    canvases = jnp.asarray(rng.integers(3, config.vocab_size, (b, length)), jnp.int32)
    qparams, plan, how = gptq_quantize_gemma(model, prompts, canvases, SPEC, SETTINGS)
    for path in plan.paths():
        want = BinaryPlanesExperts if "experts" in path else BinaryPlanesArray
        assert isinstance(qparams[path], want), path
    assert len(how) == 2 * config.num_layers
    rtn, _ = rtn_quantize_gemma(get_params(model), dataclasses.replace(
        SPEC, method="rtn", weight=QuantSpec(bits=2, group_size=8)))

    def logits(m, seed):
        cache = m.encode(prompts, None, init_cache(config, b, p))
        x = noised_canvases(canvases, 0.25, jax.random.key(seed), config.vocab_size)
        return m.decode(x, None, cache)

    err = {}
    for name, q in (("daq", qparams), ("rtn", rtn)):
        m = model_from_params(config, q)
        err[name] = sum(float(jnp.mean((logits(m, s) - logits(model, s)) ** 2))
                        for s in range(2))
    assert err["daq"] < err["rtn"], err
