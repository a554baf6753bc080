"""The shipped assets/tiny-diffusiongemma: transformers' `from_pretrained` and the project load
it with equal logits, and both samplers give the same tokens on a task prompt with injected
noise (tests/references/diffusion_gemma_reference.py patches transformers' draws)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from qdlm_jax import load_model
from qdlm_jax.checkpoints.load import load_tokenizer
from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings, gemma_sample
from qdlm_jax.models.gemma_config import FAMILY
from tests.checkpoints.test_diffusion_gemma_load import hf_logits, our_logits
from tests.references.diffusion_gemma_reference import hf_generate

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-diffusiongemma"
PROMPT = "Question: 47+38=? Answer:"


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(ASSET, torch_dtype=torch.float32)
    return hf.eval(), load_model(ASSET, dtype="float32"), load_tokenizer(ASSET)


def test_structure_and_size(models):
    _, model, _ = models
    c = model.config
    assert c.family == FAMILY and {"sliding_attention", "full_attention"} <= set(c.layer_types)
    assert c.num_experts >= 8 and c.top_k >= 2
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 10 * 2**20


def test_transformers_and_project_logits_agree(models):
    hf, model, tok = models
    c = model.config
    ids = np.asarray([[c.bos_token_id, *tok.encode(PROMPT)]])
    assert ids.shape[1] > c.sliding_window  # the prompt reaches past the window
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, c.vocab_size, (1, c.canvas_length))
    sc = (3 * rng.standard_normal((1, c.canvas_length, c.vocab_size))).astype(np.float32)
    ref = hf_logits(hf, ids, canvas, sc)
    ours = np.asarray(our_logits(model, jnp.asarray(ids), jnp.asarray(canvas), jnp.asarray(sc)))
    assert np.abs(ref).max() > 1
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_samplers_give_the_same_tokens(models):
    hf, model, tok = models
    c = model.config
    s = GemmaSampleSettings(max_new_tokens=c.canvas_length, steps=16,
                            canvas_length=c.canvas_length, eos_ids=c.eos_token_ids,
                            pad_id=c.pad_token_id, greedy=True)
    ids = np.asarray([[c.bos_token_id, *tok.encode(PROMPT)]])
    mask = np.ones_like(ids, bool)
    checked = 0
    for seed in range(4):  # a draw whose decisions rest on a float-rounding margin is skipped
        noise = np.random.default_rng(seed).integers(
            0, c.vocab_size, (s.num_canvases, s.steps + 1, 1, c.canvas_length))
        ref, ref_tpf, near_tie = hf_generate(hf, ids, mask, noise, s)
        if near_tie:
            continue
        ours = gemma_sample(model, ids, mask, settings=s, noise=noise)
        np.testing.assert_array_equal(np.asarray(ours.tokens), ref, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(np.asarray(ours.tokens_per_forward), ref_tpf)
        answer = tok.decode([int(t) for t in np.asarray(ours.tokens)[0, ids.shape[1]:]
                             if t not in (c.pad_token_id, *c.eos_token_ids)])
        assert answer.strip() == "85"  # the trained model answers; both samplers agree on it
        checked += 1
        if checked == 2:
            break
    assert checked == 2, f"only {checked} of the noise draws were checked"
