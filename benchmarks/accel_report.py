"""The accelerator check's report: sections of rows, written to JSON and Markdown after
every row, so a run that is cut short keeps everything it finished.

    report = Report(out_dir, meta={...})
    record = report.start("kernels", "Kernels at LLaDA-8B shapes", budget_s=150)
    record.add_row({...})        # rewrites <out>/accel_report.json and accel_report.md
    report.finish(record, "ok")

A section's status: "running" (the run stopped inside it), "ok", "partial" (it stopped at
its time budget, or some of its cases failed; its notes say which), "failed" (it raised;
`error` holds the exception and the end of its traceback), or "skipped".
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdlm_jax.fsutil import atomic_write_text  # noqa: E402

JSON_NAME = "accel_report.json"
MD_NAME = "accel_report.md"
STATUSES = ("running", "ok", "partial", "failed", "skipped")
NOT_RUN_SHOWN = 8  # cases a note names; the JSON lists all


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a section's Markdown table: the row key, its header, and its unit or
    format ('' = as is; 'f1'/'f2'/'f3' = fixed decimals; 'g3' = 3 significant digits;
    'x2' = a ratio with an 'x'; 'pct' = a fraction as a percentage; 'e' = scientific)."""

    key: str
    header: str
    fmt: str = ""


def format_value(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt.startswith("f"):
        return f"{value:.{int(fmt[1:])}f}"
    if fmt == "g3":
        return f"{value:.3g}"
    if fmt == "x2":
        return f"{value:.2f}x"
    if fmt == "pct":
        return f"{100 * value:.0f}%"
    if fmt == "e":
        return f"{value:.1e}"
    return str(value)


class Budget:
    """A deadline on the monotonic clock."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.deadline = time.monotonic() + self.seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, estimate_s: float = 0.0) -> bool:
        """Whether a case expected to take `estimate_s` still fits."""
        return self.left() > estimate_s


@dataclasses.dataclass
class SectionRecord:
    name: str
    title: str
    budget_s: float
    columns: tuple[Column, ...] = ()
    status: str = "running"
    seconds: float = 0.0
    rows: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    not_run: list = dataclasses.field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    report: "Report | None" = dataclasses.field(default=None, repr=False)
    started: float = dataclasses.field(default_factory=time.monotonic, repr=False)

    def add_row(self, row: dict) -> None:
        self.rows.append(dict(row))
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.save()

    def skip_case(self, label: str) -> None:
        """A case left out because the section's budget ran out."""
        self.not_run.append(label)

    def save(self) -> None:
        self.seconds = time.monotonic() - self.started
        if self.report is not None:
            self.report.write()

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "status": self.status,
                "seconds": round(self.seconds, 3), "budget_s": round(self.budget_s, 1),
                "notes": self.notes, "not_run": self.not_run, "error": self.error,
                "traceback": self.traceback, "rows": self.rows}


class Report:
    """The sections so far, rewritten to `<out>/accel_report.{json,md}` on every change."""

    def __init__(self, out_dir: str | Path, meta: dict):
        self.out_dir = Path(out_dir)
        self.meta = dict(meta)
        self.sections: list[SectionRecord] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path:
        return self.out_dir / JSON_NAME

    @property
    def md_path(self) -> Path:
        return self.out_dir / MD_NAME

    def start(self, name: str, title: str, budget_s: float,
              columns: tuple[Column, ...] = ()) -> SectionRecord:
        record = SectionRecord(name=name, title=title, budget_s=budget_s, columns=columns,
                               report=self)
        self.sections.append(record)
        self.write()
        return record

    def finish(self, record: SectionRecord, status: str, *, error: str | None = None,
               traceback: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"section status {status!r}: expected one of {STATUSES}")
        record.status = status
        record.error = error
        record.traceback = traceback
        if record.not_run:
            shown = record.not_run[:NOT_RUN_SHOWN]
            more = len(record.not_run) - len(shown)
            record.notes.append(f"stopped at its time budget ({record.budget_s:.0f} s): "
                                f"{len(record.not_run)} case(s) not run: " + ", ".join(shown)
                                + (f" and {more} more (listed in the JSON)" if more else ""))
        record.save()

    def write(self) -> None:
        data = {"meta": self.meta, "sections": [s.to_json() for s in self.sections]}
        atomic_write_text(self.json_path, json.dumps(data, indent=1, default=str) + "\n")
        atomic_write_text(self.md_path, self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# Accelerator check: {m.get('device', '?')}", ""]
        for key in ("date", "mode", "command", "commit", "budget_s"):
            if key in m:
                lines.append(f"- {key}: `{m[key]}`" if key == "command" else f"- {key}: {m[key]}")
        lines.append("")
        for i, s in enumerate(self.sections, 1):
            lines.append(f"## {i}. {s.title}")
            lines.append("")
            lines.append(f"Status: **{s.status}**, {s.seconds:.1f} s of a {s.budget_s:.0f} s "
                         "budget.")
            lines.append("")
            for n in s.notes:
                lines.append(f"- {n}")
            if s.notes:
                lines.append("")
            if s.error:
                lines.append(f"Failure: `{s.error}`")
                lines.append("")
                if s.traceback:
                    lines += ["```", s.traceback.rstrip(), "```", ""]
            if s.rows:
                lines += table(s.columns, s.rows) + [""]
        return "\n".join(lines)


def table(columns: tuple[Column, ...], rows: list[dict]) -> list[str]:
    """A Markdown table of `rows`: the given columns, or every key seen when none are given.
    A row's `error` (a case that raised) is written in its last cell."""
    if not columns:
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        columns = tuple(Column(k, k) for k in keys)
    has_error = any(r.get("error") for r in rows) and all(c.key != "error" for c in columns)
    headers = [c.header for c in columns] + (["error"] if has_error else [])
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [format_value(r.get(c.key), c.fmt) for c in columns]
        if has_error:
            cells.append(str(r.get("error") or ""))
        out.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells)
                   + " |")
    return out
