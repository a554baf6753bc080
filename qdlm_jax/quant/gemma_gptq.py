"""GPTQ of a DiffusionGemma model, layer by layer, with per-expert Hessians (thin driver).

    plan = gemma_plan(shapes, spec)                 every tensor: kind, share, action
    for part in [self-conditioning MLP, layer 0, layer 1, ...]:
        stats = gemma_layer_stats(model with every earlier part quantized, ...)
                                                    two-mode calibration: encoder over clean
                                                    prompts, decoder over noised canvases
                                                    (gemma_calibration); the routing is the
                                                    quantized upstream's
        dense linears the plan quantizes:  H = hessian(gram, tokens), gptq_core.gptq
        experts (layer i): the recorded rows sorted by expert (models.experts.sort_by_expert)
            gate_up:  gram_e of the rows routed to e, gptq_experts_core.gptq_experts
            down:     rows a_e = act(x G^_e) * (x U^_e) through the *quantized* gate_up,
                      their gram_e, gptq_experts
    check_coverage(plan, params, result)            CoverageError naming any departure

With `spec.method == "daq"` the same Hessians feed DAQ + ABMP instead of GPTQ
(`daq_core.daq_quantize`, settings `DAQOptions`): dense kernels -> `BinaryPlanesArray`,
experts -> `BinaryPlanesExperts` (each expert's planes from its own Hessian under the same
thin-expert rule: `gptq_experts_core.expert_hessian` gives H_e and its dampening).

Within a layer every dense linear sees the layer's input as the previous parts left it (the
attention, dense MLP and router inputs are recorded in one set of passes); the experts' down
projection sees the quantized gate_up's output, as GPTQ's sequential order within a block
does. Thin experts follow `ThinExperts` (gptq_experts_core); with its "all_tokens" fallback
each expert's all-token gram is computed from every recorded row through that expert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.experts import expert_project, gelu_tanh, sort_by_expert
from qdlm_jax.models.params import ParamPath, get_params, path_str
from qdlm_jax.quant.array_like import StackedExperts
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.coverage import CoveragePlan, check_coverage
from qdlm_jax.quant.daq_core import COMPENSATE, daq_quantize
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec, gemma_layer_stats
from qdlm_jax.quant.gemma_plan import (
    EXPERT_KINDS,
    GemmaPTQSpec,
    attach_act,
    forward_parts,
    gemma_plan,
    hook_name,
)
from qdlm_jax.quant.gptq_core import gptq, hessian
from qdlm_jax.quant.gptq_experts_core import (
    ThinExperts,
    expert_grams,
    expert_hessian,
    gptq_experts,
)
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts


@dataclasses.dataclass(frozen=True, kw_only=True)
class DAQOptions:
    """DAQ + ABMP's own settings (`daq_core.daq_planes`; bits and block come from the plan's
    weight spec, the dampening from `GemmaGPTQSettings`)."""

    ratio: float = 0.1  # ABMP: fraction of blocks moved up (and down) one plane
    iters: int = 15  # RSR rounds
    salient: float = 2.0  # DOR: weight of salient weights
    data_weight: bool = True  # Omega includes diag(H)
    compensate: str = "column"  # none | block | column
    refit: int = 1  # column compensation: scale refits on the values the loop met
    abmp_check: bool = True  # keep ABMP only where it lowers the layer's output error

    def __post_init__(self):
        if self.compensate not in COMPENSATE:
            raise ValueError(f"DAQOptions.compensate={self.compensate!r}: expected one of "
                             f"{COMPENSATE}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaGPTQSettings:
    """GPTQ's own settings beside the plan's `GemmaPTQSpec` (and DAQ's, for method daq)."""

    damp: float = 0.01  # fraction of mean diag(H) added to the diagonal
    block_size: int = 128
    thin: ThinExperts = ThinExperts()  # experts with few routed rows
    calib: GemmaCalibSpec = GemmaCalibSpec()
    daq: DAQOptions = DAQOptions()  # used when spec.method == "daq"


def _daq_array(w_out_in, h, weight, damp: float, options: DAQOptions) -> BinaryPlanesArray:
    """DAQ + ABMP of w [out, in] with Hessian h, packed as a kernel [in, out]."""
    r = daq_quantize(w_out_in, h, bits=weight.bits, block=weight.group_size, damp=damp,
                     **dataclasses.asdict(options))
    return BinaryPlanesArray.from_planes(r.signs, r.row, r.col, r.slot_block)


def _pack_dense(path, kernel, gram, tokens, spec: GemmaPTQSpec, s: GemmaGPTQSettings):
    w = spec.weight_for(path)
    w_out_in, h = jnp.asarray(kernel, jnp.float32).T, hessian(gram, tokens)
    if spec.method == "daq":
        return _daq_array(w_out_in, h, w, s.damp, s.daq)
    r = gptq(w_out_in, h, bits=w.bits, group_size=w.group_size, sym=w.sym, damp=s.damp,
             block_size=s.block_size)
    return QuantizedArray.from_codes(r.codes, r.scales, r.zeros, bits=w.bits,
                                     group_size=w.group_size, sym=w.sym,
                                     scale_dtype=spec.scale_dtype or kernel.dtype)


# Experts are quantized a group at a time, with at most about this many bytes of working
# set per group: per expert its float32 Gram matrix (4 in^2), its float32 weights (4 out in)
# and GPTQ's result before packing (int32 codes and float32 dequantized weights, 8 out in).
# At 26B-A4B's shapes: 6 experts a group for gate_up, 20 for down.
GROUP_BYTES = 2**29


def expert_group(n_in: int, n_out: int) -> int:
    """How many experts of kernels [in, out] are quantized together (`GROUP_BYTES`)."""
    return max(1, GROUP_BYTES // (4 * n_in * (n_in + 3 * n_out)))


def _pack_experts(kernels, rows, sizes, spec: GemmaPTQSpec, s: GemmaGPTQSettings,
                  all_rows=None):
    """(QuantizedExperts or, for daq, BinaryPlanesExperts; how each Hessian was formed) of
    kernels [E, in, out] given the expert-sorted input rows [M, in] (and, for the all-token
    rule, every expert's all-token (grams, counts)). Experts go a group at a time
    (`expert_group`), each group packed before the next (no unpacked codes of the whole
    layer). Scales are float32 unless the spec says otherwise (the kernels may come in the
    checkpoint's bf16)."""
    w = spec.weight
    n_experts, n_in, n_out = kernels.shape
    group = expert_group(n_in, n_out)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes))])
    scale_dtype = spec.scale_dtype or jnp.promote_types(kernels.dtype, jnp.float32)
    packed, planes, how = [], [], []
    for e0 in range(0, n_experts, group):
        e1 = min(e0 + group, n_experts)
        grams, counts = expert_grams(rows[offsets[e0]:offsets[e1]], sizes[e0:e1])
        all_grams = all_counts = None
        if s.thin.fallback == "all_tokens":
            all_grams, all_counts = (a[e0:e1] for a in all_rows)
        w_out_in = jnp.swapaxes(jnp.asarray(kernels[e0:e1], jnp.float32), 1, 2)
        if spec.method == "daq":
            for i in range(e1 - e0):
                h, damp, kind = expert_hessian(
                    grams[i], np.asarray(counts)[i], s.thin, s.damp,
                    all_gram=None if all_grams is None else all_grams[i],
                    all_count=None if all_counts is None else all_counts[i])
                planes.append(_daq_array(w_out_in[i], h, w, damp, s.daq))
                how.append(kind)
            continue
        results, part_how = gptq_experts(
            w_out_in, grams, counts, bits=w.bits, group_size=w.group_size, sym=w.sym,
            damp=s.damp, rule=s.thin, all_grams=all_grams, all_counts=all_counts,
            block_size=s.block_size)
        del grams
        packed.append(QuantizedExperts.from_codes(
            jnp.stack([r.codes for r in results]), jnp.stack([r.scales for r in results]),
            jnp.stack([r.zeros for r in results]), bits=w.bits, group_size=w.group_size,
            sym=w.sym, scale_dtype=scale_dtype))
        how += part_how
        del results
    if spec.method == "daq":
        return BinaryPlanesExperts.from_experts(planes), how
    return QuantizedExperts.concatenate(packed), how


def _expert_kernel(kernels, e: int) -> jax.Array:
    """Expert e's kernel [in, out] in float32 (dequantized when packed)."""
    if isinstance(kernels, StackedExperts):
        return kernels.expert(e).dequantize(jnp.float32)
    return jnp.asarray(kernels[e], jnp.float32)


def _all_token_grams(x, kernels_or_none, num_experts, inter=None):
    """Every recorded row through every expert (the "all_tokens" rule's grams): the rows
    themselves for gate_up, act(x G_e) * (x U_e) per expert for down (`kernels_or_none` the
    gate_up, float or packed)."""
    n = x.shape[0]
    if kernels_or_none is None:
        g = jnp.einsum("ti,tj->ij", x, x)
        return jnp.broadcast_to(g, (num_experts,) + g.shape), jnp.full((num_experts,), n)
    grams = []
    for e in range(num_experts):
        h = x @ _expert_kernel(kernels_or_none, e)
        a = gelu_tanh(h[:, :inter]) * h[:, inter:]
        grams.append(a.T @ a)
    return jnp.stack(grams), jnp.full((num_experts,), n)


def gptq_part(params: dict[ParamPath, object], paths: list[ParamPath], layer: int | None,
              stats, config, spec: GemmaPTQSpec, settings: GemmaGPTQSettings,
              expert_paths: set[ParamPath]) -> tuple[dict[ParamPath, object], dict]:
    """({path: packed}, {expert path: how each expert's Hessian was formed}) of one part (the
    dense kernels `paths`, and MoE layer `layer`'s planned expert tensors `expert_paths`)
    from its recorded statistics `stats` (`LayerStats`); `params` holds the part's float
    tensors."""
    out: dict[ParamPath, object] = {}
    how: dict[str, list[str]] = {}
    for p in paths:
        name = hook_name(p)
        if name not in stats.grams:
            raise ValueError(f"{path_str(p)}: no calibration input was recorded for "
                             f"{name} (modes={settings.calib.modes!r})")
        gram, tokens = stats.grams[name]
        out[p] = _pack_dense(p, params[p], gram, tokens, spec, settings)
    if layer is None:
        return out, how
    inter = config.moe_intermediate_size
    x, top_ids, _ = stats.experts[layer]
    x = x.astype(jnp.float32)
    _, token, sizes = sort_by_expert(top_ids, config.num_experts)
    rows = x[token]
    gu_path, down_path = ("layers", layer, "experts", "gate_up"), \
        ("layers", layer, "experts", "down")
    all_tok = settings.thin.fallback == "all_tokens"
    gate_up = params[gu_path]
    if gu_path in expert_paths:
        out[gu_path], how[path_str(gu_path)] = _pack_experts(
            gate_up, rows, sizes, spec, settings,
            _all_token_grams(x, None, config.num_experts) if all_tok else None)
    gu_hat = out.get(gu_path, gate_up)  # packed, or float in the stored dtype
    if down_path in expert_paths:  # its inputs through the quantized gate_up, in float32
        h = expert_project(rows, gu_hat, sizes)  # one expert dequantized at a time (CPU)
        a = gelu_tanh(h[:, :inter]) * h[:, inter:]
        out[down_path], how[path_str(down_path)] = _pack_experts(
            params[down_path], a, sizes, spec, settings,
            _all_token_grams(x, gu_hat, config.num_experts, inter) if all_tok else None)
    return out, how


def gptq_quantize_gemma(model: diffusion_gemma.DiffusionGemma, prompts, canvases,
                        spec: GemmaPTQSpec, settings: GemmaGPTQSettings = GemmaGPTQSettings(),
                        *, progress: bool = False
                        ) -> tuple[dict[ParamPath, object], CoveragePlan, dict]:
    """(quantized params, plan, {expert path: how each expert's Hessian was formed}) of a
    DiffusionGemma model calibrated on `prompts` [B, P] and their clean continuations
    `canvases` [B, L] (module docstring)."""
    if spec.weight is None:
        raise ValueError("gptq_quantize_gemma: spec.weight is None (16 bits): nothing to do")
    config = model.config
    params = get_params(model)
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, spec)
    experts = set(plan.paths(kinds=EXPERT_KINDS))
    out = dict(params)
    how: dict[str, list[str]] = {}
    for label, paths, layer in tqdm(forward_parts(config.num_layers, plan), desc=spec.method,
                                    disable=not progress, unit="part"):
        current = diffusion_gemma.model_from_params(config, out)
        stats = gemma_layer_stats(current, prompts, canvases, settings.calib,
                                  names=tuple(hook_name(p) for p in paths),
                                  expert_layers=() if layer is None else (layer,))
        packed, part_how = gptq_part(params, paths, layer, stats, config, spec, settings,
                                     experts)
        out.update(packed)
        how.update(part_how)
    attach_act(out, plan, spec.act)
    check_coverage(plan, params, out)
    return out, plan, how
