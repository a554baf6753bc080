"""LLaDA generation: our jitted loop vs an eager PyTorch loop, side by side, on CPU.

    .venv/bin/python benchmarks/bench_generate.py            # batch 1 and 8
    .venv/bin/python benchmarks/bench_generate.py --batch 1 --steps 32   # quicker
    .venv/bin/python benchmarks/bench_generate.py --modes    # Fast-dLLM decoding modes

`--modes` (see `run_modes`) compares the decoding modes none / prefix / dual / dual + tau=0.9
on the bundled trained tiny LLaDA (assets/tiny-llada; prompt 512, gen 256, block 32, steps
256 by default), or a Dream checkpoint (`--model assets/tiny-dream`; "none" is Dream's plain
loop, alg entropy, the others Fast-dLLM's Dream block decoding): tokens/s, forward passes
per generated token, and the same modes run by the eager PyTorch statement of Fast-dLLM's
algorithm (tests/references/fast_dllm_reference.py) on the same weights, with whether the
tokens agree. `--fast-dllm DIR` (a checkout of NVlabs/Fast-dLLM; LLaDA) also runs
Fast-dLLM's own `llada/generate.py` functions (`generate`, `generate_with_prefix_cache`,
`generate_with_dual_cache`) over the same eager model through a small adapter. `--quant w4`
runs ours on RTN W4 packed weights (g128) instead (the eager side stays fp32, so tokens are
not compared).

The full measurement of issue 15 (figures in docs/generation.md; the 8B-shaped rows were run
with `--repeats 1 --threads 2 --no-eager --gen-length 64 --steps 64`, the no-cache rows
costing minutes per side), from the repository root:

    git clone https://github.com/NVlabs/Fast-dLLM /tmp/Fast-dLLM
    python converters/random_checkpoint.py llada-8b /tmp/llada8b-2l --layers 2 --dtype float32
    B=benchmarks/bench_generate.py
    .venv/bin/python $B --modes --repeats 2 --fast-dllm /tmp/Fast-dLLM       # tiny LLaDA
    .venv/bin/python $B --modes --repeats 2 --no-eager --quant w4
    .venv/bin/python $B --modes --repeats 2 --model assets/tiny-dream         # tiny Dream
    .venv/bin/python $B --modes --repeats 2 --model /tmp/llada8b-2l --fast-dllm /tmp/Fast-dLLM
    .venv/bin/python $B --modes --repeats 2 --model /tmp/llada8b-2l --no-eager --quant w4

(the 2-layer model with LLaDA-8B's layer shapes: hidden 4096, 32 heads, SwiGLU 12288,
vocab 126464, random weights; ~1.5 G parameters, ~6 GB in fp32 on each side.)

The model has the size of the project's tiny trained LLaDA (6 layers, width 256, 4 heads,
SwiGLU 768, vocab 4096) with random weights, written once as a hub-layout checkpoint and
loaded by both sides: ours through `load_model`, the eager side as a transformers Llama run
bidirectionally (tests/references/hf_reference.py) driving the published algorithm as stated in
tests/references/reference_algorithms.py (full logits every step, as the published code does).

For each batch size it reports:
  * ours: compile time (ahead of time, separately) and run time -> tokens/s
  * eager PyTorch: run time -> tokens/s, and the ratio
  * whether both produced the same tokens
  * `steps` bare forward passes of the same model in one jitted fori_loop (full logits,
    and hidden states + LM head on the current block only, which is what the loop needs),
    and the loop's overhead over them.
Timings are the best of --repeats interleaved rounds (ours, eager, bare, bare, ours, ...),
so load drifting on a shared machine hits every contender alike.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from qdlm_jax import load_model  # noqa: E402
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint  # noqa: E402
from qdlm_jax.inference.generate import GenerationConfig, compile_generate  # noqa: E402
from tests.references.hf_reference import reference_model  # noqa: E402
from tests.references.reference_algorithms import hf_forward, llada_generate_ref  # noqa: E402


def bench_config(args):
    return tiny_config("llada", vocab_size=args.vocab, hidden_size=args.width,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                       intermediate_size=args.ffn, mask_token_id=3, pad_token_id=0,
                       eos_token_id=2, bos_token_id=1, eot_token_id=None,
                       max_position_embeddings=512)


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "prompt_len", "block_length",
                                             "spb", "block_head"))
def bare_forwards(state, x, *, graphdef, steps, prompt_len, block_length, spb, block_head):
    """`steps` forward passes in one fori_loop; each step's input depends on the previous
    step (one token changes) so nothing is hoisted, and every logit feeds a reduction."""
    model = nnx.merge(graphdef, state)
    gen = x.shape[1] - prompt_len

    def body(i, carry):
        x, acc = carry
        if block_head:
            h = model.hidden_states(x)
            start = prompt_len + (i // spb) * block_length
            logits = model.logits(jax.lax.dynamic_slice_in_dim(h, start, block_length, 1))
        else:
            logits = model(x)
        acc = acc + jnp.sum(jnp.max(logits.astype(jnp.float32), axis=-1))
        pos = prompt_len + i % gen
        x = x.at[:, pos].set((x[:, pos] + 1) % model.config.vocab_size)
        return x, acc

    return jax.lax.fori_loop(0, steps, body, (x, jnp.float32(0.0)))[1]


def pick_torch_threads(args, torch_model, config):
    if args.threads:
        torch.set_num_threads(args.threads)
        return
    x = torch.randint(4, config.vocab_size, (max(args.batch), args.prompt_len + args.gen_length))
    best = None
    for n in range(1, torch.get_num_threads() + 1):
        torch.set_num_threads(n)
        with torch.no_grad():
            torch_model(input_ids=x)
            t, _ = best_of(lambda: torch_model(input_ids=x), 3)
        if best is None or t < best[0]:
            best = (t, n)
    torch.set_num_threads(best[1])


def run_batch(args, model, torch_model, batch):
    config = model.config
    rng = np.random.default_rng(batch)
    prompt = rng.integers(4, config.vocab_size, size=(batch, args.prompt_len)).astype(np.int32)
    gen = GenerationConfig(steps=args.steps, gen_length=args.gen_length,
                           block_length=args.block_length)
    n_tok = batch * args.gen_length
    print(f"\n== batch {batch}: prompt {args.prompt_len}, gen_length {args.gen_length}, "
          f"steps {args.steps}, block_length {args.block_length} ==", flush=True)

    # Compile everything first (timed separately).
    t0 = time.perf_counter()
    runner = compile_generate(model, prompt, config=gen)
    compile_s = time.perf_counter() - t0
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.concatenate(
        [prompt, np.full((batch, args.gen_length), config.mask_token_id, np.int32)], 1))
    spb = args.steps // (args.gen_length // args.block_length)
    bare, bare_compile = {}, {}
    for name, block_head in (("full logits", False), ("hidden + block head", True)):
        fn = functools.partial(bare_forwards, graphdef=graphdef, steps=args.steps,
                               prompt_len=args.prompt_len, block_length=args.block_length,
                               spb=spb, block_head=block_head)
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(state, x).compile()
        bare_compile[name] = time.perf_counter() - t0
        bare[name] = functools.partial(compiled, state, x)
    fwd = hf_forward(torch_model)

    # Run the contenders in interleaved rounds (a shared machine's load drifts); best of.
    runs = {"ours": lambda: np.asarray(jax.block_until_ready(runner())),
            "eager": lambda: llada_generate_ref(
                fwd, prompt, steps=args.steps, gen_length=args.gen_length,
                block_length=args.block_length, mask_id=config.mask_token_id).numpy(),
            **{name: (lambda f=f: jax.block_until_ready(f())) for name, f in bare.items()}}
    best, outs = {k: float("inf") for k in runs}, {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t, outs[name] = best_of(fn, 1)
            best[name] = min(best[name], t)
    ours_s, ref_s = best["ours"], best["eager"]
    print(f"ours (jitted loop):  compile {compile_s:6.2f}s   run {ours_s:7.3f}s   "
          f"{n_tok / ours_s:8.1f} tokens/s")
    print(f"eager PyTorch loop:                  run {ref_s:7.3f}s   "
          f"{n_tok / ref_s:8.1f} tokens/s")
    same = float((outs["ours"] == outs["eager"]).mean())
    print(f"speed-up ours / eager: {ref_s / ours_s:.2f}x   identical tokens: "
          f"{'yes' if same == 1.0 else f'no ({same:.1%} of positions equal)'}")
    for name in bare:
        print(f"{args.steps} bare forwards ({name:>19}): compile {bare_compile[name]:5.2f}s   "
              f"run {best[name]:7.3f}s   loop overhead {100 * (ours_s / best[name] - 1):+6.1f}%",
              flush=True)
    return dict(batch=batch, compile=compile_s, ours=ours_s, eager=ref_s, same=same,
                **{f"bare[{k}]": best[k] for k in bare})


MODES = (("none", "none", None), ("prefix", "prefix", None), ("dual", "dual", None),
         ("dual+tau0.9", "dual", 0.9))


def load_fast_dllm(repo: Path):
    """Fast-dLLM's own `llada/generate.py` from a checkout, imported without its model file
    (a stub stands in for `LLaDAModelLM`, which the functions do not use)."""
    import importlib.util
    import types
    path = Path(repo) / "llada" / "generate.py"
    if not path.is_file():
        raise SystemExit(f"--fast-dllm {repo}: no llada/generate.py there (a checkout of "
                         "https://github.com/NVlabs/Fast-dLLM)")
    stub = types.ModuleType("modeling_llada")
    stub.LLaDAModelLM = object
    pkg = types.ModuleType("fast_dllm_llada")
    pkg.__path__ = [str(path.parent)]
    for name in ("model", "fast_dllm_llada.model"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["model.modeling_llada"] = sys.modules["fast_dllm_llada.model.modeling_llada"] = stub
    sys.modules["fast_dllm_llada"] = pkg
    spec = importlib.util.spec_from_file_location("fast_dllm_llada.generate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FastDLLMAdapter:
    """The model interface Fast-dLLM's LLaDA functions call (`model(x, use_cache=,
    past_key_values=, replace_position=)` -> .logits, .past_key_values) over the eager
    `CachedLlama` of tests/references/fast_dllm_reference.py."""

    def __init__(self, cached):
        self.m = cached
        self.device = torch.device("cpu")

    def __call__(self, x, past_key_values=None, use_cache=False, replace_position=None):
        from types import SimpleNamespace
        if past_key_values is None:
            out = self.m(x, use_cache=use_cache)
            logits, cache = out if use_cache else (out, None)
        elif replace_position is not None:
            idx = replace_position[0].nonzero()[:, 0]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            logits, cache = self.m(x, start=lo, past=past_key_values,
                                   replace=(lo, hi)), past_key_values
        else:
            lo = past_key_values[0][0].shape[2]
            logits, cache = self.m(x, start=lo, past=past_key_values), None
        return SimpleNamespace(logits=logits, past_key_values=cache)


def fast_dllm_own(mod, adapter, prompt, *, cache, threshold, mask_id, **kw):
    fn = {"none": mod.generate, "prefix": mod.generate_with_prefix_cache,
          "dual": mod.generate_with_dual_cache}[cache]
    out = fn(adapter, torch.as_tensor(prompt, dtype=torch.long), temperature=0.0,
             remasking="low_confidence", mask_id=mask_id, threshold=threshold, **kw)
    return out if isinstance(out, tuple) else (out, None)


def _mode_prompt(tokenizer_path, length, vocab, batch):
    """`length` tokens of the bundled model card (repeated), so the trained model sees text."""
    ids = []
    try:
        from tokenizers import Tokenizer
        text = (Path(tokenizer_path).parent / "README.md").read_text()
        ids = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    except Exception:  # noqa: BLE001 - no tokenizer: random tokens
        pass
    if not ids:
        ids = list(np.random.default_rng(0).integers(4, vocab, length))
    ids = (ids * (length // len(ids) + 1))[:length]
    return np.tile(np.asarray(ids, np.int32)[None], (batch, 1))


def run_modes(args):
    """none / prefix / dual / dual+tau: ours (jitted), the eager Fast-dLLM statement and
    (--fast-dllm, LLaDA) Fast-dLLM's own code."""
    from qdlm_jax.inference.generate import generate_with_nfe
    from tests.references.fast_dllm_reference import (
        CachedLlama,
        fast_dllm_dream_ref,
        fast_dllm_generate_ref,
    )

    path = Path(args.model)
    model = load_model(path, dtype="float32")
    config = model.config
    reference = reference_model(path, config)
    eager_model = CachedLlama(reference, config)
    label = "fp32"
    if args.quant == "w4":
        from qdlm_jax.models.params import get_params, model_from_params
        from qdlm_jax.quant import QuantSpec, rtn_quantize_params
        qp = rtn_quantize_params(get_params(model), QuantSpec(bits=4, group_size=128))
        model = model_from_params(config, qp)
        label = "RTN W4 g128 packed"
    dream = config.family == "dream"
    own = None
    if args.fast_dllm:
        if dream:
            raise SystemExit("--fast-dllm: Fast-dLLM's own code is run for LLaDA only here")
        own = (load_fast_dllm(args.fast_dllm), FastDLLMAdapter(eager_model))
    args.batch = [1]
    pick_torch_threads(args, reference, config)  # --threads, else the fastest count
    prompt = _mode_prompt(path / "tokenizer.json", args.prompt_len, config.vocab_size, 1)
    n_tok = args.gen_length
    print(f"model: {path} ({config.num_layers} layers, width {config.hidden_size}, vocab "
          f"{config.vocab_size}), ours {label}; prompt {args.prompt_len}, gen "
          f"{args.gen_length}, block {args.block_length}, steps {args.steps}, batch 1")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); best of {args.repeats}")
    rows = []
    modes = [m for m in MODES if args.only is None or m[0] in args.only.split(",")]
    if not modes:
        raise SystemExit(f"--only {args.only}: expected names from {[m[0] for m in MODES]}")
    for name, cache, tau in modes:
        gen = GenerationConfig(steps=args.steps, gen_length=args.gen_length,
                               block_length=args.block_length, cache=cache, threshold=tau)
        if dream and cache == "none" and tau is None:  # Dream's plain loop has no blocks
            gen = GenerationConfig(steps=args.steps, gen_length=args.gen_length, alg="entropy")
        t0 = time.perf_counter()
        runner = compile_generate(model, prompt, config=gen)
        compile_s = time.perf_counter() - t0
        # Without a threshold every step is one forward; only tau needs the counting run.
        nfe = (generate_with_nfe(model, prompt, config=gen)[1] if tau is not None
               else args.steps)
        ours_s, out = best_of(lambda: np.asarray(jax.block_until_ready(runner())),
                              args.repeats)
        row = dict(mode=name, compile=compile_s, ours=ours_s, nfe=int(nfe))
        kw = dict(steps=args.steps, gen_length=args.gen_length,
                  block_length=args.block_length, mask_id=config.mask_token_id, cache=cache,
                  threshold=tau)
        eager_fn = None
        if dream and not (cache == "none" and tau is None):
            eager_fn = functools.partial(fast_dllm_dream_ref, eager_model, prompt, alg="entropy",
                                         **kw)
        elif not dream:
            eager_fn = functools.partial(fast_dllm_generate_ref, eager_model, prompt, **kw)
        if not args.no_eager and eager_fn is not None:
            eager_s, (ref, ref_nfe) = best_of(eager_fn, 1)
            row.update(eager=eager_s, eager_nfe=ref_nfe,
                       same=float((ref.numpy() == out).mean()))
        if own is not None:
            own_s, (ref, _) = best_of(lambda: fast_dllm_own(*own, prompt, **kw), 1)
            row.update(own=own_s, own_same=float((ref.numpy() == out).mean()))
        rows.append(row)
        print(f"{name:>12}: compile {compile_s:6.2f}s  run {ours_s:7.3f}s  "
              f"{n_tok / ours_s:8.1f} tok/s  {row['nfe'] / n_tok:.3f} fwd/token" +
              (f"  | eager {row['eager']:7.3f}s {n_tok / row['eager']:7.1f} tok/s"
               if 'eager' in row else "") +
              (f"  | Fast-dLLM's code {row['own']:7.3f}s {n_tok / row['own']:7.1f} tok/s"
               if 'own' in row else ""), flush=True)
    base = rows[0]["ours"]
    print("\nsummary (tokens/s = gen_length / run time; speed-up vs our no-cache loop):")
    print(f"{'mode':>12} {'ours tok/s':>11} {'speed-up':>9} {'fwd/token':>10} "
          f"{'eager tok/s':>12} {'ours/eager':>10} {'same tokens':>12}" +
          (f" {'Fast-dLLM tok/s':>16} {'ours/Fast-dLLM':>15} {'same tokens':>12}"
           if own is not None else ""))
    for r in rows:
        eager = (f"{n_tok / r['eager']:>12.1f} {r['eager'] / r['ours']:>9.2f}x "
                 f"{r['same']:>12.1%}") if "eager" in r else f"{'-':>12} {'-':>10} {'-':>12}"
        mine = (f" {n_tok / r['own']:>16.1f} {r['own'] / r['ours']:>14.2f}x "
                f"{r['own_same']:>12.1%}") if "own" in r else ""
        print(f"{r['mode']:>12} {n_tok / r['ours']:>11.1f} {base / r['ours']:>8.2f}x "
              f"{r['nfe'] / n_tok:>10.3f} {eager}{mine}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", action="store_true",
                   help="compare the decoding modes (cache / threshold) instead")
    p.add_argument("--model", default=str(ROOT / "assets" / "tiny-llada"),
                   help="--modes: hub-layout LLaDA or Dream checkpoint (default: the bundled "
                        "tiny LLaDA)")
    p.add_argument("--quant", choices=("none", "w4"), default="none",
                   help="--modes: run ours on RTN W4 packed weights")
    p.add_argument("--no-eager", action="store_true", help="--modes: skip the eager side")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="--modes: comma-separated subset of " + ",".join(m[0] for m in MODES))
    p.add_argument("--fast-dllm", type=Path, default=None,
                   help="--modes, LLaDA: a checkout of NVlabs/Fast-dLLM; also run its own "
                        "llada/generate.py functions on the same weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: whichever of 1 .. torch's default "
                        "runs a forward pass fastest; OpenMP spinning makes more threads "
                        "much slower on a loaded machine)")
    args = p.parse_args(argv)
    if args.modes:
        for name, value in (("prompt_len", 512), ("gen_length", 256), ("steps", 256)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        return run_modes(args)

    config = bench_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_hf_checkpoint(Path(tmp) / "llada", config, seed=0)
        model = load_model(path, dtype="float32")
        torch_model = reference_model(path, config)
    try:
        torch_model.set_attn_implementation("sdpa")
        attn = "sdpa"
    except Exception:  # noqa: BLE001 - keep the eager attention if sdpa is unavailable
        attn = "eager"
    pick_torch_threads(args, torch_model, config)
    print(f"model: LLaDA layout, {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads, ffn {config.intermediate_size}, vocab "
          f"{config.vocab_size}, fp32, random weights")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} "
          f"device(s)); torch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"transformers Llama, attn={attn}); best of {args.repeats}")
    rows = [run_batch(args, model, torch_model, b) for b in args.batch]
    print("\nsummary (tokens/s = batch * gen_length / run time):")
    print(f"{'batch':>5} {'ours tok/s':>11} {'eager tok/s':>12} {'ratio':>6} "
          f"{'compile s':>9} {'overhead vs bare(block head)':>29} {'same tokens':>12}")
    for r in rows:
        n_tok = r["batch"] * args.gen_length
        ovh = 100 * (r["ours"] / r["bare[hidden + block head]"] - 1)
        print(f"{r['batch']:>5} {n_tok / r['ours']:>11.1f} {n_tok / r['eager']:>12.1f} "
              f"{r['eager'] / r['ours']:>5.2f}x {r['compile']:>9.2f} {ovh:>+28.1f}% "
              f"{r['same']:>12.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
