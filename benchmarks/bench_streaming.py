"""Streaming GPTQ at real scale: an LLaDA-8B- or Dream-7B-shaped random checkpoint, quantized
block by block with peak memory and a per-block time breakdown.

    python benchmarks/bench_streaming.py --model llada-8b                 # all 32 layers
    python benchmarks/bench_streaming.py --model dream-7b --layers 4 --out runs/bench_stream

Writes the random checkpoint once (converters/random_checkpoint.py: exact names, shapes,
bf16, 5 GB shards) under --out, then runs `quant.streaming.quantize_streaming` (GPTQ W4 g128,
8 x 256 calibration tokens by default), assembles the packed model and saves it as the job
does (orbax, unquantized tensors in bf16). Prints and writes `report.json`:

- peak resident memory of the process (ru_maxrss) and the checkpoint's size;
- per block: reading its tensors, plain calibration forwards, Gram captures, GPTQ (with
  packing), writing; and the ratio of the block's quantization time to the sum of its GPTQ
  calls plus one calibration forward (the overhead the pass adds around the math);
- total wall time, and the assembly and save of the packed model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _random_checkpoint_module():
    spec = importlib.util.spec_from_file_location(
        "random_checkpoint", ROOT / "converters" / "random_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("llada-8b", "dream-7b"), default="llada-8b")
    p.add_argument("--layers", type=int, default=None, help="default: the real count")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_streaming")
    p.add_argument("--no-save", action="store_true", help="skip assembling and saving")
    args = p.parse_args(argv)

    from qdlm_jax.checkpoints.orbax_format import save_checkpoint
    from qdlm_jax.quant import CalibSpec, PTQSpec, QuantSpec, build_calibration
    from qdlm_jax.quant.streaming import assemble, config_shim, quantize_streaming

    name = f"{args.model}-{args.layers or 'all'}L"
    src = args.out / name
    t0 = time.time()
    if not (src / "config.json").is_file():
        print(f"writing {src} ...", flush=True)
        _random_checkpoint_module().write(args.model, src, layers=args.layers)
    write_s = time.time() - t0
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rss_before = peak_rss_gib()

    from qdlm_jax.checkpoints.hf import load_hf_config
    config = load_hf_config(src / "config.json")
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.mask_token_id, (args.samples, args.tokens)).astype(np.int32)
    calib = build_calibration(config_shim(config), windows,
                              CalibSpec(mode="clean", n_samples=args.samples,
                                        seq_len=args.tokens))
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=args.bits, group_size=args.group))
    work = args.out / f"{name}-work-w{args.bits}g{args.group}"
    timings: dict = {}
    t1 = time.time()
    _, stats = quantize_streaming(src, calib, spec, work, timings=timings)
    quant_s = time.time() - t1
    rss_quant = peak_rss_gib()
    blocks = timings.get("blocks", [])
    for b in blocks:
        one_forward = b.get("forward_s", 0.0) / 2  # the pass runs two plain forwards
        b["ratio_to_gptq_plus_forward"] = b["quantize_s"] / (b.get("gptq_s", 0.0) + one_forward)
    save_s = None
    if not args.no_save:
        t2 = time.time()
        cfg, params = assemble(src, work)
        stored = {k: v.astype(cfg.param_dtype) if isinstance(v, jax.Array) and
                  jax.numpy.issubdtype(v.dtype, jax.numpy.floating) else v
                  for k, v in params.items()}
        save_checkpoint(args.out / f"{name}-packed-w{args.bits}g{args.group}", cfg, stored,
                        overwrite=True)
        save_s = time.time() - t2
        del params, stored
    report = {
        "model": args.model, "layers": config.num_layers, "checkpoint_gib": ckpt_bytes / 2**30,
        "calibration": f"{args.samples} x {args.tokens} tokens", "method": f"GPTQ W{args.bits} "
        f"g{args.group}", "checkpoint_write_s": write_s, "quantize_s": quant_s,
        "resumed_at": stats["resumed_at"], "assemble_and_save_s": save_s,
        "peak_rss_gib": peak_rss_gib(), "peak_rss_after_quantize_gib": rss_quant,
        "peak_rss_before_quantize_gib": rss_before, "blocks": blocks,
        "mean_ratio_to_gptq_plus_forward": float(np.mean(
            [b["ratio_to_gptq_plus_forward"] for b in blocks])) if blocks else None,
    }
    (args.out / f"report-{name}.json").write_text(json.dumps(report, indent=2))
    keys = ("read_s", "forward_s", "capture_s", "gptq_s", "write_s", "quantize_s",
            "ratio_to_gptq_plus_forward")
    print("| block | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for b in blocks:
        print(f"| {b['block']} | " + " | ".join(f"{b.get(k, 0.0):.2f}" for k in keys) + " |")
    print(json.dumps({k: v for k, v in report.items() if k != "blocks"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
