"""Masked-diffusion generation for LLaDA and Dream, each as one jitted loop.

Both samplers start from `x = [prompt | gen_length x MASK]` and, over `steps` denoising steps,
commit predicted tokens into masked positions; a committed token is never changed again.
The whole loop runs inside one `jax.jit` (`lax.fori_loop` over the steps), with static shapes
and no host round trip per step. Randomness comes only from the explicit `key`.

LLaDA (`llada_generate`, the published `generate.py` semantics)
    * The generated span is split into `gen_length // block_length` blocks, filled left to
      right (semi-autoregressive); each block gets `steps // num_blocks` steps.
    * A block starts fully masked, so the number of tokens committed at step i of a block is
      static: `block_length // spb`, plus one for the first `block_length % spb` steps
      (spb = steps per block).
    * Each step: logits = model(x). With `cfg_scale > 0` the unconditional branch is x with
      every prompt position (padding included) set to MASK, both branches run as one batch,
      and `logits = un + (cfg_scale + 1) * (cond - un)`. Optional: EOS logit = -inf
      (`logits_eos_inf`).
    * x0 = argmax(logits / T + Gumbel) (Gumbel-max sampling from softmax(logits / T)); T = 0
      gives argmax(logits).
    * Confidence: `low_confidence` = softmax(logits)[x0] from the noise-free logits; `random`
      = U(0, 1). Positions outside the current block or not masked get -inf; per row, the
      `k` most confident positions take x0 (ties: the lower position first).
    * `confidence_eos_eot_inf`: EOS and EOT logits are set to -inf before the confidence
      softmax (the intent of the reference's chained assignment, as bonsai implements it),
      so a position predicting EOS/EOT is committed last.

Dream (`dream_generate`, `diffusion_generate` / `_sample` semantics)
    * Right-shifted logits: position i is predicted from the model output at i-1 (position 0
      from its own output).
    * With padding, positions are `cumsum(mask) - 1` (1 on padding) as in Dream.
    * `timesteps = linspace(1, eps, steps + 1)` (float32); at step i, t = ts[i], s = ts[i+1].
    * `sample_tokens`: logits / temperature (if > 0), then top-p, then top-k filtering, then
      softmax; x0 ~ Categorical (T > 0) or argmax; confidence = p[x0] (`maskgit_plus`),
      top1 - top2 (`topk_margin`) or sum p log(p + 1e-10) (`entropy`).
    * `origin`: every masked position is committed independently with probability
      `1 - s / t` (1 at the last step).
    * Other algs commit `k_i = int(m_i * (1 - s / t))` positions (all remaining at the last
      step), m_i = masked tokens per row; the top-k by confidence, or, with `alg_temp > 0`,
      k positions sampled without replacement from softmax(confidence / alg_temp) (done by
      Gumbel-top-k, which has the same distribution). Every row has the same m_i, so the
      k_i schedule is computed on the host in float32 exactly as the reference does.

Random numbers (documented so tests can feed a reference the same uniforms): at global step
g (0-based), `kg = jax.random.fold_in(key, g)`;
    LLaDA: `k_gumbel, k_remask = jax.random.split(kg)`;
           Gumbel uniforms `uniform(k_gumbel, [B, block_length, V])` (the current block),
           random-remasking uniforms `uniform(k_remask, [B, block_length])`.
    Dream: `k_transfer, k_sample, k_alg = jax.random.split(kg, 3)`;
           `origin` uniforms `uniform(k_transfer, [B, max_new_tokens])`.

Work is restricted to what the algorithm reads: the LM head runs only on the positions whose
logits can be committed (LLaDA: the current block; Dream: the generated span), through
`model.hidden_states` + `model.logits`. The loops take the model as `nnx.split` state, so any
params tree the model's graph accepts (e.g. quantized kernels) runs through the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "REMASKING", "DREAM_ALGS", "GenerationConfig", "LLaDASettings", "DreamSettings",
    "llada_generate", "dream_generate", "generate", "compile_generate", "generate_with_order",
    "llada_transfer_schedule", "dream_transfer_schedule", "left_pad",
]

REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_NEG_INF = -jnp.inf


# ---- settings ------------------------------------------------------------------------------

def _check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLaDASettings:
    """Static settings of the LLaDA loop (hashable: they key the jit cache)."""

    gen_length: int
    steps: int
    block_length: int
    mask_id: int
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_id: int | None = None
    eot_id: int | None = None
    progress: bool = False  # print "step g/steps" from inside the loop (jax.debug.callback)
    record_order: bool = False  # also return the step at which each position was decoded

    def __post_init__(self):
        _check_positive_int("gen_length", self.gen_length)
        _check_positive_int("steps", self.steps)
        _check_positive_int("block_length", self.block_length)
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} is not divisible by "
                             f"block_length={self.block_length}")
        if self.steps % self.num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks "
                             f"{self.num_blocks} (gen_length={self.gen_length} / "
                             f"block_length={self.block_length})")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}: expected one of {REMASKING}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected >= 0")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: expected >= 0")
        if (self.logits_eos_inf or self.confidence_eos_eot_inf) and self.eos_id is None:
            raise ValueError("logits_eos_inf / confidence_eos_eot_inf need the model's "
                             "eos_token_id, which is None in its config")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def stochastic(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamSettings:
    """Static settings of the Dream loop (hashable: they key the jit cache)."""

    max_new_tokens: int
    steps: int
    mask_id: int
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    progress: bool = False
    record_order: bool = False  # also return the step at which each position was decoded

    def __post_init__(self):
        _check_positive_int("max_new_tokens", self.max_new_tokens)
        _check_positive_int("steps", self.steps)
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg={self.alg!r}: expected one of {DREAM_ALGS}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected >= 0")
        if self.alg_temp is not None and not self.alg_temp >= 0:
            raise ValueError(f"alg_temp={self.alg_temp!r}: expected None or >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: expected None or in (0, 1]")
        if self.top_k is not None:
            _check_positive_int("top_k", self.top_k)
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps={self.eps!r}: expected 0 <= eps < 1")

    @property
    def stochastic(self) -> bool:
        return self.temperature > 0 or self.alg == "origin" or bool(self.alg_temp)


# ---- static schedules ----------------------------------------------------------------------

def llada_transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
    """Tokens committed at each step of a block: `block_length // spb`, the first
    `block_length % spb` steps one more (LLaDA's get_num_transfer_tokens on a full block)."""
    base, rem = divmod(block_length, steps_per_block)
    sched = np.full(steps_per_block, base, np.int32)
    sched[:rem] += 1
    return sched


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """`linspace(1, eps, steps + 1)` in float32."""
    return np.linspace(1.0, eps, steps + 1).astype(np.float32)


def dream_transfer_schedule(max_new_tokens: int, steps: int, eps: float) -> np.ndarray:
    """k_i of Dream's non-`origin` algs: `int(m_i * (1 - s/t))` in float32, all remaining at
    the last step; m_0 = max_new_tokens, m_{i+1} = m_i - k_i."""
    ts = dream_timesteps(steps, eps)
    m = max_new_tokens
    ks = np.zeros(steps, np.int32)
    for i in range(steps):
        if i < steps - 1:
            k = int(np.float32(m) * (np.float32(1.0) - ts[i + 1] / ts[i]))
        else:
            k = m
        ks[i] = k
        m -= k
    return ks


def dream_transfer_probs(steps: int, eps: float) -> np.ndarray:
    """p_i = 1 - s/t of Dream's `origin` alg in float32 (1 at the last step)."""
    ts = dream_timesteps(steps, eps)
    p = (np.float32(1.0) - ts[1:] / ts[:-1]).astype(np.float32)
    p[-1] = 1.0
    return p


# ---- shared pieces -------------------------------------------------------------------------

def _top_k_select(scores: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Bool mask of the k (traced, <= k_max static) highest scores per row; ties -> lower
    index first (lax.top_k's order)."""
    b, n = scores.shape
    k_max = max(1, min(k_max, n))
    _, idx = jax.lax.top_k(scores, k_max)  # [B, k_max]
    take = jnp.arange(k_max)[None, :] < k
    sel = jnp.zeros((b, n), bool)
    return sel.at[jnp.arange(b)[:, None], idx].set(take)


def _progress_print(step, total):
    step = int(step) + 1
    width = 30
    done = width * step // total
    end = "\n" if step == total else ""
    print(f"\r  step {step:>5}/{total} [{'#' * done}{'.' * (width - done)}]", end=end,
          file=sys.stderr, flush=True)


def _maybe_progress(enabled: bool, g, total: int):
    if enabled:
        jax.debug.callback(functools.partial(_progress_print, total=total), g)


def _default_key(key, stochastic: bool, what: str):
    if key is not None:
        return key
    if stochastic:
        raise ValueError(f"key=None: {what} is stochastic; pass key=jax.random.key(seed)")
    return jax.random.key(0)  # unused by deterministic settings


def _prepare_inputs(model, input_ids, attention_mask):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [batch, prompt_len], got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(jnp.int32)
    mask = None
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape} != input_ids shape "
                             f"{ids.shape}")
        mask = mask.astype(jnp.int32)
    mask_id = model.config.mask_token_id
    if not isinstance(ids, jax.core.Tracer):
        valid = np.ones(ids.shape, bool) if mask is None or isinstance(mask, jax.core.Tracer) \
            else np.asarray(mask).astype(bool)
        if np.any((np.asarray(ids) == mask_id) & valid):
            raise ValueError(f"input_ids: the prompt contains the mask token {mask_id}; "
                             "prompt positions are conditioning and must not be masked")
    return ids, mask


# ---- LLaDA ---------------------------------------------------------------------------------

def _llada_loop(state, prompt, attention_mask, key, *, graphdef, s: LLaDASettings):
    """The LLaDA sampler as a pure function of (params state, prompt, mask, key)."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    lb, spb = s.block_length, s.steps_per_block
    t_total = p + s.gen_length
    x = jnp.concatenate([prompt, jnp.full((b, s.gen_length), s.mask_id, jnp.int32)], axis=1)
    mask = None
    if attention_mask is not None:
        mask = jnp.concatenate([attention_mask, jnp.ones((b, s.gen_length), jnp.int32)], 1)
    sched_np = llada_transfer_schedule(lb, spb)
    k_max = int(sched_np.max())
    sched = jnp.asarray(sched_np)
    is_prompt = jnp.arange(t_total) < p
    cfg = s.cfg_scale > 0
    if cfg:
        mask2 = None if mask is None else jnp.concatenate([mask, mask], axis=0)

    def step(g, carry):
        x, order = carry if s.record_order else (carry, None)
        _maybe_progress(s.progress, g, s.steps)
        start = p + (g // spb) * lb
        if s.stochastic:  # (no RNG ops in the graph of a deterministic sampler)
            k_gumbel, k_remask = jax.random.split(jax.random.fold_in(key, g))
        if cfg:
            un_x = jnp.where(is_prompt[None, :], s.mask_id, x)
            h_blk = model.hidden_states(jnp.concatenate([x, un_x], axis=0), mask2,
                                        query_window=(start, lb))
        else:
            h_blk = model.hidden_states(x, mask, query_window=(start, lb))
        logits = model.logits(h_blk).astype(jnp.float32)  # [B(*2), lb, V]
        if cfg:
            cond, un = logits[:b], logits[b:]
            logits = un + (s.cfg_scale + 1.0) * (cond - un)
        if s.logits_eos_inf:
            logits = logits.at[..., s.eos_id].set(_NEG_INF)
        if s.temperature > 0:
            u = jax.random.uniform(k_gumbel, logits.shape, jnp.float32)
            x0 = jnp.argmax(logits - s.temperature * jnp.log(-jnp.log(u)), axis=-1)
        else:
            x0 = jnp.argmax(logits, axis=-1)
        x0 = x0.astype(jnp.int32)
        if s.remasking == "low_confidence":
            conf_logits = logits
            if s.confidence_eos_eot_inf:
                conf_logits = conf_logits.at[..., s.eos_id].set(_NEG_INF)
                if s.eot_id is not None:
                    conf_logits = conf_logits.at[..., s.eot_id].set(_NEG_INF)
            lse = jax.nn.logsumexp(conf_logits, axis=-1)
            chosen = jnp.take_along_axis(conf_logits, x0[..., None], axis=-1)[..., 0]
            conf = jnp.exp(chosen - lse)  # softmax(logits)[x0]
        else:
            conf = jax.random.uniform(k_remask, (b, lb), jnp.float32)
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        masked = x_blk == s.mask_id
        conf = jnp.where(masked, conf, _NEG_INF)
        sel = _top_k_select(conf, sched[g % spb], k_max) & masked
        x_blk = jnp.where(sel, x0, x_blk)
        x = jax.lax.dynamic_update_slice_in_dim(x, x_blk, start, axis=1)
        if not s.record_order:
            return x
        o_blk = jax.lax.dynamic_slice_in_dim(order, start, lb, axis=1)
        o_blk = jnp.where(sel, g, o_blk)
        return x, jax.lax.dynamic_update_slice_in_dim(order, o_blk, start, axis=1)

    if s.record_order:
        return jax.lax.fori_loop(0, s.steps, step, (x, jnp.full(x.shape, -1, jnp.int32)))
    return jax.lax.fori_loop(0, s.steps, step, x)


_llada_jit = jax.jit(_llada_loop, static_argnames=("graphdef", "s"))


def _llada_call(model, input_ids, attention_mask, key, settings):
    ids, mask = _prepare_inputs(model, input_ids, attention_mask)
    key = _default_key(key, settings.stochastic, "LLaDA generation with "
                       f"temperature={settings.temperature}, remasking={settings.remasking!r}")
    graphdef, state = nnx.split(model)
    return _llada_jit, (state, ids, mask, key), dict(graphdef=graphdef, s=settings)


def llada_settings(model, *, gen_length, steps, block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", logits_eos_inf=False,
                   confidence_eos_eot_inf=False, progress=False) -> LLaDASettings:
    c = model.config
    return LLaDASettings(gen_length=gen_length, steps=steps, block_length=block_length,
                         mask_id=c.mask_token_id, temperature=float(temperature),
                         cfg_scale=float(cfg_scale), remasking=remasking,
                         logits_eos_inf=logits_eos_inf,
                         confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=c.eos_token_id,
                         eot_id=c.eot_token_id, progress=progress)


def llada_generate(model, input_ids, attention_mask=None, *, gen_length: int, steps: int,
                   block_length: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                   remasking: str = "low_confidence", logits_eos_inf: bool = False,
                   confidence_eos_eot_inf: bool = False, key=None,
                   progress: bool = False) -> jax.Array:
    """LLaDA sampling (see the module docstring). Returns `[batch, prompt_len + gen_length]`.

    input_ids: `[batch, prompt_len]` int, left-padded for batches of different lengths, with
    `attention_mask` 1 = token, 0 = padding. `key` is required when sampling is stochastic
    (temperature > 0 or remasking="random").
    """
    settings = llada_settings(model, gen_length=gen_length, steps=steps,
                              block_length=block_length, temperature=temperature,
                              cfg_scale=cfg_scale, remasking=remasking,
                              logits_eos_inf=logits_eos_inf,
                              confidence_eos_eot_inf=confidence_eos_eot_inf, progress=progress)
    fn, args, static = _llada_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)


# ---- Dream ---------------------------------------------------------------------------------

def _top_p_filter(logits, top_p):
    """Dream's top_p_logits: drop tokens once the sorted cumulative probability exceeds
    top_p, always keeping the most likely one."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum > top_p
    remove_sorted = jnp.concatenate(
        [jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, jnp.finfo(logits.dtype).min, logits)


def _top_k_filter(logits, top_k):
    """Dream's top_k_logits: drop tokens below the k-th largest logit (ties kept)."""
    k = min(top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, jnp.finfo(logits.dtype).min, logits)


def _sample_tokens(logits, key, s: DreamSettings):
    """Dream's sample_tokens -> (confidence, x0) for logits [..., V] (fp32)."""
    if s.temperature > 0:
        logits = logits / s.temperature
    if s.top_p is not None and s.top_p < 1:
        logits = _top_p_filter(logits, s.top_p)
    if s.top_k is not None:
        logits = _top_k_filter(logits, s.top_k)
    probs = jax.nn.softmax(logits, axis=-1)
    if s.temperature > 0:
        x0 = jax.random.categorical(key, logits, axis=-1)
        conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
        x0 = jnp.argmax(probs, axis=-1)
        conf = jnp.max(probs, axis=-1)
    if s.alg == "topk_margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        conf = top2[..., 0] - top2[..., 1]
    elif s.alg == "entropy":
        conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    return conf, x0.astype(jnp.int32)


def _dream_loop(state, prompt, attention_mask, key, *, graphdef, s: DreamSettings):
    """The Dream sampler as a pure function of (params state, prompt, mask, key)."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    n = s.max_new_tokens
    x = jnp.concatenate([prompt, jnp.full((b, n), s.mask_id, jnp.int32)], axis=1)
    mask = pos = None
    if attention_mask is not None:
        mask = jnp.concatenate([attention_mask, jnp.ones((b, n), jnp.int32)], axis=1)
        pos = jnp.where(mask == 0, 1, jnp.cumsum(mask, axis=1) - 1).astype(jnp.int32)
    # Shifted logits: generated position j (absolute p + j) reads hidden state p + j - 1.
    if p >= 1:
        src = slice(p - 1, p - 1 + n)
    else:
        src = None
    probs_t = jnp.asarray(dream_transfer_probs(s.steps, s.eps))
    ks = dream_transfer_schedule(n, s.steps, s.eps)
    k_max = int(ks.max())
    ks = jnp.asarray(ks)

    def step(i, carry):
        x, order = carry if s.record_order else (carry, None)
        _maybe_progress(s.progress, i, s.steps)
        if s.stochastic:
            k_transfer, k_sample, k_alg = jax.random.split(jax.random.fold_in(key, i), 3)
        else:
            k_transfer = k_sample = k_alg = None
        if src is not None and p >= 1:  # shifted: outputs p-1 .. p+n-2 score the span
            h_gen = model.hidden_states(x, mask, position_ids=pos, query_window=(p - 1, n))
        else:
            h = model.hidden_states(x, mask, position_ids=pos)
            h_gen = h[:, src] if src is not None else jnp.concatenate(
                [h[:, :1], h[:, : n - 1]], axis=1)
        logits = model.logits(h_gen).astype(jnp.float32)  # [B, n, V]
        x_gen = x[:, p:]
        masked = x_gen == s.mask_id
        conf, x0 = _sample_tokens(logits, k_sample, s)
        if s.alg == "origin":
            u = jax.random.uniform(k_transfer, (b, n), jnp.float32)
            transfer = masked & (u < probs_t[i])
        else:
            conf = jnp.where(masked, conf, _NEG_INF)
            if s.alg_temp:
                g = jax.random.gumbel(k_alg, conf.shape, jnp.float32)
                conf = conf / s.alg_temp + g
            transfer = _top_k_select(conf, ks[i], k_max) & masked
        x_gen = jnp.where(transfer, x0, x_gen)
        x = x.at[:, p:].set(x_gen)
        if not s.record_order:
            return x
        return x, order.at[:, p:].set(jnp.where(transfer, i, order[:, p:]))

    if s.record_order:
        return jax.lax.fori_loop(0, s.steps, step, (x, jnp.full(x.shape, -1, jnp.int32)))
    return jax.lax.fori_loop(0, s.steps, step, x)


_dream_jit = jax.jit(_dream_loop, static_argnames=("graphdef", "s"))


def dream_settings(model, *, max_new_tokens, steps, alg="origin", alg_temp=None,
                   temperature=0.0, top_p=None, top_k=None, eps=1e-3,
                   progress=False) -> DreamSettings:
    return DreamSettings(max_new_tokens=max_new_tokens, steps=steps,
                         mask_id=model.config.mask_token_id, alg=alg,
                         alg_temp=None if alg_temp is None else float(alg_temp),
                         temperature=float(temperature),
                         top_p=None if top_p is None else float(top_p),
                         top_k=None if top_k is None else int(top_k), eps=float(eps),
                         progress=progress)


def _dream_call(model, input_ids, attention_mask, key, settings):
    ids, mask = _prepare_inputs(model, input_ids, attention_mask)
    key = _default_key(key, settings.stochastic, f"Dream generation with alg={settings.alg!r}, "
                       f"temperature={settings.temperature}, alg_temp={settings.alg_temp}")
    graphdef, state = nnx.split(model)
    return _dream_jit, (state, ids, mask, key), dict(graphdef=graphdef, s=settings)


def dream_generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, steps: int,
                   alg: str = "origin", alg_temp: float | None = None,
                   temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, eps: float = 1e-3, key=None,
                   progress: bool = False) -> jax.Array:
    """Dream's `diffusion_generate` (see the module docstring). Returns
    `[batch, prompt_len + max_new_tokens]`. `key` is required when sampling is stochastic
    (alg="origin", temperature > 0 or alg_temp > 0)."""
    settings = dream_settings(model, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
                              alg_temp=alg_temp, temperature=temperature, top_p=top_p,
                              top_k=top_k, eps=eps, progress=progress)
    fn, args, static = _dream_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)


# ---- family dispatch -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Settings of `generate` for either family (the CLI's `gen` config section).

    LLaDA reads steps, gen_length, block_length (None = gen_length), temperature, cfg_scale,
    remasking. Dream reads steps, gen_length (as max_new_tokens), temperature, alg,
    alg_temp, top_p, top_k, eps. A field of the other family must keep its default (or be
    None).
    """

    steps: int = 128
    gen_length: int = 128
    block_length: int | None = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    alg: str = "entropy"
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    seed: int = 0

    @classmethod
    def from_mapping(cls, d) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"generation config: unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**dict(d))


_LLADA_ONLY = ("block_length", "cfg_scale", "remasking")
_DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")


def _check_unused(config: GenerationConfig, names, family):
    default = GenerationConfig()
    for name in names:
        value = getattr(config, name)
        if value is not None and value != getattr(default, name):
            raise ValueError(f"{name}={getattr(config, name)!r} does not apply to a "
                             f"{family} model")


def settings_for(model, config: GenerationConfig, *, progress: bool = False,
                 record_order: bool = False):
    """The static LLaDASettings / DreamSettings of `config` for this model's family."""
    settings = _settings_for(model, config, progress=progress)
    return dataclasses.replace(settings, record_order=record_order) if record_order \
        else settings


def _settings_for(model, config: GenerationConfig, *, progress: bool = False):
    family = model.config.family
    if family == "llada":
        _check_unused(config, _DREAM_ONLY, family)
        return llada_settings(model, gen_length=config.gen_length, steps=config.steps,
                              block_length=config.block_length or config.gen_length,
                              temperature=config.temperature, cfg_scale=config.cfg_scale,
                              remasking=config.remasking, progress=progress)
    if family == "dream":
        _check_unused(config, _LLADA_ONLY, family)
        return dream_settings(model, max_new_tokens=config.gen_length, steps=config.steps,
                              alg=config.alg, alg_temp=config.alg_temp,
                              temperature=config.temperature, top_p=config.top_p,
                              top_k=config.top_k, eps=config.eps, progress=progress)
    raise ValueError(f"model family {family!r}: expected 'llada' or 'dream'")


def _call_for(model, input_ids, attention_mask, key, settings):
    if isinstance(settings, LLaDASettings):
        return _llada_call(model, input_ids, attention_mask, key, settings)
    return _dream_call(model, input_ids, attention_mask, key, settings)


def _resolve(model, config, kwargs, key):
    config = config or GenerationConfig()
    if kwargs:
        config = dataclasses.replace(config, **kwargs)
    if key is None:
        key = jax.random.key(config.seed)
    return config, key


def generate(model, input_ids, attention_mask=None, *, config: GenerationConfig | None = None,
             key=None, progress: bool = False, **kwargs) -> jax.Array:
    """Generates with the model's family sampler: `llada_generate` or `dream_generate`.

    `config` (a GenerationConfig) and/or keyword overrides of its fields set the algorithm;
    `key` defaults to `jax.random.key(config.seed)`. Dream reads `gen_length` as
    `max_new_tokens`. Returns `[batch, prompt_len + gen_length]`.
    """
    config, key = _resolve(model, config, kwargs, key)
    settings = settings_for(model, config, progress=progress)
    fn, args, static = _call_for(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)


def compile_generate(model, input_ids, attention_mask=None, *,
                     config: GenerationConfig | None = None, key=None, progress: bool = False,
                     **kwargs) -> Callable[[], jax.Array]:
    """Ahead-of-time compiles `generate` for these inputs; returns a zero-argument function
    that runs the compiled loop (to time compilation and running separately)."""
    config, key = _resolve(model, config, kwargs, key)
    settings = settings_for(model, config, progress=progress)
    fn, args, static = _call_for(model, input_ids, attention_mask, key, settings)
    compiled = fn.lower(*args, **static).compile()
    return lambda: compiled(*args)


def generate_with_order(model, input_ids, attention_mask=None, *,
                        config: GenerationConfig | None = None, key=None, **kwargs):
    """`generate` that also returns when each position was decoded: (tokens, order), both
    `[batch, prompt_len + gen_length]` int32; order[b, j] = the 0-based step at which
    position j was committed, -1 on the prompt. The state after k steps is `tokens` with
    every position of order >= k set to the mask token. Without `config`, LLaDA's
    block_length defaults to gen_length (one block). Same tokens as `generate`."""
    if config is None and "block_length" not in kwargs:
        kwargs["block_length"] = None
    config, key = _resolve(model, config, kwargs, key)
    settings = settings_for(model, config, record_order=True)
    fn, args, static = _call_for(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, W], attention_mask [B, W]) with each row right-aligned (left padding);
    W = `width` (at least the longest row) or the longest row."""
    longest = max(len(r) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"width={width}: shorter than the longest row ({longest} tokens)")
    width = longest if width is None else width
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask
