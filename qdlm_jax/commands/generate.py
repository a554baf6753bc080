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


def run(args, overrides):
    from qdlm_jax.errors import ConfigOverrideError
    from qdlm_jax.inference.generate import GenerationConfig
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    from qdlm_jax.jobs.generate import GenerateSpec, run_generate

    config = load_config_file(args.config) if args.config else default_config()
    if "gen" not in config:
        raise ConfigOverrideError(f"--config {args.config}: no `gen` section")
    apply_overrides(config, overrides)
    gen_settings = config.gen.to_dict()
    chat = bool(gen_settings.pop("chat", False)) or args.chat
    try:
        gen = GenerationConfig.from_mapping(gen_settings)
    except (TypeError, ValueError) as e:
        raise ConfigOverrideError(f"gen: {e}") from None
    texts = run_generate(GenerateSpec(model=args.model, prompts=tuple(args.prompt), gen=gen,
                                      chat=chat, dtype=args.dtype, bos=not args.no_bos,
                                      progress=not args.no_progress))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return 0
