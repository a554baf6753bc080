"""Round-to-nearest weight-only PTQ of a DiffusionGemma model (thin driver).

    plan = gemma_plan(shapes of params, spec)             every tensor: kind, share, action
    dense kernels the plan quantizes -> QuantizedArray    (RTN per output channel and group)
    expert tensors the plan quantizes -> QuantizedExperts (RTN per expert, channel and group)
    check_coverage(plan, params, result)                  CoverageError naming any departure

Nothing else changes: norms, router scales, layer scalars and the embedding are returned as
given. The model runs from the result (`models.diffusion_gemma.model_from_params`): dense
kernels through `project`, experts through `experts.expert_project`.
"""

from __future__ import annotations

from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.params import ParamPath, get_params, path_str
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


def rtn_quantize_gemma(params: dict[ParamPath, object], spec: GemmaPTQSpec
                       ) -> tuple[dict[ParamPath, object], CoveragePlan]:
    """(quantized params, the plan they were checked against) of a flat DiffusionGemma param
    dict (module docstring)."""
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, spec)
    out = dict(params)
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


__all__ = ["quantize_dense", "quantize_experts", "rtn_quantize_gemma",
           "rtn_quantize_gemma_model"]
