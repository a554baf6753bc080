"""qdlm eval --model PATH --tasks social_iqa,arithmetic [--task-file tasks.json] ...

Evaluates one model (HF dir, qdlm checkpoint or packed quantized checkpoint) on built-in
tasks, tasks from a JSON task file, and/or lm-evaluation-harness tasks (`--lm-eval-tasks`,
needs the `eval` extra). Writes `<out>/results.json` and prints one line per task.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

NAME = "eval"
HELP = "evaluate one model on a list of tasks (LM bound, multiple choice, math, code, lm-eval)"


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="checkpoint directory (fp or quantized) or hub id")
    p.add_argument("--tasks", default="",
                   help="comma-separated built-in task names (see docs/evaluation.md)")
    p.add_argument("--task-file", action="append", default=[],
                   help="JSON file with one task object or a list of them (repeatable)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task (overrides each task's limit / n_windows)")
    p.add_argument("--lm-eval-tasks", default="",
                   help="comma-separated lm-evaluation-harness task names")
    p.add_argument("--lm-eval-include", default=None,
                   help="directory of extra lm-eval task YAMLs (e.g. local-JSON tasks)")
    p.add_argument("--lm-eval-args", default="",
                   help="extra qdlm-jax model args, e.g. mc_num=32,gen_length=64")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default=None,
                   help="chat template for every task's prompts (default: each task's "
                        "setting, `auto`: on for an instruct checkpoint whose tokenizer has a "
                        "template); lm-eval tasks get --apply_chat_template and few-shot "
                        "examples as turns when it is on")
    p.add_argument("--out", default=None,
                   help="output dir (default: runs/eval/<model name>-<hash of the model path "
                        "and task settings>, holding config.json and results.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run with the same settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default=None,
                   help="Fast-dLLM KV cache for every generation task (and lm-eval's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="Fast-dLLM confidence threshold tau in (0, 1] for every generation task")
    p.add_argument("--factor", type=float, default=None,
                   help="Fast-dLLM factor rule f > 0 for every generation task (not with "
                        "--threshold)")


def with_decoding(spec, args):
    """A generation task with the command's --cache / --threshold / --factor set (others
    unchanged)."""
    import dataclasses
    if getattr(spec, "gen", None) is None or (args.cache is None and args.threshold is None
                                              and args.factor is None):
        return spec
    gen = dataclasses.replace(
        spec.gen, cache=args.cache or spec.gen.cache,
        threshold=args.threshold if args.threshold is not None else spec.gen.threshold,
        factor=args.factor if args.factor is not None else spec.gen.factor)
    return dataclasses.replace(spec, gen=gen)


def _limited(spec, limit):
    import dataclasses

    from qdlm_jax.evals.tasks import LMTask
    if limit is None:
        return spec
    if isinstance(spec, LMTask):
        return dataclasses.replace(spec, n_windows=limit)
    return dataclasses.replace(spec, limit=limit)


def run(args, overrides):
    import dataclasses

    if overrides:
        from qdlm_jax.errors import ConfigOverrideError
        raise ConfigOverrideError(f"{overrides[0]}: qdlm eval takes no --config overrides; "
                                  "use --task-file for task settings")
    from qdlm_jax.errors import ConfigOverrideError, DataSourceError
    from qdlm_jax.evals.backends import load_text_model
    from qdlm_jax.evals.tasks import load_task_file, resolve_task, run_task, spec_dict
    from qdlm_jax.fsutil import atomic_write_text, settings_digest
    from qdlm_jax.jobs.quantize import model_label

    specs = [resolve_task(t.strip(), "--tasks") for t in args.tasks.split(",") if t.strip()]
    for f in args.task_file:
        specs += load_task_file(f)
    lm_tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    if not specs and not lm_tasks:
        raise ValueError("no tasks: give --tasks, --task-file or --lm-eval-tasks")
    specs = [with_decoding(_limited(s, args.limit), args) for s in specs]
    if args.chat_template is not None:
        specs = [dataclasses.replace(s, chat_template=args.chat_template)
                 if hasattr(s, "chat_template") else s for s in specs]
    settings = {"model": str(Path(args.model).resolve()), "dtype": args.dtype,
                "tasks": [spec_dict(s) for s in specs], "lm_eval_tasks": lm_tasks,
                "lm_eval_args": args.lm_eval_args, "limit": args.limit}
    decoding = {k: getattr(args, k) for k in ("cache", "threshold", "factor", "chat_template")
                if getattr(args, k) is not None}
    if decoding:  # (absent otherwise, so earlier runs keep their directory)
        settings["decoding"] = decoding
    digest = settings_digest(settings, 8)
    out = Path(args.out or Path("runs/eval") / f"{model_label(args.model)}-{digest}")
    if (out / "results.json").is_file() and not args.overwrite:
        raise ConfigOverrideError(f"{out}: holds results of these settings already (pass "
                                  "--overwrite to run again, or --out for another directory)")
    tm = load_text_model(args.model, dtype=args.dtype)
    print(f"tokenizer: {tm.tokenizer.describe()}", file=sys.stderr)
    atomic_write_text(out / "config.json", json.dumps(settings, indent=2))
    results = {"model": args.model, "settings": settings, "tasks": {}}
    for spec in specs:
        t0 = time.time()
        tm.take_decode_stats()
        try:
            r = run_task(tm, spec, progress=not args.no_progress)
            r.update(tm.take_decode_stats())  # tokens_per_step of generation tasks
        except DataSourceError as e:
            raise ValueError(f"task {spec.name}: {str(e).splitlines()[0]}") from None
        results["tasks"][spec.name] = r
        where = (f", {r['n_windows']} windows x {r['seq_len']} tokens, {r['mc_num']} MC samples"
                 if "n_windows" in r else "")
        if "tokens_per_step" in r:
            where += f", {r['tokens_per_step']:.2f} tokens/step"
        print(f"{spec.name:24s} {r['metric']:>15s} = {r['value']:.4f} ± {r['se']:.4f}  "
              f"(n={r['n']}{where}, {time.time() - t0:.1f}s)", flush=True)
    if lm_tasks:
        results["lm_eval"] = _run_lm_eval(tm, lm_tasks, args)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return 0


def _run_lm_eval(tm, tasks, args):
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(f"--lm-eval-tasks needs lm-eval ({e}); install the `eval` extra: "
                         "pip install -e '.[eval]'") from None
    from lm_eval.utils import simple_parse_args_string

    from qdlm_jax.evals.lm_eval_adapter import QDLMJaxLM
    kw = simple_parse_args_string(args.lm_eval_args) if args.lm_eval_args else {}
    if args.cache is not None:
        kw.update(use_cache=args.cache != "none", dual_cache=args.cache == "dual")
    kw.update({k: v for k, v in (("threshold", args.threshold), ("factor", args.factor))
               if v is not None})
    lm = QDLMJaxLM(text_model=tm, progress=not args.no_progress, **kw)
    chat = tm.chat_setting(args.chat_template or "auto")
    manager = TaskManager(include_path=args.lm_eval_include) if args.lm_eval_include \
        else TaskManager()
    r = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                limit=args.limit, log_samples=False,
                                apply_chat_template=chat, fewshot_as_multiturn=chat)
    if r is None:
        raise ValueError(f"lm-eval returned no results for {tasks}")
    from lm_eval.utils import make_table
    print(make_table(r), flush=True)  # task, metric, value and its standard error
    return r["results"]
