"""Convert a LLaDA / Dream / DiffusionGemma checkpoint between the Hugging Face hub layout and
qdlm's format.

    python converters/convert.py GSAI-ML-LLaDA-8B-Instruct/ runs/llada-8b --dtype bfloat16
    python converters/convert.py runs/llada-8b runs/llada-8b-hf --to hf --max-shard-gb 5
    python converters/convert.py Dream-v0-Instruct-7B/ runs/dream-7b --mesh 8   # onto 8 devices
    python converters/convert.py diffusiongemma-26B-A4B-it/ runs/dg --mesh 8 --expert 4

SRC is a hub checkpoint directory (config.json + safetensors or pytorch_model*.bin, one file
or shards with an index) or a qdlm checkpoint; DST appears only when the whole conversion
succeeded. `--mesh N` places every tensor straight onto its tensor-parallel sharding over N
devices while reading (each device receives only its slice), as a multi-device job would load
it; `--expert E` puts E of those N devices on an expert axis (DiffusionGemma's routed experts
are split over it, `models/sharding.py`). The tokenizer files and `generation_config.json`
beside SRC are copied along. A DiffusionGemma hub checkpoint is read text only (its vision
tower is dropped, with one line saying how many tensors); `--to hf` writes the tensors
transformers' `save_pretrained` writes for the text model. The same conversion is
`qdlm convert`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=("qdlm", "hf"), default="qdlm")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast float tensors (default: keep the stored dtype)")
    p.add_argument("--mesh", type=int, default=None, metavar="N",
                   help="load onto a tensor-parallel mesh of N devices")
    p.add_argument("--expert", type=int, default=1, metavar="E",
                   help="with --mesh: E of the N devices on an expert axis (routed experts)")
    p.add_argument("--max-shard-gb", type=float, default=None, help="--to hf: shard size")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from qdlm_jax.checkpoints import orbax_format
    from qdlm_jax.checkpoints.hf import save_hf
    from qdlm_jax.checkpoints.load import load_params
    from qdlm_jax.data.hf_tokenizer import tokenizer_files
    from qdlm_jax.errors import CheckpointError
    from qdlm_jax.models.dllm import count_params
    from qdlm_jax.models.sharding import make_mesh

    if args.dst.exists() and not args.overwrite:  # before reading gigabytes
        raise SystemExit(f"{args.dst}: already exists (pass --overwrite to replace it)")
    t0 = time.time()
    if args.mesh and args.mesh % args.expert:
        raise SystemExit(f"--expert {args.expert} does not divide --mesh {args.mesh}")
    mesh = make_mesh(model=args.mesh // args.expert, expert=args.expert) if args.mesh else None
    try:
        config, params = load_params(args.src, dtype=args.dtype, mesh=mesh, progress=True)
        extra = tokenizer_files(args.src)
        if args.to == "hf":
            shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
            save_hf(config, params, args.dst, max_shard_bytes=shard, extra_files=extra,
                    overwrite=args.overwrite)
        else:
            orbax_format.save_checkpoint(args.dst, config, params, extra_files=extra,
                                         overwrite=args.overwrite)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.src} -> {args.dst} ({args.to}): {config.family}, "
          f"{count_params(params):,} params, {config.param_dtype}, {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
