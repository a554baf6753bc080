"""QuaRot's computational-invariance transform of a LLaDA / Dream model (flat params in, out).

1. Fold every RMSNorm weight into the linears it feeds (gamma -> 1):
       q/k/v <- attn_norm,  gate/up <- mlp_norm,  lm_head <- final_norm:   W' = diag(gamma) W
2. Rotate the residual stream by Q = diag(signs) H_d / sqrt(d) (random Hadamard):
       embed' = embed Q;  q/k/v/gate/up/lm_head: W' = Q^T W;  o/down: W' = W Q
   RMSNorm with unit weight commutes with Q (||x Q|| = ||x||), so the float model is unchanged.
3. Value/output path, per head: v_proj's output columns of each kv head get H_hd / sqrt(hd)
   (bias too), o_proj's input rows of each query head get its transpose; attention mixes
   positions only, so this cancels exactly.
4. Online transforms (`act_kernel.OnlineTransform`, paired weight T^T W):
       o_proj input: "hadamard_heads" (H_h (x) I_hd mixes the heads; with step 3 the o_proj
                     input is rotated by the full H_h (x) H_hd)
       down_proj input: "hadamard" over the FFN width
   so every linear input is a Hadamard-rotated activation, whose outliers are spread out.

Widths must be n = K * 2^m with a Paley order K (`hadamard_core.hadamard_factor`); the head
mixing of step 4 is skipped (with a note) when the head count is not such a width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qdlm_jax.models.config import ModelConfig
from qdlm_jax.quant import hadamard_core
from qdlm_jax.quant.act_kernel import ActKernel, OnlineTransform

_INPUT_SIDE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@jax.jit
def _scale_rows(w, gamma):
    return (w.astype(jnp.float32) * gamma.astype(jnp.float32)[:, None]).astype(w.dtype)


def fold_norms(params: dict, config: ModelConfig) -> dict:
    """Step 1: every norm weight folded into the following linears, norms set to ones."""
    p = dict(params)
    for i in range(config.num_layers):
        for norm, linears in (("attn_norm", ("q_proj", "k_proj", "v_proj")),
                              ("mlp_norm", ("gate_proj", "up_proj"))):
            gamma = p[("layers", i, norm, "scale")]
            for name in linears:
                key = ("layers", i, name, "kernel")
                p[key] = _scale_rows(p[key], gamma)
            p[("layers", i, norm, "scale")] = jnp.ones_like(gamma)
    gamma = p[("final_norm", "scale")]
    p[("lm_head", "kernel")] = _scale_rows(p[("lm_head", "kernel")], gamma)
    p[("final_norm", "scale")] = jnp.ones_like(gamma)
    return p


@functools.partial(jax.jit, static_argnums=(1, 2))
def _per_head(x, head_dim, transpose_rows=False):
    """Columns (or, with transpose_rows, rows) of x grouped in heads of head_dim, each head
    multiplied by H_hd / sqrt(hd) (columns: x (I (x) H); rows: (I (x) H)^T x)."""
    if transpose_rows:
        return _per_head(x.T, head_dim).T
    lead = x.shape[:-1]
    y = x.reshape(*lead, x.shape[-1] // head_dim, head_dim)
    return hadamard_core.hadamard_transform(y).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def _pair(t: OnlineTransform, w):
    return t.pair_weight(w)


def rotate(params: dict, config: ModelConfig, *, seed: int = 0,
           online_heads: bool = True) -> tuple[dict, dict]:
    """Steps 1-4 on float params. Returns (params, notes); o_proj / down_proj kernels become
    `ActKernel`s carrying their online transform (no activation quantizer yet)."""
    c = config
    for n, what in ((c.hidden_size, "hidden_size"), (c.intermediate_size, "intermediate_size"),
                    (c.head_dim, "head_dim")):
        if not hadamard_core.supports(n):
            raise ValueError(f"QuaRot: {what}={n} has no Hadamard matrix of order K * 2^m "
                             "(K a Paley order); see qdlm_jax/quant/hadamard_core.py")
    notes = {}
    p = fold_norms(params, c)
    signs = hadamard_core.random_signs(jax.random.key(seed), c.hidden_size)

    @jax.jit
    def q_in(w):  # Q^T W for a kernel [d, out]
        return hadamard_core.rotate(w.T, signs).T

    @jax.jit
    def q_out(w):  # W Q for a kernel [in, d]
        return hadamard_core.rotate(w, signs)

    p[("embed",)] = hadamard_core.rotate(p[("embed",)], signs)
    p[("lm_head", "kernel")] = q_in(p[("lm_head", "kernel")])
    heads_ok = online_heads and hadamard_core.supports(c.num_heads)
    if online_heads and not heads_ok:
        notes["online_heads"] = (f"skipped: num_heads={c.num_heads} is not a supported "
                                 "Hadamard width; o_proj inputs are rotated per head only")
    for i in range(c.num_layers):
        def key(name, leaf="kernel"):
            return ("layers", i, name, leaf)
        for name in _INPUT_SIDE:
            p[key(name)] = q_in(p[key(name)])
        p[key("v_proj")] = _per_head(p[key("v_proj")], c.head_dim)
        if c.qkv_bias:
            p[key("v_proj", "bias")] = _per_head(p[key("v_proj", "bias")], c.head_dim)
        w_o = _per_head(q_out(p[key("o_proj")]), c.head_dim, transpose_rows=True)
        if heads_ok:
            t = OnlineTransform(kind="hadamard_heads", n_heads=c.num_heads)
            p[key("o_proj")] = ActKernel(weight=_pair(t, w_o), transform=t)
        else:
            p[key("o_proj")] = w_o
        t = OnlineTransform(kind="hadamard")
        p[key("down_proj")] = ActKernel(weight=_pair(t, q_out(p[key("down_proj")])),
                                        transform=t)
    return p, notes
