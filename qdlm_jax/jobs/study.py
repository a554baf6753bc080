"""The four-dimension study: bits x method x task category x model (`qdlm study`).

Cells: for each model, the fp model, every weight-only (method, bits) quantization of it
and every weight-activation (wa_method, WxAx) quantization (activations at the weight
bit width, `act_bits = bits`), each on every task. A quantized model is made by the main job's own path
(`quantize_job.quantize_from_config` on `configs/quantize.py`'s config with `model`,
`method`, `bits` and the study's `quantize` overrides set), so any method the job knows
works here by name. Method names are passed through untouched.

Resumable: every finished cell is appended to `<out_dir>/results.jsonl` as one complete
line, written with a single write + flush + fsync. On start, a torn last line (a kill
mid-write) is dropped, lines are deduplicated by cell key (the last wins), and cells
already present are skipped; a (model, method, bits) whose cells are all done is not
quantized again. The cell key is

    model | method | w<bits>[a<act_bits>] | <hash of the study's quantize settings> | task | <task spec hash>

so changing a task's settings or the study's quantizer settings (`quantize`,
`method_overrides`) makes new cells instead of reusing old ones. Defaults inside
configs/quantize.py are not part of the key (a new key added there with a default must not
throw away hours of finished cells); every line records the full resolved config.

Outputs in `out_dir`: `results.jsonl`, `table.md` (rows model x method x bits with the fp
row first; columns the tasks grouped by category, as in the QDLM paper's tables) and
`plot_<model>.png` (metric against bits, one line per method, one panel per category, fp
as a dashed reference line), all written through temp files + rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from qdlm_jax.evals.tasks import CATEGORIES, TaskSpec, resolve_task, spec_dict, spec_hash
from qdlm_jax.fsutil import atomic_file, atomic_write_text

FP = "fp"
RESULTS = "results.jsonl"
# Keys of the quantize config that do not change the quantized model.


@dataclasses.dataclass(frozen=True)
class Variant:
    """fp, or one quantization (method, weight bits[, activation bits]) of a model."""

    method: str
    bits: int | None = None
    act_bits: int | None = None  # None: weight-only (activations stay in float)

    @property
    def bits_text(self) -> str:
        return "-" if self.bits is None else (
            f"w{self.bits}" if self.act_bits is None else f"w{self.bits}a{self.act_bits}")

    @property
    def label(self) -> str:
        return FP if self.method == FP else f"{self.method}-{self.bits_text}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySpec:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    bits: tuple[int, ...]
    tasks: tuple[TaskSpec, ...]
    include_fp: bool = True
    out_dir: str = "runs/study"
    quantize_config: str = "configs/quantize.py"
    quantize: dict = dataclasses.field(default_factory=dict)  # overrides for every method
    method_overrides: dict = dataclasses.field(default_factory=dict)  # {method: overrides}
    wa_methods: tuple[str, ...] = ()  # weight-activation methods, run at W<b>A<b>
    wa_bits: tuple[int, ...] = ()
    wa_quantize: dict = dataclasses.field(default_factory=dict)  # overrides for WA variants
    dtype: str = "float32"
    progress: bool = True

    @property
    def variants(self) -> list[Variant]:
        v = [Variant(FP)] if self.include_fp else []
        v += [Variant(m, b) for m in self.methods for b in self.bits]
        return v + [Variant(m, b, b) for m in self.wa_methods for b in self.wa_bits]


def study_spec(cfg) -> StudySpec:
    """Validates a `configs/study.py` config (one clear error before any work)."""
    models = tuple(cfg.models)
    if not models:
        raise ValueError("--config.models: expected at least one model path")
    for m in models:
        if not Path(m).exists():
            raise FileNotFoundError(f"--config.models: {m}: no such checkpoint directory")
    tasks = tuple(resolve_task(t, f"--config.tasks[{i}]") for i, t in enumerate(cfg.tasks))
    if not tasks:
        raise ValueError("--config.tasks: expected at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--config.tasks: duplicate task names {names}")
    bits = tuple(int(b) for b in cfg.bits)
    wa_bits = tuple(int(b) for b in cfg.get("wa_bits", ()))
    wa_methods = tuple(cfg.get("wa_methods", ()))
    if wa_methods and not wa_bits:
        raise ValueError(f"--config.wa_methods={','.join(wa_methods)}: expected "
                         "--config.wa_bits too (e.g. 8,4 for W8A8 and W4A4)")
    to_dict = (lambda x: x.to_dict() if hasattr(x, "to_dict") else dict(x))
    spec = StudySpec(models=models, methods=tuple(cfg.methods), bits=bits, tasks=tasks,
                     include_fp=bool(cfg.include_fp), out_dir=str(cfg.out_dir),
                     quantize_config=str(cfg.quantize_config),
                     quantize=to_dict(cfg.quantize), method_overrides={
                         k: to_dict(v) for k, v in to_dict(cfg.method_overrides).items()},
                     wa_methods=wa_methods, wa_bits=wa_bits,
                     wa_quantize=to_dict(cfg.get("wa_quantize", {})),
                     dtype=str(cfg.dtype), progress=bool(cfg.get("progress", True)))
    for v in spec.variants:  # the job validates method / bits / overrides up front
        if v.method != FP:
            from qdlm_jax.jobs.quantize import job_spec
            job_spec(quantize_config(spec, models[0], v))
    return spec


def quantize_config(spec: StudySpec, model: str, v: Variant):
    """The main job's config for one quantized variant."""
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    cfg = load_config_file(spec.quantize_config)
    flat = {"model": model, **quant_overrides(spec, v)}
    apply_overrides(cfg, [f"--config.{k}={_override_text(val)}" for k, val in
                          _flatten(flat).items()])
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _override_text(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def quant_overrides(spec: StudySpec, v: Variant) -> dict:
    """What the study sets on the main job's config for one variant (a weight-activation
    variant adds `act_bits` and the study's `wa_quantize` overrides)."""
    out = {"method": v.method, "bits": v.bits, **spec.quantize}
    if v.act_bits is not None:
        out.update({"act_bits": v.act_bits, **spec.wa_quantize})
    return {**out, **spec.method_overrides.get(v.method, {})}


def quant_hash(spec: StudySpec, model: str, v: Variant) -> str:
    """Hash of the study's settings of a variant (config file name + its overrides). The
    defaults inside the config file are not hashed, so a key added to configs/quantize.py
    with a default does not invalidate finished cells; each line records the full resolved
    config (`quantize_config`). Use a new out_dir after changing a default on purpose."""
    if v.method == FP:
        return "-"
    text = json.dumps({"config": Path(spec.quantize_config).name,
                       **quant_overrides(spec, v)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cell_key(model: str, v: Variant, qhash: str, task: TaskSpec) -> str:
    return f"{model}|{v.method}|{v.bits_text}|{qhash}|{task.name}|{spec_hash(task)}"


# ---- results.jsonl -----------------------------------------------------------------------

def append_line(path: Path, record: dict) -> None:
    """Appends one complete JSON line with a single write, then flush + fsync."""
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> dict[str, dict]:
    """{cell key: record} of a results file: lines that are not complete JSON objects with
    a `key` (a torn last line) are skipped; for a key seen twice the last line wins."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out[rec["key"]] = rec
    return out


def repair_results(path: Path) -> dict[str, dict]:
    """Rewrites `path` as its deduplicated complete lines (temp file + rename) when it has a
    torn or duplicate line, so appends start on a fresh line. Returns the records."""
    records = read_results(path)
    if not path.is_file():
        return records
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if text.endswith("\n") and len(lines) == len(records):
        return records
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n"
                                    for r in records.values()))
    return records


# ---- the sweep -------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def run_study(spec: StudySpec, *, evaluate: Callable | None = None,
              make_variant: Callable | None = None) -> dict:
    """Runs every missing cell; returns {"out_dir", "records", "table", "plots", "ran"}.

    `evaluate(text_model, task) -> result dict` (default `tasks.run_task`) and
    `make_variant(spec, model_path, variant, fp_text_model) -> text_model` (default: load /
    quantize through the main job) are injectable for tests.
    """
    from qdlm_jax.evals.tasks import run_task
    evaluate = evaluate or (lambda tm, task: run_task(tm, task, progress=spec.progress))
    make_variant = make_variant or _make_variant
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = repair_results(path)
    _log(f"{out}: {len(done)} finished cells on record")
    ran = 0
    t_start = time.time()
    qh = {(m, v): quant_hash(spec, m, v) for m in spec.models for v in spec.variants}
    for model in spec.models:
        fp_tm = None
        for v in spec.variants:
            qhash = qh[model, v]
            todo = [t for t in spec.tasks if cell_key(model, v, qhash, t) not in done]
            if not todo:
                continue
            if fp_tm is None:
                fp_tm = make_variant(spec, model, Variant(FP), None)
            t0 = time.time()
            tm = fp_tm if v.method == FP else make_variant(spec, model, v, fp_tm)
            qcfg = None if v.method == FP else quantize_config(spec, model, v).to_dict()
            make_s = time.time() - t0
            _log(f"{Path(model).name} {v.label}: {len(todo)} tasks to run "
                 f"(quantized in {make_s:.1f}s)" if v.method != FP else
                 f"{Path(model).name} fp: {len(todo)} tasks to run")
            for task in todo:
                t1 = time.time()
                r = evaluate(tm, task)
                rec = {"key": cell_key(model, v, qhash, task), "model": model,
                       "model_name": Path(model).name, "method": v.method, "bits": v.bits,
                       "act_bits": v.act_bits,
                       "quant_hash": qhash, "task": task.name, "category": task.category,
                       "metric": r["metric"], "value": r["value"],
                       "higher_is_better": r["higher_is_better"], "n": r.get("n"),
                       "se": r.get("se"), "chance": r.get("chance"),
                       "eval_s": time.time() - t1, "quantize_s": make_s,
                       "task_spec": spec_dict(task), "quantize_config": qcfg, "result": r}
                append_line(path, rec)
                done[rec["key"]] = rec
                ran += 1
                _log(f"  {task.name}: {r['metric']} = {r['value']:.4f} "
                     f"({time.time() - t1:.1f}s)")
    keys = [cell_key(m, v, qh[m, v], t) for m in spec.models for v in spec.variants
            for t in spec.tasks]
    records = [done[k] for k in keys if k in done]
    table = markdown_table(records, spec.tasks)
    atomic_write_text(out / "table.md", table)
    plots = [plot_model(records, spec.tasks, m, out / f"plot_{Path(m).name}.png")
             for m in spec.models]
    _log(f"ran {ran} cells in {time.time() - t_start:.1f}s; table: {out / 'table.md'}")
    return {"out_dir": str(out), "records": records, "table": table,
            "plots": [str(p) for p in plots], "ran": ran}


def _make_variant(spec: StudySpec, model: str, v: Variant, fp_tm):
    from qdlm_jax.evals.backends import TextModel, load_text_model
    if v.method == FP:
        return load_text_model(model, dtype=spec.dtype)
    from qdlm_jax.jobs.quantize import quantize_from_config
    qmodel, _ = quantize_from_config(quantize_config(spec, model, v), model=fp_tm.model)
    return TextModel(qmodel, fp_tm.tokenizer)


# ---- table and plots ---------------------------------------------------------------------

CATEGORY_TITLES = {"language_modeling": "Language modelling", "multiple_choice":
                   "Multiple choice", "math": "Math", "code": "Code"}


def _ordered_tasks(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(tasks, key=lambda t: order.get(t.category, len(order)))


def _fmt(rec: dict | None) -> str:
    if rec is None:
        return "–"
    v, se = rec["value"], rec.get("se")
    if rec["higher_is_better"]:
        return f"{100 * v:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
    return f"{v:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _row(r: dict) -> tuple:
    """(model, method, weight bits, activation bits or None) of a record."""
    return (r["model_name"], r["method"], r["bits"], r.get("act_bits"))


def _row_order(records: list[dict]) -> list[tuple]:
    """fp first, then weight-only rows, then weight-activation rows; within each, methods in
    first-seen order and bits descending."""
    rows = list(dict.fromkeys(_row(r) for r in records))
    models = list(dict.fromkeys(r[0] for r in rows))
    methods = list(dict.fromkeys(r[1] for r in rows if r[1] != FP))
    return sorted(rows, key=lambda r: (models.index(r[0]), r[1] != FP, r[3] is not None,
                                       methods.index(r[1]) if r[1] != FP else -1,
                                       -(r[2] or 0)))


def _bits_cell(bits, act_bits) -> str:
    if bits is None:
        return "–"
    return str(bits) if act_bits is None else f"W{bits}A{act_bits}"


def markdown_table(records: list[dict], tasks: Sequence[TaskSpec]) -> str:
    """QDLM-paper layout: a category header row, then task names; accuracies in %, the LM
    bound in bits/token (↓)."""
    tasks = _ordered_tasks(tasks)
    by = {(*_row(r), r["task"]): r for r in records}
    cats, prev = [], None
    for t in tasks:
        cats.append(CATEGORY_TITLES.get(t.category, t.category) if t.category != prev else "")
        prev = t.category
    unit = {t.name: ("bits/tok ↓" if not t.higher_is_better else f"{t.metric} %")
            for t in tasks}
    lines = ["| | | | " + " | ".join(cats) + " |",
             "|---|---|---|" + "---|" * len(tasks),
             "| **model** | **method** | **bits** | " +
             " | ".join(f"**{t.name}** ({unit[t.name]})" for t in tasks) + " |"]
    for model, method, bits, act_bits in _row_order(records):
        cells = [_fmt(by.get((model, method, bits, act_bits, t.name))) for t in tasks]
        lines.append(f"| {model} | {'FP' if method == FP else method.upper()} | "
                     f"{_bits_cell(bits, act_bits)} | " + " | ".join(cells) + " |")
    lines.append("| *reference* | chance | – | " + " | ".join(
        _reference(t, records) for t in tasks) + " |")
    models = sorted({r["model_name"]: r.get("model", r["model_name"]) for r in records}.items())
    unigrams = [(name, _unigram(path)) for name, path in models]
    notes = ["± is one standard error (over windows for the bound, binomial for accuracies); "
             "chance for multiple choice is the mean of 1 / options over the items, for exact "
             "match and pass@1 about 0."]
    notes += [f"{name}: unigram reference {u:.3f} bits/token (its model card)."
              for name, u in unigrams if u is not None]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _reference(task: TaskSpec, records: list[dict]) -> str:
    if not task.higher_is_better:
        return "unigram: below"
    chances = [r["chance"] for r in records
               if r["task"] == task.name and r.get("chance") is not None]
    if chances:
        return f"{100 * chances[0]:.1f}"
    return "–" if task.type == "multiple_choice" else "≈ 0"


def _unigram(path: str) -> float | None:
    from qdlm_jax.jobs.quantize import unigram_reference
    return unigram_reference(path)


def axis_limits(values: Sequence[float], *, percent: bool) -> tuple[float, float]:
    """An honest y range for a panel: percentages at least 10 points tall inside [0, 100];
    bits/token at least 0.1 bits tall, so a gap of a few thousandths of a bit (Monte Carlo
    noise) is drawn as small as it is."""
    mid = (min(values) + max(values)) / 2
    if percent:
        half = max(5.0, (max(values) - min(values)) / 2 + 2.0)
        lo = max(0.0, min(max(0.0, mid - half), 100.0 - 2 * half))
        return lo, min(100.0, lo + 2 * half)
    half = max(0.05, (max(values) - min(values)) / 2 * 1.1)
    return mid - half, mid + half


def plot_model(records: list[dict], tasks: Sequence[TaskSpec], model: str, path: Path) -> Path:
    """Metric against bits per method, one panel per category (mean over the category's
    tasks; accuracies in %), fp as a dashed horizontal line. Weight-only methods are solid
    lines at their weight bits; weight-activation methods (W<b>A<b>) dotted lines at b. PNG
    via Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = Path(model).name
    recs = [r for r in records if r["model_name"] == name]
    cats = [c for c in CATEGORIES if any(t.category == c for t in tasks)]
    cats += sorted({t.category for t in tasks} - set(cats))
    fig, axes = plt.subplots(1, max(1, len(cats)), figsize=(4.2 * max(1, len(cats)), 3.8),
                             squeeze=False)
    series = list(dict.fromkeys((r["method"], r.get("act_bits") is not None)
                                for r in recs if r["method"] != FP))
    for ax, cat in zip(axes[0], cats):
        ctasks = [t for t in tasks if t.category == cat]
        pct = ctasks[0].higher_is_better
        scale = 100.0 if pct else 1.0

        def mean_se_of(method, bits, wa=False):
            """(category mean, its standard error) or (None, None)."""
            rs = [r for r in recs if r["method"] == method and r["bits"] == bits
                  and (r.get("act_bits") is not None) == wa
                  and r["task"] in {t.name for t in ctasks}]
            if len(rs) != len(ctasks):
                return None, None
            se = float(np.sqrt(sum((r.get("se") or 0.0) ** 2 for r in rs))) / len(rs)
            return scale * float(np.mean([r["value"] for r in rs])), scale * se

        fp, fp_se = mean_se_of(FP, None)
        shown = [fp] if fp is not None else []
        if fp is not None:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1.2, label="fp")
            if fp_se:
                ax.axhspan(fp - fp_se, fp + fp_se, color="black", alpha=0.08)
        all_bits = sorted({r["bits"] for r in recs if r["bits"] is not None}, reverse=True)
        for m, wa in series:
            pts = [(b, *mean_se_of(m, b, wa)) for b in all_bits]
            pts = [(b, y, e) for b, y, e in pts if y is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] or 0.0 for p in pts], capsize=3,
                            marker="s" if wa else "o", linestyle=":" if wa else "-",
                            label=f"{m.upper()} W=A" if wa else m.upper())
                shown += [p[1] + s * (p[2] or 0.0) for p in pts for s in (-1, 1)]
        if shown:
            ax.set_ylim(*axis_limits(shown, percent=pct))
        ax.set_xticks(all_bits or [4])
        if all_bits:
            ax.set_xlim(max(all_bits) + 0.5, min(all_bits) - 0.5)  # fewer bits to the right
        ax.set_xlabel("bits (weights; W=A: weights and activations)"
                      if any(wa for _, wa in series) else "weight bits")
        metric = ctasks[0].metric
        ylabel = f"{metric} (%)" if pct else f"{metric} (lower is better)"
        if len(ctasks) > 1:
            ylabel = f"mean {ylabel}"
        ax.set_ylabel(ylabel)
        ax.set_title(f"{CATEGORY_TITLES.get(cat, cat)}\n"
                     f"({', '.join(t.name for t in ctasks)})", fontsize=9)
        ax.grid(alpha=0.3)
    handles: dict = {}  # one legend for the figure, below the panels (none covers a line)
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   ncol=min(len(handles), 8), fontsize=9, frameon=False)
    fig.suptitle(f"{name}: quality against bits")
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
