"""Cholesky factorisations for GPTQ-style solvers (GPTQ, DAQ), XLA-native.

    cholesky_lower(G) = L,      G = L L^T, L lower triangular (G symmetric positive definite)
    upper_cholesky_factor(H) = V, H = V V^T, V upper triangular: V = J chol(J H J) J with J
                                the reversal; then U = V^-1 is the upper Cholesky factor of
                                H^-1 (U^T U = (V V^T)^-1), AutoGPTQ's "Hinv"
    tri_inv_lower(L) = L^-1     for lower-triangular blocks

`cholesky_lower` is a blocked right-looking algorithm over P x P tiles (P = 128 t, t <= 4)
in `fori_loop`s whose trip counts depend on the tile index: the work is the exact n^3 / 3 in
[P, P] matrix products and nothing is unrolled per tile. Only 128 x 128 LAPACK calls remain:
large LAPACK calls on CPU go to a multi-threaded OpenBLAS that slows down by 10-30x when the
cores are shared (a 1024^2 potrf took 1.2 s instead of 0.04 s on a loaded 2-core machine).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

_LEAF = 128

__all__ = ["cholesky_lower", "tri_inv_lower", "upper_cholesky_factor",
           "upper_cholesky_of_inverse"]


def tri_inv_lower(low: Float[Array, "... u u"]) -> Float[Array, "... u u"]:
    """Inverse of lower-triangular blocks: leaf inverses by triangular solve, then
    X_ba = -X_bb (sum_{a<=c<b} L_bc X_ca) over 128-tiles (u/128 is small, unrolled)."""
    u = low.shape[-1]
    if u <= _LEAF or u % _LEAF:
        eye = jnp.broadcast_to(jnp.eye(u, dtype=low.dtype), low.shape)
        return lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)
    t, n = u // _LEAF, _LEAF
    L = {(a, b): low[..., a * n:(a + 1) * n, b * n:(b + 1) * n]
         for a in range(t) for b in range(a + 1)}
    X = {(a, a): tri_inv_lower(L[a, a]) for a in range(t)}
    for a in range(t):
        for b in range(a + 1, t):
            acc = sum(L[b, c] @ X[c, a] for c in range(a, b))
            X[b, a] = -(X[b, b] @ acc)
    zero = jnp.zeros_like(L[0, 0])
    return jnp.concatenate([jnp.concatenate([X.get((a, b), zero) for b in range(t)], axis=-1)
                            for a in range(t)], axis=-2)


def _cholesky_tile(a: Float[Array, "P P"]):
    """(L, L^-1) of an SPD tile, right-looking over 128-tiles (P/128 <= 4, unrolled)."""
    t, n = a.shape[0] // _LEAF, _LEAF
    A = {(i, j): a[i * n:(i + 1) * n, j * n:(j + 1) * n] for i in range(t) for j in range(i + 1)}
    L, X = {}, {}
    for k in range(t):
        L[k, k] = lax.linalg.cholesky(A[k, k], symmetrize_input=False)
        X[k, k] = tri_inv_lower(L[k, k])
        for i in range(k + 1, t):
            L[i, k] = A[i, k] @ X[k, k].T
        for i in range(k + 1, t):
            for j in range(k + 1, i + 1):
                A[i, j] = A[i, j] - L[i, k] @ L[j, k].T
    for k in range(t):
        for i in range(k + 1, t):
            X[i, k] = -(X[i, i] @ sum(L[i, c] @ X[c, k] for c in range(k, i)))
    zero = jnp.zeros((n, n), a.dtype)

    def full(m):
        return jnp.block([[m.get((i, j), zero) for j in range(t)] for i in range(t)])

    return full(L), full(X)


def cholesky_lower(g: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """Lower Cholesky factor of an SPD matrix (only its lower triangle is read).

    Blocked right-looking algorithm over P x P tiles (P = 128 * t, t <= 4 dividing the
    padded size) with `fori_loop`s whose trip counts depend on the tile index, so the work is
    the exact n^3/3 in [P, P] matrix products and nothing is unrolled per tile:

        L_kk = chol(A_kk);  L_ik = A_ik L_kk^-T (i > k);  A_ij -= L_ik L_jk^T (k < j <= i)
    """
    n = g.shape[0]
    n_pad = -(-n // _LEAF) * _LEAF
    if n_pad != n:  # identity block: L = blockdiag(L, I)
        g = jnp.pad(g, ((0, n_pad - n), (0, n_pad - n)))
        g = g + jnp.diag((jnp.arange(n_pad) >= n).astype(g.dtype))
    units = n_pad // _LEAF
    t = max(d for d in (1, 2, 3, 4) if units % d == 0)
    P = t * _LEAF
    n_tiles = n_pad // P

    def step(k, a):
        k0 = k * P
        Lkk, Xkk = _cholesky_tile(lax.dynamic_slice(a, (k0, k0), (P, P)))
        a = lax.dynamic_update_slice(a, Lkk, (k0, k0))

        def panel(i, a):
            aik = lax.dynamic_slice(a, (i * P, k0), (P, P))
            return lax.dynamic_update_slice(a, jnp.einsum("ab,cb->ac", aik, Xkk), (i * P, k0))

        a = lax.fori_loop(k + 1, n_tiles, panel, a)

        def row(i, a):
            Lik = lax.dynamic_slice(a, (i * P, k0), (P, P))

            def col(j, a):
                Ljk = lax.dynamic_slice(a, (j * P, k0), (P, P))
                aij = lax.dynamic_slice(a, (i * P, j * P), (P, P))
                return lax.dynamic_update_slice(
                    a, aij - jnp.einsum("ab,cb->ac", Lik, Ljk), (i * P, j * P))

            return lax.fori_loop(k + 1, i + 1, col, a)

        return lax.fori_loop(k + 1, n_tiles, row, a)

    low = jnp.tril(lax.fori_loop(0, n_tiles, step, g))
    return low[:n, :n]


def upper_cholesky_factor(h: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """V upper triangular with H = V V^T (a "UL" Cholesky): V = J chol(J H J) J, J = reversal.

    Then U = V^-1 is the upper Cholesky factor of H^-1 (U^T U = V^-T V^-1 = (V V^T)^-1),
    the matrix AutoGPTQ calls Hinv.
    """
    return jnp.triu(cholesky_lower(h[::-1, ::-1])[::-1, ::-1])


def upper_cholesky_of_inverse(h: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """AutoGPTQ's Hinv: U upper triangular with U^T U = H^-1 (= V^-1, see above). The GPTQ
    loop itself never forms it (it only needs U's diagonal blocks); kept for tests."""
    vt = upper_cholesky_factor(h).T
    return tri_inv_lower(vt).T if vt.shape[0] % _LEAF == 0 else jnp.triu(
        jnp.linalg.inv(vt.T))
