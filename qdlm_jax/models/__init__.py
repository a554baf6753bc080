"""Flax NNX dLLM transformer (LLaDA and Dream are configs of one model)."""
from qdlm_jax.models.capture import Capture
from qdlm_jax.models.config import ModelConfig, dream_7b, llada_8b
from qdlm_jax.models.dllm import DLLM, abstract_model, count_params, init_model, linear_names
from qdlm_jax.models.project import project, register_kernel_type

__all__ = ["DLLM", "Capture", "ModelConfig", "abstract_model", "count_params", "dream_7b",
           "init_model", "linear_names", "llada_8b", "project", "register_kernel_type"]
