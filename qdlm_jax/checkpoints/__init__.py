"""Checkpoints: `load_model`, the hub layouts (one module per family: tensor key map and
config.json mapping), safetensors I/O, the native orbax format, export back to the hub layout,
and random-weight checkpoints in the hub layouts (tests, benchmarks)."""
from qdlm_jax.checkpoints.hf import CheckpointDir, load_hf_params, save_hf
from qdlm_jax.errors import CheckpointError

__all__ = ["CheckpointDir", "CheckpointError", "load_hf_params", "save_hf"]
