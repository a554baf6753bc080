"""The LLaDA sampler as one jitted loop (semi-autoregressive blocks, low-confidence or random
remasking, classifier-free guidance). The algorithm and its random-number layout are stated in
`qdlm_jax/inference/generate.py`'s docstring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.inference.common import (NEG_INF, check_positive_int, default_key, maybe_progress,
                                       prepare_inputs, top_k_select)

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")


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
    return_nfe: bool = False  # also return the number of forward passes (int32 scalar)

    def __post_init__(self):
        check_positive_int("gen_length", self.gen_length)
        check_positive_int("steps", self.steps)
        check_positive_int("block_length", self.block_length)
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
        check_cache_threshold(self.cache, self.threshold)
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
        """Whether the Fast-dLLM loop runs (a KV cache or a confidence threshold)."""
        return self.cache != "none" or self.threshold is not None


def check_cache_threshold(cache, threshold):
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}: expected one of {CACHE_MODES}")
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float, np.floating))
                                  or not 0 < threshold <= 1):
        raise ValueError(f"threshold={threshold!r}: expected None or a number in (0, 1]")



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


def threshold_select(conf: jax.Array, threshold: float) -> jax.Array:
    """Fast-dLLM's threshold rule on confidences with -inf off the masked positions: per row,
    the most confident masked position (ties: the lower index) plus every masked position
    with confidence >= threshold; nothing in a row without masked positions."""
    masked = conf > NEG_INF
    best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=bool)
    return (best | (conf >= threshold)) & masked


def _commit(x, order, sel, x0, g, start, lb, record_order):
    x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
    x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(sel, x0, x_blk), start, axis=1)
    if record_order:
        o_blk = jax.lax.dynamic_slice_in_dim(order, start, lb, axis=1)
        order = jax.lax.dynamic_update_slice_in_dim(order, jnp.where(sel, g, o_blk), start,
                                                    axis=1)
    return x, order


def _llada_loop(state, prompt, attention_mask, key, *, graphdef, s: LLaDASettings):
    """The LLaDA sampler as a pure function of (params state, prompt, mask, key)."""
    if s.fast:
        return _llada_fast_loop(state, prompt, attention_mask, key, graphdef=graphdef, s=s)
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
        x, order = carry
        maybe_progress(s.progress, g, s.steps)
        start = p + (g // spb) * lb
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
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        x0, conf = _propose(s, logits, x_blk, g, key)
        sel = top_k_select(conf, sched[g % spb], k_max) & (x_blk == s.mask_id)
        return _commit(x, order, sel, x0, g, start, lb, s.record_order)

    order = jnp.full(x.shape, -1, jnp.int32) if s.record_order else None
    x, order = jax.lax.fori_loop(0, s.steps, step, (x, order))
    return _outputs(s, x, order, jnp.int32(s.steps))


def _outputs(s, x, order, nfe):
    out = (x,) + ((order,) if s.record_order else ()) + ((nfe,) if s.return_nfe else ())
    return out[0] if len(out) == 1 else out


def prefix_windows(gen_length: int, block_length: int) -> list[int]:
    """Window sizes of the prefix-cache forward: block_length * 2^k, capped at gen_length
    (the suffix from a block on has gen_length - nb * block_length positions)."""
    sizes, w = [], block_length
    while w < gen_length:
        sizes.append(w)
        w *= 2
    return sizes + [gen_length]


def _llada_fast_loop(state, prompt, attention_mask, key, *, graphdef, s: LLaDASettings):
    """Fast-dLLM's LLaDA decoding (see generate.py's docstring): blocks in a fori_loop, each
    block's steps in a while_loop that runs until no position of the block is masked in any
    row. The block's first step is a full forward (which also refills the KV cache); later
    steps run the cached forward of `s.cache`. Commits: the scheduled top-k, or with a
    threshold the most confident position plus every one with confidence >= threshold."""
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
    cfg = s.cfg_scale > 0  # (only without a cache)
    if cfg:
        mask2 = None if mask is None else jnp.concatenate([mask, mask], axis=0)

    def full_logits(x, start):
        if cfg:
            un_x = jnp.where(is_prompt[None, :], s.mask_id, x)
            h = model.hidden_states(jnp.concatenate([x, un_x], axis=0), mask2,
                                    query_window=(start, lb))
            logits = model.logits(h).astype(jnp.float32)
            cond, un = logits[:b], logits[b:]
            return un + (s.cfg_scale + 1.0) * (cond - un)
        h = model.hidden_states(x, mask, query_window=(start, lb))
        return model.logits(h).astype(jnp.float32)

    # prefix: the window is the last W positions, W the smallest of `windows` that covers
    # the block and everything after it; positions of the window before the block take the
    # cached keys/values (their outputs are discarded). One branch per window size.
    windows = prefix_windows(s.gen_length, lb)

    def prefix_branch(w):
        def run(x, start, kv):
            ws = t_total - w
            h = model.hidden_states_cached(x[:, ws:], ws, kv, mask, fresh_from=start)
            return jax.lax.dynamic_slice_in_dim(h, start - ws, lb, axis=1)
        return run

    def cached_logits(x, start, kv):
        if s.cache == "prefix":
            which = jnp.searchsorted(jnp.asarray(windows), t_total - start)
            h = jax.lax.switch(which, [prefix_branch(w) for w in windows], x, start, kv)
        else:  # dual: window = the block; every other position: cached
            h = model.hidden_states_cached(jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1),
                                           start, kv, mask)
        return model.logits(h).astype(jnp.float32)

    def decide(x, order, logits, g, i, start):
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        x0, conf = _propose(s, logits, x_blk, g, key)
        if s.threshold is None:
            sel = top_k_select(conf, sched[jnp.minimum(i, spb - 1)], k_max)
            sel = sel & (x_blk == s.mask_id)
        else:
            sel = threshold_select(conf, s.threshold)
        return _commit(x, order, sel, x0, g, start, lb, s.record_order)

    def block(nb, carry):
        x, order, g, kv = carry
        start = p + nb * lb
        maybe_progress(s.progress, nb, s.num_blocks)
        if s.cache == "none":
            logits = full_logits(x, start)
        else:  # the block's first step refills the cache (in place: kv is loop state)
            h, new_kv = model.hidden_states_with_kv(x, mask, query_window=(start, lb))
            kv = jax.tree.map(lambda a, old: a.astype(old.dtype), new_kv, kv)
            logits = model.logits(h).astype(jnp.float32)
        x, order = decide(x, order, logits, g, 0, start)

        def cond(c):
            x_blk = jax.lax.dynamic_slice_in_dim(c[0], start, lb, axis=1)
            return jnp.any(x_blk == s.mask_id)

        def body(c):
            x, order, g, i = c
            logits = full_logits(x, start) if s.cache == "none" else \
                cached_logits(x, start, kv)
            x, order = decide(x, order, logits, g, i, start)
            return x, order, g + 1, i + 1

        x, order, g, _ = jax.lax.while_loop(cond, body, (x, order, g + 1, jnp.int32(1)))
        return x, order, g, kv

    order = jnp.full(x.shape, -1, jnp.int32) if s.record_order else None
    kv = None
    if s.cache != "none":
        c = model.config
        shape = (c.num_layers, b, t_total, c.num_kv_heads, c.head_dim)
        kv = (jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype))
    x, order, nfe, _ = jax.lax.fori_loop(0, s.num_blocks, block, (x, order, jnp.int32(0), kv))
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
                   threshold=None) -> LLaDASettings:
    c = model.config
    return LLaDASettings(gen_length=gen_length, steps=steps, block_length=block_length,
                         mask_id=c.mask_token_id, temperature=float(temperature),
                         cfg_scale=float(cfg_scale), remasking=remasking,
                         logits_eos_inf=logits_eos_inf,
                         confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=c.eos_token_id,
                         eot_id=c.eot_token_id, progress=progress, cache=cache,
                         threshold=threshold)


def llada_generate(model, input_ids, attention_mask=None, *, gen_length: int, steps: int,
                   block_length: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                   remasking: str = "low_confidence", logits_eos_inf: bool = False,
                   confidence_eos_eot_inf: bool = False, key=None,
                   progress: bool = False, cache: str = "none",
                   threshold: float | None = None) -> jax.Array:
    """LLaDA sampling (see the module docstring). Returns `[batch, prompt_len + gen_length]`.

    `cache` ("none" | "prefix" | "dual") and `threshold` (None or tau in (0, 1]) select
    Fast-dLLM's block-wise KV cache and confidence-threshold parallel decoding (see
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
                              cache=cache, threshold=threshold)
    fn, args, static = llada_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)

