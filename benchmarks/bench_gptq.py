"""One-layer GPTQ: our jitted `gptq` vs eager PyTorch (AutoGPTQ's algorithm) vs qwix's GPTQ.

    .venv/bin/python benchmarks/bench_gptq.py                          # 1024x1024, 4096x4096
    .venv/bin/python benchmarks/bench_gptq.py --shapes 1024x1024,4096x4096,4096x12288
    .venv/bin/python benchmarks/bench_gptq.py --shapes 1024x1024 --no-qwix

Shapes are out x in. For each shape: W ~ N(0, 0.02) and H = 2/n X^T X from n = --tokens
random tokens with correlated channels (low-rank + diagonal covariance, a few outlier
channels); 4-bit, group 128, symmetric, damp 0.01, block 128, no act-order (QDLM's GPTQ).

Reported per shape:
  * ours: compile + first run (wall, from a cold jit cache), and run alone (best of --repeats)
  * eager PyTorch: `fasterquant` below, AutoGPTQ's column loop written for CPU (no CUDA
    synchronize), fp32, all cores; run time (best of --repeats; 1 run for the widest shape)
  * qwix 0.1.8 `contrib.gptq_core.quantize_weight` under `jax.jit` (1024x1024 only, with
    --qwix-timeout): its column loop is unrolled at trace time, so compile dominates
  * ratios, code agreement with PyTorch, and the fraction of the machine's measured fp32
    matmul rate (a jitted 4096^3 matmul) that the run reaches, counting AutoGPTQ's work
    out*in^2 (triangular lazy updates, 2 flops per multiply-add) + 4/3*in^3 (Cholesky,
    inverse, Cholesky) for both; "own work" counts what ours computes, out*in^2 + in^3/3
    (one Cholesky, no inverse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qdlm_jax.quant.gptq_core import gptq  # noqa: E402

# --------------------------------------------------------------------------------------
# Eager PyTorch reference: AutoGPTQ's GPTQ.fasterquant + Quantizer, CPU, fp32.
# --------------------------------------------------------------------------------------


def torch_find_params(x, maxq, sym):
    zero_t = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], zero_t)
    xmax = torch.maximum(x.max(1)[0], zero_t)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def torch_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q


@torch.no_grad()
def torch_fasterquant(W, H, *, bits, group_size, sym, blocksize=128, percdamp=0.01):
    """AutoGPTQ fasterquant (actorder=False, static_groups=False). Returns (Q, codes)."""
    maxq = 2 ** bits - 1
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    scale, zero = torch_find_params(W, maxq, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = torch_find_params(W[:, (i1 + i):(i1 + i + group_size)], maxq, sym)
            q, c = torch_quantize(w.unsqueeze(1), scale, zero, maxq)
            q, c = q.flatten(), c.flatten()
            Q1[:, i] = q
            C1[:, i] = c
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q, codes


# --------------------------------------------------------------------------------------


def make_problem(out, n_in, tokens, seed=0):
    rng = np.random.default_rng(seed)
    rank = 32
    basis = rng.standard_normal((n_in, rank)).astype(np.float32) / math.sqrt(rank)
    x = rng.standard_normal((tokens, rank)).astype(np.float32) @ basis.T
    x += 0.5 * rng.standard_normal((tokens, n_in)).astype(np.float32)
    x[:, rng.choice(n_in, 8, replace=False)] *= 20.0  # outlier channels
    h = (2.0 / tokens) * (x.T @ x)
    w = (0.02 * rng.standard_normal((out, n_in))).astype(np.float32)
    return w, h.astype(np.float32)


def best_of(fn, repeats):
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return min(times), res


def matmul_gflops(n=4096, repeats=3):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    t, _ = best_of(lambda: f(a, a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


QWIX_SNIPPET = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
from qwix._src.core import qarray
from qwix.contrib import gptq_core
d = np.load(sys.argv[1])
w, h = jnp.asarray(d["w"]), jnp.asarray(d["h"])
how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: 128})
f = jax.jit(lambda w, h: gptq_core.quantize_weight(w, h, how, blocksize=128, percdamp=0.01))
t0 = time.perf_counter(); lowered = f.lower(w, h); t1 = time.perf_counter()
compiled = lowered.compile(); t2 = time.perf_counter()
jax.block_until_ready(compiled(w, h)); t3 = time.perf_counter()
jax.block_until_ready(compiled(w, h)); t4 = time.perf_counter()
print(json.dumps({"trace": t1 - t0, "compile": t2 - t1, "first_run": t3 - t2, "run": t4 - t3}))
"""


def run_qwix(w, h, timeout):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.npz")
        np.savez(path, w=w, h=h)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", QWIX_SNIPPET, path], timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = wall
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1024x1024,4096x4096",
                   help="comma-separated out x in shapes (add 4096x12288 for LLaDA's ff_out)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-qwix", action="store_true")
    p.add_argument("--qwix-timeout", type=float, default=900.0)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sym = not args.asym
    kw = dict(bits=args.bits, group_size=args.group_size, sym=sym)

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cpus {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    gflops = matmul_gflops()
    print(f"measured fp32 matmul (jit 4096^3): {gflops:.1f} GFLOP/s")
    print(f"settings: {args.bits}-bit, group {args.group_size}, "
          f"{'sym' if sym else 'asym'}, damp 0.01, block 128, {args.tokens} tokens\n")

    rows = []
    for out, n_in in shapes:
        w, h = make_problem(out, n_in, args.tokens)
        wj, hj = jnp.asarray(w), jnp.asarray(h)
        jax.clear_caches()
        t0 = time.perf_counter()
        res = gptq(wj, hj, **kw)
        jax.block_until_ready(res)
        ours_cold = time.perf_counter() - t0
        reps = args.repeats if n_in * out < 4096 * 12288 else 1
        ours_run, res = best_of(lambda: jax.block_until_ready(gptq(wj, hj, **kw)), reps)

        wt, ht = torch.from_numpy(w), torch.from_numpy(h)
        torch_run, (q_t, codes_t) = best_of(lambda: torch_fasterquant(wt, ht, **kw), reps)
        agree = float(np.mean(np.asarray(res.codes) == codes_t.numpy().astype(np.int32)))
        flops = out * n_in ** 2 + 4 / 3 * n_in ** 3
        own_flops = out * n_in ** 2 + n_in ** 3 / 3
        row = dict(shape=f"{out}x{n_in}", ours_compile_plus_run=ours_cold, ours_run=ours_run,
                   torch_run=torch_run, torch_over_ours=torch_run / ours_run,
                   code_agreement=agree, ours_frac_of_matmul=flops / ours_run / 1e9 / gflops,
                   ours_own_work_frac=own_flops / ours_run / 1e9 / gflops,
                   torch_frac_of_matmul=flops / torch_run / 1e9 / gflops)
        if not args.no_qwix and (out, n_in) == (1024, 1024):
            q = run_qwix(w, h, args.qwix_timeout)
            row["qwix"] = q
            if "error" not in q:
                qwix_total = q["trace"] + q["compile"] + q["first_run"]
                row["qwix_compile_plus_run"] = qwix_total
                row["qwix_over_ours_incl_compile"] = qwix_total / ours_cold
        rows.append(row)
        print(f"[{row['shape']}] ours: compile+run {ours_cold:.2f} s, run {ours_run:.3f} s | "
              f"eager torch: {torch_run:.3f} s ({row['torch_over_ours']:.2f}x ours) | "
              f"codes agree {agree:.5f} | of matmul peak: ours {row['ours_frac_of_matmul']:.1%}"
              f" (own work {row['ours_own_work_frac']:.1%}), torch "
              f"{row['torch_frac_of_matmul']:.1%}", flush=True)
        if "qwix" in row:
            q = row["qwix"]
            if "error" in q:
                print(f"[{row['shape']}] qwix: {q['error']}")
            else:
                print(f"[{row['shape']}] qwix: trace {q['trace']:.1f} s + compile "
                      f"{q['compile']:.1f} s + run {q['first_run']:.2f} s = "
                      f"{row['qwix_compile_plus_run']:.1f} s "
                      f"({row['qwix_over_ours_incl_compile']:.1f}x ours incl. compile); "
                      f"run alone {q['run']:.3f} s", flush=True)

    print("\n| shape (out x in) | ours compile+run (s) | ours run (s) | eager torch run (s) | "
          "torch / ours | qwix compile+run (s) | qwix / ours (incl. compile) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        qc = r.get("qwix_compile_plus_run")
        qr = r.get("qwix_over_ours_incl_compile")
        qerr = r.get("qwix", {}).get("error")
        print(f"| {r['shape']} | {r['ours_compile_plus_run']:.2f} | {r['ours_run']:.3f} | "
              f"{r['torch_run']:.3f} | {r['torch_over_ours']:.2f} | "
              f"{f'{qc:.1f}' if qc else (qerr or '-')} | {f'{qr:.0f}x' if qr else '-'} |")


if __name__ == "__main__":
    main()
