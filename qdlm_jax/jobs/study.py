"""The four-dimension study: bits x method x task category x model (`qdlm study`).

Cells: for each model, the fp model, every weight-only (method, bits) quantization of it
and every weight-activation (wa_method, WxAx) quantization (activations at the weight
bit width, `act_bits = bits`), each on every task. A quantized model is made by the main
job's own path (`jobs.quantize.quantize_from_config` on `configs/quantize.py`'s config with `model`,
`method`, `bits` and the study's `quantize` overrides set), so any method the job knows
works here by name. Method names are passed through untouched. Extra weight-activation rows
(`wa_rows`: e.g. QuaRot W4A4 with 4-bit K/V, and with IA-AQ on top) add their own main-job
overrides; the table labels them by what ran inside attention (`W4A4, KV4`,
`QUAROT + IA-AQ (K,V; masked)`) and names each row's overrides below it.

Resumable: every finished cell is appended to `<out_dir>/results.jsonl` as one complete
line, written with a single write + flush + fsync. On start, a torn last line (a kill
mid-write) is dropped, lines are deduplicated by cell key (the last wins), and cells
already present are skipped; a (model, method, bits) whose cells are all done is not
quantized again. The cell key is

    model | method | w<bits>[a<act_bits>] | <hash of the study's quantize settings>
          | task | <task spec hash>

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
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.evals.basic import format_pm
from qdlm_jax.evals.tasks import CATEGORIES, TaskSpec, resolve_task, spec_dict, spec_hash
from qdlm_jax.fsutil import atomic_file, atomic_write_text, settings_digest

FP = "fp"
RESULTS = "results.jsonl"
# Keys of the quantize config that do not change the quantized model.


@dataclasses.dataclass(frozen=True)
class Variant:
    """fp, or one quantization (method, weight bits[, activation bits]) of a model."""

    method: str
    bits: int | None = None
    act_bits: int | None = None  # None: weight-only (activations stay in float)
    # An extra weight-activation row (`wa_rows`): its name and its own overrides of the main
    # job's config, as sorted (dotted key, value) pairs, e.g. (("act.kv.bits", 4),).
    name: str | None = None
    overrides: tuple = ()

    @property
    def bits_text(self) -> str:
        text = "-" if self.bits is None else (
            f"w{self.bits}" if self.act_bits is None else f"w{self.bits}a{self.act_bits}")
        return text if self.name is None else f"{text}+{self.name}"

    @property
    def label(self) -> str:
        return FP if self.method == FP else f"{self.method}-{self.bits_text}"


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One setting of the study's decoding dimension: Fast-dLLM's KV cache and parallel rule
    (threshold or factor), applied to every generation task of the rows it selects; such a
    task runs as `<task>@<name>` and its cells record tokens committed per forward pass."""

    name: str
    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None

    def apply(self, task: TaskSpec) -> TaskSpec:
        gen = dataclasses.replace(task.gen, cache=self.cache, threshold=self.threshold,
                                  factor=self.factor)
        return dataclasses.replace(task, name=f"{task.name}@{self.name}", gen=gen)


def decoding_setting(entry, where: str) -> Decoding:
    """A decoding setting from a name `<cache>[-tau<threshold>|-f<factor>]` (e.g.
    `dual-tau0.9`, `prefix`, `none-f1.0`) or a mapping {cache, threshold, factor[, name]}."""
    from qdlm_jax.inference.generate import GenerationConfig
    if isinstance(entry, str):
        cache, _, rule = entry.partition("-")
        d = {"cache": cache}
        try:
            if rule.startswith("tau"):
                d["threshold"] = float(rule[3:])
            elif rule.startswith("f"):
                d["factor"] = float(rule[1:])
            elif rule:
                raise ValueError
        except ValueError:
            raise ValueError(f"{where}={entry!r}: expected <cache>[-tau<threshold>|-f<factor>], "
                             "e.g. dual-tau0.9, or a mapping {cache, threshold, factor}") from None
        d["name"] = entry
    else:
        d = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        unknown = sorted(set(d) - {"name", "cache", "threshold", "factor"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected name, cache, "
                             "threshold, factor")
    dec = Decoding(str(d.get("name") or _decoding_name(d)), d.get("cache", "none"),
                   d.get("threshold"), d.get("factor"))
    try:
        GenerationConfig(cache=dec.cache, threshold=dec.threshold, factor=dec.factor)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return dec


def _decoding_name(d: dict) -> str:
    rule = (f"-tau{d['threshold']}" if d.get("threshold") is not None else
            f"-f{d['factor']}" if d.get("factor") is not None else "")
    return f"{d.get('cache', 'none')}{rule}"


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
    wa_rows: tuple[Variant, ...] = ()  # extra named WA rows (K/V bits, IA-AQ, ...): wa_row()
    dtype: str = "float32"
    progress: bool = True
    # The decoding dimension: each setting runs every generation task again on the rows
    # whose labels are in `decoding_rows` (empty: every row).
    decoding: tuple[Decoding, ...] = ()
    decoding_rows: tuple[str, ...] = ()

    def tasks_for(self, v: Variant) -> list[TaskSpec]:
        """The tasks of one row: the study's, plus the decoded generation tasks if the
        decoding dimension selects the row."""
        tasks = list(self.tasks)
        if self.decoding and (not self.decoding_rows or v.label in self.decoding_rows):
            tasks += [d.apply(t) for d in self.decoding for t in self.tasks
                      if getattr(t, "gen", None) is not None]
        return tasks

    @property
    def all_tasks(self) -> list[TaskSpec]:
        """The table's columns: the study's tasks, then every decoded task."""
        return list(self.tasks) + [d.apply(t) for d in self.decoding for t in self.tasks
                                   if getattr(t, "gen", None) is not None]

    @property
    def variants(self) -> list[Variant]:
        v = [Variant(FP)] if self.include_fp else []
        v += [Variant(m, b) for m in self.methods for b in self.bits]
        return v + [Variant(m, b, b) for m in self.wa_methods for b in self.wa_bits] + list(
            self.wa_rows)


def study_spec(cfg) -> StudySpec:
    """Validates a `configs/study.py` config (one clear error before any work)."""
    from qdlm_jax.checkpoints.load import resolve_checkpoint

    models = tuple(cfg.models)
    if not models:
        raise ValueError("--config.models: expected at least one model path")
    models = tuple(m if Path(m).exists() else str(resolve_checkpoint(m)) for m in models)
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
    def to_dict(x):
        return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    spec = StudySpec(models=models, methods=tuple(cfg.methods), bits=bits, tasks=tasks,
                     include_fp=bool(cfg.include_fp), out_dir=str(cfg.out_dir),
                     quantize_config=str(cfg.quantize_config),
                     quantize=to_dict(cfg.quantize), method_overrides={
                         k: to_dict(v) for k, v in to_dict(cfg.method_overrides).items()},
                     wa_methods=wa_methods, wa_bits=wa_bits,
                     wa_quantize=to_dict(cfg.get("wa_quantize", {})),
                     wa_rows=tuple(wa_row(r, f"--config.wa_rows[{i}]")
                                   for i, r in enumerate(cfg.get("wa_rows", ()))),
                     dtype=str(cfg.dtype), progress=bool(cfg.get("progress", True)),
                     decoding=tuple(decoding_setting(d, f"--config.decoding[{i}]")
                                    for i, d in enumerate(cfg.get("decoding", ()))),
                     decoding_rows=tuple(str(r) for r in cfg.get("decoding_rows", ())))
    labels = [v.label for v in spec.variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--config.wa_rows: two rows share a label: {labels}")
    if spec.decoding:
        unknown = sorted(set(spec.decoding_rows) - set(labels))
        if unknown:
            raise ValueError(f"--config.decoding_rows: {unknown} are not rows of this study; "
                             f"its rows: {labels}")
        if not any(getattr(t, "gen", None) is not None for t in tasks):
            raise ValueError("--config.decoding: no task of this study generates text "
                             "(math or code); the decoding settings would change nothing")
        names = [d.name for d in spec.decoding]
        if len(set(names)) != len(names):
            raise ValueError(f"--config.decoding: duplicate setting names {names}")
    rows = {v: f"--config.wa_rows[{i}] ({v.label})" for i, v in enumerate(spec.wa_rows)}
    for v in spec.variants:  # the job validates method / bits / overrides up front
        if v.method != FP:
            from qdlm_jax.jobs.quantize import job_spec
            try:
                job_spec(quantize_config(spec, models[0], v))
            except ValueError as e:
                if v not in rows:
                    raise
                raise ConfigOverrideError(f"{rows[v]}: {e}") from None
    return spec


# Extra weight-activation rows by name (`--config.wa_rows=quarot-w4a4+kv4,...`); a row may
# also be a mapping {name, method, bits[, act_bits], quantize: {main-job key: value}}.
# IA-AQ searches on masked calibration and for K and V: the setting that lowered KL to FP on
# tiny-dream in docs/weight_activation.md (the reference studies publish none).
WA_ROWS = {
    "quarot-w4a4+kv4": dict(name="kv4", method="quarot", bits=4,
                            quantize={"act.kv.bits": 4}),
    "quarot-w4a4+kv4-iaaq": dict(name="kv4-iaaq", method="quarot", bits=4, quantize={
        "act.kv.bits": 4, "act.iaaq.enabled": True, "act.iaaq.search_keys": True,
        "calibration": "masked"}),
}
_ROW_KEYS = ("name", "method", "bits", "act_bits", "quantize")


def wa_row(entry, where: str) -> Variant:
    """One extra weight-activation row: a `WA_ROWS` name or a mapping (see there). Keys of
    `quantize` are the main job's (`configs/quantize.py`), dotted or nested; the study
    checks them against that config (`study_spec`)."""
    if isinstance(entry, str):
        if entry not in WA_ROWS:
            raise ValueError(f"{where}={entry!r}: unknown row; built-in rows: "
                             f"{sorted(WA_ROWS)} (or a mapping with keys {_ROW_KEYS})")
        entry = WA_ROWS[entry]
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a row name or a mapping, got {entry!r}")
    for k in entry:
        if k not in _ROW_KEYS:
            raise ValueError(f"{where}.{k}: unknown key; expected {_ROW_KEYS}")
    for k in ("name", "method", "bits"):
        if k not in entry:
            raise ValueError(f"{where}: missing {k!r} (keys: {_ROW_KEYS})")
    name = str(entry["name"])
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"{where}.name={name!r}: expected letters, digits, '-', '_', '.'")
    quantize = entry.get("quantize", {}) or {}
    quantize = quantize.to_dict() if hasattr(quantize, "to_dict") else dict(quantize)
    bits = int(entry["bits"])
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in _flatten(quantize).items()}
    return Variant(str(entry["method"]), bits, int(entry.get("act_bits", bits)), name=name,
                   overrides=tuple(sorted(flat.items())))  # hashable: a Variant keys dicts


# Study settings that hold main-job keys: `--config.wa_quantize.act.kv.bits=4` sets a key the
# study's own config does not list, checked and typed against the main job's config.
PASS_THROUGH = ("quantize", "wa_quantize", "method_overrides")


def apply_study_overrides(cfg, overrides: Sequence[str]):
    """`config_flags.apply_overrides` for a study config, plus main-job keys under
    `quantize.`, `wa_quantize.` and `method_overrides.<method>.` that the study config does
    not list yet: each must name a key of `cfg.quantize_config` (an unknown one is an error
    naming the flag) and takes that key's type. Returns the config."""
    import ml_collections

    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file

    def listed(key: str) -> bool:
        node = cfg
        for p in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                return False
            node = node[p]
        return True

    own, passed = [], []
    for item in overrides:
        key = item[len("--config."):].split("=", 1)[0] if item.startswith("--config.") else ""
        top = key.split(".", 1)[0]
        passed_through = top in PASS_THROUGH and "." in key and not listed(key)
        (passed if passed_through else own).append(item)
    apply_overrides(cfg, own)
    for item in passed:
        key, text = item[len("--config."):].split("=", 1)
        top, rest = key.split(".", 1)
        if top == "method_overrides":
            if "." not in rest:
                raise ConfigOverrideError(f"--config.{key}: expected "
                                          "--config.method_overrides.<method>.<key>=<value>")
            method, rest = rest.split(".", 1)
            path = [top, method]
        else:
            path = [top]
        job_cfg = load_config_file(cfg.quantize_config)
        try:
            apply_overrides(job_cfg, [f"--config.{rest}={text}"])
        except ConfigOverrideError as e:
            raise ConfigOverrideError(f"--config.{key}={text}: checked against the main "
                                      f"job's config {cfg.quantize_config}: {e}") from None
        node = cfg
        for p in path + rest.split(".")[:-1]:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        value = job_cfg
        for p in rest.split("."):
            value = value[p]
        node[rest.split(".")[-1]] = value
    return cfg


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


def _merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys set, nested mappings merged key by key (so a method's
    `calib.seed` keeps the study's `calib.n_samples`)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def _nest(flat) -> dict:
    """{"act.kv.bits": 4} -> {"act": {"kv": {"bits": 4}}}."""
    out: dict = {}
    for key, value in flat:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def quant_overrides(spec: StudySpec, v: Variant) -> dict:
    """What the study sets on the main job's config for one variant (a weight-activation
    variant adds `act_bits` and the study's `wa_quantize` overrides; an extra row its own
    overrides last)."""
    out = {"method": v.method, "bits": v.bits, **spec.quantize}
    if v.act_bits is not None:
        out = _merge(out, {"act_bits": v.act_bits, **spec.wa_quantize})
    out = _merge(out, spec.method_overrides.get(v.method, {}))
    return _merge(out, _nest(v.overrides))


def quant_hash(spec: StudySpec, model: str, v: Variant) -> str:
    """Hash of the study's settings of a variant (config file name + its overrides). The
    defaults inside the config file are not hashed, so a key added to configs/quantize.py
    with a default does not invalidate finished cells; each line records the full resolved
    config (`quantize_config`). Use a new out_dir after changing a default on purpose."""
    if v.method == FP:
        return "-"
    return settings_digest({"config": Path(spec.quantize_config).name,
                            **quant_overrides(spec, v)}, 10)


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
    evaluate = evaluate or (lambda tm, task: evaluate_task(tm, task, progress=spec.progress))
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
                       "act_bits": v.act_bits, "variant": v.name,
                       "overrides": dict(v.overrides) if v.overrides else None,
                       **kv_settings(qcfg),
                       "quant_hash": qhash, "task": task.name, "category": task.category,
                       "metric": r["metric"], "value": r["value"],
                       "higher_is_better": r["higher_is_better"], "n": r.get("n"),
                       "se": r.get("se"), "chance": r.get("chance"),
                       "decoding": task.name.partition("@")[2] or None,
                       "tokens_per_step": r.get("tokens_per_step"),
                       "eval_s": time.time() - t1, "quantize_s": make_s,
                       "task_spec": spec_dict(task), "quantize_config": qcfg, "result": r}
                append_line(path, rec)
                done[rec["key"]] = rec
                ran += 1
                _log(f"  {task.name}: {r['metric']} = {r['value']:.4f} "
                     f"({time.time() - t1:.1f}s)")
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
    _log(f"ran {ran} cells in {time.time() - t_start:.1f}s; table: {out / 'table.md'}")
    return {"out_dir": str(out), "records": records, "table": table,
            "plots": [str(p) for p in plots], "ran": ran}


def evaluate_task(tm, task: TaskSpec, *, progress: bool = True) -> dict:
    """`tasks.run_task` plus the decoding figures of its generation (`tokens_per_step`,
    `forward_passes`; TextModel.take_decode_stats), when the model keeps them."""
    from qdlm_jax.evals.tasks import run_task
    take = getattr(tm, "take_decode_stats", None)
    if take is not None:
        take()  # drop counts from before this task
    r = run_task(tm, task, progress=progress)
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


def _make_variant(spec: StudySpec, model: str, v: Variant, fp_tm):
    import dataclasses

    from qdlm_jax.evals.backends import load_text_model
    if v.method == FP:
        return load_text_model(model, dtype=spec.dtype)
    from qdlm_jax.jobs.quantize import quantize_from_config
    qmodel, _ = quantize_from_config(quantize_config(spec, model, v), model=fp_tm.model)
    return dataclasses.replace(fp_tm, model=qmodel, decode_counts={})


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
    tps = rec.get("tokens_per_step")
    if rec.get("decoding") and tps is not None:  # a decoded task: accuracy and parallelism
        return format_pm(v, se, ".1f", 100) + f" ({tps:.2f} tok/step)"
    if rec["higher_is_better"]:
        return format_pm(v, se, ".1f", 100)
    return format_pm(v, se, ".3f")


def _row(r: dict) -> tuple:
    """(model, method, weight bits, activation bits or None, extra row name or "") of a
    record."""
    return (r["model_name"], r["method"], r["bits"], r.get("act_bits"), r.get("variant") or "")


def _row_order(records: list[dict]) -> list[tuple]:
    """fp first, then weight-only rows, then weight-activation rows; within each, methods in
    first-seen order and bits descending, a method's extra rows (`wa_rows`) after its plain
    row of the same bits."""
    rows = list(dict.fromkeys(_row(r) for r in records))
    models = list(dict.fromkeys(r[0] for r in rows))
    methods = list(dict.fromkeys(r[1] for r in rows if r[1] != FP))
    extras = [""] + list(dict.fromkeys(r[4] for r in rows if r[4]))
    return sorted(rows, key=lambda r: (models.index(r[0]), r[1] != FP, r[3] is not None,
                                       methods.index(r[1]) if r[1] != FP else -1,
                                       -(r[2] or 0), extras.index(r[4])))


def _kv_text(kv: dict | None) -> str:
    """", or ", KV4" with what differs from per-head asymmetric K/V."""
    if not kv:
        return ""
    text = f", KV{kv['bits']}" + (" sym" if kv.get("sym") else "")
    if kv.get("granularity", "per_head") != "per_head":
        text += f" {kv['granularity']} {kv.get('group_size')}"
    return text


def _iaaq_text(ia: dict | None) -> str:
    """"", or " + IA-AQ (K,V; masked)": what IA-AQ searched and on which calibration."""
    if not ia:
        return ""
    grid = "" if (ia.get("grid"), ia.get("lowest")) == (10, 0.55) else \
        f", grid {ia.get('grid')} to {ia.get('lowest')}"
    return (f" + IA-AQ ({'K,V' if ia.get('search_keys') else 'V'}; "
            f"{ia.get('calibration')}{grid})")


def _bits_cell(bits, act_bits, kv: dict | None = None) -> str:
    if bits is None:
        return "–"
    return str(bits) if act_bits is None else f"W{bits}A{act_bits}{_kv_text(kv)}"


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
    first = {}  # row -> its first record: the row's K/V and IA-AQ settings
    for r in records:
        first.setdefault(_row(r), r)
    overridden = []
    for row in _row_order(records):
        model, method, bits, act_bits, extra = row
        cells = [_fmt(by.get((*row, t.name))) for t in tasks]
        r0 = first[row]
        label = "FP" if method == FP else method.upper() + _iaaq_text(r0.get("iaaq"))
        lines.append(f"| {model} | {label} | {_bits_cell(bits, act_bits, r0.get('kv'))} | "
                     + " | ".join(cells) + " |")
        if extra and r0.get("overrides") and extra not in [o[0] for o in overridden]:
            overridden.append((extra, f"{method}-w{bits}a{act_bits}+{extra}",
                               r0["overrides"]))
    models = sorted({r["model_name"]: r.get("model", r["model_name"]) for r in records}.items())
    unigrams = [(name, _unigram(path)) for name, path in models]
    lines.append("| *reference* | chance / unigram | – | " + " | ".join(
        _reference(t, records, unigrams) for t in tasks) + " |")
    notes = ["± is one standard error (over windows for the bound, binomial for accuracies); "
             "the reference row is what a model that knows nothing scores: chance for multiple "
             "choice (the mean of 1 / options over the items), about 0 for exact match and "
             "pass@1, and for bits/token the entropy of a unigram model fitted on the train "
             "split (a trained model must be below it)."]
    notes += [f"{name}: unigram reference {u:.3f} bits/token (its model card)."
              for name, u in unigrams if u is not None]
    if any(r.get("decoding") for r in records):
        notes.append("Columns `<task>@<setting>`: the task under Fast-dLLM decoding "
                     "(`<cache>-tau<threshold>` / `-f<factor>`), cells with the mean tokens "
                     "committed per forward pass; – where the row was not run that way.")
    notes += [f"Row {label} (`wa_rows`) sets, on top of the study's weight-activation "
              "settings: " + ", ".join(f"`{k}={v}`" for k, v in ov.items()) + "."
              for _, label, ov in overridden]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _reference(task: TaskSpec, records: list[dict],
               unigrams: Sequence[tuple[str, float | None]] = ()) -> str:
    if not task.higher_is_better:
        known = [f"{u:.3f}" + (f" ({name})" if len(unigrams) > 1 else "")
                 for name, u in unigrams if u is not None]
        return "unigram " + " / ".join(known) if known else "–"
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


def fp_can_do(task: TaskSpec, records: list[dict], model_name: str) -> bool:
    """Whether the fp model scores on `task` (accuracy at least 5 points above chance, or any
    bits/token); True when there is no fp record. Category means use these tasks only: a task
    the fp model scores 0 on carries no signal about what quantization did."""
    fp = [r for r in records if r["model_name"] == model_name and r["method"] == FP
          and r["task"] == task.name]
    if not fp or not task.higher_is_better:
        return True
    return fp[0]["value"] >= (fp[0].get("chance") or 0.0) + 0.05


def plot_model(records: list[dict], tasks: Sequence[TaskSpec], model: str, path: Path) -> Path:
    """Metric against bits per method, one panel per category (mean over the category's
    tasks the fp model can do, `fp_can_do`; accuracies in %), fp as a dashed horizontal
    line. Weight-only methods are solid lines at their weight bits; weight-activation
    methods (W<b>A<b>) dotted lines at b. PNG via Agg."""
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
    series = list(dict.fromkeys((r["method"], r.get("act_bits") is not None,
                                 r.get("variant") or "") for r in recs if r["method"] != FP))
    for ax, cat in zip(axes[0], cats):
        all_ctasks = [t for t in tasks if t.category == cat]
        ctasks = [t for t in all_ctasks if fp_can_do(t, recs, name)] or all_ctasks
        left_out = [t.name for t in all_ctasks if t not in ctasks]
        pct = ctasks[0].higher_is_better
        scale = 100.0 if pct else 1.0

        def mean_se_of(method, bits, wa=False, extra=""):
            """(category mean, its standard error) or (None, None)."""
            rs = [r for r in recs if r["method"] == method and r["bits"] == bits
                  and (r.get("act_bits") is not None) == wa
                  and (r.get("variant") or "") == extra
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
        for m, wa, extra in series:
            pts = [(b, *mean_se_of(m, b, wa, extra)) for b in all_bits]
            pts = [(b, y, e) for b, y, e in pts if y is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] or 0.0 for p in pts], capsize=3,
                            marker="s" if wa else "o", linestyle=":" if wa else "-",
                            label=(f"{m.upper()} W=A" if wa else m.upper())
                            + (f" +{extra}" if extra else ""))
                shown += [p[1] + s * (p[2] or 0.0) for p in pts for s in (-1, 1)]
        if shown:
            ax.set_ylim(*axis_limits(shown, percent=pct))
        ax.set_xticks(all_bits or [4])
        if all_bits:
            ax.set_xlim(max(all_bits) + 0.5, min(all_bits) - 0.5)  # fewer bits to the right
        ax.set_xlabel("bits (weights; W=A: weights and activations)"
                      if any(wa for _, wa, _ in series) else "weight bits")
        metric = ctasks[0].metric
        ylabel = f"{metric} (%)" if pct else f"{metric} (lower is better)"
        if len(ctasks) > 1:
            ylabel = f"mean {ylabel}"
        ax.set_ylabel(ylabel)
        ax.set_title(f"{CATEGORY_TITLES.get(cat, cat)}\n"
                     f"({', '.join(t.name for t in ctasks)})"
                     + (f"\nleft out (fp at chance): {', '.join(left_out)}" if left_out
                        else ""), fontsize=9)
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
