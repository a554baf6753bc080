"""Tests for qdlm_jax.data.tokenizer (trains a tiny BPE on synthetic text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdlm_jax.data.arithmetic import generate_problems, render_text
from qdlm_jax.data.sources import token_windows
from qdlm_jax.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TokenizerSpec,
    build_untrained_tokenizer,
    load_bpe_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs!\nSphinx of black quartz, judge my vow.",
    "In 1987 the population was 12,345; by 2001 it had grown to 67,890 people.",
    *(render_text(p) for p in generate_problems(200, seed=0)),
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, TokenizerSpec(vocab_size=400, min_frequency=1))


def test_special_tokens_distinct_single_tokens(tok) -> None:
    ids = special_token_ids(tok)
    assert (ids.pad, ids.bos, ids.eos, ids.mask) == (0, 1, 2, 3)
    for token in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN):
        enc = tok.encode(token)
        assert enc.ids == [tok.token_to_id(token)], token
    assert len(set(SPECIAL_TOKENS)) == 4
    enc = tok.encode(f"hello{MASK_TOKEN}{MASK_TOKEN} world")
    assert enc.ids.count(ids.mask) == 2


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.",
        "  leading and trailing spaces  \n\nnew\tlines and tabs\r\n",
        "Question: 47+38=? Answer: 85",
        "~`!@#$%^&*()_-+={[}]|\\:;\"'<,>.?/ 0123456789",
        "unicode too: café, naïve, 東京, emoji 🙂",
    ],
)
def test_round_trip(tok, text: str) -> None:
    assert tok.decode(tok.encode(text).ids) == text


def test_digits_are_split_individually(tok) -> None:
    tokens = tok.encode("12345 + 678").tokens
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345678")


def test_vocab_size_and_save_load(tok, tmp_path: Path) -> None:
    assert tok.get_vocab_size() <= 400
    path = save_tokenizer(tok, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    loaded = load_bpe_tokenizer(tmp_path / "tok")
    assert load_bpe_tokenizer(path).get_vocab() == loaded.get_vocab() == tok.get_vocab()
    assert special_token_ids(loaded) == special_token_ids(tok)
    text = "Sphinx of black quartz 42"
    assert loaded.encode(text).ids == tok.encode(text).ids


def test_load_rejects_tokenizer_without_special_tokens(tmp_path: Path) -> None:
    plain = build_untrained_tokenizer()
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"lacks special tokens"):
        load_bpe_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_bpe_tokenizer(tmp_path / "nope")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerSpec(vocab_size=100)


def test_token_windows_with_real_tokenizer(tok) -> None:
    ids = special_token_ids(tok)
    out = token_windows(CORPUS, tok, 16, bos_id=ids.bos, eos_id=ids.eos)
    assert out.shape[1] == 16 and out.shape[0] > 10
    assert out[0, 0] == ids.bos
    assert (out == ids.eos).sum() >= out.shape[0] * 16 // max(len(t) for t in CORPUS)
