"""qdlm quantize --config configs/quantize.py [--config.method=gptq --config.bits=3 ...]"""

from __future__ import annotations

import os

NAME = "quantize"
DEFAULT_CONFIG = "configs/quantize.py"  # found under the project root from any directory
HELP = ("calibrate, quantize (rtn | gptq | awq weight-only; smoothquant | quarot | duquant "
        "weight-activation), evaluate FP vs quantized, save the packed model")


def add_arguments(p):
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="ml-collections config file (default: configs/quantize.py)")
    g = p.add_argument_group(
        "several processes, one global mesh (docs/scale.md); every process runs the same "
        "command, process 0 writes the run")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process job; on a TPU pod slice or under SLURM nothing "
                        "else is needed (detected), elsewhere give the three flags below or "
                        "QDLM_COORDINATOR / QDLM_NUM_PROCESSES / QDLM_PROCESS_ID")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--mesh", default=None, metavar="DATAxMODEL",
                   help="quantize on a (data, model) mesh over every process's devices, e.g. "
                        "2x4 (default with --distributed: 1 x all devices)")


def run(args, overrides):
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    from qdlm_jax.jobs.quantize import run as run_job

    cfg = apply_overrides(load_config_file(args.config), overrides)
    distributed = args.distributed or any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if distributed:
        from qdlm_jax.models.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.mesh and os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        from qdlm_jax.models.distributed import prepare_cpu_runtime

        prepare_cpu_runtime()  # several CPU devices in one process: the same thread pool
    mesh = _mesh_shape(args.mesh) if args.mesh else ((1, 0) if distributed else None)
    run_job(cfg, mesh_shape=mesh)
    return 0


def _mesh_shape(text: str) -> tuple[int, int]:
    from qdlm_jax.errors import ConfigOverrideError

    try:
        data, model = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigOverrideError(f"--mesh {text}: expected DATAxMODEL, e.g. 2x4") from None
    return data, model
