"""Special ids of a checkpoint: the order of the files they come from, stated as a table of
cases (each case writes only the files it names), and the errors for a missing id."""

import json

import pytest

from qdlm_jax.data.hf_tokenizer import load_hf_tokenizer, resolve_special_ids
from qdlm_jax.errors import CheckpointError, ConfigError


def write(d, **files):
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / f"{name}.json").write_text(json.dumps(data))
    return d


def tokenizer_json(tokens: dict[str, int]) -> dict:
    """A tokenizer.json whose special tokens are `tokens` (text -> id)."""
    return {"added_tokens": [{"id": i, "content": t, "special": True}
                             for t, i in tokens.items()],
            "model": {"type": "BPE", "vocab": {"a": 10, "b": 11, **tokens}, "merges": []}}


def test_config_json_first_then_generation_config_then_tokenizer(tmp_path):
    d = write(tmp_path / "c", config={"mask_token_id": 5, "bos_token_id": 6},
              generation_config={"mask_token_id": 7, "eos_token_id": [8, 9], "pad_token_id": 9},
              tokenizer_config={"pad_token": "<p>", "eos_token": "<e>", "bos_token": "<b>"},
              tokenizer=tokenizer_json({"<p>": 1, "<e>": 2, "<b>": 3}))
    s = resolve_special_ids(d, family="llada", vocab_size=64)
    assert (s.mask, s.bos, s.eos, s.pad) == (5, 6, 8, 9)
    where = dict(s.sources)
    assert where["mask"] == "config.json:mask_token_id"
    assert where["eos"] == "generation_config.json:eos_token_id"
    assert s.stops == (8, 9)  # every generation EOS ends an answer


def test_tokenizer_files_then_family_names(tmp_path):
    d = write(tmp_path / "t", config={},
              tokenizer_config={"mask_token": {"content": "<m>"}},
              special_tokens_map={"bos_token": "<b>", "mask_token": "<other>"},
              tokenizer=tokenizer_json({"<m>": 4, "<b>": 3, "<other>": 9, "<|im_end|>": 7,
                                        "<|endoftext|>": 2}))
    s = resolve_special_ids(d, family="dream", vocab_size=64)
    assert (s.mask, s.bos, s.eos, s.eot) == (4, 3, 2, 7)  # tokenizer_config before the map
    assert dict(s.sources)["eot"] == "tokenizer vocabulary: dream's '<|im_end|>'"
    assert s.stops == (2, 7)


def test_published_defaults_only_for_the_published_vocabulary(tmp_path):
    d = write(tmp_path / "p", config={})
    s = resolve_special_ids(d, family="llada", vocab_size=126464)
    assert (s.mask, s.bos, s.eos, s.eot) == (126336, 126080, 126081, 126348)
    with pytest.raises(ConfigError, match=r"config.json: no mask_token_id"):
        resolve_special_ids(d, family="llada", vocab_size=1000)


def test_missing_bos_for_llada_and_out_of_range_ids(tmp_path):
    d = write(tmp_path / "b", config={"mask_token_id": 3})
    with pytest.raises(ConfigError, match=r"config.json: no bos_token_id"):
        resolve_special_ids(d, family="llada", vocab_size=64)
    assert resolve_special_ids(d, family="dream", vocab_size=64).bos is None
    d = write(tmp_path / "r", config={"mask_token_id": 99})
    with pytest.raises(ConfigError, match=r"mask id 99 .* outside the vocabulary \[0, 64\)"):
        resolve_special_ids(d, family="dream", vocab_size=64)


def test_no_tokenizer_and_bad_json_name_the_file(tmp_path):
    d = write(tmp_path / "n", config={"mask_token_id": 1})
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_hf_tokenizer(d)
    (d / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"generation_config.json: not valid JSON"):
        resolve_special_ids(d, family="dream", vocab_size=64)
