"""AWQ driver for the LLaDA / Dream block: search scales, fold them, clip, quantize.

For one block, as llm-awq's `run_awq` does it for these two families in the QDLM study (its
`auto_scale_block`, `apply_scale`, `auto_clip_block`; the math is in `awq_core.py`):

1. the float block runs once over the calibration set and every group's input is captured
   (llm-awq's ``input_feat``): all of it, every token;
2. the scale search of every group runs on those inputs and the unscaled block, scoring each
   candidate by the output of the module llm-awq inspects for the family:

     group     producer              LLaDA (module2inspect)    Dream (module2inspect)
     q/k/v     attn_norm (gamma / s)  the whole block            the attention module
     o_proj    v_proj out channels    o_proj                     o_proj
     gate/up   mlp_norm (gamma / s)   the whole block            the MLP
     down      up_proj out channels   down_proj                  down_proj

   As in llm-awq, an inspected module is run on the group's captured input: for LLaDA the
   whole block is fed the normed q/k/v input (and, for gate/up, the normed MLP input), with
   the attention bias for q/k/v and none for gate/up (llm-awq passes the block's kwargs only
   to the first). v -> o is searched only when v_proj and o_proj have the same shape (with
   GQA one v channel feeds several o inputs, so no exact fold exists; llm-awq skips it too);
3. the scales are folded (the float block computes the same function) and each captured
   input is divided by its scales, as llm-awq's `apply_scale` does to ``input_feat``;
4. clipping: every linear except q_proj and k_proj (llm-awq: "due to qk bmm, it is hard to
   clip precisely") gets its per-(channel, group) max from `awq_core.search_clip` on every
   (n // 512)-th of its scaled input tokens;
5. every linear is quantized on llm-awq's grid into a packed `QuantizedArray` (bit-equal
   codes, see awq_core).

Token use: llm-awq's, all captured tokens for the scale search and every (n // 512)-th for
the clip search. These are static shapes already, so the
JAX form has no fixed-size resampling. What still differs from llm-awq:

- Clip sampling for n < 512 tokens: llm-awq's slice step n // 512 is 0 there and it fails;
  here the step is 1 (every token). No effect where llm-awq runs at all.
- Arithmetic: the searches and the quantizer run in fp32 on the model's weights (bf16 for the
  hub checkpoints), the scaled inputs for clipping are divided in fp32; llm-awq runs them in
  the model's dtype (fp16/bf16 on GPU). The folded weights are stored in the model's dtype,
  as llm-awq's are. On fp32 inputs the pieces agree with llm-awq exactly (quantizer, clip) or
  to fp32 rounding (scale search: the same ratio, scales within ~3e-7 relative), see
  tests/quant/test_awq_core.py.
- The next block's calibration input is the quantized block's output (`layerwise`, shared
  with GPTQ); llm-awq feeds the next block the float block's output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qdlm_jax.quant import awq_core
from qdlm_jax.quant.block import GROUPS, PRODUCERS, fold, foldable, set_kernel, stage, weight
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import exact_div

_search_scales = jax.jit(awq_core.search_scales,
                         static_argnames=("bits", "group_size", "sym", "n_grid", "block_fn",
                                          "grid"))
_search_clip = jax.jit(awq_core.search_clip,
                       static_argnames=("bits", "group_size", "sym", "n_grid", "max_shrink",
                                        "n_sample", "grid"))

# Linears llm-awq never clips (auto_clip_block skips names with "q_", "k_").
NO_CLIP = ("q_proj", "k_proj")


def inspected_module(family: str, group: tuple) -> str:
    """What the scale search of `group` scores, as llm-awq's `module2inspect` for the family:
    "block" (the whole transformer block), "attention", "mlp", or "linear" (the group's own
    outputs)."""
    if group == ("q_proj", "k_proj", "v_proj"):
        return "block" if family == "llada" else "attention"
    if group == ("gate_proj", "up_proj"):
        return "block" if family == "llada" else "mlp"
    return "linear"


@functools.lru_cache(maxsize=64)
def _module_search(graphdef, group, inspect, bits, group_size, sym, n_grid):
    """jit: (block state, x [N, T, in], key_bias, cos, sin) -> (s, ratio, losses), the scale
    search of `group` scored by the `inspect` module run on x with candidate weights."""

    def run(state, x, key_bias, cos, sin):
        n, t, d = x.shape
        block = nnx.merge(graphdef, state)
        weights = [weight(block, name).T.astype(jnp.float32) for name in group]

        def module(xf, ws):
            # a fresh copy at this trace level (the candidate weights are set on it)
            blk = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
            for name, w in zip(group, ws):  # in the stored dtype, as llm-awq's fc.weight
                set_kernel(blk, name, w.T.astype(weight(blk, name).dtype))
            x3 = xf.reshape(n, t, d).astype(x.dtype)
            if inspect == "block":
                y = blk(x3, key_bias, cos, sin)
            elif inspect == "attention":
                y = blk.attention(x3, key_bias, cos, sin, None)
            else:  # mlp
                y = blk.down_proj(jax.nn.silu(blk.gate_proj(x3)) * blk.up_proj(x3))
            return y.reshape(n * t, -1).astype(jnp.float32)

        return awq_core.search_scales(x, weights, bits=bits, group_size=group_size, sym=sym,
                                      n_grid=n_grid, block_fn=module)

    return jax.jit(run)


def search_group_scales(block, group, x, *, key_bias, cos, sin, bits: int, group_size: int,
                        sym: bool, n_grid: int = 20):
    """(s, ratio, losses, inspected module) for `group`'s AWQ scales on its captured input
    `x` [N, T, in], scored as llm-awq does for the block's family."""
    inspect = inspected_module(block.config.family, group)
    if inspect == "linear":
        weights = [weight(block, n).T.astype(jnp.float32) for n in group]
        s, ratio, losses = _search_scales(x, weights, bits=bits, group_size=group_size,
                                          sym=sym, n_grid=n_grid)
        return s, ratio, losses, inspect
    if inspect == "block" and group == ("gate_proj", "up_proj"):
        key_bias = None  # llm-awq calls the block without its kwargs for this group
    graphdef, state = nnx.split(block)
    fn = _module_search(graphdef, group, inspect, bits, group_size, sym, n_grid)
    s, ratio, losses = fn(state, x, key_bias, cos, sin)
    return s, ratio, losses, inspect


def quantize_block(block, runner, x, prefix: str, spec, pending: dict, *,
                   seed: int = 0) -> dict:
    """AWQ on one block in place (see module doc). Quantized weights are staged into
    `pending` (dequantized copies stay in the block until the caller installs them).
    Returns per-group search results. `seed` is unused (the token use is deterministic)."""
    del seed
    ws = spec.weight
    # 1. every group's input from the float block, all tokens (llm-awq's input_feat)
    _, cap = runner.run(x, tuple(prefix + g[0] for g in GROUPS), weighted=False)
    feats = {group: cap[prefix + group[0]] for group in GROUPS}
    # 2. scale searches, all on the unscaled block
    info, found = {}, []
    for group in GROUPS:
        producer, kind = PRODUCERS[group]
        if not foldable(block, group, producer, kind):
            info[group[0]] = {"ratio": None, "note": "no exact fold (GQA): scales skipped"}
            continue
        s, ratio, _, inspect = search_group_scales(
            block, group, feats[group], key_bias=runner.key_bias, cos=runner.cos,
            sin=runner.sin, bits=ws.bits, group_size=ws.group_size, sym=ws.sym,
            n_grid=spec.awq_grid)
        found.append((group, s))
        info[group[0]] = {"ratio": float(ratio), "inspected": inspect}
    # 3. fold; the clip search sees the captured inputs divided by the scales
    for group, s in found:
        producer, kind = PRODUCERS[group]
        fold(block, group, producer, kind, s)
        feats[group] = exact_div(feats[group].astype(jnp.float32), s)
    # 4-5. clip (not q/k) and quantize
    for group in GROUPS:
        xs = feats[group].reshape(-1, feats[group].shape[-1])
        for name in group:
            kernel = weight(block, name)
            w = kernel.T.astype(jnp.float32)
            if spec.awq_clip and name not in NO_CLIP:
                max_val = _search_clip(xs, w, bits=ws.bits, group_size=ws.group_size,
                                       sym=ws.sym, n_grid=spec.awq_grid)
                # the bound in the stored dtype, as llm-awq's apply_clip casts it
                w = awq_core.apply_clip(w, max_val.astype(kernel.dtype).astype(jnp.float32))
            codes, scale, zero = awq_core.awq_quantize_codes(w, bits=ws.bits,
                                                             group_size=ws.group_size,
                                                             sym=ws.sym)
            stage(block, name, QuantizedArray.from_codes(
                codes, scale, zero, bits=ws.bits, group_size=ws.group_size, sym=ws.sym,
                scale_dtype=kernel.dtype), pending)
    return info
