"""Generation for every model family, each as one jitted loop: LLaDA's and Dream's
masked-diffusion samplers here, DiffusionGemma's entropy-bound block sampler in
`inference.diffusion_gemma` (`generate` dispatches on `model.config.family`).

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

LLaDA with Fast-dLLM decoding (`cache` != "none" or `threshold` set; NVlabs/Fast-dLLM's
`generate` / `generate_with_prefix_cache` / `generate_with_dual_cache`)
    * Blocks run in a `lax.fori_loop`; the steps of a block in a `lax.while_loop` that stops
      when no row has a masked position left in the block (rows already done commit nothing:
      per-row completion). Without a threshold, step i of a block commits the schedule's
      count (the same tokens as the plain loop would, with a cache = the same algorithm on
      approximate keys/values); so the number of forward passes is dynamic only under a
      threshold.
    * Threshold tau: each step commits the most confident masked position of the block plus
      every masked position with confidence >= tau (at least one token per step).
    * Factor f (`get_transfer_index_dynamic`, instead of a threshold): with the block's m
      masked confidences sorted c_0 >= c_1 >= ..., j* = the first j >= 1 with
      c_j < 1 - f / (j + 2); commit the j* most confident, all m if none fails or j* = m - 1.
    * The block's first step is a full forward that also returns every layer's keys (after
      RoPE) and values, `[layers, B, T, kv_heads, head_dim]`, into a buffer preallocated at
      full length (loop state, so updated in place at each block boundary).
      `prefix`: later steps compute the block and everything after it, taking the keys and
      values of every position before the block from the cache: Fast-dLLM's forward of
      x[:, block_start:] over the cached prefix. For static shapes the window is the last W
      positions, W the smallest of block_length * 2^k (capped at gen_length) that covers the
      block's suffix (one `lax.switch` branch per size); window positions before the block
      read the cache too and their outputs are discarded.
      `dual`: later steps compute the block only; every other position's keys/values (prompt,
      decoded prefix and the masked suffix) come from the cache of the block's first step.
    * Left padding: the key-padding mask applies to cached keys as to fresh ones; positions
      are 0..T-1 as in the plain loop. CFG runs only without a cache.
    * Forward passes: one per step (`generate_with_nfe` returns the count). Fast-dLLM's code
      runs one extra, empty pass when a block's first step already completes the block; it
      commits nothing and is not run here.

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

Dream with Fast-dLLM decoding (`cache` != "none", `threshold` or `factor`; NVlabs/Fast-dLLM
`dream/model/generation_utils_block.py`): blocks of `block_length`, spb = steps / blocks.
    * A block's first step: a full forward (refilling the KV cache); only the block's first
      position is committed, with x0 of the shifted logits (the output at block_start - 1).
    * Later steps (a `lax.while_loop` until no row has a mask in the block): the window's
      forward (prefix / dual as for LLaDA; none: a full forward), logits shifted inside the
      window (position j > start reads j - 1, start its own). Threshold / factor: confidence
      p(x0), the LLaDA rules; a deterministic step that changes nothing ends the block.
      Otherwise step i < spb commits int(m (1 - s/t)) (float32, ts = linspace(1, eps, spb + 1))
      ranked by the alg's confidence, all remaining at i = spb - 1: spb passes per block.
    * Positions cumsum(mask) - 1 with padding, as the plain Dream loop.

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
from typing import Callable

import jax

from qdlm_jax.inference.common import CACHE_MODES, check_cache_threshold, left_pad
from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings, gemma_sample_call
from qdlm_jax.inference.dream import (
    DREAM_ALGS,
    DreamSettings,
    dream_call,
    dream_generate,
    dream_settings,
    dream_transfer_schedule,
)
from qdlm_jax.inference.llada import (
    REMASKING,
    LLaDASettings,
    llada_call,
    llada_generate,
    llada_settings,
    llada_transfer_schedule,
)
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY

__all__ = [
    "REMASKING", "DREAM_ALGS", "GenerationConfig", "LLaDASettings", "DreamSettings",
    "llada_generate", "dream_generate", "generate", "compile_generate", "generate_with_order",
    "llada_transfer_schedule", "dream_transfer_schedule", "left_pad", "LLADA_ONLY",
    "DREAM_ONLY", "settings_for", "CACHE_MODES", "generate_with_nfe", "tokens_per_step",
    "GemmaSampleSettings", "gemma_settings_for",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Settings of `generate` for either family (the CLI's `gen` config section).

    LLaDA reads steps, gen_length, block_length (None = gen_length), temperature, cfg_scale,
    remasking, cache ("none" | "prefix" | "dual"), threshold (None or tau in (0, 1]) and
    factor (None or f > 0; not with a threshold). Dream reads steps, gen_length (as
    max_new_tokens), temperature, alg, alg_temp, top_p, top_k, eps, and cache / threshold /
    factor, which select Fast-dLLM's Dream block decoding; block_length (None = gen_length)
    applies to Dream only then. A field that does not apply must keep its default (or be
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
    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None
    seed: int = 0

    def __post_init__(self):
        check_cache_threshold(self.cache, self.threshold, self.factor)

    @property
    def fast(self) -> bool:
        """Whether Fast-dLLM's decoding runs (a KV cache, a threshold or a factor)."""
        return self.cache != "none" or self.threshold is not None or self.factor is not None

    @classmethod
    def from_mapping(cls, d) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"generation config: unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**dict(d))


LLADA_ONLY = ("block_length", "cfg_scale", "remasking")
DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")


def _check_unused(config: GenerationConfig, names, family):
    default = GenerationConfig()
    for name in names:
        value = getattr(config, name)
        if value is not None and value != getattr(default, name):
            raise ValueError(f"{name}={getattr(config, name)!r} does not apply to a "
                             f"{family} model")


def settings_for(model, config: GenerationConfig | GemmaSampleSettings, *,
                 progress: bool = False, record_order: bool = False, return_nfe: bool = False):
    """The static LLaDASettings / DreamSettings / GemmaSampleSettings of `config` for this
    model's family (a DiffusionGemma model takes its sampler's settings as they are, or a
    GenerationConfig through `gemma_settings_for`)."""
    if model.config.family == GEMMA_FAMILY:
        if record_order or return_nfe:
            raise ValueError("a diffusion_gemma model reports its forward passes in "
                             "GemmaSampleOutput (inference.diffusion_gemma.gemma_sample); "
                             "record_order / return_nfe are LLaDA and Dream options")
        if isinstance(config, GemmaSampleSettings):
            return config
        return gemma_settings_for(model, config)
    if isinstance(config, GemmaSampleSettings):
        raise ValueError(f"GemmaSampleSettings: the sampler of diffusion_gemma models, not of "
                         f"a {model.config.family} model")
    settings = _settings_for(model, config, progress=progress)
    if record_order:
        settings = dataclasses.replace(settings, record_order=True)
    if return_nfe:
        settings = dataclasses.replace(settings, return_nfe=True)
    return settings


def _settings_for(model, config: GenerationConfig, *, progress: bool = False):
    family = model.config.family
    if family == "llada":
        _check_unused(config, DREAM_ONLY, family)
        return llada_settings(model, gen_length=config.gen_length, steps=config.steps,
                              block_length=config.block_length or config.gen_length,
                              temperature=config.temperature, cfg_scale=config.cfg_scale,
                              remasking=config.remasking, progress=progress,
                              cache=config.cache, threshold=config.threshold,
                              factor=config.factor)
    if family == "dream":
        # block_length applies to Dream's block decoding (cache / threshold / factor) only
        _check_unused(config, LLADA_ONLY if not config.fast else ("cfg_scale", "remasking"),
                      family)
        block_length = (config.block_length or config.gen_length) if config.fast else None
        return dream_settings(model, max_new_tokens=config.gen_length, steps=config.steps,
                              alg=config.alg, alg_temp=config.alg_temp,
                              temperature=config.temperature, top_p=config.top_p,
                              top_k=config.top_k, eps=config.eps, progress=progress,
                              cache=config.cache, threshold=config.threshold,
                              factor=config.factor, block_length=block_length)
    raise ValueError(f"model family {family!r}: expected 'llada' or 'dream'")


def gemma_settings_for(model, config: GenerationConfig,
                       base: GemmaSampleSettings | None = None) -> GemmaSampleSettings:
    """DiffusionGemma sampler settings for a family-neutral `config` (an eval task's): the
    sampler's own settings `base` (default: transformers' defaults with the model's canvas
    length and special ids) with `max_new_tokens = gen_length`, the seed, and `greedy` when
    `temperature == 0` (each step keeps the argmax of the tempered distribution instead of a
    draw from it). `steps`, the schedule and the early stop stay the sampler's: the LLaDA /
    Dream fields do not apply and must keep their defaults."""
    default = GenerationConfig()
    for name in LLADA_ONLY + DREAM_ONLY + ("cache", "threshold", "factor"):
        value = getattr(config, name)
        if value is not None and value != getattr(default, name):
            raise ValueError(f"{name}={value!r} does not apply to a diffusion_gemma model "
                             "(its sampler reads gen_length, temperature and seed)")
    if base is None:
        base = GemmaSampleSettings.from_generation_config({}, config=model.config)
    return dataclasses.replace(base, max_new_tokens=config.gen_length, seed=config.seed,
                               greedy=config.temperature == 0)


def _call_for(model, input_ids, attention_mask, key, settings):
    if isinstance(settings, GemmaSampleSettings):
        return gemma_sample_call(model, input_ids, attention_mask, settings=settings, key=key)
    if isinstance(settings, LLaDASettings):
        return llada_call(model, input_ids, attention_mask, key, settings)
    return dream_call(model, input_ids, attention_mask, key, settings)


def _resolve(model, config, kwargs, key):
    if model.config.family == GEMMA_FAMILY and not isinstance(config, GenerationConfig):
        config = config or GemmaSampleSettings.from_generation_config({}, config=model.config)
        config = dataclasses.replace(config, **kwargs) if kwargs else config
        return config, jax.random.key(config.seed) if key is None else key
    config = config or GenerationConfig()
    if kwargs:
        config = dataclasses.replace(config, **kwargs)
    if key is None:
        key = jax.random.key(config.seed)
    return config, key


def generate(model, input_ids, attention_mask=None, *,
             config: GenerationConfig | GemmaSampleSettings | None = None, key=None,
             progress: bool = False, **kwargs) -> jax.Array:
    """Generates with the model's family sampler: `llada_generate`, `dream_generate` or
    DiffusionGemma's `gemma_sample`.

    `config` (a GenerationConfig, or for DiffusionGemma also its GemmaSampleSettings) and/or
    keyword overrides of its fields set the algorithm; `key` defaults to
    `jax.random.key(config.seed)`. Dream reads `gen_length` as `max_new_tokens`. Returns
    `[batch, prompt_len + gen_length]` (DiffusionGemma: prompt_len + whole canvases, pad
    after an EOS).
    """
    config, key = _resolve(model, config, kwargs, key)
    settings = settings_for(model, config, progress=progress)
    fn, args, static = _call_for(model, input_ids, attention_mask, key, settings)
    out = fn(*args, **static)
    return out.tokens if isinstance(settings, GemmaSampleSettings) else out


def compile_generate(model, input_ids, attention_mask=None, *,
                     config: GenerationConfig | GemmaSampleSettings | None = None, key=None,
                     progress: bool = False, **kwargs) -> Callable[[], jax.Array]:
    """Ahead-of-time compiles `generate` for these inputs; returns a zero-argument function
    that runs the compiled loop (to time compilation and running separately). It returns
    what the family's sampler returns: the tokens, or for DiffusionGemma the whole
    `GemmaSampleOutput` (tokens, forward passes, tokens per forward)."""
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



def generate_with_nfe(model, input_ids, attention_mask=None, *,
                      config: GenerationConfig | None = None, key=None, **kwargs):
    """`generate` that also returns the number of forward passes the loop ran (an int32
    scalar; `steps` without a cache, threshold or factor): (tokens, nfe). Either family.
    Tokens committed per forward pass = generated positions / nfe (`tokens_per_step`)."""
    config, key = _resolve(model, config, kwargs, key)
    settings = settings_for(model, config, return_nfe=True)
    fn, args, static = _call_for(model, input_ids, attention_mask, key, settings)
    return fn(*args, **static)


def tokens_per_step(gen_length: int, nfe) -> float:
    """Tokens committed per forward pass of one row: its gen_length positions over the passes
    its batch ran (`generate_with_nfe`; the rows of a batch share the passes, so a row that
    finished a block early counts the passes it waited)."""
    nfe = int(nfe)
    if nfe <= 0:
        raise ValueError(f"nfe={nfe}: expected a positive number of forward passes")
    return float(gen_length) / nfe
