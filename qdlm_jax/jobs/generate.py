"""The generation job (`qdlm generate`): a checkpoint, prompts and settings in, texts out.

LLaDA and Dream run with the `gen` settings (`GenerationConfig`); DiffusionGemma runs its
entropy-bound sampler with the checkpoint's `generation_config.json` (transformers' defaults
for what it leaves unset), overridden by the `gemma` settings, and reports the forward passes
and tokens per forward pass of each row.

The prompt is encoded by the checkpoint's tokenizer (`load_tokenizer`) and framed with its
BOS, or, with `chat`, put through its chat template as one user message; a checkpoint
without a tokenizer takes token ids ("1 2 3"). Stages are reported on stderr with timings:
loading, compiling (ahead of time), running (a per-step bar unless `progress` is off). Each
output is cut at the checkpoint's stop ids (EOS, the end of turn, its generation config's EOS
ids).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time

import jax
import numpy as np

from qdlm_jax.checkpoints.load import (
    load_model,
    load_tokenizer,
    quantization_banner,
    read_generation_config,
    resolve_checkpoint,
)
from qdlm_jax.data.hf_tokenizer import stop_index
from qdlm_jax.errors import CheckpointError, ConfigOverrideError
from qdlm_jax.inference.generate import (
    GemmaSampleSettings,
    GenerationConfig,
    compile_generate,
    left_pad,
)
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY

# the DiffusionGemma sampler settings `qdlm generate` lets a user override (`gemma` section)
GEMMA_OVERRIDABLE = ("max_new_tokens", "steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold", "greedy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateSpec:
    model: str  # checkpoint directory or hub id
    prompts: tuple[str, ...]  # a batch, left-padded
    gen: GenerationConfig
    chat: bool = False  # apply the tokenizer's chat template (each prompt one user message)
    dtype: str | None = None  # param and compute dtype (None: the checkpoint's)
    bos: bool = True  # prepend the model's BOS (not with chat: the template frames it)
    progress: bool = True  # per-step bar (LLaDA, Dream)
    # DiffusionGemma sampler overrides, (name, value) pairs of GEMMA_OVERRIDABLE fields
    gemma: tuple[tuple[str, object], ...] = ()


def _log(msg):
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def _encode(prompts, tokenizer, bos, model_path, chat):
    rows = []
    for text in prompts:
        if tokenizer is not None and chat:
            rows.append(tokenizer.encode(tokenizer.chat_prompt([{"role": "user",
                                                                "content": text}])))
            continue
        if tokenizer is not None:
            ids = tokenizer.encode(text)
        else:
            if not re.fullmatch(r"[\s,]*\d+([\s,]+\d+)*[\s,]*", text):
                raise ConfigOverrideError(
                    f"--prompt {text!r}: {model_path} has no tokenizer.json, so prompts must "
                    "be token ids separated by spaces or commas")
            ids = [int(t) for t in re.split(r"[\s,]+", text.strip(" ,\n\t")) if t]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        rows.append(ids)
    return rows



def gemma_settings(path, config, gen: GenerationConfig,
                   overrides=()) -> GemmaSampleSettings:
    """The DiffusionGemma sampler settings of a run: the checkpoint's generation config, then
    `overrides`, with `gen`'s seed. Any other `gen` field set is an error (LLaDA / Dream
    settings)."""
    default = GenerationConfig()
    for f in dataclasses.fields(GenerationConfig):
        if f.name != "seed" and getattr(gen, f.name) != getattr(default, f.name):
            raise ConfigOverrideError(
                f"--config.gen.{f.name}={getattr(gen, f.name)!r}: a LLaDA / Dream setting; "
                f"{path} is a diffusion_gemma model, whose sampler is set with "
                f"--config.gemma.KEY=VALUE ({', '.join(GEMMA_OVERRIDABLE)})")
    overrides = dict(overrides)
    unknown = sorted(set(overrides) - set(GEMMA_OVERRIDABLE))
    if unknown:
        raise ConfigOverrideError(f"gemma: unknown keys {unknown}; known: "
                                  f"{list(GEMMA_OVERRIDABLE)}")
    try:
        return GemmaSampleSettings.from_generation_config(
            read_generation_config(path), config=config, seed=gen.seed, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigOverrideError(f"gemma: {e} ({path / 'generation_config.json'} and "
                                  "--config.gemma.* overrides)") from None


def run_generate(spec: GenerateSpec) -> list[str]:
    """The decoded text of each prompt (module docstring): prompt + continuation, or with
    `chat` the prompt and the answer alone, and where a stop id cut it, where."""
    t_start = time.time()
    gen, chat = spec.gen, spec.chat
    t0 = time.time()
    _log(f"loading {spec.model} ...")
    path = resolve_checkpoint(spec.model)
    model = load_model(path, dtype=spec.dtype)
    c = model.config
    try:
        tokenizer = load_tokenizer(path)
    except CheckpointError as e:
        if chat or "no tokenizer" not in str(e):
            raise
        tokenizer = None
    if chat and tokenizer.chat_template is None:
        raise ConfigOverrideError(f"--chat: {path} has no chat template (tokenizer_config.json "
                                  "chat_template or chat_template.jinja)")
    _log(f"loaded {c.family} model ({c.num_layers} layers, width {c.hidden_size}, vocab "
         f"{c.vocab_size}, {c.dtype}) in {time.time() - t0:.1f}s; tokenizer: "
         f"{tokenizer.describe() if tokenizer else 'none (token ids)'}"
         + ("; chat template applied" if chat else ""))
    banner = quantization_banner(path)
    if banner:
        _log(banner)

    gemma = c.family == GEMMA_FAMILY
    if gemma:
        settings = gemma_settings(path, c, gen, spec.gemma)
    elif spec.gemma:
        raise ConfigOverrideError(f"--config.gemma.{spec.gemma[0][0]}: a DiffusionGemma "
                                  f"sampler setting; {path} is a {c.family} model")
    else:
        settings = gen

    bos = c.bos_token_id if spec.bos and not chat else None
    rows = _encode(spec.prompts, tokenizer, bos, spec.model, chat)
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
    ids, mask = left_pad(rows, pad)
    mask = None if mask.all() else mask
    key = jax.random.key(gen.seed)

    t0 = time.time()
    if gemma:
        _log(f"compiling: batch {ids.shape[0]}, prompt {ids.shape[1]}, max_new_tokens "
             f"{settings.max_new_tokens} ({settings.num_canvases} canvas(es) of "
             f"{settings.canvas_length}), up to {settings.steps} steps each, entropy_bound "
             f"{settings.entropy_bound}{', greedy' if settings.greedy else ''} ...")
    else:
        _log(f"compiling: batch {ids.shape[0]}, prompt {ids.shape[1]}, gen_length "
             f"{gen.gen_length}, steps {gen.steps}" +
             (f", block_length {gen.block_length}" if c.family == "llada" else
              f", alg {gen.alg}") + " ...")
    try:
        runner = compile_generate(model, ids, mask, config=settings, key=key,
                                  progress=spec.progress)
    except ValueError as e:
        raise ConfigOverrideError(f"{'gemma' if gemma else 'gen'}: {e}") from None
    _log(f"compiled in {time.time() - t0:.1f}s")

    t0 = time.time()
    _log("running ..." + (" (no per-step bar: the canvas loop runs on the device)"
                          if gemma and spec.progress else ""))
    result = jax.block_until_ready(runner())
    dt = time.time() - t0
    if gemma:
        out = np.asarray(result.tokens)
        passes = np.asarray(result.forward_passes)
        per_forward = np.asarray(result.tokens_per_forward)
        n_tok = int(np.sum(out[:, ids.shape[1]:] != settings.pad_id))
        _log(f"generated {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tokens/s) with "
             f"{int(np.sum(np.asarray(result.steps)))} decoder steps; forward passes per "
             f"row {passes.tolist()}, tokens per forward "
             f"{[round(float(x), 2) for x in per_forward]}; total "
             f"{time.time() - t_start:.1f}s")
    else:
        out = np.asarray(result)
        n_tok = ids.shape[0] * gen.gen_length
        _log(f"generated {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tokens/s, "
             f"{gen.steps / dt:.1f} steps/s); total {time.time() - t_start:.1f}s")

    texts = []
    for i, row in enumerate(out):
        gen_ids = [int(t) for t in row[ids.shape[1]:]]
        cut = stop_index(gen_ids, c.stop_ids)
        prompt_ids = rows[i][1:] if bos is not None else rows[i]
        if tokenizer is not None and chat:  # the answer alone, without the template's text
            text = spec.prompts[i] + "\n" + tokenizer.decode(gen_ids[:cut],
                                                             skip_special_tokens=True)
        elif tokenizer is not None:  # decode prompt + continuation together (spacing)
            text = tokenizer.decode(prompt_ids + gen_ids[:cut], skip_special_tokens=False)
        else:
            text = " ".join(map(str, prompt_ids + gen_ids[:cut]))
        tail = f"  [stopped at token {cut} of {len(gen_ids)}]" if cut < len(gen_ids) else ""
        texts.append(text + tail)
    return texts
