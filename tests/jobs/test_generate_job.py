"""`qdlm generate` on a DiffusionGemma checkpoint: the sampler's settings come from the
checkpoint's generation_config.json with `--config.gemma.*` overrides, the printed text is
the sampler's tokens (the sampler itself is checked against transformers in
tests/inference), the tokens per forward pass are reported, and settings of the other
families are refused with the key named."""

import json

import jax
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.cli import main
from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings, gemma_sample
from qdlm_jax.inference.generate import GenerationConfig, generate

PROMPT = [2, 17, 33, 5, 90]  # BOS first


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("dg") / "tiny",
                               tiny_config("diffusion_gemma"), seed=3)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(max_new_tokens=16, max_denoising_steps=5)  # 2 canvases of 8
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def _printed_ids(out: str) -> list[int]:
    text = out.strip().splitlines()[-1].split("  [stopped")[0]
    return [int(t) for t in text.split()]


def test_cli_prints_the_samplers_tokens_with_generation_config_and_overrides(gemma_dir,
                                                                             capsys):
    rc = main(["generate", "--model", str(gemma_dir), "--prompt", "17 33 5 90",
               "--config.gemma.steps=3", "--config.gemma.greedy=true", "--config.gen.seed=4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 canvas(es) of 8" in captured.err and "up to 3 steps" in captured.err
    assert "tokens per forward" in captured.err

    model = load_model(gemma_dir)
    settings = GemmaSampleSettings(max_new_tokens=16, steps=3, canvas_length=8, greedy=True,
                                   eos_ids=(1,), pad_id=0)
    ref = gemma_sample(model, np.asarray([PROMPT]), settings=settings, key=jax.random.key(4))
    row = [int(t) for t in np.asarray(ref.tokens)[0]]
    gen_ids = row[len(PROMPT):]
    cut = gen_ids.index(1) if 1 in gen_ids else len(gen_ids)
    assert _printed_ids(captured.out) == PROMPT[1:] + gen_ids[:cut]
    passes = int(np.asarray(ref.forward_passes)[0])
    assert f"forward passes per row [{passes}]" in captured.err


def test_generate_dispatches_to_the_gemma_sampler(gemma_dir):
    """A family-neutral GenerationConfig (an eval task's) runs DiffusionGemma's sampler:
    gen_length as max_new_tokens, temperature 0 as greedy draws, the seed as the key."""
    model = load_model(gemma_dir)
    ids = np.asarray([PROMPT])
    out = generate(model, ids, config=GenerationConfig(gen_length=8, temperature=0.0, seed=2))
    ref = gemma_sample(model, ids, settings=GemmaSampleSettings(
        max_new_tokens=8, canvas_length=8, greedy=True), key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.tokens))
    with pytest.raises(ValueError, match="alg='maskgit_plus' does not apply to a "
                                         "diffusion_gemma model"):
        generate(model, ids, config=GenerationConfig(gen_length=8, alg="maskgit_plus"))


def test_other_familys_settings_are_refused_with_the_key(gemma_dir, capsys, tmp_path):
    assert main(["generate", "--model", str(gemma_dir), "--prompt", "3 4",
                 "--config.gen.steps=9"]) == 2
    err = capsys.readouterr().err
    assert "--config.gen.steps=9" in err and "--config.gemma." in err

    assert main(["generate", "--model", str(gemma_dir), "--prompt", "3 4",
                 "--config.gemma.t_min=0.9"]) == 2
    err = capsys.readouterr().err
    assert "t_min" in err and "t_max" in err

    llada = write_hf_checkpoint(tmp_path / "llada", tiny_config("llada"))
    assert main(["generate", "--model", str(llada), "--prompt", "3 4",
                 "--config.gemma.steps=3"]) == 2
    assert "--config.gemma.steps: a DiffusionGemma sampler setting" in capsys.readouterr().err
