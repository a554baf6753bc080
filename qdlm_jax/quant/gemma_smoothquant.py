"""SmoothQuant of a DiffusionGemma model (thin driver): per-channel scales migrated from the
inputs into the weights where an exact fold exists, then RTN of the smoothed weights, with
the inputs quantized by `spec.act` (W8A8, W4A8).

    stats = gemma_layer_stats(fp model, every planned linear and MoE layer, rows=True)
                                   two-mode calibration (gemma_calibration), once, on the fp
                                   model as SmoothQuant calibrates
    for each group of kernels reading one input (gemma_awq's groups and producers):
        s_j = max_t |X_tj|^alpha / max_{members, out} |W_j,out|^(1 - alpha)   (smoothquant_core)
        fold: the producer divided by s, the members' input rows multiplied by s
    experts of layer i:
        gate_up: one s shared by every expert (they read one normed input: the norm
                 pre_feedforward_layernorm_2 absorbs it), max|W| over every expert's rows
        down, expert e: s_e from the activated rows a_e = act(x G_e) * (x U_e) routed to e
                 (expert e's up columns absorb 1/s_e); an expert with no routed row: s_e = 1
    RTN (gemma_rtn.quantize_dense / quantize_experts) of every planned tensor, attach_act,
    check_coverage

o_proj is not smoothed: the value norm (an RMS norm without a weight) stands between v_proj
and o_proj, so nothing can absorb 1/s (gemma_awq's docstring). Folding leaves the float
model's function unchanged (tested).
"""

from __future__ import annotations

import jax.numpy as jnp

from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.experts import gelu_tanh, sort_by_expert
from qdlm_jax.models.params import ParamPath, get_params
from qdlm_jax.quant.coverage import CoveragePlan, check_coverage
from qdlm_jax.quant.gemma_awq import fold_into, layer_groups, self_conditioning_groups
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec, gemma_layer_stats
from qdlm_jax.quant.gemma_plan import (
    GemmaPTQSpec,
    attach_act,
    forward_parts,
    gemma_plan,
    hook_name,
)
from qdlm_jax.quant.gemma_rtn import quantize_dense, quantize_experts
from qdlm_jax.quant.quantizer_core import exact_div
from qdlm_jax.quant.smoothquant_core import smooth_scales


def _absmax(rows) -> jnp.ndarray:
    return jnp.max(jnp.abs(jnp.asarray(rows, jnp.float32)), axis=0)


def smooth_experts(gate_up, down, x, top_ids, *, alpha: float):
    """(s_gate_up [H], s_down [E, I]) for experts gate_up [E, H, 2I], down [E, I, H] on
    their input rows x [N, H] routed by top_ids [N, k] (module docstring)."""
    num_experts, _, two_i = gate_up.shape
    inter = two_i // 2
    gu32, x = jnp.asarray(gate_up, jnp.float32), jnp.asarray(x, jnp.float32)
    s_gu = smooth_scales(_absmax(x), [gu32[e].T for e in range(num_experts)], alpha=alpha)
    _, token, sizes = sort_by_expert(top_ids, num_experts)
    rows = x[token]
    start, s_down = 0, []
    for e, n in enumerate(int(v) for v in sizes):
        if n == 0:
            s_down.append(jnp.ones((inter,), jnp.float32))
            continue
        h = rows[start:start + n] @ gu32[e]
        a = gelu_tanh(h[:, :inter]) * h[:, inter:]
        s_down.append(smooth_scales(_absmax(a), [jnp.asarray(down[e], jnp.float32).T],
                                    alpha=alpha))
        start += n
    return s_gu, jnp.stack(s_down)


def fold_experts(params: dict, layer: int, s_gu, s_down) -> None:
    """In place: the norm before the experts divided by s_gu, every expert's gate_up rows
    times s_gu; expert e's up columns divided by s_down[e], its down rows times it."""
    norm = ("layers", layer, "pre_feedforward_layernorm_2", "scale")
    gu_path, down_path = ("layers", layer, "experts", "gate_up"), ("layers", layer, "experts",
                                                                    "down")
    gu, dn = params[gu_path], params[down_path]
    inter = gu.shape[-1] // 2
    params[norm] = exact_div(params[norm].astype(jnp.float32), s_gu).astype(params[norm].dtype)
    g = gu.astype(jnp.float32) * s_gu[None, :, None]
    g = g.at[:, :, inter:].set(exact_div(g[:, :, inter:], s_down[:, None, :]))
    params[gu_path] = g.astype(gu.dtype)
    params[down_path] = (dn.astype(jnp.float32) * s_down[:, :, None]).astype(dn.dtype)


def smooth_gemma(model: diffusion_gemma.DiffusionGemma, prompts, canvases, plan: CoveragePlan,
                 *, alpha: float = 0.5, calib: GemmaCalibSpec = GemmaCalibSpec()
                 ) -> dict[ParamPath, object]:
    """The float params with every group of planned tensors smoothed and folded (module
    docstring); the float model computes the same function."""
    config = model.config
    params = get_params(model)
    parts = forward_parts(config.num_layers, plan)
    groups = []
    for _, paths, _ in parts:
        if paths and paths[0][0] == "self_conditioning":
            groups += self_conditioning_groups(paths)
        elif paths:
            groups += layer_groups(paths[0][1], paths)
    layers = tuple(layer for _, _, layer in parts if layer is not None)
    stats = gemma_layer_stats(model, prompts, canvases, calib,
                              names=tuple(hook_name(g.members[0]) for g in groups),
                              expert_layers=layers, rows=True)
    out = dict(params)
    for g in groups:
        if g.producer is None:
            continue
        s = smooth_scales(_absmax(stats.inputs[hook_name(g.members[0])]),
                          [jnp.asarray(params[m]).T for m in g.members], alpha=alpha)
        fold_into(out, g, s)
    experts = set(plan.paths("QuantizedExperts"))
    for layer in layers:
        if ("layers", layer, "experts", "gate_up") not in experts:
            continue
        x, top_ids, _ = stats.experts[layer]
        s_gu, s_down = smooth_experts(params[("layers", layer, "experts", "gate_up")],
                                      params[("layers", layer, "experts", "down")], x,
                                      top_ids, alpha=alpha)
        fold_experts(out, layer, s_gu, s_down)
    return out


def smoothquant_gemma(model: diffusion_gemma.DiffusionGemma, prompts, canvases,
                      spec: GemmaPTQSpec, *, alpha: float = 0.5,
                      calib: GemmaCalibSpec = GemmaCalibSpec()
                      ) -> tuple[dict[ParamPath, object], CoveragePlan]:
    """(quantized params, plan) of a DiffusionGemma model calibrated on `prompts` [B, P] and
    their clean continuations `canvases` [B, L] (module docstring)."""
    if spec.weight is None:
        raise ValueError("smoothquant_gemma: spec.weight is None (16 bits): nothing to do")
    params = get_params(model)
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, spec)
    out = smooth_gemma(model, prompts, canvases, plan, alpha=alpha, calib=calib)
    out.update(quantize_dense(out, plan.paths("QuantizedArray"), spec))
    out.update(quantize_experts(out, plan.paths("QuantizedExperts"), spec))
    attach_act(out, plan, spec.act)
    check_coverage(plan, params, out)
    return out, plan


__all__ = ["fold_experts", "smooth_experts", "smooth_gemma", "smoothquant_gemma"]
