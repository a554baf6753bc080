"""qdlm export SRC DST --format gptq | compressed-tensors: a packed model in a serving engine's
checkpoint layout.

A format holds only what it can represent (`gptq_format.GPTQ_FORMAT`, `ct_format.CT_FORMAT`);
a model it cannot write faithfully (online transforms, K/V quantization, binary planes, mixed
settings, and for GPTQ activation quantization and packed experts) is refused with one line
before anything is written."""

from __future__ import annotations

from pathlib import Path

NAME = "export"
HELP = ("write a packed model in the Hugging Face GPTQ layout (weight-only RTN / GPTQ / AWQ; "
        "read by transformers' GPTQ integration) or the compressed-tensors layout (weights "
        "and 8-bit per-token activations; read by transformers' compressed-tensors "
        "integration with dequantize=True); `qdlm convert` handles float checkpoints")


def add_arguments(p):
    p.add_argument("src", help="a packed model (the model/ dir of a `qdlm quantize` run)")
    p.add_argument("dst", help="output directory; written only if the export completes")
    p.add_argument("--format", choices=("gptq", "compressed-tensors"), default="gptq",
                   help="checkpoint layout (default: gptq: 2/4/8-bit weight-only, one bits / "
                        "group size / symmetry per model; compressed-tensors: 2-8-bit weights, "
                        "optional 8-bit dynamic per-token activations, one scheme per model)")
    p.add_argument("--dequantize-experts", action="store_true",
                   help="compressed-tensors: write packed DiffusionGemma experts dequantized "
                        "in the model's dtype (transformers cannot load them packed)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args, overrides):
    from qdlm_jax.checkpoints import ct_format, gptq_format
    from qdlm_jax.checkpoints.load import load_params, resolve_checkpoint
    from qdlm_jax.data.hf_tokenizer import tokenizer_files
    from qdlm_jax.errors import CheckpointError, ConfigOverrideError

    if overrides:
        raise ConfigOverrideError(f"{overrides[0]}: qdlm export takes no --config overrides")
    src, dst = resolve_checkpoint(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite to replace it)")
    if args.dequantize_experts and args.format != "compressed-tensors":
        raise CheckpointError("--dequantize-experts applies to --format compressed-tensors")
    config, params = load_params(src)
    extra = tokenizer_files(src)
    if args.format == "gptq":
        gptq_format.save_gptq(config, params, dst, extra_files=extra, overwrite=args.overwrite)
        q = gptq_format.quantization_config(params)
        print(f"exported {src} -> {dst} (GPTQ, {q['bits']}-bit, group {q['group_size']}, "
              f"sym={q['sym']}, desc_act={q['desc_act']})")
        return 0
    ct_format.save_compressed_tensors(config, params, dst, extra_files=extra,
                                      dequantize_experts=args.dequantize_experts,
                                      overwrite=args.overwrite)
    print(f"exported {src} -> {dst} ({ct_format.describe(config, params)})")
    return 0
