"""Plain NumPy statement of AutoGPTQ's `GPTQ.fasterquant` (the reference the JAX core is
tested against). Written from the algorithm, fp32 throughout like AutoGPTQ on CPU; slow and
literal on purpose: one Python iteration per column.

    W [out, in], H [in, in]
    per-channel params from W (before the dead-column fix)
    dead = diag(H) == 0:  H_ii = 1, W[:, i] = 0
    static_groups: params of every contiguous group from W (before permuting)
    act_order: perm = argsort(diag(H), descending); W = W[:, perm]; H = H[perm][:, perm]
    H += damp * mean(diag(H)) * I
    Hinv = cholesky(inv(H)) upper
    for each block [i1, i2) of block_size columns:
        W1 = W[:, i1:i2].copy(); Err1 = 0
        for i in range(i2 - i1):
            c = i1 + i
            groups: if not static and c % g == 0: params <- W[:, c:c+g]   (W as of block start)
                    if static: params <- group (perm[c] if act_order else c) // g
            q = quant(W1[:, i]);  err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err ⊗ Hinv1[i, i:];  Err1[:, i] = err;  Q[:, c] = q
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    un-permute Q; g_idx[j] = j // g (static or no act_order) / invperm[j] // g (act_order)
"""

from __future__ import annotations

import numpy as np


def find_params(x: np.ndarray, bits: int, sym: bool):
    """AutoGPTQ Quantizer.find_params over the rows of x [out, k] -> (scale, zero) [out]."""
    maxq = 2 ** bits - 1
    f = x.dtype.type
    xmin = np.minimum(x.min(axis=1), f(0))
    xmax = np.maximum(x.max(axis=1), f(0))
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        neg = xmin < 0
        xmin = np.where(neg, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = np.where(dead, f(-1), xmin).astype(f)
    xmax = np.where(dead, f(1), xmax).astype(f)
    scale = ((xmax - xmin) / f(maxq)).astype(f)
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale).astype(f)
    return scale, zero


def quantize(w: np.ndarray, scale, zero, bits: int):
    """(code, dequantized) of a column w [out] on the grid (scale, zero) [out]."""
    q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1).astype(w.dtype)
    return q, (scale * (q - zero)).astype(w.dtype)


def fasterquant(w, h, *, bits, group_size=-1, sym=True, damp=0.01, block_size=128,
                act_order=False, static_groups=False, trace=None, dtype=np.float32):
    """Returns (w_dequantized [out, in], codes int [out, in], scales [out, G], zeros [out, G],
    g_idx [in]). If `trace` is a dict, trace["ratio"] receives w / scale before rounding
    ([out, in], processing order) to tell near-ties apart from real differences. `dtype`
    float64 gives a higher-precision run of the same algorithm (to measure fp32 noise)."""
    W = np.array(w, dtype=dtype)
    H = np.array(h, dtype=dtype)
    out, cols = W.shape
    scale, zero = find_params(W, bits, sym)  # per-channel params, as AutoGPTQ computes first

    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales, zeros, groups = [], [], []
    if static_groups:
        for i in range(0, cols, group_size):
            s, z = find_params(W[:, i:i + group_size], bits, sym)
            groups.append((s, z))
            scales.append(s)
            zeros.append(z)

    perm = None
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = np.argsort(perm)

    Q = np.zeros_like(W)
    codes = np.zeros(W.shape, dtype=np.int64)
    d = W.dtype.type(damp) * np.mean(np.diag(H))
    H[np.arange(cols), np.arange(cols)] += d
    L = np.linalg.cholesky(H)  # float32 LAPACK, like torch on CPU
    Linv = np.linalg.inv(L)
    Hinv = np.linalg.cholesky(Linv.T @ Linv).T  # cholesky_inverse, then upper Cholesky

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            col = W1[:, i]
            dd = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if c % group_size == 0:
                        scale, zero = find_params(W[:, c:c + group_size], bits, sym)
                        scales.append(scale)
                        zeros.append(zero)
                else:
                    idx = perm[c] if act_order else c
                    scale, zero = groups[idx // group_size]
            q, dq = quantize(col, scale, zero, bits)
            if trace is not None:
                trace.setdefault("ratio", np.zeros_like(W))[:, c] = col / scale
            codes[:, c] = q
            Q[:, c] = dq
            err = (col - dq) / dd
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g = group_size if group_size != -1 else cols
    if static_groups and act_order:
        g_idx = np.array([perm[i] // g for i in range(cols)])
    else:
        g_idx = np.array([i // g for i in range(cols)])
    if act_order:
        Q = Q[:, invperm]
        codes = codes[:, invperm]
        if trace is not None:
            trace["ratio"] = trace["ratio"][:, invperm]
        g_idx = g_idx[invperm]
    if not scales:
        scales, zeros = [scale], [zero]
    return Q, codes, np.stack(scales, 1), np.stack(zeros, 1), g_idx
