"""qdlm export SRC DST --format gptq: a packed model in a serving engine's checkpoint layout.

A format holds only what it can represent (`gptq_format.GPTQ_FORMAT`); a model it cannot
write faithfully (online transforms, activation or K/V quantization, binary planes, mixed
settings) is refused with one line before anything is written."""

from __future__ import annotations

from pathlib import Path

NAME = "export"
HELP = ("write a packed weight-only model (RTN / GPTQ / AWQ) in the Hugging Face GPTQ layout "
        "(read by transformers' GPTQ integration); `qdlm convert` handles float checkpoints")


def add_arguments(p):
    p.add_argument("src", help="a packed model (the model/ dir of a `qdlm quantize` run)")
    p.add_argument("dst", help="output directory; written only if the export completes")
    p.add_argument("--format", choices=("gptq",), default="gptq",
                   help="checkpoint layout (default: gptq: 2/4/8-bit weights, one bits / group "
                        "size / symmetry per model; models with online transforms, activation "
                        "or K/V quantization or binary planes are refused)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args, overrides):
    from qdlm_jax.checkpoints.gptq_format import quantization_config, save_gptq
    from qdlm_jax.checkpoints.load import load_params, resolve_checkpoint
    from qdlm_jax.data.hf_tokenizer import tokenizer_files
    from qdlm_jax.errors import CheckpointError, ConfigOverrideError

    if overrides:
        raise ConfigOverrideError(f"{overrides[0]}: qdlm export takes no --config overrides")
    src, dst = resolve_checkpoint(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite to replace it)")
    config, params = load_params(src)
    extra = tokenizer_files(src)
    save_gptq(config, params, dst, extra_files=extra, overwrite=args.overwrite)
    q = quantization_config(params)
    print(f"exported {src} -> {dst} (GPTQ, {q['bits']}-bit, group {q['group_size']}, "
          f"sym={q['sym']}, desc_act={q['desc_act']})")
    return 0
