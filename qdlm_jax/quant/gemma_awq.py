"""AWQ of a DiffusionGemma model, part by part, with every scale placed where an exact fold
exists (thin driver; the searches are `awq_core`'s).

    plan = gemma_plan(shapes, spec)
    for part in forward_parts(plan):          the self-conditioning MLP, then layer 0, 1, ...
        inputs = gemma_layer_stats(model with every earlier part quantized, rows=True)
                                              two-mode calibration (gemma_calibration): the
                                              encoder over clean prompts, the decoder over
                                              noised canvases with self-conditioning
        1. scale search of every group on the part's float weights (awq_core.search_scales)
        2. fold: the producer divided by s, the group's input rows multiplied by s (the float
           model computes the same function)
        3. clip search (awq_core.search_clip) on the group's input divided by s, for every
           linear except q_proj and k_proj (llm-awq's rule)
        4. quantize on llm-awq's grid into QuantizedArray / QuantizedExperts
    check_coverage(plan, params, result)

The groups of a layer, the producer that absorbs 1/s, and what the search scores:

    group                          producer (absorbs 1/s)              scored on
    q, k (and v on sliding layers) input_layernorm.scale               the stacked outputs
    o                              none: no scales (clip only)         -
    mlp gate, up                   pre_feedforward_layernorm.scale     the MLP's output
    mlp down                       mlp up's output columns             its output
    router proj (quantize_router)  router.scale                        its output
    experts gate_up, all experts   pre_feedforward_layernorm_2.scale   the routed experts'
                                   (one s shared by every expert:      combined output, with
                                   they read one normed input)         the recorded routing
    experts down, expert e         expert e's up columns (s_e each)    its output on its
                                                                       routed rows
    self-conditioning gate, up     self_conditioning.pre_norm.scale    the MLP's output
    self-conditioning down         its up's output columns             its output

o_proj gets no scales: between v_proj and o_proj stands the value norm (an RMS norm without
a weight), so v's output channels cannot absorb 1/s. The routed experts are scored on their
combined output as AutoAWQ does for Mixtral's experts (one scale for every expert's w1/w3,
the MoE block inspected). Expert e's rows are the (token, choice) rows routed to it; an expert
with no routed rows gets s_e = 1 and no clip search (llm-awq's grid applied to its weights as
they are). Each expert's rows are zero-padded to a power of two (`search_scales`' `n_valid`
keeps the means over the real rows), so the searches compile once per size bucket.

Departures from llm-awq (which has no DiffusionGemma): the attention's q/k/v group is scored
on its own outputs (the attention module runs differently in the two modes); the inputs are
the two-mode calibration's rows, with every earlier part already quantized (as the
layer-by-layer GPTQ); everything runs in fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.experts import gelu_tanh, moe_dense, sort_by_expert
from qdlm_jax.models.params import ParamPath, get_params, path_str
from qdlm_jax.quant import awq_core
from qdlm_jax.quant.coverage import CoveragePlan, check_coverage
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec, gemma_layer_stats
from qdlm_jax.quant.gemma_plan import (
    GemmaPTQSpec,
    attach_act,
    forward_parts,
    gemma_plan,
    hook_name,
)
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec, exact_div

NO_CLIP = ("q_proj", "k_proj")  # llm-awq never clips these (the q k^T product)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaAWQSettings:
    """AWQ's own settings beside the plan's `GemmaPTQSpec`."""

    n_grid: int = 20  # ratios of the scale search and shrink steps of the clip search
    clip: bool = True  # run the clip search
    calib: GemmaCalibSpec = GemmaCalibSpec()


@dataclasses.dataclass(frozen=True)
class Group:
    """Kernels [in, out] that read one input, and what absorbs 1/s: a norm's scale vector
    (`producer_kind` "norm"), a kernel's output columns ("linear"), or nothing (None: no
    scales). `inspect` is what the search scores: "linear" (the stacked outputs) or "mlp"
    (down(gelu(gate x) * up x) with `down` the MLP's float down kernel)."""

    members: tuple[ParamPath, ...]
    producer: ParamPath | None
    producer_kind: str | None
    inspect: str = "linear"
    down: ParamPath | None = None


def layer_groups(layer: int, paths: list[ParamPath]) -> list[Group]:
    """The dense groups of `layer` (module docstring) among its planned kernels `paths`."""
    def k(*p):
        return ("layers", layer, *p, "kernel")

    def norm(name):
        return ("layers", layer, name, "scale")

    attn = tuple(k("self_attn", n) for n in ("q_proj", "k_proj", "v_proj")
                 if k("self_attn", n) in paths)
    groups = [Group(attn, norm("input_layernorm"), "norm"),
              Group((k("self_attn", "o_proj"),), None, None),
              Group((k("mlp", "gate_proj"), k("mlp", "up_proj")),
                    norm("pre_feedforward_layernorm"), "norm", "mlp", k("mlp", "down_proj")),
              Group((k("mlp", "down_proj"),), k("mlp", "up_proj"), "linear"),
              Group((k("router", "proj"),), ("layers", layer, "router", "scale"), "norm")]
    return [g for g in groups if g.members and all(m in paths for m in g.members)]


def self_conditioning_groups(paths: list[ParamPath]) -> list[Group]:
    """The self-conditioning MLP's groups among the planned kernels `paths`."""
    def k(n):
        return ("self_conditioning", "mlp", n, "kernel")

    groups = [Group((k("gate_proj"), k("up_proj")), ("self_conditioning", "pre_norm", "scale"),
                    "norm", "mlp", k("down_proj")),
              Group((k("down_proj"),), k("up_proj"), "linear")]
    return [g for g in groups if all(m in paths for m in g.members)]


def fold_into(params: dict, group: Group, s: jax.Array) -> None:
    """In place: the producer of `group`'s input divided by s, its members' input rows
    multiplied by s (stored in each tensor's dtype)."""
    s = s.astype(jnp.float32)
    prod = params[group.producer]
    if group.producer_kind == "norm":
        params[group.producer] = exact_div(prod.astype(jnp.float32), s).astype(prod.dtype)
    else:
        params[group.producer] = exact_div(prod.astype(jnp.float32), s[None, :]
                                           ).astype(prod.dtype)
    for m in group.members:
        w = params[m]
        params[m] = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "n_grid", "inspect"))
def _search(x, kernels, down, n_valid, *, bits, group_size, sym, n_grid, inspect):
    """search_scales for kernels [in, out] reading rows x [N, in] (module docstring)."""
    weights = [k.T.astype(jnp.float32) for k in kernels]
    block_fn = None
    if inspect == "mlp":
        def block_fn(xf, ws):
            return (gelu_tanh(xf @ ws[0].T) * (xf @ ws[1].T)) @ down.astype(jnp.float32)
    return awq_core.search_scales(x, weights, bits=bits, group_size=group_size, sym=sym,
                                  n_grid=n_grid, block_fn=block_fn, n_valid=n_valid)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "n_grid"))
def _search_experts(x, gate_up, down, top_ids, top_weights, *, bits, group_size, sym,
                    n_grid):
    """One input scale for every expert's gate_up, scored on the routed experts' combined
    output (moe_dense with the float down kernels and the recorded routing)."""
    weights = [w.T.astype(jnp.float32) for w in gate_up]
    down = down.astype(jnp.float32)

    def block_fn(xf, ws):
        return moe_dense(xf, jnp.stack([w.T for w in ws]), down, top_ids, top_weights)

    return awq_core.search_scales(x, weights, bits=bits, group_size=group_size, sym=sym,
                                  n_grid=n_grid, block_fn=block_fn)


_search_clip = jax.jit(awq_core.search_clip,
                       static_argnames=("bits", "group_size", "sym", "n_grid", "max_shrink",
                                        "n_sample", "grid"))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def _codes(w, *, bits, group_size, sym):
    return awq_core.awq_quantize_codes(w, bits=bits, group_size=group_size, sym=sym)


def clip_and_codes(kernel: jax.Array, x: jax.Array | None, weight: QuantSpec, *, clip: bool,
                   n_grid: int):
    """(codes, scale, zero) of kernel [in, out] on llm-awq's grid, after the clip search on
    its (scaled) input rows x [N, in] when `clip` and x is given."""
    w = kernel.T.astype(jnp.float32)
    if clip and x is not None:
        max_val = _search_clip(x, w, bits=weight.bits, group_size=weight.group_size,
                               sym=weight.sym, n_grid=n_grid)
        w = awq_core.apply_clip(w, max_val.astype(kernel.dtype).astype(jnp.float32))
    return _codes(w, bits=weight.bits, group_size=weight.group_size, sym=weight.sym)


def _bucket(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _padded(rows: jax.Array, n: int) -> jax.Array:
    return jnp.pad(rows, ((0, _bucket(n) - n), (0, 0)))


@dataclasses.dataclass
class ExpertsAWQ:
    """AWQ of one MoE layer: packed experts, the shared gate_up scale [H] (to divide the
    norm by), the per-expert down scales [E, I], and each expert's routed row count."""

    gate_up: QuantizedExperts
    down: QuantizedExperts
    s_gate_up: jax.Array
    s_down: jax.Array
    rows: jax.Array


def awq_experts(gate_up: jax.Array, down: jax.Array, x: jax.Array, top_ids: jax.Array,
                top_weights: jax.Array, weight: QuantSpec, *, n_grid: int = 20,
                clip: bool = True, scale_dtype=None, pack_gate_up: bool = True,
                pack_down: bool = True) -> ExpertsAWQ:
    """AWQ of the experts gate_up [E, H, 2I], down [E, I, H] on their input rows x [N, H]
    routed by top_ids / top_weights [N, k] (module docstring). A member not packed comes
    back folded and float (for a plan that keeps it)."""
    num_experts, _, two_i = gate_up.shape
    inter = two_i // 2
    x = x.astype(jnp.float32)
    gu32, down32 = gate_up.astype(jnp.float32), down.astype(jnp.float32)
    ws = dict(bits=weight.bits, group_size=weight.group_size, sym=weight.sym, n_grid=n_grid)
    s_gu = jnp.ones((gate_up.shape[1],), jnp.float32)
    if pack_gate_up:
        s_gu, _, _ = _search_experts(x, gu32, down32, top_ids, top_weights, **ws)
    _, token, sizes = sort_by_expert(top_ids, num_experts)
    sorted_x = x[token]
    counts = [int(n) for n in sizes]
    starts = [sum(counts[:e]) for e in range(num_experts)]
    s_down, x_e, a_e = [], [], []
    for e in range(num_experts):
        n = counts[e]
        rows = sorted_x[starts[e]:starts[e] + n]
        h = rows @ gu32[e]
        a = gelu_tanh(h[:, :inter]) * h[:, inter:]
        x_e.append(rows)
        a_e.append(a)
        if n == 0 or not pack_down:
            s_down.append(jnp.ones((inter,), jnp.float32))
            continue
        s, _, _ = _search(_padded(a, n), (down32[e],), None, n, inspect="linear", **ws)
        s_down.append(s)
    s_down = jnp.stack(s_down)
    # fold: gate_up rows * s_gu, each expert's up columns / s_e, down rows * s_e
    gu_f = gu32 * s_gu[None, :, None]
    gu_f = gu_f.at[:, :, inter:].set(exact_div(gu_f[:, :, inter:], s_down[:, None, :]))
    down_f = down32 * s_down[:, :, None]
    out = {}
    for name, kernels, inputs, scale, pack in (
            ("gate_up", gu_f, x_e, lambda e: s_gu, pack_gate_up),
            ("down", down_f, a_e, lambda e: s_down[e], pack_down)):
        if not pack:
            out[name] = kernels.astype(gate_up.dtype)
            continue
        codes, scales, zeros = [], [], []
        for e in range(num_experts):
            n = counts[e]
            xs = None if n == 0 else _padded(exact_div(inputs[e], scale(e)[None, :]), n)
            c, sc, z = clip_and_codes(kernels[e].astype(gate_up.dtype), xs, weight, clip=clip,
                                      n_grid=n_grid)
            codes.append(c)
            scales.append(sc)
            zeros.append(z)
        out[name] = QuantizedExperts.from_codes(
            jnp.stack(codes), jnp.stack(scales), jnp.stack(zeros), bits=weight.bits,
            group_size=weight.group_size, sym=weight.sym,
            scale_dtype=scale_dtype or gate_up.dtype)
    return ExpertsAWQ(gate_up=out["gate_up"], down=out["down"], s_gate_up=s_gu,
                      s_down=s_down, rows=jnp.asarray(counts))


def _quantize_groups(params: dict, out: dict, groups: list[Group], inputs: dict,
                     spec: GemmaPTQSpec, settings: GemmaAWQSettings) -> dict[str, float]:
    """Steps 1-4 for the dense groups of one part; `out` is updated in place (folded
    producers, packed members). Returns {first member: the chosen ratio}."""
    feats = {g: inputs[hook_name(g.members[0])].astype(jnp.float32) for g in groups}
    found, ratios = [], {}
    for g in groups:
        if g.producer is None:
            continue
        down = None if g.down is None else params[g.down]
        w = spec.weight_for(g.members[0])  # a router is alone in its group
        s, ratio, _ = _search(feats[g], tuple(params[m] for m in g.members), down, None,
                              inspect=g.inspect, bits=w.bits, group_size=w.group_size,
                              sym=w.sym, n_grid=settings.n_grid)
        found.append((g, s))
        ratios[path_str(g.members[0])] = float(ratio)
    for g, s in found:
        fold_into(out, g, s)
        feats[g] = exact_div(feats[g], s[None, :])
    for g in groups:
        for m in g.members:
            w = spec.weight_for(m)
            clip = settings.clip and m[-2] not in NO_CLIP
            codes, scale, zero = clip_and_codes(out[m], feats[g], w, clip=clip,
                                                n_grid=settings.n_grid)
            out[m] = QuantizedArray.from_codes(codes, scale, zero, bits=w.bits,
                                               group_size=w.group_size, sym=w.sym,
                                               scale_dtype=spec.scale_dtype or params[m].dtype)
    return ratios


def awq_quantize_gemma(model: diffusion_gemma.DiffusionGemma, prompts, canvases,
                       spec: GemmaPTQSpec, settings: GemmaAWQSettings = GemmaAWQSettings(),
                       *, progress: bool = False
                       ) -> tuple[dict[ParamPath, object], CoveragePlan, dict]:
    """(quantized params, plan, info) of a DiffusionGemma model calibrated on `prompts`
    [B, P] and their clean continuations `canvases` [B, L] (module docstring). `info`:
    {"ratios": {first kernel of a group: the chosen ratio}, "empty_experts": {expert path:
    experts with no routed row}}."""
    if spec.weight is None:
        raise ValueError("awq_quantize_gemma: spec.weight is None (16 bits): nothing to do")
    config = model.config
    params = get_params(model)
    plan = gemma_plan({p: tuple(v.shape) for p, v in params.items()}, spec)
    experts = plan.paths("QuantizedExperts")
    out = dict(params)
    info: dict = {"ratios": {}, "empty_experts": {}}
    for _, paths, layer in tqdm(forward_parts(config.num_layers, plan), desc="awq",
                                    disable=not progress, unit="part"):
        if paths and paths[0][0] == "self_conditioning":
            groups = self_conditioning_groups(paths)
        else:
            groups = layer_groups(layer if layer is not None else paths[0][1], paths)
        missing = sorted(set(paths) - {m for g in groups for m in g.members})
        if missing:
            raise ValueError(f"awq_quantize_gemma: {path_str(missing[0])} is planned but "
                             "belongs to no AWQ group")
        current = diffusion_gemma.model_from_params(config, out)
        stats = gemma_layer_stats(current, prompts, canvases, settings.calib,
                                  names=tuple(hook_name(g.members[0]) for g in groups),
                                  expert_layers=() if layer is None else (layer,), rows=True)
        info["ratios"].update(_quantize_groups(params, out, groups, stats.inputs, spec,
                                               settings))
        if layer is None:
            continue
        gu_path = ("layers", layer, "experts", "gate_up")
        down_path = ("layers", layer, "experts", "down")
        x, top_ids, top_weights = stats.experts[layer]
        r = awq_experts(params[gu_path], params[down_path], x, top_ids, top_weights,
                        spec.weight, n_grid=settings.n_grid, clip=settings.clip,
                        scale_dtype=spec.scale_dtype, pack_gate_up=gu_path in experts,
                        pack_down=down_path in experts)
        norm = ("layers", layer, "pre_feedforward_layernorm_2", "scale")
        out[norm] = exact_div(out[norm].astype(jnp.float32), r.s_gate_up).astype(
            out[norm].dtype)
        out[gu_path], out[down_path] = r.gate_up, r.down
        empty = [e for e, n in enumerate(r.rows.tolist()) if n == 0]
        if empty:
            info["empty_experts"][path_str(gu_path)] = empty
    attach_act(out, plan, spec.act)
    check_coverage(plan, params, out)
    return out, plan, info


__all__ = ["ExpertsAWQ", "GemmaAWQSettings", "Group", "awq_experts", "awq_quantize_gemma",
           "clip_and_codes", "fold_into", "layer_groups", "self_conditioning_groups"]
