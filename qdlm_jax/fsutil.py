"""Atomic outputs: a directory or file appears at its final path only when complete.

The one place the package writes through a temp path and a rename; every layer uses it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qdlm_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False,
               extra_files=()) -> Iterator[Path]:
    """Yields a temp dir beside `out`; on success copies `extra_files` in and renames it to
    `out` (replacing it if `overwrite`), on any error removes it and leaves `out` untouched."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (use --overwrite / overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path` (same suffix, so writers that pick a format by
    extension still do); renames it to `path` when the block succeeds, removes it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a UTF-8 text file through a temp file + rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a binary file through a temp file + rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def settings_digest(settings, n: int) -> str:
    """The first `n` hex digits of sha256 over the canonical JSON of `settings` (sorted keys,
    non-JSON values as str): the one digest that names run directories, cached evaluations
    and study cells, so that equal settings always land in the same place."""
    import hashlib
    import json

    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]
