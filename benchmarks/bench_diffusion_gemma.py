"""DiffusionGemma at 26B-A4B's shapes: checkpoint load, one canvas of generation, and the
experts, ours against transformers side by side on this machine.

    python converters/random_checkpoint.py diffusion-gemma-26b-a4b /tmp/dg-2l   # 4.8 GB
    .venv/bin/python benchmarks/bench_diffusion_gemma.py /tmp/dg-2l
    .venv/bin/python benchmarks/bench_diffusion_gemma.py /tmp/dg-2l --steps 4 --repeats 1
    .venv/bin/python benchmarks/bench_diffusion_gemma.py --experts-only

The checkpoint has DiffusionGemma 26B-A4B's exact names and shapes (vocabulary 262144,
width 2816, 128 experts top-8 of width 704) but 2 of its 30 layers (one sliding, one full)
and random bf16 weights. Each side runs in its own process, one after the other, so each
peak resident memory is its own:

  * load: `load_model(dir, dtype)` against `DiffusionGemmaForBlockDiffusion.from_pretrained(
    dir, dtype=...)`: wall time and peak resident memory of the process.
  * generate: one canvas (256 tokens) after a prompt of --prompt tokens, --steps denoising
    steps with the early stop off, greedy draws and the same injected uniform noise on both
    sides (transformers' sampler patched as in tests/references/diffusion_gemma_reference.py):
    our jitted sampler (compiled ahead of time; best of --repeats runs) against transformers'
    `generate` (best of --repeats); tokens/s and whether the tokens agree.
  * experts (in the parent): one canvas of tokens through one MoE layer's experts, our
    `jax.lax.ragged_dot` on expert-sorted tokens against the dense all-experts computation,
    both jitted, fp32: time and max difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CANVAS = 256


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _inputs(config, prompt: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config["vocab_size"], (1, prompt))
    noise = rng.integers(0, config["vocab_size"], (1, steps + 1, 1, CANVAS))
    return ids, noise


def _settings(steps: int):
    from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings
    return GemmaSampleSettings(max_new_tokens=CANVAS, steps=steps, canvas_length=CANVAS,
                               stability_threshold=None, confidence_threshold=None,
                               eos_ids=(), pad_id=0, greedy=True)


def side_ours(args) -> dict:
    import jax

    from qdlm_jax import load_model
    from qdlm_jax.inference.diffusion_gemma import gemma_sample_call

    t0 = time.perf_counter()
    model = load_model(args.dir, dtype=args.dtype)
    jax.block_until_ready(jax.tree.leaves(model))
    load_s = time.perf_counter() - t0
    load_peak = _peak_gib()
    c = model.config
    ids, noise = _inputs({"vocab_size": c.vocab_size}, args.prompt, args.steps)
    fn, fargs, static = gemma_sample_call(model, ids, settings=_settings(args.steps),
                                          noise=noise)
    t0 = time.perf_counter()
    compiled = fn.lower(*fargs, **static).compile()
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*fargs))
        runs.append(time.perf_counter() - t0)
    return dict(load_s=load_s, load_peak_gib=load_peak, compile_s=compile_s,
                run_s=min(runs), peak_gib=_peak_gib(),
                tokens=np.asarray(out.tokens)[0].tolist(),
                forward_passes=int(np.asarray(out.forward_passes)[0]))


def side_transformers(args) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from tests.references.diffusion_gemma_reference import hf_generate

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(args.dir, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    load_peak = _peak_gib()
    config = json.loads((Path(args.dir) / "config.json").read_text())["text_config"]
    ids, noise = _inputs(config, args.prompt, args.steps)
    mask = np.ones(ids.shape, bool)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens, tpf, _ = hf_generate(hf, ids, mask, noise, _settings(args.steps))
        runs.append(time.perf_counter() - t0)
    return dict(load_s=load_s, load_peak_gib=load_peak, run_s=min(runs), peak_gib=_peak_gib(),
                tokens=tokens[0].tolist(), forward_passes=int(round(CANVAS / float(tpf[0]))))


def bench_experts(args) -> dict:
    import jax
    import jax.numpy as jnp

    from qdlm_jax.models.experts import moe, moe_dense
    from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b

    c = diffusion_gemma_26b_a4b()
    e, h, i, k, n = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.top_k, CANVAS
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (n, h), jnp.float32)
    gate_up = jax.random.normal(keys[1], (e, h, 2 * i), jnp.float32) / h ** 0.5
    down = jax.random.normal(keys[2], (e, i, h), jnp.float32) / i ** 0.5
    logits = jax.random.normal(keys[3], (n, e))
    weights, top = jax.lax.top_k(jax.nn.softmax(logits), k)
    weights = weights / weights.sum(-1, keepdims=True)
    out = {}
    results = {}
    for name, f in (("ragged_dot", moe), ("dense", moe_dense)):
        fn = jax.jit(f).lower(x, gate_up, down, top, weights).compile()
        results[name] = jax.block_until_ready(fn(x, gate_up, down, top, weights))
        best = np.inf
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, gate_up, down, top, weights))
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_s"] = best
    out["max_abs_diff"] = float(jnp.max(jnp.abs(results["ragged_dot"] - results["dense"])))
    out["max_abs"] = float(jnp.max(jnp.abs(results["dense"])))
    out["shape"] = f"{n} tokens x {e} experts (top-{k}), H {h}, I {i}, fp32"
    return out


def _run_side(args, side: str) -> dict:
    cmd = [sys.executable, __file__, args.dir, "--side", side, "--steps", str(args.steps),
           "--prompt", str(args.prompt), "--repeats", str(args.repeats), "--dtype", args.dtype,
           "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{side} side failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", help="a diffusion-gemma-26b-a4b random checkpoint")
    p.add_argument("--steps", type=int, default=8, help="denoising steps of the canvas")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--experts-only", action="store_true")
    p.add_argument("--side", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        f = side_ours if args.side == "ours" else side_transformers
        print(json.dumps(f(args)))
        return
    if not args.experts_only:
        if not args.dir or not (Path(args.dir) / "config.json").is_file():
            sys.exit(f"{args.dir}: not a checkpoint directory (write one with "
                     "converters/random_checkpoint.py diffusion-gemma-26b-a4b DIR)")
        ours = _run_side(args, "ours")
        theirs = _run_side(args, "transformers")
        print(f"checkpoint {args.dir} ({args.dtype}); one canvas of {CANVAS} after "
              f"{args.prompt} prompt tokens, {args.steps} steps, greedy, injected noise")
        print(f"load      ours {ours['load_s']:7.1f} s  peak {ours['load_peak_gib']:5.1f} GiB"
              f" | transformers {theirs['load_s']:7.1f} s  peak "
              f"{theirs['load_peak_gib']:5.1f} GiB | time ratio "
              f"{theirs['load_s'] / ours['load_s']:.2f}x")
        tps_o, tps_t = CANVAS / ours["run_s"], CANVAS / theirs["run_s"]
        print(f"generate  ours {ours['run_s']:7.1f} s ({tps_o:.1f} tokens/s; compile "
              f"{ours['compile_s']:.1f} s) | transformers {theirs['run_s']:7.1f} s "
              f"({tps_t:.1f} tokens/s) | speed ratio {tps_o / tps_t:.2f}x")
        print(f"peak      ours {ours['peak_gib']:.1f} GiB | transformers "
              f"{theirs['peak_gib']:.1f} GiB")
        n = len(ours["tokens"])
        differ = sum(a != b for a, b in zip(ours["tokens"], theirs["tokens"]))
        agree = "identical" if differ == 0 and n == len(theirs["tokens"]) else \
            f"{differ} of {n} differ"
        print(f"tokens    {agree}; forward passes ours {ours['forward_passes']}, "
              f"transformers {theirs['forward_passes']}")
    ex = bench_experts(args)
    print(f"experts   {ex['shape']}: ragged_dot {ex['ragged_dot_s'] * 1e3:.1f} ms | dense "
          f"{ex['dense_s'] * 1e3:.1f} ms | ratio {ex['dense_s'] / ex['ragged_dot_s']:.1f}x; "
          f"max |diff| {ex['max_abs_diff']:.1e} (max |out| {ex['max_abs']:.1f})")


if __name__ == "__main__":
    main()
