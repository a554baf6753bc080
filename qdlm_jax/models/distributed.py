"""Several processes, one global mesh: `jax.distributed` across hosts.

Every process (a TPU VM worker, a GPU host, or a local CPU process in the tests) runs the same
program. `initialize` joins the job; afterwards `jax.devices()` lists every process's devices,
`models.sharding.make_mesh()` builds one global mesh over them, `load_model(..., mesh=mesh)`
has each process read only the checkpoint slices its devices hold, and the layer-wise PTQ runs
unchanged on the global arrays (XLA inserts the collectives). `gather_params` brings the
result to every host for writing (process 0 writes).

On a Cloud TPU pod slice or under SLURM, `initialize()` needs no arguments (JAX detects the
cluster); elsewhere pass the coordinator's `host:port`, the number of processes and this one's
index, or set QDLM_COORDINATOR, QDLM_NUM_PROCESSES and QDLM_PROCESS_ID. On CPU the
collectives use gloo.
"""

from __future__ import annotations

import os
import re
import warnings

import jax
import numpy as np


def forced_cpu_devices() -> int:
    """The number of CPU devices this process will have (`jax_num_cpu_devices`, else XLA_FLAGS'
    --xla_force_host_platform_device_count, else 1)."""
    n = jax.config.jax_num_cpu_devices
    if n and n > 0:
        return int(n)
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def prepare_cpu_runtime(num_devices: int | None = None) -> None:
    """Sizes the CPU runtime's thread pool for a job of `num_devices` CPU devices in all, over
    every process (default: this process's `forced_cpu_devices()`); call it before JAX's
    first computation.

    XLA's CPU client runs each device's program on a pool of max(cores, devices) threads, and
    jaxlib's LAPACK calls (triangular solve, Cholesky) split their work into tasks on that same
    pool and wait for them. When every device reaches such a call at once, which collectives
    make likely (GPTQ's 128 x 128 solves on a mesh synchronised by gloo), every pool thread
    waits for tasks no thread is free to run: the job hangs for good. A pool of twice the
    devices leaves threads free (the pool size is read from NPROC; one set by the user is kept).
    With 4 devices in one `--distributed` process the job hung in 2 of 7 runs, and in none of
    14 with the larger pool (docs/scale.md).

    The pool size also decides how Eigen splits a matmul's sum among threads, so it changes
    the last bits of results (and GPTQ's codes with them). Sized from the job's devices over
    all processes, it is the same in every process of a job and in a one-process run of the
    same global mesh: the layer-wise PTQ gives the same bits whatever the process layout."""
    os.environ.setdefault("NPROC", str(cpu_pool_for(num_devices or forced_cpu_devices())))


def cpu_pool_for(num_devices: int) -> int:
    """The CPU pool size a job of `num_devices` CPU devices needs: max(cores, 2 x devices)."""
    return max(os.cpu_count() or 1, 2 * num_devices)


class CpuPoolWarning(UserWarning):
    """The CPU client's thread pool is too small for this process's devices (a job on a mesh
    of them may stall for good; `prepare_cpu_runtime`)."""


def check_cpu_pool(local_devices: int) -> None:
    """Warns (`CpuPoolWarning`) when a process's `local_devices` CPU devices would share a pool
    of fewer than twice as many threads: the stall of `prepare_cpu_runtime`'s docstring, which
    needs the pool sized before JAX's first computation, so it can only be named here."""
    # the CPU client's pool: max(NPROC, else the cores, the devices)
    pool = max(int(os.environ.get("NPROC") or os.cpu_count() or 1), local_devices)
    if local_devices > 1 and pool < 2 * local_devices:
        warnings.warn(CpuPoolWarning(
            f"{local_devices} CPU devices in this process share a thread pool of {pool} "
            "threads: a job on a mesh of them can stall for good when every device reaches a "
            f"LAPACK call (GPTQ's solves) at once. Set NPROC={cpu_pool_for(local_devices)} "
            "in the environment, or call "
            "qdlm_jax.models.distributed.prepare_cpu_runtime() before JAX's first computation "
            "(docs/scale.md)."), stacklevel=3)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the multi-process job (a no-op when already joined). On CPU: gloo collectives and
    `prepare_cpu_runtime` for the job's devices (this process's times the processes)."""
    coordinator = coordinator or os.environ.get("QDLM_COORDINATOR")
    if num_processes is None and os.environ.get("QDLM_NUM_PROCESSES"):
        num_processes = int(os.environ["QDLM_NUM_PROCESSES"])
    if process_id is None and os.environ.get("QDLM_PROCESS_ID"):
        process_id = int(os.environ["QDLM_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        prepare_cpu_runtime(forced_cpu_devices() * (num_processes or 1))
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def to_host(tree):
    """`tree` with every array leaf as host numpy, those spanning processes gathered from all
    of them first (a collective: every process must call it, with the same tree)."""
    from jax.experimental import multihost_utils

    def host(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(leaf)

    return jax.tree.map(host, tree)


def gather_params(model_or_params) -> dict[str, np.ndarray]:
    """Every array leaf of a model's params (packed quantized leaves included), gathered from
    all processes to host numpy, keyed by its path; the same dict on every process."""
    from flax import nnx

    state = (model_or_params if isinstance(model_or_params, dict)
             else nnx.state(model_or_params, nnx.Param))
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(state))[0]}
