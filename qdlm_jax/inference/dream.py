"""The Dream sampler as one jitted loop (`diffusion_generate`: origin, maskgit_plus,
topk_margin, entropy; top-p / top-k sampling). The algorithm and its random-number layout are
stated in `qdlm_jax/inference/generate.py`'s docstring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.inference.common import (NEG_INF, check_positive_int, default_key, maybe_progress,
                                       prepare_inputs, top_k_select)

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

    @property
    def stochastic(self) -> bool:
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
                   progress: bool = False) -> jax.Array:
    """Dream's `diffusion_generate` (see the module docstring). Returns
    `[batch, prompt_len + max_new_tokens]`. `key` is required when sampling is stochastic
    (alg="origin", temperature > 0 or alg_temp > 0)."""
    settings = dream_settings(model, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
                              alg_temp=alg_temp, temperature=temperature, top_p=top_p,
                              top_k=top_k, eps=eps, progress=progress)
    fn, args, static = dream_call(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)

