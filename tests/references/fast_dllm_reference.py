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

Factor rule (`get_transfer_index_dynamic`, `factor=f` instead of a threshold): per row, the
masked positions' confidences sorted in descending order c_0 >= c_1 >= ...; thresholds
t_0 = -1, t_j = 1 - f / (j + 2); top_i = the first j with c_j < t_j (or the last index when
none fails); top_i += 1 if top_i is 0 or the last index; commit the top_i most confident.

Dream (`fast_dllm_dream_ref`, NVlabs/Fast-dLLM dream/model/generation_utils_block.py
`_sample`): per block, a full forward (with the cache) whose shifted logits (position i read
from the output at i - 1, position 0 from its own) give the block's first token, committed
unconditionally; then, until the block has no mask (and, without a threshold or factor, for
at most steps_per_block - 1 more steps): forward the window (prefix: x[:, block_start:] over
the cached prefix; dual: the block with `replace`; here also "none": the whole sequence, its
rows from block_start on), shift the logits inside the window (the window's first row keeps
its own), keep the block's rows; confidence p(x0) with a threshold or factor (Fast-dLLM's
`confidence_threshold`), else the negative entropy sum p log(p + 1e-10); without a threshold
step i of the block commits int(m * (1 - s/t)) (float32, t = ts[i], s = ts[i + 1],
ts = torch.linspace(1, eps, spb + 1)) or all m at the last step, m = the row's masked count
in the block (Fast-dLLM: the batch mean; the same when the rows agree). Dream's positions:
cumsum(attention_mask) - 1 (1 on padding), as its own loop computes them (Fast-dLLM's
modeling file ignores them and uses 0..T-1, which RoPE makes the same on the valid tokens).

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

    def _rope(self, x, positions):  # x [B, H, T, hd], positions [T] or [B, T]
        hd = x.shape[-1]
        inv = self.c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = positions.to(torch.float32)[..., None] * inv
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
        return x * cos + rot * sin

    def _norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps) * w

    @torch.no_grad()
    def _linear(self, x, name):
        y = x @ self.sd[name + ".weight"].T
        bias = self.sd.get(name + ".bias")
        return y if bias is None else y + bias

    def __call__(self, x, attention_mask=None, *, start=0, past=None, replace=None,
                 use_cache=False, positions=None):
        """Logits [B, n, V] of the n positions x covers (starting at `start`), and the cache
        (list of (k, v) [B, KV, T, hd] per layer) when `use_cache`. `positions`: the full
        [B, T] position ids (default 0..T-1); q/k/v biases are added where the weights have
        them (Qwen2 / Dream)."""
        c, sd = self.c, self.sd
        b, n = x.shape
        hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        h = sd["model.embed_tokens.weight"][x]
        q_pos = torch.arange(start, start + n) if positions is None else \
            positions[:, start:start + n]
        cache = []
        for i in range(self.n_layers):
            pre = f"model.layers.{i}."
            a = self._norm(h, sd[pre + "input_layernorm.weight"])
            q = self._linear(a, pre + "self_attn.q_proj").view(b, n, nh, hd).transpose(1, 2)
            k = self._linear(a, pre + "self_attn.k_proj").view(b, n, nkv, hd).transpose(1, 2)
            v = self._linear(a, pre + "self_attn.v_proj").view(b, n, nkv, hd).transpose(1, 2)
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
            kr = self._rope(k, torch.arange(t) if positions is None else positions[:, :t])
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


def factor_count(sorted_conf, factor):
    """How many of a row's masked positions the factor rule commits (Fast-dLLM's loop)."""
    threshs = [1 - factor / (n + 1) for n in range(1, len(sorted_conf) + 1)]
    threshs[0] = -1
    top_i = 0
    for top_i in range(len(threshs)):
        if sorted_conf[top_i] < threshs[top_i]:
            break
    if top_i == 0 or top_i == len(threshs) - 1:
        top_i += 1
    return top_i


def select(conf, mask_index, k, threshold, factor=None):
    """Bool commit mask from confidences (any value off the masked positions): per row, the k
    most confident masked positions (k[r]), or with a threshold all of them in confidence
    order keeping the first and each later one >= threshold, or the factor rule's count.
    Ties: stable sort (the lower position first)."""
    conf = torch.where(mask_index, conf, torch.tensor(-np.inf, dtype=conf.dtype))
    sel = torch.zeros_like(mask_index)
    for r in range(conf.shape[0]):
        m = int(mask_index[r].sum())
        if m == 0:
            continue
        order = torch.sort(conf[r], descending=True, stable=True).indices
        if factor is not None:
            n = factor_count(conf[r, order[:m]].tolist(), factor)
        else:
            n = m if threshold is not None else int(k[r])
        for rank, j in enumerate(order[:n].tolist()):
            if threshold is None or rank == 0 or conf[r, j] >= threshold:
                sel[r, j] = True
    return sel & mask_index


def transfer_index(logits, mask_index, x, k, threshold, factor=None):
    """(x0, bool commit mask) for one step (temperature 0, low_confidence)."""
    x0 = logits.argmax(-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    return x0, select(x0_p, mask_index, k, threshold, factor)


@torch.no_grad()
def fast_dllm_generate_ref(model: CachedLlama, prompt, attention_mask=None, *, steps,
                           gen_length, block_length, mask_id, cache="none", threshold=None,
                           factor=None):
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
            return sched[:, min(i, spb - 1)]

        # the block's first step: a full forward (which fills the cache)
        if cache == "none":
            logits, past = model(x, am), None
        else:
            logits, past = model(x, am, use_cache=True)
        nfe += 1
        mask_index = x == mask_id
        mask_index[:, hi:] = False
        x0, sel = transfer_index(logits, mask_index, x, k_at(0), threshold, factor)
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
                x0, sel = transfer_index(logits, mask_index, x, k_at(i), threshold, factor)
                x[sel] = x0[sel]
            elif cache == "prefix":
                part = x[:, lo:]
                logits = model(part, am, start=lo, past=past)
                mask_index = part == mask_id
                mask_index[:, block_length:] = False
                x0, sel = transfer_index(logits, mask_index, part, k_at(i), threshold, factor)
                part[sel] = x0[sel]  # (a view: writes x)
            else:
                part = x[:, lo:hi]
                logits = model(part, am, start=lo, past=past, replace=(lo, hi))
                mask_index = part == mask_id
                x0, sel = transfer_index(logits, mask_index, part, k_at(i), threshold, factor)
                part[sel] = x0[sel]
            i += 1
    return x, nfe


def _dream_shift(logits):
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


@torch.no_grad()
def fast_dllm_dream_ref(model: CachedLlama, prompt, attention_mask=None, *, steps, gen_length,
                        block_length, mask_id, cache="none", threshold=None, factor=None,
                        alg="entropy", eps=1e-3):
    """Fast-dLLM's Dream block decoding at temperature 0 (see the module docstring).
    Returns (x [B, P + gen_length], nfe)."""
    assert alg in ("entropy", "maskgit_plus")
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    am = positions = None
    if attention_mask is not None:
        am = torch.cat([torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
                        torch.ones(b, gen_length, dtype=torch.long)], dim=1)
        positions = am.cumsum(-1) - 1
        positions.masked_fill_(am == 0, 1)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    spb = steps // num_blocks
    ts = torch.linspace(1, eps, spb + 1)  # float32
    parallel = threshold is not None or factor is not None
    nfe = 0
    for nb in range(num_blocks):
        lo, hi = p + nb * block_length, p + (nb + 1) * block_length
        if cache == "none":
            logits, past = model(x, am, positions=positions), None
        else:
            logits, past = model(x, am, positions=positions, use_cache=True)
        nfe += 1
        x[:, lo] = F.softmax(_dream_shift(logits), dim=-1).argmax(-1)[:, lo]
        if cache == "prefix":
            past = [(k[:, :, :lo], v[:, :, :lo]) for k, v in past]
        i = 1
        while (x[:, lo:hi] == mask_id).any():
            if not parallel and i == spb:
                break
            nfe += 1
            if cache == "none":
                logits = model(x, am, positions=positions)[:, lo:]
            elif cache == "prefix":
                logits = model(x[:, lo:], am, start=lo, past=past, positions=positions)
            else:
                logits = model(x[:, lo:hi], am, start=lo, past=past, replace=(lo, hi),
                               positions=positions)
            logits = _dream_shift(logits)[:, :block_length]
            part = x[:, lo:hi]
            mask_index = part == mask_id
            probs = F.softmax(logits, dim=-1)
            p_max, x0 = probs.max(dim=-1)
            if parallel or alg == "maskgit_plus":
                conf = p_max
            else:
                conf = (probs * torch.log(probs + 1e-10)).sum(-1)
            k = None
            if not parallel:
                k = []
                for r in range(b):
                    m = mask_index[r].sum().to(torch.float32)
                    k.append(int(m * (1 - ts[i + 1] / ts[i])) if i < spb - 1 else int(m))
            sel = select(conf, mask_index, k, threshold, factor)
            before = part.clone()
            part[sel] = x0[sel]  # (a view: writes x)
            i += 1
            if parallel and torch.equal(before, part):
                break  # only the mask token was committed: Fast-dLLM would loop forever
    return x, nfe
