"""Text data sources for training, calibration and evaluation.

One module past 500 lines: name -> documents -> split -> token windows is one path that
every stage walks through `load_split` and `token_windows`; the BIG-bench fetch lives in
`data.bigbench`.

One module answers "give me documents" for every stage of the pipeline:

* **Local files** -- plain text (one document per file, or documents separated
  by blank lines), a directory of ``*.txt`` files, or JSONL (``.jsonl`` /
  ``.jsonl.gz``) with a named text field (default ``"text"``).
* **Hugging Face datasets** (``wikitext2``, ``c4``, ``pile``) when the
  ``datasets`` package is installed and the hub is reachable. ``datasets`` is
  imported lazily and is not a dependency of this project.
* **The offline default** ``bigbench-wikipedia`` (alias ``wikipedia``): English
  Wikipedia articles taken from the BIG-bench task ``paragraph_segmentation``
  (fetched and cached by :mod:`qdlm_jax.data.bigbench`). Where the BIG-bench sdist
  cannot be fetched (PyPI no longer serves ``bigbench==1.0.0`` to every index), the
  default falls back to ``austen`` with one line on stderr: :func:`resolve_source`
  says which one a run uses, and jobs record that name.
* ``austen``: the chapters of Jane Austen's six novels (:mod:`qdlm_jax.data.austen`,
  from Debian's mirror; public-domain text).

Documents are split deterministically into train / calibration / held-out
parts by hashing each document's text (:func:`split_documents`), so the text
used to calibrate a quantizer never overlaps the text used to measure it.
:func:`token_windows` turns documents into fixed-length token windows.

The English documents are cached as ``<cache>/bigbench-1.0.0/wikipedia_en.v1.jsonl``
(~9 MB; :mod:`qdlm_jax.data.bigbench` has the rest of the cache layout).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from qdlm_jax.data.austen import load_austen
from qdlm_jax.data.bigbench import (
    BIGBENCH_PREFETCH_TASKS,
    BIGBENCH_SDIST_FILENAME,
    BIGBENCH_SDIST_SHA256,
    bigbench_archive_path,
    bigbench_cache_dir,
    bigbench_pip_command,
    cache_dir,
    download_bigbench_sdist,
    fetch_bigbench_task,
    fetch_bigbench_tasks,
    sha256_file,
    task_json_path,
    verify_sha256,
)
from qdlm_jax.errors import DataSourceError
from qdlm_jax.fsutil import atomic_write_bytes, atomic_write_text

__all__ = [
    "BIGBENCH_PREFETCH_TASKS",
    "BIGBENCH_SDIST_FILENAME",
    "BIGBENCH_SDIST_SHA256",
    "AUSTEN_SOURCE",
    "DEFAULT_SOURCE",
    "DataSourceError",
    "DocumentSplit",
    "HF_SOURCES",
    "SPLIT_NAMES",
    "SplitFractions",
    "bigbench_archive_path",
    "bigbench_cache_dir",
    "bigbench_pip_command",
    "cache_dir",
    "download_bigbench_sdist",
    "english_ratio",
    "fetch_bigbench_task",
    "fetch_bigbench_tasks",
    "is_english",
    "load_bigbench_wikipedia",
    "load_documents",
    "resolve_source",
    "load_hf_documents",
    "load_split",
    "paragraph_segmentation_documents",
    "read_jsonl",
    "read_text_dir",
    "read_text_file",
    "sha256_file",
    "split_documents",
    "token_windows",
    "verify_sha256",
]


# ---------------------------------------------------------------------------
# Offline default: English Wikipedia from BIG-bench paragraph_segmentation
# ---------------------------------------------------------------------------

DEFAULT_SOURCE = "bigbench-wikipedia"
WIKIPEDIA_SOURCES = ("bigbench-wikipedia", "wikipedia")
AUSTEN_SOURCE = "austen"
_BIGBENCH_STATE: dict[str, str] = {}  # "error": why BIG-bench could not be fetched; "ok"

# Function words that are frequent in English and rare as standalone words in
# the other languages of paragraph_segmentation (de, es, fr, it, nl, pl, pt,
# ru, ...). "of", "is", "was", "in", "a", "as" are left out on purpose: they are
# also common Dutch / Italian / Portuguese words.
ENGLISH_STOPWORDS = frozenset(
    {
        "the",
        "and",
        "to",
        "that",
        "with",
        "which",
        "from",
        "for",
        "by",
        "were",
        "this",
        "are",
        "his",
        "her",
        "has",
        "have",
        "been",
        "it",
    }
)
# English articles score 0.14-0.36 and other languages 0-0.06 (plus a few
# mixed documents in between); 0.10 sits in the gap.
ENGLISH_RATIO_THRESHOLD = 0.10
_WORD_RE = re.compile(r"[^\W\d_]+")
_WIKIPEDIA_CACHE_NAME = "wikipedia_en.v1.jsonl"


def english_ratio(text: str) -> float:
    """Fraction of the words in ``text`` that are English stop words."""
    words = _WORD_RE.findall(text.lower())
    if not words:
        return 0.0
    return sum(w in ENGLISH_STOPWORDS for w in words) / len(words)


def is_english(text: str, threshold: float = ENGLISH_RATIO_THRESHOLD) -> bool:
    """Simple stop-word language filter (see :data:`ENGLISH_STOPWORDS`)."""
    return english_ratio(text) > threshold


def paragraph_segmentation_documents(task: dict[str, Any]) -> list[str]:
    """Rebuild the documents of BIG-bench ``paragraph_segmentation``.

    Each example's ``input`` holds one sentence per line and its ``target``
    one label per sentence (1 = the sentence ends a paragraph). Sentences of a
    paragraph are joined with spaces and paragraphs with newlines. If the
    labels do not match the sentences, the sentences are joined with spaces.
    """
    try:
        examples = task["examples"]
    except (KeyError, TypeError) as exc:
        raise DataSourceError("paragraph_segmentation task has no 'examples' list") from exc
    docs: list[str] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise DataSourceError(
                f"paragraph_segmentation example {i}: expected a dict with a string 'input'"
            )
        sentences = [s.strip() for s in ex["input"].split("\n")]
        sentences = [s for s in sentences if s]
        labels = str(ex.get("target", "")).split()
        if len(labels) != len(sentences):
            labels = ["0"] * len(sentences)
        paragraphs: list[str] = []
        current: list[str] = []
        for sentence, label in zip(sentences, labels):
            current.append(sentence)
            if label == "1":
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        doc = "\n".join(paragraphs)
        if doc:
            docs.append(doc)
    return docs


def load_bigbench_wikipedia(*, refresh: bool = False) -> list[str]:
    """English Wikipedia documents from BIG-bench ``paragraph_segmentation``.

    The selected documents are cached as JSONL in :func:`bigbench_cache_dir`;
    the first call fetches the BIG-bench sdist (see :func:`fetch_bigbench_tasks`).
    """
    cached = bigbench_cache_dir() / _WIKIPEDIA_CACHE_NAME
    if cached.is_file() and not refresh:
        return read_jsonl(cached)
    task = fetch_bigbench_task("paragraph_segmentation")
    seen: set[str] = set()
    docs: list[str] = []
    for doc in paragraph_segmentation_documents(task):
        if doc not in seen and is_english(doc):
            seen.add(doc)
            docs.append(doc)
    if not docs:
        raise DataSourceError(
            f"no English documents found in {task_json_path('paragraph_segmentation')}; "
            f"the file may be corrupted: delete it and retry"
        )
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    atomic_write_bytes(cached, payload.encode("utf-8"))
    return docs


# ---------------------------------------------------------------------------
# Hugging Face datasets (optional, online)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFSourceSpec:
    """How to load one Hugging Face dataset as documents."""

    path: str
    name: str | None
    splits: tuple[str, ...]
    data_files: dict[str, str] | None = None
    text_field: str = "text"
    group_wikitext_articles: bool = False


HF_SOURCES: dict[str, HFSourceSpec] = {
    "wikitext2": HFSourceSpec(
        "wikitext",
        "wikitext-2-raw-v1",
        ("train", "validation", "test"),
        group_wikitext_articles=True,
    ),
    "c4": HFSourceSpec(
        "allenai/c4",
        None,
        ("validation",),
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    "pile": HFSourceSpec(
        "monology/pile-uncopyrighted", None, ("test",), data_files={"test": "test.jsonl.zst"}
    ),
}

_WIKITEXT_TITLE_RE = re.compile(r"^ = [^=].* = $")


def _group_wikitext_articles(lines: Iterable[str]) -> list[str]:
    """Group WikiText rows (one line each) into articles at top-level ``= Title =`` lines."""
    docs: list[str] = []
    current: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE_RE.match(line.rstrip("\n")) and current:
            doc = "".join(current).strip()
            if doc:
                docs.append(doc)
            current = []
        current.append(line)
    doc = "".join(current).strip()
    if doc:
        docs.append(doc)
    return docs


def load_hf_documents(name: str) -> list[str]:
    """Load a Hugging Face dataset listed in :data:`HF_SOURCES` as documents.

    Raises :class:`DataSourceError` if ``datasets`` is not installed or the
    hub cannot be reached.
    """
    if name not in HF_SOURCES:
        raise DataSourceError(
            f"unknown Hugging Face source {name!r}; expected one of {sorted(HF_SOURCES)}"
        )
    spec = HF_SOURCES[name]
    fallback = (f"Use a local text/JSONL file as the data source, or the offline default "
                f"{DEFAULT_SOURCE!r}.")
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError as exc:
        raise DataSourceError(
            f"data source {name!r} needs the Hugging Face `datasets` package, which is not "
            "installed "
            f"({exc}). Install it (pip install datasets) with hub access. " + fallback
        ) from exc
    docs: list[str] = []
    for split in spec.splits:
        try:
            kwargs: dict[str, Any] = {"split": split}
            if spec.data_files is not None:
                kwargs["data_files"] = {split: spec.data_files[split]}
            ds = datasets.load_dataset(spec.path, spec.name, **kwargs)
            texts = ds[spec.text_field]
        except Exception as exc:  # noqa: BLE001  (network, auth, hub and format errors)
            raise DataSourceError(
                f"could not load Hugging Face dataset {spec.path!r} (config {spec.name!r}, "
                f"split {split!r}) "
                f"for data source {name!r}: {type(exc).__name__}: {exc}. "
                f"The hub may be unreachable from this machine. " + fallback
            ) from exc
        if spec.group_wikitext_articles:
            docs.extend(_group_wikitext_articles(texts))
        else:
            docs.extend(t.strip() for t in texts if isinstance(t, str) and t.strip())
    return docs


# ---------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------

_BLANK_LINES_RE = re.compile(r"\n[ \t\r\f\v]*\n")


def _open_text(path: Path) -> Any:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_text_file(path: Path | str, *, split_blank_lines: bool = False) -> list[str]:
    """Read a UTF-8 text file as one document, or as documents separated by blank lines."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"cannot read text file {path}: {exc}") from exc
    text = text.replace("\r\n", "\n")
    parts = _BLANK_LINES_RE.split(text) if split_blank_lines else [text]
    return [p.strip() for p in parts if p.strip()]


def read_text_dir(
    path: Path | str, *, split_blank_lines: bool = False, pattern: str = "*.txt"
) -> list[str]:
    """Read every file matching ``pattern`` under ``path`` (recursively, sorted by path)."""
    path = Path(path)
    files = sorted(p for p in path.rglob(pattern) if p.is_file())
    if not files:
        raise DataSourceError(f"no files matching {pattern!r} under directory {path}")
    docs: list[str] = []
    for file in files:
        docs.extend(read_text_file(file, split_blank_lines=split_blank_lines))
    return docs


def read_jsonl(path: Path | str, *, text_field: str = "text") -> list[str]:
    """Read documents from a JSONL file (optionally ``.gz``), one JSON object per line.

    Blank lines are skipped. Each other line must be a JSON object whose
    ``text_field`` is a string; otherwise the error names the file and line.
    """
    path = Path(path)
    docs: list[str] = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataSourceError(
                        f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                    ) from exc
                if not isinstance(obj, dict):
                    raise DataSourceError(
                        f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                    )
                if text_field not in obj:
                    raise DataSourceError(
                        f"{path}:{lineno}: missing text field {text_field!r} (keys: {sorted(obj)})"
                    )
                value = obj[text_field]
                if not isinstance(value, str):
                    raise DataSourceError(
                        f"{path}:{lineno}: field {text_field!r} must be a string, got "
                        f"{type(value).__name__}"
                    )
                if value.strip():
                    docs.append(value)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"cannot read JSONL file {path}: {exc}") from exc
    return docs


def load_documents(
    source: str | os.PathLike[str] = DEFAULT_SOURCE,
    *,
    text_field: str = "text",
    split_blank_lines: bool = False,
) -> list[str]:
    """Load documents from a named source or a local path.

    ``source`` is one of:

    * ``"bigbench-wikipedia"`` / ``"wikipedia"`` -- the offline default (``"austen"``
      where BIG-bench cannot be fetched, see :func:`resolve_source`);
    * ``"austen"`` -- Jane Austen's novels, one chapter per document;
    * ``"wikitext2"``, ``"c4"``, ``"pile"`` -- Hugging Face datasets (online);
    * a ``.jsonl`` / ``.jsonl.gz`` file (documents in field ``text_field``);
    * a text file (one document, or blank-line separated if ``split_blank_lines``);
    * a directory of ``*.txt`` files.
    """
    key = resolve_source(source)
    if key in WIKIPEDIA_SOURCES:
        return load_bigbench_wikipedia()
    if key == AUSTEN_SOURCE:
        return load_austen()
    if key in HF_SOURCES:
        return load_hf_documents(key)
    path = Path(key).expanduser()
    if path.is_dir():
        return read_text_dir(path, split_blank_lines=split_blank_lines)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(path, text_field=text_field)
        return read_text_file(path, split_blank_lines=split_blank_lines)
    raise DataSourceError(
        f"unknown data source {key!r}: not an existing file or directory, and not one of the named "
        f"sources {[*WIKIPEDIA_SOURCES, AUSTEN_SOURCE, *sorted(HF_SOURCES)]}"
    )


BIGBENCH_RETRY_S = 24 * 3600  # a failed BIG-bench fetch is not retried for this long


def _unavailable_marker() -> Path:
    return cache_dir() / "bigbench-unavailable.json"


def _recent_failure() -> str | None:
    """The reason of a failed BIG-bench fetch recorded less than BIGBENCH_RETRY_S ago (None
    when there is none, it is older, or QDLM_RETRY_BIGBENCH=1 asks for a new try)."""
    if os.environ.get("QDLM_RETRY_BIGBENCH") == "1":
        return None
    try:
        rec = json.loads(_unavailable_marker().read_text())
        if time.time() - float(rec["time"]) < BIGBENCH_RETRY_S:
            return str(rec["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def resolve_source(source: str | os.PathLike[str]) -> str:
    """The source a run reads: ``source`` itself, except that the Wikipedia default becomes
    ``"austen"`` (with one line on stderr, once per process) when the BIG-bench documents are
    neither cached nor fetchable. A failed fetch is recorded in the cache
    (``bigbench-unavailable.json``) and not tried again for BIGBENCH_RETRY_S (a day; set
    QDLM_RETRY_BIGBENCH=1 to try now). Jobs record the resolved name, so results from the two
    corpora never share a cache key."""
    key = os.fspath(source)
    if key not in WIKIPEDIA_SOURCES:
        return key
    if not _BIGBENCH_STATE:
        recorded = _recent_failure()
        if recorded is not None:
            _BIGBENCH_STATE["error"] = recorded
            print(f"[qdlm] {key}: BIG-bench was not available in the last day ({recorded}; "
                  f"QDLM_RETRY_BIGBENCH=1 tries again); using {AUSTEN_SOURCE!r} (Jane "
                  "Austen's novels) as the text source", file=sys.stderr, flush=True)
            return AUSTEN_SOURCE
        try:
            load_bigbench_wikipedia()
            _BIGBENCH_STATE["ok"] = key
            _unavailable_marker().unlink(missing_ok=True)
        except DataSourceError as exc:
            _BIGBENCH_STATE["error"] = reason = str(exc).splitlines()[0]
            try:
                atomic_write_text(_unavailable_marker(),
                                  json.dumps({"time": time.time(), "reason": reason}))
            except OSError:
                pass  # a read-only cache: the next process tries again
            print(f"[qdlm] {key}: BIG-bench is not available ({reason}); using "
                  f"{AUSTEN_SOURCE!r} (Jane Austen's novels) as the text source",
                  file=sys.stderr, flush=True)
    return key if "ok" in _BIGBENCH_STATE else AUSTEN_SOURCE


# ---------------------------------------------------------------------------
# Deterministic document split
# ---------------------------------------------------------------------------

SPLIT_NAMES = ("train", "calib", "heldout")
_SPLIT_ALIASES = {
    "train": "train",
    "calib": "calib",
    "calibration": "calib",
    "heldout": "heldout",
    "held_out": "heldout",
    "held-out": "heldout",
    "eval": "heldout",
    "test": "heldout",
}


@dataclasses.dataclass(frozen=True)
class SplitFractions:
    """Fractions of documents in the train / calibration / held-out parts (sum to 1)."""

    train: float = 0.90
    calib: float = 0.05
    heldout: float = 0.05

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"SplitFractions.{field.name}={value!r}: expected a value in [0, 1]"
                )
        total = self.train + self.calib + self.heldout
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"SplitFractions must sum to 1, got train={self.train} + calib={self.calib} "
                f"+ heldout={self.heldout} = {total}"
            )


class DocumentSplit(NamedTuple):
    """Documents of the three disjoint parts, each in input order."""

    train: list[str]
    calib: list[str]
    heldout: list[str]


def _doc_unit_interval(doc: str, seed: int) -> float:
    digest = hashlib.sha256(f"qdlm-split:{seed}\0".encode() + doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Iterable[str], fractions: SplitFractions = SplitFractions(), seed: int = 0
) -> DocumentSplit:
    """Split documents into train / calibration / held-out by a hash of their text.

    The part a document lands in depends only on its text and ``seed``, not on
    the order or number of the other documents, so identical documents always
    land in the same part and the parts never share a document.
    """
    train: list[str] = []
    calib: list[str] = []
    heldout: list[str] = []
    train_end = fractions.train
    calib_end = fractions.train + fractions.calib
    for doc in docs:
        u = _doc_unit_interval(doc, seed)
        if u < train_end:
            train.append(doc)
        elif u < calib_end:
            calib.append(doc)
        else:
            heldout.append(doc)
    return DocumentSplit(train, calib, heldout)


def load_split(
    source: str | os.PathLike[str],
    split: str,
    *,
    fractions: SplitFractions = SplitFractions(),
    seed: int = 0,
    text_field: str = "text",
    split_blank_lines: bool = False,
) -> list[str]:
    """Documents of one part (``"train"``, ``"calib"`` or ``"heldout"``) of a source."""
    part = _SPLIT_ALIASES.get(split)
    if part is None:
        raise DataSourceError(f"unknown split {split!r}; expected one of {list(_SPLIT_ALIASES)}")
    docs = load_documents(source, text_field=text_field, split_blank_lines=split_blank_lines)
    return getattr(split_documents(docs, fractions, seed), part)


# ---------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------


class _Encoding(Protocol):
    ids: list[int]


class _TokenizerLike(Protocol):
    def encode_batch(
        self, inputs: list[str], add_special_tokens: bool = ...
    ) -> list[_Encoding]: ...


def _iter_token_ids(docs: Sequence[str], tokenizer: Any, batch_size: int) -> Iterator[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        for start in range(0, len(docs), batch_size):
            for enc in tokenizer.encode_batch(
                list(docs[start : start + batch_size]), add_special_tokens=False
            ):
                yield list(enc.ids)
    else:
        for doc in docs:
            enc = tokenizer.encode(doc)
            yield list(getattr(enc, "ids", enc))


def token_windows(
    docs: Sequence[str],
    tokenizer: _TokenizerLike | Any,
    seq_len: int,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Tokenize documents, concatenate them and cut the stream into windows.

    Each document contributes ``[bos_id] + ids + [eos_id]`` (BOS / EOS only if
    given), documents are concatenated in order and the stream is cut into
    consecutive windows of ``seq_len`` tokens; the incomplete tail is dropped.
    ``tokenizer`` is a ``tokenizers.Tokenizer`` (or anything with
    ``encode_batch`` / ``encode`` returning ids). Returns int32 ``[n, seq_len]``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_windows is not None and max_windows < 0:
        raise ValueError(f"max_windows must be >= 0, got {max_windows}")
    needed = None if max_windows is None else max_windows * seq_len
    chunks: list[np.ndarray] = []
    n_tokens = 0
    for ids in _iter_token_ids(docs, tokenizer, batch_size):
        if bos_id is not None:
            ids = [bos_id, *ids]
        if eos_id is not None:
            ids = [*ids, eos_id]
        chunks.append(np.asarray(ids, dtype=np.int32))
        n_tokens += len(ids)
        if needed is not None and n_tokens >= needed:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.int32)
    n = len(stream) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq_len].reshape(n, seq_len)


def calibration_windows(tokenizer: Any, source: str, seq_len: int, n: int) -> np.ndarray:
    """The calibration split's token windows [n, seq_len] of `source`, encoded by a checkpoint
    tokenizer (`data.hf_tokenizer.CheckpointTokenizer`) and framed by its BOS / EOS ids."""
    special = tokenizer.special
    docs = load_split(source, "calib", seed=0)
    return token_windows(docs, tokenizer, seq_len, bos_id=special.bos, eos_id=special.eos,
                         max_windows=n)
