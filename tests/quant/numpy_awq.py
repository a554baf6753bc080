"""llm-awq's quantizer, scale search and clip search, stated in NumPy (float32).

Written from the published algorithm (Lin et al., arXiv 2306.00978, and llm-awq's
`pseudo_quantize_tensor`, `auto_scale._search_module_scale`, `auto_clip.auto_clip_layer` as
documented there), independently of qdlm_jax. Every division is NumPy's true IEEE division,
as torch computes it; every intermediate is float32 (Python scalars are cast to float32
first, as torch does for a float32 tensor). Weights are ``w[out, in]``, inputs ``x[n, in]``.

Checked against llm-awq itself (torch, CPU) on the weights of tests/quant/test_awq_core.py:
identical codes, scales and zero points, identical clip choices, identical scale ratios.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def quantize(w, n_bit: int, group_size: int, zero_point: bool = True):
    """pseudo_quantize_tensor: returns (w_hat [out, in], q [out, in] int, scales, zeros).

    Groups are `group_size` consecutive input columns (-1: one group per row).
    asym: scales = max(max - min, 1e-5) / (2^b - 1); zeros = clamp(-round(min / scales), 0,
          2^b - 1); q = clamp(round(w / scales) + zeros, 0, 2^b - 1)
    sym:  scales = max(max |w|, 1e-5) / (2^(b-1) - 1); zeros = 0;
          q = clamp(round(w / scales), -2^(b-1), 2^(b-1) - 1)
    w_hat = (q - zeros) * scales. `scales`/`zeros` are [out, groups]; q is the signed value
    in symmetric mode.
    """
    w = np.asarray(w, F32)
    out, n_in = w.shape
    g = n_in if group_size <= 0 else group_size
    wg = w.reshape(-1, g)
    if zero_point:
        max_val = wg.max(1, keepdims=True)
        min_val = wg.min(1, keepdims=True)
        max_int, min_int = 2 ** n_bit - 1, 0
        scales = np.maximum(max_val - min_val, F32(1e-5)) / F32(max_int)
        zeros = np.clip(-np.round(min_val / scales), min_int, max_int).astype(F32)
    else:
        max_val = np.maximum(np.abs(wg).max(1, keepdims=True), F32(1e-5))
        max_int, min_int = 2 ** (n_bit - 1) - 1, -(2 ** (n_bit - 1))
        scales = max_val / F32(max_int)
        zeros = np.zeros_like(scales)
    q = np.clip(np.round(wg / scales) + zeros, min_int, max_int)
    w_hat = ((q - zeros) * scales).astype(F32)
    return (w_hat.reshape(out, n_in), q.astype(np.int64).reshape(out, n_in),
            scales.reshape(out, -1), zeros.reshape(out, -1))


def pseudo_quantize(w, n_bit, group_size, zero_point=True):
    return quantize(w, n_bit, group_size, zero_point)[0]


def linears(x, weights):
    """The default inspected module of a one-linear group: x W^T (stacked for several)."""
    return np.concatenate([x @ w.T for w in weights], axis=-1)


def search_scale(x, weights, n_bit, group_size, zero_point=True, block=linears, n_grid=20):
    """_search_module_scale: returns (best_scales [in], best_ratio, history [n_grid]).

    a = mean_t |x|; for ratio = i / n_grid, i < n_grid: s = max(a^ratio, 1e-4),
    s = s / sqrt(max(s) min(s)); W_i <- Q(W_i * s) / s; loss = mean((block(x; W) -
    block(x; W(s)))^2); the first strict minimum wins.
    """
    x = np.asarray(x, F32).reshape(-1, np.shape(x)[-1])
    weights = [np.asarray(w, F32) for w in weights]
    org_out = np.asarray(block(x, weights), F32)
    x_max = np.abs(x).mean(0, dtype=F32)
    best_error, best_ratio, best_scales, history = np.inf, -1, None, []
    for i in range(n_grid):
        ratio = i * 1 / n_grid
        scales = np.maximum(np.power(x_max, F32(ratio)), F32(1e-4))
        scales = scales / np.sqrt(scales.max() * scales.min())
        wq = [pseudo_quantize(w * scales[None, :], n_bit, group_size, zero_point)
              / scales[None, :] for w in weights]
        out = np.asarray(block(x, wq), F32)
        loss = float(np.mean(np.square((org_out - out).astype(np.float64))))
        history.append(loss)
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales
    return best_scales, best_ratio, np.asarray(history)


def clip_tokens(x, n_sample_token=512):
    """The tokens auto_clip_layer scores: every (n // n_sample_token)-th one, from the first.
    (llm-awq fails for n < n_sample_token, a zero step; the statement here uses step 1.)"""
    x = np.asarray(x, F32).reshape(-1, np.shape(x)[-1])
    return x[0::max(1, x.shape[0] // n_sample_token)]


def auto_clip(w, x, n_bit, group_size, zero_point=True, n_grid=20, max_shrink=0.5,
              n_sample_token=512, return_errors=False):
    """auto_clip_layer: best per-(output channel, group) max |w| [out, groups].

    For i < max_shrink * n_grid: m_i = m_0 (1 - i / n_grid) (m_0 = max |w_g|), clamp the
    group to [-m_i, m_i], quantize, error = mean over the sampled tokens of
    (sum_g x_g (w_g - Q(clamp(w_g))))^2 computed as (x . Q - x . w); a strictly smaller error
    replaces the best (initial best error 1e9, best max m_0).
    With `return_errors`, also the errors [steps, out, groups] (to recognise near-ties).
    """
    w = np.asarray(w, F32)
    out, n_in = w.shape
    g = n_in if group_size <= 0 else group_size
    xs = clip_tokens(x, n_sample_token).reshape(-1, n_in // g, g)  # t, G, g
    wg = w.reshape(out, n_in // g, g)
    org_max = np.abs(wg).max(-1, keepdims=True)  # out, G, 1
    org_out = np.einsum("tGk,oGk->otG", xs, wg)
    best_max = org_max.copy()
    min_errs = np.full_like(org_max, F32(1e9))
    errors = []
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max * F32(1 - i_s / n_grid)
        cur_w = np.clip(wg, -max_val, max_val)
        q_w = pseudo_quantize(cur_w.reshape(out, n_in), n_bit, g, zero_point).reshape(wg.shape)
        cur_out = np.einsum("tGk,oGk->otG", xs, q_w)
        err = np.square(cur_out - org_out).mean(1, dtype=F32)[..., None]  # out, G, 1
        errors.append(err[..., 0])
        better = err < min_errs
        min_errs[better] = err[better]
        best_max[better] = max_val[better]
    if return_errors:
        return best_max[..., 0], np.stack(errors)
    return best_max[..., 0]


def apply_clip(w, max_val):
    """Clamp each group of w[out, in] to [-max_val, max_val] (max_val [out, groups])."""
    w = np.asarray(w, F32)
    out, n_in = w.shape
    m = np.asarray(max_val, F32)[..., None]
    return np.clip(w.reshape(out, m.shape[1], -1), -m, m).reshape(out, n_in)
