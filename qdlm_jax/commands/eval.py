"""qdlm eval --model PATH --tasks social_iqa,arithmetic [--task-file tasks.json] ...

Evaluates one model (HF dir, qdlm checkpoint or packed quantized checkpoint) on built-in
tasks, tasks from a JSON task file, and/or lm-evaluation-harness tasks (`--lm-eval-tasks`,
needs the `eval` extra). Writes `<out>/results.json` and prints one line per task
(`qdlm_jax.jobs.eval`).
"""

from __future__ import annotations

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


def run(args, overrides):
    from qdlm_jax.errors import ConfigOverrideError
    from qdlm_jax.jobs.eval import eval_spec, run_eval

    if overrides:
        raise ConfigOverrideError(f"{overrides[0]}: qdlm eval takes no --config overrides; "
                                  "use --task-file for task settings")
    spec = eval_spec(model=args.model, tasks=args.tasks, task_files=args.task_file,
                     lm_eval_tasks=args.lm_eval_tasks, limit=args.limit,
                     decoding={k: getattr(args, k) for k in ("cache", "threshold", "factor",
                                                            "chat_template")},
                     lm_eval_args=args.lm_eval_args, lm_eval_include=args.lm_eval_include,
                     dtype=args.dtype, out=args.out, overwrite=args.overwrite,
                     progress=not args.no_progress)
    run_eval(spec)
    return 0
