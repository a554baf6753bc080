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
from qdlm_jax.quant.block import GROUPS, PRODUCERS, fold, foldable, stage, weight
from qdlm_jax.quant.qarray import QuantizedArray

_search_scales = jax.jit(awq_core.search_scales,
                         static_argnames=("bits", "group_size", "sym", "n_grid", "block_fn",
                                          "grid"))
_search_clip = jax.jit(awq_core.search_clip,
                       static_argnames=("bits", "group_size", "sym", "n_grid", "max_shrink",
                                        "n_sample", "grid"))

def _sample_tokens(x, n_tokens: int, seed: int):
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n_tokens:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], n_tokens, replace=False))
    return x[jnp.asarray(idx)]


def quantize_block(block, runner, x, prefix: str, spec, pending: dict, *,
                   seed: int = 0) -> dict:
    """AWQ on one block in place (see module doc). Quantized weights are staged into
    `pending` (dequantized copies stay in the block until the caller installs them).
    Returns per-group search results."""
    ws = spec.weight
    info = {}
    for group in GROUPS:
        producer, kind = PRODUCERS[group]
        if not foldable(block, group, producer, kind):
            info[group[0]] = {"ratio": None, "note": "no exact fold (GQA): scales skipped"}
            continue
        _, cap = runner.run(x, (prefix + group[0],), weighted=False)
        xs = _sample_tokens(cap[prefix + group[0]], spec.awq_tokens, seed)
        weights = [weight(block, n).T.astype(jnp.float32) for n in group]
        s, ratio, _ = _search_scales(xs, weights, bits=ws.bits,
                                             group_size=ws.group_size, sym=ws.sym,
                                             n_grid=spec.awq_grid)
        fold(block, group, producer, kind, s)
        info[group[0]] = {"ratio": float(ratio)}
    # Clip search on the inputs each linear now sees, then quantize the whole block.
    for group in GROUPS:
        _, cap = runner.run(x, (prefix + group[0],), weighted=False)
        xs = _sample_tokens(cap[prefix + group[0]], spec.awq_tokens, seed)
        for name in group:
            kernel = weight(block, name)
            w = kernel.T.astype(jnp.float32)
            if spec.awq_clip:
                max_val = _search_clip(xs, w, bits=ws.bits, group_size=ws.group_size,
                                               sym=ws.sym, n_grid=spec.awq_grid)
                w = awq_core.apply_clip(w, max_val)
            codes, scale, zero = awq_core.awq_quantize_codes(w, bits=ws.bits,
                                                             group_size=ws.group_size,
                                                             sym=ws.sym)
            stage(block, name, QuantizedArray.from_codes(
                codes, scale, zero, bits=ws.bits, group_size=ws.group_size, sym=ws.sym,
                scale_dtype=kernel.dtype), pending)
    return info
