"""The LLaDA sampler as one jitted loop (semi-autoregressive blocks, low-confidence or random
remasking, classifier-free guidance). The algorithm and its random-number layout are stated in
`qdlm_jax/inference/generate.py`'s docstring."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.inference.common import (
    CACHE_MODES,
    NEG_INF,
    cached_block_hidden,
    check_blocks,
    check_cache_threshold,
    check_positive_int,
    commit_block,
    default_key,
    empty_kv_cache,
    factor_select,
    maybe_progress,
    prefix_windows,
    prepare_inputs,
    refill_kv_cache,
    threshold_select,
    top_k_select,
)

REMASKING = ("low_confidence", "random")
__all__ = ["REMASKING", "CACHE_MODES", "LLaDASettings", "check_cache_threshold",
           "threshold_select", "factor_select", "prefix_windows", "llada_transfer_schedule",
           "llada_settings", "llada_call", "llada_generate"]


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
    cache: str = "none"  # "none" | "prefix" | "dual" (Fast-dLLM's block-wise KV cache)
    threshold: float | None = None  # commit every masked block position with conf >= tau
    factor: float | None = None  # Fast-dLLM's factor rule instead (exclusive with threshold)
    return_nfe: bool = False  # also return the number of forward passes (int32 scalar)

    def __post_init__(self):
        check_positive_int("gen_length", self.gen_length)
        check_positive_int("steps", self.steps)
        check_blocks("gen_length", self.gen_length, self.block_length, self.steps)
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}: expected one of {REMASKING}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected >= 0")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: expected >= 0")
        check_cache_threshold(self.cache, self.threshold, self.factor)
        if self.cache != "none" and self.cfg_scale > 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r} with cache={self.cache!r}: "
                             "classifier-free guidance runs only without a KV cache")
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

    @property
    def fast(self) -> bool:
        """Whether the Fast-dLLM loop runs (a KV cache, a threshold or a factor)."""
        return self.cache != "none" or self.threshold is not None or self.factor is not None



def llada_transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
    """Tokens committed at each step of a block: `block_length // spb`, the first
    `block_length % spb` steps one more (LLaDA's get_num_transfer_tokens on a full block)."""
    base, rem = divmod(block_length, steps_per_block)
    sched = np.full(steps_per_block, base, np.int32)
    sched[:rem] += 1
    return sched



def _propose(s: LLaDASettings, logits, x_blk, g, key):
    """(x0, conf) for one block: the proposed tokens and their confidences (-inf where the
    block is not masked). `logits` [B, lb, V] float32 after CFG; g = the global step."""
    b, lb = x_blk.shape
    if s.stochastic:  # (no RNG ops in the graph of a deterministic sampler)
        k_gumbel, k_remask = jax.random.split(jax.random.fold_in(key, g))
    if s.logits_eos_inf:
        logits = logits.at[..., s.eos_id].set(NEG_INF)
    if s.temperature > 0:
        u = jax.random.uniform(k_gumbel, logits.shape, jnp.float32)
        x0 = jnp.argmax(logits - s.temperature * jnp.log(-jnp.log(u)), axis=-1)
    else:
        x0 = jnp.argmax(logits, axis=-1)
    x0 = x0.astype(jnp.int32)
    if s.remasking == "low_confidence":
        conf_logits = logits
        if s.confidence_eos_eot_inf:
            conf_logits = conf_logits.at[..., s.eos_id].set(NEG_INF)
            if s.eot_id is not None:
                conf_logits = conf_logits.at[..., s.eot_id].set(NEG_INF)
        lse = jax.nn.logsumexp(conf_logits, axis=-1)
        chosen = jnp.take_along_axis(conf_logits, x0[..., None], axis=-1)[..., 0]
        conf = jnp.exp(chosen - lse)  # softmax(logits)[x0]
    else:
        conf = jax.random.uniform(k_remask, (b, lb), jnp.float32)
    return x0, jnp.where(x_blk == s.mask_id, conf, NEG_INF)


class _Setup(NamedTuple):
    """What both LLaDA loops build before their first step."""
    model: object
    x: jax.Array  # [B, T] = [prompt | gen_length x MASK]
    mask: jax.Array | None  # [B, T] key-padding mask (None without padding)
    p: int  # prompt length
    sched: jax.Array  # tokens committed at each step of a block (LLaDA's schedule)
    k_max: int


def _setup(state, prompt, attention_mask, graphdef, s: LLaDASettings) -> _Setup:
    b, p = prompt.shape
    x = jnp.concatenate([prompt, jnp.full((b, s.gen_length), s.mask_id, jnp.int32)], axis=1)
    mask = None
    if attention_mask is not None:
        mask = jnp.concatenate([attention_mask, jnp.ones((b, s.gen_length), jnp.int32)], 1)
    sched_np = llada_transfer_schedule(s.block_length, s.steps_per_block)
    return _Setup(nnx.merge(graphdef, state), x, mask, p, jnp.asarray(sched_np),
                  int(sched_np.max()))


def _block_logits(s: LLaDASettings, su: _Setup, x, start):
    """float32 logits [B, block_length, V] of the block at `start` from a full forward of x,
    with classifier-free guidance when cfg_scale > 0: the unconditional branch is x with every
    prompt position masked, both branches run as one batch, un + (cfg + 1)(cond - un)."""
    lb, model = s.block_length, su.model
    if s.cfg_scale > 0:
        b = x.shape[0]
        un_x = jnp.where((jnp.arange(x.shape[1]) < su.p)[None, :], s.mask_id, x)
        mask2 = None if su.mask is None else jnp.concatenate([su.mask, su.mask], axis=0)
        h = model.hidden_states(jnp.concatenate([x, un_x], axis=0), mask2,
                                query_window=(start, lb))
        logits = model.logits(h).astype(jnp.float32)
        cond, un = logits[:b], logits[b:]
        return un + (s.cfg_scale + 1.0) * (cond - un)
    h = model.hidden_states(x, su.mask, query_window=(start, lb))
    return model.logits(h).astype(jnp.float32)


def _llada_loop(state, prompt, attention_mask, key, *, graphdef, s: LLaDASettings):
    """The LLaDA sampler as a pure function of (params state, prompt, mask, key)."""
    if s.fast:
        return _llada_fast_loop(state, prompt, attention_mask, key, graphdef=graphdef, s=s)
    su = _setup(state, prompt, attention_mask, graphdef, s)
    lb, spb = s.block_length, s.steps_per_block

    def step(g, carry):
        x, order = carry
        maybe_progress(s.progress, g, s.steps)
        start = su.p + (g // spb) * lb
        logits = _block_logits(s, su, x, start)
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        x0, conf = _propose(s, logits, x_blk, g, key)
        sel = top_k_select(conf, su.sched[g % spb], su.k_max) & (x_blk == s.mask_id)
        return commit_block(x, order, sel, x0, g, start, lb, s.record_order)

    order = jnp.full(su.x.shape, -1, jnp.int32) if s.record_order else None
    x, order = jax.lax.fori_loop(0, s.steps, step, (su.x, order))
    return _outputs(s, x, order, jnp.int32(s.steps))


def _outputs(s, x, order, nfe):
    out = (x,) + ((order,) if s.record_order else ()) + ((nfe,) if s.return_nfe else ())
    return out[0] if len(out) == 1 else out


def _llada_fast_loop(state, prompt, attention_mask, key, *, graphdef, s: LLaDASettings):
    """Fast-dLLM's LLaDA decoding (see generate.py's docstring): blocks in a fori_loop, each
    block's steps in a while_loop that runs until no position of the block is masked in any
    row. The block's first step is a full forward (which also refills the KV cache); later
    steps run the cached forward of `s.cache`. Commits: the scheduled top-k, with a threshold
    the most confident position plus every one with confidence >= threshold, with a factor
    Fast-dLLM's factor rule (`factor_select`)."""
    su = _setup(state, prompt, attention_mask, graphdef, s)
    model, lb, spb = su.model, s.block_length, s.steps_per_block

    def decide(x, order, logits, g, i, start):
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        x0, conf = _propose(s, logits, x_blk, g, key)
        if s.threshold is not None:
            sel = threshold_select(conf, s.threshold)
        elif s.factor is not None:
            sel = factor_select(conf, s.factor)
        else:
            sel = top_k_select(conf, su.sched[jnp.minimum(i, spb - 1)], su.k_max)
            sel = sel & (x_blk == s.mask_id)
        x_new, order = commit_block(x, order, sel, x0, g, start, lb, s.record_order)
        return x_new, order, jnp.any(x_new != x)

    def block(nb, carry):
        x, order, g, kv = carry
        start = su.p + nb * lb
        maybe_progress(s.progress, nb, s.num_blocks)
        if s.cache == "none":
            logits = _block_logits(s, su, x, start)
        else:  # the block's first step refills the cache (in place: kv is loop state)
            h, new_kv = model.hidden_states_with_kv(x, su.mask, query_window=(start, lb))
            kv = refill_kv_cache(kv, new_kv)
            logits = model.logits(h).astype(jnp.float32)
        x, order, progressed = decide(x, order, logits, g, 0, start)

        def cond(c):
            x, _, _, _, progressed = c
            go = jnp.any(jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1) == s.mask_id)
            # a deterministic step whose commits are all the mask token itself would repeat
            # forever; the block stops there (its masked positions stay masked)
            return go & (progressed | (s.temperature > 0))

        def body(c):
            x, order, g, i, _ = c
            if s.cache == "none":
                logits = _block_logits(s, su, x, start)
            else:
                h = cached_block_hidden(model, x, start, kv, su.mask, cache=s.cache,
                                        block_length=lb, gen_length=s.gen_length)
                logits = model.logits(h).astype(jnp.float32)
            x, order, progressed = decide(x, order, logits, g, i, start)
            return x, order, g + 1, i + 1, progressed

        x, order, g, _, _ = jax.lax.while_loop(cond, body,
                                               (x, order, g + 1, jnp.int32(1), progressed))
        return x, order, g, kv

    order = jnp.full(su.x.shape, -1, jnp.int32) if s.record_order else None
    kv = None if s.cache == "none" else empty_kv_cache(model, su.x.shape[0], su.x.shape[1])
    x, order, nfe, _ = jax.lax.fori_loop(0, s.num_blocks, block,
                                         (su.x, order, jnp.int32(0), kv))
    return _outputs(s, x, order, nfe)


_llada_jit = jax.jit(_llada_loop, static_argnames=("graphdef", "s"))


def llada_call(model, input_ids, attention_mask, key, settings):
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    key = default_key(key, settings.stochastic, "LLaDA generation with "
                       f"temperature={settings.temperature}, remasking={settings.remasking!r}")
    graphdef, state = nnx.split(model)
    return _llada_jit, (state, ids, mask, key), dict(graphdef=graphdef, s=settings)


def llada_settings(model, *, gen_length, steps, block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", logits_eos_inf=False,
                   confidence_eos_eot_inf=False, progress=False, cache="none",
                   threshold=None, factor=None) -> LLaDASettings:
    c = model.config
    return LLaDASettings(gen_length=gen_length, steps=steps, block_length=block_length,
                         mask_id=c.mask_token_id, temperature=float(temperature),
                         cfg_scale=float(cfg_scale), remasking=remasking,
                         logits_eos_inf=logits_eos_inf,
                         confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=c.eos_token_id,
                         eot_id=c.eot_token_id, progress=progress, cache=cache,
                         threshold=threshold, factor=factor)


def llada_generate(model, input_ids, attention_mask=None, *, gen_length: int, steps: int,
                   block_length: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                   remasking: str = "low_confidence", logits_eos_inf: bool = False,
                   confidence_eos_eot_inf: bool = False, key=None,
                   progress: bool = False, cache: str = "none",
                   threshold: float | None = None, factor: float | None = None) -> jax.Array:
    """LLaDA sampling (see the module docstring). Returns `[batch, prompt_len + gen_length]`.

    `cache` ("none" | "prefix" | "dual"), `threshold` (None or tau in (0, 1]) and `factor`
    (None or f > 0; not with a threshold) select Fast-dLLM's block-wise KV cache and its
    confidence-threshold / factor-based parallel decoding (see
    `qdlm_jax/inference/generate.py`).

    input_ids: `[batch, prompt_len]` int, left-padded for batches of different lengths, with
    `attention_mask` 1 = token, 0 = padding. `key` is required when sampling is stochastic
    (temperature > 0 or remasking="random").
    """
    settings = llada_settings(model, gen_length=gen_length, steps=steps,
                              block_length=block_length, temperature=temperature,
                              cfg_scale=cfg_scale, remasking=remasking,
                              logits_eos_inf=logits_eos_inf,
                              confidence_eos_eot_inf=confidence_eos_eot_inf, progress=progress,
                              cache=cache, threshold=threshold, factor=factor)
    fn, args, static = llada_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)

