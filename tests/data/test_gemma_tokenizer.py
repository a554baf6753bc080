"""Gemma 4's tokenizer rebuilt from llama.cpp's vocabulary file: equal to llama.cpp's test
vectors (encode and decode), loaded by `load_tokenizer` for a DiffusionGemma checkpoint with
its special ids and no mask id. Skipped with the reason when the package registry that
holds the vocabulary file cannot be reached."""

import json

import pytest

from qdlm_jax import load_tokenizer
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.errors import DataSourceError


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """config.json of a DiffusionGemma with Gemma 4's vocabulary size, and the tokenizer."""
    from qdlm_jax.data.llamacpp_vocab import write_gemma_tokenizer
    out = tmp_path_factory.mktemp("gemma")
    try:
        write_gemma_tokenizer(out)
    except DataSourceError as e:
        pytest.skip(f"llama.cpp vocab files not reachable: {str(e).splitlines()[0]}")
    config = tiny_config("diffusion_gemma", vocab_size=262_144)
    (out / "config.json").write_text(json.dumps(config.to_hf()))
    return out


@pytest.fixture(scope="module")
def tok(gemma_dir):
    return load_tokenizer(gemma_dir)


def test_tokenizer_equals_llamacpp_vectors(tok):
    from qdlm_jax.data.llamacpp_vocab import GEMMA4_VOCAB, fetch_vocab_files, read_test_vectors
    files = fetch_vocab_files([GEMMA4_VOCAB, GEMMA4_VOCAB + ".inp", GEMMA4_VOCAB + ".out"])
    vectors = read_test_vectors(files[GEMMA4_VOCAB])
    assert len(vectors) >= 40
    for text, ids in vectors:
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text, text
    # special and tool tokens are single ids; a byte with no token falls back to <0xXX>
    assert tok.encode("<bos><turn|><|tool_call>") == [2, 106, 48]
    assert tok.encode("\x00") == [238]


def test_special_ids_without_a_mask(tok):
    s = tok.special
    assert (s.pad, s.eos, s.bos, s.mask) == (0, 1, 2, None)
    assert s.stops == (1,)
    assert tok.chat_template and "<|turn>" in tok.chat_prompt([{"role": "user",
                                                                 "content": "Hi"}])
