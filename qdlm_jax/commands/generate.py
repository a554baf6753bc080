"""qdlm generate --model PATH --prompt TEXT: sample with the LLaDA or Dream algorithm.

The generation settings come from an ml-collections config with a `gen` section
(`--config configs/generate.py`, default: the built-in defaults, which are the same values),
overridden with `--config.gen.KEY=VALUE`. They become a frozen `GenerationConfig` before the
jitted loop is built. Stages are reported with timings: loading, compiling (ahead of time),
running (with a per-step bar driven by `jax.debug.callback` unless --no-progress).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

NAME = "generate"
HELP = "generate text with a LLaDA or Dream checkpoint (published samplers, one jitted loop)"


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="HF checkpoint directory or `qdlm convert` output")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (token ids like '1 2 3' if the checkpoint has no "
                        "tokenizer.json); repeat for a batch (left-padded)")
    p.add_argument("--config", default=None,
                   help="config file with a `gen` section (default: built-in defaults, "
                        "as in configs/generate.py)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="param and compute dtype (default: the checkpoint's)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend the model's bos_token_id to each prompt")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")


def default_config():
    """The built-in `gen` config: GenerationConfig's defaults."""
    import ml_collections

    from qdlm_jax.inference.generate import GenerationConfig
    c = ml_collections.ConfigDict()
    c.gen = ml_collections.ConfigDict(dataclasses.asdict(GenerationConfig()))
    return c


def _log(msg):
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def _encode(prompts, tokenizer, bos, model_path):
    rows = []
    for text in prompts:
        if tokenizer is not None:
            ids = tokenizer.encode(text).ids
        else:
            if not re.fullmatch(r"[\s,]*\d+([\s,]+\d+)*[\s,]*", text):
                from qdlm_jax.errors import ConfigOverrideError
                raise ConfigOverrideError(
                    f"--prompt {text!r}: {model_path} has no tokenizer.json, so prompts must "
                    "be token ids separated by spaces or commas")
            ids = [int(t) for t in re.split(r"[\s,]+", text.strip(" ,\n\t")) if t]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        rows.append(ids)
    return rows


def run(args, overrides):
    from qdlm_jax.errors import ConfigOverrideError
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file

    t_start = time.time()
    config = load_config_file(args.config) if args.config else default_config()
    if "gen" not in config:
        raise ConfigOverrideError(f"--config {args.config}: no `gen` section")
    apply_overrides(config, overrides)

    import jax
    import numpy as np

    from qdlm_jax import load_model
    from qdlm_jax.inference.generate import GenerationConfig, compile_generate, left_pad

    try:
        gen = GenerationConfig.from_mapping(config.gen.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigOverrideError(f"gen: {e}") from None

    t0 = time.time()
    _log(f"loading {args.model} ...")
    model = load_model(args.model, dtype=args.dtype)
    c = model.config
    tok_path = Path(args.model) / "tokenizer.json"
    tokenizer = None
    if tok_path.is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(tok_path))
    _log(f"loaded {c.family} model ({c.num_layers} layers, width {c.hidden_size}, vocab "
         f"{c.vocab_size}, {c.dtype}) in {time.time() - t0:.1f}s; tokenizer: "
         f"{tok_path if tokenizer else 'none (token ids)'}")
    from qdlm_jax.checkpoints.load import quantization_banner
    banner = quantization_banner(args.model)
    if banner:
        _log(banner)

    bos = None if args.no_bos else c.bos_token_id
    rows = _encode(args.prompt, tokenizer, bos, args.model)
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
    ids, mask = left_pad(rows, pad)
    mask = None if mask.all() else mask
    key = jax.random.key(gen.seed)

    t0 = time.time()
    _log(f"compiling: batch {ids.shape[0]}, prompt {ids.shape[1]}, gen_length "
         f"{gen.gen_length}, steps {gen.steps}" +
         (f", block_length {gen.block_length}" if c.family == "llada" else
          f", alg {gen.alg}") + " ...")
    try:
        runner = compile_generate(model, ids, mask, config=gen, key=key,
                                  progress=not args.no_progress)
    except ValueError as e:
        raise ConfigOverrideError(f"gen: {e}") from None
    _log(f"compiled in {time.time() - t0:.1f}s")

    t0 = time.time()
    _log("running ...")
    out = np.asarray(jax.block_until_ready(runner()))
    dt = time.time() - t0
    n_tok = ids.shape[0] * gen.gen_length
    _log(f"generated {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tokens/s, "
         f"{gen.steps / dt:.1f} steps/s); total {time.time() - t_start:.1f}s")

    stops = {t for t in (c.eos_token_id, c.eot_token_id) if t is not None}
    for i, row in enumerate(out):
        gen_ids = [int(t) for t in row[ids.shape[1]:]]
        cut = next((j for j, t in enumerate(gen_ids) if t in stops), len(gen_ids))
        prompt_ids = rows[i][1:] if bos is not None else rows[i]
        if tokenizer is not None:  # decode prompt + continuation together (spacing)
            text = tokenizer.decode(prompt_ids + gen_ids[:cut], skip_special_tokens=False)
        else:
            text = " ".join(map(str, prompt_ids + gen_ids[:cut]))
        tail = f"  [stopped at token {cut} of {len(gen_ids)}]" if cut < len(gen_ids) else ""
        if len(out) > 1:
            print(f"--- sample {i} ---")
        print(f"{text}{tail}")
    return 0
