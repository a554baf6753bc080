"""qdlm generate --model PATH --prompt TEXT: sample with the model family's algorithm
(LLaDA's or Dream's masked-diffusion sampler, DiffusionGemma's entropy-bound sampler).

`--model` is a checkpoint directory or a hub id; the prompt is encoded by the checkpoint's
tokenizer (`load_tokenizer`) and framed with its BOS, or, with `--chat` (`gen.chat=true`),
put through its chat template as one user message. The output is cut at the checkpoint's
stop ids (EOS, the end of turn, its generation config's EOS ids).

The generation settings come from an ml-collections config with a `gen` section
(`--config configs/generate.py`, default: the built-in defaults, which are the same values),
overridden with `--config.gen.KEY=VALUE`. They become a frozen `GenerationConfig` before the
jitted loop is built. A DiffusionGemma checkpoint's sampler takes its `generation_config.json`,
overridden by the `gemma` section (`--config.gemma.steps=24`; None keeps the checkpoint's
value), and `gen.seed`. Stages are reported with timings: loading, compiling (ahead of time),
running (with a per-step bar driven by `jax.debug.callback` unless --no-progress).
"""

from __future__ import annotations

import dataclasses

NAME = "generate"
DEFAULT_CONFIG = "configs/generate.py"  # its keys are listed under --help
HELP = ("generate text with a LLaDA, Dream or DiffusionGemma checkpoint (published samplers, "
        "one jitted loop)")


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
    c.gemma = ml_collections.ConfigDict(GEMMA_DEFAULTS)
    return c


# DiffusionGemma sampler overrides: None keeps the checkpoint's generation config value
GEMMA_DEFAULTS = dict(max_new_tokens=None, steps=None, entropy_bound=None, t_min=None,
                      t_max=None, stability_threshold=None, confidence_threshold=None,
                      greedy=False)


def gemma_overrides(config) -> tuple[tuple[str, object], ...]:
    """The `gemma` section's settings that differ from GEMMA_DEFAULTS, as (name, value)."""
    section = config.get("gemma")
    if section is None:
        return ()
    items = section.to_dict()
    return tuple((k, v) for k, v in items.items() if v != GEMMA_DEFAULTS.get(k, object()))


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
                                      progress=not args.no_progress,
                                      gemma=gemma_overrides(config)))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return 0
