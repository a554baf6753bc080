"""Text-level access to a model for the task families: log-likelihood and generation.

Every task family talks to a model through two plain callables, so tests can swap in a stub
whose preferences are known:

- `LoglikFn(context: str, continuation: str, key) -> float`: an estimate of
  log p(continuation | context). `TextModel.loglik` is the masked-diffusion Monte Carlo
  bound of `likelihood.log_likelihood` (LLaDA: stratified 1/t weighting; Dream: p_mask
  weighting with right-shifted logits), with prompt = [BOS] + tokens(context) and
  answer = tokens(continuation) (+ [EOS] for Dream, as Dream's evaluation does). For
  DiffusionGemma (no mask token) it is minus the answer's token count times its Monte Carlo
  denoising cross-entropy (`gemma_likelihood.answer_score`), which ranks answers like a
  log-likelihood without bounding it.
- `GenerateFn(prompts: list[Prompt]) -> list[str]`: the completion of each prompt (text after
  the prompt, cut at the checkpoint's stop ids and at the task's stop strings).
  `TextModel.generate` runs the family's jitted denoising loop (`generate.generate`) on
  left-padded batches; DiffusionGemma's entropy-bound sampler takes the checkpoint's
  generation config (`gemma`) with the task's gen_length, seed and temperature 0 as greedy
  draws (`generate.gemma_settings_for`).

A prompt is text, or a chat as a list of `{"role", "content"}` messages. With `chat` on (or
for a message list), the prompt is the tokenizer's chat template applied to the messages (a
text prompt is one user message) with the assistant's turn opened, encoded as is: the
template writes the checkpoint's own framing (LLaDA's `<|startoftext|>`, Dream's
`<|im_start|>`). Otherwise the prompt is [BOS] + its tokens (BOS not repeated when the text
already starts with it). `chat_setting("auto")` is on for a checkpoint whose tokenizer has a
chat template and whose name or config marks it as an instruct model (`instruct`), the way
QDLM's evaluation decides.

`context_key(seed, context)` is the Monte Carlo key of a context: every continuation scored
against the same context (the options of one multiple-choice item) gets the same noise
draws, and the key does not depend on the order in which items are scored.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Mapping, Sequence, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.data.hf_tokenizer import stop_index
from qdlm_jax.evals.basic import mean_se
from qdlm_jax.inference.common import bucket
from qdlm_jax.inference.diffusion_gemma import gemma_sample
from qdlm_jax.inference.generate import (
    DREAM_ONLY,
    LLADA_ONLY,
    GemmaSampleSettings,
    GenerationConfig,
    gemma_settings_for,
    generate_with_nfe,
    left_pad,
)
from qdlm_jax.inference.likelihood import log_likelihood
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]
LoglikFn = Callable[[Prompt, str, jax.Array], float]
GenerateFn = Callable[[Sequence[Prompt]], list[str]]
CHAT_SETTINGS = ("auto", "on", "off")


def context_key(seed: int, context: Prompt) -> jax.Array:
    """`fold_in(key(seed), crc32(context))`: the same draws for every option of a context."""
    text = context if isinstance(context, str) else repr([dict(m) for m in context])
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(text.encode("utf-8")))


def is_instruct_checkpoint(path) -> bool:
    """Whether a checkpoint's name (its directory, the run a packed `model/` belongs to, or
    `_name_or_path` in its config.json) marks it as an instruct / chat model ("instruct",
    or an "-it" suffix as in gemma-*-it)."""
    from pathlib import Path

    p = Path(path)
    names = [p.name, p.parent.name if p.name == "model" else ""]
    if p.parent.name == "snapshots":  # a hub id in the Hugging Face cache
        names.append(p.parent.parent.name)
    try:
        import json
        names.append(str(json.loads((p / "config.json").read_text()).get("_name_or_path", "")))
    except (OSError, ValueError, AttributeError):
        pass
    names = [n.lower() for n in names if n]
    return any("instruct" in n or n.endswith("-it") or "-it-" in n for n in names)


def for_family(gen: GenerationConfig, family: str) -> GenerationConfig:
    """`gen` with the other family's fields reset to their defaults (a task's settings carry
    both LLaDA fields, e.g. block_length, and Dream fields, e.g. alg). Dream keeps
    block_length under Fast-dLLM's block decoding (a cache, threshold or factor).
    DiffusionGemma keeps only gen_length, temperature and seed."""
    other = DREAM_ONLY if family == "llada" else LLADA_ONLY
    if family == GEMMA_FAMILY:
        other = LLADA_ONLY + DREAM_ONLY + ("cache", "threshold", "factor")
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
    tokenizer: object  # data.hf_tokenizer.CheckpointTokenizer
    chat: bool = False  # apply the chat template to text prompts
    instruct: bool = False  # the checkpoint is an instruct model (`is_instruct_checkpoint`)
    templated: bool = False  # text prompts are chat-templated already: encoded as they are
    # generated positions and forward passes (per real row) since `take_decode_stats`
    decode_counts: dict = dataclasses.field(default_factory=dict, repr=False)
    # DiffusionGemma: the sampler settings of the checkpoint's generation config
    gemma: GemmaSampleSettings | None = None

    @property
    def family(self) -> str:
        return self.model.config.family

    def chat_setting(self, setting: str) -> bool:
        """`auto` | `on` | `off` -> whether prompts go through the chat template."""
        if setting not in CHAT_SETTINGS:
            raise ValueError(f"chat_template={setting!r}: expected one of {CHAT_SETTINGS}")
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if setting == "on" and not has_template:
            raise ValueError(f"chat_template=on: {getattr(self.tokenizer, 'source', 'the')} "
                             "tokenizer has no chat template")
        return setting == "on" or (setting == "auto" and has_template and self.instruct)

    def with_chat(self, setting: str) -> "TextModel":
        """This model with the chat template `setting` (auto | on | off) applied."""
        return dataclasses.replace(self, chat=self.chat_setting(setting))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def prompt_ids(self, context: Prompt) -> list[int]:
        """Ids of a prompt (module docstring: chat template or [BOS] + tokens)."""
        if not isinstance(context, str) or self.chat:
            messages = [{"role": "user", "content": context}] if isinstance(context, str) \
                else [dict(m) for m in context]
            return self.encode(self.tokenizer.chat_prompt(messages))
        bos = self.model.config.bos_token_id
        ids = self.encode(context)
        if self.templated or bos is None or ids[:1] == [bos]:
            return ids
        return [bos] + ids

    def answer_ids(self, continuation: str) -> list[int]:
        ids = self.encode(continuation)
        eos = self.model.config.eos_token_id
        if self.family == "dream" and eos is not None:
            ids.append(eos)
        return ids

    def loglik(self, context: Prompt, continuation: str, key: jax.Array, *, mc_num: int = 128,
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
        """Text of generated ids up to the first stop id (EOS, end of turn, the checkpoint's
        generation EOS ids)."""
        ids = [int(t) for t in row]
        return self.tokenizer.decode(ids[:stop_index(ids, self.model.config.stop_ids)],
                                     skip_special_tokens=True)

    def generate(self, prompts: Sequence[Prompt], gen: GenerationConfig, *,
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
            counts = self.decode_counts
            if self.family == GEMMA_FAMILY:
                settings = gemma_settings_for(self.model, gen, self.gemma)
                r = gemma_sample(self.model, ids, mask, settings=settings, key=key)
                tokens = np.asarray(r.tokens)
                n_tok = int(np.sum(tokens[:n_real, ids.shape[1]:] != settings.pad_id))
                per_row = np.asarray(r.forward_passes)[:n_real].tolist()
            else:
                tokens, nfe = generate_with_nfe(self.model, ids, mask, config=gen, key=key)
                tokens = np.asarray(tokens)
                n_tok, per_row = n_real * gen.gen_length, [int(nfe)] * n_real
            counts["tokens"] = counts.get("tokens", 0) + n_tok
            counts.setdefault("per_row", []).extend(int(n) for n in per_row)
            for row in tokens[:n_real, ids.shape[1]:]:
                out.append(cut_at_stops(self.decode_completion(row), stops))
        return out

    def take_decode_stats(self) -> dict:
        """{"tokens_per_step": generated positions per forward pass (mean over the rows),
        "forward_passes": per row, summed, "forward_passes_per_row" and "..._se": their
        mean and its standard error (for DiffusionGemma, the sampler steps to each row's
        early stop)} of the generation since the last call (empty if none), and resets the
        counts: what a cached / parallel decoding setting saved."""
        counts = dict(self.decode_counts)
        self.decode_counts.clear()
        per_row = counts.get("per_row", [])
        if not sum(per_row):
            return {}
        return {"tokens_per_step": counts["tokens"] / sum(per_row),
                "forward_passes": sum(per_row),
                "forward_passes_per_row": sum(per_row) / len(per_row),
                "forward_passes_per_row_se": mean_se(per_row)}

    def generate_fn(self, gen: GenerationConfig, *, stops: Sequence[str] = (),
                    batch_size: int = 8, progress: bool = True,
                    desc: str = "generate") -> GenerateFn:
        return lambda prompts: self.generate(prompts, gen, stops=stops, batch_size=batch_size,
                                             progress=progress, desc=desc)


def load_text_model(path, *, dtype: str | None = "float32",
                    chat_template: str = "off") -> TextModel:
    """`load_model(path)` (HF dir, hub id, qdlm checkpoint or packed quantized checkpoint)
    with the checkpoint's tokenizer (`load_tokenizer`); `chat_template` auto | on | off."""
    from qdlm_jax.checkpoints.load import (
        load_model,
        load_tokenizer,
        read_generation_config,
        resolve_checkpoint,
    )

    p = resolve_checkpoint(path)
    model = load_model(p, dtype=dtype)
    gemma = None
    if model.config.family == GEMMA_FAMILY:
        gemma = GemmaSampleSettings.from_generation_config(read_generation_config(p),
                                                           config=model.config)
    tm = TextModel(model, load_tokenizer(p), instruct=is_instruct_checkpoint(p), gemma=gemma)
    return tm.with_chat(chat_template)
