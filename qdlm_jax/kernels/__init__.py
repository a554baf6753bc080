"""Low-bit matmul kernels: one op, `qmatmul(x, w, act_bits=None, implementation=None)`,
with an XLA path (everywhere) and Pallas kernels for TPU (Mosaic) and GPU (Triton).

Importing this package binds the quantized types to their ops in `qdlm_jax.models.project`:
a linear layer whose kernel is a `QuantizedArray` or `BinaryPlanesArray` runs `qmatmul`, one whose
kernel is an
`ActKernel` runs its input stage and then projects with the inner weight (and, on k_proj /
v_proj, its K/V quantization inside attention); routed experts held as `QuantizedExperts`
run `expert_qmatmul` (the grouped kernels of `kernels.grouped`, or the XLA path), DAQ
experts (`BinaryPlanesExperts`) their XLA grouped matmul, through
`models.experts.expert_project`. The quantized
types themselves are plain data (`qdlm_jax.quant.qarray`, `qdlm_jax.quant.act_kernel`);
the root package `qdlm_jax` imports this package, so any quantized model finds its op however
the package is entered, and the implementation setting (a JAX config state in the jit key)
exists before the first trace.
`use_implementation("pallas_tpu", interpret=True)` switches a whole model. See docs/kernels.md.
"""

from qdlm_jax.kernels.common import Support, quantize_activations
from qdlm_jax.kernels.dispatch import (
    IMPLEMENTATIONS,
    Setting,
    current_setting,
    expert_qmatmul,
    platform_default,
    qmatmul,
    select_expert_implementation,
    select_implementation,
    set_implementation,
    use_implementation,
)
from qdlm_jax.models.experts import register_expert_kernel_type
from qdlm_jax.models.project import register_kernel_type
from qdlm_jax.quant.act_kernel import (
    ActKernel,
    act_expert_matmul,
    act_matmul,
    attention_stage,
    input_stage,
)
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts, experts_matmul

register_kernel_type(QuantizedArray, qmatmul)
register_kernel_type(BinaryPlanesArray, qmatmul)  # DAQ: served by the XLA path
register_kernel_type(ActKernel, act_matmul, input_stage, attention_stage)
register_expert_kernel_type(QuantizedExperts, expert_qmatmul)  # MoE experts: grouped kernels
register_expert_kernel_type(ActKernel, act_expert_matmul)  # experts with quantized inputs
register_expert_kernel_type(BinaryPlanesExperts, experts_matmul)  # DAQ experts: XLA path

__all__ = ["IMPLEMENTATIONS", "Setting", "Support", "current_setting", "expert_qmatmul",
           "platform_default", "qmatmul", "quantize_activations", "select_expert_implementation",
           "select_implementation", "set_implementation", "use_implementation"]
