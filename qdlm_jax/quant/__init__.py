"""Post-training quantization: quantizer, bit packing, `QuantizedArray`, calibration, the
weight-only (RTN, GPTQ, AWQ) and weight-activation (SmoothQuant, QuaRot, DuQuant) passes.

The quantized types are plain data; `qdlm_jax/__init__.py` imports `qdlm_jax.kernels`, which
binds them to their matmuls, so a model whose linear kernels are quantized runs from the
packed params however the package is entered. See docs/quantization.md.
"""
from qdlm_jax.quant.calibration import CalibSpec, build_calibration
from qdlm_jax.quant.gptq_core import GPTQResult, gptq
from qdlm_jax.quant.layerwise import PTQSpec, quantize_model
from qdlm_jax.quant.qarray import QuantizedArray, quantized_param_bytes
from qdlm_jax.quant.quantizer_core import (
    SUPPORTED_BITS,
    QuantParams,
    QuantSpec,
    compute_params,
    dequantize_codes,
    quantize_codes,
    rtn,
)
from qdlm_jax.quant.rtn import rtn_quantize_params
from qdlm_jax.quant.wa import WASpec, quantize_model_wa

__all__ = ["SUPPORTED_BITS", "CalibSpec", "GPTQResult", "PTQSpec", "QuantParams", "QuantSpec",
           "QuantizedArray", "WASpec", "build_calibration", "compute_params",
           "dequantize_codes", "gptq", "quantize_codes", "quantize_model", "quantize_model_wa",
           "quantized_param_bytes", "rtn", "rtn_quantize_params"]
