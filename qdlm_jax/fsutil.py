"""Atomic outputs: a directory or file appears at its final path only when complete."""

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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a file through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
