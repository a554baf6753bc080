"""Streaming GPTQ of DiffusionGemma at real scale: a 26B-A4B-shaped random checkpoint (2 of
its 30 layers by default), quantized layer by layer with peak memory and a per-part breakdown.

    python converters/random_checkpoint.py diffusion-gemma-26b-a4b /tmp/dg-2l   # 4.8 GB, bf16
    python benchmarks/bench_gemma_streaming.py /tmp/dg-2l                       # W4 g64

Calibration: --samples windows of --prompt random prompt ids through the encoder and a canvas
of the model's length (256) through the decoder at each of --levels noise levels, with
self-conditioning (its logits from one float pass first). Weights W4 in groups of 64: 128
does not divide the experts' down-projection width (704). Runs
`jobs.gemma_streaming.gptq_streaming_gemma`, then writes the packed model part by part
(`save_packed_gemma`). Prints and writes `report-dg-streaming.json`: the float pass's seconds;
per part reading (read_s), recording its statistics (stats_s: the encoder and decoder passes
with the Gram matrices and the experts' routed rows), the GPTQ calls (gptq_s: dense kernels
and one per expert and tensor), the quantized part's forward (forward_s) and the commit
(write_s), the ratio of the part's time to its GPTQ calls plus its forward passes (stats and
forward), the peak resident memory after each part, and the checkpoint's size.

Side by side with GPTQModel (`--peer-python`: the python of an environment with gptqmodel
7.7.0, see benchmarks/gptqmodel_peer.py): after our run, the peer quantizes the same
checkpoint with the same random prompt ids, bits and group size, and the report gives both
times and peaks and their ratios. GPTQModel calibrates the encoder only, so compare at
`--modes encoder` (ours then records no decoder pass and no self-conditioning).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a diffusion-gemma-26b-a4b random checkpoint (hub layout)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--levels", type=float, nargs="+", default=[0.5])
    p.add_argument("--modes", default="both", choices=("both", "encoder", "decoder"))
    p.add_argument("--peer-python", default=None,
                   help="python of a GPTQModel environment: run the peer after ours")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--work", default=None, help="default: DIR-work (resumed when present)")
    p.add_argument("--out", default=".", help="where report-dg-streaming.json goes")
    a = p.parse_args(argv)

    from qdlm_jax.checkpoints.hf import load_hf_config
    from qdlm_jax.jobs.gemma_streaming import gptq_streaming_gemma, save_packed_gemma
    from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec
    from qdlm_jax.quant.gemma_gptq import GemmaGPTQSettings
    from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
    from qdlm_jax.quant.quantizer_core import QuantSpec

    src = Path(a.dir)
    config = load_hf_config(src / "config.json")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (a.samples, a.prompt))
    canvases = rng.integers(0, config.vocab_size, (a.samples, config.canvas_length))
    # encoder-only calibration leaves the self-conditioning MLP (a decoder-only module,
    # which GPTQModel does not quantize either) without inputs: it is kept
    parts = ("experts", "attention", "dense_mlp") + (() if a.modes == "encoder" else
                                                     ("self_conditioning",))
    spec = GemmaPTQSpec(method="gptq", weight=QuantSpec(bits=a.bits, group_size=a.group),
                        parts=parts)
    settings = GemmaGPTQSettings(calib=GemmaCalibSpec(levels=tuple(a.levels), modes=a.modes))
    work = Path(a.work or f"{src}-work")
    timings: dict = {}
    t0 = time.time()
    stats = gptq_streaming_gemma(src, prompts, canvases, spec, settings, work,
                                 timings=timings)
    t_quant = time.time() - t0
    t = time.time()
    save_packed_gemma(src, work, f"{src}-packed")
    t_save = time.time() - t
    size = sum(f.stat().st_size for f in Path(f"{src}-packed").rglob("*") if f.is_file())
    parts = []
    for row in timings.get("parts", []):
        compute = row["gptq_s"] + row["stats_s"] + row["forward_s"]
        total = sum(row[k] for k in ("read_s", "stats_s", "gptq_s", "forward_s", "write_s"))
        parts.append({**row, "total_s": total, "ratio": total / compute})
    report = {
        "checkpoint": str(src), "layers": config.num_layers, "experts": config.num_experts,
        "hidden": config.hidden_size, "calibration": {
            "windows": a.samples, "prompt_tokens": a.prompt, "canvas": config.canvas_length,
            "levels": a.levels, "modes": a.modes, "self_condition": a.modes != "encoder"},
        "weight": f"W{a.bits} g{a.group}", "float_pass": timings.get("float_pass"),
        "parts": parts, "quantize_s": t_quant, "save_s": t_save, "packed_bytes": size,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "expert_hessians": {k: sum(v.count(k) for v in stats["how"].values())
                            for k in ("routed", "thin-damped", "thin-identity")},
    }
    if a.peer_python:
        report["peer"] = run_peer(a, src)
        for k in ("quantize_s", "peak_rss_gib"):
            report[f"peer_over_ours_{k}"] = report["peer"][k] / report[k]
    out = Path(a.out) / "report-dg-streaming.json"
    out.write_text(json.dumps(report, indent=2))
    for row in parts:
        print(f"{row['part']:>18}: read {row['read_s']:.1f} s, stats {row['stats_s']:.1f} s, "
              f"gptq {row['gptq_s']:.1f} s, forward {row['forward_s']:.1f} s, write "
              f"{row['write_s']:.1f} s; total / (gptq + passes) {row['ratio']:.2f}; peak RSS "
              f"{row['peak_rss_gib']:.2f} GiB")
    print(f"float pass {report['float_pass']}; quantize {t_quant:.0f} s, save {t_save:.0f} s, "
          f"packed {size / 2**30:.2f} GiB, peak RSS {report['peak_rss_gib']:.2f} GiB -> {out}")
    if a.peer_python:
        peer = report["peer"]
        print(f"GPTQModel: quantize {peer['quantize_s']:.0f} s "
              f"({report['peer_over_ours_quantize_s']:.2f}x ours), peak RSS "
              f"{peer['peak_rss_gib']:.2f} GiB ({report['peer_over_ours_peak_rss_gib']:.2f}x); "
              f"{peer['expert_linears']} expert and "
              f"{peer['quantized_linears'] - peer['expert_linears']} other linears quantized")
    return 0


def run_peer(a, src: Path) -> dict:
    """GPTQModel on the same checkpoint (benchmarks/gptqmodel_peer.py in its environment),
    from a directory of links to the checkpoint's files plus a tokenizer.json; it runs in a
    temporary directory (GPTQModel writes a `logs/` folder where it starts)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        for f in src.iterdir():
            (model / f.name).symlink_to(f.resolve())
        if not (model / "tokenizer.json").exists():
            (model / "tokenizer.json").symlink_to(
                root / "assets" / "tiny-diffusiongemma" / "tokenizer.json")
        out = Path(tmp) / "peer.json"
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1)}
        subprocess.run([a.peer_python, str(root / "benchmarks" / "gptqmodel_peer.py"),
                        str(model), "--samples", str(a.samples), "--prompt", str(a.prompt),
                        "--bits", str(a.bits), "--group", str(a.group), "--out", str(out)],
                       check=True, env=env, cwd=tmp)
        return json.loads(out.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
