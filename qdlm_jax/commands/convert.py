"""qdlm convert SRC DST: HF checkpoint dir -> our orbax checkpoint (or back with --to hf)."""

from __future__ import annotations

import time
from pathlib import Path

NAME = "convert"
HELP = "convert a HF checkpoint dir to a qdlm checkpoint (orbax), or back with --to hf"


def add_arguments(p):
    p.add_argument("src", help="HF checkpoint directory (or a qdlm checkpoint with --to hf)")
    p.add_argument("dst", help="output directory; written only if conversion completes")
    p.add_argument("--to", choices=("qdlm", "hf"), default="qdlm",
                   help="output format: qdlm (orbax, default) or hf (config.json + safetensors)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast float params (default: keep the stored dtype)")
    p.add_argument("--max-shard-gb", type=float, default=None,
                   help="with --to hf: split safetensors into shards of at most this size")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args, overrides):
    from qdlm_jax.checkpoints import orbax_format as checkpoint
    from qdlm_jax.checkpoints.hf import save_hf
    from qdlm_jax.checkpoints.load import load_params, resolve_checkpoint
    from qdlm_jax.data.hf_tokenizer import tokenizer_files
    from qdlm_jax.errors import CheckpointError
    from qdlm_jax.models.dllm import count_params

    if overrides:
        raise ValueError(f"convert takes no --config overrides, got {overrides}")
    src, dst = resolve_checkpoint(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:  # before reading a checkpoint of gigabytes
        raise CheckpointError(f"{dst}: already exists (use --overwrite to replace it)")
    t0 = time.time()
    config, params = load_params(src, dtype=args.dtype, progress=True)
    extra = tokenizer_files(src)
    if args.to == "hf":
        max_bytes = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
        save_hf(config, params, dst, max_shard_bytes=max_bytes, extra_files=extra,
                overwrite=args.overwrite)
    else:
        checkpoint.save_checkpoint(dst, config, params, extra_files=extra,
                                   overwrite=args.overwrite)
    n = count_params(params)
    print(f"converted {src} -> {dst} ({args.to}): {config.family}, {n:,} params, "
          f"{config.param_dtype}, {time.time() - t0:.1f}s")
    return 0
