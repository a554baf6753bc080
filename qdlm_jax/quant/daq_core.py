"""Quant-dLLM's 2-bit weight-only quantizer: DAQ (data-aware binary-plane quantization) and
ABMP (adaptive blockwise mixed precision). Pure functions of ``w[out, in]`` and the layer's
input Hessian; no official code exists, so every choice marked [choice] is ours
(docs/quantization.md lists them).

Model. The input axis is cut into column blocks of ``g`` columns (the group size, 128). Block
``b`` holds ``K_b`` binary planes, each with a row scale and a column scale:

    W_b ~ W_hat_b = sum_{k < K_b} diag(r_k) B_k diag(c_k),   B_k in {-1, +1}^{out x g},
                                                             r_k in R^out, c_k in R^g

Objective (DOR, the data-aware objective), per block:

    L(B, r, c) = sum_ij Omega_ij (W_ij - W_hat_ij)^2,      Omega_ij = h_j * Lambda_ij^2
    h_j       = H_jj / mean_block(H_jj)     H = the token-weighted second moment of the
                                            layer's inputs under masked calibration (MCS);
                                            the diagonal of Tr((W - W_hat) H (W - W_hat)^T)
                                            [choice: diagonal; h = 1 without data weighting]
    Z_ij      = (W_ij / U_jj)^2             OBS saliency, U = upper Cholesky of H^-1
                                            (BiLLM's / SliM-LLM's w^2 / [H^-1]_jj^2)
    Lambda_ij = lambda if |standardised Z_ij| > 3 else 1   (salient weights weigh more;
                                            lambda is not published [choice: 2])

Updates (RSR, row-column successive rescaling). Initialise greedily on the residual
``R = W - sum_{l<k} W_hat_l``: ``B_k = sign(R)`` (0 -> +1), ``c_k = 1``,
``r_k[i] = sum_j Omega_ij |R_ij| / sum_j Omega_ij``. Then repeat `iters` times:

    for each plane k, with R_k = W - sum_{l != k} W_hat_l:
        r_k[i] = sum_j Omega_ij R_ij B_ij c_j / sum_j Omega_ij c_j^2          (exact argmin)
        c_k[j] = sum_i Omega_ij R_ij B_ij r_i / sum_i Omega_ij r_i^2          (exact argmin)
    B: each element takes the best of the 2^K sign combinations
       (argmin_s |W_ij - sum_k s_k r_k[i] c_k[j]|; Omega_ij > 0 does not change it)

Every step minimises L exactly over the variables it touches, so L never increases (the test
checks it). With one plane and Omega = 1 the fixed point is the closed-form binarization:
``B = sign(W)`` and ``r c^T`` the best rank-1 approximation of ``|W|`` (the alternating
updates are the power iteration for its leading singular pair); the very first row update
(c = 1) is XNOR-Net's ``mean_j |W_ij|``.

ABMP: block importance ``s_b = sum_{(i,j) in b} Z_ij``; with ``n = min(ceil(ratio * G),
floor(G / 2))`` blocks [choice: ceil, so a small matrix still gets one pair], the n most
important blocks get ``p + 1`` planes, the n least important ``p - 1``, the rest ``p``, so
the mean is exactly ``p`` planes (``p = bits = 2``: 3 / 2 / 1 planes). Published ratios: 5%
(LLaDA), 10% (Dream).

Error compensation [choice; inferred from Quant-dLLM's ``bigptq_arb.py``, built on BiLLM /
ARB-LLM, which run inside GPTQ's loop]: blocks are fitted left to right as in GPTQ's lazy
batches, each on its current (already compensated) weights, and the error moves onto the
not-yet-quantized columns with the rows of U (``compensate``):

    "block":  the block's planes are fixed as fitted (``E = W_b - W_hat_b``) and
              ``W[:, after] -= (E U_bb^-1) U[b, after]`` -- the update GPTQ's column loop
              makes when the block's values are fixed in advance (BiLLM's procedure)
    "column": the scales r, c are fitted on the block-start weights, then GPTQ's column loop
              runs with the DAQ codebook: column j's signs are the best of the 2^K
              combinations for the current w_j (values sum_k s_k r_k[i] c_k[j]),
              e_j = (w_j - q_j) / U_jj, ``w_l -= e_j U_jl`` for the later columns l of the
              block, and ``W[:, after] -= E U[b, after]`` after the block (default);
              with ``refit`` (default 1) the block's scales are then refitted by RSR to the
              values the loop met (the compensated columns, which drift outside the
              block-start range) and the loop runs again [choice]
    "none":   blocks fitted independently

ABMP check [choice]: `daq_quantize` keeps the ABMP allocation of a matrix only if it gives a
lower output error Tr(E H E^T) than the uniform allocation (see there).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from qdlm_jax.quant.cholesky_core import upper_cholesky_of_inverse

SALIENT_Z = 3.0  # |standardised saliency| above which a weight is salient (DOR)


class PlaneFit(NamedTuple):
    """One block's K planes: W_hat = sum_k r[k][:, None] * signs[k] * c[k][None, :]."""

    signs: Float[Array, "K out g"]  # +-1 as float32
    row: Float[Array, "K out"]
    col: Float[Array, "K g"]


def reconstruct(signs, row, col) -> jax.Array:
    """sum_k diag(row_k) B_k diag(col_k) (works batched over leading axes)."""
    return jnp.sum(row[..., :, :, None] * signs * col[..., :, None, :], axis=-3)


def objective(w, omega, fit: PlaneFit) -> jax.Array:
    """L = sum_ij Omega_ij (W - W_hat)_ij^2."""
    e = w - reconstruct(fit.signs, fit.row, fit.col)
    return jnp.sum(omega * e * e)


def _sign(x):
    return jnp.where(x >= 0, 1.0, -1.0).astype(jnp.float32)


def _safe_div(num, den, old):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), old)


def init_planes(w, omega, k: int) -> PlaneFit:
    """Greedy residual initialisation (module docstring)."""
    signs, rows, cols = [], [], []
    r = w
    for _ in range(k):
        b = _sign(r)
        row = _safe_div(jnp.sum(omega * jnp.abs(r), axis=1), jnp.sum(omega, axis=1),
                        jnp.zeros(w.shape[0], jnp.float32))
        col = jnp.ones(w.shape[1], jnp.float32)
        signs.append(b)
        rows.append(row)
        cols.append(col)
        r = r - row[:, None] * b * col[None, :]
    return PlaneFit(jnp.stack(signs), jnp.stack(rows), jnp.stack(cols))


def update_row(w, omega, fit: PlaneFit, k: int) -> PlaneFit:
    """Exact argmin of L over r_k (others fixed)."""
    rest = reconstruct(fit.signs, fit.row, fit.col) - (
        fit.row[k][:, None] * fit.signs[k] * fit.col[k][None, :])
    r = w - rest
    c = fit.col[k][None, :]
    num = jnp.sum(omega * r * fit.signs[k] * c, axis=1)
    den = jnp.sum(omega * c * c, axis=1)
    return fit._replace(row=fit.row.at[k].set(_safe_div(num, den, fit.row[k])))


def update_col(w, omega, fit: PlaneFit, k: int) -> PlaneFit:
    """Exact argmin of L over c_k (others fixed)."""
    rest = reconstruct(fit.signs, fit.row, fit.col) - (
        fit.row[k][:, None] * fit.signs[k] * fit.col[k][None, :])
    r = w - rest
    a = fit.row[k][:, None]
    num = jnp.sum(omega * r * fit.signs[k] * a, axis=0)
    den = jnp.sum(omega * a * a, axis=0)
    return fit._replace(col=fit.col.at[k].set(_safe_div(num, den, fit.col[k])))


def update_signs(w, fit: PlaneFit) -> PlaneFit:
    """Each element takes the best of the 2^K sign combinations (exact argmin over B)."""
    k = fit.signs.shape[0]
    combos = jnp.asarray(list(itertools.product((-1.0, 1.0), repeat=k)), jnp.float32)
    terms = fit.row[:, :, None] * fit.col[:, None, :]  # [K, out, g]
    values = jnp.einsum("sk,kij->sij", combos, terms)  # [2^K, out, g]
    best = jnp.argmin(jnp.abs(w[None] - values), axis=0)  # first minimum on ties
    return fit._replace(signs=jnp.moveaxis(combos[best], -1, 0))


def rsr_step(w, omega, fit: PlaneFit) -> PlaneFit:
    """One round of row-column successive rescaling, then the sign update."""
    for k in range(fit.signs.shape[0]):
        fit = update_row(w, omega, fit, k)
        fit = update_col(w, omega, fit, k)
    return update_signs(w, fit)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def fit_planes(w: Float[Array, "out g"], omega: Float[Array, "out g"], *, k: int,
               iters: int = 15) -> PlaneFit:
    """DAQ of one block: greedy init then `iters` RSR rounds (module docstring)."""
    w = w.astype(jnp.float32)
    omega = omega.astype(jnp.float32)
    fit = init_planes(w, omega, k)
    return jax.lax.fori_loop(0, iters, lambda _, f: rsr_step(w, omega, f), fit)


def balance(fit: PlaneFit) -> PlaneFit:
    """Moves each plane's scale between r and c so that rms(c_k) = 1 (W_hat unchanged; keeps
    both in fp16's comfortable range)."""
    t = jnp.sqrt(jnp.mean(fit.col * fit.col, axis=1))
    t = jnp.where(t > 0, t, 1.0)
    return fit._replace(row=fit.row * t[:, None], col=fit.col / t[:, None])


def salient_weights(z: Float[Array, "out g"], salient: float) -> jax.Array:
    """Lambda: `salient` where the standardised saliency exceeds SALIENT_Z, else 1."""
    zs = (z - jnp.mean(z)) / jnp.maximum(jnp.std(z), 1e-30)
    return jnp.where(jnp.abs(zs) > SALIENT_Z, salient, 1.0)


def allocate_planes(scores, *, bits: int, ratio: float) -> np.ndarray:
    """ABMP: planes per block, mean exactly `bits` (module docstring). `scores` [G]."""
    s = np.asarray(scores, np.float64)
    n_blocks = s.shape[0]
    if bits < 1:
        raise ValueError(f"DAQ bits={bits}: expected an average of at least 1 plane")
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"ABMP ratio={ratio}: expected a fraction in [0, 0.5]")
    n = 0 if (bits == 1 or ratio == 0) else min(math.ceil(ratio * n_blocks - 1e-9),
                                                n_blocks // 2)
    planes = np.full(n_blocks, bits, np.int64)
    order = np.argsort(-s, kind="stable")
    if n:
        planes[order[:n]] = bits + 1
        planes[order[n_blocks - n:]] = bits - 1
    return planes


@functools.partial(jax.jit, static_argnames=("k",))
def column_signs(w1, u1, row, col, *, k: int):
    """GPTQ's column loop over one block with the DAQ codebook (``compensate="column"``).
    w1 [out, g] block-start weights, u1 [g, g] the block of U, row [K, out], col [K, g].
    Returns (signs [K, out, g], q [out, g], err [out, g] = the e_j columns)."""
    out, g = w1.shape
    combos = jnp.asarray(list(itertools.product((-1.0, 1.0), repeat=k)), jnp.float32)
    cols = jnp.arange(g)

    def step(w, j):
        wj = w[:, j]
        values = combos @ (row * col[:, j][:, None])  # [2^K, out]
        best = jnp.argmin(jnp.abs(wj[None, :] - values), axis=0)
        qj = jnp.take_along_axis(values, best[None, :], axis=0)[0]
        e = (wj - qj) / u1[j, j]
        w = w - jnp.where((cols > j)[None, :], e[:, None] * u1[j][None, :], 0.0)
        return w, (combos[best], qj, e)

    _, (signs, q, err) = jax.lax.scan(step, w1.astype(jnp.float32), cols)
    return jnp.transpose(signs, (2, 1, 0)), q.T, err.T


@jax.jit
def _propagate(w, err, u, start, stop):
    """W[:, stop:] -= err U[b, stop:] (err: the block's e_j columns)."""
    g = err.shape[1]
    rows = jax.lax.dynamic_slice_in_dim(u, start, g, axis=0)
    after = (jnp.arange(w.shape[1]) >= stop)[None, :]
    return w - jnp.where(after, err @ rows, 0.0)


COMPENSATE = ("none", "block", "column")


def _rounded(fit: PlaneFit, dtype) -> PlaneFit:
    return fit._replace(row=fit.row.astype(dtype).astype(jnp.float32),
                        col=fit.col.astype(dtype).astype(jnp.float32))


class DAQResult(NamedTuple):
    planes: np.ndarray  # [G] planes per block
    signs: jax.Array  # [S, out, g] +-1 float, S = sum(planes), slots in block order
    row: jax.Array  # [S, out] (fp16-rounded values, as float32)
    col: jax.Array  # [S, g]
    slot_block: np.ndarray  # [S] block of each slot
    w_hat: jax.Array  # [out, in] float32 from the rounded scales
    objective: float  # sum over blocks of the final weighted objective


def damped_hessian(h, w, damp: float):
    """AutoGPTQ's dead-input fix and dampening: (H', W with dead columns zeroed)."""
    h = jnp.asarray(h, jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[None, :], 0.0, w)
    return h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype), w


@jax.jit
def _compensate(w, e, u, start, stop):
    """W[:, stop:] -= (E U_bb^-1) U[b, stop:] (zero where columns are not after the block)."""
    g = e.shape[1]
    u_bb = jax.lax.dynamic_slice(u, (start, start), (g, g))
    err = jax.scipy.linalg.solve_triangular(u_bb.T, e.T, lower=True).T  # E U_bb^-1
    rows = jax.lax.dynamic_slice_in_dim(u, start, g, axis=0)  # [g, in]
    after = (jnp.arange(w.shape[1]) >= stop)[None, :]
    return w - jnp.where(after, err @ rows, 0.0)


def daq_quantize(w: Float[Array, "out in"], h: Float[Array, "in in"] | None, *,
                 abmp_check: bool = True, **kw) -> DAQResult:
    """DAQ + ABMP (`daq_planes`). With `abmp_check` and a Hessian, the ABMP allocation is
    kept only where it lowers the layer's output error Tr((W - W_hat) H (W - W_hat)^T)
    against the uniform allocation (every block `bits` planes) [choice: on the tiny models
    a 128-column block is half of a 256-wide matrix, and one plane there can cost more than
    the other block's third plane gains]."""
    r = daq_planes(w, h, **kw)
    if not abmp_check or h is None or np.all(r.planes == r.planes[0]):
        return r
    uniform = daq_planes(w, h, **{**kw, "ratio": 0.0})
    hh = jnp.asarray(h, jnp.float32)
    w32 = jnp.asarray(w, jnp.float32)

    def err(res):
        e = w32 - res.w_hat
        return float(jnp.sum((e @ hh) * e))

    return r if err(r) <= err(uniform) else uniform


def daq_planes(w: Float[Array, "out in"], h: Float[Array, "in in"] | None, *,
                 bits: int = 2, block: int = 128, ratio: float = 0.1, iters: int = 15,
                 salient: float = 2.0, data_weight: bool = True,
                 compensate: str = "column", refit: int = 1,
                 damp: float = 0.01, scale_dtype=jnp.float16) -> DAQResult:
    """DAQ + ABMP of ``w[out, in]`` with the input Hessian `h` (None: no data: Omega from
    the weights alone, Z = W^2, no compensation). Returns the planes with scales rounded to
    `scale_dtype` and the reconstruction from them (what the packed weight computes)."""
    if compensate not in COMPENSATE:
        raise ValueError(f"DAQ compensate={compensate!r}: expected one of {COMPENSATE}")
    w = jnp.asarray(w, jnp.float32)
    out, n_in = w.shape
    g = n_in if block == -1 else block
    if n_in % g:
        raise ValueError(f"DAQ: block size {g} does not divide the input width {n_in}")
    n_blocks = n_in // g
    if h is not None:
        h, w = damped_hessian(h, w, damp)
        u = upper_cholesky_of_inverse(h)
        d = jnp.diag(u)
        hd = jnp.diag(h)
    else:
        u, d, hd = None, jnp.ones(n_in, jnp.float32), jnp.ones(n_in, jnp.float32)
        compensate = "none"
    z_all = (w / d[None, :]) ** 2
    planes = allocate_planes(np.asarray(z_all.reshape(out, n_blocks, g).sum(axis=(0, 2))),
                             bits=bits, ratio=ratio)
    signs, rows, cols, slot_block, w_hat, total = [], [], [], [], [], 0.0
    for b in range(n_blocks):
        lo, hi = b * g, (b + 1) * g
        wb = w[:, lo:hi]
        lam = salient_weights((wb / d[None, lo:hi]) ** 2, salient)
        hb = hd[lo:hi] / jnp.mean(hd[lo:hi]) if data_weight else jnp.ones(g, jnp.float32)
        omega = hb[None, :] * lam * lam
        fit = _rounded(balance(fit_planes(wb, omega, k=int(planes[b]), iters=iters)),
                       scale_dtype)
        if compensate == "column":
            u_bb = u[lo:hi, lo:hi]
            signs_b, qb, err = column_signs(wb, u_bb, fit.row, fit.col, k=int(planes[b]))
            for _ in range(refit):  # scales refitted to the values the loop really met
                met = qb + err * jnp.diag(u_bb)[None, :]
                fit = _rounded(balance(fit_planes(met, omega, k=int(planes[b]),
                                                  iters=iters)), scale_dtype)
                signs_b, qb, err = column_signs(wb, u_bb, fit.row, fit.col,
                                                k=int(planes[b]))
            fit = fit._replace(signs=signs_b)
            if hi < n_in:
                w = _propagate(w, err, u, lo, hi)
        else:
            qb = reconstruct(fit.signs, fit.row, fit.col)
            if compensate == "block" and hi < n_in:
                w = _compensate(w, wb - qb, u, lo, hi)
        total += float(objective(wb, omega, fit))
        signs.append(fit.signs)
        rows.append(fit.row)
        cols.append(fit.col)
        slot_block += [b] * int(planes[b])
        w_hat.append(qb)
    return DAQResult(planes=planes, signs=jnp.concatenate(signs), row=jnp.concatenate(rows),
                     col=jnp.concatenate(cols), slot_block=np.asarray(slot_block, np.int32),
                     w_hat=jnp.concatenate(w_hat, axis=1), objective=total)
