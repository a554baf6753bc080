"""Real tokenizer vocabularies, offline: llama.cpp's vocab files from the llama-cpp-python sdist.

The `llama-cpp-python` 0.3.36 sdist (PyPI, 76.6 MB) carries llama.cpp's tokenizer test files:
`vendor/llama.cpp/models/ggml-vocab-<name>.gguf` (the vocabulary and merges of a published
tokenizer, no weights) with `.gguf.inp` / `.gguf.out` beside each (test strings and the ids
llama.cpp's reference tokenizer gives them), and chat templates in `models/templates/`.
`fetch_vocab_files` downloads the sdist once (pinned sha256), extracts what is asked for into
`<cache>/llamacpp/` and deletes the archive; nothing of it is part of this repository.

`bpe_tokenizer_json(gguf)` rebuilds a GGUF byte-level BPE vocabulary ("gpt2" tokenizer model)
as a Hugging Face `tokenizer.json`: the BPE model (tokens in id order, merges), the
pre-tokenizer split of the vocabulary's family, ByteLevel without its own regex, the ByteLevel
decoder, and every control / user-defined token as an added special token. For Qwen2 it
reproduces llama.cpp's test vectors exactly (`tests/test_real_checkpoints.py`).

`gemma_tokenizer_json(gguf)` does the same for Gemma 4's vocabulary ("gemma4" tokenizer
model: SentencePiece-style BPE over raw UTF-8): spaces normalised to U+2581, the text split
only at newline runs (no token mixes newlines with other characters, so this changes no
merge), BPE merges, unknown bytes as `<0xXX>` tokens (byte fallback); control tokens added as
special, user-defined ones (tool-call markers) as plain added tokens. It reproduces llama.cpp's
Gemma 4 test vectors (`tests/data/test_gemma_tokenizer.py`); `write_gemma_tokenizer` writes it
with the chat template the vocabulary file carries, for DiffusionGemma checkpoints.
"""

from __future__ import annotations

import json
import struct
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from qdlm_jax.data.bigbench import cache_dir, verify_sha256
from qdlm_jax.errors import DataSourceError
from qdlm_jax.fsutil import atomic_write_bytes

__all__ = [
    "LLAMACPP_SDIST_SHA256",
    "LLAMACPP_SDIST_URL",
    "bpe_tokenizer_json",
    "fetch_vocab_files",
    "gemma_tokenizer_json",
    "read_gguf_metadata",
    "read_test_vectors",
    "write_dream_tokenizer",
    "write_gemma_tokenizer",
]

LLAMACPP_SDIST_FILENAME = "llama_cpp_python-0.3.36.tar.gz"
LLAMACPP_SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/" + LLAMACPP_SDIST_FILENAME)
LLAMACPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBER_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (the split each family's tokenizer.json uses).
_SPLIT_PATTERNS = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                  r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special (added) tokens


def llamacpp_cache_dir() -> Path:
    return cache_dir() / "llamacpp"


def _download(url: str, dest: Path) -> None:
    print(f"[qdlm] downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        raise DataSourceError(f"could not download {url} ({type(e).__name__}: {e}); put "
                              f"{LLAMACPP_SDIST_FILENAME} (sha256 {LLAMACPP_SDIST_SHA256}) in "
                              f"{cache_dir()} and retry") from None


def fetch_vocab_files(names: Sequence[str]) -> dict[str, Path]:
    """Paths of the named files below llama.cpp's `models/` folder (e.g.
    "ggml-vocab-qwen2.gguf", "templates/Qwen-Qwen2.5-7B-Instruct.jinja"), fetched into the
    cache if missing. Raises `DataSourceError` naming the file when the sdist lacks one."""
    root = llamacpp_cache_dir()
    want = {n: root / n for n in names}
    missing = {n: p for n, p in want.items() if not p.is_file()}
    if not missing:
        return want
    archive = cache_dir() / LLAMACPP_SDIST_FILENAME
    downloaded = not archive.is_file()
    with tempfile.TemporaryDirectory(dir=cache_dir().parent if cache_dir().parent.is_dir()
                                     else None) as tmp:
        if downloaded:
            archive = Path(tmp) / LLAMACPP_SDIST_FILENAME
            _download(LLAMACPP_SDIST_URL, archive)
        verify_sha256(archive, LLAMACPP_SDIST_SHA256)
        found = set()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = member.name.removeprefix(_MEMBER_ROOT)
                    if name in missing and member.isfile():
                        atomic_write_bytes(missing[name], tar.extractfile(member).read())
                        found.add(name)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataSourceError(f"could not read {archive} as a tar.gz archive: {e}") from None
    absent = sorted(set(missing) - found)
    if absent:
        raise DataSourceError(f"{LLAMACPP_SDIST_FILENAME} has no {_MEMBER_ROOT}{absent[0]}")
    return want


# ---- GGUF metadata --------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
    if vtype == _ARRAY:
        etype, n = _read(f, "<I"), _read(f, "<Q")
        return [_read_value(f, etype) for _ in range(n)]
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return _read(f, _SCALARS[vtype])


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (version 2 or 3), e.g. `tokenizer.ggml.tokens`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DataSourceError(f"{path}: not a GGUF file (no GGUF magic)")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise DataSourceError(f"{path}: GGUF version {version}; expected 2 or 3")
            _read(f, "<Q")  # tensor count
            return {_read_value(f, _STRING): _read_value(f, _read(f, "<I"))
                    for _ in range(_read(f, "<Q"))}
    except (EOFError, ValueError) as e:
        raise DataSourceError(f"{path}: malformed GGUF metadata ({e})") from None


def bpe_tokenizer_json(gguf: str | Path) -> dict:
    """A Hugging Face `tokenizer.json` (as a dict) for a GGUF byte-level BPE vocabulary."""
    meta = read_gguf_metadata(gguf)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in _SPLIT_PATTERNS:
        raise DataSourceError(f"{gguf}: tokenizer model {model!r} / pre {pre!r}; expected a "
                              f"'gpt2' BPE with pre in {sorted(_SPLIT_PATTERNS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT_PATTERNS[pre]}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre == "llama-bpe",
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},
    }


def read_test_vectors(gguf: str | Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) test pairs beside a vocab file (`.gguf.inp` / `.gguf.out`)."""
    gguf = Path(gguf)
    texts = Path(f"{gguf}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = Path(f"{gguf}.out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1] if texts and texts[-1] == "" else texts
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]



QWEN2_VOCAB = "ggml-vocab-qwen2.gguf"
QWEN25_CHAT_TEMPLATE = "templates/Qwen-Qwen2.5-7B-Instruct.jinja"
# Dream's tokens beyond the Qwen2 vocabulary file (its config.json: bos 151665, mask 151666).
DREAM_ADDED_TOKENS = {151665: "<|beginoftext|>", 151666: "<|mask|>"}


def write_dream_tokenizer(out_dir: str | Path) -> dict[str, Path]:
    """Dream's tokenizer in `out_dir`: the Qwen2 vocabulary (llama.cpp's file), Dream's added
    tokens, `tokenizer_config.json` with Dream's special tokens and the Qwen2.5-Instruct chat
    template (which Dream-Instruct's template follows). `tokenizer_class` is transformers'
    Qwen2Tokenizer (the published files name Dream's remote-code class that wraps it)."""
    files = fetch_vocab_files([QWEN2_VOCAB, QWEN25_CHAT_TEMPLATE])
    tok = bpe_tokenizer_json(files[QWEN2_VOCAB])
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for idx, text in DREAM_ADDED_TOKENS.items():
        vocab.pop(by_id[idx])
        vocab[text] = idx
        for entry in tok["added_tokens"]:
            if entry["id"] == idx:
                entry["content"] = text
    decoder = {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                 "single_word", "special")}
               for e in tok["added_tokens"] if e["id"] <= max(DREAM_ADDED_TOKENS)}
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": "<|beginoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mask|>", "model_max_length": 131072,
              "clean_up_tokenization_spaces": False, "added_tokens_decoder": decoder,
              "chat_template": files[QWEN25_CHAT_TEMPLATE].read_text(encoding="utf-8")}
    out = Path(out_dir)
    written = {"tokenizer.json": tok, "tokenizer_config.json": config}
    for name, data in written.items():
        atomic_write_bytes(out / name, json.dumps(data, ensure_ascii=False).encode("utf-8"))
    return {name: out / name for name in written}


GEMMA4_VOCAB = "ggml-vocab-gemma-4.gguf"
_SPACE = "\u2581"  # SentencePiece's word-boundary mark


def _gemma_merge(rule: str) -> list[str]:
    """llama.cpp splits a merge rule at the first space after its first character."""
    cut = rule.find(" ", 1)
    if cut < 0:
        raise DataSourceError(f"malformed merge rule {rule!r} (no space)")
    return [rule[:cut], rule[cut + 1:]]


def gemma_tokenizer_json(gguf: str | Path) -> dict:
    """A Hugging Face `tokenizer.json` (as a dict) for a GGUF "gemma4" vocabulary (module
    docstring)."""
    meta = read_gguf_metadata(gguf)
    if meta.get("tokenizer.ggml.model") != "gemma4":
        raise DataSourceError(f"{gguf}: tokenizer model {meta.get('tokenizer.ggml.model')!r}; "
                              "expected 'gemma4'")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 3)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == _CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[^\\n]+|[\\n]+"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [_gemma_merge(m) for m in meta["tokenizer.ggml.merges"]]},
    }


def write_gemma_tokenizer(out_dir: str | Path) -> dict[str, Path]:
    """Gemma 4's tokenizer in `out_dir` (DiffusionGemma uses Gemma 4's vocabulary):
    `tokenizer.json` from llama.cpp's vocabulary file and `tokenizer_config.json` with the
    special tokens (pad `<pad>` 0, eos `<eos>` 1, bos `<bos>` 2, unk `<unk>` 3; no mask: the
    model's noise is a uniform vocabulary id) and the chat template the file carries."""
    gguf = fetch_vocab_files([GEMMA4_VOCAB])[GEMMA4_VOCAB]
    meta = read_gguf_metadata(gguf)
    tok = gemma_tokenizer_json(gguf)
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key, default):
        return tokens[meta.get(f"tokenizer.ggml.{key}", default)]

    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": name("bos_token_id", 2),
              "eos_token": name("eos_token_id", 1), "pad_token": name("padding_token_id", 0),
              "unk_token": name("unknown_token_id", 3), "add_bos_token": True,
              "add_eos_token": False, "model_max_length": 262144,
              "clean_up_tokenization_spaces": False}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    out = Path(out_dir)
    written = {"tokenizer.json": tok, "tokenizer_config.json": config}
    for file, data in written.items():
        atomic_write_bytes(out / file, json.dumps(data, ensure_ascii=False).encode("utf-8"))
    return {file: out / file for file in written}
