"""The two quality measures used by the model cards and the quantization job.

- `heldout_bound`: the Monte Carlo masked-likelihood bound (nats and bits per token) on
  held-out windows of a text source, via `likelihood.perplexity_bound`. DiffusionGemma has no
  mask token; for it the same call gives the continuation NLL instead: each window is a
  prompt (all but its last canvas_length tokens, through the causal encoder) and one canvas,
  scored left to right (`gemma_likelihood.left_to_right_nll`): position i predicted with the
  canvas before it clean and the rest uniform noise,
      NLL = mean over windows, positions and noise draws of -log p(x_i | prompt, x_<i, noise)
  in nats. It is the likelihood of decoding the window's end one token per step, a proper
  sequence likelihood, so it is compared with `unigram_entropy`. `order="parallel"` scores
  every position from the prompt and a fully noised canvas instead (t = 1: the sampler's
  first step; a product of per-position marginals).
- `arithmetic_accuracy`: exact match of the denoising loop's answers to held-out arithmetic
  problems (`Question: 47+38=? Answer:` -> first integer of the generated text).
- `unigram_entropy`: the entropy of a unigram model fitted on the train split, the
  "knows no context" baseline a trained model must beat.
- `output_kl`: how far a quantized model's predictions are from the fp model's, without
  Monte Carlo noise: on held-out windows with a fixed half of the positions masked,
      KL = mean over (window, position) of sum_v p_fp(v) (log p_fp(v) - log p_q(v)) / ln 2
  in bits per position (every output position of the masked input, so Dream's shifted
  predictions are covered too). The same windows and masks for every model compared.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.data import arithmetic, sources
from qdlm_jax.data.hf_tokenizer import stop_index
from qdlm_jax.inference.gemma_likelihood import answer_score, left_to_right_nll
from qdlm_jax.inference.generate import GenerationConfig, generate
from qdlm_jax.inference.likelihood import perplexity_bound
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY

LN2 = math.log(2.0)


def heldout_windows(tokenizer, *, source: str = sources.DEFAULT_SOURCE, seq_len: int = 128,
                    n_windows: int = 32, split: str = "heldout", seed: int = 0) -> np.ndarray:
    """`[n_windows, seq_len]` int32 windows of a split of `source`, encoded by a checkpoint's
    tokenizer (`CheckpointTokenizer`), each document framed by its BOS / EOS ids;
    ValueError if the split has too few."""
    special = tokenizer.special
    docs = sources.load_split(source, split, seed=seed)
    w = sources.token_windows(docs, tokenizer, seq_len, bos_id=special.bos, eos_id=special.eos,
                              max_windows=n_windows)
    if len(w) < n_windows:
        raise ValueError(f"source {source!r}/{split}: only {len(w)} windows of {seq_len} "
                         f"tokens, asked for n_windows={n_windows}")
    return w


def heldout_bound(model, windows: np.ndarray, *, mc_num: int = 32, batch_size: int = 16,
                  seed: int = 0, progress: bool = True) -> dict:
    """Per-token negative ELBO on `windows` (lower is better): nats, bits, perplexity bound;
    for DiffusionGemma the continuation cross-entropy (module docstring; `mc_num` noise
    draws per window)."""
    if model.config.family == GEMMA_FAMILY:
        return continuation_ce(model, windows, samples=mc_num, seed=seed, progress=progress)
    r = perplexity_bound(model, windows, mc_num=mc_num, batch_size=min(batch_size, mc_num),
                         key=jax.random.key(seed), progress=progress)
    per_window = -np.asarray(r["log_likelihood"], np.float64) / (r["tokens"] / len(windows))
    return {"nll_nats": r["nll_per_token"], "bits_per_token": r["nll_per_token"] / LN2,
            "bits_per_token_se": mean_se(per_window / LN2), "ppl_bound": r["ppl_bound"],
            "tokens": r["tokens"], "mc_num": mc_num, "n_windows": int(len(windows)),
            "seq_len": int(np.asarray(windows).shape[1])}


def continuation_ce(model, windows: np.ndarray, *, samples: int = 32, seed: int = 0,
                    progress: bool = True, order: str = "left_to_right") -> dict:
    """DiffusionGemma's continuation NLL on `windows` [n, P + canvas_length] (module
    docstring; `order` "left_to_right" or "parallel", `samples` noise draws per window), with
    the keys of `heldout_bound` (`ppl_bound` is exp(NLL), a perplexity, not a bound) and
    `measure`."""
    w = np.asarray(windows)
    length = model.config.canvas_length
    if w.ndim != 2 or w.shape[1] <= length:
        raise ValueError(f"windows: expected [n, P + {length}] with P > 0 (the model's "
                         f"canvas_length is {length}), got {w.shape}")
    if order not in ("left_to_right", "parallel"):
        raise ValueError(f"order={order!r}: expected 'left_to_right' or 'parallel'")
    key = jax.random.key(seed)

    def score(i):
        prompt, canvas, k = w[i, :-length], w[i, -length:], jax.random.fold_in(key, i)
        if order == "parallel":
            return answer_score(model, prompt, canvas, key=k, levels=(1.0,), samples=samples)
        return left_to_right_nll(model, prompt, canvas, key=k, samples=samples)

    per_window = np.asarray([float(score(i)) for i in tqdm(
        range(len(w)), desc="continuation NLL", unit="window", disable=not progress)],
        np.float64)
    nats = float(per_window.mean())
    measure = (f"left-to-right NLL of the last {length} tokens (later positions noised)"
               if order == "left_to_right" else
               f"cross-entropy of the last {length} tokens, fully noised")
    return {"nll_nats": nats, "bits_per_token": nats / LN2,
            "bits_per_token_se": mean_se(per_window / LN2), "ppl_bound": math.exp(nats),
            "tokens": int(len(w) * length), "mc_num": samples, "n_windows": int(len(w)),
            "seq_len": int(w.shape[1]), "measure": measure, "order": order}


def mean_se(values) -> float:
    """Standard error of the mean of per-item values, std / sqrt(n) (ddof 1; 0 for n < 2).
    Over held-out windows it covers both the windows drawn and the Monte Carlo noise."""
    v = np.asarray(values, np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def format_pm(value, se, fmt: str, scale: float = 1.0) -> str:
    """`value ± se` for tables (both times `scale`, in format `fmt`), the value alone when no
    standard error was recorded, "–" when there is no value."""
    if value is None:
        return "–"
    text = format(scale * value, fmt)
    return text if se is None else f"{text} ± {format(scale * se, fmt)}"


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent items, sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n) if n else 0.0


def unigram_entropy(train_windows: np.ndarray, vocab_size: int) -> dict:
    """Entropy (nats, bits per token) of the add-one-smoothed unigram fitted on the train
    split's tokens."""
    counts = np.bincount(np.asarray(train_windows).ravel(), minlength=vocab_size) + 1.0
    p = counts / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return {"nats": h, "bits_per_token": h / LN2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticEval:
    n: int = 200  # held-out problems
    digits: tuple[int, ...] = (2,)
    ops: tuple[str, ...] = ("+",)
    gen_length: int = 8
    steps: int = 8
    batch_size: int = 50
    seed: int = 0


def arithmetic_accuracy(model, tokenizer, spec: ArithmeticEval = ArithmeticEval(),
                        *, progress: bool = True) -> dict:
    """Exact-match accuracy on held-out problems, greedy (temperature 0) denoising; the
    answer is the text generated before the first stop id (EOS, end of turn)."""
    special = tokenizer.special
    pad = special.pad if special.pad is not None else (special.eos or 0)
    bos = [special.bos] if special.bos is not None else []
    aspec = arithmetic.ArithmeticSpec(digits=spec.digits, ops=spec.ops)
    problems = arithmetic.generate_problems(spec.n, seed=spec.seed, split="heldout",
                                            spec=aspec, unique=True)
    family = model.config.family
    if family == "llada":
        gen = GenerationConfig(steps=spec.steps, gen_length=spec.gen_length,
                               block_length=spec.gen_length, remasking="low_confidence")
    elif family == "dream":
        gen = GenerationConfig(steps=spec.steps, gen_length=spec.gen_length, alg="maskgit_plus")
    else:  # DiffusionGemma: its sampler's own steps and early stop, greedy draws
        gen = GenerationConfig(gen_length=spec.gen_length)
    correct, examples = 0, []
    for start in tqdm(range(0, len(problems), spec.batch_size), desc="arithmetic",
                      disable=not progress):
        batch = problems[start:start + spec.batch_size]
        prompts = [bos + tokenizer.encode(arithmetic.render_prompt(p)) for p in batch]
        width = max(len(p) for p in prompts)
        ids = np.full((len(batch), width), pad, np.int32)
        mask = np.zeros((len(batch), width), np.int32)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        out = np.asarray(generate(model, ids, mask, config=gen))
        for p, row in zip(batch, out[:, width:]):
            row = [int(t) for t in row]
            text = tokenizer.decode(row[:stop_index(row, special.stops)],
                                    skip_special_tokens=True)
            got = arithmetic.extract_answer(text)
            correct += int(got == p.answer)
            if len(examples) < 5:
                examples.append({"prompt": p.prompt, "generated": text, "answer": p.answer})
    acc = correct / len(problems)
    return {"accuracy": acc, "se": binomial_se(acc, len(problems)), "n": len(problems),
            "examples": examples}


def _log_probs(state, x, *, graphdef):
    from flax import nnx

    logits = nnx.merge(graphdef, state)(x)
    return jax.nn.log_softmax(logits.astype(np.float32), axis=-1)


# One jit for every model: the graphdef is static, so the same model (e.g. the fp reference
# of a sweep) compiles once per batch shape, not once per call.
_log_probs_jit = jax.jit(_log_probs, static_argnames="graphdef")


def output_kl(reference, model, windows: np.ndarray, *, mask_ratio: float = 0.5,
              batch_size: int = 8, seed: int = 0) -> dict:
    """Mean KL(reference || model) in bits per output position (module docstring) on
    `windows` [n, T] with a fixed `mask_ratio` of positions replaced by the mask token."""
    import jax.numpy as jnp
    from flax import nnx

    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r}: expected a value in [0, 1]")
    w = np.asarray(windows)
    if w.ndim != 2 or len(w) == 0:
        raise ValueError(f"windows: expected [num_windows, window_len], got {w.shape}")
    mask_id = reference.config.mask_token_id
    rng = np.random.default_rng(seed)
    noisy = np.where(rng.random(w.shape) < mask_ratio, mask_id, w).astype(np.int32)

    (g_ref, s_ref), (g_model, s_model) = nnx.split(reference), nnx.split(model)
    per_window = []
    for i in range(0, len(noisy), batch_size):
        x = jnp.asarray(noisy[i:i + batch_size])
        a = _log_probs_jit(s_ref, x, graphdef=g_ref)
        b = _log_probs_jit(s_model, x, graphdef=g_model)
        per_window += np.asarray(jnp.sum(jnp.exp(a) * (a - b), axis=(1, 2))).tolist()
    per_window = np.asarray(per_window, np.float64) / (noisy.shape[1] * LN2)
    return {"kl_bits": float(per_window.mean()), "kl_bits_se": mean_se(per_window),
            "positions": int(noisy.size), "mask_ratio": mask_ratio}

