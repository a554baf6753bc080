"""Monte Carlo log-likelihood bounds of masked-diffusion LMs (LLaDA and Dream variants), and
`log_likelihood`, the estimate the evals use for every family (DiffusionGemma, which has no
mask token, through `gemma_likelihood.answer_score`).

Both estimate the ELBO of `answer` given `prompt`: mask some answer tokens, score the masked
ones, and reweight. Each returns a lower bound on log p(answer | prompt) (an unbiased
estimate of it); the expected value is what the published evaluation code computes.

LLaDA (`get_log_likelihood.py` / `eval_llada.py get_loglikelihood`)
    seq = [prompt | answer] repeated `batch_size` times; `mc_num // batch_size` iterations.
    Per iteration: k ~ U{1..L} (L = answer length); row i masks exactly
    n_i = round(linspace(k, k + (b-1) L / b, b))_i, wrapped into [1, L] (stratified mask
    counts), at answer positions drawn uniformly without replacement; the prompt is never
    masked. loss = sum over masked positions of CE / (n_i / L) (the 1/t weight), / b.
    Result: -(mean loss over iterations). For b <= L (or when i L / b is never a half
    integer) each n_i is uniform on {1..L}, so the expectation is
    E_{k~U{1..L}} E_{|S|=k} [L/k sum_{i in S} log p(x_i | x with S masked)].
    (torch.round rounds half to even, which makes n_i slightly non-uniform when i L / b is
    a half integer; we round the same way.)

Dream (`eval/eval.py` `_eval_target_nll_mc`, nll_type="mc", log_type="ftb")
    Per iteration: u0 ~ U[0,1), t_i = (u0 + i / b) mod 1, p_i = (1 - eps) t_i + eps; each
    answer token is masked independently with probability p_i (only answer tokens are
    noised), except the first and last positions of the sequence when `keep_first_last`
    (Dream's eval appends EOS to the answer and prepends BOS, and never masks those).
    Logits are right-shifted (position j is scored from the output at j - 1).
    loss = sum over masked positions of CE / p_i, / b. Result: -(mean loss).

CFG (both): the unconditional branch masks the prompt and
`logits = un + (cfg_scale + 1) (cond - un)` (LLaDA's form; Dream's `classifier_free_guidance`
w corresponds to cfg_scale = w - 1).

API: per example. `prompt_ids` [P] and `answer_ids` [L] are 1-D (no padding). Inside, the
prompt is left-padded and the answer right-padded to bucketed lengths (`bucket`: at most
four sizes per octave) with the padding excluded from attention and from the noise, so
items of nearby lengths share one compiled program; RoPE depends on relative positions
only, so the padded sequence scores the same as the unpadded one (to float rounding). The
true lengths are traced values. One jit per (bucketed P, bucketed L, settings). The Monte Carlo loop
is one `lax.fori_loop` inside the jit; at iteration
j the randomness comes from `jax.random.fold_in(key, j)`; `mc_num` is a traced loop bound, so
changing it does not recompile. The LM head runs only on the answer
positions. `perplexity_bound` scores fixed windows with every position maskable.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.inference.common import bucket
from qdlm_jax.inference.gemma_likelihood import GemmaScoreSettings, answer_score
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY

__all__ = ["LikelihoodSettings", "log_likelihood", "llada_log_likelihood",
           "dream_log_likelihood", "perplexity_bound"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LikelihoodSettings:
    """Static settings of the Monte Carlo estimator (hashable: they key the jit cache)."""

    family: str  # "llada" or "dream": which estimator
    mask_id: int
    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    eps: float = 1e-3  # Dream: p_mask = (1 - eps) t + eps
    keep_first_last: bool = True  # Dream: never mask the sequence's first / last position
    shift_logits: bool = False  # score position j from output j - 1 (Dream)

    def __post_init__(self):
        if self.family not in ("llada", "dream"):
            raise ValueError(f"family={self.family!r}: expected 'llada' or 'dream'")
        for name in ("mc_num", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if self.mc_num % self.batch_size:
            raise ValueError(f"mc_num={self.mc_num} is not divisible by "
                             f"batch_size={self.batch_size}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: expected >= 0")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps={self.eps!r}: expected 0 <= eps < 1")

    @property
    def iterations(self) -> int:
        return self.mc_num // self.batch_size


def _answer_logits(model, seq, p, n, s: LikelihoodSettings, valid=None):
    """fp32 logits scoring answer positions p..p+n-1 of `seq` [b, T] (with CFG); `valid`
    [T] marks the positions that are attended to (None: all)."""
    b = seq.shape[0]
    if s.cfg_scale > 0:
        un = seq.at[:, :p].set(s.mask_id)
        seq = jnp.concatenate([seq, un], axis=0)
    mask = None if valid is None else jnp.broadcast_to(valid.astype(jnp.int32), seq.shape)
    h = model.hidden_states(seq, mask)
    if s.shift_logits:
        if p >= 1:
            h = h[:, p - 1: p - 1 + n]
        else:
            h = jnp.concatenate([h[:, :1], h[:, : n - 1]], axis=1)
    else:
        h = h[:, p: p + n]
    logits = model.logits(h).astype(jnp.float32)
    if s.cfg_scale > 0:
        cond, un = logits[:b], logits[b:]
        logits = un + (s.cfg_scale + 1.0) * (cond - un)
    return logits


def _llada_masks(key, n, b: int, width: int | None = None):
    """(is_mask [b, width], n_masked [b]) of LLaDA's stratified forward process over the
    first `n` of `width` positions (`n` may be traced; width defaults to n)."""
    width = n if width is None else width
    k_count, k_perm = jax.random.split(key)
    k = jax.random.randint(k_count, (), 1, n + 1).astype(jnp.float32)
    # torch.linspace(k, k + (b-1) n / b, b) in float32, then torch.round (half to even).
    end = k + (b - 1) * (jnp.asarray(n, jnp.float32) / b)
    if b > 1:
        step = (end - k) / jnp.float32(b - 1)
        counts = k + step * jnp.arange(b, dtype=jnp.float32)
    else:
        counts = k[None]
    counts = jnp.round(counts).astype(jnp.int32)
    counts = (counts - 1) % n + 1
    u = jax.random.uniform(k_perm, (b, width))
    u = jnp.where(jnp.arange(width) < n, u, 2.0)  # padding ranks last: never masked
    rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # a uniform random permutation
    return rank < counts[:, None], counts


def _dream_masks(key, p, n, b: int, s: LikelihoodSettings, width: int | None = None):
    """(is_mask [b, width], p_mask [b]) of Dream's forward process on the first `n` of
    `width` answer positions (`p` is the true prompt length; both may be traced)."""
    width = n if width is None else width
    k_t, k_bern = jax.random.split(key)
    u0 = jax.random.uniform(k_t, ())
    t = (u0 + jnp.arange(b, dtype=jnp.float32) / b) % 1.0
    p_mask = (1.0 - s.eps) * t + s.eps
    is_mask = jax.random.uniform(k_bern, (b, width)) < p_mask[:, None]
    is_mask = is_mask & (jnp.arange(width) < n)[None, :]
    if s.keep_first_last:
        pos = p + jnp.arange(width)
        is_mask = is_mask & (pos != 0)[None, :] & (pos != p + n - 1)[None, :]
    return is_mask, p_mask


def _mc_loop(state, prompt, answer, p_true, n_true, key, iterations, *, graphdef,
             s: LikelihoodSettings):
    """`prompt` [P] is left-padded (its last `p_true` entries are real), `answer` [N]
    right-padded (its first `n_true` are real)."""
    model = nnx.merge(graphdef, state)
    p, n = prompt.shape[0], answer.shape[0]
    b = s.batch_size
    valid = jnp.concatenate([jnp.arange(p) >= p - p_true, jnp.arange(n) < n_true])

    def body(j, total):
        kj = jax.random.fold_in(key, j)
        if s.family == "llada":
            is_mask, counts = _llada_masks(kj, n_true, b, n)
            weight = n_true.astype(jnp.float32) / counts.astype(jnp.float32)  # 1 / t
        else:
            is_mask, p_mask = _dream_masks(kj, p_true, n_true, b, s, n)
            weight = 1.0 / p_mask
        noisy = jnp.where(is_mask, s.mask_id, answer[None, :])
        seq = jnp.concatenate([jnp.broadcast_to(prompt, (b, p)), noisy], axis=1)
        logits = _answer_logits(model, seq, p, n, s, valid)
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, jnp.broadcast_to(answer, (b, n))[..., None],
                                  axis=-1)[..., 0]
        loss = jnp.sum(jnp.where(is_mask, ce, 0.0) * weight[:, None]) / b
        return total + loss

    total = jax.lax.fori_loop(0, iterations, body, jnp.float32(0.0))
    return -total / iterations


_mc_jit = jax.jit(_mc_loop, static_argnames=("graphdef", "s"))


def _ids_1d(name, ids):
    a = jnp.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of token ids, got shape {a.shape}")
    if a.size and not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {a.dtype}")
    return a.astype(jnp.int32)


def _run(model, prompt_ids, answer_ids, key, s: LikelihoodSettings):
    prompt = _ids_1d("prompt_ids", prompt_ids)
    answer = _ids_1d("answer_ids", answer_ids)
    if answer.shape[0] == 0:
        raise ValueError("answer_ids: empty answer; nothing to score")
    if key is None:
        raise ValueError("key=None: the Monte Carlo estimate needs key=jax.random.key(seed)")
    graphdef, state = nnx.split(model)
    # mc_num is a traced loop bound: changing it does not recompile.
    static = dataclasses.replace(s, mc_num=s.batch_size)
    p, n = prompt.shape[0], answer.shape[0]
    if s.shift_logits and p == 0:  # the unconditional Dream form reads position 0 itself
        pp, nn = 0, n
    else:
        pp, nn = bucket(p), bucket(n)
    prompt = jnp.pad(prompt, (pp - p, 0))
    answer = jnp.pad(answer, (0, nn - n))
    return _mc_jit(state, prompt, answer, jnp.int32(p), jnp.int32(n), key,
                   jnp.int32(s.iterations), graphdef=graphdef, s=static)


def llada_log_likelihood(model, prompt_ids, answer_ids, *, mc_num: int = 128,
                         batch_size: int = 32, cfg_scale: float = 0.0, key) -> jax.Array:
    """LLaDA's Monte Carlo lower bound on log p(answer | prompt) (a scalar)."""
    s = LikelihoodSettings(family="llada", mask_id=model.config.mask_token_id, mc_num=mc_num,
                           batch_size=batch_size, cfg_scale=float(cfg_scale),
                           shift_logits=model.config.shift_logits)
    return _run(model, prompt_ids, answer_ids, key, s)


def dream_log_likelihood(model, prompt_ids, answer_ids, *, mc_num: int = 128,
                         batch_size: int = 32, cfg_scale: float = 0.0, eps: float = 1e-3,
                         keep_first_last: bool = True, key) -> jax.Array:
    """Dream's Monte Carlo lower bound on log p(answer | prompt) (a scalar). Dream's eval
    passes prompt = [BOS, context...] and answer = [continuation..., EOS]."""
    s = LikelihoodSettings(family="dream", mask_id=model.config.mask_token_id, mc_num=mc_num,
                           batch_size=batch_size, cfg_scale=float(cfg_scale), eps=float(eps),
                           keep_first_last=keep_first_last,
                           shift_logits=model.config.shift_logits)
    return _run(model, prompt_ids, answer_ids, key, s)


def log_likelihood(model, prompt_ids, answer_ids, *, mc_num: int = 128, batch_size: int = 32,
                   cfg_scale: float = 0.0, key, **kwargs) -> jax.Array:
    """The model family's estimator: `llada_log_likelihood`, `dream_log_likelihood`
    (kwargs: eps, keep_first_last for Dream), or for DiffusionGemma `-n * answer_score`, n the
    answer's token count: the Monte Carlo denoising cross-entropy over the noise levels of
    `GemmaScoreSettings` with ceil(mc_num / levels) samples per level (kwargs:
    self_condition). That is not a bound on log p(answer | prompt), but it ranks answers the
    same way a log-likelihood does (higher = more likely) and sums over tokens like one."""
    if model.config.family == GEMMA_FAMILY:
        if cfg_scale:
            raise ValueError(f"cfg_scale={cfg_scale}: the diffusion_gemma score has no "
                             "classifier-free guidance")
        unknown = sorted(set(kwargs) - {"self_condition"})
        if unknown:
            raise ValueError(f"{unknown}: not options of the diffusion_gemma score")
        levels = GemmaScoreSettings().levels
        n = int(np.asarray(answer_ids).shape[0])
        score = answer_score(model, prompt_ids, answer_ids, key=key, levels=levels,
                             samples=-(-mc_num // len(levels)), **kwargs)
        return -n * score
    if model.config.family == "llada":
        if kwargs:
            raise ValueError(f"{sorted(kwargs)}: not options of the LLaDA estimator")
        return llada_log_likelihood(model, prompt_ids, answer_ids, mc_num=mc_num,
                                    batch_size=batch_size, cfg_scale=cfg_scale, key=key)
    return dream_log_likelihood(model, prompt_ids, answer_ids, mc_num=mc_num,
                                batch_size=batch_size, cfg_scale=cfg_scale, key=key, **kwargs)


def perplexity_bound(model, windows, *, mc_num: int = 128, batch_size: int = 32, key,
                     progress: bool = False) -> dict:
    """Perplexity upper bound over fixed token windows `[num_windows, window_len]`
    ("unconditional" text).

    LLaDA: every position is maskable (empty prompt). Dream: position 0 is the conditioning
    token (e.g. BOS; it has no left neighbour to be predicted from under the shift) and
    every later position is maskable, the last one included.
    Returns {"log_likelihood": [num_windows] bounds, "tokens": scored tokens,
    "nll_per_token", "ppl_bound": exp(nll_per_token)}.
    """
    if model.config.family == GEMMA_FAMILY:
        raise ValueError("perplexity_bound: a masked-diffusion ELBO; a diffusion_gemma model "
                         "has no mask token (score answers with log_likelihood instead)")
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows: expected [num_windows, window_len >= 2], got {w.shape}")
    from tqdm.auto import tqdm

    lls = []
    for i in tqdm(range(w.shape[0]), desc=f"likelihood bound ({mc_num} MC samples)",
                  unit="window", disable=not progress):
        ki = jax.random.fold_in(key, i)
        if model.config.family == "llada":
            ll = llada_log_likelihood(model, w[i, :0], w[i], mc_num=mc_num,
                                      batch_size=batch_size, key=ki)
        else:
            ll = dream_log_likelihood(model, w[i, :1], w[i, 1:], mc_num=mc_num,
                                      batch_size=batch_size, keep_first_last=False, key=ki)
        lls.append(ll)
    lls = np.asarray(jnp.stack(lls), np.float64)
    scored = w.shape[1] - (0 if model.config.family == "llada" else 1)
    tokens = int(w.shape[0] * scored)
    nll = float(-lls.sum() / tokens)
    return {"log_likelihood": lls, "tokens": tokens, "nll_per_token": nll,
            "ppl_bound": math.exp(nll)}

