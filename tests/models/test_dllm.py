"""The Flax dLLM against transformers' Llama/Qwen2 run bidirectionally on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import Capture, load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.models import abstract_model, count_params, dream_7b, linear_names, llada_8b
from tests.references.hf_reference import reference_logits, reference_model

FAMILIES = ["llada", "dream"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    config = tiny_config(request.param)
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=1)
    return config, path


def _ids(config, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(batch, seq)).astype(np.int32)


def test_logits_match_transformers_without_padding(tiny):
    config, path = tiny
    model = load_model(path, dtype="float32")
    ids = _ids(config, 2, 12)
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = reference_logits(reference_model(path, config), ids)
    assert ours.shape == (2, 12, config.vocab_size)
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_logits_match_transformers_with_left_padding(tiny):
    config, path = tiny
    model = load_model(path, dtype="float32")
    ids = _ids(config, 3, 10, seed=1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = config.pad_token_id
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = reference_logits(reference_model(path, config), ids, mask)
    valid = mask.astype(bool)
    assert np.max(np.abs(ours[valid] - ref[valid])) <= 1e-4
    # Padding matters: without the mask the valid positions of row 0 change.
    unmasked = np.asarray(model(jnp.asarray(ids)))
    assert np.max(np.abs(unmasked[0][valid[0]] - ours[0][valid[0]])) > 1e-3


def test_fully_padded_row_gives_no_nan(tiny):
    config, path = tiny
    model = load_model(path)
    ids = _ids(config, 2, 6)
    mask = np.ones_like(ids)
    mask[1] = 0
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(out).all()


def test_bfloat16_runs_close_to_fp32(tiny):
    config, path = tiny
    ids = jnp.asarray(_ids(config, 2, 8))
    fp32 = np.asarray(load_model(path, dtype="float32")(ids))
    model = load_model(path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    bf16 = model(ids)
    assert bf16.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16.astype(jnp.float32))
    assert np.isfinite(bf16).all()
    # bf16 has 8 bits of mantissa; logits of O(1-10) agree to a few percent of their scale.
    assert np.max(np.abs(bf16 - fp32)) < 0.05 * np.max(np.abs(fp32)) + 0.1


def test_capture_records_every_linear_input_under_jit(tiny):
    config, path = tiny
    model = load_model(path)
    ids = jnp.asarray(_ids(config, 2, 5))

    @jax.jit
    def run(ids):
        cap = Capture()
        return model(ids, capture=cap), cap.values

    _, values = run(ids)
    assert sorted(values) == sorted(linear_names(config))
    d = config.hidden_size
    assert values["layers.0.q_proj"].shape == (2, 5, d)
    assert values["layers.1.down_proj"].shape == (2, 5, config.intermediate_size)
    # The q_proj input is the normalised embedding: check it by hand.
    x = model.embed[...][ids]
    x32 = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + config.rms_norm_eps)
    np.testing.assert_allclose(values["layers.0.q_proj"],
                               x32 * model.layers[0].attn_norm.scale[...], rtol=1e-5, atol=1e-5)
    grams = Capture(names=("lm_head",), fn=lambda x: jnp.einsum("bti,btj->ij", x, x))
    model(ids, capture=grams)
    assert grams.values["lm_head"].shape == (d, d)
    # Block outputs (the residual stream) only when asked for; the last one is what the final
    # norm reads.
    stream = Capture(names=(), residual_fn=lambda h: h)
    h = model.hidden_states(ids, capture=stream)
    assert not values.keys() & {0, 1} and sorted(stream.residual) == list(range(config.num_layers))
    assert stream.values == {} and stream.residual[0].shape == (2, 5, d)
    np.testing.assert_allclose(model.final_norm(stream.residual[config.num_layers - 1]), h,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,expected", [(llada_8b, 8.02e9), (dream_7b, 7.62e9)])
def test_real_configs_have_published_param_counts(make, expected):
    n = count_params(abstract_model(make()))
    assert abs(n - expected) / expected < 0.005, n


def test_query_window_equals_slice_of_full_pass(tiny):
    config, path = tiny
    model = load_model(path)
    ids = jnp.asarray(_ids(config, 2, 12))
    mask = jnp.asarray(np.array([[0, 0] + [1] * 10, [1] * 12]))
    full = model.hidden_states(ids, mask)

    @jax.jit
    def window(start):
        return model.hidden_states(ids, mask, query_window=(start, 4))

    for start in (0, 5, 8):
        np.testing.assert_allclose(np.asarray(window(start)),
                                   np.asarray(full[:, start:start + 4]), rtol=1e-5, atol=1e-5)
