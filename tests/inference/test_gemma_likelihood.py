"""`left_to_right_nll` against a plain loop over positions and noise draws (one decoder call
each, unpadded prompt), and the continuation NLL of `evals.basic` built on it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax import load_model
from qdlm_jax.evals.basic import continuation_ce
from qdlm_jax.inference.gemma_likelihood import answer_score, left_to_right_nll
from qdlm_jax.models.diffusion_gemma import init_cache

ASSET = Path(__file__).resolve().parents[2] / "assets/tiny-diffusiongemma"


@pytest.fixture(scope="module")
def model():
    return load_model(ASSET, dtype="float32")


@nnx.jit
def _logits(model, prompt, x):
    p = prompt.shape[1]
    cache = model.encode(prompt, jnp.arange(p)[None], init_cache(model.config, 1, p))
    return model.decode(x, None, cache)


def test_left_to_right_nll_equals_a_plain_loop(model):
    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, c.vocab_size, 11)
    canvas = rng.integers(4, c.vocab_size, c.canvas_length)
    key, samples, length = jax.random.key(3), 3, c.canvas_length
    noise = np.asarray(jax.random.randint(key, (length, samples, length), 0, c.vocab_size))
    total = 0.0
    for i in range(length):
        for s in range(samples):
            x = np.where(np.arange(length) < i, canvas, noise[i, s])
            logp = jax.nn.log_softmax(_logits(model, jnp.asarray(prompt)[None],
                                              jnp.asarray(x)[None])[0, i].astype(jnp.float32))
            total -= float(logp[canvas[i]])
    want = total / (length * samples)
    got = float(left_to_right_nll(model, prompt, canvas, key=key, samples=samples))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="more than the model's canvas_length"):
        left_to_right_nll(model, prompt, np.ones(length + 1, np.int32), key=key)


def test_continuation_nll_orders(model):
    """The window means of the per-window scores, window i with key fold_in(key(seed), i):
    `left_to_right_nll` by default, the single-level answer score with order='parallel'."""
    c = model.config
    rng = np.random.default_rng(1)
    windows = rng.integers(4, c.vocab_size, (2, 20 + c.canvas_length))
    keys = [jax.random.fold_in(jax.random.key(5), i) for i in range(2)]
    for order, fn in (("parallel", lambda w, k: answer_score(
            model, w[:20], w[20:], key=k, levels=(1.0,), samples=2)),
            ("left_to_right", lambda w, k: left_to_right_nll(model, w[:20], w[20:], key=k,
                                                              samples=2))):
        r = continuation_ce(model, windows, samples=2, seed=5, order=order, progress=False)
        want = np.mean([float(fn(w, k)) for w, k in zip(windows, keys)])
        np.testing.assert_allclose(r["nll_nats"], want, rtol=1e-6)
        assert r["order"] == order and r["tokens"] == 2 * c.canvas_length
    with pytest.raises(ValueError, match="order='sideways'"):
        continuation_ce(model, windows, order="sideways")
