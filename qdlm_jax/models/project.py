"""The projection function every linear layer of the model goes through.

`project(x, kernel, bias)` computes `x @ kernel + bias` with `kernel` stored as `[in, out]`.
Keeping one entry point means a quantized kernel type only has to be taught here to run the
whole model (forward pass, generation, scoring) from quantized params.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# Kernel types other than plain arrays register a matmul here: {type: fn(x, kernel) -> y}.
_KERNEL_MATMULS: dict[type, Callable[[jax.Array, Any], jax.Array]] = {}
# ... and optionally an input stage: {type: fn(x, kernel) -> (x', inner kernel)}.
_INPUT_STAGES: dict[type, Callable[[jax.Array, Any], tuple[jax.Array, Any]]] = {}
# ... and optionally an attention stage, keyed by the k_proj / v_proj kernel type:
# {type: fn(q, k, v, k_kernel, v_kernel) -> (q', k', v')} (K/V quantization, rotations).
_ATTENTION_STAGES: dict[type, Callable] = {}


def register_kernel_type(kernel_type: type, matmul: Callable[[jax.Array, Any], jax.Array],
                         input_stage: Callable[[jax.Array, Any], tuple[jax.Array, Any]]
                         | None = None, attention_stage: Callable | None = None):
    """Teaches `project` a new kernel type (e.g. a packed quantized weight).

    `input_stage(x, kernel) -> (x', inner)` is for kernels that transform their input first
    (an online rotation, activation quantization): `prepare_input` applies it, so a linear
    layer can record the input its weight really sees, then `project(x', inner)`.
    `attention_stage(q, k, v, k_kernel, v_kernel) -> (q, k, v)` runs inside attention after
    RoPE when the k_proj or v_proj kernel has this type (K/V quantization).
    """
    _KERNEL_MATMULS[kernel_type] = matmul
    if input_stage is not None:
        _INPUT_STAGES[kernel_type] = input_stage
    if attention_stage is not None:
        _ATTENTION_STAGES[kernel_type] = attention_stage


def attention_stage(q, k, v, k_kernel: Any, v_kernel: Any):
    """(q, k, v) after the stage registered for the k_proj or v_proj kernel's type (k after
    RoPE); identity for plain kernels."""
    stage = _ATTENTION_STAGES.get(type(k_kernel)) or _ATTENTION_STAGES.get(type(v_kernel))
    return (q, k, v) if stage is None else stage(q, k, v, k_kernel, v_kernel)


def prepare_input(x: jax.Array, kernel: Any) -> tuple[jax.Array, Any]:
    """(input after the kernel's input stage, kernel that multiplies it); identity for plain
    arrays and kernel types without an input stage."""
    stage = _INPUT_STAGES.get(type(kernel))
    return (x, kernel) if stage is None else stage(x, kernel)


def project(x: jax.Array, kernel: Any, bias: jax.Array | None = None) -> jax.Array:
    """y[..., out] = sum_in x[..., in] * kernel[in, out] (+ bias[out]), in x's dtype.

    Float kernels are cast to the activation dtype (the compute dtype) before the dot, as a
    mixed-precision model does; the dot accumulates in fp32.
    """
    matmul = _KERNEL_MATMULS.get(type(kernel))
    if matmul is not None:
        y = matmul(x, kernel)
    elif isinstance(kernel, (jax.Array, jax.core.Tracer)) or hasattr(kernel, "__array__"):
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype),
                       preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        raise TypeError(f"project: unsupported kernel type {type(kernel).__name__}; expected an "
                        "array or a type registered with register_kernel_type")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
