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

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the multi-process job (a no-op when already joined)."""
    coordinator = coordinator or os.environ.get("QDLM_COORDINATOR")
    if num_processes is None and os.environ.get("QDLM_NUM_PROCESSES"):
        num_processes = int(os.environ["QDLM_NUM_PROCESSES"])
    if process_id is None and os.environ.get("QDLM_PROCESS_ID"):
        process_id = int(os.environ["QDLM_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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
