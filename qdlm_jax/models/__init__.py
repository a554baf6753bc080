"""Flax NNX dLLM transformer (LLaDA and Dream are configs of one model)."""
from qdlm_jax.models.capture import Capture
from qdlm_jax.models.config import ModelConfig, dream_7b, llada_8b
from qdlm_jax.models.dllm import DLLM, abstract_model, count_params, init_model, linear_names
from qdlm_jax.models.project import project, register_kernel_type
