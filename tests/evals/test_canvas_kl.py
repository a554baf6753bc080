"""The DiffusionGemma evals without a mask token: KL to fp is zero for the fp model itself and
positive for a quantized one; the router's changed-choice fraction equals a direct count of
the top-k sets of both models' own forwards."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.evals.canvas_kl import canvas_kl, route_changes, split_windows
from qdlm_jax.models.diffusion_gemma import init_cache, init_model, model_from_params
from qdlm_jax.models.params import get_params
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.quantizer_core import QuantSpec


@pytest.fixture(scope="module")
def models():
    config = tiny_config("diffusion_gemma")
    fp = init_model(config, seed=2)
    spec = GemmaPTQSpec(weight=QuantSpec(bits=2, group_size=8, sym=False),
                        quantize_router=True)
    q, _ = rtn_quantize_gemma(get_params(fp), spec)
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (2, 6 + 8))
    return fp, model_from_params(config, q), windows


def _direct_count(fp, q, windows):
    prompts, canvases = split_windows(windows, fp.config.canvas_length, fp.config.vocab_size)
    changed = total = 0
    @nnx.jit
    def routes_of(m, p, x):
        enc, dec = {}, {}
        cache = m.encode(p, None, init_cache(m.config, 1, 14), routes=enc)
        m.decode(x, None, cache, routes=dec)
        return [r[0][0] for r in list(enc.values()) + list(dec.values())]

    for p, x in zip(np.asarray(prompts), np.asarray(canvases)):
        ids = {name: [np.asarray(r) for r in routes_of(m, jnp.asarray(p[None]),
                                                        jnp.asarray(x[None]))]
               for name, m in (("fp", fp), ("q", q))}
        for a, b in zip(ids["fp"], ids["q"]):
            for row_a, row_b in zip(a, b):
                changed += len(set(row_a.tolist()) - set(row_b.tolist()))
                total += len(row_a)
    return changed / total


def test_route_changes_equal_a_direct_count(models):
    fp, q, windows = models
    r = route_changes(fp, q, windows, batch_size=2)
    assert 0 < r["changed_fraction"] < 1
    assert r["changed_fraction"] == pytest.approx(_direct_count(fp, q, windows))
    assert r["choices"] == 2 * 2 * (6 + 8) * 2  # windows x layers x tokens x k
    assert route_changes(fp, fp, windows)["changed_fraction"] == 0


# slow: the job's run checks KL > 0 on a quantized model in `make test`
@pytest.mark.slow
def test_kl_is_zero_for_the_fp_model_and_positive_quantized(models):
    fp, q, windows = models
    assert canvas_kl(fp, fp, windows)["kl_bits"] == pytest.approx(0.0, abs=1e-7)
    assert canvas_kl(fp, q, windows)["kl_bits"] > 1e-3
