"""Jane Austen's six novels, offline: Debian's ``r-cran-janeaustenr`` package, fetched once.

The package (1.6 MB, public-domain text; MIT packaging) holds the novels as R data: one
character vector of lines per novel in ``data/Rdata.rdb``, indexed by ``data/Rdata.rdx``. The
``.deb`` is fetched from Debian's mirror by URL (no ``apt`` needed), checked against its
sha256, and read with the standard library only: ``ar`` archive -> ``data.tar.xz`` -> the
index (gzip) and each novel's record (4-byte length + zlib) -> R's XDR serialization, of
which :func:`unserialize` reads the subset these files use (pairlists, character, integer,
double and generic vectors, names).

Documents are chapters: the lines of a novel are cut at its chapter headings, wrapped lines
are joined into paragraphs, one paragraph per line (as the Wikipedia documents have one
sentence per line). Cache layout under :func:`data.bigbench.cache_dir`::

    <root>/janeaustenr-1.0.0/austen_en.v1.jsonl     the chapters, {"text": ...} per line
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from qdlm_jax.data.bigbench import cache_dir, sha256_file
from qdlm_jax.errors import DataSourceError
from qdlm_jax.fsutil import atomic_file, atomic_write_bytes

__all__ = ["AUSTEN_DEB_SHA256", "AUSTEN_DEB_URL", "AUSTEN_NOVELS", "austen_cache_dir",
           "chapters", "load_austen", "novels_from_deb", "unserialize"]

AUSTEN_DEB_URL = ("https://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/"
                  "r-cran-janeaustenr_1.0.0-1_all.deb")
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                 "sensesensibility")
_DATA_DIR = "./usr/lib/R/site-library/janeaustenr/data/"
_CACHE_NAME = "austen_en.v1.jsonl"
_CHAPTER_RE = re.compile(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")
_SKIP_RE = re.compile(r"^(VOLUME\s+[IVX]+|THE END|FINIS)\.?$")


def austen_cache_dir() -> Path:
    return cache_dir() / "janeaustenr-1.0.0"


# ---------------------------------------------------------------------------
# R serialization (XDR, versions 2 and 3): the subset the package's data files use
# ---------------------------------------------------------------------------

# SEXP types: symbol, pairlist, character (one string), logical, integer, double, string
# vector, generic vector; the pseudo-types for NULL and a back-reference to a symbol
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19
_NIL, _REF = 254, 255


class _Reader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.take(4))
        return v

    def take(self, n: int) -> bytes:
        out = self.b[self.i:self.i + n]
        if len(out) != n:
            raise ValueError("truncated R data")
        self.i += n
        return out

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == _NIL:
            return None
        if kind == _REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if kind == _LIST:  # pairlist -> list of (tag, value)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = [(tag, self.item())]
            rest = self.item()
            return head + (rest or [])
        if kind not in (_STR, _VEC, _INT, _LGL, _REAL):
            raise ValueError(f"R type {kind} is not supported")
        n = self.int()
        if kind in (_STR, _VEC):
            value: Any = [self.item() for _ in range(n)]
        elif kind in (_INT, _LGL):
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == _REAL:
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        if has_attr:
            attrs = dict(self.item())
            if kind == _VEC and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def unserialize(data: bytes) -> Any:
    """An R object from its XDR serialization ('X\\n' header): character vectors -> lists of
    str (NA -> None), numeric vectors -> lists, named generic vectors -> dicts, pairlists ->
    lists of (tag, value)."""
    if data[:2] != b"X\n":
        raise ValueError(f"not R XDR serialization (header {data[:2]!r})")
    r = _Reader(data)
    r.i = 2
    version = r.int()
    r.int(), r.int()  # writer's R version, minimal reader version
    if version == 3:
        r.take(r.int())  # native encoding name
    return r.item()


# ---------------------------------------------------------------------------
# The package -> novels -> chapters
# ---------------------------------------------------------------------------

def _ar_members(deb: bytes) -> dict[str, bytes]:
    if deb[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    out, i = {}, 8
    while i + 60 <= len(deb):
        name = deb[i:i + 16].decode().strip().rstrip("/")
        size = int(deb[i + 48:i + 58].decode().strip())
        out[name] = deb[i + 60:i + 60 + size]
        i += 60 + size + (size & 1)
    return out


def novels_from_deb(deb: bytes) -> dict[str, list[str]]:
    """Each novel's lines, from the bytes of the ``.deb``."""
    data_tar = next((v for k, v in _ar_members(deb).items() if k.startswith("data.tar")), None)
    if data_tar is None:
        raise ValueError("no data.tar.* member in the package")
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        rdx = tar.extractfile(_DATA_DIR + "Rdata.rdx").read()
        rdb = tar.extractfile(_DATA_DIR + "Rdata.rdb").read()
    index = unserialize(gzip.decompress(rdx))["variables"]
    novels = {}
    for name in AUSTEN_NOVELS:
        offset, length = index[name]
        record = rdb[offset:offset + length]
        novels[name] = unserialize(zlib.decompress(record[4:]))
    return novels


def chapters(lines: list[str | None]) -> list[str]:
    """A novel's chapters as documents: paragraphs (blank-line separated, wrapped lines
    joined) one per line; the front matter before the first chapter heading is dropped."""
    docs: list[list[str]] = []
    para: list[str] = []

    def end_paragraph():
        if para and docs:
            docs[-1].append(" ".join(para))
        para.clear()

    for line in lines:
        line = (line or "").strip()
        if _CHAPTER_RE.match(line):
            end_paragraph()
            docs.append([])
        elif not line or _SKIP_RE.match(line):
            end_paragraph()
        else:
            para.append(line)
    end_paragraph()
    return ["\n".join(d) for d in docs if d]


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.read()
    except OSError as exc:
        raise DataSourceError(f"austen: cannot download {url}: {exc}. Fetch the file by hand "
                              f"into {austen_cache_dir()} (or use a local text file as the "
                              "data source).") from exc


def load_austen(*, refresh: bool = False) -> list[str]:
    """The chapters of Jane Austen's six novels (about 270 documents, 3.9 M characters)."""
    root = austen_cache_dir()
    cached = root / _CACHE_NAME
    if cached.is_file() and not refresh:
        with open(cached, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    deb_path = root / AUSTEN_DEB_URL.rsplit("/", 1)[1]
    if not deb_path.is_file():
        print(f"[qdlm] downloading Jane Austen's novels (1.6 MB) from {AUSTEN_DEB_URL}",
              flush=True)
        with atomic_file(deb_path) as tmp:
            tmp.write_bytes(_download(AUSTEN_DEB_URL))
    actual = sha256_file(deb_path)
    if actual != AUSTEN_DEB_SHA256:
        deb_path.unlink()
        raise DataSourceError(f"austen: sha256 mismatch for {deb_path}: expected "
                              f"{AUSTEN_DEB_SHA256}, got {actual} (deleted; retry)")
    try:
        novels = novels_from_deb(deb_path.read_bytes())
    except (ValueError, KeyError, OSError, zlib.error, tarfile.TarError) as exc:
        raise DataSourceError(f"austen: {deb_path}: cannot read the novels: {exc}") from exc
    docs = [c for name in AUSTEN_NOVELS for c in chapters(novels[name])]
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    atomic_write_bytes(cached, payload.encode("utf-8"))
    deb_path.unlink()
    return docs

