"""Shared fixtures of the evaluation tests: the bundled tiny models, loaded once."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llada():
    from qdlm_jax.evals.backends import load_text_model
    return load_text_model(ROOT / "assets" / "tiny-llada")


@pytest.fixture(scope="session")
def tiny_dream():
    from qdlm_jax.evals.backends import load_text_model
    return load_text_model(ROOT / "assets" / "tiny-dream")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
    """A random tiny DiffusionGemma (2 canvases of 8 at most 4 steps each by its generation
    config) with the bundled tokenizer (pad 0, BOS 1, EOS 2)."""
    import json
    import shutil

    from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
    from qdlm_jax.evals.backends import load_text_model

    config = tiny_config("diffusion_gemma", vocab_size=1024, bos_token_id=1, eos_token_ids=(2,))
    path = write_hf_checkpoint(tmp_path_factory.mktemp("gemma") / "tiny", config, seed=2)
    shutil.copy(ROOT / "assets" / "tiny-llada" / "tokenizer.json", path / "tokenizer.json")
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(max_denoising_steps=4)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return load_text_model(path)
