"""Round-to-nearest PTQ of a DiffusionGemma model, and QuaRot with online Hadamard
transforms (thin driver).

    plan = gemma_plan(shapes of params, spec)             every tensor: kind, share, action
    quarot: W <- H^T W for every planned tensor [.., in, out] (each expert's own kernel), the
            tensor wrapped in ActKernel(transform=H): its input x becomes x H online, so
            (x H)(H^T W) = x W in float (`hadamard_rotate`); H the normalized Hadamard
            matrix of the input width (hadamard_core: K * 2^m, K a Paley order)
    dense kernels the plan quantizes -> QuantizedArray    (RTN per output channel and group)
    expert tensors the plan quantizes -> QuantizedExperts (RTN per expert, channel and group)
    with spec.act: each planned tensor's (rotated) inputs quantized too (W8A8, W4A8)
    check_coverage(plan, params, result)                  CoverageError naming any departure

The rotation is online rather than folded: DiffusionGemma's post-norms (after attention and
after each MLP) and the fused experts leave no place to fold a residual-stream rotation, so
every quantized linear rotates its own input. The rotation spreads an input outlier over all
channels, which is what 4- and 8-bit input quantization needs.

Nothing else changes: norms, router scales, layer scalars and the embedding are returned as
given. The model runs from the result (`models.diffusion_gemma.model_from_params`): dense
kernels through `project`, experts through `experts.expert_project`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.params import ParamPath, get_params, path_str
from qdlm_jax.quant.act_kernel import ActKernel, OnlineTransform
from qdlm_jax.quant.coverage import CoveragePlan, check_coverage
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, attach_act, gemma_plan
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts


def _quantize_each(params: dict[ParamPath, object], paths: list[ParamPath], quantize):
    out = {}
    for p in paths:
        try:
            out[p] = quantize(p, params[p])
        except ValueError as e:
            raise ValueError(f"{path_str(p)}: {e}") from None
    return out


def quantize_dense(params: dict[ParamPath, object], paths: list[ParamPath],
                   spec: GemmaPTQSpec) -> dict[ParamPath, QuantizedArray]:
    """{path: QuantizedArray} of the dense kernels [in, out] at `paths`."""
    return _quantize_each(params, paths, lambda p, k: QuantizedArray.quantize(
        k, spec.weight_for(p), scale_dtype=spec.scale_dtype))


def quantize_experts(params: dict[ParamPath, object], paths: list[ParamPath],
                     spec: GemmaPTQSpec) -> dict[ParamPath, QuantizedExperts]:
    """{path: QuantizedExperts} of the expert tensors [E, in, out] at `paths`."""
    return _quantize_each(params, paths, lambda p, k: QuantizedExperts.quantize(
        k, spec.weight_for(p), scale_dtype=spec.scale_dtype))


def hadamard_rotate(params: dict[ParamPath, object], paths: list[ParamPath]
                    ) -> dict[ParamPath, ActKernel]:
    """{path: ActKernel(weight=H^T W in float32, transform=H)} for the float kernels at
    `paths` (dense [in, out] or experts [E, in, out], each expert rotated on its own)."""
    t = OnlineTransform(kind="hadamard")
    out = {}
    for p in paths:
        k = jnp.asarray(params[p], jnp.float32)
        w = jax.vmap(t.pair_weight)(k) if k.ndim == 3 else t.pair_weight(k)
        out[p] = ActKernel(weight=w, transform=t)
    return out


def rtn_quantize_gemma(params: dict[ParamPath, object], spec: GemmaPTQSpec
                       ) -> tuple[dict[ParamPath, object], CoveragePlan]:
    """(quantized params, the plan they were checked against) of a flat DiffusionGemma param
    dict (module docstring): RTN, or with spec.method == "quarot" RTN of the rotated
    weights behind online Hadamard transforms."""
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, spec)
    out = dict(params)
    if spec.method == "quarot":
        rotated = hadamard_rotate(params, plan.paths())
        packed = _quantize_each({p: k.weight for p, k in rotated.items()}, list(rotated),
                                lambda p, w: (QuantizedExperts if w.ndim == 3 else
                                              QuantizedArray).quantize(
                                    w, spec.weight_for(p),
                                    scale_dtype=spec.scale_dtype or params[p].dtype))
        out.update({p: rotated[p].replace_weight(q) for p, q in packed.items()})
    else:
        out.update(quantize_dense(params, plan.paths("QuantizedArray"), spec))
        out.update(quantize_experts(params, plan.paths("QuantizedExperts"), spec))
    attach_act(out, plan, spec.act)
    check_coverage(plan, params, out)
    return out, plan


def rtn_quantize_gemma_model(model: diffusion_gemma.DiffusionGemma, spec: GemmaPTQSpec
                             ) -> tuple[diffusion_gemma.DiffusionGemma, CoveragePlan]:
    """`rtn_quantize_gemma` on a model: (the quantized model, the plan)."""
    qparams, plan = rtn_quantize_gemma(get_params(model), spec)
    return diffusion_gemma.model_from_params(model.config, qparams), plan


__all__ = ["hadamard_rotate", "quantize_dense", "quantize_experts", "rtn_quantize_gemma",
           "rtn_quantize_gemma_model"]
