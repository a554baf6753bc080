"""qdlm-jax: post-training quantization of diffusion LLMs (LLaDA, Dream) in JAX/Flax.

The names most scripts need (the README's Python section uses them): `load_model`,
`load_tokenizer`, `left_pad`, `generate` / `GenerationConfig`, `Capture`; quantization lives
in `qdlm_jax.quant` (`quantize_model`, `PTQSpec`, `QuantSpec`, `build_calibration`).
"""

import qdlm_jax.kernels  # noqa: F401  (binds the quantized types to their ops: kernels/)
from qdlm_jax.checkpoints.load import load_model, load_params, load_tokenizer
from qdlm_jax.inference.generate import GenerationConfig, generate, left_pad
from qdlm_jax.models import DLLM, Capture, ModelConfig

__all__ = ["load_model", "load_params", "load_tokenizer", "generate", "GenerationConfig",
           "left_pad", "Capture", "DLLM", "ModelConfig"]
__version__ = "0.1.0"
