"""Random-weight checkpoints with a real model's exact names, shapes, dtype and shard layout.

    python converters/random_checkpoint.py llada-8b runs/llada-8b-random            # 32 layers
    python converters/random_checkpoint.py dream-7b runs/dream-7b-2l --layers 2
    python converters/random_checkpoint.py llada-tiny runs/llada-tiny               # for tests
    python converters/random_checkpoint.py llada-8b runs/llada-8b-narrow --layers 2 --shrink 4
    python converters/random_checkpoint.py dream-tiny runs/dream-tiny-qwen2 --vocab dream
    python converters/random_checkpoint.py diffusion-gemma-26b-a4b runs/dg-2l       # 2 of 30 layers
    python converters/random_checkpoint.py diffusion-gemma-26b-a4b runs/dg --layers 30 --vocab gemma
    python converters/random_checkpoint.py diffusion-gemma-tiny runs/dg-tiny        # for tests

Writes config.json (the hub's own keys), `model-0000i-of-0000n.safetensors` shards of at most
--max-shard-gb with `model.safetensors.index.json`, in bf16 (or --dtype), plus the bundled
tokenizer (its vocabulary is smaller than the real one: real-scale runs never decode text),
or with `--vocab dream` Dream's real tokenizer (the Qwen2 vocabulary from llama.cpp's vocab
files, fetched at first use, with Dream's added tokens, special ids and chat template) and a
vocabulary of Dream-7B's size.
Tensors are drawn one at a time (N(0, 0.02), norms 1) and written shard by shard, so memory
stays at one shard. Real-scale quantization and conversion runs need no download.

DiffusionGemma (`diffusion-gemma-26b-a4b`: V 262144, H 2816, 16 query heads, sliding layers
8 KV x 256, full layers 2 KV x 512 with K = V, dense I 2112, 128 experts top-8 of I 704,
window 1024, canvas 256) writes the tensors transformers' `save_pretrained` writes for the
text model, with the hub's names and shapes (experts [E, 2I, H] and [E, H, I]), plus a
`generation_config.json` with the sampler's defaults. `--layers N` keeps N of its 30 layers
(default 2) in its layer pattern (every 6th layer full, the last one full: 2 layers are one
sliding + one full). Its tensors are streamed to disk in pieces of at most 16 M values, so
memory stays at one piece (a 2-layer checkpoint is 4.8 GB in bf16, all 30 layers 50.5 GB).
`--vocab gemma` adds Gemma 4's real tokenizer (llama.cpp's vocabulary file, fetched at first
use); `diffusion-gemma-tiny` is the same layout at test size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

MODELS = ("llada-8b", "dream-7b", "llada-tiny", "dream-tiny", "diffusion-gemma-26b-a4b",
          "diffusion-gemma-tiny")
GEMMA_MODELS = ("diffusion-gemma-26b-a4b", "diffusion-gemma-tiny")
_PIECE_VALUES = 1 << 24  # values drawn at once for a DiffusionGemma tensor
_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def model_config(name: str, layers: int | None, dtype: str, shrink: int = 1):
    from qdlm_jax.checkpoints.random_init import tiny_config
    from qdlm_jax.models.config import dream_7b, llada_8b
    from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b

    if name in GEMMA_MODELS:
        if shrink > 1:
            raise SystemExit("--shrink is for the dense models; DiffusionGemma keeps its widths")
        make = (diffusion_gemma_26b_a4b if name == "diffusion-gemma-26b-a4b"
                else lambda **k: tiny_config("diffusion_gemma", **k))
        return make(num_layers=layers or 2, dtype=dtype, param_dtype=dtype)

    make = {"llada-8b": llada_8b, "dream-7b": dream_7b,
            "llada-tiny": lambda **k: tiny_config("llada", **k),
            "dream-tiny": lambda **k: tiny_config("dream", **k)}[name]
    over = {"param_dtype": dtype, "dtype": dtype}
    if layers is not None:
        over["num_layers"] = layers
    config = make(**over)
    if shrink > 1:  # the same layout, narrower: width and heads / shrink, head_dim kept
        c = config
        if c.num_heads % shrink or c.num_kv_heads % shrink or c.intermediate_size % shrink:
            raise SystemExit(f"--shrink {shrink}: must divide the heads ({c.num_heads}), kv "
                             f"heads ({c.num_kv_heads}) and intermediate size "
                             f"({c.intermediate_size})")
        config = c.replace(hidden_size=c.num_heads // shrink * c.head_dim,
                           num_heads=c.num_heads // shrink,
                           num_kv_heads=c.num_kv_heads // shrink,
                           intermediate_size=c.intermediate_size // shrink)
    return config


def write(name: str, out: Path, *, layers: int | None = None, dtype: str = "bfloat16",
          max_shard_gb: float = 5.0, seed: int = 0, tokenizer: Path | None = None,
          shrink: int = 1, vocab: str = "bundled") -> Path:
    from qdlm_jax.checkpoints.hf import config_to_hf, expected_shape, key_map
    from qdlm_jax.checkpoints.safetensors_io import write_safetensors
    from qdlm_jax.fsutil import atomic_dir
    from qdlm_jax.models.config import dream_7b

    config = model_config(name, layers, dtype, shrink)
    if name in GEMMA_MODELS:
        return write_gemma(config, out, max_shard_gb=max_shard_gb, seed=seed,
                           tokenizer=tokenizer, vocab=vocab)
    if vocab == "gemma":
        raise SystemExit("--vocab gemma is for the DiffusionGemma models")
    if vocab == "dream":  # Dream-7B's vocabulary size and special ids
        d = dream_7b()
        config = config.replace(**{f: getattr(d, f) for f in (
            "vocab_size", "mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id",
            "eot_token_id")})
    mappings = key_map(config)
    limit = int(max_shard_gb * 2**30)
    itemsize = np.dtype(_NP[dtype]).itemsize
    shards, current, size = [], [], 0
    for m in mappings:
        shape = expected_shape(config, m.path)
        n = int(np.prod(shape)) * itemsize
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(m)
        size += n
    shards.append(current)
    rng = np.random.default_rng(seed)

    def tensor(m):
        shape = expected_shape(config, m.path)
        if m.transpose:
            shape = shape[::-1]  # hub Linear weights are [out, in]
        if m.path[-1] == "scale":
            return np.ones(shape, _NP[dtype])
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(_NP[dtype])

    with atomic_dir(out) as tmp:
        weight_map, total = {}, 0
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            items = [(m.hf_name, tensor(m)) for m in group]
            total += sum(a.nbytes for _, a in items)
            write_safetensors(tmp / fname, items, {"format": "pt"})
            weight_map.update({m.hf_name: fname for m in group})
            print(f"  {fname}: {len(group)} tensors", flush=True)
            del items
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
        if vocab == "dream":
            from qdlm_jax.data.llamacpp_vocab import write_dream_tokenizer
            write_dream_tokenizer(tmp)
            return out
        tok = tokenizer or Path(__file__).resolve().parents[1] / "assets/tiny-llada/tokenizer.json"
        if tok.is_file():
            shutil.copy2(tok, tmp / "tokenizer.json")
    return out


def write_gemma(config, out: Path, *, max_shard_gb: float = 5.0, seed: int = 0,
                tokenizer: Path | None = None, vocab: str = "bundled") -> Path:
    """A DiffusionGemma hub checkpoint of `config` (module docstring), streamed to disk."""
    from qdlm_jax.checkpoints.random_init import (
        gemma_generation_config,
        gemma_hub_shapes,
        gemma_tensor_kind,
    )
    from qdlm_jax.checkpoints.safetensors_io import write_safetensors_chunked
    from qdlm_jax.fsutil import atomic_dir

    if vocab == "dream":
        raise SystemExit("--vocab dream is for the dense models; use --vocab gemma")
    if vocab == "gemma":
        config = config.replace(vocab_size=262_144, pad_token_id=0, bos_token_id=2,
                                eos_token_ids=(1,))
    dt = np.dtype(_NP[config.param_dtype])
    shapes = gemma_hub_shapes(config)
    limit = int(max_shard_gb * 2**30)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * dt.itemsize
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    rng = np.random.default_rng(seed)

    def pieces(name):
        shape = shapes[name]
        if gemma_tensor_kind(name) in ("scale", "qk_norm"):
            yield np.ones(shape, dt)
            return
        rows = max(1, _PIECE_VALUES // max(1, int(np.prod(shape[1:]))))
        for i in range(0, shape[0], rows):
            part = (min(rows, shape[0] - i),) + tuple(shape[1:])
            yield (0.02 * rng.standard_normal(part, np.float32)).astype(dt)

    with atomic_dir(out) as tmp:
        weight_map, total = {}, 0
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors_chunked(tmp / fname, [(k, shapes[k], dt) for k in group], pieces,
                                      {"format": "pt"})
            total += sum(int(np.prod(shapes[k])) * dt.itemsize for k in group)
            weight_map.update({k: fname for k in group})
            print(f"  {fname}: {len(group)} tensors", flush=True)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps(gemma_generation_config(config), indent=2))
        if vocab == "gemma":
            from qdlm_jax.data.llamacpp_vocab import write_gemma_tokenizer
            write_gemma_tokenizer(tmp)
        elif tokenizer is not None:
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=MODELS)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real model "
                   "(DiffusionGemma: default 2, one sliding + one full)")
    p.add_argument("--dtype", choices=sorted(_NP), default="bfloat16")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--vocab", choices=("bundled", "dream", "gemma"), default="bundled",
                   help="bundled: the tiny models' tokenizer (none for DiffusionGemma); dream / "
                        "gemma: Dream's / Gemma 4's real tokenizer and vocabulary size (fetched "
                        "from the llama-cpp-python sdist)")
    p.add_argument("--shrink", type=int, default=1, help="hidden size, heads and intermediate "
                   "size divided by this (head_dim and vocabulary kept): a narrower model of "
                   "the same layout for quick runs")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists")
    write(args.model, args.out, layers=args.layers, dtype=args.dtype,
          max_shard_gb=args.max_shard_gb, seed=args.seed, tokenizer=args.tokenizer,
          vocab=args.vocab, shrink=args.shrink)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
