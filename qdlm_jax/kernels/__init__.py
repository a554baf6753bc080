"""Low-bit matmul kernels: one op, `qmatmul(x, w, act_bits=None, implementation=None)`,
with an XLA path (everywhere) and Pallas kernels for TPU (Mosaic) and GPU (Triton).

`qdlm_jax.quant.qarray.quantized_matmul` (what every quantized linear layer calls) routes
through `qmatmul`, so `use_implementation("pallas_tpu", interpret=True)` switches a whole
model. See docs/kernels.md.
"""

from qdlm_jax.kernels.common import Support, quantize_activations
from qdlm_jax.kernels.dispatch import (IMPLEMENTATIONS, Setting, current_setting,
                                      platform_default, qmatmul, select_implementation,
                                      set_implementation, use_implementation)

__all__ = ["IMPLEMENTATIONS", "Setting", "Support", "current_setting", "platform_default",
           "qmatmul", "quantize_activations", "select_implementation", "set_implementation",
           "use_implementation"]
