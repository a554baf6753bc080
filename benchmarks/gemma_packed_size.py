"""Packed size of DiffusionGemma 26B-A4B under weight-only RTN, without any weights.

    .venv/bin/python benchmarks/gemma_packed_size.py --bits 4 --group-size 64
    .venv/bin/python benchmarks/gemma_packed_size.py --bits 4 --group-size 64 --scales bfloat16

The plan (`quant/gemma_plan.py`) of the published shapes gives every tensor's kind and
action; the RTN pass itself (`quant/gemma_rtn.rtn_quantize_gemma`, coverage guard included)
runs under `jax.eval_shape` on abstract fp32 params, so the byte counts are those of the
arrays it would store: packed codes, scales (fp32 as `qdlm quantize` stores them, or
--scales) and zero points for the quantized tensors, bf16 for the kept ones. Prints the
coverage table and the sizes against bf16 (whole model, experts alone). Seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qdlm_jax  # noqa: E402, F401  (binds the packed types to their ops)
from qdlm_jax.models.diffusion_gemma import param_shapes  # noqa: E402
from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b  # noqa: E402
from qdlm_jax.quant.coverage import coverage_table  # noqa: E402
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, gemma_plan  # noqa: E402
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma  # noqa: E402
from qdlm_jax.quant.quantizer_core import QuantSpec  # noqa: E402


def packed_sizes(spec: GemmaPTQSpec, layers: int | None = None) -> dict:
    """{"plan", "bytes", "bf16_bytes", "expert_bytes", "expert_bf16_bytes"} of 26B-A4B (or
    its first `layers` layers) under `spec`."""
    config = diffusion_gemma_26b_a4b()
    if layers is not None:
        config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
    shapes = param_shapes(config)
    plan = gemma_plan(shapes, spec)
    abstract = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()}
    packed = jax.eval_shape(lambda ps: rtn_quantize_gemma(ps, spec)[0], abstract)
    sizes = {"bytes": 0, "bf16_bytes": 0, "expert_bytes": 0, "expert_bf16_bytes": 0}
    for t in plan.tensors:
        stored = (sum(math.prod(a.shape) * a.dtype.itemsize
                      for a in jax.tree.leaves(packed[t.path])) if t.quantized else 2 * t.params)
        sizes["bytes"] += stored
        sizes["bf16_bytes"] += 2 * t.params
        if t.kind.startswith("expert"):
            sizes["expert_bytes"] += stored
            sizes["expert_bf16_bytes"] += 2 * t.params
    return {"plan": plan, **sizes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--scales", default="float32", help="dtype of the stored scales")
    p.add_argument("--quantize-router", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="the first N of the 30 layers")
    args = p.parse_args(argv)
    spec = GemmaPTQSpec(weight=QuantSpec(bits=args.bits, group_size=args.group_size),
                        quantize_router=args.quantize_router, scale_dtype=args.scales)
    s = packed_sizes(spec, args.layers)
    print(coverage_table(s["plan"].rows()))
    print(f"W{args.bits} g{args.group_size}, {args.scales} scales: {s['bytes'] / 2**30:.2f} GiB "
          f"against {s['bf16_bytes'] / 2**30:.2f} GiB in bf16 = "
          f"{s['bytes'] / s['bf16_bytes']:.3f}x; experts "
          f"{s['expert_bytes'] / s['expert_bf16_bytes']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
