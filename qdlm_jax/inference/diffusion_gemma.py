"""DiffusionGemma's entropy-bound block-diffusion sampler as one jitted function.

transformers' `DiffusionGemmaForBlockDiffusion.generate` (`generation_diffusion_gemma.py`),
text only. Uniform-state diffusion: noise is a uniform vocabulary id, there is no mask token.
With P prompt tokens, L = `canvas_length`, N = `steps` and C = ceil(max_new_tokens / L):

    encode the prompt (causal, positions 0..P-1 whatever the left padding; padding masked)
    for canvas c = 0..C-1 (a `lax.while_loop`, left once every row is finished):
        x = U(V)^{B x L}, sc = none, done = 0, history = -1          (draw 0)
        for n = N..1 (a `lax.while_loop`, left once every row is done):
            forward_passes += not (done or finished)
            logits = Dec(x, sc, cache, positions P + cL .. P + cL + L - 1)
            T = t_min + (t_max - t_min) n / N;  z = logits / T
            y ~ Categorical(softmax(z)) (greedy: y = argmax softmax(z));  a = argmax z
            h_i = -sum_v p_iv log p_iv, p = softmax(z)                 (fp32)
            accepted: sort h ascending (stable), accept rank r when
                      sum_{r' <= r} h_(r') - h_(r) <= entropy_bound    (rank 0 always)
            x' = where(accepted, y, U(V))                              (draw N - n + 1)
            done rows: a, x' and z keep their previous values (z := sc)
            done |= all(history == a) and mean_i h_i(z) < confidence_threshold
            history <- (history[1:], a);  sc = z cast to the embedding dtype
        canvas = a (pad on rows finished before; pad after the first EOS of a row)
        finished |= any EOS in the canvas
        encode the canvas (pad tokens included, as transformers does) unless it was the last

`history` holds the last `stability_threshold` argmax canvases (initialised to -1, so with
a threshold >= 1 the first step never stops; threshold 0: always stable). `stability_threshold
= None` or `confidence_threshold = None` turns the early stop off; `t_min = t_max = None`
keeps T = 1. A row finished by an EOS keeps denoising (its tokens become pad) until every row
of the batch is done, as in transformers, but its passes are not counted.

Outputs (`GemmaSampleOutput`): `tokens` [B, P + C L] = the prompt as given, then the C
canvases; canvases after the one where every row finished are pad (transformers returns the
sequence cut after that canvas). `forward_passes` [B] counts decoder passes per row as
transformers does, `tokens_per_forward` [B] = (generated tokens that are not pad) /
forward_passes (transformers' `tokens_per_forward`), `steps` [C] = decoder calls of the batch
per canvas (0 for canvases not run).

Random numbers: without injected `noise`, canvas c uses `kc = fold_in(key, c)`; its initial
canvas is `randint(fold_in(kc, 0), [B, L], 0, V)`, and step j (0-based, n = N - j) splits
`fold_in(kc, j + 1)` into (renoise key, sample key): `randint(renoise key, [B, L], 0, V)` and
`categorical(sample key, z)`. With `noise` [C, N + 1, B, L], noise[c, 0] is the initial canvas
and noise[c, j + 1] the renoise ids of step j (transformers' `initialize_canvas` calls in
order); the categorical draws still come from the key unless `greedy`.

The EOS ids enter the jitted loop as an array (changing them does not recompile); the other
settings are static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from qdlm_jax.models.diffusion_gemma import DiffusionGemma, init_cache
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig

__all__ = ["GemmaSampleSettings", "GemmaSampleOutput", "gemma_sample", "gemma_sample_call",
           "entropy_bound_accept", "token_entropy", "step_temperature"]

# transformers' defaults for unset generation-config fields (generation_diffusion_gemma.py)
HF_DEFAULTS = dict(max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4,
                   t_max=0.8, stability_threshold=1, confidence_threshold=0.005)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaSampleSettings:
    """Static settings of the entropy-bound sampler (hashable: they key the jit cache)."""

    max_new_tokens: int = 256  # C = ceil(max_new_tokens / canvas_length) canvases
    steps: int = 48  # N, transformers' max_denoising_steps
    entropy_bound: float = 0.1  # accept low-entropy positions while their sum stays under it
    t_min: float | None = 0.4  # temperature at the last step (None with t_max: T = 1)
    t_max: float | None = 0.8  # temperature at the first step
    stability_threshold: int | None = 1  # argmax canvas unchanged for this many steps ...
    confidence_threshold: float | None = 0.005  # ... and mean entropy below this: row done
    canvas_length: int = 256  # L, the model config's canvas_length
    eos_ids: tuple[int, ...] = (1,)  # any of them finishes a row; empty: none does
    pad_id: int = 0  # written after EOS and on finished rows
    seed: int = 0  # the default key: jax.random.key(seed)
    greedy: bool = False  # draw y = argmax softmax(z) instead of sampling it

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(t) for t in self.eos_ids))
        for name in ("max_new_tokens", "steps", "canvas_length"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if not (isinstance(self.entropy_bound, (int, float)) and self.entropy_bound > 0):
            raise ValueError(f"entropy_bound={self.entropy_bound!r}: expected a number > 0")
        if (self.t_min is None) != (self.t_max is None):
            raise ValueError(f"t_min={self.t_min!r}, t_max={self.t_max!r}: set both (the "
                             "linear temperature schedule) or neither (T = 1)")
        if self.t_min is not None and not 0 <= self.t_min < self.t_max:
            raise ValueError(f"t_min={self.t_min!r}, t_max={self.t_max!r}: expected "
                             "0 <= t_min < t_max")
        st = self.stability_threshold
        if st is not None and (not isinstance(st, (int, np.integer)) or isinstance(st, bool)
                               or st < 0):
            raise ValueError(f"stability_threshold={st!r}: expected None or an integer >= 0")
        ct = self.confidence_threshold
        if ct is not None and not (isinstance(ct, (int, float)) and ct > 0):
            raise ValueError(f"confidence_threshold={ct!r}: expected None or a number > 0")
        if not isinstance(self.pad_id, (int, np.integer)) or self.pad_id < 0:
            raise ValueError(f"pad_id={self.pad_id!r}: expected a token id")

    @property
    def num_canvases(self) -> int:
        return math.ceil(self.max_new_tokens / self.canvas_length)

    @property
    def early_stop(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @classmethod
    def from_generation_config(cls, d: Mapping[str, Any], *,
                               config: DiffusionGemmaConfig | None = None,
                               **overrides) -> "GemmaSampleSettings":
        """Settings from a checkpoint's `generation_config.json` dict: `max_new_tokens`,
        `max_denoising_steps`, `sampler_config.entropy_bound`, `t_min`, `t_max`,
        `stability_threshold`, `confidence_threshold`, `eos_token_id` (int or list),
        `pad_token_id`; unset fields take transformers' defaults (256, 48, 0.1, 0.4, 0.8, 1,
        0.005). `canvas_length` and missing eos / pad ids come from the model `config`;
        `overrides` replace any field last. A `max_length` without `max_new_tokens` depends on
        the prompt length and is refused."""
        def get(key):
            v = d.get(key)
            return HF_DEFAULTS[key] if v is None else v

        if d.get("max_length") is not None and d.get("max_new_tokens") in (None, 256):
            raise ValueError("generation config: max_length is set without max_new_tokens "
                             "(the new-token count then depends on the prompt); pass "
                             "max_new_tokens instead")
        sampler = d.get("sampler_config") or {}
        if not isinstance(sampler, Mapping):
            sampler = {"entropy_bound": getattr(sampler, "entropy_bound")}
        bound = sampler.get("entropy_bound", HF_DEFAULTS["entropy_bound"])
        eos = d.get("eos_token_id")
        if eos is None:
            eos = config.eos_token_ids if config is not None else ()
        eos = (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
        pad = d.get("pad_token_id")
        if pad is None and config is not None:
            pad = config.pad_token_id
        fields = dict(max_new_tokens=int(get("max_new_tokens")),
                      steps=int(get("max_denoising_steps")), entropy_bound=float(bound),
                      t_min=get("t_min"), t_max=get("t_max"),
                      stability_threshold=get("stability_threshold"),
                      confidence_threshold=get("confidence_threshold"),
                      eos_ids=eos, pad_id=0 if pad is None else int(pad))
        if config is not None:
            fields["canvas_length"] = config.canvas_length
        fields.update(overrides)
        return cls(**fields)


class GemmaSampleOutput(NamedTuple):
    """What `gemma_sample` returns (module docstring)."""

    tokens: Int[Array, "B T"]  # [prompt | C canvases]
    forward_passes: Int[Array, " B"]  # decoder passes counted for the row
    tokens_per_forward: Float[Array, " B"]  # non-pad generated tokens / forward_passes
    steps: Int[Array, " C"]  # decoder calls of the batch per canvas


# ---- the step's pieces ------------------------------------------------------------------------

def step_temperature(n, s: GemmaSampleSettings) -> Float[Array, ""]:
    """T = t_min + (t_max - t_min) n / N in fp32, rounded as transformers rounds it (the
    fraction n / N in fp32, each Python constant rounded to fp32 once); 1 without a
    schedule."""
    if s.t_min is None:
        return jnp.float32(1.0)
    frac = jnp.asarray(n, jnp.float32) / jnp.float32(s.steps)
    return jnp.float32(s.t_min) + jnp.float32(s.t_max - s.t_min) * frac


def token_entropy(z: Float[Array, "... V"]) -> Float[Array, "..."]:
    """H = -sum_v p_v log p_v with p = softmax(z), in fp32 (log p clamped at the fp32 minimum,
    as `torch.distributions.Categorical` does)."""
    z = z.astype(jnp.float32)
    logp = jnp.maximum(jax.nn.log_softmax(z, axis=-1), jnp.finfo(jnp.float32).min)
    return -jnp.sum(logp * jax.nn.softmax(z, axis=-1), axis=-1)


def entropy_bound_accept(h: Float[Array, "B L"], bound: float) -> Bool[Array, "B L"]:
    """Positions accepted by the entropy bound: with h sorted ascending (stable: equal
    entropies keep index order) and S_r = h_(0) + ... + h_(r), rank r is accepted when
    S_r - h_(r) <= bound (the sum of the strictly lower ranks, computed as transformers does,
    cumsum minus the entry). Rank 0 always is."""
    order = jnp.argsort(h, axis=-1, stable=True)
    hs = jnp.take_along_axis(h, order, axis=-1)
    sel = (jnp.cumsum(hs, axis=-1) - hs) <= bound
    rank = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(sel, rank, axis=-1)


class _Denoise(NamedTuple):
    x: jax.Array  # [B, L] the current (noisy) canvas
    a: jax.Array  # [B, L] the last argmax canvas
    sc: jax.Array  # [B, L, V] self-conditioning logits (embedding dtype)
    history: jax.Array  # [k, B, L] the last k argmax canvases
    done: jax.Array  # [B]
    passes: jax.Array  # [B]
    taken: jax.Array  # steps run in this canvas


def _draws(s: GemmaSampleSettings, kc, noise_c, j, shape, vocab: int):
    """(renoise ids, sample key) of step j (0-based) of a canvas."""
    k_renoise, k_sample = jax.random.split(jax.random.fold_in(kc, j + 1))
    if noise_c is None:
        ids = jax.random.randint(k_renoise, shape, 0, vocab, jnp.int32)
    else:
        ids = jax.lax.dynamic_index_in_dim(noise_c, j + 1, axis=0, keepdims=False)
    return ids, k_sample


def _step(model: DiffusionGemma, s: GemmaSampleSettings, cache, positions, kc, noise_c,
          finished, st: _Denoise, sc) -> _Denoise:
    """One denoising step (module docstring); `sc` is None on a canvas's first step."""
    vocab = model.config.vocab_size
    n = s.steps - st.taken
    passes = st.passes + (~(st.done | finished)).astype(jnp.int32)
    logits = model.decode(st.x, sc, cache, positions)
    z = logits / step_temperature(n, s)
    a = jnp.argmax(z, axis=-1).astype(jnp.int32)
    renoise, k_sample = _draws(s, kc, noise_c, st.taken, st.x.shape, vocab)
    if s.greedy:  # transformers' multinomial replaced by argmax of the fp32 probabilities
        y = jnp.argmax(jax.nn.softmax(z, axis=-1), axis=-1).astype(jnp.int32)
    else:
        y = jax.random.categorical(k_sample, z, axis=-1).astype(jnp.int32)
    h = token_entropy(z)
    x = jnp.where(entropy_bound_accept(h, s.entropy_bound), y, renoise)
    if sc is not None:  # rows done earlier keep their canvases and logits
        frozen = st.done[:, None]
        a = jnp.where(frozen, st.a, a)
        x = jnp.where(frozen, st.x, x)
        z = jnp.where(frozen[..., None], sc.astype(z.dtype), z)
    history, done = st.history, st.done
    if s.early_stop:
        # (a done row stays done, so its frozen logits' entropy need not be recomputed)
        stable = jnp.all(history == a[None], axis=(0, 2))
        done = done | (stable & (jnp.mean(h, axis=-1) < s.confidence_threshold))
        if history.shape[0]:
            history = jnp.concatenate([history[1:], a[None]], axis=0)
    return _Denoise(x=x, a=a, sc=z.astype(model.embed[...].dtype), history=history, done=done,
                    passes=passes, taken=st.taken + 1)


def _denoise_canvas(model, s: GemmaSampleSettings, cache, positions, kc, noise_c, finished,
                    passes):
    """(argmax canvas [B, L], passes [B], steps run) of one canvas."""
    b, length = positions.shape
    vocab = model.config.vocab_size
    if noise_c is None:
        x0 = jax.random.randint(jax.random.fold_in(kc, 0), (b, length), 0, vocab, jnp.int32)
    else:
        x0 = noise_c[0]
    k = s.stability_threshold if s.early_stop else 0
    sc0 = jnp.zeros((b, length, vocab), model.embed[...].dtype)
    st = _Denoise(x=x0, a=x0, sc=sc0, history=jnp.full((k, b, length), -1, jnp.int32),
                  done=jnp.zeros((b,), bool), passes=passes, taken=jnp.int32(0))
    st = _step(model, s, cache, positions, kc, noise_c, finished, st, None)

    def cond(st):
        return (st.taken < s.steps) & ~jnp.all(st.done)

    def body(st):
        return _step(model, s, cache, positions, kc, noise_c, finished, st, st.sc)

    st = jax.lax.while_loop(cond, body, st)
    return st.a, st.passes, st.taken


def _finalize(s: GemmaSampleSettings, eos, canvas, finished):
    """(canvas, finished): rows finished before become pad; a row with an EOS (any id of
    `eos` [E]) is finished and every token after its first EOS becomes pad."""
    canvas = jnp.where(finished[:, None], s.pad_id, canvas)
    is_eos = jnp.any(canvas[..., None] == eos, axis=-1)
    seen = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1)
    after = (seen > 0) & ~((seen == 1) & is_eos)
    return jnp.where(after, s.pad_id, canvas), finished | jnp.any(is_eos, axis=-1)


def _sample_loop(state, prompt, valid, key, noise, eos, *, graphdef, s: GemmaSampleSettings):
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    length, n_canvas = s.canvas_length, s.num_canvases
    cache = init_cache(model.config, b, p + (n_canvas - 1) * length)
    cache = model.encode(prompt, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
                         cache, valid)
    gen = jnp.full((b, n_canvas * length), s.pad_id, jnp.int32)

    def cond(carry):
        c, _, _, finished, _, _ = carry
        return (c < n_canvas) & ~jnp.all(finished)

    def body(carry):
        c, cache, gen, finished, passes, steps = carry
        start = p + c * length
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))
        noise_c = None if noise is None else jax.lax.dynamic_index_in_dim(noise, c, 0, False)
        canvas, passes, taken = _denoise_canvas(model, s, cache, positions,
                                                jax.random.fold_in(key, c), noise_c, finished,
                                                passes)
        canvas, finished = _finalize(s, eos, canvas, finished)
        gen = jax.lax.dynamic_update_slice(gen, canvas, (0, c * length))
        if n_canvas > 1:  # (one canvas: the cache holds the prompt alone, nothing to add)
            cache = jax.lax.cond((c + 1 < n_canvas) & ~jnp.all(finished),
                                 lambda cache: model.encode(canvas, positions, cache),
                                 lambda cache: cache, cache)
        return c + 1, cache, gen, finished, passes, steps.at[c].set(taken)

    carry = (jnp.int32(0), cache, gen, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
             jnp.zeros((n_canvas,), jnp.int32))
    _, _, gen, _, passes, steps = jax.lax.while_loop(cond, body, carry)
    tokens_per_forward = (jnp.sum(gen != s.pad_id, axis=-1).astype(jnp.float32)
                          / passes.astype(jnp.float32))
    return GemmaSampleOutput(tokens=jnp.concatenate([prompt, gen], axis=1),
                             forward_passes=passes, tokens_per_forward=tokens_per_forward,
                             steps=steps)


_sample_jit = jax.jit(_sample_loop, static_argnames=("graphdef", "s"))


def gemma_sample_call(model: DiffusionGemma, input_ids, attention_mask=None, *,
                      settings: GemmaSampleSettings, key=None, noise=None):
    """(jitted function, args, static kwargs) of `gemma_sample`, for ahead-of-time compiling
    (`fn.lower(*args, **static).compile()`)."""
    s = settings
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: expected integer ids [batch, prompt_len >= 1], got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    b = ids.shape[0]
    vocab = model.config.vocab_size
    valid = (jnp.ones(ids.shape, bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {valid.shape} != input_ids shape {ids.shape}")
    for name, t in [("pad_id", s.pad_id)] + [("eos_ids", t) for t in s.eos_ids]:
        if not 0 <= t < vocab:
            raise ValueError(f"{name}: token {t} is outside the vocabulary [0, {vocab})")
    if noise is not None:
        noise = jnp.asarray(noise, jnp.int32)
        want = (s.num_canvases, s.steps + 1, b, s.canvas_length)
        if noise.shape != want:
            raise ValueError(f"noise: shape {noise.shape}, expected [canvases, steps + 1, "
                             f"batch, canvas_length] = {want}")
    if key is None:
        key = jax.random.key(s.seed)
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(s.eos_ids, jnp.int32).reshape(-1)
    static = dataclasses.replace(s, eos_ids=(), seed=0)  # the loop reads `eos`, not these
    return _sample_jit, (state, ids.astype(jnp.int32), valid, key, noise, eos), dict(
        graphdef=graphdef, s=static)


def gemma_sample(model: DiffusionGemma, input_ids: Int[Array, "B P"],
                 attention_mask: Int[Array, "B P"] | None = None, *,
                 settings: GemmaSampleSettings, key=None, noise=None) -> GemmaSampleOutput:
    """Samples C = ceil(max_new_tokens / L) canvases after each (left-padded) prompt with the
    entropy-bound sampler (module docstring). `attention_mask` 1 = token, 0 = padding; `key`
    defaults to `jax.random.key(settings.seed)`; `noise` [C, N + 1, B, L] int replaces the
    uniform-id draws (tests). Returns `GemmaSampleOutput` (tokens [B, P + C L])."""
    fn, args, static = gemma_sample_call(model, input_ids, attention_mask, settings=settings,
                                         key=key, noise=noise)
    return fn(*args, **static)
