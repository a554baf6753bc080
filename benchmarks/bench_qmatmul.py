"""Low-bit matmul (`qdlm_jax.kernels.qmatmul`) vs a bf16 dot, against the roofline.

    .venv/bin/python benchmarks/bench_qmatmul.py                  # LLaDA-8B / Dream-7B layers
    .venv/bin/python benchmarks/bench_qmatmul.py --shapes small   # quick run (two small layers)
    .venv/bin/python benchmarks/bench_qmatmul.py --tokens 1,16 --configs w4a16,w8a8

For every layer shape (K x N), token count M (decode 1-16, prefill 256-2048) and weight
configuration, it times (median of --repeats after a warm-up, jitted, inputs on device):

  bf16         x[M, K] @ W[K, N], bf16 operands, fp32 accumulation (the baseline)
  <impl>:<cfg> qmatmul(x, w, act_bits, implementation=<impl>) for each implementation that
               runs natively here: xla always; pallas_tpu on a TPU; pallas_gpu on a GPU.
               cfg: w4a16 (4-bit, group 128, asym), w8a16 (8-bit, group 128, sym),
               w8a8 / w4a4 (per-channel symmetric weights, per-token activations)

and prints achieved TFLOP/s (2 M N K / t) and GB/s (ideal bytes: x in bf16 + the weight as
stored + y in bf16), the speedup over bf16 (t_bf16 / t), the speedup the roofline predicts
(t_roof_bf16 / t_roof), and the fraction of the roofline reached (t_roof / t), where
t_roof = max(flops / peak_compute, bytes / peak_bandwidth) and peak_compute is the int8 peak
for w8a8 / w4a4 (int8 MXU / tensor cores; 4-bit values ride in int8) and the bf16 peak
otherwise. Roofline numbers: H100 SXM and TPU v5e presets (by device kind), else measured on
this machine (large bf16 and int8 matmuls, a large array update); override with --peak-*.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qdlm_jax.kernels import platform_default, qmatmul  # noqa: E402
from qdlm_jax.quant.qarray import QuantizedArray  # noqa: E402

CONFIGS = {  # name: (bits, group_size (-1 = per channel), sym, act_bits)
    "w4a16": (4, 128, False, None),
    "w8a16": (8, 128, True, None),
    "w8a8": (8, -1, True, 8),
    "w4a4": (4, -1, True, 4),
}
SHAPES = {
    "real": ((4096, 4096), (4096, 12288), (12288, 4096),  # LLaDA-8B q/k/v/o, gate/up, down
             (3584, 512), (3584, 18944), (18944, 3584)),  # Dream-7B k/v, gate/up, down
    "small": ((1024, 1024), (1024, 4096)),
}
TOKENS = {"real": (1, 16, 256, 2048), "small": (1, 16, 256)}
# (bf16 TFLOP/s, int8 TOP/s, HBM GB/s), dense, from the vendors' data sheets.
PRESETS = {"H100": (989.0, 1979.0, 3350.0), "TPU v5e": (197.0, 394.0, 819.0)}


def preset_for(device_kind: str):
    kind = device_kind.lower()
    if "h100" in kind:
        return "H100", PRESETS["H100"]
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return "TPU v5e", PRESETS["TPU v5e"]
    return None, None


def timed(fn, *args, repeats: int, reduce=statistics.median) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return reduce(times)


def measure_peaks(repeats: int) -> tuple[float, float, float]:
    """(bf16 TFLOP/s, int8 TOP/s, GB/s) measured on the default device (best of `repeats`):
    2048^3 matmuls of each operand type (fp32 / int32 accumulation) and an in-place update
    of a 256 MiB array (read + write; donated, so no fresh allocation is timed)."""
    n = 2048
    rates = []
    for dtype, acc in ((jnp.bfloat16, jnp.float32), (jnp.int8, jnp.int32)):
        a = jnp.ones((n, n), dtype)
        mm = jax.jit(lambda a, acc=acc: jnp.dot(a, a, preferred_element_type=acc))
        rates.append(2 * n ** 3 / timed(mm, a, repeats=repeats, reduce=min) / 1e12)
    bump = jax.jit(lambda v: v + 1, donate_argnums=0)
    v = bump(jnp.ones((64 * 1024 * 1024,), jnp.float32))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = jax.block_until_ready(bump(v))
        times.append(time.perf_counter() - t0)
    return rates[0], rates[1], 2 * v.nbytes / min(times) / 1e9


def random_weight(rng, k: int, n: int, cfg: str) -> QuantizedArray:
    bits, group_size, sym, _ = CONFIGS[cfg]
    gs = k if group_size == -1 else group_size
    codes = jnp.asarray(rng.integers(0, 2 ** bits, (n, k), dtype=np.int32))
    scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // gs)), jnp.bfloat16)
    zero = None if sym else jnp.asarray(rng.integers(0, 2 ** bits, (n, k // gs)), jnp.float32)
    return QuantizedArray.from_codes(codes, scale, zero, bits=bits, group_size=gs, sym=sym)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    p.add_argument("--tokens", default=None, help="comma list (default: by --shapes)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="bf16 peak (TFLOP/s)")
    p.add_argument("--peak-int8-tops", type=float, help="int8 peak (TOP/s)")
    p.add_argument("--peak-gbps", type=float, help="memory bandwidth (GB/s)")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    name, peaks = preset_for(device.device_kind)
    if peaks is None:
        name, peaks = "measured here", measure_peaks(args.repeats)
    bf16_peak, int8_peak, gbps_peak = peaks
    bf16_peak = args.peak_tflops or bf16_peak
    int8_peak = args.peak_int8_tops or int8_peak
    gbps_peak = args.peak_gbps or gbps_peak
    impls = sorted({"xla", platform_default()})
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS[args.shapes]
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")

    print(f"device: {device.device_kind} ({jax.default_backend()}), implementations: {impls}")
    print(f"roofline ({name}): bf16 {bf16_peak:.3g} TFLOP/s, int8 {int8_peak:.3g} TOP/s, "
          f"memory {gbps_peak:.4g} GB/s")
    header = (f"{'M x K x N':>20} {'what':>16} {'time us':>10} {'TFLOP/s':>8} {'GB/s':>8} "
              f"{'x bf16':>7} {'roof x':>7} {'% roof':>7}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    bf16_fn = jax.jit(lambda x, w: jnp.einsum("mk,kn->mn", x, w,
                                              preferred_element_type=jnp.float32
                                              ).astype(x.dtype))
    for k, n in SHAPES[args.shapes]:
        w_bf16 = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
        weights = {cfg: random_weight(rng, k, n, cfg) for cfg in configs}
        for m in tokens:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            flops = 2 * m * n * k
            io_bytes = 2 * m * k + 2 * m * n

            def roof(weight_bytes, peak):
                return max(flops / (peak * 1e12), (io_bytes + weight_bytes) / (gbps_peak * 1e9))

            t_base = timed(bf16_fn, x, w_bf16, repeats=args.repeats)
            roof_base = roof(2 * k * n, bf16_peak)
            rows = [("bf16", t_base, 2 * k * n, roof_base)]
            for cfg in configs:
                w = weights[cfg]
                act_bits = CONFIGS[cfg][3]
                peak = int8_peak if act_bits else bf16_peak
                for impl in impls:
                    fn = jax.jit(lambda x, w, impl=impl, a=act_bits:
                                 qmatmul(x, w, act_bits=a, implementation=impl))
                    t = timed(fn, x, w, repeats=args.repeats)
                    rows.append((f"{impl}:{cfg}", t, w.nbytes, roof(w.nbytes, peak)))
            for what, t, weight_bytes, t_roof in rows:
                print(f"{f'{m} x {k} x {n}':>20} {what:>16} {t * 1e6:>10.1f} "
                      f"{flops / t / 1e12:>8.3f} {(io_bytes + weight_bytes) / t / 1e9:>8.1f} "
                      f"{t_base / t:>7.2f} {roof_base / t_roof:>7.2f} {100 * t_roof / t:>6.1f}%")
            print()


if __name__ == "__main__":
    main()
