"""A plain PyTorch statement of Fast-dLLM's LLaDA decoding (NVlabs/Fast-dLLM, llada/generate.py:
`generate`, `generate_with_prefix_cache`, `generate_with_dual_cache`, `get_transfer_index`),
written from the published algorithm independently of qdlm_jax, extended to left-padded
batches (a key-padding mask on every forward, cached or not; positions 0..T-1 as in LLaDA).

`CachedLlama` is an eager Llama forward (bidirectional attention) over the weights of a
transformers LlamaForCausalLM (tests/references/hf_reference.py), with an explicit KV cache in
the way Fast-dLLM's modeling_llada.py keeps one: per layer, keys (before RoPE) and values of
every position; a forward either
  * runs a full sequence and returns its cache (`use_cache`),
  * runs a suffix x[:, start:] attending to a cached prefix [0, start) (`past` without
    `replace`: keys = cat(past, fresh)), or
  * runs a block x[:, start:end] whose fresh keys/values replace the cached ones at those
    positions, attending to the whole cached sequence (`replace=(start, end)`).

Algorithm (per block of `block_length`, steps per block = steps / num_blocks):
  * generate: repeat {full forward; commit} until the block has no mask;
  * prefix cache: full forward with cache (commit with the schedule's step 0); keep the cache
    of positions < block start; then repeat {forward x[:, block_start:] over the prefix cache;
    commit} until the block has no mask;
  * dual cache: full forward with cache (commit step 0); then repeat {forward the block with
    `replace`; commit} until the block has no mask.
Commit (get_transfer_index): x0 = argmax(logits) (temperature 0 only here), confidence =
softmax(logits in float64)[x0] (`low_confidence`), -inf off the block's masked positions;
without a threshold the scheduled top-k per row; with a threshold tau, all masked positions
sorted by confidence, the first kept and every later one kept only if its confidence >= tau.
Ties in the sort are broken by a stable sort (lower position first). Fast-dLLM's cached
functions run one more (empty) forward when a block's first step already completes the block;
that pass commits nothing and is not run here. A step whose argmax is the mask token itself
leaves that position masked; the block then needs more steps than scheduled, which
Fast-dLLM's code fails on (index past the schedule); here they take the schedule's last
count.

Checked against Fast-dLLM's own llada/generate.py functions (batch 1, no padding, run over
`CachedLlama` through an adapter exposing its model interface): the same tokens for every
mode, thresholds None/0.006/0.01/0.9 and four (gen, block, steps) settings on 1- and 2-layer
tiny checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class CachedLlama:
    """Eager Llama forward with Fast-dLLM-style KV caching, on a transformers model's weights."""

    def __init__(self, hf_model, config):
        self.c = config
        sd = {k: v.detach().to(torch.float32) for k, v in hf_model.state_dict().items()}
        self.sd = sd
        self.n_layers = config.num_layers

    def _rope(self, x, positions):  # x [B, H, T, hd], positions [T]
        hd = x.shape[-1]
        inv = self.c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = positions.to(torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
        return x * cos + rot * sin

    def _norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps) * w

    @torch.no_grad()
    def __call__(self, x, attention_mask=None, *, start=0, past=None, replace=None,
                 use_cache=False):
        """Logits [B, n, V] of the n positions x covers (starting at `start`), and the cache
        (list of (k, v) [B, KV, T, hd] per layer) when `use_cache`."""
        c, sd = self.c, self.sd
        b, n = x.shape
        hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        h = sd["model.embed_tokens.weight"][x]
        q_pos = torch.arange(start, start + n)
        cache = []
        for i in range(self.n_layers):
            pre = f"model.layers.{i}."
            a = self._norm(h, sd[pre + "input_layernorm.weight"])
            q = (a @ sd[pre + "self_attn.q_proj.weight"].T).view(b, n, nh, hd).transpose(1, 2)
            k = (a @ sd[pre + "self_attn.k_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
            v = (a @ sd[pre + "self_attn.v_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
            if past is not None:
                pk, pv = past[i]
                if replace is None:  # prefix: cached [0, start) then the fresh suffix
                    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                else:  # dual: the fresh block replaces the cached positions
                    lo, hi = replace
                    k_new, v_new = k, v
                    k, v = pk.clone(), pv.clone()
                    k[:, :, lo:hi], v[:, :, lo:hi] = k_new, v_new
            if use_cache:
                cache.append((k, v))
            t = k.shape[2]
            qr = self._rope(q, q_pos)
            kr = self._rope(k, torch.arange(t))
            rep = nh // nkv
            kr, vv = kr.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = qr @ kr.transpose(-1, -2) / np.sqrt(hd)
            if attention_mask is not None:
                keep = attention_mask[:, None, None, :t].bool()
                scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
            out = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(b, n, nh * hd)
            h = h + out @ sd[pre + "self_attn.o_proj.weight"].T
            m = self._norm(h, sd[pre + "post_attention_layernorm.weight"])
            gate = F.silu(m @ sd[pre + "mlp.gate_proj.weight"].T)
            up = m @ sd[pre + "mlp.up_proj.weight"].T
            h = h + (gate * up) @ sd[pre + "mlp.down_proj.weight"].T
        h = self._norm(h, sd["model.norm.weight"])
        logits = h @ sd["lm_head.weight"].T
        return (logits, cache) if use_cache else logits


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: masked // steps per step, the first masked % steps steps one more."""
    masked = block_mask.sum(dim=1, keepdim=True)
    out = torch.zeros(masked.size(0), steps, dtype=torch.int64) + masked // steps
    for r in range(masked.size(0)):
        out[r, : int(masked[r] % steps)] += 1
    return out


def transfer_index(logits, mask_index, x, k, threshold):
    """(x0, bool commit mask) for one step (temperature 0, low_confidence)."""
    x0 = logits.argmax(-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=torch.float64))
    sel = torch.zeros_like(mask_index)
    for r in range(conf.shape[0]):
        n = int(mask_index[r].sum()) if threshold is not None else int(k[r])
        order = torch.sort(conf[r], descending=True, stable=True).indices[:n]
        for rank, j in enumerate(order.tolist()):
            if threshold is None or rank == 0 or conf[r, j] >= threshold:
                sel[r, j] = True
    return x0, sel


@torch.no_grad()
def fast_dllm_generate_ref(model: CachedLlama, prompt, attention_mask=None, *, steps,
                           gen_length, block_length, mask_id, cache="none", threshold=None):
    """Returns (x [B, P + gen_length], nfe)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    am = None
    if attention_mask is not None:
        am = torch.cat([torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
                        torch.ones(b, gen_length, dtype=torch.long)], dim=1)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    spb = steps // num_blocks
    nfe = 0
    for nb in range(num_blocks):
        lo, hi = p + nb * block_length, p + (nb + 1) * block_length
        sched = num_transfer_tokens(x[:, lo:hi] == mask_id, spb)

        def k_at(i):
            return None if threshold is not None else sched[:, min(i, spb - 1)]

        # the block's first step: a full forward (which fills the cache)
        if cache == "none":
            logits, past = model(x, am), None
        else:
            logits, past = model(x, am, use_cache=True)
        nfe += 1
        mask_index = x == mask_id
        mask_index[:, hi:] = False
        x0, sel = transfer_index(logits, mask_index, x, k_at(0), threshold)
        x[sel] = x0[sel]
        if cache == "prefix":
            past = [(k[:, :, :lo], v[:, :, :lo]) for k, v in past]
        i = 1
        while (x[:, lo:hi] == mask_id).any():
            nfe += 1
            if cache == "none":
                logits = model(x, am)
                mask_index = x == mask_id
                mask_index[:, hi:] = False
                x0, sel = transfer_index(logits, mask_index, x, k_at(i), threshold)
                x[sel] = x0[sel]
            elif cache == "prefix":
                part = x[:, lo:]
                logits = model(part, am, start=lo, past=past)
                mask_index = part == mask_id
                mask_index[:, block_length:] = False
                x0, sel = transfer_index(logits, mask_index, part, k_at(i), threshold)
                part[sel] = x0[sel]  # (a view: writes x)
            else:
                part = x[:, lo:hi]
                logits = model(part, am, start=lo, past=past, replace=(lo, hi))
                mask_index = part == mask_id
                x0, sel = transfer_index(logits, mask_index, part, k_at(i), threshold)
                part[sel] = x0[sel]
            i += 1
    return x, nfe
