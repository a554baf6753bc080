"""`load_model`: one entry point for HF checkpoint directories and our own checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from qdlm_jax.checkpoints import orbax_format as checkpoint
from qdlm_jax.checkpoints.hf import load_hf_params
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models.dllm import DLLM
from qdlm_jax.models.params import model_from_params
from qdlm_jax.models.sharding import param_sharding


def load_params(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
                progress: bool = False):
    """(config, flat params) from a HF checkpoint dir or a `qdlm convert` output."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    sharding_fn = param_sharding(mesh) if mesh is not None else None
    if checkpoint.is_qdlm_checkpoint(p):
        return checkpoint.load_checkpoint(p, dtype=dtype, sharding_fn=sharding_fn)
    if (p / "config.json").is_file():
        return load_hf_params(p, dtype=dtype, sharding_fn=sharding_fn, progress=progress)
    raise CheckpointError(f"{p}: not a model checkpoint (expected config.json of a Hugging Face "
                          f"checkpoint, or {checkpoint.CONFIG_FILE} of a `qdlm convert` output)")


def load_model(path: str | os.PathLike, *, dtype: str | None = None,
               mesh: Mesh | None = None, progress: bool = False) -> DLLM:
    """Loads a model. `dtype` ("float32"/"bfloat16") sets both param and compute dtype;
    `mesh` places every param straight onto its tensor-parallel sharding."""
    config, params = load_params(path, dtype=dtype, mesh=mesh, progress=progress)
    return model_from_params(config, params)
