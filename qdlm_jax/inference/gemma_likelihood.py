"""Monte Carlo scores for DiffusionGemma (uniform-state block diffusion): `answer_score`
(below) and `left_to_right_nll` (a text likelihood; its docstring).

DiffusionGemma's noise replaces a token by a uniform vocabulary id; there is no mask token,
so the masked-diffusion ELBO of `likelihood.py` does not apply. `answer_score` is instead the
decoder's denoising cross-entropy of the clean answer, averaged over noise levels: lower means
the model finds the answer more likely after the prompt. With the answer a (n tokens) cut into
canvases a^(k) of L = canvas_length tokens (the last one may be shorter):

    cache_k  = Enc(prompt, a^(0), ..., a^(k-1))            (clean, causal, as generation does)
    x_i      = u_i if m_i else a_i,   m_i ~ Bernoulli(t),  u_i ~ U{0..V-1}   (canvas k)
    sc       = none, or with `self_condition`: Dec(x, none, cache_k) / T_t cast to the
               embedding dtype, T_t = t_min + (t_max - t_min) t (the sampler's temperature
               at the step n/N = t)
    CE_i     = -log softmax(Dec(x, sc, cache_k))_i[a_i]      (fp32, soft-capped logits)
    score    = 1/|levels| sum_t  1/S sum_{s=1..S}  1/n sum_{i<n} CE_i(t, s)

Every answer position is scored, noised or not (uniform-state diffusion trains the denoiser on
all of them); a last canvas shorter than L is filled with clean pad tokens that are neither
noised nor scored. The S samples of a level run as one decoder batch.

Random numbers: level l of canvas k uses `fold_in(fold_in(key, k), l)`, split into (mask key,
ids key): `uniform(mask key, [S, L]) < t` and `randint(ids key, [S, L], 0, V)`.

Compilation: the prompt is left-padded to `common.bucket(P)` (padding masked; RoPE is
relative, so the score does not change beyond float rounding) and the answer to whole
canvases with its true length traced, so one program serves every (bucketed P, canvas count,
settings).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from qdlm_jax.inference.common import bucket
from qdlm_jax.models.diffusion_gemma import DiffusionGemma, KVCache, init_cache

__all__ = ["GemmaScoreSettings", "answer_score", "left_to_right_nll"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaScoreSettings:
    """Static settings of `answer_score` (hashable: they key the jit cache)."""

    levels: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # noise levels t in (0, 1]
    samples: int = 8  # noisy canvases per level (one decoder batch)
    self_condition: bool = False  # feed a first pass's logits / T_t back (module docstring)
    t_min: float = 0.4  # T_t = t_min + (t_max - t_min) t for the self-conditioning logits
    t_max: float = 0.8

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(float(t) for t in self.levels))
        if not self.levels or not all(0 < t <= 1 for t in self.levels):
            raise ValueError(f"levels={self.levels!r}: expected noise levels in (0, 1]")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) \
                or self.samples <= 0:
            raise ValueError(f"samples={self.samples!r}: expected a positive integer")
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"t_min={self.t_min!r}, t_max={self.t_max!r}: expected "
                             "0 < t_min <= t_max")


def _broadcast(cache: KVCache, rows: int) -> KVCache:
    """The one-row cache repeated for `rows` rows."""
    def rep(a, axis):
        return jnp.repeat(a, rows, axis=axis)
    return KVCache(sliding_k=rep(cache.sliding_k, 1), sliding_v=rep(cache.sliding_v, 1),
                   full_k=rep(cache.full_k, 1), full_v=rep(cache.full_v, 1),
                   valid=rep(cache.valid, 0), length=cache.length)


def _score_loop(state, prompt, prompt_valid, answer, n_true, key, *, graphdef,
                s: GemmaScoreSettings):
    """Sum over answer tokens of the level- and sample-averaged CE (divided by n outside)."""
    model = nnx.merge(graphdef, state)
    vocab, length = model.config.vocab_size, model.config.canvas_length
    p = prompt.shape[0]
    n_canvas = answer.shape[0] // length
    cache = init_cache(model.config, 1, p + (n_canvas - 1) * length)
    cache = model.encode(prompt[None], jnp.arange(p, dtype=jnp.int32)[None], cache,
                         prompt_valid[None])
    levels = jnp.asarray(s.levels, jnp.float32)
    emb_dtype = model.embed[...].dtype
    chunks = answer.reshape(n_canvas, length)
    scored = (jnp.arange(n_canvas * length) < n_true).reshape(n_canvas, length)

    def canvas(cache, xs):
        k, chunk, ok = xs
        positions = jnp.broadcast_to(p + k * length + jnp.arange(length, dtype=jnp.int32),
                                     (s.samples, length))
        rows = _broadcast(cache, s.samples)
        target = jnp.broadcast_to(chunk, (s.samples, length))

        def level(j, total):
            t = levels[j]
            k_mask, k_ids = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, k), j))
            noised = (jax.random.uniform(k_mask, (s.samples, length)) < t) & ok[None]
            ids = jax.random.randint(k_ids, (s.samples, length), 0, vocab, jnp.int32)
            x = jnp.where(noised, ids, target)
            sc = None
            if s.self_condition:
                temperature = jnp.float32(s.t_min) + jnp.float32(s.t_max - s.t_min) * t
                sc = (model.decode(x, None, rows, positions) / temperature).astype(emb_dtype)
            logits = model.decode(x, sc, rows, positions)
            logp = jax.nn.log_softmax(logits, axis=-1)
            ce = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            return total + jnp.sum(jnp.where(ok[None], ce, 0.0)) / s.samples

        total = jax.lax.fori_loop(0, len(s.levels), level, jnp.float32(0.0))
        cache = model.encode(chunk[None], positions[:1], cache)
        return cache, total / len(s.levels)

    _, totals = jax.lax.scan(canvas, cache, (jnp.arange(n_canvas, dtype=jnp.int32), chunks,
                                             scored))
    return jnp.sum(totals) / n_true.astype(jnp.float32)


_score_jit = jax.jit(_score_loop, static_argnames=("graphdef", "s"))


def _ids_1d(name, ids) -> jax.Array:
    a = jnp.asarray(ids)
    if a.ndim != 1 or a.shape[0] == 0 or not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{name}: expected a non-empty 1-D array of token ids, got shape "
                         f"{a.shape} dtype {a.dtype}")
    return a.astype(jnp.int32)


def answer_score(model: DiffusionGemma, prompt_ids: Int[Array, " P"],
                 answer_ids: Int[Array, " N"], *, key,
                 levels: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), samples: int = 8,
                 self_condition: bool = False, t_min: float = 0.4,
                 t_max: float = 0.8) -> Float[Array, ""]:
    """The Monte Carlo denoising cross-entropy of `answer_ids` after `prompt_ids` (nats per
    answer token, a scalar; lower = more likely), formula in the module docstring. `key` is
    required; `levels` and `samples` set the Monte Carlo design, `self_condition` the
    second pass with self-conditioning logits at temperature t_min + (t_max - t_min) t."""
    s = GemmaScoreSettings(levels=tuple(levels), samples=samples,
                           self_condition=self_condition, t_min=t_min, t_max=t_max)
    if key is None:
        raise ValueError("key=None: the Monte Carlo score needs key=jax.random.key(seed)")
    prompt = _ids_1d("prompt_ids", prompt_ids)
    answer = _ids_1d("answer_ids", answer_ids)
    c = model.config
    pad = 0 if c.pad_token_id is None else c.pad_token_id
    for name, a in (("prompt_ids", prompt), ("answer_ids", answer)):
        if not isinstance(a, jax.core.Tracer) and (int(a.min()) < 0
                                                   or int(a.max()) >= c.vocab_size):
            raise ValueError(f"{name}: ids outside the vocabulary [0, {c.vocab_size})")
    p, n = prompt.shape[0], answer.shape[0]
    width = bucket(p)
    prompt_valid = jnp.arange(width) >= width - p
    prompt = jnp.pad(prompt, (width - p, 0), constant_values=pad)
    length = c.canvas_length
    answer = jnp.pad(answer, (0, math.ceil(n / length) * length - n), constant_values=pad)
    graphdef, state = nnx.split(model)
    return _score_jit(state, prompt, prompt_valid, answer, jnp.int32(n), key,
                      graphdef=graphdef, s=s)


def _left_to_right(state, prompt, prompt_valid, canvas, key, *, graphdef, samples: int):
    model = nnx.merge(graphdef, state)
    vocab, length = model.config.vocab_size, canvas.shape[0]
    p = prompt.shape[0]
    cache = init_cache(model.config, 1, p)
    cache = model.encode(prompt[None], jnp.arange(p, dtype=jnp.int32)[None], cache,
                         prompt_valid[None])
    rows = length * samples  # row (i, s): canvas positions < i clean, >= i noise draw s
    noise = jax.random.randint(key, (length, samples, length), 0, vocab, jnp.int32)
    step = jnp.arange(length, dtype=jnp.int32)[:, None, None]
    x = jnp.where(jnp.arange(length)[None, None, :] < step, canvas[None, None, :], noise)
    positions = jnp.broadcast_to(p + jnp.arange(length, dtype=jnp.int32), (rows, length))
    logits = model.decode(x.reshape(rows, length), None, _broadcast(cache, rows), positions)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = logp.reshape(length, samples, length, vocab)
    i = jnp.arange(length)
    own = logp[i, :, i, :]  # [length, samples, vocab]: row i's prediction at position i
    ce = -jnp.take_along_axis(own, canvas[:, None, None], axis=-1)[..., 0]
    return jnp.mean(ce)


_left_to_right_jit = jax.jit(_left_to_right, static_argnames=("graphdef", "samples"))


def left_to_right_nll(model: DiffusionGemma, prompt_ids: Int[Array, " P"],
                      canvas_ids: Int[Array, " L"], *, key,
                      samples: int = 4) -> Float[Array, ""]:
    """The left-to-right negative log-likelihood of one canvas after a prompt, in nats per
    canvas token (a scalar):

        NLL = 1/L sum_i 1/S sum_s -log p(c_i | prompt, c_<i, u^(s)_>=i)

    position i predicted with the canvas positions before it clean and the rest uniform noise
    u (S draws, `jax.random.randint(key, [L, S, L], 0, V)`, row i's draw s at [i, s]; no
    self-conditioning). The conditionals are normalized, so exp(-L NLL) is (by Jensen, at
    most) the probability of the canvas under left-to-right decoding one token per step: a
    proper sequence likelihood, comparable with a unigram model's. All L * S rows run as one
    decoder batch; the prompt is left-padded to `common.bucket(P)`."""
    if key is None:
        raise ValueError("key=None: the Monte Carlo score needs key=jax.random.key(seed)")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise ValueError(f"samples={samples!r}: expected a positive integer")
    prompt = _ids_1d("prompt_ids", prompt_ids)
    canvas = _ids_1d("canvas_ids", canvas_ids)
    c = model.config
    if canvas.shape[0] > c.canvas_length:
        raise ValueError(f"canvas_ids: {canvas.shape[0]} tokens, more than the model's "
                         f"canvas_length {c.canvas_length}")
    pad = 0 if c.pad_token_id is None else c.pad_token_id
    p = prompt.shape[0]
    width = bucket(p)
    prompt_valid = jnp.arange(width) >= width - p
    prompt = jnp.pad(prompt, (width - p, 0), constant_values=pad)
    graphdef, state = nnx.split(model)
    return _left_to_right_jit(state, prompt, prompt_valid, canvas, key, graphdef=graphdef,
                              samples=samples)
