"""Hadamard matrices and the fast Walsh-Hadamard transform, for widths n = K * 2^m.

A Hadamard matrix H_n has entries +-1 and H_n H_n^T = n I, so H_n / sqrt(n) is orthogonal.
For n = K * 2^m we use the Kronecker product

    H_n = H_K (x) S_{2^m},     S_1 = [1],  S_{2h} = [[S_h, S_h], [S_h, -S_h]]   (Sylvester)

with H_K a Paley construction (q an odd prime, chi the Legendre symbol mod q, and the
Jacobsthal matrix Q[i, j] = chi(j - i)):

    Paley I  (q = 3 mod 4, K = q + 1):     H = I + [[0, 1^T], [-1, Q]]
    Paley II (q = 1 mod 4, K = 2(q + 1)):  C = [[0, 1^T], [1, Q]], each entry e of C replaced
                                           by [[1, -1], [-1, -1]] if e = 0 else e [[1, 1], [1, -1]]

This covers every power of two and the real model widths: 12288 = 12 * 2^10 (Paley I, q=11),
3584 = 28 * 2^7 (Paley II, q=13), 18944 = 148 * 2^7 (Paley II, q=73).

`hadamard_transform(x)` computes x @ H_n / sqrt(n) on the last axis in O(n log n + n K): m
butterfly stages (a, b) -> (a + b, a - b) for the Sylvester factor, one dense K x K product for
the rest. For powers of two, H_n equals `scipy.linalg.hadamard(n)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley_order(k: int) -> str | None:
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "I"
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "II"
    return None


@functools.lru_cache(maxsize=None)
def paley_hadamard(k: int) -> np.ndarray:
    """A +-1 Hadamard matrix of order k (Paley I or II; see the module docstring)."""
    kind = _paley_order(k)
    if kind == "I":
        q = k - 1
        s = np.zeros((k, k), np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        h = np.eye(k, dtype=np.int64) + s
    elif kind == "II":
        q = k // 2 - 1
        c = np.zeros((q + 1, q + 1), np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        zero_block = np.array([[1, -1], [-1, -1]])
        one_block = np.array([[1, 1], [1, -1]])
        h = np.block([[zero_block if e == 0 else e * one_block for e in row] for row in c])
    else:
        raise ValueError(f"no Paley construction of a Hadamard matrix of order {k}")
    if not np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64)):  # construction check
        raise AssertionError(f"Paley construction of order {k} is not Hadamard")
    return h


def hadamard_factor(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K * 2^m, K = 1 or a Paley order, 2^m as large as possible."""
    if n <= 0:
        raise ValueError(f"hadamard width n={n}: expected a positive integer")
    pow2 = n & -n
    while pow2 >= 1:
        k = n // pow2
        if k == 1 or _paley_order(k) is not None:
            return k, pow2
        pow2 //= 2
    raise ValueError(f"hadamard width n={n}: no Hadamard matrix of order n = K * 2^m with K "
                     "a Paley order (K - 1 a prime = 3 mod 4, or K/2 - 1 a prime = 1 mod 4)")


def supports(n: int) -> bool:
    try:
        hadamard_factor(n)
        return True
    except ValueError:
        return False


def hadamard_matrix(n: int) -> np.ndarray:
    """The dense +-1 matrix H_n = H_K (x) S_{2^m} (for tests and small widths)."""
    k, p = hadamard_factor(n)
    s = np.ones((1, 1), np.int64)
    while s.shape[0] < p:
        s = np.block([[s, s], [s, -s]])
    hk = np.ones((1, 1), np.int64) if k == 1 else paley_hadamard(k)
    return np.kron(hk, s)


def _sylvester_butterflies(x: jax.Array) -> jax.Array:
    """x @ S_p on the last axis (unnormalised), p = x.shape[-1] a power of two."""
    p = x.shape[-1]
    h = 1
    while h < p:
        y = x.reshape(*x.shape[:-1], p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape)
        h *= 2
    return x


@functools.partial(jax.jit, static_argnames="normalize")
def hadamard_transform(x: Float[Array, "... n"], *, normalize: bool = True) -> jax.Array:
    """x @ H_n (/ sqrt(n) if `normalize`) on the last axis, in fp32, cast back to x.dtype.

    Jitted: called eagerly (rotating weights, tests) its log2(n) butterfly stages would each
    dispatch and compile five small ops; jitted they compile once per shape."""
    n = x.shape[-1]
    k, p = hadamard_factor(n)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], k, p)
    y = _sylvester_butterflies(y)
    if k > 1:
        hk = jnp.asarray(paley_hadamard(k), jnp.float32)
        y = jnp.einsum("...kj,kl->...lj", y, hk)
    y = y.reshape(x.shape)
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.astype(x.dtype)


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """A random +-1 vector: Q = diag(signs) H_n / sqrt(n) is QuaRot's random Hadamard rotation."""
    return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)


def rotate(x: Float[Array, "... n"], signs: jax.Array | None = None) -> jax.Array:
    """x @ Q with Q = diag(signs) H_n / sqrt(n) (signs None: Q = H_n / sqrt(n))."""
    if signs is not None:
        x = (x.astype(jnp.float32) * signs).astype(x.dtype)
    return hadamard_transform(x)


def rotate_transpose(x: Float[Array, "... n"], signs: jax.Array | None = None) -> jax.Array:
    """x @ Q^T = (x @ H_n^T / sqrt(n)) * signs: undoes `rotate` (Q is orthogonal)."""
    n = x.shape[-1]
    k, p = hadamard_factor(n)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], k, p)
    y = _sylvester_butterflies(y)  # S is symmetric
    if k > 1:
        hk = jnp.asarray(paley_hadamard(k), jnp.float32)
        y = jnp.einsum("...kj,lk->...lj", y, hk)
    y = y.reshape(x.shape) * (1.0 / math.sqrt(n))
    if signs is not None:
        y = y * signs
    return y.astype(x.dtype)
