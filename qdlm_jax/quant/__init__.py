"""Weight quantization: AutoGPTQ-grid quantizer, bit packing, `QuantizedArray`, RTN, GPTQ, AWQ.

Importing this package registers `QuantizedArray` with `qdlm_jax.models.project`, so a model
whose linear kernels are QuantizedArrays runs from the packed params. See
docs/quantization.md.
"""
from qdlm_jax.quant.gptq_core import (GPTQResult, HessianState, gptq, hessian_finalize,
                                      hessian_init, hessian_merge, hessian_psum,
                                      hessian_update)
from qdlm_jax.quant.qarray import QuantizedArray, quantized_matmul, quantized_param_bytes
from qdlm_jax.quant.quantizer_core import (QuantParams, QuantSpec, SUPPORTED_BITS,
                                           compute_params, dequantize_codes, quantize_codes,
                                           rtn)
from qdlm_jax.quant.rtn import rtn_quantize_params
