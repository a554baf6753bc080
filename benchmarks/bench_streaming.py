"""Streaming GPTQ at real scale: an LLaDA-8B- or Dream-7B-shaped random checkpoint, quantized
block by block with peak memory and a per-block time breakdown.

    python benchmarks/bench_streaming.py --model llada-8b                 # all 32 layers
    python benchmarks/bench_streaming.py --model dream-7b                 # all 28 layers
    python benchmarks/bench_streaming.py --model llada-8b --layers 2 --shrink 4   # a quick check

Writes the random checkpoint once (converters/random_checkpoint.py: exact names, shapes,
bf16, 5 GB shards; `--shrink N` divides the width and heads by N) under --out, then runs
`quant.streaming.quantize_streaming` (GPTQ W4 g128, 8 x 256 calibration tokens by default),
writes the packed model one block at a time as the job does (`quant.streaming.save_packed`:
orbax, unquantized tensors in bf16), then loads it and runs one calibration window through it.
Prints and writes `report-<name>.json`:

- peak resident memory of the process (ru_maxrss) after each block and overall, each block's
  peak device memory where the backend reports it, and the checkpoint's size;
- per block: reading its tensors (read_s), the float calibration forward (forward_s), the
  Hessians (capture_s: each linear group's input with the earlier groups quantized, and its
  Gram matrix), the GPTQ calls (gptq_s), packing and staging (pack_s), the quantized block's
  output (output_s), writing the committed block (write_s), and the whole quantization
  (quantize_s);
- the ratio of quantize_s to the block's GPTQ calls plus one calibration forward, with the
  packing counted with GPTQ (`ratio`, as the first measurement did) and without it
  (`ratio_strict`);
- total wall time, the save of the packed model, and its load and one forward, with the peak
  resident memory after each.
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
    p.add_argument("--shrink", type=int, default=1, help="width and heads divided by N")
    p.add_argument("--no-save", action="store_true", help="skip saving and loading the "
                   "packed model")
    args = p.parse_args(argv)

    from flax import nnx

    from qdlm_jax.checkpoints.orbax_format import load_checkpoint
    from qdlm_jax.jobs.streaming import config_shim, quantize_streaming, save_packed
    from qdlm_jax.models.params import model_from_params
    from qdlm_jax.quant import CalibSpec, PTQSpec, QuantSpec, build_calibration

    name = f"{args.model}-{args.layers or 'all'}L" + (f"-shrink{args.shrink}"
                                                      if args.shrink > 1 else "")
    src = args.out / name
    t0 = time.time()
    if not (src / "config.json").is_file():
        print(f"writing {src} ...", flush=True)
        _random_checkpoint_module().write(args.model, src, layers=args.layers,
                                          shrink=args.shrink)
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
        if b.get("resumed"):
            continue
        one_forward = b.get("forward_s", 0.0)  # the float block's one calibration forward
        b["ratio"] = b["quantize_s"] / (b.get("gptq_s", 0.0) + b.get("pack_s", 0.0)
                                        + one_forward)
        b["ratio_strict"] = b["quantize_s"] / (b.get("gptq_s", 0.0) + one_forward)
    save_s = load_s = None
    rss_save = rss_load = None
    if not args.no_save:
        t2 = time.time()
        packed = args.out / f"{name}-packed-w{args.bits}g{args.group}"
        save_packed(src, work, packed)  # one block at a time, floats in the source dtype
        save_s = time.time() - t2
        rss_save = peak_rss_gib()
        # What a user does next: load the packed model and run it (one window's forward).
        t3 = time.time()
        cfg, params = load_checkpoint(packed)
        graphdef, state = nnx.split(model_from_params(cfg, params))
        del params
        logits = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))(
            state, jax.numpy.asarray(windows[:1]))  # as the project's loops: split state
        finite = bool(jax.numpy.isfinite(logits).all())
        load_s = time.time() - t3
        rss_load = peak_rss_gib()
        print(f"packed model loaded and run in {load_s:.1f}s: logits {logits.shape}, "
              f"finite={finite}", flush=True)
        del state, logits
    report = {
        "model": args.model, "layers": config.num_layers, "shrink": args.shrink,
        "hidden": config.hidden_size, "intermediate": config.intermediate_size,
        "checkpoint_gib": ckpt_bytes / 2**30,
        "calibration": f"{args.samples} x {args.tokens} tokens", "method": f"GPTQ W{args.bits} "
        f"g{args.group}", "checkpoint_write_s": write_s, "quantize_s": quant_s,
        "resumed_at": stats["resumed_at"], "save_s": save_s, "load_and_forward_s": load_s,
        "peak_rss_gib": peak_rss_gib(), "peak_rss_after_quantize_gib": rss_quant,
        "peak_rss_after_save_gib": rss_save, "peak_rss_after_load_and_forward_gib": rss_load,
        "peak_rss_before_quantize_gib": rss_before, "blocks": blocks,
        "total_wall_s": time.time() - t1,  # quantization, save, load and one forward
    }
    timed = [b for b in blocks if "ratio" in b]
    for key in ("ratio", "ratio_strict"):
        report[f"mean_{key}"] = float(np.mean([b[key] for b in timed])) if timed else None
        later = [b[key] for b in timed if b["block"] > timed[0]["block"]]  # no compiling
        report[f"mean_{key}_after_first_block"] = float(np.mean(later)) if later else None
    (args.out / f"report-{name}.json").write_text(json.dumps(report, indent=2))
    keys = ("read_s", "forward_s", "capture_s", "gptq_s", "pack_s", "output_s", "write_s",
            "quantize_s", "ratio", "ratio_strict", "peak_rss_gib", "anon_rss_gib",
            "file_rss_gib")
    print("| block | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for b in blocks:
        print(f"| {b['block']} | " + " | ".join(f"{b.get(k, 0.0):.2f}" for k in keys) + " |")
    print(json.dumps({k: v for k, v in report.items() if k != "blocks"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
