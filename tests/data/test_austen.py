"""The Austen text source: R's XDR serialization written out by hand from its specification
(R Internals, "Serialization formats"), a fake Debian package built here, and the fallback
of the Wikipedia default when BIG-bench cannot be fetched."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from qdlm_jax.data import austen, sources
from qdlm_jax.errors import DataSourceError


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str | None) -> bytes:
    if s is None:  # NA_STRING
        return _i(0x9) + _i(-1)
    b = s.encode()
    return _i(0x00040009) + _i(len(b)) + b  # CHARSXP, levels: ASCII


def _str(values) -> bytes:
    return _i(16) + _i(len(values)) + b"".join(_char(v) for v in values)


def _ints(values) -> bytes:
    return _i(13) + _i(len(values)) + struct.pack(f">{len(values)}i", *values)


NIL = _i(254)


def _named_list(items: dict[str, bytes], *, names_sym: bytes) -> bytes:
    """VECSXP with a names attribute: a pairlist (LISTSXP, tagged) after the elements."""
    head = _i(19 | 0x200) + _i(len(items)) + b"".join(items.values())
    attr = _i(2 | 0x400) + names_sym + _str(list(items)) + NIL
    return head + attr


def _xdr(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


SYM_NAMES = _i(1) + _char("names")  # first use: SYMSXP + its CHARSXP
REF_NAMES = _i((1 << 8) | 255)  # later uses: REFSXP to reference 1


def test_unserialize_named_lists_strings_na_and_references() -> None:
    # a vector's elements come before its attributes, so the inner list meets the symbol
    # `names` first and the outer list refers back to it
    blob = _xdr(_named_list({"variables": _named_list({"a": _ints([3, -7]),
                                                       "b": _str(["x", None, "ü"])},
                                                      names_sym=SYM_NAMES),
                             "n": _i(14) + _i(1) + struct.pack(">d", 2.5)},
                            names_sym=REF_NAMES))
    assert austen.unserialize(blob) == {"variables": {"a": [3, -7], "b": ["x", None, "ü"]},
                                        "n": [2.5]}
    with pytest.raises(ValueError, match="not R XDR"):
        austen.unserialize(b"A\n" + blob[2:])
    with pytest.raises(ValueError, match="R type 3"):
        austen.unserialize(_xdr(_i(3)))  # a closure


NOVEL = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "",
         "Emma Woodhouse, handsome, clever,", "and rich.", "", "She was the youngest.", "",
         "", "CHAPTER II", "", "Mr. Weston was", "a native.", "", "THE END", None]


def test_chapters_split_at_headings_and_join_wrapped_lines() -> None:
    assert austen.chapters(NOVEL) == [
        "Emma Woodhouse, handsome, clever, and rich.\nShe was the youngest.",
        "Mr. Weston was a native."]


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_deb() -> bytes:
    records, index, offset = b"", {}, 0
    for i, name in enumerate(austen.AUSTEN_NOVELS):
        lines = [f"CHAPTER {i + 1}", "", f"{name} opens", "here.", "", "CHAPTER X", "", "end."]
        serial = _xdr(_str(lines))
        rec = _i(len(serial)) + zlib.compress(serial)
        index[name] = _ints([offset, len(rec)])
        records += rec
        offset += len(rec)
    rdx = gzip.compress(_xdr(_named_list(
        {"variables": _named_list(index, names_sym=SYM_NAMES),
         "references": _named_list({}, names_sym=REF_NAMES),
         "compressed": _ints([1])}, names_sym=REF_NAMES)))
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in (("Rdata.rdx", rdx), ("Rdata.rdb", records)):
            info = tarfile.TarInfo(austen._DATA_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz":
                tar_bytes.getvalue()})


def test_novels_from_a_package() -> None:
    novels = austen.novels_from_deb(_fake_deb())
    assert list(novels) == list(austen.AUSTEN_NOVELS)
    assert novels["emma"][2:4] == ["emma opens", "here."]
    with pytest.raises(ValueError, match="ar archive"):
        austen.novels_from_deb(b"PK\x03\x04")


@pytest.fixture()
def fake_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("QDLM_CACHE", str(tmp_path / "cache"))
    deb = _fake_deb()
    monkeypatch.setattr(austen, "AUSTEN_DEB_SHA256", __import__("hashlib").sha256(deb).hexdigest())
    calls: list[str] = []

    def download(url: str) -> bytes:
        calls.append(url)
        return deb
    monkeypatch.setattr(austen, "_download", download)
    return calls


def test_load_caches_chapters_and_drops_the_package(fake_mirror: list[str]) -> None:
    docs = austen.load_austen()
    assert len(docs) == 2 * len(austen.AUSTEN_NOVELS) and docs[0] == "emma opens here."
    assert austen.load_austen() == docs and len(fake_mirror) == 1  # from the cache
    assert [p.name for p in austen.austen_cache_dir().iterdir()] == ["austen_en.v1.jsonl"]
    assert sources.load_documents("austen") == docs


def test_a_corrupt_package_is_refused_and_deleted(fake_mirror, monkeypatch) -> None:
    monkeypatch.setattr(austen, "AUSTEN_DEB_SHA256", "0" * 64)
    with pytest.raises(DataSourceError, match="sha256 mismatch"):
        austen.load_austen()
    assert not list(austen.austen_cache_dir().iterdir())  # nothing half-written is left


def test_the_wikipedia_default_falls_back_to_austen(fake_mirror, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sources, "_BIGBENCH_STATE", {})
    tries = []

    def unavailable(**_):
        tries.append(1)
        raise DataSourceError("bigbench==1.0.0 cannot be downloaded\ndetails")
    monkeypatch.setattr(sources, "load_bigbench_wikipedia", unavailable)
    assert sources.resolve_source("wikipedia") == "austen"
    assert sources.resolve_source("bigbench-wikipedia") == "austen"
    assert sources.resolve_source("austen") == "austen"
    assert sources.load_documents("wikipedia") == austen.load_austen()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(tries) == 1 and len(err) == 1 and "cannot be downloaded" in err[0], err

    # the failure is recorded: a new process within a day does not try again
    marker = sources.cache_dir() / "bigbench-unavailable.json"
    assert "cannot be downloaded" in marker.read_text()
    monkeypatch.setattr(sources, "_BIGBENCH_STATE", {})
    monkeypatch.delenv("QDLM_RETRY_BIGBENCH", raising=False)
    assert sources.resolve_source("wikipedia") == "austen" and len(tries) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available in the last day" in err[0], err
    # QDLM_RETRY_BIGBENCH=1 tries now; a success removes the record
    monkeypatch.setattr(sources, "_BIGBENCH_STATE", {})
    monkeypatch.setenv("QDLM_RETRY_BIGBENCH", "1")
    monkeypatch.setattr(sources, "load_bigbench_wikipedia", lambda **_: ["a wiki doc"])
    assert sources.resolve_source("wikipedia") == "wikipedia"
    assert sources.load_documents("wikipedia") == ["a wiki doc"]
    assert not marker.exists()
    # a record older than a day is retried without the variable
    monkeypatch.delenv("QDLM_RETRY_BIGBENCH")
    marker.write_text('{"time": %f, "reason": "old"}' % (
        __import__("time").time() - sources.BIGBENCH_RETRY_S - 1))
    monkeypatch.setattr(sources, "_BIGBENCH_STATE", {})
    assert sources.resolve_source("wikipedia") == "wikipedia"
