"""Byte-level BPE tokenizer for the project's small diffusion LMs.

The tokenizer is trained with Hugging Face ``tokenizers`` on the train split
of a text source (default: the offline Wikipedia documents, see
:mod:`qdlm_jax.data.sources`) and saved as a single ``tokenizer.json``.

* Pre-tokenization: digits are split one per token
  (``Digits(individual_digits=True)``) before the GPT-2 style ``ByteLevel``
  split, so multi-digit arithmetic is learnable digit by digit.
* Decoding uses the ``ByteLevel`` decoder, so ``decode(encode(text)) == text``
  for any text (no normalizer, no prefix space).
* Special tokens come first in the vocabulary, in this order:
  ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2, ``<|mdm_mask|>`` = 3.
  No post-processor is set: callers add BOS / EOS explicitly
  (e.g. :func:`qdlm_jax.data.sources.token_windows`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qdlm_jax.fsutil import atomic_file

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SpecialTokenIds",
    "TOKENIZER_FILENAME",
    "TokenizerSpec",
    "build_untrained_tokenizer",
    "load_bpe_tokenizer",
    "save_tokenizer",
    "special_token_ids",
    "train_tokenizer",
    "train_tokenizer_on_source",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
MASK_TOKEN = "<|mdm_mask|>"
# Order fixes the ids: the trainer assigns special tokens ids 0, 1, 2, 3.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN)
DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_FILENAME = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens in a trained tokenizer."""

    pad: int
    bos: int
    eos: int
    mask: int


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Settings for :func:`train_tokenizer`."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    min_frequency: int = 2
    show_progress: bool = False

    def __post_init__(self) -> None:
        # 256 byte symbols + special tokens are always present.
        minimum = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < minimum:
            raise ValueError(f"TokenizerSpec.vocab_size={self.vocab_size}: expected at least "
                             f"{minimum}")
        if self.min_frequency < 1:
            raise ValueError(f"TokenizerSpec.min_frequency={self.min_frequency}: expected >= 1")


def build_untrained_tokenizer() -> Tokenizer:
    """An empty byte-level BPE tokenizer with the project's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec = TokenizerSpec()) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``."""
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=spec.show_progress,
    )

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == 256:
                yield batch
                batch = []
        if batch:
            yield batch

    tok.train_from_iterator(batches(), trainer=trainer)
    special_token_ids(tok)  # validates that every special token is present
    return tok


def _tokenizer_file(path_or_dir: str | os.PathLike[str]) -> Path:
    path = Path(path_or_dir).expanduser()
    if path.is_dir() or path.suffix != ".json":
        return path / TOKENIZER_FILENAME
    return path


def save_tokenizer(tok: Tokenizer, path_or_dir: str | os.PathLike[str]) -> Path:
    """Save as ``tokenizer.json`` (``path_or_dir`` is a directory or a ``.json`` path)."""
    path = _tokenizer_file(path_or_dir)
    with atomic_file(path) as tmp:
        tok.save(str(tmp))
    return path


def load_bpe_tokenizer(path_or_dir: str | os.PathLike[str]) -> Tokenizer:
    """Load the project's trained ``tokenizer.json`` (or a directory holding one) for training
    and check its special tokens. A checkpoint's tokenizer is `checkpoints.load.load_tokenizer`."""
    path = _tokenizer_file(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001  (tokenizers raises plain Exception)
        raise ValueError(f"cannot load tokenizer from {path}: {exc}") from exc
    special_token_ids(tok, source=str(path))
    return tok


def special_token_ids(tok: Tokenizer, *, source: str = "tokenizer") -> SpecialTokenIds:
    """Ids of PAD / BOS / EOS / MASK; raises ``ValueError`` naming any missing token."""
    ids: dict[str, int] = {}
    missing: list[str] = []
    for field, token in zip(("pad", "bos", "eos", "mask"), SPECIAL_TOKENS):
        token_id = tok.token_to_id(token)
        if token_id is None:
            missing.append(token)
        else:
            ids[field] = token_id
    if missing:
        raise ValueError(f"{source} lacks special tokens {missing}; expected all of "
                         f"{list(SPECIAL_TOKENS)}")
    return SpecialTokenIds(**ids)


def train_tokenizer_on_source(
    out_dir: str | os.PathLike[str],
    source: str = "bigbench-wikipedia",
    spec: TokenizerSpec = TokenizerSpec(),
    *,
    seed: int = 0,
) -> Path:
    """Train on the train split of ``source`` and save ``<out_dir>/tokenizer.json``.

    Only the train split is used (see :func:`qdlm_jax.data.sources.split_documents`),
    so calibration and held-out text stay unseen.
    """
    from qdlm_jax.data.sources import load_split  # noqa: PLC0415  (avoid import cycle)

    docs = load_split(source, "train", seed=seed)
    tok = train_tokenizer(docs, spec)
    return save_tokenizer(tok, out_dir)
