"""qdlm outliers --model PATH [--n-samples 16 --seq-len 128]: input-activation statistics
of every linear layer under clean and masked inputs (JSON, markdown and a heatmap)."""

from __future__ import annotations

from pathlib import Path

NAME = "outliers"
HELP = ("per-layer activation statistics (max, percentiles, kurtosis, top channels) of every "
        "linear layer's input, clean vs masked, with a heatmap")


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="checkpoint directory (fp or quantized) or hub id")
    p.add_argument("--source", default="bigbench-wikipedia",
                   help="text source of the calibration split (name or local file; default: "
                        "bigbench-wikipedia)")
    p.add_argument("--n-samples", type=int, default=16,
                   help="sequences per condition (default: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the windows and the masking (default: 0)")
    p.add_argument("--out", default=None, help="run dir (default: runs/outliers/<model>)")


def run(args, overrides):
    if overrides:
        from qdlm_jax.errors import ConfigOverrideError
        raise ConfigOverrideError(f"{overrides[0]}: qdlm outliers takes no --config overrides")
    from qdlm_jax.evals.outliers import OutlierSpec, run_outliers

    out = Path(args.out or Path("runs/outliers") / Path(args.model).name)
    spec = OutlierSpec(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                       source=args.source)
    r = run_outliers(args.model, spec, out)
    print(r["markdown"])
    print(f"run dir: {out}")
    return 0
