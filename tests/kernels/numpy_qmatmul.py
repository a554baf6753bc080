"""Plain NumPy statement of the low-bit matmul, written from the formulas in docs/kernels.md
(not from the code under test): unpack the bytes, dequantize, multiply.

    code[n, 2j] = byte[n, j] & 15, code[n, 2j + 1] = byte[n, j] >> 4      (4 bits)
    w_hat[n, k] = scale[n, k // gs] * (code[n, k] - zero[n, k // gs])    zero = 2**(b-1) if sym
    weight-only: y = x @ w_hat.T                                          (float64 here)
    act_bits:    qmax = 2**(a-1) - 1, s_x = max|x_row| / qmax, x_q = clip(round(x / s_x))
                 y = (sum_g int(x_q_g . (code_g - zero_g)) * scale_g) * s_x   (float32 steps)
    act groups:  s_x[m, a] = max|x[m, group a]| / qmax; over the finer nested groups u,
                 y = sum_u (int(x_q_u . (code_u - zero_g(u))) * scale_g(u)) * s_x_a(u)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qdlm_jax.quant.qarray import QuantizedArray


def random_weight(rng, k: int, n: int, *, bits: int, group_size: int, sym: bool,
                  scale_dtype=jnp.float32) -> QuantizedArray:
    """A packed "in_out" weight (logical [k, n]) with uniformly random codes and grid."""
    gs = k if group_size == -1 else group_size
    codes = rng.integers(0, 2 ** bits, (n, k))
    scale = rng.uniform(0.005, 0.02, (n, k // gs)).astype(np.float32)
    zero = None if sym else rng.integers(0, 2 ** bits, (n, k // gs)).astype(np.float32)
    return QuantizedArray.from_codes(jnp.asarray(codes), jnp.asarray(scale),
                                     None if zero is None else jnp.asarray(zero), bits=bits,
                                     group_size=gs, sym=sym, scale_dtype=scale_dtype)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    packed = np.asarray(packed).astype(np.int64)
    if bits == 8:
        return packed[:, :count]
    assert bits == 4
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.int64)
    codes[:, 0::2] = packed & 15
    codes[:, 1::2] = packed >> 4
    return codes[:, :count]


def grid(w: QuantizedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [n, k], scale [n, groups] float32, zero [n, groups] int64)."""
    k, n = w.shape
    codes = unpack(w.packed, w.bits, k)
    scale = np.asarray(w.scale.astype(jnp.float32))
    groups = scale.shape[1]
    if w.zero is None:
        zero = np.full((n, groups), 2 ** (w.bits - 1), np.int64)
    else:
        zero = unpack(w.zero, w.bits, groups)
    return codes, scale, zero


def dequantize(w: QuantizedArray) -> np.ndarray:
    """w_hat [n, k] in float64."""
    codes, scale, zero = grid(w)
    gs = w.group_size
    return (np.repeat(scale, gs, axis=1).astype(np.float64)
            * (codes - np.repeat(zero, gs, axis=1)))


def weight_only(x, w: QuantizedArray) -> np.ndarray:
    """x @ w_hat.T in float64 (x given in whatever float dtype; read as float64)."""
    x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    return x64 @ dequantize(w).T


def quantize_activations(x, bits: int, group_size: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(x_q [rows, k], s_x [rows, groups]): one scale per row, or per `group_size` columns."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    xf = np.asarray(jnp.asarray(x).astype(jnp.float32))
    gs = xf.shape[-1] if group_size is None else group_size
    x_q = np.empty(xf.shape, np.int64)
    s_x = np.empty((xf.shape[0], xf.shape[-1] // gs), np.float32)
    for a in range(s_x.shape[1]):
        cols = slice(a * gs, (a + 1) * gs)
        amax = np.max(np.abs(xf[:, cols]), axis=-1, keepdims=True)
        s = np.where(amax > 0, amax / qmax, np.float32(1)).astype(np.float32)
        x_q[:, cols] = np.clip(np.round(xf[:, cols] / s), -qmax, qmax)
        s_x[:, a] = s[:, 0]
    return x_q, s_x


def act_quant(x, w: QuantizedArray, act_bits: int, act_group_size: int | None = None
              ) -> np.ndarray:
    """The integer formula, float32 result (before the cast to x's dtype)."""
    if act_group_size is not None:
        return _act_group_quant(x, w, act_bits, act_group_size)
    x_q, s_x = quantize_activations(x, act_bits)
    codes, scale, zero = grid(w)
    gs = w.group_size
    acc = np.zeros((x_q.shape[0], codes.shape[0]), np.float32)
    for g in range(scale.shape[1]):
        cols = slice(g * gs, (g + 1) * gs)
        acc_g = x_q[:, cols] @ (codes[:, cols] - zero[:, g:g + 1]).T  # exact int64
        acc = acc + acc_g.astype(np.float32) * scale[:, g][None, :]
    return acc * s_x


def _act_group_quant(x, w: QuantizedArray, act_bits: int, ga: int) -> np.ndarray:
    x_q, s_x = quantize_activations(x, act_bits, ga)
    codes, scale, zero = grid(w)
    gs = w.group_size
    unit = min(ga, gs)
    acc = np.zeros((x_q.shape[0], codes.shape[0]), np.float32)
    for u in range(codes.shape[1] // unit):
        cols = slice(u * unit, (u + 1) * unit)
        g, a = u * unit // gs, u * unit // ga
        acc_u = x_q[:, cols] @ (codes[:, cols] - zero[:, g:g + 1]).T  # exact int64
        acc = acc + (acc_u.astype(np.float32) * scale[:, g][None, :]) * s_x[:, a:a + 1]
    return acc
