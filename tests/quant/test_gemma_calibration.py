"""Two-mode calibration of DiffusionGemma: the encoder pass records the clean prompt's inputs
(checked against the layer's own norm of the embedded prompt), the decoder passes one per
noise level with self-conditioning, `both` is their sum, and the experts' rows carry the
router's choices of every pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models.diffusion_gemma import init_model
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec, gemma_layer_stats, noised_canvases

B, P, L = 2, 5, 8
NAMES = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "self_conditioning.up_proj")


@pytest.fixture(scope="module")
def setup():
    config = tiny_config("diffusion_gemma")
    model = init_model(config, seed=3)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (B, P)), jnp.int32)
    canvases = jnp.asarray(rng.integers(3, config.vocab_size, (B, L)), jnp.int32)
    return model, prompts, canvases


_CACHE = {}


def _stats(setup, **kw):
    """The statistics of a spec, computed once per module (several tests compare them)."""
    key = tuple(sorted(kw.items()))
    if key not in _CACHE:
        model, prompts, canvases = setup
        _CACHE[key] = gemma_layer_stats(model, prompts, canvases, GemmaCalibSpec(**kw),
                                        names=NAMES, expert_layers=(1,))
    return _CACHE[key]


def test_encoder_records_the_normed_clean_prompt(setup):
    model, prompts, _ = setup
    s = _stats(setup, modes="encoder", levels=(0.5, 1.0))
    assert "self_conditioning.up_proj" not in s.grams  # a decoder-only linear
    x = model.layers[0].input_layernorm(model.embed_tokens(prompts))
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    gram, n = s.grams["layers.0.self_attn.q_proj"]
    assert n == B * P
    np.testing.assert_allclose(np.asarray(gram), flat.T @ flat, rtol=1e-5, atol=1e-4)
    rows, top, w = s.experts[1]
    assert rows.shape == (B * P, model.config.hidden_size) and top.shape == (B * P, 2)


def test_both_is_the_sum_of_the_modes_and_levels_count(setup):
    enc, dec, both = (_stats(setup, modes=m, levels=(0.5, 1.0)) for m in
                      ("encoder", "decoder", "both"))
    assert enc.grams.keys() <= both.grams.keys()
    name = "layers.1.mlp.down_proj"
    assert dec.grams[name][1] == 2 * B * L and both.grams[name][1] == B * P + 2 * B * L
    np.testing.assert_allclose(np.asarray(both.grams[name][0]),
                               np.asarray(enc.grams[name][0] + dec.grams[name][0]),
                               rtol=1e-5, atol=1e-5)
    assert dec.grams["self_conditioning.up_proj"][1] == 2 * B * L
    assert both.experts[1][0].shape[0] == B * P + 2 * B * L


def test_self_conditioning_and_noise_change_what_the_decoder_sees(setup):
    with_sc = _stats(setup, modes="decoder", levels=(0.5, 1.0))
    without = _stats(setup, modes="decoder", levels=(0.5, 1.0), self_condition=False)
    g = "self_conditioning.up_proj"
    assert not np.allclose(np.asarray(with_sc.grams[g][0]), np.asarray(without.grams[g][0]))
    clean = _stats(setup, modes="decoder", levels=(1e-9,), self_condition=False)
    noisy = _stats(setup, modes="decoder", levels=(1.0,), self_condition=False)
    q = "layers.0.self_attn.q_proj"
    assert not np.allclose(np.asarray(clean.grams[q][0]), np.asarray(noisy.grams[q][0]))


def test_noise_level_is_the_replaced_fraction():
    canvases = jnp.zeros((64, 64), jnp.int32)
    for level in (0.25, 0.75):
        x = noised_canvases(canvases, level, jax.random.key(1), vocab=1 << 20)
        assert abs(float(jnp.mean(x != 0)) - level) < 0.03


@pytest.mark.parametrize("kw,message", [(dict(modes="all"), "modes='all'"),
                                        (dict(levels=(0.0,)), "levels"),
                                        (dict(t_min=0.9, t_max=0.5), "t_min")])
def test_bad_specs(kw, message):
    with pytest.raises(ValueError, match=message):
        GemmaCalibSpec(**kw)
