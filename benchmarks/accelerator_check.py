"""One command that checks the project on a GPU or TPU within a time budget, and reports.

    make accel-check                                        # installs nothing heavy, then runs
    python3 benchmarks/accelerator_check.py --out runs/accel_check --budget-s 420
    python3 benchmarks/accelerator_check.py --cpu-smoke     # every section at tiny shapes
    python3 benchmarks/accelerator_check.py --section-budget kernels=200 --sections kernels

One script of about 850 lines: its four sections share one time budget, context and report
(a section that fails or runs out of time leaves the others' results), and each is a
`run_<section>` function beside its plan dataclass.

Sections, in order, each with its own time budget (docs/hardware.md):

1. environment: device kind and count, memory, Python / JAX / jaxlib / PJRT plugin versions,
   the Pallas backend, a measured device copy bandwidth and bf16 matmul rate.
2. kernels: at LLaDA-8B's layer shapes (K x N = 4096x4096, 4096x12288, 12288x4096) and M =
   1, 16, 128, 2048 tokens, each `qmatmul` implementation that runs here natively (xla, and
   pallas_gpu or pallas_tpu) for W4A16 g128, W8A16 g128, W8A8 and W4A4, against a bf16 dense
   matmul: time, speed-up over bf16, max relative error against the XLA path (max |y - y_xla|
   / max |y_xla|), and the memory-bound time (bytes moved / the device's bandwidth).
   A timed call runs the op over several copies of the weight (enough bytes to overflow the
   last-level cache) in a device loop of about 20 ms; a one-round call is subtracted, so
   the host's dispatch cancels out (`time_op`).
3. generation: a 4-layer model with LLaDA-8B's shapes and random weights (N(0, 0.02),
   norms 1, as converters/random_checkpoint.py draws them, built on the device), bf16, batch
   1 and 8, prompt 512, gen 256, block 32, 256 steps: tokens/s and forward passes per token
   for the decoding modes none, prefix, dual and dual + threshold 0.9, bf16 weights against
   RTN W4 g128 packed weights; peak device memory.
4. quantization: GPTQ W4 g128 of one LLaDA-8B-shaped block on 8 x 256 calibration tokens
   (the layer-wise driver's `quantize_block`): Hessian accumulation and GPTQ seconds, cold
   (with compilation) and warm, and the projection to 32 blocks.
5. moe: recorded as skipped (this version has no MoE model family).

After every row the report is rewritten to <out>/accel_report.json and accel_report.md, so a
run cut short keeps everything it finished. A section that raises is recorded as failed with
its error, and the next section runs. A case that raises inside a section (a kernel that
fails to compile, say) is recorded in its row, and the section goes on. Budgets: --budget-s
for the whole run; each section gets its share of the time left (its --section-budget
against the budgets of the sections still to run), and a section past its share stops its
remaining cases and lists them. The exit status is 1 if a section failed.

Where JAX finds no GPU or TPU, the script says so in one line and runs the CPU smoke mode:
the same sections at tiny shapes, in well under a minute.

One file past 500 lines on purpose: each section is a short function over the shared plan,
budget and report, and reading the whole check in one place is what a user on a new machine
needs; the report and the installer live beside it (accel_report.py, accel_install.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from accel_report import Budget, Column, Report, SectionRecord  # noqa: E402
from flax import nnx  # noqa: E402

from qdlm_jax.inference.generate import GenerationConfig, generate_with_nfe  # noqa: E402
from qdlm_jax.kernels import platform_default, qmatmul, select_implementation, use_implementation  # noqa: E402
from qdlm_jax.models.config import ModelConfig, llada_8b  # noqa: E402
from qdlm_jax.models.dllm import Block, abstract_model  # noqa: E402
from qdlm_jax.models.params import block_from_params, flatten, model_from_params  # noqa: E402
from qdlm_jax.quant import packing  # noqa: E402
from qdlm_jax.quant.block import block_inputs_from_x  # noqa: E402
from qdlm_jax.quant.calibration import CalibBatch  # noqa: E402
from qdlm_jax.quant.layerwise import PTQSpec, quantize_block  # noqa: E402
from qdlm_jax.quant.qarray import QuantizedArray  # noqa: E402
from qdlm_jax.quant.quantizer_core import QuantSpec  # noqa: E402
from qdlm_jax.quant.rtn import rtn_quantize_params  # noqa: E402

GIB = 2 ** 30

# HBM bandwidth (GB/s) by device kind, from the vendors' data sheets; the first key that is a
# substring of the lower-cased device kind wins. Elsewhere the measured copy bandwidth is used.
BANDWIDTH_GBPS = (
    ("h200", 4800.0), ("h100 nvl", 3900.0), ("h100 pcie", 2000.0), ("h100", 3350.0),
    ("a100-sxm4-80gb", 2039.0), ("a100 80gb pcie", 1935.0), ("a100", 1555.0), ("l4", 300.0),
    ("tpu v6 lite", 1640.0), ("tpu v5 lite", 819.0), ("tpu v5e", 819.0), ("tpu v5", 2765.0),
    ("tpu v4", 1200.0),
)


# ----- what to run ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    name: str
    bits: int
    group_size: int  # -1: per output channel
    sym: bool
    act_bits: int | None


KERNEL_CONFIGS = (
    KernelConfig("w4a16", 4, 128, False, None),
    KernelConfig("w8a16", 8, 128, True, None),
    KernelConfig("w8a8", 8, -1, True, 8),
    KernelConfig("w4a4", 4, -1, True, 4),
)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    shapes: tuple[tuple[int, int], ...]  # (K, N) of x[M, K] @ w[K, N]
    tokens: tuple[int, ...]  # M
    loop_s: float  # a timed call repeats the op in a device loop for about this long
    rounds: int  # timing rounds; the fastest counts
    copy_bytes: int  # weight copies per call: enough to hold this many bytes
    max_copies: int


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    config: ModelConfig
    batches: tuple[int, ...]
    prompt_len: int
    gen_length: int
    block_length: int
    steps: int
    modes: tuple[str, ...]  # names from MODES


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    config: ModelConfig  # one block of this model is quantized
    samples: int
    seq_len: int
    project_to_blocks: int


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    mode: str  # "full" | "cpu-smoke"
    kernels: KernelPlan
    generation: GenerationPlan
    quant: QuantPlan
    copy_mib: int  # environment: the measured device copy's size
    matmul_n: int  # environment: the measured bf16 matmul's size


def tiny_llada(**overrides) -> ModelConfig:
    """A small LLaDA-layout config whose widths take W4 g128 (hidden and SwiGLU 128)."""
    cfg = dict(family="llada", vocab_size=256, hidden_size=128, num_layers=2, num_heads=4,
               num_kv_heads=4, intermediate_size=128, rope_theta=500000.0, rms_norm_eps=1e-5,
               qkv_bias=False, rope_full_precision=True, mask_token_id=250, pad_token_id=251,
               eos_token_id=251, bos_token_id=252, eot_token_id=253,
               max_position_embeddings=512, dtype="bfloat16", param_dtype="bfloat16")
    cfg.update(overrides)
    return ModelConfig(**cfg)


FULL = CheckPlan(
    mode="full",
    kernels=KernelPlan(shapes=((4096, 4096), (4096, 12288), (12288, 4096)),
                       tokens=(1, 16, 128, 2048), loop_s=0.02, rounds=3, copy_bytes=128 * 2 ** 20,
                       max_copies=8),
    generation=GenerationPlan(config=llada_8b(num_layers=4), batches=(1, 8), prompt_len=512,
                              gen_length=256, block_length=32, steps=256,
                              modes=("none", "dual", "prefix", "dual + tau 0.9")),
    quant=QuantPlan(config=llada_8b(num_layers=1), samples=8, seq_len=256,
                    project_to_blocks=32),
    copy_mib=1024, matmul_n=8192)

SMOKE = CheckPlan(
    mode="cpu-smoke",
    kernels=KernelPlan(shapes=((256, 256), (256, 512), (512, 256)), tokens=(4,),
                       loop_s=0.002, rounds=1, copy_bytes=0, max_copies=1),
    generation=GenerationPlan(config=tiny_llada(num_layers=1), batches=(1,), prompt_len=16,
                              gen_length=16, block_length=8, steps=16,
                              modes=("none", "dual + tau 0.9")),
    quant=QuantPlan(config=tiny_llada(num_layers=1), samples=2, seq_len=16,
                    project_to_blocks=32),
    copy_mib=16, matmul_n=256)

SECTION_BUDGETS = {"environment": 20.0, "kernels": 140.0, "generation": 180.0,
                   "quantization": 75.0}
OTHER_SECTION_BUDGET = 60.0  # a section not named above
DEFAULT_BUDGET_S = 420.0
SMOKE_BUDGET_S = 120.0


@dataclasses.dataclass
class Context:
    """What the sections share: the plan, the device, and what earlier sections measured."""

    plan: CheckPlan
    budget: Budget  # the running section's
    device: object
    measured_gbps: float | None = None  # the environment section's copy bandwidth


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    run: Callable[[Context, SectionRecord], None] | None
    columns: tuple[Column, ...] = ()
    skip: str | None = None  # recorded as skipped with this note instead of running


# ----- helpers ----------------------------------------------------------------------------


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def table_bandwidth(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((gbps for key, gbps in BANDWIDTH_GBPS if key in kind), None)


def device_bandwidth(ctx: Context) -> tuple[float, str]:
    """(GB/s, where it comes from): the data sheet's figure for this device kind, else the
    measured copy bandwidth (measured now if the environment section did not run)."""
    table = table_bandwidth(ctx.device.device_kind)
    if table:
        return table, f"data sheet for {ctx.device.device_kind}"
    if ctx.measured_gbps is None:
        ctx.measured_gbps = measure_copy_gbps(ctx.plan.copy_mib * 2 ** 20)
    return ctx.measured_gbps, "measured copy"


def peak_memory_gib(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / GIB


def max_rel_err(y, ref) -> float:
    y, ref = jnp.asarray(y, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.max(jnp.abs(y - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def short_error(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, timeout=10,
                             capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ----- 1. environment ---------------------------------------------------------------------


def measure_copy_gbps(n_bytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by an in-place `v + 1` over an n_bytes f32 array."""
    bump = jax.jit(lambda v: v + 1, donate_argnums=0)
    v = jax.block_until_ready(bump(jnp.ones((n_bytes // 4,), jnp.float32)))
    best, start = math.inf, time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = jax.block_until_ready(bump(v))
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > 2.0:  # a slow device: fewer repeats
            break
    return 2 * n_bytes / best / 1e9


def measure_matmul_tflops(n: int, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32
                                   ).astype(jnp.bfloat16))
    jax.block_until_ready(mm(a))
    best, start = math.inf, time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a))
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > 2.0:  # a slow device: fewer repeats
            break
    return 2 * n ** 3 / best / 1e12


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], timeout=20, capture_output=True,
                             text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pallas_backend(backend: str) -> str:
    if backend == "gpu":
        return "Triton (jax.experimental.pallas, Triton lowering bundled with jaxlib)"
    if backend == "tpu":
        return "Mosaic TPU (jax.experimental.pallas)"
    return "none natively; Pallas kernels run only in interpret mode here"


def run_environment(ctx: Context, rec: SectionRecord) -> None:
    d = ctx.device
    backend = jax.default_backend()
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    plugins = {n: version_of(n) for n in (
        "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
        "libtpu", "libtpu-nightly", "jax-rocm60-plugin")}
    items = [
        ("device kind", d.device_kind),
        ("devices", f"{jax.device_count()} x {d.platform} ({jax.process_count()} process)"),
        ("device memory (JAX's limit)",
         f"{stats['bytes_limit'] / GIB:.1f} GiB" if stats and "bytes_limit" in stats else None),
        ("nvidia-smi", nvidia_smi()),
        ("JAX backend", f"{backend}, platform version "
         f"{getattr(d.client, 'platform_version', '?')}"),
        ("python", platform.python_version()),
        ("jax", jax.__version__),
        ("jaxlib", version_of("jaxlib")),
        ("PJRT plugins", ", ".join(f"{n} {v}" for n, v in plugins.items() if v) or "none"),
        ("flax", version_of("flax")),
        ("Pallas backend", pallas_backend(backend)),
        ("qmatmul auto implementation", platform_default()),
        ("host CPUs", os.cpu_count()),
    ]
    for item, value in items:
        rec.add_row({"item": item, "value": value})
    table = table_bandwidth(d.device_kind)
    copy_gbps = measure_copy_gbps(ctx.plan.copy_mib * 2 ** 20)
    rec.add_row({"item": f"measured copy bandwidth ({ctx.plan.copy_mib} MiB f32 x + 1, read "
                         "+ write)", "value": f"{copy_gbps:.0f} GB/s"})
    rec.add_row({"item": "data-sheet bandwidth for this device kind",
                 "value": f"{table:.0f} GB/s" if table else "not in the table"})
    ctx.measured_gbps = copy_gbps
    n = ctx.plan.matmul_n
    rec.add_row({"item": f"measured bf16 matmul ({n}^3)",
                 "value": f"{measure_matmul_tflops(n):.1f} TFLOP/s"})


# ----- 2. kernels -------------------------------------------------------------------------


def random_qweight(rng: np.random.Generator, k: int, n: int,
                   cfg: KernelConfig) -> QuantizedArray:
    """A random packed weight with logical shape [K, N]: random packed bytes (every byte is a
    valid pair of 4-bit codes or one 8-bit code) and scales, drawn on the host, so nothing
    is compiled for it."""
    gs = k if cfg.group_size == -1 else cfg.group_size
    groups = k // gs

    def random_bytes(cols):
        return jnp.asarray(rng.integers(0, 256, (n, packing.packed_length(cols, cfg.bits)),
                                        dtype=np.uint8))

    scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, groups)).astype(np.float32), jnp.bfloat16)
    return QuantizedArray(packed=random_bytes(k), scale=scale,
                          zero=None if cfg.sym else random_bytes(groups), bits=cfg.bits,
                          group_size=gs, shape=(k, n), orientation="in_out")


def copies_of(w, plan: KernelPlan, nbytes: int) -> list:
    count = max(1, min(plan.max_copies, -(-plan.copy_bytes // max(nbytes, 1))))
    return [w] + [jax.tree.map(jnp.copy, w) for _ in range(count - 1)]


def _bf16_op(x, w):
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def looped(op):
    """jit(x, ws, reps) -> (op(x, ws[0]), checksum): `reps` rounds of op(x, w) for every w
    in ws inside one device loop. Each round's x depends on the previous round's outputs
    (an element of x is rewritten, to the same value, through a function of their sums), so
    no round can be hoisted out of the loop or skipped, and the host dispatches once."""

    @jax.jit
    def run(x, ws, reps):
        def body(_, carry):
            x, total = carry
            for w in ws:
                total = total + jnp.sum(op(x, w), dtype=jnp.float32)
            x = x.at[0, 0].set(jnp.where(jnp.isnan(total), jnp.zeros((), x.dtype), x[0, 0]))
            return x, total

        _, total = jax.lax.fori_loop(0, reps, body, (x, jnp.zeros((), jnp.float32)))
        return op(x, ws[0]), total

    return run


def time_op(fn, x, ws, *, loop_s: float, rounds: int):
    """(first call seconds (compile + run), seconds per op, op(x, ws[0])). The per-op time is
    the difference between a call of `reps` loop rounds and a call of one round (the
    fastest of `rounds` each), over (reps - 1) * len(ws) ops: the host's dispatch and the
    extra op cancel out. `reps` makes a call last about `loop_s`."""

    def call(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(x, ws, jnp.int32(reps)))
        return time.perf_counter() - t0, out

    first, (y0, _) = call(1)
    one = min(call(1)[0] for _ in range(rounds))
    reps = int(min(10_000, max(1, math.ceil(loop_s / one))))
    if reps == 1:
        return first, one / (len(ws) + 1), y0
    many = min(call(reps)[0] for _ in range(rounds))
    per_op = (many - one) / ((reps - 1) * len(ws))
    return first, per_op if per_op > 0 else one / (len(ws) + 1), y0


KERNEL_COLUMNS = (
    Column("shape", "K x N"), Column("m", "M"), Column("case", "case"),
    Column("impl", "implementation"), Column("copies", "copies"),
    Column("time_us", "time us", "f1"), Column("x_bf16", "x bf16", "x2"),
    Column("mem_bound_us", "mem-bound us", "f1"), Column("of_mem_bound", "of mem-bound", "pct"),
    Column("max_rel_err", "max rel err vs xla", "e"), Column("compile_s", "first call s", "f2"),
)


def run_kernels(ctx: Context, rec: SectionRecord) -> None:
    plan = ctx.plan.kernels
    impls = ["xla"] + ([platform_default()] if platform_default() != "xla" else [])
    gbps, source = device_bandwidth(ctx)
    rec.note(f"implementations timed: {', '.join(impls)}; memory-bound time = (x bf16 + "
             f"weight as stored + y bf16) bytes / {gbps:.0f} GB/s ({source}); time per op, "
             "the fastest of "
             f"{plan.rounds} calls, from a device loop of about {plan.loop_s * 1e3:.0f} ms over "
             "'copies' weight copies (so the weights come from memory, not the cache), less "
             "a one-round call; 'x bf16' = bf16 time / time")
    rng = np.random.default_rng(0)
    last_case_s = 0.0
    for k, n in plan.shapes:
        if not ctx.budget.allows(last_case_s):
            for m in plan.tokens:
                rec.skip_case(f"{k}x{n} M={m} (all cases)")
            continue
        dense = jnp.asarray(0.02 * rng.standard_normal((k, n), np.float32), jnp.bfloat16)
        weights = {c.name: random_qweight(rng, k, n, c) for c in KERNEL_CONFIGS}
        dense_copies = copies_of(dense, plan, dense.nbytes)
        qcopies = {c: copies_of(w, plan, w.nbytes) for c, w in weights.items()}
        for m in plan.tokens:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
            io_bytes = 2 * m * k + 2 * m * n
            cases = [("bf16", "xla", None)] + [(c.name, impl, c) for c in KERNEL_CONFIGS
                                               for impl in impls]
            t_bf16, y_xla = None, {}
            for name, impl, cfg in cases:
                label = f"{k}x{n} M={m} {name}" + (f" {impl}" if cfg else "")
                if not ctx.budget.allows(last_case_s):
                    rec.skip_case(label)
                    continue
                t_case = time.perf_counter()
                if cfg is None:
                    ws, nbytes, ran = dense_copies, dense.nbytes, "xla (dot)"
                    fn = looped(_bf16_op)
                else:
                    ws, nbytes = qcopies[name], weights[name].nbytes
                    ran, _ = select_implementation(x, weights[name], act_bits=cfg.act_bits,
                                                   implementation=impl)
                    fn = looped(lambda x, w, impl=impl, a=cfg.act_bits:
                                qmatmul(x, w, act_bits=a, implementation=impl))
                row = {"shape": f"{k}x{n}", "m": m, "case": name,
                       "impl": ran if ran == impl or cfg is None else f"{impl} -> {ran}",
                       "copies": len(ws),
                       "mem_bound_us": (io_bytes + nbytes) / (gbps * 1e9) * 1e6}
                try:
                    first, t, y0 = time_op(fn, x, ws, loop_s=plan.loop_s, rounds=plan.rounds)
                    row.update(compile_s=first, time_us=t * 1e6)
                    row["of_mem_bound"] = row["mem_bound_us"] / row["time_us"]
                    if cfg is None:
                        t_bf16 = t
                    if t_bf16:
                        row["x_bf16"] = t_bf16 / t
                    if cfg is not None and impl == "xla":
                        y_xla[name] = y0
                    elif cfg is not None and name in y_xla:
                        row["max_rel_err"] = max_rel_err(y0, y_xla[name])
                    del y0
                except Exception as e:  # noqa: BLE001 - a case that fails is a finding
                    row["error"] = short_error(e)
                rec.add_row(row)
                last_case_s = time.perf_counter() - t_case
        del dense, dense_copies, weights, qcopies
        gc.collect()
    summarize_kernels(rec)


def summarize_kernels(rec: SectionRecord) -> None:
    """One note per implementation and case: its speed-up range over bf16 at the smallest and
    largest M measured."""
    rows = [r for r in rec.rows if "x_bf16" in r and r["case"] != "bf16"]
    if not rows:
        return
    ms = sorted({r["m"] for r in rows})
    for m in (ms[0], ms[-1]) if len(ms) > 1 else (ms[0],):
        parts = []
        for case in [c.name for c in KERNEL_CONFIGS]:
            for impl in sorted({r["impl"] for r in rows if r["case"] == case}):
                xs = [r["x_bf16"] for r in rows
                      if r["m"] == m and r["case"] == case and r["impl"] == impl]
                if xs:
                    parts.append(f"{impl}:{case} {min(xs):.2f}-{max(xs):.2f}x")
        rec.note(f"M={m}, speed-up over bf16 across the shapes: " + "; ".join(parts))
    failed = [r for r in rec.rows if r.get("error")]
    if failed:
        rec.note(f"{len(failed)} case(s) raised; first: {failed[0]['shape']} M={failed[0]['m']} "
                 f"{failed[0]['case']} {failed[0]['impl']}: {failed[0]['error']}")


# ----- 3. generation ----------------------------------------------------------------------


def random_params(abstract: dict, key) -> dict:
    """Device arrays for a flat {path: ShapeDtypeStruct} dict: N(0, 0.02), norms ('scale') 1.
    One jitted function draws them all (one compilation)."""
    paths = sorted(abstract, key=str)

    @jax.jit
    def draw(key):
        out = {}
        for i, path in enumerate(paths):
            leaf = abstract[path]
            if path[-1] == "scale":
                out[path] = jnp.ones(leaf.shape, leaf.dtype)
            else:
                out[path] = (0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape,
                                                      jnp.float32)).astype(leaf.dtype)
        return out

    return draw(key)


def random_model_params(config: ModelConfig, seed: int = 0) -> dict:
    _, state = nnx.split(abstract_model(config))
    return random_params(flatten(nnx.to_pure_dict(state)), jax.random.key(seed))


MODES = (("none", "none", None), ("prefix", "prefix", None), ("dual", "dual", None),
         ("dual + tau 0.9", "dual", 0.9))
TAU_NOTE = ("random weights are never confident: tau commits one token per pass here (the "
            "fallback), so this row shows the threshold's cost, not its speed-up")

GENERATION_COLUMNS = (
    Column("batch", "batch"), Column("weights", "weights"), Column("mode", "mode"),
    Column("qmatmul", "qmatmul"), Column("first_call_s", "first call s (compile)", "f1"),
    Column("run_s", "run s", "g3"), Column("tokens_per_s", "tokens/s", "f1"),
    Column("x_none", "x none", "x2"), Column("fwd_per_token", "fwd/token", "f3"),
    Column("peak_mem_gib", "peak device GiB", "f2"), Column("note", "note"),
)


def prompt_ids(config: ModelConfig, batch: int, length: int) -> jax.Array:
    special = [t for t in (config.mask_token_id, config.pad_token_id, config.eos_token_id,
                           config.bos_token_id, config.eot_token_id) if t is not None]
    high = min(special + [config.vocab_size])
    rng = np.random.default_rng(batch)
    return jnp.asarray(rng.integers(0, high, (batch, length), dtype=np.int32))


def run_generation(ctx: Context, rec: SectionRecord) -> None:
    plan = ctx.plan.generation
    c = plan.config
    unknown = sorted(set(plan.modes) - {m[0] for m in MODES})
    if unknown:
        raise ValueError(f"generation modes {unknown}: expected names from "
                         f"{[m[0] for m in MODES]}")
    rec.note(f"model: LLaDA layout, {c.num_layers} layers, hidden {c.hidden_size}, "
             f"{c.num_heads} heads, SwiGLU {c.intermediate_size}, vocab {c.vocab_size}, "
             f"{c.param_dtype}, random weights; prompt {plan.prompt_len}, gen "
             f"{plan.gen_length}, block {plan.block_length}, {plan.steps} steps; W4 = RTN "
             "g128 packed linears (LM head and embedding bf16); 'run s' = the faster of up "
             "to 2 timed runs after the first call")
    params = random_model_params(c)
    models = {"bf16": model_from_params(c, params)}
    models["W4 g128"] = model_from_params(c, rtn_quantize_params(params,
                                                                 QuantSpec(bits=4,
                                                                           group_size=128)))
    del params
    w4_impl = platform_default()
    last_case_s = 0.0
    prompts = {b: prompt_ids(c, b, plan.prompt_len) for b in plan.batches}
    none_s: dict = {}  # (batch, weights) -> the no-cache run's seconds
    # Mode by mode (in the plan's order), so a budget cut loses the last modes everywhere
    # rather than a whole batch size.
    modes = [next(m for m in MODES if m[0] == name) for name in plan.modes]
    for mode, cache, tau in modes:
        for batch in plan.batches:
            for weights, model in models.items():
                label = f"batch {batch} {weights} {mode}"
                if not ctx.budget.allows(last_case_s):
                    rec.skip_case(label)
                    continue
                t_case = time.perf_counter()
                impl = w4_impl if weights != "bf16" else "-"
                row = {"batch": batch, "weights": weights, "mode": mode, "qmatmul": impl,
                       "note": TAU_NOTE if tau is not None else None}
                gen = GenerationConfig(steps=plan.steps, gen_length=plan.gen_length,
                                       block_length=plan.block_length, cache=cache,
                                       threshold=tau)
                try:
                    row.update(time_generation(model, prompts[batch], gen, impl))
                except Exception as e:  # noqa: BLE001 - recorded; W4 retries on the XLA path
                    if weights == "bf16" or impl == "xla":
                        row["error"] = short_error(e)
                    else:
                        w4_impl = "xla"
                        rec.note(f"W4 generation with qmatmul {impl} raised ({short_error(e)}); "
                                 "the W4 rows from here on run the XLA path")
                        row["qmatmul"] = f"{impl} failed -> xla"
                        try:
                            row.update(time_generation(model, prompts[batch], gen, "xla"))
                        except Exception as e2:  # noqa: BLE001
                            row["error"] = short_error(e2)
                if "run_s" in row:
                    if mode == "none":
                        none_s[batch, weights] = row["run_s"]
                    if (batch, weights) in none_s:
                        row["x_none"] = none_s[batch, weights] / row["run_s"]
                    row["tokens_per_s"] = batch * plan.gen_length / row["run_s"]
                    row["fwd_per_token"] = row["nfe"] / plan.gen_length
                row["peak_mem_gib"] = peak_memory_gib(ctx.device)
                rec.add_row(row)
                last_case_s = time.perf_counter() - t_case
    failed = [r for r in rec.rows if r.get("error")]
    if failed:
        rec.note(f"{len(failed)} case(s) raised; first: batch {failed[0]['batch']} "
                 f"{failed[0]['weights']} {failed[0]['mode']}: {failed[0]['error']}")


def time_generation(model, prompt, gen: GenerationConfig, impl: str) -> dict:
    """first_call_s (compile + one run), run_s (the faster of up to two more runs), nfe."""
    def once():
        with use_implementation(impl) if impl != "-" else contextlib.nullcontext():
            tokens, nfe = generate_with_nfe(model, prompt, config=gen)
            return jax.block_until_ready(tokens), int(nfe)

    t0 = time.perf_counter()
    _, nfe = once()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        once()
        runs.append(time.perf_counter() - t0)
        if runs[-1] > 1.0:  # long runs vary little; one is enough
            break
    return {"first_call_s": first, "run_s": min(runs), "nfe": nfe}


# ----- 4. quantization --------------------------------------------------------------------


QUANT_COLUMNS = (
    Column("run", "run"), Column("hessian_s", "Hessian accumulation s", "f2"),
    Column("gptq_s", "GPTQ s", "f2"), Column("pack_s", "pack s", "f2"),
    Column("forward_s", "float forward s", "f2"), Column("output_s", "quantized output s", "f2"),
    Column("total_s", "block total s", "f2"),
    Column("block_out_rel_err", "block output rel err", "g3"),
)


def run_quantization(ctx: Context, rec: SectionRecord) -> None:
    plan = ctx.plan.quant
    c = plan.config
    rec.note(f"one block: hidden {c.hidden_size}, {c.num_heads} heads, SwiGLU "
             f"{c.intermediate_size}, bf16, random weights; GPTQ W4 g128 asym (damp 0.01, "
             f"block 128) of its 7 linears on {plan.samples} x {plan.seq_len} random "
             "calibration activations; 'Hessian accumulation' = each linear group's input "
             "with the earlier groups quantized, and its Gram matrix")
    _, state = nnx.split(nnx.eval_shape(lambda: Block(c, 0, rngs=nnx.Rngs(0))))
    abstract = {("layers", 0) + p: v for p, v in flatten(nnx.to_pure_dict(state)).items()}
    params = random_params(abstract, jax.random.key(1))
    n, t = plan.samples, plan.seq_len
    calib = CalibBatch(ids=np.zeros((n, t), np.int32), attention_mask=np.ones((n, t), np.int32),
                       is_masked=np.zeros((n, t), bool),
                       token_weights=np.ones((n, t), np.float32),
                       mask_ratio=np.zeros((n,), np.float32))
    x = jax.random.normal(jax.random.key(2), (n, t, c.hidden_size), jnp.bfloat16)
    inputs = block_inputs_from_x(x, c, calib)
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=4, group_size=128))
    last_case_s = 0.0
    warm = None
    for run in ("cold (compiles)", "warm"):
        if not ctx.budget.allows(last_case_s):
            rec.skip_case(run)
            continue
        block = block_from_params(c, 0, params)
        timings: dict = {}
        t0 = time.perf_counter()
        _, stats = quantize_block(block, inputs, inputs.x, 0, spec, timings=timings)
        total = time.perf_counter() - t0
        last_case_s = total
        row = {"run": run, "hessian_s": timings.get("capture_s"), "gptq_s": timings.get("gptq_s"),
               "pack_s": timings.get("pack_s"), "forward_s": timings.get("forward_s"),
               "output_s": timings.get("output_s"), "total_s": total,
               "block_out_rel_err": stats.get("block_out_rel_err")}
        rec.add_row(row)
        warm = row
        del block
    if warm is not None:
        b = plan.project_to_blocks
        rec.note(f"projection to {b} blocks from the '{warm['run']}' run: Hessians "
                 f"{b * (warm['hessian_s'] or 0):.1f} s, GPTQ {b * (warm['gptq_s'] or 0):.1f} s, "
                 f"whole blocks {b * warm['total_s']:.1f} s (reading the checkpoint and "
                 "writing the packed model not included)")


# ----- 5. MoE -----------------------------------------------------------------------------

MOE_SKIP = "skipped: no MoE family in this version"

SECTIONS = (
    Section("environment", "Environment", run_environment,
            (Column("item", "item"), Column("value", "value"))),
    Section("kernels", "Kernels at LLaDA-8B layer shapes", run_kernels, KERNEL_COLUMNS),
    Section("generation", "Generation: 4-layer LLaDA-8B-shaped model", run_generation,
            GENERATION_COLUMNS),
    Section("quantization", "Quantization: GPTQ W4 g128 of one LLaDA-8B-shaped block",
            run_quantization, QUANT_COLUMNS),
    Section("moe", "MoE: one DiffusionGemma-shaped layer's experts", None, skip=MOE_SKIP),
)


# ----- driver -----------------------------------------------------------------------------


def parse_section_budgets(items: list[str], names: tuple[str, ...]) -> dict[str, float]:
    budgets = {name: SECTION_BUDGETS.get(name, OTHER_SECTION_BUDGET) for name in names}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--section-budget {item!r}: expected NAME=SECONDS with NAME one "
                             f"of {', '.join(names)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"--section-budget {item!r}: {value!r} is not a number of "
                             "seconds") from None
    return budgets


def run_sections(report: Report, ctx: Context, sections, budgets: dict[str, float],
                 overall: Budget) -> bool:
    """Runs the sections in order; returns whether none failed. Each gets its share of the
    overall time left: its budget against the budgets of the sections still to run."""
    ok = True
    for i, section in enumerate(sections):
        left = overall.left()
        if section.skip is not None:
            rec = report.start(section.name, section.title, 0.0, section.columns)
            rec.note(section.skip)
            report.finish(rec, "skipped")
            continue
        if left <= 0:
            rec = report.start(section.name, section.title, 0.0, section.columns)
            rec.note("not run: the overall budget was spent before it started")
            report.finish(rec, "skipped")
            continue
        later = sum(budgets[s.name] for s in sections[i:] if s.skip is None)
        share = left * budgets[section.name] / later if later > 0 else left
        ctx.budget = Budget(share)
        rec = report.start(section.name, section.title, share, section.columns)
        print(f"[{section.name}] budget {share:.0f} s", flush=True)
        try:
            section.run(ctx, rec)
        except Exception as e:  # noqa: BLE001 - recorded; the next section runs
            ok = False
            report.finish(rec, "failed", error=short_error(e, 1000),
                          traceback="".join(traceback.format_exc().splitlines(True)[-30:]))
            print(f"[{section.name}] FAILED: {short_error(e)}", flush=True)
        else:
            partial = bool(rec.not_run) or any(r.get("error") for r in rec.rows)
            report.finish(rec, "partial" if partial else "ok")
            print(f"[{section.name}] {rec.status} in {rec.seconds:.1f} s", flush=True)
        gc.collect()
    return ok


def main(argv=None, sections=SECTIONS) -> int:
    names = tuple(s.name for s in sections)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "accel_check",
                   help="report folder (accel_report.json, accel_report.md)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"whole run (default {DEFAULT_BUDGET_S:.0f}; smoke {SMOKE_BUDGET_S:.0f})")
    p.add_argument("--section-budget", action="append", default=[], metavar="NAME=SECONDS",
                   help="a section's budget (defaults: " + ", ".join(
                       f"{k}={v:.0f}" for k, v in SECTION_BUDGETS.items()) + "); each "
                   "section gets this share of the time left")
    p.add_argument("--sections", default=",".join(names),
                   help="comma list of the sections to run, in their order")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="every section at tiny shapes (the mode a machine without an "
                        "accelerator runs)")
    p.add_argument("--full", action="store_true",
                   help="the real shapes even without an accelerator (slow on a CPU: to check "
                        "the script itself, with a small --budget-s)")
    args = p.parse_args(argv)
    chosen = args.sections.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(names)}")
    budgets = parse_section_budgets(args.section_budget, names)

    backend = jax.default_backend()
    smoke = args.cpu_smoke
    if args.full and smoke:
        p.error("--full and --cpu-smoke exclude each other")
    if backend not in ("gpu", "tpu") and not smoke and not args.full:
        print(f"No GPU or TPU found (JAX backend: {backend}): running the CPU smoke mode.",
              flush=True)
        smoke = True
    plan = SMOKE if smoke else FULL
    budget_s = args.budget_s if args.budget_s is not None else (
        SMOKE_BUDGET_S if smoke else DEFAULT_BUDGET_S)
    device = jax.devices()[0]
    meta = {"device": device.device_kind, "backend": backend, "mode": plan.mode,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None
                                                                  else sys.argv[1:])),
            "commit": git_commit(), "budget_s": budget_s}
    report = Report(args.out, meta)
    print(f"accelerator check: {device.device_kind} ({backend}), mode {plan.mode}, budget "
          f"{budget_s:.0f} s, report in {args.out}", flush=True)
    overall = Budget(budget_s)
    ctx = Context(plan=plan, budget=overall, device=device)
    selected = tuple(s for s in sections if s.name in chosen)
    ok = run_sections(report, ctx, selected, budgets, overall)
    print(f"report: {report.md_path} and {report.json_path.name}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
