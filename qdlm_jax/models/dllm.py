"""One Flax NNX masked-diffusion transformer for both LLaDA and Dream.

Block (pre-norm, Llama style), with bidirectional attention:

    h = x + o_proj(Attn(attn_norm(x)))
    y = h + down_proj(silu(gate_proj(n)) * up_proj(n)),   n = mlp_norm(h)

    RMSNorm(x) = cast(x32 * rsqrt(mean(x32^2) + eps), x.dtype) * weight
    RoPE (half-rotated): q' = q*cos + rotate_half(q)*sin, rotate_half([a, b]) = [-b, a],
        inv_freq_j = theta^(-2j/hd), angles computed in fp32.
    Attn: softmax(q k^T / sqrt(hd) + key_padding_bias) v, GQA by sharing each k/v head
        across num_heads // num_kv_heads query heads; no causal mask.
        A quantized model's k_proj / v_proj kernels may carry an attention stage
        (`project.attention_stage`: K/V quantization after RoPE), run on q, k, v here.

The model returns raw logits `[batch, seq, vocab]` for every family. Dream's right shift
(position i predicted from output i-1) is applied by generation and scoring, not here.

Every linear layer calls `project` (see `project.py`), so quantized kernels drop in there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from qdlm_jax.models.capture import Capture
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.layers import apply_rope, attention, mask_bias, rms_normalize, rope_angles
from qdlm_jax.models.project import attention_stage, prepare_input, project

_INIT_STD = 0.02


class Linear(nnx.Module):
    """y = x @ kernel[in, out] (+ bias), through `project`. `name` is the hook-point name."""

    def __init__(self, in_features: int, out_features: int, *, name: str, use_bias: bool,
                 param_dtype, rngs: nnx.Rngs):
        self.name = name
        init = nnx.initializers.normal(_INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array, capture: Capture | None = None) -> jax.Array:
        # A kernel with an input stage (online rotation, activation quantization) transforms
        # x first; hook points record what the weight multiplies.
        x, kernel = prepare_input(x, self.kernel[...])
        if capture is not None:
            capture.record(self.name, x)
        bias = None if self.bias is None else self.bias[...]
        return project(x, kernel, bias)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalize(x.astype(jnp.float32), self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = c.storage_dtype
        prefix = f"layers.{index}."
        d, hd = c.hidden_size, c.head_dim

        def linear(name, i, o, bias=False):
            return Linear(i, o, name=prefix + name, use_bias=bias, param_dtype=pd, rngs=rngs)

        self.attn_norm = RMSNorm(d, eps=c.rms_norm_eps, param_dtype=pd)
        self.q_proj = linear("q_proj", d, c.num_heads * hd, c.qkv_bias)
        self.k_proj = linear("k_proj", d, c.num_kv_heads * hd, c.qkv_bias)
        self.v_proj = linear("v_proj", d, c.num_kv_heads * hd, c.qkv_bias)
        self.o_proj = linear("o_proj", c.num_heads * hd, d)
        self.mlp_norm = RMSNorm(d, eps=c.rms_norm_eps, param_dtype=pd)
        self.gate_proj = linear("gate_proj", d, c.intermediate_size)
        self.up_proj = linear("up_proj", d, c.intermediate_size)
        self.down_proj = linear("down_proj", c.intermediate_size, d)

    def attention(self, x, key_bias, cos, sin, capture, query_window=None):
        return self.o_proj(self.attention_heads(x, key_bias, cos, sin, capture, query_window),
                           capture)

    def attention_heads(self, x, key_bias, cos, sin, capture, query_window=None):
        """The heads' outputs [B, Tq, H * hd] of the normed input `x`: o_proj's input."""
        c = self.config
        b, t, _ = x.shape
        hd, kv = c.head_dim, c.num_kv_heads
        xq, cos_q, sin_q, tq = x, cos, sin, t
        if query_window is not None:  # queries only for positions [start, start + n)
            start, tq = query_window
            xq, cos_q, sin_q = (jax.lax.dynamic_slice_in_dim(a, start, tq, axis=1)
                                for a in (x, cos, sin))
        q = self.q_proj(xq, capture).reshape(b, tq, c.num_heads, hd)
        k = self.k_proj(x, capture).reshape(b, t, kv, hd)
        v = self.v_proj(x, capture).reshape(b, t, kv, hd)
        q = apply_rope(q, cos_q, sin_q, full_precision=c.rope_full_precision)
        k = apply_rope(k, cos, sin, full_precision=c.rope_full_precision)
        q, k, v = attention_stage(q, k, v, self.k_proj.kernel[...], self.v_proj.kernel[...])
        return attention(q, k, v, key_bias, scale=1.0 / jnp.sqrt(jnp.float32(hd)), dtype=x.dtype)

    # ---- pieces for cached decoding (the forward above is unchanged) ----------------------

    def qkv(self, xn, cos, sin):
        """q [B, T, H, hd] and k, v [B, T, KV, hd] of the normed input `xn`, RoPE applied to
        q and k (cos/sin of xn's positions)."""
        c = self.config
        b, t, _ = xn.shape
        hd, kv = c.head_dim, c.num_kv_heads
        q = self.q_proj(xn).reshape(b, t, c.num_heads, hd)
        k = self.k_proj(xn).reshape(b, t, kv, hd)
        v = self.v_proj(xn).reshape(b, t, kv, hd)
        q = apply_rope(q, cos, sin, full_precision=c.rope_full_precision)
        k = apply_rope(k, cos, sin, full_precision=c.rope_full_precision)
        return attention_stage(q, k, v, self.k_proj.kernel[...], self.v_proj.kernel[...])

    def attend(self, q, k, v, key_bias, dtype):
        """o_proj(softmax(q k^T / sqrt(hd) + key_bias) v): q [B, Tq, H, hd] over keys and
        values [B, S, KV, hd] (the same arithmetic as `attention`)."""
        scale = 1.0 / jnp.sqrt(jnp.float32(self.config.head_dim))
        return self.o_proj(attention(q, k, v, key_bias, scale=scale, dtype=dtype))

    def mlp_hidden(self, n, capture: Capture | None = None):
        """silu(gate(n)) * up(n) of the normed input `n`: down_proj's input."""
        return jax.nn.silu(self.gate_proj(n, capture)) * self.up_proj(n, capture)

    def mlp_residual(self, h):
        return h + self.down_proj(self.mlp_hidden(self.mlp_norm(h)))

    def forward_with_kv(self, x, key_bias, cos, sin, query_window: tuple | None = None):
        """The layer over every position, also returning its (post-RoPE) keys and values
        [B, T, KV, hd]; `query_window=(start, n)` as in `__call__`."""
        q, k, v = self.qkv(self.attn_norm(x), cos, sin)
        residual = x
        if query_window is not None:
            start, n = query_window
            q = jax.lax.dynamic_slice_in_dim(q, start, n, axis=1)
            residual = jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)
        h = residual + self.attend(q, k, v, key_bias, x.dtype)
        return self.mlp_residual(h), k, v

    def forward_cached(self, x_win, key_bias, cos_win, sin_win, k_cache, v_cache, win_start,
                       fresh_from):
        """The layer for a window of positions [win_start, win_start + n) only, attending to
        every position: keys/values of window positions >= `fresh_from` are computed from
        `x_win`, all others are read from `k_cache`/`v_cache` [B, T, KV, hd]."""
        n = x_win.shape[1]
        q, k, v = self.qkv(self.attn_norm(x_win), cos_win, sin_win)
        fresh = (win_start + jnp.arange(n) >= fresh_from)[None, :, None, None]
        k_old = jax.lax.dynamic_slice_in_dim(k_cache, win_start, n, axis=1)
        v_old = jax.lax.dynamic_slice_in_dim(v_cache, win_start, n, axis=1)
        k_all = jax.lax.dynamic_update_slice_in_dim(
            k_cache, jnp.where(fresh, k, k_old).astype(k_cache.dtype), win_start, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(
            v_cache, jnp.where(fresh, v, v_old).astype(v_cache.dtype), win_start, axis=1)
        h = x_win + self.attend(q, k_all, v_all, key_bias, x_win.dtype)
        return self.mlp_residual(h)

    def __call__(self, x, key_bias, cos, sin, capture: Capture | None = None,
                 query_window: tuple | None = None):
        """`query_window=(start, n)` (start may be traced, n static) computes the outputs of
        positions start..start+n-1 only; keys and values still come from every position."""
        residual = x
        if query_window is not None:
            residual = jax.lax.dynamic_slice_in_dim(x, query_window[0], query_window[1], 1)
        h = residual + self.attention(self.attn_norm(x), key_bias, cos, sin, capture,
                                      query_window)
        return h + self.down_proj(self.mlp_hidden(self.mlp_norm(h), capture), capture)


class DLLM(nnx.Module):
    """Masked-diffusion LM. `model(input_ids, attention_mask)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = c.storage_dtype
        init = nnx.initializers.normal(_INIT_STD)
        self.embed = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size), pd))
        self.layers = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, name="lm_head", use_bias=False,
                              param_dtype=pd, rngs=rngs)

    def hidden_states(self, input_ids: Int[Array, "B T"],
                      attention_mask: Int[Array, "B T"] | None = None, *,
                      position_ids: Int[Array, "B T"] | None = None,
                      capture: Capture | None = None,
                      query_window: tuple | None = None) -> Float[Array, "B T D"]:
        """Final-norm hidden states; `logits(h)` turns any slice of them into logits.

        `query_window=(start, n)`: return only positions start..start+n-1 ([B, n, D]) and skip
        the last layer's query, MLP and norm work elsewhere (a sampler that reads one block's
        logits needs nothing more). `start` may be traced; `n` must be static.
        """
        x, cos, sin, key_bias = self._embed_and_mask(input_ids, attention_mask, position_ids)
        n_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, key_bias, cos, sin, capture,
                      query_window if i == n_layers - 1 else None)
            if capture is not None:
                capture.record_residual(i, x)
        return self.final_norm(x)

    def _embed_and_mask(self, input_ids, attention_mask, position_ids):
        c = self.config
        b, t = input_ids.shape
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(c.compute_dtype)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_angles(position_ids, c.head_dim, c.rope_theta)
        # A large negative bias, not -inf: a fully padded row then gets uniform weights
        # instead of NaN (its output is never read).
        key_bias = None if attention_mask is None else mask_bias(attention_mask)
        return x, cos, sin, key_bias

    def hidden_states_with_kv(self, input_ids: Int[Array, "B T"],
                              attention_mask: Int[Array, "B T"] | None = None, *,
                              position_ids: Int[Array, "B T"] | None = None,
                              query_window: tuple | None = None):
        """`hidden_states` that also returns every layer's keys and values: (h, (K, V)) with
        K, V `[num_layers, B, T, num_kv_heads, head_dim]` (keys after RoPE), the cache that
        `hidden_states_cached` reads. `query_window` as in `hidden_states`."""
        x, cos, sin, key_bias = self._embed_and_mask(input_ids, attention_mask, position_ids)
        ks, vs = [], []
        n_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            x, k, v = layer.forward_with_kv(x, key_bias, cos, sin,
                                            query_window if i == n_layers - 1 else None)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), (jnp.stack(ks), jnp.stack(vs))

    def hidden_states_cached(self, window_ids: Int[Array, "B n"], window_start, kv,
                             attention_mask: Int[Array, "B T"] | None = None, *,
                             position_ids: Int[Array, "B T"] | None = None,
                             fresh_from=None) -> Float[Array, "B n D"]:
        """Final-norm hidden states of the window positions [window_start, window_start + n)
        (`window_ids` are their tokens; `window_start` may be traced, n is static), with
        attention over all T positions of the cache `kv` = (K, V) from
        `hidden_states_with_kv`. In every layer, the keys/values of window positions
        >= `fresh_from` (default: window_start, i.e. the whole window) are computed afresh;
        every other position's come from the cache. `attention_mask` and `position_ids` are
        the full `[B, T]` ones (positions default to 0..T-1)."""
        k_cache, v_cache = kv
        b, n = window_ids.shape
        t = k_cache.shape[2]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        pos_win = jax.lax.dynamic_slice_in_dim(position_ids, window_start, n, axis=1)
        x, cos, sin, _ = self._embed_and_mask(window_ids, None, pos_win)
        key_bias = None if attention_mask is None else mask_bias(attention_mask)
        fresh_from = window_start if fresh_from is None else fresh_from
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, key_bias, cos, sin, k_cache[i], v_cache[i],
                                     window_start, fresh_from)
        return self.final_norm(x)

    def logits(self, hidden: Float[Array, "B T D"], capture: Capture | None = None):
        return self.lm_head(hidden, capture)

    def __call__(self, input_ids: Int[Array, "B T"],
                 attention_mask: Int[Array, "B T"] | None = None, *,
                 position_ids: Int[Array, "B T"] | None = None,
                 capture: Capture | None = None) -> Float[Array, "B T V"]:
        h = self.hidden_states(input_ids, attention_mask, position_ids=position_ids,
                               capture=capture)
        return self.logits(h, capture)


def shift_logits(logits: Float[Array, "B T V"]) -> Float[Array, "B T V"]:
    """Dream's right shift: out[:, 0] = logits[:, 0], out[:, i] = logits[:, i-1] (position i
    is predicted from the output at i - 1; `ModelConfig.shift_logits` says which family)."""
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def linear_names(config: ModelConfig) -> list[str]:
    """Hook-point names of every linear layer, in forward order."""
    per_layer = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    names = [f"layers.{i}.{p}" for i in range(config.num_layers) for p in per_layer]
    return names + ["lm_head"]


def init_model(config: ModelConfig, seed: int = 0) -> DLLM:
    """A randomly initialised model (normal(0.02) kernels, unit norms, zero biases)."""
    return DLLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> DLLM:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes without allocating weights."""
    return nnx.eval_shape(lambda: DLLM(config, rngs=nnx.Rngs(0)))


def count_params(model_or_state) -> int:
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
