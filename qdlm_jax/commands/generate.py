"""qdlm generate --model PATH --prompt TEXT: sample with the LLaDA or Dream algorithm.

`--model` is a checkpoint directory or a hub id; the prompt is encoded by the checkpoint's
tokenizer (`load_tokenizer`) and framed with its BOS, or, with `--chat` (`gen.chat=true`),
put through its chat template as one user message. The output is cut at the checkpoint's
stop ids (EOS, the end of turn, its generation config's EOS ids).

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

NAME = "generate"
DEFAULT_CONFIG = "configs/generate.py"  # its keys are listed under --help
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
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template (each prompt one user message; "
                        "same as --config.gen.chat=true)")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")


def default_config():
    """The built-in `gen` config: GenerationConfig's defaults."""
    import ml_collections

    from qdlm_jax.inference.generate import GenerationConfig
    c = ml_collections.ConfigDict()
    c.gen = ml_collections.ConfigDict(dataclasses.asdict(GenerationConfig()))
    c.gen.chat = False  # apply the tokenizer's chat template to the prompts
    return c


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

    from qdlm_jax.checkpoints.load import load_model
    from qdlm_jax.inference.generate import GenerationConfig, compile_generate, left_pad

    gen_settings = config.gen.to_dict()
    chat = bool(gen_settings.pop("chat", False)) or args.chat
    try:
        gen = GenerationConfig.from_mapping(gen_settings)
    except (TypeError, ValueError) as e:
        raise ConfigOverrideError(f"gen: {e}") from None

    from qdlm_jax.checkpoints.load import load_tokenizer, resolve_checkpoint
    from qdlm_jax.errors import CheckpointError

    t0 = time.time()
    _log(f"loading {args.model} ...")
    path = resolve_checkpoint(args.model)
    model = load_model(path, dtype=args.dtype)
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
    from qdlm_jax.checkpoints.load import quantization_banner
    banner = quantization_banner(args.model)
    if banner:
        _log(banner)

    bos = None if args.no_bos or chat else c.bos_token_id
    rows = _encode(args.prompt, tokenizer, bos, args.model, chat)
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

    stops = set(c.stop_ids)
    for i, row in enumerate(out):
        gen_ids = [int(t) for t in row[ids.shape[1]:]]
        cut = next((j for j, t in enumerate(gen_ids) if t in stops), len(gen_ids))
        prompt_ids = rows[i][1:] if bos is not None else rows[i]
        if tokenizer is not None and chat:  # the answer alone, without the template's text
            text = args.prompt[i] + "\n" + tokenizer.decode(gen_ids[:cut],
                                                            skip_special_tokens=True)
        elif tokenizer is not None:  # decode prompt + continuation together (spacing)
            text = tokenizer.decode(prompt_ids + gen_ids[:cut], skip_special_tokens=False)
        else:
            text = " ".join(map(str, prompt_ids + gen_ids[:cut]))
        tail = f"  [stopped at token {cut} of {len(gen_ids)}]" if cut < len(gen_ids) else ""
        if len(out) > 1:
            print(f"--- sample {i} ---")
        print(f"{text}{tail}")
    return 0
