"""AWQ driver for the LLaDA / Dream block: search scales, fold them, clip, quantize.

For one block, as llm-awq does it (the math is in `awq_core.py`):

1. scales, group by group on the float weights, each group's input captured after the
   earlier groups' scales were folded in:
     q/k/v   <- attn_norm (RMSNorm weight gamma / s)
     o_proj  <- v_proj output channels (only when v and o have the same width, i.e. MHA:
                with GQA one v channel feeds several o inputs, so no exact fold exists)
     gate/up <- mlp_norm
     down    <- up_proj output channels
   The float block computes the same function after each fold.
2. clipping: per linear, the best per-(channel, group) max on its (scaled) inputs;
3. quantization of every linear on the AWQ grid into packed `QuantizedArray`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdlm_jax.quant import awq_core
from qdlm_jax.quant.act_kernel import inner_weight
from qdlm_jax.quant.layerwise import GROUPS, _set_kernel, _stage
from qdlm_jax.quant.qarray import QuantizedArray

_search_scales = jax.jit(awq_core.search_scales,
                         static_argnames=("bits", "group_size", "sym", "n_grid", "block_fn",
                                          "grid"))
_search_clip = jax.jit(awq_core.search_clip,
                       static_argnames=("bits", "group_size", "sym", "n_grid", "max_shrink",
                                        "n_sample", "grid"))

# group -> (producer of the group's input, kind)
_PRODUCERS = {
    ("q_proj", "k_proj", "v_proj"): ("attn_norm", "norm"),
    ("o_proj",): ("v_proj", "linear"),
    ("gate_proj", "up_proj"): ("mlp_norm", "norm"),
    ("down_proj",): ("up_proj", "linear"),
}


def _sample_tokens(x, n_tokens: int, seed: int):
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n_tokens:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], n_tokens, replace=False))
    return x[jnp.asarray(idx)]


def _kernel(block, name):
    return getattr(block, name).kernel[...]


def _foldable(block, group, producer, kind) -> bool:
    """Whether x / s has an exact fold into the producer (not v -> o under GQA, where one v
    channel feeds several o inputs)."""
    if kind == "norm":
        return True
    return (inner_weight(_kernel(block, producer)).shape[1]
            == inner_weight(_kernel(block, group[0])).shape[0])


def _fold(block, group, producer, kind, s):
    """x / s folded into the producer (norm weight, or a linear's output channels and bias),
    W * s into the group's weights: the float block is unchanged. Shared with SmoothQuant and
    DuQuant (`wa.py`), whose kernels may already carry an input stage (`ActKernel`)."""
    nxt = [inner_weight(_kernel(block, n)) for n in group]  # [in, out] kernels
    if kind == "norm":
        norm = getattr(block, producer)
        prev, new_next, _ = awq_core.fold_scales(norm.scale[...], nxt, s, layout="in_out")
        norm.scale.value = prev
    else:
        lin = getattr(block, producer)
        bias = None if lin.bias is None else lin.bias[...]
        prev, new_next, new_bias = awq_core.fold_scales(inner_weight(lin.kernel[...]), nxt, s,
                                                        prev_bias=bias, layout="in_out")
        _set_kernel(block, producer, prev)
        if bias is not None:
            lin.bias.value = new_bias
    for n, w in zip(group, new_next):
        _set_kernel(block, n, w)


def quantize_block(block, runner, x, prefix: str, spec, pending: dict, *,
                   seed: int = 0) -> dict:
    """AWQ on one block in place (see module doc). Quantized weights are staged into
    `pending` (dequantized copies stay in the block until the caller installs them).
    Returns per-group search results."""
    ws = spec.weight
    info = {}
    for group in GROUPS:
        producer, kind = _PRODUCERS[group]
        if not _foldable(block, group, producer, kind):
            info[group[0]] = {"ratio": None, "note": "no exact fold (GQA): scales skipped"}
            continue
        _, cap = runner.run(x, (prefix + group[0],), weighted=False)
        xs = _sample_tokens(cap[prefix + group[0]], spec.awq_tokens, seed)
        weights = [_kernel(block, n).T.astype(jnp.float32) for n in group]
        s, ratio, _ = _search_scales(xs, weights, bits=ws.bits,
                                             group_size=ws.group_size, sym=ws.sym,
                                             n_grid=spec.awq_grid)
        _fold(block, group, producer, kind, s)
        info[group[0]] = {"ratio": float(ratio)}
    # Clip search on the inputs each linear now sees, then quantize the whole block.
    for group in GROUPS:
        _, cap = runner.run(x, (prefix + group[0],), weighted=False)
        xs = _sample_tokens(cap[prefix + group[0]], spec.awq_tokens, seed)
        for name in group:
            kernel = _kernel(block, name)
            w = kernel.T.astype(jnp.float32)
            if spec.awq_clip:
                max_val = _search_clip(xs, w, bits=ws.bits, group_size=ws.group_size,
                                               sym=ws.sym, n_grid=spec.awq_grid)
                w = awq_core.apply_clip(w, max_val)
            codes, scale, zero = awq_core.awq_quantize_codes(w, bits=ws.bits,
                                                             group_size=ws.group_size,
                                                             sym=ws.sym)
            _stage(block, name, QuantizedArray.from_codes(
                codes, scale, zero, bits=ws.bits, group_size=ws.group_size, sym=ws.sym,
                scale_dtype=kernel.dtype), pending)
    return info
