"""Text-level access to a model for the task families: log-likelihood and generation.

Every task family talks to a model through two plain callables, so tests can swap in a stub
whose preferences are known:

- `LoglikFn(context: str, continuation: str, key) -> float`: an estimate of
  log p(continuation | context). `TextModel.loglik` is the masked-diffusion Monte Carlo
  bound of `likelihood.log_likelihood` (LLaDA: stratified 1/t weighting; Dream: p_mask
  weighting with right-shifted logits), with prompt = [BOS] + tokens(context) and
  answer = tokens(continuation) (+ [EOS] for Dream, as Dream's evaluation does).
- `GenerateFn(prompts: list[str]) -> list[str]`: the completion of each prompt (text after
  the prompt, cut at EOS and at the task's stop strings). `TextModel.generate` runs the
  family's jitted denoising loop (`generate.generate`) on left-padded batches.

`context_key(seed, context)` is the Monte Carlo key of a context: every continuation scored
against the same context (the options of one multiple-choice item) gets the same noise
draws, and the key does not depend on the order in which items are scored.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.inference.generate import (DREAM_ONLY, LLADA_ONLY, GenerationConfig,
                                         generate_with_nfe, left_pad)
from qdlm_jax.inference.likelihood import bucket, log_likelihood

LoglikFn = Callable[[str, str, jax.Array], float]
GenerateFn = Callable[[Sequence[str]], list[str]]


def context_key(seed: int, context: str) -> jax.Array:
    """`fold_in(key(seed), crc32(context))`: the same draws for every option of a context."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(context.encode("utf-8")))


def for_family(gen: GenerationConfig, family: str) -> GenerationConfig:
    """`gen` with the other family's fields reset to their defaults (a task's settings carry
    both LLaDA fields, e.g. block_length, and Dream fields, e.g. alg). Dream keeps
    block_length under Fast-dLLM's block decoding (a cache, threshold or factor)."""
    other = DREAM_ONLY if family == "llada" else LLADA_ONLY
    if family == "dream" and gen.fast:
        other = tuple(n for n in other if n != "block_length")
    default = GenerationConfig()
    return dataclasses.replace(gen, **{n: getattr(default, n) for n in other})


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


@dataclasses.dataclass(frozen=True, eq=False)
class TextModel:
    """A loaded model (fp or quantized) plus its `tokenizers.Tokenizer`."""

    model: object
    tokenizer: object
    # generated positions and forward passes (per real row) since `take_decode_stats`
    decode_counts: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return self.model.config.family

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt_ids(self, context: str) -> list[int]:
        bos = self.model.config.bos_token_id
        return ([bos] if bos is not None else []) + self.encode(context)

    def answer_ids(self, continuation: str) -> list[int]:
        ids = self.encode(continuation)
        eos = self.model.config.eos_token_id
        if self.family == "dream" and eos is not None:
            ids.append(eos)
        return ids

    def loglik(self, context: str, continuation: str, key: jax.Array, *, mc_num: int = 128,
               batch_size: int = 32, cfg_scale: float = 0.0) -> float:
        """Monte Carlo lower bound on log p(continuation | context) (see module docstring)."""
        answer = self.answer_ids(continuation)
        if not answer:
            raise ValueError(f"continuation {continuation!r} has no tokens to score")
        ll = log_likelihood(self.model, np.asarray(self.prompt_ids(context), np.int32),
                            np.asarray(answer, np.int32), mc_num=mc_num,
                            batch_size=min(batch_size, mc_num), cfg_scale=cfg_scale, key=key)
        return float(ll)

    def loglik_fn(self, *, mc_num: int, batch_size: int, cfg_scale: float = 0.0) -> LoglikFn:
        return lambda c, x, key: self.loglik(c, x, key, mc_num=mc_num, batch_size=batch_size,
                                             cfg_scale=cfg_scale)

    def decode_completion(self, row: Sequence[int]) -> str:
        """Text of generated ids up to the first EOS / EOT."""
        c = self.model.config
        stops = {t for t in (c.eos_token_id, c.eot_token_id) if t is not None}
        ids = [int(t) for t in row]
        cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], gen: GenerationConfig, *,
                 stops: Sequence[str] = (), batch_size: int = 8, progress: bool = True,
                 desc: str = "generate") -> list[str]:
        """Completions of `prompts` (batches of `batch_size`, left-padded to a bucketed width
        with the padding masked out, a short last batch filled up with copies of its first
        row, so a task compiles a handful of programs). Batch j uses key
        `fold_in(key(gen.seed), j)` (irrelevant for the greedy defaults)."""
        gen = for_family(gen, self.family)
        c = self.model.config
        pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
        out: list[str] = []
        starts = range(0, len(prompts), batch_size)
        for j, start in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
            rows = [self.prompt_ids(p) for p in prompts[start:start + batch_size]]
            n_real = len(rows)
            if len(prompts) > batch_size:
                rows += [rows[0]] * (batch_size - n_real)
            ids, mask = left_pad(rows, pad, width=bucket(max(len(r) for r in rows)))
            key = jax.random.fold_in(jax.random.key(gen.seed), j)
            tokens, nfe = generate_with_nfe(self.model, ids, mask, config=gen, key=key)
            tokens = np.asarray(tokens)
            counts = self.decode_counts
            counts["tokens"] = counts.get("tokens", 0) + n_real * gen.gen_length
            counts["forward_passes"] = counts.get("forward_passes", 0) + n_real * int(nfe)
            for row in tokens[:n_real, ids.shape[1]:]:
                out.append(cut_at_stops(self.decode_completion(row), stops))
        return out

    def take_decode_stats(self) -> dict:
        """{"tokens_per_step": generated positions per forward pass (mean over the rows),
        "forward_passes": per row, summed} of the generation since the last call (empty if
        none), and resets the counts: what a cached / parallel decoding setting saved."""
        counts = dict(self.decode_counts)
        self.decode_counts.clear()
        if not counts.get("forward_passes"):
            return {}
        return {"tokens_per_step": counts["tokens"] / counts["forward_passes"],
                "forward_passes": counts["forward_passes"]}

    def generate_fn(self, gen: GenerationConfig, *, stops: Sequence[str] = (),
                    batch_size: int = 8, progress: bool = True,
                    desc: str = "generate") -> GenerateFn:
        return lambda prompts: self.generate(prompts, gen, stops=stops, batch_size=batch_size,
                                             progress=progress, desc=desc)


def load_text_model(path, *, dtype: str | None = "float32") -> TextModel:
    """`load_model(path)` (HF dir, qdlm checkpoint or packed quantized checkpoint) plus the
    `tokenizer.json` beside it."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from qdlm_jax import load_model
    tok_path = Path(path) / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: no tokenizer.json beside the model; the text "
                                "tasks need one")
    return TextModel(load_model(path, dtype=dtype), Tokenizer.from_file(str(tok_path)))
