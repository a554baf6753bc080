"""The four-dimension study: bits x method x task category x model (`qdlm study`): the
sweep and its results store. The cells are specified in `study_spec`, the table and plots
written by `study_report`, the rows parsed by `study_rows`; this module re-exports their
public names.

Cells: for each model, the fp model, every weight-only (method, bits) quantization of it
(and, with `bits_budgets`, every (method, bit budget): mixed precision at that mean width)
and every weight-activation (wa_method, W<b>A<a>) quantization (activations at the weight
bit width, `act_bits = bits`, unless `wa_act_bits` lists others; per token, or also per
group of input channels for each `act_granularities` entry g<N>), each on every task. A
quantized model is made by the main job's own path (`jobs.quantize.quantize_from_config` on
`configs/quantize.py`'s config with `model`, `method`, `bits` or `bits_budget` and the
study's `quantize` overrides set), so any method the job knows works here by name. Method
names are passed through untouched. Extra weight-activation rows (`wa_rows`: e.g. QuaRot
W4A4 with 4-bit K/V, and with IA-AQ on top) add their own main-job overrides; the table
labels them by what ran inside attention (`W4A4, KV4`, `QUAROT + IA-AQ (K,V; masked)`) and
names each row's overrides below it.

Resumable: every finished cell is appended to `<out_dir>/results.jsonl` as one complete
line, written with a single write + flush + fsync. On start, a torn last line (a kill
mid-write) is dropped, lines are deduplicated by cell key (the last wins), and cells
already present are skipped; a (model, method, bits) whose cells are all done is not
quantized again. The cell key is

    model | method | w<bits>[a<act_bits>][-ag<act group>] or wmix<budget>
          | <hash of the study's quantize settings> | task | <task spec hash>

so changing a task's settings or the study's quantizer settings (`quantize`,
`method_overrides`) makes new cells instead of reusing old ones. Defaults inside
configs/quantize.py are not part of the key (a new key added there with a default must not
throw away hours of finished cells); every line records the full resolved config.

Extra weight-only rows (`rows`: e.g. a MoE model's experts alone, or its routers at 4 bits)
add their own main-job overrides likewise. A fidelity task (`kl_to_fp`) compares each row
with the fp model of the same checkpoint.

Outputs in `out_dir`: `results.jsonl`, `table.md` (rows model x method x bits with the fp
row first, bits `4`, `mix3.5 (4 3 3 4)` (a budget and the blocks' widths), `W4A8`, `W4A4
ag32` (activation groups of 32 channels); columns the tasks grouped by category, as in the
QDLM paper's tables) and `plot_<model>.png` (metric against bits, one line per method, one
panel per category, fp as a dashed reference line), and for a MoE model `table_moe.md`
(`study_report.moe_table`: the scores beside the share of expert choices changed and the
sampler's tokens per forward pass and forward passes per item) with `decoding_<model>.png`
(forward passes per item against KL to fp, one point per row), all written through temp
files + rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax

from qdlm_jax.evals.tasks import TaskSpec, spec_dict
from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.jobs.study_report import (
    CATEGORY_TITLES,
    axis_limits,
    fp_can_do,
    markdown_table,
    moe_table,
    plot_decoding,
    plot_model,
)
from qdlm_jax.jobs.study_rows import (
    FP,
    WA_ROWS,
    WO_ROWS,
    Decoding,
    Variant,
    act_granularities,
    decoding_setting,
    wa_row,
)
from qdlm_jax.jobs.study_spec import (
    PASS_THROUGH,
    RESULTS,
    StudySpec,
    apply_study_overrides,
    cell_key,
    quant_hash,
    quant_overrides,
    quantize_config,
    study_spec,
)

# The study's public names, one import away (`from qdlm_jax.jobs import study`).
__all__ = ["CATEGORY_TITLES", "FP", "PASS_THROUGH", "RESULTS", "WA_ROWS", "WO_ROWS",
           "Decoding", "Made", "StudySpec", "Variant", "act_granularities", "act_settings",
           "append_line", "apply_study_overrides", "axis_limits", "cell_key",
           "decoding_setting", "evaluate_task", "fp_can_do", "kv_settings", "markdown_table",
           "moe_table", "plot_decoding", "plot_model",
           "quant_hash", "quant_overrides", "quantize_config", "read_results",
           "repair_results", "run_study", "study_spec", "wa_row"]


@dataclasses.dataclass(frozen=True)
class Made:
    """What `make_variant` may return instead of the bare text model: the model and what its
    quantization decided that the records keep (`bit_plan`: a budget row's block widths)."""

    tm: object
    info: dict = dataclasses.field(default_factory=dict)

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

    `evaluate(text_model, task) -> result dict` (default `evaluate_task`, fidelity tasks
    against the fp model) and
    `make_variant(spec, model_path, variant, fp_text_model) -> text_model` or `Made`
    (default: load / quantize through the main job) are injectable for tests.
    """
    make_variant = make_variant or _make_variant
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = repair_results(path)
    _log(f"{out}: {len(done)} finished cells on record")
    ran = 0
    t_start = time.time()
    qh = {(m, v): quant_hash(spec, m, v) for m in spec.models for v in spec.variants}
    n_cells = sum(len(spec.tasks_for(v)) for v in spec.variants) * len(spec.models)
    n_todo = sum(1 for m in spec.models for v in spec.variants for t in spec.tasks_for(v)
                 if cell_key(m, v, qh[m, v], t) not in done)
    _log(f"plan: {len(spec.models)} model(s) x {len(spec.variants)} variants "
         f"({', '.join(v.label for v in spec.variants)}) x their tasks = {n_cells} cells, "
         f"{n_todo} to run; an estimate of the time left follows each variant")
    for model in spec.models:
        fp_tm = None
        for v in spec.variants:
            qhash = qh[model, v]
            todo = [t for t in spec.tasks_for(v) if cell_key(model, v, qhash, t) not in done]
            if not todo:
                continue
            if fp_tm is None:
                fp_tm = make_variant(spec, model, Variant(FP), None)
                fp_tm = fp_tm.tm if isinstance(fp_tm, Made) else fp_tm
            t0 = time.time()
            made = Made(fp_tm) if v.method == FP else make_variant(spec, model, v, fp_tm)
            tm, info = (made.tm, made.info) if isinstance(made, Made) else (made, {})
            qcfg = None if v.method == FP else quantize_config(spec, model, v).to_dict()
            make_s = time.time() - t0
            _log(f"{Path(model).name} {v.label}: {len(todo)} tasks to run "
                 f"(quantized in {make_s:.1f}s)" if v.method != FP else
                 f"{Path(model).name} fp: {len(todo)} tasks to run")
            for task in todo:
                t1 = time.time()
                r = (evaluate(tm, task) if evaluate is not None else
                     evaluate_task(tm, task, progress=spec.progress, reference=fp_tm))
                rec = {"key": cell_key(model, v, qhash, task), "model": model,
                       "model_name": Path(model).name, "method": v.method,
                       "bits": v.bits if v.budget is None else v.budget,
                       "act_bits": v.act_bits, "variant": v.name,
                       "overrides": dict(v.overrides) if v.overrides else None,
                       "bits_budget": v.budget, "bit_plan": info.get("bit_plan"),
                       **kv_settings(qcfg), **act_settings(qcfg),
                       "quant_hash": qhash, "task": task.name, "category": task.category,
                       "metric": r["metric"], "value": r["value"],
                       "higher_is_better": r["higher_is_better"], "n": r.get("n"),
                       "se": r.get("se"), "chance": r.get("chance"),
                       "decoding": task.name.partition("@")[2] or None,
                       "tokens_per_step": r.get("tokens_per_step"),
                       "forward_passes_per_row": r.get("forward_passes_per_row"),
                       "forward_passes_per_row_se": r.get("forward_passes_per_row_se"),
                       "expert_choices_changed": r.get("expert_choices_changed"),
                       "eval_s": time.time() - t1, "quantize_s": make_s,
                       "task_spec": spec_dict(task), "quantize_config": qcfg, "result": r}
                append_line(path, rec)
                done[rec["key"]] = rec
                ran += 1
                _log(f"  {task.name}: {r['metric']} = {r['value']:.4f} "
                     f"({time.time() - t1:.1f}s)")
            # Each quantized model compiles its own programs; dropping them after its row
            # keeps a long sweep from running out of memory for compiled code (a MoE sweep
            # of 15 rows died in LLVM at row 11 without this).
            del tm, made
            jax.clear_caches()
            if ran < n_todo:
                left = (time.time() - t_start) / ran * (n_todo - ran)
                _log(f"  {ran}/{n_todo} cells done; about {left / 60:.1f} min left at this "
                     "rate")
    keys = [cell_key(m, v, qh[m, v], t) for m in spec.models for v in spec.variants
            for t in spec.tasks_for(v)]
    records = [done[k] for k in keys if k in done]
    table = markdown_table(records, spec.all_tasks)
    atomic_write_text(out / "table.md", table)
    plots = [plot_model(records, spec.tasks, m, out / f"plot_{Path(m).name}.png")
             for m in spec.models]
    if any(r.get("expert_choices_changed") is not None for r in records):
        atomic_write_text(out / "table_moe.md", moe_table(records, spec.tasks))
        plots += [plot_decoding(records, m, out / f"decoding_{Path(m).name}.png")
                  for m in spec.models]
    _log(f"ran {ran} cells in {time.time() - t_start:.1f}s; table: {out / 'table.md'}")
    return {"out_dir": str(out), "records": records, "table": table,
            "plots": [str(p) for p in plots], "ran": ran}


def evaluate_task(tm, task: TaskSpec, *, progress: bool = True, reference=None) -> dict:
    """`tasks.run_task` (a fidelity task against `reference`) plus the decoding figures of
    its generation (`tokens_per_step`, `forward_passes`, `forward_passes_per_row`;
    TextModel.take_decode_stats), when the model keeps them."""
    from qdlm_jax.evals.tasks import run_task
    take = getattr(tm, "take_decode_stats", None)
    if take is not None:
        take()  # drop counts from before this task
    r = run_task(tm, task, progress=progress, reference=reference)
    return {**r, **(take() if take is not None else {})}


def kv_settings(qcfg: dict | None) -> dict:
    """{"kv": K/V quantization or None, "iaaq": the IA-AQ search or None} of a resolved
    main-job config: what a weight-activation cell ran inside attention (None for float K/V,
    weight-only cells and fp)."""
    if not qcfg or qcfg.get("act_bits", 16) >= 16:
        return {"kv": None, "iaaq": None}
    act = qcfg.get("act", {})
    kv = act.get("kv") or {}
    kv = dict(kv) if kv.get("bits", 16) < 16 else None
    ia = act.get("iaaq") or {}
    ia = ({**ia, "calibration": qcfg.get("calibration")} if ia.get("enabled") else None)
    return {"kv": kv, "iaaq": ia}


def act_settings(qcfg: dict | None) -> dict:
    """{"act_granularity", "act_group_size"} of a resolved main-job config: how a
    weight-activation cell scaled its activations (per_token, per_group with its group
    size, per_tensor); None for weight-only cells and fp."""
    if not qcfg or qcfg.get("act_bits", 16) >= 16:
        return {"act_granularity": None, "act_group_size": None}
    act = qcfg.get("act", {})
    granularity = act.get("granularity", "per_token")
    return {"act_granularity": granularity,
            "act_group_size": act.get("group_size") if granularity == "per_group" else None}


def _make_variant(spec: StudySpec, model: str, v: Variant, fp_tm):

    from qdlm_jax.evals.backends import load_text_model
    if v.method == FP:
        return load_text_model(model, dtype=spec.dtype)
    from qdlm_jax.jobs.quantize import quantize_from_config
    qmodel, stats = quantize_from_config(quantize_config(spec, model, v), model=fp_tm.model)
    plan = (stats or {}).get("bit_plan")
    return Made(dataclasses.replace(fp_tm, model=qmodel, decode_counts={}),
                {"bit_plan": list(plan["bits"]) if plan else None})
