"""Plain PyTorch statements of the published dLLM algorithms, written from their semantics
(LLaDA generate.py / get_log_likelihood.py, Dream diffusion_generate / eval likelihood),
independently of qdlm_jax. They run eagerly on any `forward` callable:

    forward(x: LongTensor [B, T], attention_mask: LongTensor [B, T] | None,
            position_ids: LongTensor [B, T] | None) -> FloatTensor logits [B, T, V]

`hf_forward(model)` adapts a transformers model (tests/references/hf_reference.py). The full logits
of
every position are computed at every step, as the published code does.

Random numbers: by default the reference draws from torch's RNG. To compare a stochastic
path token for token, pass `uniforms(step, kind)` returning the uniforms the JAX loop used
for global step `step`: LLaDA kind "gumbel" -> [B, block_length, V] (the current block),
"remask" -> [B, block_length]; Dream kind "transfer" -> [B, max_new_tokens]. The reference
then uses them where the published code calls torch.rand.

Top-k ties are broken by a stable sort (the lower position first); the published code's
torch.topk leaves the order of equal values unspecified.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F


def hf_forward(model):
    """forward(x, mask, pos) for a transformers *ForCausalLM with bidirectional attention.

    The attention mask is a key-padding mask; Dream's [B,1,N,N] mask additionally blanks the
    rows of padding queries, whose outputs no algorithm reads."""

    @torch.no_grad()
    def forward(x, attention_mask=None, position_ids=None):
        return model(input_ids=x, attention_mask=attention_mask,
                     position_ids=position_ids).logits.float()

    return forward


def _stable_topk_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices[:k]


# ---- LLaDA generate ------------------------------------------------------------------------

def llada_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : int(remainder[i])] += 1
    return num


@torch.no_grad()
def llada_generate_ref(forward, prompt, attention_mask=None, *, steps, gen_length,
                       block_length, temperature=0.0, cfg_scale=0.0,
                       remasking="low_confidence", mask_id, eos_id=None, eot_id=None,
                       logits_eos_inf=False, confidence_eos_eot_inf=False, uniforms=None):
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    if attention_mask is not None:
        attention_mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        attention_mask = torch.cat([attention_mask, torch.ones(b, gen_length, dtype=torch.long)],
                                   dim=-1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    g = 0
    for nb in range(num_blocks):
        lo = p + nb * block_length
        hi = lo + block_length
        block_mask_index = x[:, lo:hi] == mask_id
        num_transfer = llada_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask] * 2)
                logits = forward(x_, mask_, None)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = forward(x, attention_mask, None)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            if temperature > 0:
                logits64 = logits.to(torch.float64)
                u = torch.rand_like(logits64)
                if uniforms is not None:
                    u[:, lo:hi] = torch.from_numpy(np.asarray(uniforms(g, "gumbel"),
                                                              np.float64))
                noisy = logits64.exp() / (-torch.log(u)) ** temperature
            else:
                noisy = logits
            x0 = torch.argmax(noisy, dim=-1)
            if confidence_eos_eot_inf:
                logits = logits.clone()
                logits[:, :, eos_id] = -torch.inf
                if eot_id is not None:
                    logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                prob = F.softmax(logits.float(), dim=-1)
                x0_p = torch.gather(prob, -1, x0[..., None])[..., 0]
            elif remasking == "random":
                x0_p = torch.rand(x0.shape)
                if uniforms is not None:
                    x0_p[:, lo:hi] = torch.from_numpy(np.array(uniforms(g, "remask"), np.float32))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(b):
                idx = _stable_topk_index(confidence[j], int(num_transfer[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
            g += 1
    return x


# ---- Dream diffusion_generate ----------------------------------------------------------------

def dream_top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def dream_top_k_logits(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None,
                        margin_confidence=False, neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = dream_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = dream_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0[..., None])[..., 0]
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate_ref(forward, input_ids, attention_mask=None, *, max_new_tokens, steps,
                       mask_id, eps=1e-3, alg="origin", alg_temp=None, temperature=0.0,
                       top_p=None, top_k=None, uniforms=None):
    input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    b, p = input_ids.shape
    max_length = p + max_new_tokens
    x = F.pad(input_ids, (0, max_length - p), value=mask_id)
    tok_idx = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        if torch.any(attention_mask == 0):
            attention_mask = F.pad(attention_mask, (0, max_length - p), value=1)
            tok_idx = attention_mask.cumsum(-1) - 1
            tok_idx.masked_fill_(attention_mask == 0, 1)
        else:
            attention_mask = None
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = forward(x, attention_mask, tok_idx)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            u = torch.rand(*x0.shape)
            if uniforms is not None:
                u = torch.from_numpy(np.array(uniforms(i, "transfer"), np.float32))
                u = u[mask_index[:, p:]]
            transfer = u < p_transfer
            _, x0[transfer] = dream_sample_tokens(mask_logits[transfer], temperature, top_p,
                                                  top_k)
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k)
            elif alg == "topk_margin":
                confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k,
                                                     margin_confidence=True)
            elif alg == "entropy":
                confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k,
                                                     neg_entropy=True)
            else:
                raise RuntimeError(alg)
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            n_transfer = (int(num_mask_token * (1 - s / t)) if i < steps - 1
                          else int(num_mask_token))
            full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_conf[mask_index] = confidence
            if n_transfer > 0:
                if alg_temp is None or alg_temp == 0:
                    transfer_index = torch.stack(
                        [_stable_topk_index(full_conf[j], n_transfer) for j in range(b)])
                else:
                    full_conf = F.softmax(full_conf / alg_temp, dim=-1)
                    transfer_index = torch.multinomial(full_conf, num_samples=n_transfer)
                x_ = torch.zeros_like(x) + mask_id
                x_[mask_index] = x0.clone()
                rows = torch.arange(b)[:, None].expand_as(transfer_index)
                x[rows, transfer_index] = x_[rows, transfer_index]
    return x


# ---- likelihood ------------------------------------------------------------------------------

def _cfg_logits(forward, batch, prompt_len, mask_id, cfg_scale, shift):
    if cfg_scale > 0:
        un = batch.clone()
        un[:, :prompt_len] = mask_id
        batch = torch.cat([batch, un])
    logits = forward(batch, None, None)
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    if cfg_scale > 0:
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    return logits


@torch.no_grad()
def llada_exact_expectation(forward, prompt, answer, *, mask_id, cfg_scale=0.0, shift=False):
    """E_{k~U{1..L}} E_{|S|=k} [L/k * sum_{i in S} -log p(x_i | x with S masked)] by
    enumerating every non-empty subset S of the answer: the expectation of LLaDA's Monte
    Carlo NLL estimate (returned negated: the log-likelihood bound)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    answer = torch.as_tensor(np.asarray(answer), dtype=torch.long)
    p, n = len(prompt), len(answer)
    seq = torch.cat([prompt, answer])
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    batch = seq.repeat(len(subsets), 1)
    for r, s in enumerate(subsets):
        batch[r, [p + i for i in s]] = mask_id
    logp = torch.log_softmax(_cfg_logits(forward, batch, p, mask_id, cfg_scale, shift)
                             .double(), dim=-1)
    total = 0.0
    for r, s in enumerate(subsets):
        k = len(s)
        nll = -sum(float(logp[r, p + i, answer[i]]) for i in s)
        total += (1.0 / n) * (1.0 / math.comb(n, k)) * (n / k) * nll
    return -total


@torch.no_grad()
def dream_exact_expectation(forward, prompt, answer, *, mask_id, eps=1e-3, cfg_scale=0.0,
                            keep_first_last=True):
    """The expectation of Dream's Monte Carlo NLL estimate, negated. Masks are Bernoulli(p)
    on the maskable answer positions with p = (1-eps) t + eps, t ~ U[0, 1):
        E = sum_S A_S * int_0^1 p^(|S|-1) (1-p)^(n-|S|) dt,
    A_S = sum_{i in S} -log p(x_i | x with S masked), over every subset S of the n maskable
    positions; the integral (a polynomial in t) by Gauss-Legendre quadrature."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    answer = torch.as_tensor(np.asarray(answer), dtype=torch.long)
    p, n_ans = len(prompt), len(answer)
    seq = torch.cat([prompt, answer])
    t_len = len(seq)
    positions = [p + i for i in range(n_ans)]
    if keep_first_last:
        positions = [q for q in positions if q not in (0, t_len - 1)]
    n = len(positions)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(positions, k)]
    batch = seq.repeat(len(subsets), 1)
    for r, s in enumerate(subsets):
        batch[r, list(s)] = mask_id
    logp = torch.log_softmax(_cfg_logits(forward, batch, p, mask_id, cfg_scale, True)
                             .double(), dim=-1)
    nodes, weights = np.polynomial.legendre.leggauss(32)
    t = 0.5 * (nodes + 1.0)
    w = 0.5 * weights
    pm = (1 - eps) * t + eps
    total = 0.0
    for r, s in enumerate(subsets):
        k = len(s)
        a_s = -sum(float(logp[r, q, seq[q]]) for q in s)
        total += a_s * float(np.sum(w * pm ** (k - 1) * (1 - pm) ** (n - k)))
    return -total
