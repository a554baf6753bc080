"""The Dream sampler as one jitted loop (`diffusion_generate`: origin, maskgit_plus,
topk_margin, entropy; top-p / top-k sampling). The algorithm and its random-number layout are
stated in `qdlm_jax/inference/generate.py`'s docstring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.inference.common import (
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
    prepare_inputs,
    refill_kv_cache,
    threshold_select,
    top_k_select,
)

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


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
    # Fast-dLLM's block decoding (`generation_utils_block.py`): any of these selects it.
    cache: str = "none"  # "none" | "prefix" | "dual" (block-wise approximate KV cache)
    threshold: float | None = None  # confidence-threshold parallel decoding (tau in (0, 1])
    factor: float | None = None  # factor-based parallel decoding (exclusive with threshold)
    block_length: int | None = None  # block decoding: required (it divides max_new_tokens)
    return_nfe: bool = False  # also return the number of forward passes (int32 scalar)

    def __post_init__(self):
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_positive_int("steps", self.steps)
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg={self.alg!r}: expected one of {DREAM_ALGS}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected >= 0")
        if self.alg_temp is not None and not self.alg_temp >= 0:
            raise ValueError(f"alg_temp={self.alg_temp!r}: expected None or >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: expected None or in (0, 1]")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps={self.eps!r}: expected 0 <= eps < 1")
        check_cache_threshold(self.cache, self.threshold, self.factor)
        if not self.fast:
            if self.block_length is not None:
                raise ValueError(f"block_length={self.block_length!r}: Dream's plain loop "
                                 "has no blocks; block_length applies with a cache, threshold "
                                 "or factor (Fast-dLLM's block decoding)")
            return
        if self.block_length is None:
            raise ValueError("block_length=None: Dream's block decoding (cache / threshold / "
                             "factor) needs a block length dividing max_new_tokens")
        check_blocks("max_new_tokens", self.max_new_tokens, self.block_length, self.steps)
        if self.parallel is None:
            if self.alg == "origin":
                raise ValueError("alg='origin' with Dream's block decoding: the block "
                                 "schedule ranks positions by confidence; use maskgit_plus, "
                                 "topk_margin or entropy (Fast-dLLM uses entropy)")
            if self.steps_per_block < 2 and self.block_length > 1:
                raise ValueError(f"steps={self.steps}: {self.steps_per_block} step per block "
                                 f"of {self.block_length}; Dream's block schedule commits one "
                                 "token at a block's first step and the rest over the later "
                                 "steps, so it needs at least 2 steps per block (or a "
                                 "threshold / factor)")

    @property
    def fast(self) -> bool:
        """Whether Fast-dLLM's block decoding runs (a cache, a threshold or a factor)."""
        return self.cache != "none" or self.threshold is not None or self.factor is not None

    @property
    def parallel(self) -> str | None:
        """The parallel commit rule: "threshold", "factor" or None (the step schedule)."""
        if self.threshold is not None:
            return "threshold"
        return "factor" if self.factor is not None else None

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def stochastic(self) -> bool:
        if self.fast and self.parallel is not None:  # alg / alg_temp are not read
            return self.temperature > 0
        return self.temperature > 0 or self.alg == "origin" or bool(self.alg_temp)



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


def _sample_tokens(logits, key, s: DreamSettings, conf_alg: str | None = None):
    """Dream's sample_tokens -> (confidence, x0) for logits [..., V] (fp32); the confidence
    of `conf_alg` (default s.alg; maskgit_plus / origin: p[x0])."""
    conf_alg = s.alg if conf_alg is None else conf_alg
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
    if conf_alg == "topk_margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        conf = top2[..., 0] - top2[..., 1]
    elif conf_alg == "entropy":
        conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    return conf, x0.astype(jnp.int32)


def _dream_inputs(prompt, attention_mask, s: DreamSettings):
    """x = [prompt | max_new_tokens x MASK], the extended key-padding mask and Dream's
    positions cumsum(mask) - 1 (1 on padding); mask and positions are None without padding."""
    b, n = prompt.shape[0], s.max_new_tokens
    x = jnp.concatenate([prompt, jnp.full((b, n), s.mask_id, jnp.int32)], axis=1)
    mask = pos = None
    if attention_mask is not None:
        mask = jnp.concatenate([attention_mask, jnp.ones((b, n), jnp.int32)], axis=1)
        pos = jnp.where(mask == 0, 1, jnp.cumsum(mask, axis=1) - 1).astype(jnp.int32)
    return x, mask, pos


def _dream_loop(state, prompt, attention_mask, key, *, graphdef, s: DreamSettings):
    """The Dream sampler as a pure function of (params state, prompt, mask, key)."""
    if s.fast:
        return _dream_block_loop(state, prompt, attention_mask, key, graphdef=graphdef, s=s)
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    n = s.max_new_tokens
    x, mask, pos = _dream_inputs(prompt, attention_mask, s)
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
        maybe_progress(s.progress, i, s.steps)
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
            conf = jnp.where(masked, conf, NEG_INF)
            if s.alg_temp:
                g = jax.random.gumbel(k_alg, conf.shape, jnp.float32)
                conf = conf / s.alg_temp + g
            transfer = top_k_select(conf, ks[i], k_max) & masked
        x_gen = jnp.where(transfer, x0, x_gen)
        x = x.at[:, p:].set(x_gen)
        if not s.record_order:
            return x
        return x, order.at[:, p:].set(jnp.where(transfer, i, order[:, p:]))

    if s.record_order:
        out = jax.lax.fori_loop(0, s.steps, step, (x, jnp.full(x.shape, -1, jnp.int32)))
    else:
        out = (jax.lax.fori_loop(0, s.steps, step, x),)
    out = out + ((jnp.int32(s.steps),) if s.return_nfe else ())
    return out[0] if len(out) == 1 else out


def dream_block_ratios(steps_per_block: int, eps: float) -> np.ndarray:
    """`1 - s/t` of step i of a block (t = ts[i], s = ts[i + 1], ts = linspace(1, eps,
    spb + 1)) in float32, as Fast-dLLM's block code computes it in torch float32."""
    ts = dream_timesteps(steps_per_block, eps)
    return (np.float32(1.0) - ts[1:] / ts[:-1]).astype(np.float32)


def _dream_block_loop(state, prompt, attention_mask, key, *, graphdef, s: DreamSettings):
    """Fast-dLLM's Dream block decoding (`dream/model/generation_utils_block.py`, `_sample`),
    with the no-cache variant, left padding and per-row completion; stated in generate.py's
    docstring. Blocks in a fori_loop, a block's later steps in a while_loop."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    lb, spb = s.block_length, s.steps_per_block
    x, mask, pos = _dream_inputs(prompt, attention_mask, s)
    ratios = jnp.asarray(dream_block_ratios(spb, s.eps))

    def sample(logits, g, conf_alg=None):
        k_sample = k_alg = None
        if s.stochastic:
            _, k_sample, k_alg = jax.random.split(jax.random.fold_in(key, g), 3)
        conf, x0 = _sample_tokens(logits, k_sample, s, conf_alg)
        return conf, x0, k_alg

    def first_step(x, order, g, start, kv):
        # a full forward; the block's first position takes x0 of the (shifted) logits: the
        # output at start - 1 (at position 0 its own output, as Dream's shift does)
        qs = jnp.maximum(start - 1, 0)
        if s.cache == "none":
            h = model.hidden_states(x, mask, position_ids=pos, query_window=(qs, 1))
        else:  # the full forward refills the cache (in place: kv is loop state)
            h, new_kv = model.hidden_states_with_kv(x, mask, position_ids=pos,
                                                    query_window=(qs, 1))
            kv = refill_kv_cache(kv, new_kv)
        _, x0, _ = sample(model.logits(h).astype(jnp.float32), g, "maskgit_plus")
        sel = jax.lax.dynamic_slice_in_dim(x, start, 1, axis=1) == s.mask_id
        x, order = commit_block(x, order, sel, x0, g, start, 1, s.record_order)
        return x, order, kv

    def block_logits(x, start, kv):
        if s.cache == "none":
            h = model.hidden_states(x, mask, position_ids=pos, query_window=(start, lb))
        else:
            h = cached_block_hidden(model, x, start, kv, mask, cache=s.cache, block_length=lb,
                                    gen_length=s.max_new_tokens, position_ids=pos)
        # Fast-dLLM shifts inside the computed window: block position j > start reads the
        # output at j - 1, the block's first position (committed at the first step) its own
        h = jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)
        return model.logits(h).astype(jnp.float32)

    def decide(x, order, logits, g, i, start):
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        masked = x_blk == s.mask_id
        if s.parallel is not None:  # Fast-dLLM's confidence_threshold: confidence p[x0]
            conf, x0, _ = sample(logits, g, "maskgit_plus")
            conf = jnp.where(masked, conf, NEG_INF)
            sel = threshold_select(conf, s.threshold) if s.parallel == "threshold" else \
                factor_select(conf, s.factor)
        else:
            conf, x0, k_alg = sample(logits, g)
            conf = jnp.where(masked, conf, NEG_INF)
            m = masked.sum(axis=1)
            k = jnp.where(i < spb - 1, (m.astype(jnp.float32) * ratios[i]).astype(jnp.int32), m)
            if s.alg_temp:
                conf = conf / s.alg_temp + jax.random.gumbel(k_alg, conf.shape, jnp.float32)
            sel = top_k_select(conf, k[:, None], lb) & masked
        x_new, order = commit_block(x, order, sel, x0, g, start, lb, s.record_order)
        return x_new, order, jnp.any(x_new != x)

    def block(nb, carry):
        x, order, g, kv = carry
        start = p + nb * lb
        maybe_progress(s.progress, nb, s.num_blocks)
        x, order, kv = first_step(x, order, g, start, kv)

        def cond(c):
            x, _, _, i, progressed = c
            go = jnp.any(jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1) == s.mask_id)
            if s.parallel is None:
                return go & (i < spb)
            # a deterministic step that commits nothing but the mask token itself would
            # repeat forever (Fast-dLLM's loop does); stop the block there
            return go & (progressed | (s.temperature > 0))

        def body(c):
            x, order, g, i, _ = c
            x, order, progressed = decide(x, order, block_logits(x, start, kv), g, i, start)
            return x, order, g + 1, i + 1, progressed

        x, order, g, _, _ = jax.lax.while_loop(
            cond, body, (x, order, g + 1, jnp.int32(1), jnp.bool_(True)))
        return x, order, g, kv

    order = jnp.full(x.shape, -1, jnp.int32) if s.record_order else None
    kv = None if s.cache == "none" else empty_kv_cache(model, b, x.shape[1])
    x, order, nfe, _ = jax.lax.fori_loop(0, s.num_blocks, block, (x, order, jnp.int32(0), kv))
    out = (x,) + ((order,) if s.record_order else ()) + ((nfe,) if s.return_nfe else ())
    return out[0] if len(out) == 1 else out


_dream_jit = jax.jit(_dream_loop, static_argnames=("graphdef", "s"))


def dream_settings(model, *, max_new_tokens, steps, alg="origin", alg_temp=None,
                   temperature=0.0, top_p=None, top_k=None, eps=1e-3,
                   progress=False, cache="none", threshold=None, factor=None,
                   block_length=None) -> DreamSettings:
    return DreamSettings(max_new_tokens=max_new_tokens, steps=steps,
                         mask_id=model.config.mask_token_id, alg=alg,
                         alg_temp=None if alg_temp is None else float(alg_temp),
                         temperature=float(temperature),
                         top_p=None if top_p is None else float(top_p),
                         top_k=None if top_k is None else int(top_k), eps=float(eps),
                         progress=progress, cache=cache, threshold=threshold, factor=factor,
                         block_length=block_length)


def dream_call(model, input_ids, attention_mask, key, settings):
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    key = default_key(key, settings.stochastic, f"Dream generation with alg={settings.alg!r}, "
                       f"temperature={settings.temperature}, alg_temp={settings.alg_temp}")
    graphdef, state = nnx.split(model)
    return _dream_jit, (state, ids, mask, key), dict(graphdef=graphdef, s=settings)


def dream_generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, steps: int,
                   alg: str = "origin", alg_temp: float | None = None,
                   temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, eps: float = 1e-3, key=None,
                   progress: bool = False, cache: str = "none",
                   threshold: float | None = None, factor: float | None = None,
                   block_length: int | None = None) -> jax.Array:
    """Dream's `diffusion_generate` (see the module docstring). Returns
    `[batch, prompt_len + max_new_tokens]`. `key` is required when sampling is stochastic
    (alg="origin", temperature > 0 or alg_temp > 0).

    `cache` ("none" | "prefix" | "dual"), `threshold` (tau in (0, 1]) or `factor` (f > 0)
    select Fast-dLLM's Dream block decoding with `block_length` (see generate.py)."""
    settings = dream_settings(model, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
                              alg_temp=alg_temp, temperature=temperature, top_p=top_p,
                              top_k=top_k, eps=eps, progress=progress, cache=cache,
                              threshold=threshold, factor=factor, block_length=block_length)
    fn, args, static = dream_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)

