"""GPTQ (Frantar et al., arXiv 2210.17323) as AutoGPTQ's `fasterquant` computes it, in JAX.

Problem, for one linear layer ``y = W x`` with ``W[out, in]`` and calibration inputs ``x``:

    minimise ||W X - Q X||_F^2 over Q on the quantization grid,  H = 2/n sum_x x x^T  [in, in]

Each output row is an independent quadratic problem with the same Hessian ``H``. GPTQ
quantizes the columns one at a time (in order, or by descending ``diag(H)`` with act_order)
and moves each column's rounding error onto the not-yet-quantized columns with the rows of
the upper Cholesky factor ``U`` of ``H^-1`` (``U^T U = H^-1``)::

    q_i   = quant(w_i)                                  w_i: column i of the current W
    e_i   = (w_i - q_i) / U_ii
    w_j  -= e_i * U_ij       for j > i                  (optimal OBS update, row by row)

Settings, exactly as AutoGPTQ:

* dead inputs: ``H_ii == 0`` -> ``H_ii = 1`` and ``W[:, i] = 0``;
* dampening: ``H += damp * mean(diag(H)) * I`` (after the dead fix and act-order permute);
* lazy batches of ``block_size`` columns: the updates inside a block are applied at once to
  the columns after it (``W[:, i2:] -= E_block @ U[i1:i2, i2:]``) -- mathematically the same
  result, the work becomes matrix products;
* groups: when column ``c`` starts a group (``c % group_size == 0``) its grid is recomputed
  from ``W[:, c:c+group_size]`` *as of the start of the current block* (AutoGPTQ reads the
  block-start ``W``, not the in-block working copy; with ``group_size=128=block_size`` the two
  coincide). ``group_size=-1``: one grid per output row from the original ``W``;
* act_order: permute columns by descending ``diag(H)`` (stable sort), un-permute at the end.
  Groups are then consecutive in the *permuted* order: column ``j``'s grid is
  ``scales[:, g_idx[j]]`` with ``g_idx[j] = invperm[j] // group_size``;
* static_groups: every group's grid is computed up front from the (dead-fixed, unpermuted)
  ``W[:, k*g:(k+1)*g]``; then ``g_idx[j] = j // group_size`` even with act_order.

How it is computed here (same result, different bookkeeping). Write ``H = V V^T`` with
``V`` upper triangular (``V = J chol(J H J) J``, ``J`` the reversal); then ``U = V^-1``
(``U^T U = (V V^T)^-1``), so the inverse is never formed. With ``D = W - Q`` (original
weight minus quantized), ``W - Q = E U`` gives ``E = D V``, and AutoGPTQ's block-start weight
for a block ``b`` (columns ``i1:i2``) is::

    X_b = W_b - E_<i1 U[<i1, b] = W_b + A_b U_bb,   A_b = D_<i1 V[<i1, b]

(block-triangular inverse: ``U[<i1, b] = -U[<i1,<i1] V[<i1, b] U_bb`` and
``E_<i1 U[<i1,<i1] = D_<i1``). So the loop keeps an accumulator ``A += D_b V[b, later]``
(plain products with ``V``), turns it into AutoGPTQ's ``X_b`` with the block's diagonal
inverse ``U_bb = V_bb^-1`` (a 128 x 128 triangular inverse), and runs AutoGPTQ's in-block
recursion with ``U_bb``. Group grids are then taken from exactly AutoGPTQ's ``X_b``. Work:
one ``in^3/3`` Cholesky instead of AutoGPTQ's Cholesky + inverse + Cholesky (``4/3 in^3``),
plus the ``out*in^2`` updates.

Implementation (one `jax.jit`; nothing is unrolled per column, block or tile, so the traced
program has the same size for every width; tests check it):

* the weight is processed transposed (``[in, out]``) so a column is a contiguous row;
* the Cholesky is a blocked right-looking algorithm over 512 x 512 tiles in `fori_loop`s
  with tile-dependent trip counts (`cholesky_lower`); only 128 x 128 LAPACK calls remain, as
  large multi-threaded OpenBLAS calls slow down 10-30x when the CPU is shared;
* the columns form ``>= 8`` equal chunks; a `fori_loop` over chunks, inside it one over
  blocks, inside it one over sub-blocks of 16 columns, inside it one over columns. Rank-1
  updates stay in the sub-block; sub-block errors reach the rest of the block, block errors
  the rest of the chunk, with one product each (``U``/``V`` are triangular, so finished rows
  receive exact zeros: no masks); chunk errors reach each later chunk with one
  ``[C, C] x [C, out]`` product in a loop whose trip count depends on the chunk index, so the
  total work is the triangular ``out*in^2`` (+ ``1/8`` within chunks), like AutoGPTQ's;
* widths that are not a multiple of ``block_size`` are padded with dead columns (zero
  weight, identity Hessian block), which never interact with the real ones;
* divisions by a scale or by ``U_ii`` are true IEEE divisions (`exact_div`), as in torch.

The result equals AutoGPTQ's up to fp32 rounding. GPTQ feeds each rounding back into the
rest of its row, so a near-tie that rounds the other way changes the rest of that row; the
tests accept the agreement a float64 run of the reference reaches against its fp32 run
(usually 100 % of codes on well-conditioned Hessians).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from qdlm_jax.quant.cholesky_core import tri_inv_lower, upper_cholesky_factor
from qdlm_jax.quant.quantizer_core import (
    SUPPORTED_BITS,
    exact_div,
    params_from_minmax,
    resolve_group_size,
)

_MIN_CHUNKS = 8  # the column range is cut into at least this many chunks (see module doc)
_SUB = 16  # columns per sub-block inside a block (rank-1 updates stay this narrow)


# ----------------------------------------------------------------------------------------
# Hessian accumulation
# ----------------------------------------------------------------------------------------


def hessian(gram: Float[Array, "in in"], weight_sum: float | Float[Array, ""]
            ) -> Float[Array, "in in"]:
    """``H = 2 / (sum_j c_j) * sum_j c_j x_j x_j^T`` from the token-weighted Gram matrix
    ``gram = sum_j c_j x_j x_j^T`` of a layer's calibration inputs (``c = 1`` for plain
    calibration; DLLMQuant's certainty weights otherwise). AutoGPTQ divides by sequences,
    not tokens; GPTQ's result does not depend on the scale of H."""
    return 2.0 * gram / jnp.maximum(jnp.asarray(weight_sum, jnp.float32), 1e-12)


# ----------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------


class GPTQResult(NamedTuple):
    w_dequantized: Float[Array, "out in"]  # scale * (codes - zero), fp32
    codes: Int[Array, "out in"]  # int32 in [0, 2**bits - 1]
    scales: Float[Array, "out groups"]  # groups in g_idx order
    zeros: Float[Array, "out groups"]  # integer-valued; 2**(bits-1) when sym
    g_idx: Int[Array, "in"]  # group of each input column (j // group_size unless act_order
    #                          without static_groups)


def _check(w_shape, h_shape, bits, group_size, block_size, act_order, static_groups, damp):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq: bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if len(w_shape) != 2:
        raise ValueError(f"gptq: w must be 2-D [out, in], got shape {w_shape}")
    n_in = w_shape[1]
    if tuple(h_shape) != (n_in, n_in):
        raise ValueError(f"gptq: h has shape {tuple(h_shape)}, expected [in, in] = "
                         f"{(n_in, n_in)} for w {tuple(w_shape)} (w is [out, in])")
    gs = resolve_group_size(group_size, n_in)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"gptq: block_size={block_size!r}; use a positive int (e.g. 128)")
    if group_size != -1 and block_size % gs and gs % block_size:
        raise ValueError(f"gptq: group_size={gs} and block_size={block_size}: one must divide "
                         "the other (e.g. group 32/64/128 with block 128)")
    if static_groups and group_size == -1:
        raise ValueError("gptq: static_groups=True needs a group_size (not -1)")
    if not 0 <= damp:
        raise ValueError(f"gptq: damp={damp!r}; use a non-negative fraction (e.g. 0.01)")
    return gs


def gptq(w: Float[Array, "out in"], h: Float[Array, "in in"], *, bits: int, group_size: int,
         sym: bool, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         static_groups: bool = False) -> GPTQResult:
    """GPTQ-quantize ``w[out, in]`` given the input Hessian ``h[in, in]`` (see module doc).

    Returns `GPTQResult(w_dequantized, codes, scales, zeros, g_idx)`; the first four are
    AutoGPTQ's ``Q``, integer codes and the grids (``[out, n_groups]``, ``n_groups = 1`` per
    channel). Column ``j`` uses ``scales[:, g_idx[j]]``; ``g_idx`` is ``j // group_size``
    except with act_order and dynamic groups (AutoGPTQ's ``g_idx`` convention).
    """
    _check(w.shape, h.shape, bits, group_size, block_size, act_order, static_groups, damp)
    kw = dict(bits=bits, group_size=group_size, sym=sym, damp=float(damp),
              block_size=block_size, act_order=act_order, static_groups=static_groups)
    out, n_in = w.shape
    # Tiny layers are compile-bound: XLA's backend optimisation level 0 halves compile time
    # there. Not for real layers: it doubles run time (1024^2: 0.24 -> 0.48 s), and a driver
    # compiles once per shape but runs every layer. (Inside an outer jit both inline.)
    small = out * n_in * n_in <= _SMALL_LAYER_MACS
    return (_gptq_jit_small if small else _gptq_jit)(w, h, **kw)


_SMALL_LAYER_MACS = 2 ** 26  # out * in^2, e.g. 64 x 1024 or 1024 x 256
_STATIC = ("bits", "group_size", "sym", "damp", "block_size", "act_order", "static_groups")


def _gptq_impl(w, h, *, bits, group_size, sym, damp, block_size, act_order, static_groups):
    out, n_in = w.shape
    maxq = 2 ** bits - 1
    gs = resolve_group_size(group_size, n_in)
    per_channel = group_size == -1
    W = w.astype(jnp.float32)
    H = h.astype(jnp.float32)

    # Per-channel grid from the original W (AutoGPTQ computes it before the dead fix).
    if per_channel:
        pc_scale, pc_zero = params_from_minmax(W.min(1), W.max(1), bits=bits, sym=sym)

    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(jnp.float32))
    W = jnp.where(dead[None, :], 0.0, W)

    if static_groups:
        wg = W.reshape(out, n_in // gs, gs)
        st_scale, st_zero = params_from_minmax(wg.min(-1), wg.max(-1), bits=bits, sym=sym)

    perm = invperm = None
    if act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True)
        invperm = jnp.argsort(perm)
        W = W[:, perm]
        H = H[perm][:, perm]

    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(n_in, dtype=jnp.float32)

    # Pad to whole blocks with dead columns (identity Hessian block, zero weight).
    dyn_large = (not per_channel and not static_groups and gs > block_size)
    unit = gs if dyn_large else block_size
    n_pad = -(-n_in // unit) * unit
    V = upper_cholesky_factor(H)  # H = V V^T
    Wt = W.T  # [in, out]: column i of W is row i
    if n_pad != n_in:
        p = n_pad - n_in
        V = jnp.pad(V, ((0, p), (0, p))) + jnp.diag(
            jnp.concatenate([jnp.zeros(n_in), jnp.ones(p)]).astype(jnp.float32))
        Wt = jnp.pad(Wt, ((0, p), (0, 0)))
    # Diagonal blocks of U = V^-1 (the inverse of a block-triangular matrix has the inverses
    # of its diagonal blocks on its diagonal): [n_pad / unit, unit, unit].
    n_unit_blocks = n_pad // unit
    V_diag = jax.vmap(lambda i, v=V: lax.dynamic_slice(v, (i * unit, i * unit),
                                                       (unit, unit)))(
        jnp.arange(n_unit_blocks))
    UT_diag = tri_inv_lower(jnp.swapaxes(V_diag, 1, 2))  # (V_bb^T)^-1 = U_bb^T
    U_diag = jnp.swapaxes(UT_diag, 1, 2)
    # Products below contract V's first axis; XLA:CPU's GEMM is ~2x faster with the
    # contracted axis last, so keep V^T (one n^2 transpose).
    VT = V.T
    del V

    # Fixed per-column grids, [n_pad, out] (rows = processing order), when known up front.
    fixed = None
    if per_channel:
        fixed = (jnp.broadcast_to(pc_scale, (n_pad, out)), jnp.broadcast_to(pc_zero, (n_pad, out)))
    elif static_groups:
        col_group = (perm if act_order else jnp.arange(n_in)) // gs
        col_group = jnp.pad(col_group, (0, n_pad - n_in))  # pad columns: any grid (w = 0)
        fixed = (st_scale.T[col_group], st_zero.T[col_group])

    n_groups_pad = n_pad // gs
    group_scale = jnp.ones((n_groups_pad, out), jnp.float32)
    group_zero = jnp.zeros((n_groups_pad, out), jnp.float32)
    cur = (jnp.ones((out,), jnp.float32), jnp.zeros((out,), jnp.float32))

    units_per_chunk = _units_per_chunk(n_unit_blocks)
    C = units_per_chunk * unit  # chunk width (columns)
    m = n_pad // C  # number of chunks
    n_blocks = C // block_size
    sub = math.gcd(block_size, _SUB)

    def block_body(b, carry, c0, Wc, VTc):
        Ac, Qc, Dc, group_scale, group_zero, cur = carry
        r0 = b * block_size
        col0 = c0 + r0  # absolute column (processing order) of the block start
        u, off = col0 // unit, col0 % unit
        U1 = lax.dynamic_slice(U_diag[u], (off, off), (block_size, block_size))
        UT1 = lax.dynamic_slice(UT_diag[u], (off, off), (block_size, block_size))
        W1 = lax.dynamic_slice_in_dim(Wc, r0, block_size)
        A1 = lax.dynamic_slice_in_dim(Ac, r0, block_size)
        X1 = W1 + jnp.einsum("ji,io->jo", UT1, A1)  # W as AutoGPTQ has it at block start
        if fixed is not None:
            S1 = lax.dynamic_slice_in_dim(fixed[0], col0, block_size)
            Z1 = lax.dynamic_slice_in_dim(fixed[1], col0, block_size)
        elif not dyn_large:  # groups inside the block, from the block-start W
            wg = X1.reshape(block_size // gs, gs, out)
            s, z = params_from_minmax(wg.min(1), wg.max(1), bits=bits, sym=sym)
            group_scale = lax.dynamic_update_slice_in_dim(group_scale, s, col0 // gs, 0)
            group_zero = lax.dynamic_update_slice_in_dim(group_zero, z, col0 // gs, 0)
            S1 = jnp.repeat(s, gs, axis=0, total_repeat_length=block_size)
            Z1 = jnp.repeat(z, gs, axis=0, total_repeat_length=block_size)
        else:  # a group spans several blocks: new grid when a group starts here (off == 0)
            Wg = lax.dynamic_slice_in_dim(Wc, r0, gs)
            Ag = lax.dynamic_slice_in_dim(Ac, r0, gs)
            Xg = Wg + jnp.einsum("ji,io->jo", UT_diag[u], Ag)
            s, z = params_from_minmax(Xg.min(0), Xg.max(0), bits=bits, sym=sym)
            starts = off == 0
            cur = (jnp.where(starts, s, cur[0]), jnp.where(starts, z, cur[1]))
            g = col0 // gs
            group_scale = lax.dynamic_update_slice_in_dim(group_scale, cur[0][None], g, 0)
            group_zero = lax.dynamic_update_slice_in_dim(group_zero, cur[1][None], g, 0)
            S1 = jnp.broadcast_to(cur[0], (block_size, out))
            Z1 = jnp.broadcast_to(cur[1], (block_size, out))
        Q1, DQ1 = _quantize_block(X1, U1, UT1, S1, Z1, maxq=maxq, sub=sub)
        D1 = W1 - DQ1  # original weight minus its quantized value
        # Block's contribution to every later column of the chunk: A += V[block, :]^T D1.
        # V is upper triangular, so earlier rows get exact zeros; the block's own rows are
        # never read again.
        VT_cols = lax.dynamic_slice_in_dim(VTc, r0, block_size, axis=1)  # V[block, chunk]^T
        Ac = Ac + jnp.einsum("cb,bo->co", VT_cols, D1)
        Qc = lax.dynamic_update_slice_in_dim(Qc, Q1, r0, 0)
        Dc = lax.dynamic_update_slice_in_dim(Dc, D1, r0, 0)
        return Ac, Qc, Dc, group_scale, group_zero, cur

    def chunk_body(k, carry):
        At, Qt, group_scale, group_zero, cur = carry
        c0 = k * C
        Wc = lax.dynamic_slice_in_dim(Wt, c0, C)
        Ac = lax.dynamic_slice_in_dim(At, c0, C)
        VTc = lax.dynamic_slice(VT, (c0, c0), (C, C))
        zc = jnp.zeros_like(Wc)
        _, Qc, Dc, group_scale, group_zero, cur = lax.fori_loop(
            0, n_blocks, functools.partial(block_body, c0=c0, Wc=Wc, VTc=VTc),
            (Ac, zc, zc, group_scale, group_zero, cur))
        Qt = lax.dynamic_update_slice_in_dim(Qt, Qc, c0, 0)

        # The chunk's contribution to every later chunk, one [C, C] x [C, out] product each
        # (exact triangular work; dynamic trip count, nothing unrolled).
        def trailing(j, At):
            VTjk = lax.dynamic_slice(VT, (j * C, c0), (C, C))  # V[chunk k, chunk j]^T
            Aj = lax.dynamic_slice_in_dim(At, j * C, C)
            return lax.dynamic_update_slice_in_dim(
                At, Aj + jnp.einsum("cb,bo->co", VTjk, Dc), j * C, 0)

        At = lax.fori_loop(k + 1, m, trailing, At)
        return At, Qt, group_scale, group_zero, cur

    _, Qt, group_scale, group_zero, cur = lax.fori_loop(
        0, m, chunk_body, (jnp.zeros_like(Wt), jnp.zeros_like(Wt), group_scale, group_zero, cur))
    codes = Qt[:n_in].T  # Qt is [in, out] in processing order
    if fixed is not None and per_channel:
        scales, zeros = pc_scale[:, None], pc_zero[:, None]
        g_idx = jnp.zeros((n_in,), jnp.int32)
    elif static_groups:
        scales, zeros = st_scale, st_zero
        g_idx = jnp.arange(n_in, dtype=jnp.int32) // gs
    else:
        scales = group_scale[: n_in // gs].T
        zeros = group_zero[: n_in // gs].T
        g_idx = jnp.arange(n_in, dtype=jnp.int32) // gs
    if act_order:
        codes = codes[:, invperm]
        if not static_groups and not per_channel:
            g_idx = invperm.astype(jnp.int32) // gs
    col_scale = scales[:, g_idx]
    col_zero = zeros[:, g_idx]
    w_hat = col_scale * (codes - col_zero)
    return GPTQResult(w_hat, codes.astype(jnp.int32), scales, zeros, g_idx)


_gptq_jit = jax.jit(_gptq_impl, static_argnames=_STATIC)
_gptq_jit_small = jax.jit(_gptq_impl, static_argnames=_STATIC,
                          compiler_options={"xla_backend_optimization_level": 0})


def _units_per_chunk(n_units: int) -> int:
    """Largest divisor of `n_units` giving at least `_MIN_CHUNKS` chunks (1 if too few)."""
    target = max(1, n_units // _MIN_CHUNKS)
    return max(d for d in range(1, target + 1) if n_units % d == 0)


def _quantize_block(W1: Float[Array, "B out"], U1: Float[Array, "B B"],
                    UT1: Float[Array, "B B"], S1: Float[Array, "B out"],
                    Z1: Float[Array, "B out"], *, maxq: int, sub: int):
    """GPTQ over one block (rows of ``W1`` are columns of W). Returns (codes, errors) [B, out].

    Sub-blocks of `sub` rows: column-by-column rank-1 updates stay inside the sub-block; the
    sub-block's errors reach the rest of the block as one product ``U1[sub, :]^T @ E_sub``.
    """
    B = W1.shape[0]

    def sub_body(j, carry):
        W1, Q1, DQ1 = carry
        s0 = j * sub
        Ws = lax.dynamic_slice_in_dim(W1, s0, sub)
        Us = lax.dynamic_slice(U1, (s0, s0), (sub, sub))
        Ss = lax.dynamic_slice_in_dim(S1, s0, sub)
        Zs = lax.dynamic_slice_in_dim(Z1, s0, sub)

        def col_body(i, c):
            Ws, Qs, DQs, Es = c
            w = Ws[i]
            s, z = Ss[i], Zs[i]
            q = jnp.clip(jnp.round(exact_div(w, s)) + z, 0, maxq)
            dq = s * (q - z)
            err = exact_div(w - dq, Us[i, i])  # true division, as torch
            Ws = Ws - Us[i][:, None] * err[None, :]  # entries of earlier rows are exact zeros
            return Ws, Qs.at[i].set(q), DQs.at[i].set(dq), Es.at[i].set(err)

        zs = jnp.zeros_like(Ws)
        _, Qs, DQs, Es = lax.fori_loop(0, sub, col_body, (Ws, zs, zs, zs))
        UT_cols = lax.dynamic_slice_in_dim(UT1, s0, sub, axis=1)  # U1[sub, :]^T
        W1 = W1 - jnp.einsum("bs,so->bo", UT_cols, Es)
        return (W1, lax.dynamic_update_slice_in_dim(Q1, Qs, s0, 0),
                lax.dynamic_update_slice_in_dim(DQ1, DQs, s0, 0))

    z = jnp.zeros_like(W1)
    _, Q1, DQ1 = lax.fori_loop(0, B // sub, sub_body, (W1, z, z))
    return Q1, DQ1


__all__ = ["GPTQResult", "gptq", "hessian"]
