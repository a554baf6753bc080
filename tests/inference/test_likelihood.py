"""Monte Carlo likelihood: the estimate converges to its exact expectation, computed by
enumerating every mask subset of a 4-token answer (tests/references/reference_algorithms.py) on a
transformers model with the same tiny weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.inference import likelihood as LK
from tests.references.hf_reference import reference_model
from tests.references.reference_algorithms import (
    dream_exact_expectation,
    hf_forward,
    llada_exact_expectation,
)

PROMPT = np.array([5, 17, 42], np.int32)
ANSWER = np.array([7, 99, 3, 120], np.int32)


def _build(family, tmp_path_factory):
    config = tiny_config(family, num_layers=1)
    path = write_hf_checkpoint(tmp_path_factory.mktemp(family), config, seed=5)
    return config, load_model(path, dtype="float32"), hf_forward(reference_model(path, config))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build(family, tmp_path_factory)
        return cache[family]
    return get


@pytest.fixture(params=["llada", "dream"])
def tiny(request, models):
    return models(request.param)


# Per family: (batch_size, small mc_num, large mc_num). The 1/p weight (p >= eps) gives
# Dream's estimator a heavy tail, so it gets more samples.
MC = {"llada": (4, 8, 1024), "dream": (32, 32, 4096)}


def _estimates(model, mc_num, batch_size, cfg_scale, seeds):
    return np.array([float(LK.log_likelihood(model, PROMPT, ANSWER, mc_num=mc_num,
                                             batch_size=batch_size, cfg_scale=cfg_scale,
                                             key=jax.random.key(s))) for s in seeds])


@pytest.mark.parametrize("family,cfg_scale", [
    ("llada", 0.0), ("llada", 0.5), ("dream", 0.0),
    pytest.param("dream", 0.5, marks=pytest.mark.slow)])
def test_monte_carlo_converges_to_exact_expectation(models, family, cfg_scale):
    config, model, ref_forward = models(family)
    exact_fn = llada_exact_expectation if family == "llada" else dream_exact_expectation
    exact = exact_fn(ref_forward, PROMPT, ANSWER, mask_id=config.mask_token_id,
                     cfg_scale=cfg_scale)
    batch, small, large = MC[family]
    seeds = range(5)
    err_small = np.abs(_estimates(model, small, batch, cfg_scale, seeds) - exact)
    big = _estimates(model, large, batch, cfg_scale, seeds)
    err_large = np.abs(big - exact)
    assert err_large.mean() < err_small.mean() / 4, (err_small, err_large)
    se = big.std(ddof=1) / np.sqrt(len(big))
    assert abs(big.mean() - exact) < 4 * se + 1e-3 * abs(exact), (big, exact)


def test_llada_mask_counts_are_stratified():
    keys = jax.random.split(jax.random.key(0), 5)
    for n, b in [(4, 4)]:
        masks = jax.jit(jax.vmap(lambda k: LK._llada_masks(k, n, b)))(keys)
        for is_mask, counts in zip(*map(np.asarray, masks)):
            np.testing.assert_array_equal(is_mask.sum(1), counts)
            assert counts.min() >= 1 and counts.max() <= n
            if b == n:  # one sweep of linspace: every count once
                assert sorted(counts) == list(range(1, n + 1))


def test_dream_masks_never_touch_first_and_last_position():
    s = LK.LikelihoodSettings(family="dream", mask_id=0, batch_size=64)
    is_mask, p_mask = jax.jit(lambda k: LK._dream_masks(k, 0, 6, 64, s))(jax.random.key(0))
    is_mask = np.asarray(is_mask)
    assert not is_mask[:, 0].any() and not is_mask[:, -1].any() and is_mask[:, 1:-1].any()
    t = (np.asarray(p_mask) - 1e-3) / (1 - 1e-3)
    assert np.ptp(np.sort(t) - np.arange(64) / 64) < 1e-5  # stratified: (u0 + i/b) mod 1


def test_perplexity_bound(tiny):
    config, model, _ = tiny
    windows = np.random.default_rng(0).integers(0, 200, size=(2, 6)).astype(np.int32)
    out = LK.perplexity_bound(model, windows, mc_num=32, batch_size=8, key=jax.random.key(0))
    scored = 6 if config.family == "llada" else 5
    assert out["tokens"] == 2 * scored
    assert out["log_likelihood"].shape == (2,) and np.isfinite(out["log_likelihood"]).all()
    assert out["ppl_bound"] >= 1.0
    np.testing.assert_allclose(out["nll_per_token"],
                               -out["log_likelihood"].sum() / out["tokens"], rtol=1e-6)


def test_bad_arguments(tiny):
    config, model, _ = tiny
    batch = MC[config.family][0]
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="mc_num=10 is not divisible by batch_size=4"):
        LK.log_likelihood(model, PROMPT, ANSWER, mc_num=10, batch_size=4, key=key)
    with pytest.raises(ValueError, match="empty answer"):
        LK.log_likelihood(model, PROMPT, ANSWER[:0], key=key)
    with pytest.raises(ValueError, match="key=None"):
        LK.log_likelihood(model, PROMPT, ANSWER, key=None)
    with pytest.raises(ValueError, match="expected a 1-D array"):
        LK.log_likelihood(model, PROMPT[None], ANSWER, key=key)
    with pytest.raises(ValueError, match="cfg_scale=-1.0"):
        LK.log_likelihood(model, PROMPT, ANSWER, cfg_scale=-1.0, key=key)
    assert jnp.isfinite(LK.log_likelihood(model, PROMPT, ANSWER, mc_num=batch,
                                          batch_size=batch, key=key))


def test_bucket_sizes():
    assert [LK.bucket(x) for x in (0, 1, 8, 9, 17, 33, 65, 100, 129)] == \
        [0, 8, 8, 16, 24, 40, 80, 112, 160]


def test_padding_is_invisible(tiny):
    """The left padding of the prompt and the right padding of the answer are excluded from
    attention and noise: two paddings of the same item give the same estimate (same key,
    same answer width, so the same noise draws), and padding changes nothing a model sees."""
    from flax import nnx

    model = tiny[1]
    graphdef, state = nnx.split(model)
    s = LK.LikelihoodSettings(family=model.config.family, mask_id=model.config.mask_token_id,
                              mc_num=8, batch_size=8, shift_logits=model.config.shift_logits)
    answer = jnp.pad(jnp.asarray(ANSWER), (0, 4))
    out = [float(LK._mc_jit(state, jnp.pad(jnp.asarray(PROMPT), (extra, 0)), answer,
                            jnp.int32(len(PROMPT)), jnp.int32(len(ANSWER)),
                            jax.random.key(3), jnp.int32(2), graphdef=graphdef, s=s))
           for extra in (0, 5, 13)]
    np.testing.assert_allclose(out[1:], [out[0]] * 2, rtol=1e-5)
