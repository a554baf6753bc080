"""DiffusionGemma (block diffusion, MoE) as one Flax NNX weight stack with two modes.

One module of about 560 lines: the two modes run the same layers, cache and attention
code, so they stay together.

transformers' `DiffusionGemmaForBlockDiffusion` (text part) ties an encoder and a decoder to
the same weights; only the per-layer `layer_scalar`s and the decoder's self-conditioning
module differ. Here one stack runs as

  - `encode(ids, positions, cache, valid) -> cache`: causal attention (sliding layers also
    limited to the last W keys), the encoder layer scalars; it appends each layer's keys
    (after k_norm and RoPE) and values (after v_norm) to a static-shape `KVCache`. Call it
    for the prompt, then for each finished canvas.
  - `decode(canvas, sc_logits, cache, positions) -> logits`: the canvas attends
    bidirectionally to itself and to everything cached (no window), with the decoder layer
    scalars; the cache is only read.

Layer i (x: residual stream [B, T, H]; N_*: Gemma RMSNorms):

    x = x + N_post_attn(Attn(N_in(x)));  r = x
    d = N_post_ff1(MLP(N_pre_ff(r)))                 MLP(n) = down(gelu_tanh(gate n) * up n)
    m = N_post_ff2(MoE(N_pre_ff2(r), Router(r)))     (`experts.moe`)
    x = (r + N_post_ff(d + m)) * layer_scalar_{encoder|decoder}

    Gemma RMSNorm(x) = cast(x32 * (mean(x32^2) + eps)^-1/2 * w32, x.dtype)   (w applied as is)
    Attn: q = RoPE(N_q(x Wq)), k = RoPE(N_k(x Wk)), v = N_v(x Wv) (N_v has no weight);
        full layers have no Wv: v = N_v(x Wk), taken before N_k and RoPE (K = V);
        softmax(q k^T + mask) v with scale 1 (the q/k norms set the logit scale), GQA.
    RoPE: sliding layers theta `rope_theta` over the whole head; full layers proportional:
        inv_freq_j = theta_g^(-2j/D) for j < floor(p D / 2), else 0, so for D = 512, p = 1/4
        dims 0-63 and 256-319 rotate and the rest pass through.
    Router(r): z = rms(r) * scale * H^-1/2; p = softmax_fp32(z Wr); top-k of p, renormalised
        to sum 1, times per_expert_scale[e].

Embedding: E[id] * sqrt(H) (the scale rounded to fp32, then cast to the weight dtype).
Decoder input: x = rms(E[c] sqrt(H) + SC(soft)), SC(s) = down(gelu_tanh(gate n) * up n) with
n = N_pre(s) and soft = (softmax_fp32(sc_logits) @ E) sqrt(H), or 0 without sc_logits.
Logits: c tanh(fp32(N_final(x) E^T) / c), c = final_logit_softcapping (30); the LM head is
the embedding (tied).

Cache (`KVCache`, static shapes): a sliding layer keeps the last W - 1 encoded tokens in a
ring buffer (slot = token index mod (W - 1)), which is what the decoder reads and what
transformers' DynamicCache keeps; a full layer keeps `max_len` slots, written in order.
`valid` [B, max_len] marks real (not left-padding) tokens by index, `length` counts the
tokens encoded so far (the same for every row). The encoder's sliding window is by token
index, positions only feed RoPE.

Layer by layer: `encode_hidden` / `decode_hidden` run the stack (or, with `layers=`, some of
its layers) from hidden states instead of token ids, and `partial_model` holds only some of
the weights, so a model larger than memory runs one layer at a time (streaming PTQ).

Every dense linear is `dllm.Linear` (hook names `layers.{i}.self_attn.q_proj`,
`layers.{i}.mlp.gate_proj`, `layers.{i}.router.proj`, `self_conditioning.gate_proj`, ...),
so quantized kernels drop in through `project`; the experts go through
`experts.expert_project`. Params are stored as the project does: kernels [in, out], experts
`gate_up` [E, H, 2I] (gate columns first) and `down` [E, I, H] (see `experts`).

The cache and both modes stay in one file (~560 lines): `encode` writes and `decode` reads
the same slot layout, and splitting them would spread one invariant over two rooms.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from qdlm_jax.models.capture import Capture
from qdlm_jax.models.dllm import Linear
from qdlm_jax.models.experts import gelu_tanh, moe, moe_dense
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig
from qdlm_jax.models.layers import apply_rope, attention, mask_bias, rms_normalize, rope_angles
from qdlm_jax.models.params import ParamPath, flatten, get_params, path_str, unflatten
from qdlm_jax.models.project import attention_stage

_INIT_STD = 0.02


# ---- the cache ------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Encoded keys/values of every layer, static shapes (module docstring).

    Sliding layers (in layer order) share `sliding_k/v` [n_sliding, B, W-1, KV, D], full layers
    `full_k/v` [n_full, B, max_len, KV_g, D_g]."""

    sliding_k: Float[Array, "Ls B R KV D"]
    sliding_v: Float[Array, "Ls B R KV D"]
    full_k: Float[Array, "Lf B M KVg Dg"]
    full_v: Float[Array, "Lf B M KVg Dg"]
    valid: Bool[Array, "B M"]  # token index s was a real token (not padding)
    length: Int[Array, ""]  # tokens encoded so far

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(config: DiffusionGemmaConfig, batch: int, max_len: int,
               dtype=None) -> KVCache:
    """An empty cache for `batch` rows and up to `max_len` encoded tokens (prompt plus every
    canvas encoded after it); `dtype` defaults to the compute dtype."""
    c = config
    dtype = c.compute_dtype if dtype is None else dtype
    ns, nf = len(c.sliding_layers), len(c.full_layers)
    sliding = (ns, batch, c.ring_size, c.num_kv_heads, c.head_dim)
    full = (nf, batch, max_len, c.num_global_kv_heads, c.global_head_dim)
    return KVCache(sliding_k=jnp.zeros(sliding, dtype), sliding_v=jnp.zeros(sliding, dtype),
                   full_k=jnp.zeros(full, dtype), full_v=jnp.zeros(full, dtype),
                   valid=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32))


def ring_token_index(length, ring_size: int) -> Int[Array, " R"]:
    """Token index held by each ring slot after `length` tokens: the largest a < length with
    a = slot (mod ring_size); negative when the slot was never written."""
    slots = jnp.arange(ring_size, dtype=jnp.int32)
    return length - 1 - jnp.mod(length - 1 - slots, ring_size)


def layer_kv(config: DiffusionGemmaConfig, cache: KVCache, layer: int):
    """(k, v, token_index) of one layer's cached entries, oldest first, as concrete arrays: a
    sliding layer's last min(length, W-1) tokens, a full layer's first `length` (for tests
    and inspection; not jittable, the count is data)."""
    n = int(cache.length)
    if config.is_sliding(layer):
        j = config.sliding_layers.index(layer)
        index = ring_token_index(n, config.ring_size)
        order = jnp.argsort(index)
        order = order[index[order] >= 0]
        return cache.sliding_k[j][:, order], cache.sliding_v[j][:, order], index[order]
    j = config.full_layers.index(layer)
    return cache.full_k[j][:, :n], cache.full_v[j][:, :n], jnp.arange(n)


# ---- modules --------------------------------------------------------------------------------

class GemmaRMSNorm(nnx.Module):
    """cast(rms_normalize(x32) * w32, x.dtype): Gemma 4 applies the weight as is, in fp32."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalize(x.astype(jnp.float32), self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rms_norm_no_scale(x: jax.Array, eps: float) -> jax.Array:
    return rms_normalize(x.astype(jnp.float32), eps).astype(x.dtype)


def _linear(config, name, i, o, rngs):
    return Linear(i, o, name=name, use_bias=False, param_dtype=config.storage_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Projections and q/k norms of one layer; the keys attended to come from the caller."""

    def __init__(self, config: DiffusionGemmaConfig, index: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.sliding = c.is_sliding(index)
        self.num_kv, self.head_dim = c.layer_heads(index)
        h, nq, hd, pre = c.hidden_size, c.num_heads, self.head_dim, f"layers.{index}.self_attn."
        self.q_proj = _linear(c, pre + "q_proj", h, nq * hd, rngs)
        self.k_proj = _linear(c, pre + "k_proj", h, self.num_kv * hd, rngs)
        self.v_proj = _linear(c, pre + "v_proj", h, self.num_kv * hd, rngs) if self.sliding \
            else None
        self.o_proj = _linear(c, pre + "o_proj", nq * hd, h, rngs)
        pd = c.storage_dtype
        self.q_norm = GemmaRMSNorm(hd, eps=c.rms_norm_eps, param_dtype=pd)
        self.k_norm = GemmaRMSNorm(hd, eps=c.rms_norm_eps, param_dtype=pd)

    def qkv(self, xn, cos, sin, capture: Capture | None = None):
        """q [B, T, Hq, D], k, v [B, T, KV, D] of the normed input: q, k normed and rotated,
        v = N_v(x Wv), or N_v(x Wk) on a full layer."""
        c = self.config
        b, t, _ = xn.shape
        hd, kv = self.head_dim, self.num_kv
        q = self.q_norm(self.q_proj(xn, capture).reshape(b, t, c.num_heads, hd))
        k_raw = self.k_proj(xn, capture).reshape(b, t, kv, hd)
        v_raw = k_raw if self.v_proj is None else self.v_proj(xn, capture).reshape(b, t, kv, hd)
        q = apply_rope(q, cos, sin, full_precision=False)
        k = apply_rope(self.k_norm(k_raw), cos, sin, full_precision=False)
        v = rms_norm_no_scale(v_raw, c.rms_norm_eps)
        v_kernel = (self.k_proj if self.v_proj is None else self.v_proj).kernel[...]
        return attention_stage(q, k, v, self.k_proj.kernel[...], v_kernel)


class MLP(nnx.Module):
    """down(gelu_tanh(gate(n)) * up(n))."""

    def __init__(self, config: DiffusionGemmaConfig, prefix: str, *, rngs: nnx.Rngs):
        c = config
        h, i = c.hidden_size, c.intermediate_size
        self.gate_proj = _linear(c, prefix + "gate_proj", h, i, rngs)
        self.up_proj = _linear(c, prefix + "up_proj", h, i, rngs)
        self.down_proj = _linear(c, prefix + "down_proj", i, h, rngs)

    def __call__(self, n, capture: Capture | None = None):
        hidden = gelu_tanh(self.gate_proj(n, capture)) * self.up_proj(n, capture)
        return self.down_proj(hidden, capture)


class Router(nnx.Module):
    """Top-k experts of each token: softmax_fp32(rms(r) * scale * H^-1/2 @ Wr), top-k
    renormalised to sum 1, times per_expert_scale."""

    def __init__(self, config: DiffusionGemmaConfig, index: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.proj = _linear(c, f"layers.{index}.router.proj", c.hidden_size, c.num_experts, rngs)
        self.scale = nnx.Param(jnp.ones((c.hidden_size,), c.storage_dtype))
        self.per_expert_scale = nnx.Param(jnp.ones((c.num_experts,), c.storage_dtype))

    def __call__(self, r, capture: Capture | None = None):
        """(top_ids [..., k] int32, top_weights [..., k] fp32, probs [..., E] fp32) of the
        residual stream `r`: the chosen experts, their weights, and the full softmax (what
        a load-balancing loss reads)."""
        c = self.config
        z = rms_norm_no_scale(r, c.rms_norm_eps)
        z = z * self.scale[...].astype(z.dtype)
        z = (z.astype(jnp.float32) * c.hidden_size ** -0.5).astype(z.dtype)  # unrounded H^-1/2
        probs = jax.nn.softmax(self.proj(z, capture).astype(jnp.float32), axis=-1)
        top_weights, top_ids = jax.lax.top_k(probs, c.top_k)
        top_weights = top_weights / jnp.sum(top_weights, axis=-1, keepdims=True)
        scale = self.per_expert_scale[...][top_ids].astype(jnp.float32)
        return top_ids.astype(jnp.int32), top_weights * scale, probs


class Experts(nnx.Module):
    """`gate_up` [E, H, 2I] (gate columns first), `down` [E, I, H]; see `experts.moe`."""

    def __init__(self, config: DiffusionGemmaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = nnx.initializers.normal(_INIT_STD)
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.gate_up = nnx.Param(init(rngs.params(), (e, h, 2 * i), c.storage_dtype))
        self.down = nnx.Param(init(rngs.params(), (e, i, h), c.storage_dtype))

    def __call__(self, x, top_ids, top_weights):
        lead = x.shape[:-1]
        combine = moe_dense if self.config.expert_compute == "dense" else moe
        flat = combine(x.reshape(-1, x.shape[-1]), self.gate_up[...], self.down[...],
                   top_ids.reshape(-1, top_ids.shape[-1]),
                   top_weights.reshape(-1, top_weights.shape[-1]))
        return flat.reshape(*lead, -1)


class Layer(nnx.Module):
    """One layer (attention, dense MLP and experts in parallel, post norms), both modes."""

    def __init__(self, config: DiffusionGemmaConfig, index: int, *, rngs: nnx.Rngs):
        c = config
        self.index = index
        h, pd, eps = c.hidden_size, c.storage_dtype, c.rms_norm_eps

        def norm():
            return GemmaRMSNorm(h, eps=eps, param_dtype=pd)

        self.input_layernorm = norm()
        self.self_attn = Attention(c, index, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(c, f"layers.{index}.mlp.", rngs=rngs)
        self.post_feedforward_layernorm_1 = norm()
        self.router = Router(c, index, rngs=rngs)
        self.pre_feedforward_layernorm_2 = norm()
        self.experts = Experts(c, rngs=rngs)
        self.post_feedforward_layernorm_2 = norm()
        self.post_feedforward_layernorm = norm()
        self.layer_scalar_encoder = nnx.Param(jnp.ones((1,), pd))
        self.layer_scalar_decoder = nnx.Param(jnp.ones((1,), pd))

    def qkv(self, x, cos, sin, capture: Capture | None = None):
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin, capture)

    def finish(self, x, q, keys, values, bias, scalar, capture: Capture | None = None,
               routes: dict | None = None):
        """The rest of the layer once the keys/values the queries attend to are known."""
        heads = attention(q, keys, values, bias, scale=None, dtype=x.dtype)
        x = x + self.post_attention_layernorm(self.self_attn.o_proj(heads, capture))
        r = x
        dense = self.post_feedforward_layernorm_1(
            self.mlp(self.pre_feedforward_layernorm(r), capture))
        top_ids, top_weights, probs = self.router(r, capture)
        if routes is not None:
            routes[self.index] = (top_ids, top_weights, probs)
        expert_in = self.pre_feedforward_layernorm_2(r)
        if capture is not None:
            capture.record_experts(self.index, expert_in, top_ids, top_weights)
        routed = self.post_feedforward_layernorm_2(
            self.experts(expert_in, top_ids, top_weights))
        out = r + self.post_feedforward_layernorm(dense + routed)
        return out * scalar.astype(out.dtype)


class SelfConditioning(nnx.Module):
    """x = rms(e + down(gelu_tanh(gate n) * up n)), n = N_pre(soft)."""

    def __init__(self, config: DiffusionGemmaConfig, *, rngs: nnx.Rngs):
        c = config
        self.eps = c.rms_norm_eps
        self.pre_norm = GemmaRMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                     param_dtype=c.storage_dtype)
        self.mlp = MLP(c, "self_conditioning.", rngs=rngs)

    def __call__(self, embeds, soft, capture: Capture | None = None):
        return rms_norm_no_scale(embeds + self.mlp(self.pre_norm(soft), capture), self.eps)


class DiffusionGemma(nnx.Module):
    """The DiffusionGemma text model: `encode` fills a `KVCache`, `decode` gives logits."""

    def __init__(self, config: DiffusionGemmaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = nnx.initializers.normal(_INIT_STD)
        self.embed = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size),
                                    c.storage_dtype))
        self.layers = nnx.List([Layer(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = GemmaRMSNorm(c.hidden_size, eps=c.rms_norm_eps,
                                       param_dtype=c.storage_dtype)
        self.self_conditioning = SelfConditioning(c, rngs=rngs)

    # ---- pieces -----------------------------------------------------------------------------
    def embed_tokens(self, ids: Int[Array, "B T"]) -> Float[Array, "B T H"]:
        """E[ids] * sqrt(H), the scale cast to the weight dtype, in the compute dtype."""
        return scaled_embedding(self.config, jnp.take(self.embed[...], ids, axis=0))

    def _rope(self, positions):
        """{layer type: (cos, sin)} for the positions (only the types the model has)."""
        c = self.config
        out = {}
        if c.sliding_layers:
            out[True] = rope_angles(positions, c.head_dim, c.rope_theta)
        if c.full_layers:
            out[False] = rope_angles(positions, c.global_head_dim, c.global_rope_theta,
                                     rotated_pairs=c.global_rotated_pairs)
        return out

    # ---- encoder mode -----------------------------------------------------------------------
    def encode(self, ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None,
               cache: KVCache, valid: Bool[Array, "B T"] | None = None, *,
               capture: Capture | None = None, routes: dict | None = None) -> KVCache:
        """Appends the keys/values of tokens `ids` (token indices length..length+T-1 of the
        cache) and returns the new cache.

        Causal attention over everything cached and the new tokens; sliding layers see keys
        with index in (q - W, q]. `valid` [B, T] is False on (left-)padding tokens, which no
        query attends to; `positions` [B, T] feed RoPE (default: the token indices). The
        caller keeps length + T <= cache.max_len (a write past the end is clamped by XLA).
        `routes`, when a dict, receives {layer: (top_ids [B, T, k], weights [B, T, k],
        router probabilities [B, T, E])}.
        """
        return self.encode_hidden(self.embed_tokens(ids), positions, cache, valid,
                                  capture=capture, routes=routes)[0]

    def encode_hidden(self, x: Float[Array, "B T H"], positions: Int[Array, "B T"] | None,
                      cache: KVCache, valid: Bool[Array, "B T"] | None = None, *,
                      capture: Capture | None = None, routes: dict | None = None,
                      layers: tuple[int, ...] | None = None
                      ) -> tuple[KVCache, Float[Array, "B T H"]]:
        """`encode` from the tokens' input hidden states x (what `embed_tokens` gives, or a
        previous layer's output): (cache, the last layer's output). `layers` runs only those
        layers (in order; default all): the others are neither read nor written, so a model
        holding one layer's weights runs that layer alone (layer-by-layer streaming)."""
        c = self.config
        b, t = x.shape[:2]
        n0 = cache.length
        q_idx = n0 + jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(q_idx, (b, t))
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        valid_all = jax.lax.dynamic_update_slice(cache.valid, valid, (0, n0))
        rope = self._rope(positions)

        # full layers: the whole buffer, causal over token indices
        m = cache.max_len
        full_bias = mask_bias((jnp.arange(m)[None, None, :] <= q_idx[None, :, None])
                              & valid_all[:, None, :])
        # sliding layers: the ring (older tokens) then the new tokens, window by index
        ring_idx = ring_token_index(n0, c.ring_size)
        key_idx = jnp.concatenate([ring_idx, q_idx])
        ring_valid = (ring_idx >= 0)[None, :] & jnp.take(valid_all, jnp.maximum(ring_idx, 0),
                                                         axis=1)
        key_valid = jnp.concatenate([ring_valid, valid], axis=1)
        in_window = ((key_idx[None, :] <= q_idx[:, None])
                     & (key_idx[None, :] > q_idx[:, None] - c.sliding_window))
        sliding_bias = mask_bias(in_window[None] & key_valid[:, None, :])
        t0 = max(0, t - c.ring_size)  # only the last W-1 new tokens stay in the ring
        ring_slots = jnp.mod(n0 + jnp.arange(t0, t, dtype=jnp.int32), c.ring_size)

        sk, sv, fk, fv = cache.sliding_k, cache.sliding_v, cache.full_k, cache.full_v
        for i in range(c.num_layers) if layers is None else layers:
            layer = self.layers[i]
            sliding = c.is_sliding(i)
            cos, sin = rope[sliding]
            q, k, v = layer.qkv(x, cos, sin, capture)
            k, v = k.astype(sk.dtype), v.astype(sv.dtype)
            if sliding:
                j = c.sliding_layers.index(i)
                keys = jnp.concatenate([sk[j], k], axis=1)
                values = jnp.concatenate([sv[j], v], axis=1)
                bias = sliding_bias
                sk = sk.at[j].set(sk[j].at[:, ring_slots].set(k[:, t0:]))
                sv = sv.at[j].set(sv[j].at[:, ring_slots].set(v[:, t0:]))
            else:
                j = c.full_layers.index(i)
                fk = jax.lax.dynamic_update_slice(fk, k[None], (j, 0, n0, 0, 0))
                fv = jax.lax.dynamic_update_slice(fv, v[None], (j, 0, n0, 0, 0))
                keys, values, bias = fk[j], fv[j], full_bias
            x = layer.finish(x, q, keys.astype(x.dtype), values.astype(x.dtype), bias,
                             layer.layer_scalar_encoder[...], capture, routes)
        return KVCache(sliding_k=sk, sliding_v=sv, full_k=fk, full_v=fv, valid=valid_all,
                       length=n0 + t), x

    # ---- decoder mode -----------------------------------------------------------------------
    def decoder_inputs(self, canvas: Int[Array, "B L"],
                       sc_logits: Float[Array, "B L V"] | None,
                       capture: Capture | None = None) -> Float[Array, "B L H"]:
        """rms(E[c] sqrt(H) + SC(soft)), soft = (softmax_fp32(sc_logits) @ E) sqrt(H) or 0."""
        e = self.embed_tokens(canvas)
        soft = jnp.zeros_like(e) if sc_logits is None else self.soft_embedding(sc_logits)
        return self.self_conditioning(e, soft.astype(e.dtype), capture)

    def soft_embedding(self, sc_logits: Float[Array, "B L V"]) -> Float[Array, "B L H"]:
        """(softmax_fp32(sc_logits) @ E) sqrt(H) in the weight dtype: the self-conditioning
        input that `decoder_inputs` feeds the SC MLP."""
        table = self.embed[...]
        probs = jax.nn.softmax(sc_logits.astype(jnp.float32), axis=-1).astype(table.dtype)
        soft = jnp.einsum("blv,vh->blh", probs, table, preferred_element_type=jnp.float32)
        return soft.astype(table.dtype) * self.config.embed_scale.astype(table.dtype)

    def decode(self, canvas: Int[Array, "B L"], sc_logits: Float[Array, "B L V"] | None,
               cache: KVCache, positions: Int[Array, "B L"] | None = None, *,
               capture: Capture | None = None,
               routes: dict | None = None) -> Float[Array, "B L V"]:
        """fp32 soft-capped logits of the canvas, attending bidirectionally to the canvas and
        to every cached token (the last W-1 on sliding layers) except padding.

        `positions` default to length..length+L-1; `routes` as in `encode`.
        """
        x = self.decode_hidden(self.decoder_inputs(canvas, sc_logits, capture), cache,
                               positions, capture=capture, routes=routes)
        return self.logits(self.final_norm(x), capture)

    def decode_hidden(self, x: Float[Array, "B L H"], cache: KVCache,
                      positions: Int[Array, "B L"] | None = None, *,
                      capture: Capture | None = None, routes: dict | None = None,
                      layers: tuple[int, ...] | None = None) -> Float[Array, "B L H"]:
        """`decode` from the canvas's input hidden states x (`decoder_inputs`, or a previous
        layer's output): the last layer's output, before the final norm; `layers` as in
        `encode_hidden`."""
        c = self.config
        b, n = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(cache.length + jnp.arange(n, dtype=jnp.int32), (b, n))
        rope = self._rope(positions)
        canvas_ok = jnp.ones((b, n), bool)
        full_ok = (jnp.arange(cache.max_len) < cache.length)[None, :] & cache.valid
        full_bias = mask_bias(jnp.concatenate([full_ok, canvas_ok], axis=1))
        ring_idx = ring_token_index(cache.length, c.ring_size)
        ring_ok = (ring_idx >= 0)[None, :] & jnp.take(cache.valid, jnp.maximum(ring_idx, 0),
                                                      axis=1)
        sliding_bias = mask_bias(jnp.concatenate([ring_ok, canvas_ok], axis=1))
        for i in range(c.num_layers) if layers is None else layers:
            layer = self.layers[i]
            sliding = c.is_sliding(i)
            cos, sin = rope[sliding]
            q, k, v = layer.qkv(x, cos, sin, capture)
            if sliding:
                j = c.sliding_layers.index(i)
                ck, cv, bias = cache.sliding_k[j], cache.sliding_v[j], sliding_bias
            else:
                j = c.full_layers.index(i)
                ck, cv, bias = cache.full_k[j], cache.full_v[j], full_bias
            keys = jnp.concatenate([ck.astype(x.dtype), k], axis=1)
            values = jnp.concatenate([cv.astype(x.dtype), v], axis=1)
            x = layer.finish(x, q, keys, values, bias, layer.layer_scalar_decoder[...], capture,
                             routes)
        return x

    def logits(self, hidden: Float[Array, "B L H"],
               capture: Capture | None = None) -> Float[Array, "B L V"]:
        """cap * tanh(fp32(h E^T) / cap); the product is rounded to the compute dtype first."""
        if capture is not None:
            capture.record("lm_head", hidden)
        table = self.embed[...]
        raw = jnp.einsum("blh,vh->blv", hidden, table.astype(hidden.dtype),
                         preferred_element_type=jnp.float32).astype(hidden.dtype)
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(raw.astype(jnp.float32) / cap)


# ---- building and params ----------------------------------------------------------------------

def scaled_embedding(config: DiffusionGemmaConfig, rows: Float[Array, "... H"]) -> jax.Array:
    """Embedding rows E[ids] times sqrt(H) (the scale cast to the rows' dtype), in the compute
    dtype: `embed_tokens` from rows already gathered (e.g. from a memory-mapped table)."""
    return (rows * config.embed_scale.astype(rows.dtype)).astype(config.compute_dtype)


def init_model(config: DiffusionGemmaConfig, seed: int = 0) -> DiffusionGemma:
    """A randomly initialised model (normal(0.02) kernels and experts, unit norms, router
    scales and layer scalars)."""
    return DiffusionGemma(config, rngs=nnx.Rngs(seed))


def abstract_model(config: DiffusionGemmaConfig) -> DiffusionGemma:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes without allocating weights."""
    return nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))


def param_shapes(config: DiffusionGemmaConfig) -> dict[ParamPath, tuple[int, ...]]:
    """{path: shape} of every param, without allocating."""
    return {p: tuple(v.shape) for p, v in get_params(abstract_model(config)).items()}


def model_from_params(config: DiffusionGemmaConfig,
                      params: dict[ParamPath, object]) -> DiffusionGemma:
    """A model holding exactly `params`; raises KeyError if a path is missing or unexpected."""
    graphdef, state = nnx.split(abstract_model(config))
    expected = flatten(nnx.to_pure_dict(state))
    missing = sorted(path_str(p) for p in expected if p not in params)
    extra = sorted(path_str(p) for p in params if p not in expected)
    if missing or extra:
        raise KeyError(f"model_from_params: missing params {missing[:5]}, unexpected {extra[:5]}")
    nnx.replace_by_pure_dict(state, unflatten(params))
    return nnx.merge(graphdef, state)


def partial_model(config: DiffusionGemmaConfig,
                  params: dict[ParamPath, object]) -> DiffusionGemma:
    """A model holding `params` (some of the model's) and an empty float32 array for every
    other param: it runs what needs only those weights (one layer through
    `encode_hidden` / `decode_hidden` with `layers=`, `self_conditioning`, `logits`), so a
    model larger than memory is run part by part. Raises KeyError on an unknown path."""
    graphdef, state = nnx.split(abstract_model(config))
    expected = flatten(nnx.to_pure_dict(state))
    extra = sorted(path_str(p) for p in params if p not in expected)
    if extra:
        raise KeyError(f"partial_model: unexpected params {extra[:5]}")
    empty = jnp.zeros((0,), jnp.float32)
    nnx.replace_by_pure_dict(state, unflatten({p: params.get(p, empty) for p in expected}))
    return nnx.merge(graphdef, state)


def linear_names(config: DiffusionGemmaConfig) -> list[str]:
    """Hook-point names of every dense linear, in decoder forward order (the encoder has the
    same ones without `self_conditioning.*`); `lm_head` is the tied embedding's input."""
    names = [f"self_conditioning.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(config.num_layers):
        attn = ("q_proj", "k_proj") + (("v_proj",) if config.is_sliding(i) else ()) + ("o_proj",)
        names += [f"layers.{i}.self_attn.{p}" for p in attn]
        names += [f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        names.append(f"layers.{i}.router.proj")
    return names + ["lm_head"]
