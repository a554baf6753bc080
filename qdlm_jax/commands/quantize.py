"""qdlm quantize --config configs/quantize.py [--config.method=gptq --config.bits=3 ...]"""

from __future__ import annotations

NAME = "quantize"
DEFAULT_CONFIG = "configs/quantize.py"  # found under the project root from any directory
HELP = ("calibrate, quantize (rtn | gptq | awq weight-only; smoothquant | quarot | duquant "
        "weight-activation), evaluate FP vs quantized, save the packed model")


def add_arguments(p):
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="ml-collections config file (default: configs/quantize.py)")


def run(args, overrides):
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    from qdlm_jax.jobs.quantize import run as run_job

    cfg = apply_overrides(load_config_file(args.config), overrides)
    run_job(cfg)
    return 0
