"""The DiffusionGemma sampler against transformers' `generate`, token for token, and the
answer score.

One tiny config with both layer types ([S, S, F], sliding window 4 < prompt 7, canvas 6);
transformers builds the weights (randomised as in tests/models/test_diffusion_gemma.py) and
ours are read from its state dict. transformers runs in fp32 with its default DynamicCache,
patched to be deterministic (tests/references/diffusion_gemma_reference.py):
`EntropyBoundSampler.initialize_canvas` returns the injected uniform ids (noise[c, 0] for
canvas c's start, noise[c, j + 1] for step j's renoising), `torch.multinomial` takes the
argmax of the probabilities (our `greedy` draw) and `torch.sort` is stable (as our argsort).
Row 1 of every batch is left-padded.

Near ties: our logits differ from transformers' by ~1e-5, so a decision that rests on a
smaller margin may go either way. While transformers runs, the margins of its rows still
denoising are recorded: the top-2 gap of z = logits / T (the argmax canvas and the greedy
draw), |sum of strictly lower-ranked entropies - bound| (acceptance) and |mean entropy -
confidence threshold| (the early stop). A seed with any margin under `TIE_TOL` is skipped,
and each test asserts that most seeds were checked.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion

from qdlm_jax.checkpoints.diffusion_gemma import params_from_state_dict
from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings, gemma_sample
from qdlm_jax.inference.gemma_likelihood import answer_score
from qdlm_jax.models.diffusion_gemma import init_cache, model_from_params
from qdlm_jax.models.gemma_config import FULL, SLIDING, DiffusionGemmaConfig
from tests.references.diffusion_gemma_reference import hf_generate

CONFIG = DiffusionGemmaConfig(
    vocab_size=96, hidden_size=32, num_layers=3, layer_types=(SLIDING, SLIDING, FULL),
    num_heads=4, num_kv_heads=2, head_dim=8, num_global_kv_heads=1, global_head_dim=16,
    intermediate_size=48, num_experts=4, top_k=2, moe_intermediate_size=24, sliding_window=4,
    canvas_length=6, rope_theta=100.0, global_rope_theta=1000.0)
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=8, patch_size=4, position_embedding_size=16)
L = CONFIG.canvas_length
BATCH, PROMPT, LEFT_PAD = 2, 7, 2
# two canvases (ceil(11 / 6)), 8 steps, transformers' default thresholds
SETTINGS = GemmaSampleSettings(max_new_tokens=2 * L - 1, steps=8, canvas_length=L, eos_ids=(),
                               pad_id=0, greedy=True)
SEEDS = range(8)


def _models(copy_input: bool):
    """(transformers model, our model). `copy_input` zeroes every layer's residual branches
    (o_proj, MLP and expert down projections): the decoder then maps each canvas token to
    itself through the residual stream and self-conditioning, confidently enough to stop
    early (scaling the embedding up does not do it with these weights: the soft cap then
    saturates many logits at once and the entropy rises)."""
    torch.manual_seed(0)
    hf = DiffusionGemmaForBlockDiffusion(
        HFConfig(**{**CONFIG.to_hf(), "vision_config": TINY_VISION})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.model.decoder.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 * (1.0 + 0.3 * torch.randn(p.shape, generator=g)))
            elif name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            if copy_input and name.startswith("layers.") and name.endswith(
                    ("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()
        for layer in (*hf.model.decoder.layers, *hf.model.encoder.language_model.layers):
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=g))
    tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    params, _ = params_from_state_dict(CONFIG, tensors)
    return hf, model_from_params(CONFIG, {p: jnp.asarray(v) for p, v in params.items()})


def _inputs(seed, s: GemmaSampleSettings):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (BATCH, PROMPT))
    mask = np.ones((BATCH, PROMPT), bool)
    mask[1, :LEFT_PAD] = False
    ids[~mask] = s.pad_id
    noise = rng.integers(0, CONFIG.vocab_size, (s.num_canvases, s.steps + 1, BATCH, L))
    return ids, mask, noise


def _compare(hf, model, s: GemmaSampleSettings, seed):
    """Our output for `seed` after asserting it equals transformers'; None on a near tie."""
    ids, mask, noise = _inputs(seed, s)
    ref, ref_tpf, near_tie = hf_generate(hf, ids, mask, noise, s)
    if near_tie:
        return None
    ours = gemma_sample(model, ids, mask, settings=s, noise=noise)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(ours.tokens_per_forward), ref_tpf,
                                  err_msg=f"seed {seed}")
    return ours


def _run_seeds(hf, model, s, seeds=SEEDS):
    outs = {seed: _compare(hf, model, s, seed) for seed in seeds}
    checked = {k: v for k, v in outs.items() if v is not None}
    assert len(checked) >= 0.6 * len(outs), f"only seeds {sorted(checked)} were checked"
    return checked


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs faster without a pool on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain():
    return _models(copy_input=False)


@pytest.fixture(scope="module")
def plain_runs(plain):
    return _run_seeds(*plain, SETTINGS)


@pytest.fixture(scope="module")
def copier_runs():
    return _run_seeds(*_models(copy_input=True), SETTINGS)


def test_matches_transformers_without_early_stop(plain_runs):
    for out in plain_runs.values():
        np.testing.assert_array_equal(np.asarray(out.steps), [SETTINGS.steps] * 2)
        np.testing.assert_array_equal(np.asarray(out.forward_passes), [2 * SETTINGS.steps] * 2)


def test_matches_transformers_with_early_stop(copier_runs):
    steps = np.stack([np.asarray(o.steps) for o in copier_runs.values()])
    assert (steps < SETTINGS.steps).any() and (steps >= 2).all(), steps


def test_rows_finishing_at_different_steps(copier_runs):
    """A row that stops first is frozen while the other denoises; its passes stop counting."""
    passes = np.stack([np.asarray(o.forward_passes) for o in copier_runs.values()])
    steps = np.stack([np.asarray(o.steps).sum() for o in copier_runs.values()])
    assert (passes[:, 0] != passes[:, 1]).any(), passes
    assert (passes.max(axis=1) <= steps).all()


def test_rows_stopping_on_confidence_alone(plain):
    """stability_threshold = 0: a row stops as soon as its mean entropy drops under the
    threshold while its argmax canvas would still change, so the freezing of a finished
    row's argmax shows in the output (freezing its canvas and self-conditioning logits does
    not: only its argmax is read once it is done)."""
    hf, model = plain
    s = dataclasses.replace(SETTINGS, stability_threshold=0, confidence_threshold=0.1)
    passes = np.stack([np.asarray(o.forward_passes)
                       for o in _run_seeds(hf, model, s).values()])
    assert (passes[:, 0] != passes[:, 1]).any(), passes


def test_eos_in_the_second_of_three_canvases(plain):
    """EOS = a token of row 0's second canvas absent from both first canvases (read from a
    run without EOS; a second, unused EOS id rides along): row 0 is cut after it and padded
    from then on, its later passes are not counted, and the padded canvas is what the encoder
    reads next."""
    hf, model = plain
    s = dataclasses.replace(SETTINGS, max_new_tokens=2 * L + 1)
    cut = PROMPT + L
    checked = 0
    for seed in range(6):
        ids, mask, noise = _inputs(seed, s)
        free, _, _ = hf_generate(hf, ids, mask, noise, s)
        candidates = sorted(set(free[0, cut:cut + L]) - set(free[:, PROMPT:cut].ravel())
                            - {s.pad_id})
        if not candidates:
            continue
        unused = sorted(set(range(3, CONFIG.vocab_size)) - set(free.ravel()))[0]
        se = dataclasses.replace(s, eos_ids=(int(candidates[0]), unused))
        ours = _compare(hf, model, se, seed)
        if ours is None:
            continue
        checked += 1
        tokens = np.asarray(ours.tokens)
        first = list(tokens[0, cut:cut + L]).index(se.eos_ids[0])  # its EOS is kept
        assert (tokens[0, cut + first + 1:] == s.pad_id).all()
    assert checked >= 3, checked


def test_random_draws_are_reproducible(plain):
    """The path without injected noise: categorical draws and uniform ids from the key."""
    _, model = plain
    s = dataclasses.replace(SETTINGS, greedy=False, steps=3, max_new_tokens=L)
    ids, mask, _ = _inputs(0, s)
    a = gemma_sample(model, ids, mask, settings=s, key=jax.random.key(1))
    b = gemma_sample(model, ids, mask, settings=s, key=jax.random.key(1))
    c = gemma_sample(model, ids, mask, settings=s, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    tokens = np.asarray(a.tokens)
    assert tokens.shape == (BATCH, PROMPT + L)
    np.testing.assert_array_equal(tokens[:, :PROMPT], ids)
    assert tokens.min() >= 0 and tokens.max() < CONFIG.vocab_size


def test_settings_from_generation_config():
    s = GemmaSampleSettings.from_generation_config(
        {"max_new_tokens": 512, "max_denoising_steps": 32, "t_min": 0.3,
         "sampler_config": {"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"},
         "eos_token_id": [1, 106], "transformers_version": "5.23.0"}, config=CONFIG)
    assert (s.max_new_tokens, s.steps, s.entropy_bound, s.t_min, s.t_max) == (
        512, 32, 0.2, 0.3, 0.8)
    assert (s.stability_threshold, s.confidence_threshold) == (1, 0.005)
    assert (s.eos_ids, s.pad_id, s.canvas_length, s.num_canvases) == ((1, 106), 0, L, 86)
    assert GemmaSampleSettings.from_generation_config({}, config=CONFIG).eos_ids == (1,)
    with pytest.raises(ValueError, match="max_length"):
        GemmaSampleSettings.from_generation_config({"max_length": 300})
    with pytest.raises(ValueError, match="t_min"):
        GemmaSampleSettings(t_min=0.9, t_max=0.8)


@nnx.jit
def _greedy_answer(model, prompt, start):
    """Two canvases after `prompt`, each iterated a <- argmax Dec(a) (no self-conditioning)
    from `start` [2, L] given the prompt and the canvas before it, as the sampler encodes it:
    the decoder's own greedy answer, teacher-forced canvas by canvas."""
    p = prompt.shape[0]
    cache = model.encode(prompt[None], jnp.arange(p)[None], init_cache(model.config, 1, p + L))
    answer = []
    for c in range(2):
        positions = jnp.arange(p + c * L, p + (c + 1) * L)[None]

        def step(_, a):
            return jnp.argmax(model.decode(a, None, cache, positions), -1).astype(jnp.int32)

        a = jax.lax.fori_loop(0, 12, step, start[c][None])
        answer.append(a[0])
        cache = model.encode(a, positions, cache)
    return jnp.concatenate(answer)


# slow: with self-conditioning (the score without it runs in `make test`)
@pytest.mark.parametrize("self_condition", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_score_ranks_the_greedy_answer_above_shuffles(plain, self_condition):
    """The decoder's greedy answer (two canvases) scores lower than shuffles of it that move at
    least half its tokens: below their mean for every prompt, below each in most pairs. Low
    noise levels: at high noise a random model's predictions say little about the answer."""
    _, model = plain
    levels = (0.1, 0.25, 0.5)
    rng = np.random.default_rng(7)
    wins = pairs = 0
    for seed in range(4):
        ids, _, noise = _inputs(seed, SETTINGS)
        answer = np.asarray(_greedy_answer(model, jnp.asarray(ids[0]),
                                           jnp.asarray(noise[:, 0, 0])))

        def score(a, seed=seed, prompt=ids[0]):
            return float(answer_score(model, prompt, a, key=jax.random.key(seed),
                                      levels=levels, self_condition=self_condition))

        own, others = score(answer), []
        while len(others) < 4:
            shuffled = rng.permutation(answer)
            if np.sum(shuffled != answer) >= answer.size // 2:
                others.append(score(shuffled))
        assert own < np.mean(others), (seed, own, others)
        wins += sum(own < o for o in others)
        pairs += len(others)
    assert wins >= 0.8 * pairs, (wins, pairs)
