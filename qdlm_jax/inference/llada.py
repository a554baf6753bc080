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



def llada_transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
    """Tokens committed at each step of a block: `block_length // spb`, the first
    `block_length % spb` steps one more (LLaDA's get_num_transfer_tokens on a full block)."""
    base, rem = divmod(block_length, steps_per_block)
    sched = np.full(steps_per_block, base, np.int32)
    sched[:rem] += 1
    return sched



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
        maybe_progress(s.progress, g, s.steps)
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
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
        masked = x_blk == s.mask_id
        conf = jnp.where(masked, conf, NEG_INF)
        sel = top_k_select(conf, sched[g % spb], k_max) & masked
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


def llada_call(model, input_ids, attention_mask, key, settings):
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    key = default_key(key, settings.stochastic, "LLaDA generation with "
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
    fn, args, static = llada_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)

