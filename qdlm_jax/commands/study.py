"""qdlm study --config configs/study.py [--config.bits=8,4 --config.methods=rtn ...]"""

from __future__ import annotations

NAME = "study"
DEFAULT_CONFIG = "configs/study.py"  # found under the project root from any directory
HELP = ("the sweep bits x method x task x model (resumable; results.jsonl, table.md and "
        "plots in the run dir)")


def add_arguments(p):
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="ml-collections config file (default: configs/study.py)")


def run(args, overrides):
    from qdlm_jax.jobs.config_flags import load_config_file
    from qdlm_jax.jobs.study import apply_study_overrides, run_study, study_spec

    cfg = apply_study_overrides(load_config_file(args.config), overrides)
    result = run_study(study_spec(cfg))
    print(result["table"])
    for p in result["plots"]:
        print(f"plot: {p}")
    return 0
