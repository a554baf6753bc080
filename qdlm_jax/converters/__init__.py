"""HF/PyTorch checkpoint directories <-> our Flax params (LLaDA and Dream key maps)."""
from qdlm_jax.converters.hf import CheckpointDir, load_hf_params, save_hf
from qdlm_jax.converters.safetensors_io import CheckpointError
