"""qdlm-jax: post-training quantization of diffusion LLMs (LLaDA, Dream) in JAX/Flax."""

from qdlm_jax.checkpoints.load import load_model, load_params
from qdlm_jax.models import Capture, DLLM, ModelConfig

__all__ = ["load_model", "load_params", "Capture", "DLLM", "ModelConfig"]
__version__ = "0.1.0"
