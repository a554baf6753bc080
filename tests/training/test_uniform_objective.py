"""The uniform-state objective against a NumPy statement of it: the noise law, the
row-normalised CE over answer positions, and the composite loss (prompt through the causal
encoder pass, one or two decoder passes with the first one's logits / T fed back)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax.models.diffusion_gemma import init_cache, init_model
from qdlm_jax.models.gemma_config import FULL, SLIDING, DiffusionGemmaConfig
from qdlm_jax.training.uniform_objective import (
    gemma_task_loss,
    load_balance_loss,
    sc_temperature,
    uniform_noise,
    uniform_state_loss,
)

CONFIG = DiffusionGemmaConfig(
    vocab_size=64, hidden_size=32, num_layers=2, layer_types=(SLIDING, FULL),
    num_heads=4, num_kv_heads=2, head_dim=8, num_global_kv_heads=1, global_head_dim=16,
    intermediate_size=48, num_experts=4, top_k=2, moe_intermediate_size=24, sliding_window=4,
    canvas_length=6, rope_theta=100.0, global_rope_theta=1000.0)


def _np_ce(logits, tokens, answer):
    """1/B sum_b 1/|answer_b| sum_{i in answer_b} -log softmax(logits_bi)[a_bi], in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
    answer = np.asarray(answer, bool)
    rows = [ce[b][answer[b]].mean() if answer[b].any() else 0.0 for b in range(len(ce))]
    return float(np.mean(rows))


def test_noise_replaces_answer_positions_at_the_row_level_uniformly() -> None:
    b, n, v = 64, 4000, 16
    tokens = jnp.full((b, n), 5, jnp.int32)
    answer = jnp.asarray(np.arange(n)[None, :] < np.linspace(100, n, b)[:, None])
    x, noised, t = map(np.asarray, uniform_noise(jax.random.key(0), tokens, answer, v))
    answer = np.asarray(answer)
    assert not noised[~answer].any() and (x[~noised] == 5).all()  # kept and padding: clean
    assert (0 < t).all() and (t <= 1).all()
    frac = noised.sum(1) / answer.sum(1)
    se = np.sqrt(t * (1 - t) / answer.sum(1)) + 1e-3
    assert (np.abs(frac - t) < 5 * se).all()  # Bernoulli(t_b) per position of row b
    counts = np.bincount(x[noised], minlength=v)
    expected = noised.sum() / v
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 50, chi2  # uniform over the vocabulary (15 dof: p ~ 1e-5 at 50)


def test_loss_equals_numpy_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 7))
    answer = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7], bool)
    loss, m = uniform_state_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(answer),
                                 jnp.asarray(answer & (rng.random((3, 7)) < 0.5)))
    np.testing.assert_allclose(float(loss), _np_ce(logits, tokens, answer), rtol=1e-5)
    poked = logits.copy()
    poked[1, 3:] += 100 * rng.normal(size=(4, 11))  # padding logits: no effect
    loss2, _ = uniform_state_loss(jnp.asarray(poked), jnp.asarray(tokens), jnp.asarray(answer))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    assert 0 <= float(m["noise_frac"]) <= 1


@pytest.fixture(scope="module")
def batch():
    model = init_model(CONFIG, seed=3)
    b, p, n = 3, 9, CONFIG.canvas_length
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, p)), jnp.int32)
    valid = jnp.asarray(np.arange(p)[None, :] >= np.array([0, 3, 1])[:, None])
    canvas = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, n)), jnp.int32)
    answer = jnp.asarray(np.arange(n)[None, :] < np.array([6, 4, 2])[:, None])
    return model, prompt, valid, canvas, answer


@nnx.jit(static_argnames="sc_prob")
def _loss_and_statement(model, key, prompt, valid, canvas, answer, sc_prob):
    """The objective's loss, and the logits of the statement run pass by pass."""
    loss, m = gemma_task_loss(model, key, prompt, valid, canvas, answer, sc_prob=sc_prob)
    k_noise, _ = jax.random.split(key)
    x, _, t = uniform_noise(k_noise, canvas, answer, CONFIG.vocab_size)
    b, p = prompt.shape
    n = canvas.shape[1]
    cache = model.encode(prompt, jnp.broadcast_to(jnp.arange(p), (b, p)),
                         init_cache(CONFIG, b, p), valid)
    pos = jnp.broadcast_to(p + jnp.arange(n), (b, n))
    logits = model.decode(x, None, cache, pos)
    if sc_prob:
        temperature = (0.4 + 0.4 * t)[:, None, None]  # t_min + (t_max - t_min) t
        logits = model.decode(x, logits / temperature, cache, pos)
    return loss, m, logits


@pytest.mark.parametrize("sc_prob", [0.0, 1.0])
def test_composite_loss_is_the_stated_passes(batch, sc_prob) -> None:
    model, prompt, valid, canvas, answer = batch
    loss, m, logits = _loss_and_statement(model, jax.random.key(7), prompt, valid, canvas,
                                          answer, sc_prob)
    assert float(m["self_conditioned"]) == sc_prob
    np.testing.assert_allclose(float(loss), _np_ce(logits, canvas, answer), rtol=1e-5)
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(np.asarray(sc_temperature(jnp.asarray(t), 0.4, 0.8)),
                               0.4 + 0.4 * t, rtol=1e-6)


# Slow (about 40 s of compilation); test_composite_loss_is_the_stated_passes covers the
# forward passes.
@pytest.mark.slow
def test_gradient_reaches_the_self_conditioning_and_the_prompt_matters(batch) -> None:
    model, prompt, valid, canvas, answer = batch

    def f(m, sc_prob):
        return gemma_task_loss(m, jax.random.key(2), prompt, valid, canvas, answer,
                               sc_prob=sc_prob)[0]
    grads = nnx.grad(f)(model, 1.0)
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(v))
             for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(grads))}
    assert norms and all(np.isfinite(list(norms.values())))
    assert any(v > 0 for k, v in norms.items() if "self_conditioning" in k)
    # the prompt reaches the loss through the encoder pass's cache
    other = (prompt + 1) % CONFIG.vocab_size
    assert float(f(model, 0.0)) != float(
        gemma_task_loss(model, jax.random.key(2), other, valid, canvas, answer, sc_prob=0.0)[0])
    with pytest.raises(ValueError, match="canvas_length"):
        gemma_task_loss(model, jax.random.key(0), prompt, valid, canvas[:, :4], answer[:, :4])


def test_load_balance_loss_equals_numpy() -> None:
    """E sum_e f_e P_e per layer (f from the top-k choices of valid tokens, P the mean
    router probability), averaged over layers; 1 when perfectly balanced."""
    rng = np.random.default_rng(4)
    b, t, k, e = 3, 5, 2, 4
    routes, valid = {}, rng.random((b, t)) < 0.7
    valid[0, 0] = True
    for layer in range(2):
        logits = rng.normal(size=(b, t, e)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
        routes[layer] = (jnp.asarray(top, jnp.int32), None, jnp.asarray(probs, jnp.float32))
    aux, shares = load_balance_loss(routes, e, jnp.asarray(valid))
    expected, expected_f = [], []
    for layer in range(2):
        top, _, probs = (np.asarray(a) if a is not None else None for a in routes[layer])
        f = np.array([(top[valid] == j).sum() for j in range(e)]) / (valid.sum() * k)
        p = np.asarray(probs)[valid].mean(0)
        expected.append(e * (f * p).sum())
        expected_f.append(f)
    np.testing.assert_allclose(float(aux), np.mean(expected), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(shares), np.stack(expected_f), rtol=1e-6)
    # balanced: every expert chosen equally, uniform probabilities
    top = np.tile(np.arange(e).reshape(2, 2), (3, 1))[None]  # [1, 6, 2]: each expert 3 times
    uniform = jnp.full((1, 6, e), 1 / e)
    aux1, _ = load_balance_loss({0: (jnp.asarray(top), None, uniform)}, e)
    np.testing.assert_allclose(float(aux1), 1.0, rtol=1e-6)
