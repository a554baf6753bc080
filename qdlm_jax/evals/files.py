"""Reading task data files: JSONL with errors that name the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def jsonl_records(path, what: str) -> list[tuple[str, object]]:
    """[(\"file:line\", parsed JSON value)] of a JSONL file (optionally .gz), blank lines
    skipped. A missing file raises FileNotFoundError, a bad line or an empty file ValueError,
    each naming the file (and line) and `what` was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                 f"expected one JSON object per line ({what})") from None
    if not out:
        raise ValueError(f"{path}: no records (empty file; expected {what})")
    return out
