"""Tests for qdlm_jax.data.sources (no network: downloads are faked)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from qdlm_jax.data import bigbench, sources
from qdlm_jax.data.sources import (
    DataSourceError,
    SplitFractions,
    load_documents,
    load_split,
    read_jsonl,
    split_documents,
    token_windows,
)

DOCS = [f"Document number {i}. The quick brown fox {i * 7} jumps." for i in range(400)]

# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = split_documents(DOCS, SplitFractions(0.8, 0.1, 0.1), seed=3)
    b = split_documents(list(reversed(DOCS)), SplitFractions(0.8, 0.1, 0.1), seed=3)
    for part_a, part_b in zip(a, b):
        assert set(part_a) == set(part_b)
    train, calib, heldout = map(set, a)
    assert not train & calib and not train & heldout and not calib & heldout
    assert train | calib | heldout == set(DOCS)
    assert 0.65 * len(DOCS) < len(a.train) < 0.95 * len(DOCS)
    assert a.calib and a.heldout


def test_split_depends_on_seed_and_duplicates_stay_together() -> None:
    s0 = split_documents(DOCS, seed=0)
    s1 = split_documents(DOCS, seed=1)
    assert s0.calib != s1.calib
    dup = split_documents(DOCS + DOCS[:50], SplitFractions(0.5, 0.25, 0.25), seed=0)
    assert not set(dup.train) & set(dup.calib)
    assert not set(dup.calib) & set(dup.heldout)


def test_split_fractions_validated() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.9, 0.2, 0.1)
    with pytest.raises(ValueError, match=r"calib=-0\.1"):
        SplitFractions(1.0, -0.1, 0.1)


def test_load_split_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    parts = {s: load_split(path, s, text_field="body") for s in ("train", "calib", "heldout")}
    assert sum(map(len, parts.values())) == len(DOCS)
    assert parts["calib"] == load_split(str(path), "calibration", text_field="body")
    with pytest.raises(DataSourceError, match="unknown split"):
        load_split(path, "dev", text_field="body")


# ---------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------


def test_text_file_whole_and_blank_line_split(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("First doc line 1\nline 2\n\n  \nSecond doc\r\n\r\nThird\n")
    assert load_documents(path) == ["First doc line 1\nline 2\n\n  \nSecond doc\n\nThird"]
    assert load_documents(path, split_blank_lines=True) == [
        "First doc line 1\nline 2",
        "Second doc",
        "Third",
    ]


def test_text_dir_one_doc_per_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bravo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha")
    (tmp_path / "ignored.md").write_text("nope")
    assert load_documents(tmp_path) == ["bravo", "alpha"]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataSourceError) as info:
        read_jsonl(path)
    assert f"{path}:4" in str(info.value)
    assert "invalid JSON" in str(info.value)


def test_jsonl_missing_field_and_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataSourceError, match=r"f\.jsonl:2: missing text field 'text'"):
        read_jsonl(path)
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataSourceError, match=r"f\.jsonl:1: field 'text' must be a string"):
        read_jsonl(path)


def test_unknown_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="unknown data source"):
        load_documents(tmp_path / "missing.txt")


def test_hf_source_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataSourceError) as info:
        load_documents("wikitext2")
    msg = str(info.value)
    assert "datasets" in msg and "bigbench-wikipedia" in msg and "local" in msg


def test_hf_source_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDatasets:
        @staticmethod
        def load_dataset(*args: object, **kwargs: object) -> None:
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(
        DataSourceError, match="could not load Hugging Face dataset 'wikitext'.*ConnectionError"
    ):
        load_documents("wikitext2")


def test_wikitext_article_grouping() -> None:
    rows = [
        "",
        " = Alpha = \n",
        "",
        " Alpha text . \n",
        " = = Sub = = \n",
        " more \n",
        " = Beta = \n",
        " b \n",
    ]
    docs = sources._group_wikitext_articles(rows)
    assert (
        len(docs) == 2
        and docs[0].startswith("= Alpha =")
        and "Sub" in docs[0]
        and docs[1].startswith("= Beta =")
    )


# ---------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------


class CharTokenizer:
    """Minimal stand-in: one id per character (ord), via encode()."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_token_windows_concatenates_with_eos_and_chops() -> None:
    docs = ["abc", "de", "fghij"]
    out = token_windows(docs, CharTokenizer(), 4, eos_id=0)
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]
    assert out.dtype == np.int32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out.reshape(-1), stream[:12])
    with_bos = token_windows(docs, CharTokenizer(), 5, bos_id=1, eos_id=2)
    np.testing.assert_array_equal(with_bos[0], [1, 97, 98, 99, 2])
    assert token_windows(docs, CharTokenizer(), 4, eos_id=0, max_windows=2).shape == (2, 4)
    assert token_windows([], CharTokenizer(), 4).shape == (0, 4)


# ---------------------------------------------------------------------------
# BIG-bench fetch (faked archive and pip)
# ---------------------------------------------------------------------------

ENGLISH = (
    "The cat sat on the mat and it was happy with the food.\n"
    "This is the end of the first paragraph.\n"
    "The second paragraph has been written by the author for the test.\n"
)
GERMAN = "Die Katze sitzt auf der Matte.\nSie ist sehr zufrieden mit dem Essen.\n"


def _make_fake_sdist(path: Path) -> None:
    task = {
        "name": "paragraph_segmentation",
        "examples": [
            {"input": ENGLISH, "target": "0 1 1"},
            {"input": GERMAN, "target": "0 1"},
        ],
    }
    members = {
        bigbench._member_name("paragraph_segmentation"): json.dumps(task).encode(),
        bigbench._member_name("social_iqa"): json.dumps(
            {"examples": [{"input": "q", "target": "a"}]}
        ).encode(),
        "bigbench-1.0.0/setup.py": b"print('hi')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def fake_bigbench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Cache in tmp_path; pip replaced by a function copying a small fake sdist."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QDLM_CACHE", str(cache))
    monkeypatch.delenv("QDLM_KEEP_ARCHIVE", raising=False)
    fake = tmp_path / "fake" / bigbench.BIGBENCH_SDIST_FILENAME
    fake.parent.mkdir()
    _make_fake_sdist(fake)
    monkeypatch.setattr(bigbench, "BIGBENCH_SDIST_SHA256", bigbench.sha256_file(fake))
    calls: list[Path] = []

    def fake_download(dest_dir: Path) -> Path:
        calls.append(Path(dest_dir))
        out = Path(dest_dir) / bigbench.BIGBENCH_SDIST_FILENAME
        out.write_bytes(fake.read_bytes())
        return out

    monkeypatch.setattr(bigbench, "download_bigbench_sdist", fake_download)
    monkeypatch.setattr(sources, "_BIGBENCH_STATE", {})  # resolve the default afresh
    return {"cache": cache, "fake": fake, "calls": calls}


def test_fetch_extracts_caches_and_deletes_archive(fake_bigbench: dict[str, object]) -> None:
    cache: Path = fake_bigbench["cache"]  # type: ignore[assignment]
    calls: list[Path] = fake_bigbench["calls"]  # type: ignore[assignment]
    task = bigbench.fetch_bigbench_task("social_iqa")
    assert task["examples"][0]["target"] == "a"
    assert len(calls) == 1
    # prefetch also extracted paragraph_segmentation in the same pass
    assert (cache / "bigbench-1.0.0/tasks/paragraph_segmentation/task.json").is_file()
    assert not (cache / bigbench.BIGBENCH_SDIST_FILENAME).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".bigbench-download")]
    docs = sources.load_bigbench_wikipedia()
    assert len(calls) == 1  # no second download
    assert docs == [
        "The cat sat on the mat and it was happy with the food. "
        "This is the end of the first paragraph.\n"
        "The second paragraph has been written by the author for the test."
    ]
    assert (cache / "bigbench-1.0.0/wikipedia_en.v1.jsonl").is_file()
    assert load_documents("wikipedia") == docs
    # unknown task: rejected from the cached member list, without a download
    with pytest.raises(DataSourceError, match="no member"):
        bigbench.fetch_bigbench_task("no_such_task")
    assert len(calls) == 1


def test_keep_archive(fake_bigbench: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    cache: Path = fake_bigbench["cache"]  # type: ignore[assignment]
    monkeypatch.setenv("QDLM_KEEP_ARCHIVE", "1")
    bigbench.fetch_bigbench_task("social_iqa")
    assert (cache / bigbench.BIGBENCH_SDIST_FILENAME).is_file()


def test_sha256_mismatch_rejects_corrupted_download(
    fake_bigbench: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache: Path = fake_bigbench["cache"]  # type: ignore[assignment]
    monkeypatch.setattr(bigbench, "BIGBENCH_SDIST_SHA256", "0" * 64)
    with pytest.raises(DataSourceError) as info:
        bigbench.fetch_bigbench_task("social_iqa")
    msg = str(info.value)
    assert "sha256 mismatch" in msg and "0" * 64 in msg
    assert not (cache / "bigbench-1.0.0/tasks/social_iqa/task.json").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".bigbench-download")]


def test_sha256_mismatch_rejects_hand_placed_archive(
    fake_bigbench: dict[str, object], tmp_path: Path
) -> None:
    cache: Path = fake_bigbench["cache"]  # type: ignore[assignment]
    fake: Path = fake_bigbench["fake"]  # type: ignore[assignment]
    cache.mkdir(parents=True)
    corrupted = bytearray(fake.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    (cache / bigbench.BIGBENCH_SDIST_FILENAME).write_bytes(bytes(corrupted))
    with pytest.raises(DataSourceError, match="sha256 mismatch"):
        bigbench.fetch_bigbench_task("social_iqa")
    assert fake_bigbench["calls"] == []


def test_hand_placed_archive_is_used_and_kept(fake_bigbench: dict[str, object]) -> None:
    cache: Path = fake_bigbench["cache"]  # type: ignore[assignment]
    fake: Path = fake_bigbench["fake"]  # type: ignore[assignment]
    cache.mkdir(parents=True)
    placed = cache / bigbench.BIGBENCH_SDIST_FILENAME
    placed.write_bytes(fake.read_bytes())
    assert bigbench.fetch_bigbench_task("social_iqa")["examples"]
    assert fake_bigbench["calls"] == []
    assert placed.is_file()


@pytest.mark.parametrize("old_pip", [False, True])
def test_pip_failure_message_names_command_and_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_pip: bool
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QDLM_CACHE", str(cache))
    # old_pip=False: this pip is >= 26.3, so the fallback pip download fails first
    monkeypatch.setattr(bigbench, "_pip_rejects_direct_url_deps", lambda: not old_pip)

    class Failed:
        returncode = 1
        stderr = (
            "ERROR: Could not find a version that satisfies the requirement (from versions: none)"
        )

    monkeypatch.setattr(bigbench.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataSourceError) as info:
        bigbench.fetch_bigbench_task("paragraph_segmentation")
    msg = str(info.value)
    assert (
        "python -m pip download --no-deps --no-binary :all: --no-cache-dir bigbench==1.0.0" in msg
    )
    assert str(cache / "bigbench-1.0.0.tar.gz") in msg
    assert bigbench.BIGBENCH_SDIST_SHA256 in msg
    assert bigbench.BIGBENCH_SDIST_URL in msg
    assert "Could not find a version" in msg
    assert not [p for p in cache.iterdir() if p.name.startswith(".bigbench-download")]


def test_new_pip_falls_back_to_pinned_pip_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip >= 26.3 rejects bigbench (direct-URL dependency): a retry runs pip 26.2 from its
    wheel."""
    monkeypatch.setattr(bigbench, "_pip_rejects_direct_url_deps", lambda: False)
    calls: list[list[str]] = []

    class Proc:
        def __init__(self, returncode: int, stderr: str = "") -> None:
            self.returncode = returncode
            self.stderr = stderr

    def fake_run(cmd: list[str], **kwargs: object) -> Proc:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if "bigbench==1.0.0" in cmd and cmd[1] == "-m":
            return Proc(1, "ERROR: Distributions from PyPI cannot declare direct URL dependencies.")
        dest.mkdir(parents=True, exist_ok=True)
        if "pip==26.2" in cmd:
            (dest / "pip-26.2-py3-none-any.whl").write_bytes(b"wheel")
        else:
            (dest / bigbench.BIGBENCH_SDIST_FILENAME).write_bytes(b"sdist")
        return Proc(0)

    monkeypatch.setattr(bigbench.subprocess, "run", fake_run)
    out = bigbench.download_bigbench_sdist(tmp_path / "dl")
    assert out.read_bytes() == b"sdist"
    assert len(calls) == 3
    assert calls[2][1] == str(tmp_path / "dl" / "_pip" / "pip-26.2-py3-none-any.whl" / "pip")
    assert calls[2][2:5] == ["download", "--no-deps", "--no-binary"]


def test_pip_command_flags() -> None:
    cmd = bigbench.bigbench_pip_command("/x")
    assert cmd[1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-cache-dir",
        "bigbench==1.0.0",
        "-d",
        "/x",
    ]


def test_english_filter() -> None:
    assert sources.is_english(ENGLISH)
    assert not sources.is_english(GERMAN)
    assert not sources.is_english(
        "Lodi, ook wel genoemd Lodigiano, is een van de twaalf provincies of regio's."
    )


def test_invalid_task_path() -> None:
    with pytest.raises(DataSourceError, match="invalid BIG-bench task path"):
        bigbench.fetch_bigbench_tasks(["../etc"])
