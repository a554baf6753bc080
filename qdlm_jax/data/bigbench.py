"""The BIG-bench 1.0.0 task files, offline: fetched once from PyPI and cached.

The BIG-bench source distribution (~358 MB) is fetched from PyPI with ``pip download`` on
first use, checked against a pinned sha256, and only the needed ``task.json`` members are
streamed out of it (:func:`fetch_bigbench_tasks`). Also here: the project's data cache
(:func:`cache_dir`) and the sha256 check every fetched file goes through.

Cache layout (root: ``$QDLM_CACHE``, default ``~/.cache/qdlm``)::

    <root>/bigbench-1.0.0/members.txt               names of all archive members
    <root>/bigbench-1.0.0/tasks/<task>/task.json    extracted task files
    <root>/bigbench-1.0.0.tar.gz                    sdist, only if kept (below)

Disk use: a fetch extracts the requested task plus a small fixed set of tasks the project
uses (:data:`BIGBENCH_PREFETCH_TASKS`, ~65 MB in total, mostly ``paragraph_segmentation``) in
a single streaming pass over the archive, so later tasks usually need no second download.
The 358 MB archive is then deleted, unless ``QDLM_KEEP_ARCHIVE=1`` is set or
``keep_archive=True`` is passed. An archive that the user placed in the cache by hand is
never deleted.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from qdlm_jax.errors import DataSourceError
from qdlm_jax.fsutil import atomic_write_bytes

__all__ = [
    "BIGBENCH_PREFETCH_TASKS",
    "BIGBENCH_SDIST_FILENAME",
    "BIGBENCH_SDIST_SHA256",
    "bigbench_archive_path",
    "bigbench_cache_dir",
    "bigbench_pip_command",
    "cache_dir",
    "download_bigbench_sdist",
    "fetch_bigbench_task",
    "fetch_bigbench_tasks",
    "sha256_file",
    "task_json_path",
    "verify_sha256",
]


# ---------------------------------------------------------------------------
# Cache locations
# ---------------------------------------------------------------------------

CACHE_ENV = "QDLM_CACHE"
KEEP_ARCHIVE_ENV = "QDLM_KEEP_ARCHIVE"


def cache_dir() -> Path:
    """Root of the qdlm data cache: ``$QDLM_CACHE`` or ``~/.cache/qdlm``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env) if env else Path.home() / ".cache" / "qdlm"
    return root.expanduser()


# ---------------------------------------------------------------------------
# BIG-bench sdist
# ---------------------------------------------------------------------------

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST_FILENAME = "bigbench-1.0.0.tar.gz"
BIGBENCH_SDIST_SIZE = 358_249_635
# sha256 of bigbench-1.0.0.tar.gz as served by PyPI (computed 2026-11-22).
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# Content-addressed PyPI file URL (for fetching by hand).
BIGBENCH_SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/"
    "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
)
# pip 26.3 rejects any distribution from PyPI whose metadata declares a
# direct-URL dependency, and bigbench 1.0.0 declares `bleurt @ file://...`.
# With pip >= 26.3 the download is therefore done by pip 26.2 run from its
# wheel (``python pip-26.2-py3-none-any.whl/pip download ...``).
PIP_FALLBACK_VERSION = "26.2"
_PIP_DIRECT_URL_ERROR = "cannot declare direct URL dependencies"

# Tasks extracted along with any requested task, in the same pass over the
# archive (one download serves all of them). ~65 MB, of which 50 MB is
# paragraph_segmentation.
BIGBENCH_PREFETCH_TASKS: tuple[str, ...] = (
    "paragraph_segmentation",
    "social_iqa",
    "strategyqa",
    "winowhy",
    "code_line_description",
    "auto_debugging",
    "gem/xsum",
    "general_knowledge",
    "physical_intuition",
    "date_understanding",
    "logical_deduction/three_objects",
    "logical_deduction/five_objects",
    "logical_deduction/seven_objects",
    "elementary_math_qa/question_only",
    *(
        f"arithmetic/{d}_digit_{op}"
        for d in range(1, 6)
        for op in ("addition", "subtraction", "multiplication", "division")
    ),
)


def bigbench_cache_dir() -> Path:
    """Directory holding the extracted BIG-bench members and derived files."""
    return cache_dir() / "bigbench-1.0.0"


def bigbench_archive_path() -> Path:
    """Where the BIG-bench sdist is looked for (and kept, if it is kept)."""
    return cache_dir() / BIGBENCH_SDIST_FILENAME


def bigbench_pip_command(dest_dir: Path | str, pip: Sequence[str] | None = None) -> list[str]:
    """The ``pip download`` command that fetches the BIG-bench sdist into ``dest_dir``.

    ``pip`` is the command prefix that runs pip (default ``python -m pip``).
    """
    prefix = [sys.executable, "-m", "pip"] if pip is None else list(pip)
    return [
        *prefix,
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-cache-dir",
        BIGBENCH_REQUIREMENT,
        "-d",
        str(dest_dir),
    ]


def _manual_fetch_hint() -> str:
    root = cache_dir()
    cmd = " ".join(bigbench_pip_command(root)).replace(sys.executable, "python", 1)
    return (
        f"To fetch it by hand, run:\n"
        f"    {cmd}\n"
        f"(pip >= 26.3 refuses this package because its metadata declares a direct-URL dependency; "
        f"with such a pip, first run `python -m pip download --no-deps --only-binary :all: "
        f"pip=={PIP_FALLBACK_VERSION} -d /tmp/pip-old` and use "
        f"`python /tmp/pip-old/pip-{PIP_FALLBACK_VERSION}-py3-none-any.whl/pip` in place of "
        "`python -m pip`; "
        f"or download {BIGBENCH_SDIST_URL} directly)\n"
        f"so that the file is at {bigbench_archive_path()} "
        f"(sha256 {BIGBENCH_SDIST_SHA256}, {BIGBENCH_SDIST_SIZE} bytes), then retry. "
        f"The cache root can be changed with the {CACHE_ENV} environment variable. "
        f"Alternatively use a local text/JSONL file as the data source."
    )


def sha256_file(path: Path | str, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path | str, expected: str) -> None:
    """Raise :class:`DataSourceError` unless ``path`` has sha256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DataSourceError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            f"The file is corrupted or is not the expected release; delete it. "
            + _manual_fetch_hint()
        )


def _pip_rejects_direct_url_deps() -> bool:
    """Whether this interpreter's pip is >= 26.3 (see :data:`PIP_FALLBACK_VERSION`)."""
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = [int(x) for x in re.findall(r"\d+", version)[:2]]
    return tuple(numbers) >= (26, 3)


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip; its stdout (progress) goes to the terminal, stderr is captured."""
    try:
        return subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as exc:
        raise DataSourceError(
            f"could not run pip ({cmd[0]}): {exc}. " + _manual_fetch_hint()
        ) from exc


def _stderr_tail(proc: subprocess.CompletedProcess[str], n: int = 15) -> str:
    return "\n".join((proc.stderr or "").strip().splitlines()[-n:])


def _fallback_pip(dest_dir: Path) -> list[str]:
    """Download the pip wheel :data:`PIP_FALLBACK_VERSION`; returns a command prefix running
    it."""
    wheel_dir = dest_dir / "_pip"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-cache-dir",
        f"pip=={PIP_FALLBACK_VERSION}",
        "-d",
        str(wheel_dir),
    ]
    print(
        f"[qdlm] fetching pip {PIP_FALLBACK_VERSION} to download {BIGBENCH_REQUIREMENT}",
        file=sys.stderr,
    )
    proc = _run_pip(cmd)
    wheel = wheel_dir / f"pip-{PIP_FALLBACK_VERSION}-py3-none-any.whl"
    if proc.returncode != 0 or not wheel.is_file():
        raise DataSourceError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{_stderr_tail(proc)}\n"
            f"(this pip cannot download {BIGBENCH_REQUIREMENT} itself). " + _manual_fetch_hint()
        )
    return [sys.executable, str(wheel / "pip")]


def download_bigbench_sdist(dest_dir: Path | str) -> Path:
    """Download the BIG-bench sdist into ``dest_dir`` with pip and return its path.

    Uses this interpreter's pip, or, if that pip is >= 26.3 (which refuses the
    package, see :data:`PIP_FALLBACK_VERSION`), pip 26.2 run from its wheel.
    pip's standard output (including its progress bar) goes to the terminal;
    on failure the tail of pip's stderr is included in the raised error.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    pip: list[str] | None = _fallback_pip(dest_dir) if _pip_rejects_direct_url_deps() else None
    cmd = bigbench_pip_command(dest_dir, pip)
    print(
        f"[qdlm] downloading {BIGBENCH_REQUIREMENT} sdist (~358 MB) from PyPI:\n"
        f"    {' '.join(cmd)}",
        file=sys.stderr,
    )
    proc = _run_pip(cmd)
    if proc.returncode != 0 and pip is None and _PIP_DIRECT_URL_ERROR in (proc.stderr or ""):
        cmd = bigbench_pip_command(dest_dir, _fallback_pip(dest_dir))
        print(f"[qdlm] retrying with an older pip:\n    {' '.join(cmd)}", file=sys.stderr)
        proc = _run_pip(cmd)
    if proc.returncode != 0:
        raise DataSourceError(
            f"`pip download` of {BIGBENCH_REQUIREMENT} failed with exit code {proc.returncode}:\n"
            f"{_stderr_tail(proc)}\n" + _manual_fetch_hint()
        )
    path = dest_dir / BIGBENCH_SDIST_FILENAME
    if not path.is_file():
        found = sorted(p.name for p in dest_dir.iterdir())
        raise DataSourceError(
            f"pip reported success but {path} does not exist (found: {found}). "
            + _manual_fetch_hint()
        )
    return path


class _ProgressReader:
    """File wrapper that reports bytes read to a tqdm bar."""

    def __init__(self, f: BinaryIO, bar: Any) -> None:
        self._f = f
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._bar.update(len(data))
        return data


def _member_name(task_path: str) -> str:
    return f"{BIGBENCH_MEMBER_PREFIX}{task_path}/task.json"


def task_json_path(task_path: str) -> Path:
    return bigbench_cache_dir() / "tasks" / task_path / "task.json"


def _normalize_task_path(task_path: str) -> str:
    norm = task_path.strip().strip("/")
    if norm.endswith("/task.json"):
        norm = norm[: -len("/task.json")]
    parts = norm.split("/")
    if not norm or any(p in ("", ".", "..") for p in parts):
        raise DataSourceError(
            f"invalid BIG-bench task path {task_path!r}: expected e.g. 'social_iqa' or "
            f"'arithmetic/2_digit_addition'"
        )
    return norm


def _read_known_members() -> set[str] | None:
    path = bigbench_cache_dir() / "members.txt"
    if not path.is_file():
        return None
    return set(path.read_text(encoding="utf-8").splitlines())


def _extract_members(archive: Path, wanted: dict[str, Path]) -> set[str]:
    """Stream ``archive`` once; write each wanted member to its path. Returns all member names."""
    names: set[str] = set()
    remaining = dict(wanted)
    total = archive.stat().st_size
    with (
        open(archive, "rb") as raw,
        tqdm(
            total=total, unit="B", unit_scale=True, desc=f"extracting {archive.name}", leave=False
        ) as bar,
    ):
        try:
            with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|gz") as tar:  # type: ignore[arg-type]
                for member in tar:
                    names.add(member.name)
                    dest = remaining.pop(member.name, None)
                    if dest is None or not member.isfile():
                        continue
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    atomic_write_bytes(dest, fobj.read())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataSourceError(
                f"could not read {archive} as a tar.gz archive: {exc}. " + _manual_fetch_hint()
            ) from exc
    atomic_write_bytes(
        bigbench_cache_dir() / "members.txt", ("\n".join(sorted(names)) + "\n").encode("utf-8")
    )
    return names


def _unknown_task_error(task_path: str, known: set[str]) -> DataSourceError:
    tasks = sorted(
        n[len(BIGBENCH_MEMBER_PREFIX) : -len("/task.json")]
        for n in known
        if n.startswith(BIGBENCH_MEMBER_PREFIX) and n.endswith("/task.json")
    )
    close = difflib.get_close_matches(task_path, tasks, n=5)
    return DataSourceError(
        f"BIG-bench 1.0.0 has no member {_member_name(task_path)!r} "
        f"(task {task_path!r} may not exist or may be programmatic, i.e. task.py only). "
        f"Close matches: {close}. All members are listed in {bigbench_cache_dir() / 'members.txt'}."
    )


def fetch_bigbench_tasks(
    task_paths: Sequence[str], *, keep_archive: bool | None = None, prefetch: bool = True
) -> dict[str, Path]:
    """Make sure the ``task.json`` of each BIG-bench task is in the cache.

    ``task_paths`` are paths below ``benchmark_tasks/`` such as ``"social_iqa"``
    or ``"arithmetic/2_digit_addition"``. Tasks already extracted are not
    fetched again. Otherwise the sdist is taken from the cache (if the user put
    it there) or downloaded with pip, verified against
    :data:`BIGBENCH_SDIST_SHA256`, and streamed once to extract the missing
    tasks plus (if ``prefetch``) :data:`BIGBENCH_PREFETCH_TASKS`.

    ``keep_archive`` (default: env ``QDLM_KEEP_ARCHIVE=1``) keeps a downloaded
    archive in the cache instead of deleting it after extraction.

    Returns a mapping from normalized task path to its cached ``task.json``.
    """
    tasks = [_normalize_task_path(t) for t in task_paths]
    result = {t: task_json_path(t) for t in tasks}
    missing = [t for t in tasks if not result[t].is_file()]
    if not missing:
        return result

    known = _read_known_members()
    if known is not None:
        for t in missing:
            if _member_name(t) not in known:
                raise _unknown_task_error(t, known)

    wanted_tasks = list(missing)
    if prefetch:
        for t in BIGBENCH_PREFETCH_TASKS:
            if t not in wanted_tasks and not task_json_path(t).is_file():
                wanted_tasks.append(t)
    wanted = {_member_name(t): task_json_path(t) for t in wanted_tasks}

    if keep_archive is None:
        keep_archive = os.environ.get(KEEP_ARCHIVE_ENV, "") not in ("", "0", "false", "False")

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    archive = bigbench_archive_path()
    tmp_dir: Path | None = None
    try:
        if archive.is_file():
            verify_sha256(archive, BIGBENCH_SDIST_SHA256)
            names = _extract_members(archive, wanted)
        else:
            tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=".bigbench-download-"))
            downloaded = download_bigbench_sdist(tmp_dir)
            print(f"[qdlm] verifying sha256 of {downloaded.name}", file=sys.stderr)
            verify_sha256(downloaded, BIGBENCH_SDIST_SHA256)
            if keep_archive:
                os.replace(downloaded, archive)
                downloaded = archive
            names = _extract_members(downloaded, wanted)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    for t in missing:
        if not result[t].is_file():
            raise _unknown_task_error(t, names)
    return result


def fetch_bigbench_task(task_path: str) -> dict[str, Any]:
    """Return the parsed ``task.json`` of a BIG-bench task, fetching it if needed.

    Example: ``fetch_bigbench_task("arithmetic/2_digit_addition")["examples"]``.
    """
    path = fetch_bigbench_tasks([task_path])[_normalize_task_path(task_path)]
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataSourceError(
            f"cached BIG-bench task file {path} is unreadable ({exc}); delete it and retry"
        ) from exc
