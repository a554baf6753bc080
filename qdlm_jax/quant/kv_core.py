"""K/V activation quantization inside attention, and DLLMQuant's IA-AQ search (pure, jittable).

Keys and values are quantized where attention reads them: K after RoPE (and after QuaRot's
online Hadamard over the head dimension, applied to q and k alike so q k^T is unchanged), V
as v_proj produces it. Both have shape [B, T, H_kv, hd]. Fake quantization, b bits, with a
clip ratio c per kv head (1 = no clipping):

    granularity  one (scale, zero) per
    per_head     (token, head): over the head's hd channels (QuaRot's K/V groups)
    per_channel_group
                 (token, head, group of `group_size` consecutive channels of the head):
                 `group_size` divides hd; group_size = hd is `per_head`
    per_token_group
                 (group of `group_size` consecutive tokens, head, channel): KIVI-style, one
                 range per channel over a token group (the last group may be shorter)

    symmetric:  s = max(c * max|x|, 1e-5) / (2^(b-1) - 1),  q = clamp(round(x / s),
                -2^(b-1), 2^(b-1) - 1),  x_hat = s q
    asymmetric: lo = c * min x, hi = c * max x,  s = max(hi - lo, 1e-5) / (2^b - 1),
                z = round(-lo / s),  q = clamp(round(x / s) + z, 0, 2^b - 1),  x_hat = s (q - z)

16 bits means float (the identity).

IA-AQ (interaction-aware activation quantization; DLLMQuant, no official code; choices
documented in docs/weight_activation.md): on calibration inputs, with the attention
probabilities P[b, h, i, j] (bidirectional: every query reads every key) and the importance
of token i in its sequence

    imp[b, kv, i] = sum_j mean_{h in kv's query heads} P[b, h, j, i]   (how much the other
                                                                         tokens read token i)

the clip ratio of each kv head is the grid point with the lowest importance-weighted error
of the attention output:

    V:  err_kv(c) = sum_{b, i} imp[b, kv, i]
                    * sum_{h in kv} || P[b, h, i, :] (V - V_hat_c)[b, :, kv] ||^2
    K:  err_kv(c) = sum_{b, i} imp[b, kv, i]
                    * sum_{h in kv} || (P_hat_c - P)[b, h, i, :] V[b, :, kv] ||^2
        (P_hat_c: the probabilities with K_hat_c). Heads are independent, so the per-head
        argmin is the joint argmin.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

KV_GRANULARITIES = ("per_head", "per_channel_group", "per_token_group")
_MIN_RANGE = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVSpec:
    """How keys and values are quantized inside attention (hashable: static under jit)."""

    bits: int = 8  # 16 = float
    granularity: str = "per_head"
    sym: bool = False
    group_size: int = 64  # per_token_group: tokens; per_channel_group: channels of a head

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError(f"KVSpec.bits={self.bits!r}: expected 16 (float) or 2..8")
        if self.granularity not in KV_GRANULARITIES:
            raise ValueError(f"KVSpec.granularity={self.granularity!r}: expected one of "
                             f"{KV_GRANULARITIES}")
        if self.group_size <= 0:
            raise ValueError(f"KVSpec.group_size={self.group_size!r}: expected > 0")


def default_grid(n: int = 10, lowest: float = 0.55) -> np.ndarray:
    """Clip ratios 1.0 down to `lowest`, n points."""
    return np.linspace(1.0, lowest, n).astype(np.float32)


def kv_fake_quant(x: Float[Array, "B T H D"], spec: KVSpec | None,
                  clip: Float[Array, "H"] | float | None = None  # noqa: F821 (a shape)
                  ) -> jax.Array:
    """x_hat (module docstring) in x's dtype; identity for None or 16 bits."""
    if spec is None or spec.bits >= 16:
        return x
    b, t, h, d = x.shape
    xf = x.astype(jnp.float32)
    c = jnp.ones((h,), jnp.float32) if clip is None else jnp.broadcast_to(
        jnp.asarray(clip, jnp.float32), (h,))
    if spec.granularity == "per_channel_group" and d % spec.group_size:
        raise ValueError(f"KVSpec.group_size={spec.group_size} does not divide the head dim "
                         f"{d} (per_channel_group); use a divisor of {d}")
    if spec.granularity != "per_token_group":  # ranges over (groups of) a head's channels
        g = d if spec.granularity == "per_head" else spec.group_size
        xf = xf.reshape(b, t, h, d // g, g)
        lo = jnp.min(xf, axis=-1, keepdims=True)
        hi = jnp.max(xf, axis=-1, keepdims=True)
        c = c[:, None, None]
    else:
        g = spec.group_size
        pad = (-t) % g
        xp = jnp.pad(xf, ((0, 0), (0, pad), (0, 0), (0, 0)), mode="edge") if pad else xf
        xg = xp.reshape(b, (t + pad) // g, g, h, d)
        lo = jnp.repeat(jnp.min(xg, axis=2), g, axis=1)[:, :t]
        hi = jnp.repeat(jnp.max(xg, axis=2), g, axis=1)[:, :t]
        c = c[:, None]
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        s = jnp.maximum(c * jnp.maximum(-lo, hi), _MIN_RANGE) / qmax
        q = jnp.clip(jnp.round(xf / s), -qmax - 1, qmax)
        return (s * q).reshape(x.shape).astype(x.dtype)
    maxq = 2 ** spec.bits - 1
    lo, hi = c * lo, c * hi
    s = jnp.maximum(hi - lo, _MIN_RANGE) / maxq
    z = jnp.round(-lo / s)
    q = jnp.clip(jnp.round(xf / s) + z, 0, maxq)
    return (s * (q - z)).reshape(x.shape).astype(x.dtype)


def attention_probs(q: Float[Array, "B Tq H D"], k: Float[Array, "B T KV D"],
                    key_bias=None) -> jax.Array:
    """softmax(q k^T / sqrt(hd) + key_bias) as [B, KV, G, Tq, T] in fp32 (the model's
    arithmetic, GQA grouping)."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, tq, kv, h // kv, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(d))
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, None, :]
    return jax.nn.softmax(scores, axis=-1)


def token_importance(p: Float[Array, "B KV G Tq T"]) -> jax.Array:
    """imp[b, kv, i]: column sums of the probabilities, averaged over kv's query heads."""
    return jnp.mean(jnp.sum(p, axis=3), axis=2)


@jax.jit
def _v_errors_one(p, imp, v, v_hat):
    dv = (v - v_hat).astype(jnp.float32)  # [B, T, KV, D]
    e = jnp.einsum("bkgqs,bskd->bkgqd", p, dv)
    return jnp.einsum("bkq,bkgqd->k", imp, e * e)


def v_errors(q, k, v, spec: KVSpec, grid, key_bias=None, k_hat=None) -> jax.Array:
    """[len(grid), KV] importance-weighted attention-output errors of V quantized with each
    clip ratio (module docstring); P from `k_hat` (the keys the model will use) if given."""
    p = attention_probs(q, k if k_hat is None else k_hat, key_bias)
    imp = token_importance(p)
    return jnp.stack([_v_errors_one(p, imp, v, kv_fake_quant(v, spec, c)) for c in grid])


def k_errors(q, k, v, spec: KVSpec, grid, key_bias=None) -> jax.Array:
    """[len(grid), KV] importance-weighted attention-output errors of K quantized with each
    clip ratio (module docstring)."""
    p = attention_probs(q, k, key_bias)
    imp = token_importance(p)
    vf = v.astype(jnp.float32)

    @jax.jit
    def one(k_hat):
        dp = attention_probs(q, k_hat, key_bias) - p
        e = jnp.einsum("bkgqs,bskd->bkgqd", dp, vf)
        return jnp.einsum("bkq,bkgqd->k", imp, e * e)

    return jnp.stack([one(kv_fake_quant(k, spec, c)) for c in grid])


def best_clip(errors: Float[Array, "N KV"], grid) -> jax.Array:
    """Per kv head, the grid point with the lowest error (the first on ties)."""
    return jnp.asarray(np.asarray(grid, np.float32))[jnp.argmin(errors, axis=0)]
