"""AWQ (Lin et al., arXiv 2306.00978) as llm-awq computes it: activation-aware scale search
and weight-clipping search. Pure, jittable array-in/array-out functions.

Orientation: weights are ``w[out, in]`` (paper orientation; model kernels ``[in, out]`` are
transposed by the driver), activations ``x[tokens, in]``.

**Quantizer** (llm-awq ``pseudo_quantize_tensor``, group-wise along ``in``)::

    asym:  scale = max(max_g - min_g, 1e-5) / (2^b - 1)
           zero  = clamp(-round(min_g / scale), 0, 2^b - 1)
           w_hat = (clamp(round(w / scale) + zero, 0, 2^b - 1) - zero) * scale
    sym:   scale = max(max_g |w|, 1e-5) / (2^(b-1) - 1)
           w_hat = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1) * scale

Every division is a true IEEE division (`quantizer_core.exact_div`), as torch computes it:
XLA would otherwise multiply by a one-ulp-off reciprocal, which moves codes and zero points
wherever ``w / scale`` or ``min / scale`` is an exact tie (common on bf16 weights, and on
every clipped group, whose ``min / scale`` is exactly ``-(2^b - 1) / 2``). Codes, scales and
zero points are bit-equal to llm-awq's (tests/quant/numpy_awq.py, checked against llm-awq).
The asymmetric grid is `quantizer_core.affine_grid`, the one AutoGPTQ's grid uses too (they
differ only in the range: AutoGPTQ widens [min, max] to include 0 and has no 1e-5 floor), and
codes/dequantization are `quantize_codes` / `dequantize_codes`, shared with GPTQ/RTN.
(``grid="autogptq"`` uses `quantizer_core.rtn` instead; either grid packs into a
`QuantizedArray` via `awq_quantize_codes`.)

**Scale search** (``auto_scale._search_module_scale``): for linears ``W_1..W_k`` that read the
same input ``x`` (q/k/v; gate/up; or one linear), with per-channel activation magnitude
``a_c = mean_t |x_tc|``::

    for r in {0, 1/n_grid, ..., (n_grid-1)/n_grid}:
        s = max(a^r, 1e-4);  s = s / sqrt(max(s) * min(s))
        W_i(s) = Q(W_i * s) / s                       (s scales input channels)
        loss(r) = mean((f(x; W) - f(x; W(s)))^2)
    s* = s(argmin_r loss)

``f`` is the block the linears feed (default: their stacked outputs ``x W_i^T``; pass
`block_fn(x, weights) -> y` for e.g. the attention or MLP module, as llm-awq inspects).
Applying s*: multiply the weights' input columns by s*, divide the producer of ``x`` by s*
(`fold_scales`), so the fp output is unchanged and the quantizer sees ``W * s*``.

**Clip search** (``auto_clip.auto_clip_layer``): per (output channel, group), shrink the
absolute max ``m`` to ``m (1 - i/n_grid)`` for ``i < max_shrink * n_grid``, clamp the group
to ``[-m', m']``, quantize, and keep the ``m'`` minimising the group's share of the output
error ``mean_t (x_g . (w_g - Q(clamp(w_g))))^2`` on every ``(n_tokens // n_sample)``-th
token from the first (so between ``n_sample`` and ``2 n_sample - 1`` tokens; llm-awq fails
when ``n_tokens < n_sample``, where this uses every token). Apply with `apply_clip`.

The grid points ``r = i / n_grid`` and shrink factors ``1 - i / n_grid`` are rounded once from
Python's double to fp32, as torch does with the scalar.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from qdlm_jax.quant.quantizer_core import (
    SUPPORTED_BITS,
    affine_grid,
    dequantize_codes,
    exact_div,
    quantize_codes,
    resolve_group_size,
    rtn,
)

Grid = Literal["awq", "autogptq"]


# ----------------------------------------------------------------------------------------
# Quantizer (llm-awq pseudo_quantize_tensor)
# ----------------------------------------------------------------------------------------


def awq_params(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool):
    """(scale, zero) [out, groups] on llm-awq's grid, in `QuantizedArray`'s convention
    ``w_hat = scale * (q - zero)`` (symmetric: zero = 2^(b-1), the signed code's offset).

    Both divisions are true IEEE divisions (`exact_div`), as torch computes them.
    """
    out, n_in = w.shape
    g = resolve_group_size(group_size, n_in)
    wg = w.astype(jnp.float32).reshape(out, n_in // g, g)
    if sym:
        half = 2 ** (bits - 1)
        scale = exact_div(jnp.maximum(jnp.abs(wg).max(-1), jnp.float32(1e-5)),
                          jnp.float32(half - 1))
        return scale, jnp.full_like(scale, half)
    maxq = 2 ** bits - 1
    scale, zero = affine_grid(wg.min(-1), wg.max(-1), maxq=maxq, min_range=1e-5)
    return scale, jnp.clip(zero, 0, maxq)


def awq_quantize_codes(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool):
    """(codes in [0, 2^b - 1], scale, zero) such that w_hat = scale * (codes - zero).

    The codes are `quantizer_core.quantize_codes`, the AutoGPTQ grid's quantizer:
    ``clamp(round(w / scale) + zero, 0, maxq)``. For llm-awq's asymmetric grid that is its
    formula; for its symmetric one, ``clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1)``
    is the same integer (adding the integer offset commutes with the clamp), so the signed
    value is stored with zero 2^(b-1), `QuantizedArray`'s symmetric convention.
    """
    resolve_group_size(group_size, w.shape[1])
    scale, zero = awq_params(w, bits=bits, group_size=group_size, sym=sym)
    return quantize_codes(w, scale, zero, bits=bits), scale, zero


def pseudo_quantize(w: Float[Array, "out in"], *, bits: int, group_size: int, sym: bool,
                    grid: Grid = "awq") -> Float[Array, "out in"]:
    """Quantize-dequantize on llm-awq's grid (or AutoGPTQ's with grid="autogptq").

    Dequantization is ``scale * (q - zero)`` in fp32 (llm-awq's ``(q - zero) * scale``).
    """
    if grid == "autogptq":
        return rtn(w, bits=bits, group_size=group_size, sym=sym)
    if grid != "awq":
        raise ValueError(f"grid={grid!r}: use 'awq' or 'autogptq'")
    codes, scale, zero = awq_quantize_codes(w, bits=bits, group_size=group_size, sym=sym)
    return dequantize_codes(codes, scale, zero, dtype=w.dtype)


# ----------------------------------------------------------------------------------------
# Scale search
# ----------------------------------------------------------------------------------------


def activation_scale(x: Float[Array, "... in"]) -> Float[Array, "in"]:
    """a_c = mean over tokens of |x_c| (llm-awq get_act_scale), in fp32."""
    return jnp.mean(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0)


def scales_for_ratio(act_scale: Float[Array, "in"], ratio) -> Float[Array, "in"]:
    """s = max(a^r, 1e-4) / sqrt(max(s) * min(s))."""
    s = jnp.maximum(act_scale ** jnp.asarray(ratio, jnp.float32), jnp.float32(1e-4))
    return exact_div(s, jnp.sqrt(s.max() * s.min()))


def _grid_ratios(n_grid: int):
    """r = i / n_grid, i < n_grid, rounded once from Python's double (as torch takes the
    scalar); in-graph ``i / n_grid`` may be rewritten to ``i * (1 / n_grid)``."""
    return jnp.asarray([i * 1 / n_grid for i in range(n_grid)], jnp.float32)


def _stacked_linears(x, weights):
    return jnp.concatenate([jnp.einsum("ti,oi->to", x, w, precision=lax.Precision.HIGHEST)
                            for w in weights], axis=-1)


def search_scales(x: Float[Array, "tokens in"], weights: Sequence[Float[Array, "out in"]], *,
                  bits: int, group_size: int, sym: bool, n_grid: int = 20,
                  block_fn: Callable | None = None, grid: Grid = "awq", n_valid=None):
    """Best AWQ input-channel scales for linears sharing input `x` (see module doc).

    Returns ``(s [in], best_ratio, losses [n_grid])``. `block_fn(x, weights) -> y` is the
    module whose output error is minimised (default: the linears' stacked outputs).
    `n_valid` (may be traced): only the first n_valid rows of `x` are tokens, the rest are
    zero padding (a fixed row count compiles once for many token counts). ``a`` and the
    losses are then sums over every row divided by n_valid: exact when ``block_fn(0) = 0``
    row by row, as for linears and routed experts.
    """
    _check_bits(bits)
    for w in weights:
        resolve_group_size(group_size, w.shape[1])
    f = block_fn or _stacked_linears
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    weights = [w.astype(jnp.float32) for w in weights]
    y_ref = f(x, weights)
    if n_valid is None:
        a = activation_scale(x)
    else:
        a = exact_div(jnp.sum(jnp.abs(x), axis=0), jnp.asarray(n_valid, jnp.float32))

    ratios = _grid_ratios(n_grid)

    def loss_for(r):
        s = scales_for_ratio(a, r)
        wq = [exact_div(pseudo_quantize(w * s, bits=bits, group_size=group_size, sym=sym,
                                        grid=grid), s) for w in weights]
        d = (y_ref - f(x, wq)).astype(jnp.float32)
        if n_valid is None:
            return jnp.mean(d * d)
        return exact_div(jnp.sum(d * d), jnp.asarray(n_valid, jnp.float32) * d.shape[-1])

    losses = lax.map(loss_for, ratios)
    best = jnp.argmin(losses)  # first minimum, like llm-awq's strict `<`
    ratio = ratios[best]
    return scales_for_ratio(a, ratio), ratio, losses


def apply_scales(weights: Sequence[Float[Array, "out in"]], s: Float[Array, "in"]):
    """W_i * s (input columns): what the quantizer sees after the scales are folded."""
    return [w * s.astype(w.dtype) for w in weights]


def fold_scales(prev: Float[Array, "..."], next_weights: Sequence[Float[Array, "out in"]],
                s: Float[Array, "in"], *, prev_bias: Float[Array, "in"] | None = None,
                layout: Literal["out_in", "in_out"] = "out_in"):
    """Fold AWQ scales so the float function is unchanged: y = W (x) = (W s)(x / s).

    * `prev` a norm weight ``gamma[in]`` (RMSNorm feeding the linears): ``gamma / s``;
    * `prev` a linear producing x (``[in, in_prev]`` out_in / ``[in_prev, in]`` in_out, e.g.
      v_proj -> o_proj or up_proj -> down_proj): its output channels (and bias) ``/ s``;
    * every next weight: input channels ``* s`` (``[out, in]`` out_in / ``[in, out]`` in_out).

    Returns ``(prev', [next'], prev_bias')``.
    """
    s = s.astype(jnp.float32)
    if prev.ndim == 1:
        new_prev = exact_div(prev, s).astype(prev.dtype)
    elif layout == "out_in":
        new_prev = exact_div(prev, s[:, None]).astype(prev.dtype)
    else:
        new_prev = exact_div(prev, s[None, :]).astype(prev.dtype)
    if layout == "out_in":
        new_next = [(w * s[None, :]).astype(w.dtype) for w in next_weights]
    else:
        new_next = [(w * s[:, None]).astype(w.dtype) for w in next_weights]
    new_bias = None if prev_bias is None else exact_div(prev_bias, s).astype(prev_bias.dtype)
    return new_prev, new_next, new_bias


# ----------------------------------------------------------------------------------------
# Clip search
# ----------------------------------------------------------------------------------------


def search_clip(x: Float[Array, "tokens in"], w: Float[Array, "out in"], *, bits: int,
                group_size: int, sym: bool, n_grid: int = 20, max_shrink: float = 0.5,
                n_sample: int = 512, grid: Grid = "awq") -> Float[Array, "out groups"]:
    """Per (output channel, group) clipping threshold ``max_val`` (see module doc)."""
    _check_bits(bits)
    out, n_in = w.shape
    g = resolve_group_size(group_size, n_in)
    n_groups = n_in // g
    x = x.reshape(-1, n_in).astype(jnp.float32)
    x = x[:: max(1, x.shape[0] // n_sample)]
    xg = x.reshape(x.shape[0], n_groups, g)
    w = w.astype(jnp.float32)
    wg = w.reshape(out, n_groups, g)
    org_max = jnp.abs(wg).max(-1)  # [out, groups]
    y_ref = jnp.einsum("tgk,ogk->otg", xg, wg, precision=lax.Precision.HIGHEST)

    n_steps = int(max_shrink * n_grid)
    # 1 - i / n_grid rounded once from Python's double, as torch takes the scalar
    shrink = jnp.asarray([1 - i / n_grid for i in range(n_steps)], jnp.float32)

    def step(i, carry):
        best_err, best_max = carry
        max_val = org_max * shrink[i]
        cur = jnp.clip(wg, -max_val[..., None], max_val[..., None]).reshape(out, n_in)
        q = pseudo_quantize(cur, bits=bits, group_size=g, sym=sym, grid=grid)
        y = jnp.einsum("tgk,ogk->otg", xg, q.reshape(out, n_groups, g),
                       precision=lax.Precision.HIGHEST)
        err = jnp.mean((y - y_ref) ** 2, axis=1)  # [out, groups]
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, max_val, best_max)

    init = (jnp.full((out, n_groups), 1e9, jnp.float32), org_max)
    _, best_max = lax.fori_loop(0, n_steps, step, init)
    return best_max


def apply_clip(w: Float[Array, "out in"], max_val: Float[Array, "out groups"]):
    """Clamp each group of w to [-max_val, max_val]."""
    out, n_in = w.shape
    n_groups = max_val.shape[1]
    m = max_val[..., None].astype(w.dtype)
    return jnp.clip(w.reshape(out, n_groups, -1), -m, m).reshape(out, n_in)


def _check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"AWQ: bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")


__all__ = ["activation_scale", "apply_clip", "apply_scales", "awq_params", "awq_quantize_codes",
           "fold_scales", "pseudo_quantize", "scales_for_ratio", "search_clip", "search_scales"]
