"""The evaluation job (`qdlm eval`): one model on a list of tasks, results in a run directory.

`eval_spec(...)` resolves the tasks (built-in names, task files) and applies the command's
overrides (items per task, Fast-dLLM decoding, the chat template) before any model is loaded;
`run_eval(spec)` loads the model with its own tokenizer, runs every task (and lm-eval's, in
process, through the `qdlm-jax` adapter), prints one line per task and writes
`<out>/config.json` and `<out>/results.json`. The default `out` is
`runs/eval/<model>-<digest of the settings>`; a finished run of the same settings is never
replaced silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from qdlm_jax.checkpoints.load import resolve_checkpoint
from qdlm_jax.errors import ConfigOverrideError, DataSourceError
from qdlm_jax.evals.backends import load_text_model
from qdlm_jax.evals.tasks import LMTask, load_task_file, resolve_task, run_task, spec_dict
from qdlm_jax.fsutil import atomic_write_text, settings_digest
from qdlm_jax.jobs.quantize_spec import model_label

DECODING_KEYS = ("cache", "threshold", "factor", "chat_template")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    model: str  # checkpoint directory or hub id
    tasks: tuple  # TaskSpec, the command's overrides applied
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_args: str = ""  # extra qdlm-jax model args, e.g. "mc_num=32"
    lm_eval_include: str | None = None  # directory of extra lm-eval task YAMLs
    limit: int | None = None  # items per task (windows of an LM task)
    dtype: str = "float32"
    decoding: tuple[tuple[str, object], ...] = ()  # DECODING_KEYS given on the command line
    out: str | None = None  # run directory (default: runs/eval/<model>-<digest>)
    overwrite: bool = False
    progress: bool = True


def with_decoding(spec, cache=None, threshold=None, factor=None):
    """A generation task with Fast-dLLM's cache / threshold / factor set where given."""
    if getattr(spec, "gen", None) is None or (cache is None and threshold is None
                                              and factor is None):
        return spec
    gen = dataclasses.replace(
        spec.gen, cache=cache or spec.gen.cache,
        threshold=threshold if threshold is not None else spec.gen.threshold,
        factor=factor if factor is not None else spec.gen.factor)
    return dataclasses.replace(spec, gen=gen)


def limited(spec, limit: int | None):
    """`spec` with `limit` items (an LM task: windows)."""
    if limit is None:
        return spec
    if isinstance(spec, LMTask):
        return dataclasses.replace(spec, n_windows=limit)
    return dataclasses.replace(spec, limit=limit)


def eval_spec(*, model: str, tasks: str = "", task_files=(), lm_eval_tasks: str = "",
              limit: int | None = None, decoding: dict | None = None, **rest) -> EvalSpec:
    """The job's spec from the command's arguments (task names comma-separated); one clear
    error for an unknown task, a bad task file or no task at all."""
    specs = [resolve_task(t.strip(), "--tasks") for t in tasks.split(",") if t.strip()]
    for f in task_files:
        specs += load_task_file(f)
    lm_tasks = tuple(t.strip() for t in lm_eval_tasks.split(",") if t.strip())
    if not specs and not lm_tasks:
        raise ValueError("no tasks: give --tasks, --task-file or --lm-eval-tasks")
    decoding = {k: v for k, v in (decoding or {}).items() if v is not None}
    specs = [with_decoding(limited(s, limit), decoding.get("cache"),
                           decoding.get("threshold"), decoding.get("factor")) for s in specs]
    if decoding.get("chat_template") is not None:
        specs = [dataclasses.replace(s, chat_template=decoding["chat_template"])
                 if hasattr(s, "chat_template") else s for s in specs]
    return EvalSpec(model=model, tasks=tuple(specs), lm_eval_tasks=lm_tasks, limit=limit,
                    decoding=tuple((k, decoding[k]) for k in DECODING_KEYS if k in decoding),
                    **rest)


def settings_of(spec: EvalSpec) -> dict:
    """What the run directory's digest covers (and `config.json` records)."""
    settings = {"model": str(Path(spec.model).resolve()), "dtype": spec.dtype,
                "tasks": [spec_dict(s) for s in spec.tasks],
                "lm_eval_tasks": list(spec.lm_eval_tasks), "lm_eval_args": spec.lm_eval_args,
                "limit": spec.limit}
    if spec.decoding:  # (absent otherwise, so earlier runs keep their directory)
        settings["decoding"] = dict(spec.decoding)
    return settings


def run_eval(spec: EvalSpec) -> dict:
    """Runs the job (module docstring); returns the results written to results.json."""
    path = resolve_checkpoint(spec.model)
    spec = dataclasses.replace(spec, model=str(path))
    settings = settings_of(spec)
    out = Path(spec.out or Path("runs/eval") / f"{model_label(spec.model)}-"
                                                f"{settings_digest(settings, 8)}")
    if (out / "results.json").is_file() and not spec.overwrite:
        raise ConfigOverrideError(f"{out}: holds results of these settings already (pass "
                                  "--overwrite to run again, or --out for another directory)")
    tm = load_text_model(path, dtype=spec.dtype)
    print(f"tokenizer: {tm.tokenizer.describe()}", file=sys.stderr)
    atomic_write_text(out / "config.json", json.dumps(settings, indent=2))
    results = {"model": spec.model, "settings": settings, "tasks": {}}
    for task in spec.tasks:
        t0 = time.time()
        tm.take_decode_stats()
        try:
            r = run_task(tm, task, progress=spec.progress)
            r.update(tm.take_decode_stats())  # tokens_per_step of generation tasks
        except DataSourceError as e:
            raise ValueError(f"task {task.name}: {str(e).splitlines()[0]}") from None
        results["tasks"][task.name] = r
        where = (f", {r['n_windows']} windows x {r['seq_len']} tokens, {r['mc_num']} MC samples"
                 if "n_windows" in r else "")
        if "tokens_per_step" in r:
            where += f", {r['tokens_per_step']:.2f} tokens/step"
        print(f"{task.name:24s} {r['metric']:>15s} = {r['value']:.4f} ± {r['se']:.4f}  "
              f"(n={r['n']}{where}, {time.time() - t0:.1f}s)", flush=True)
    if spec.lm_eval_tasks:
        results["lm_eval"] = run_lm_eval(tm, spec)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return results


def run_lm_eval(tm, spec: EvalSpec) -> dict:
    """lm-eval's tasks through the `qdlm-jax` adapter, in process; prints lm-eval's table."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table, simple_parse_args_string

        from qdlm_jax.evals.lm_eval_adapter import QDLMJaxLM
    except ImportError as e:
        raise ValueError(f"--lm-eval-tasks needs lm-eval ({e}); install the `eval` extra: "
                         "pip install -e '.[eval]'") from None
    decoding = dict(spec.decoding)
    kw = simple_parse_args_string(spec.lm_eval_args) if spec.lm_eval_args else {}
    if decoding.get("cache") is not None:
        kw.update(use_cache=decoding["cache"] != "none", dual_cache=decoding["cache"] == "dual")
    kw.update({k: decoding[k] for k in ("threshold", "factor") if k in decoding})
    lm = QDLMJaxLM(text_model=tm, progress=spec.progress, **kw)
    chat = tm.chat_setting(decoding.get("chat_template") or "auto")
    manager = (TaskManager(include_path=spec.lm_eval_include) if spec.lm_eval_include
               else TaskManager())
    r = lm_eval.simple_evaluate(model=lm, tasks=list(spec.lm_eval_tasks), task_manager=manager,
                                limit=spec.limit, log_samples=False,
                                apply_chat_template=chat, fewshot_as_multiturn=chat)
    if r is None:
        raise ValueError(f"lm-eval returned no results for {list(spec.lm_eval_tasks)}")
    print(make_table(r), flush=True)  # task, metric, value and its standard error
    return r["results"]
