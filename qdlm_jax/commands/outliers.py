"""qdlm outliers --model PATH [--n-samples 16 --seq-len 128]: input-activation statistics
of every linear layer under clean and masked inputs (JSON, markdown and a heatmap), and the
residual stream's super-outliers (--super-ratio 20 --super-min-layers 3)."""

from __future__ import annotations

from pathlib import Path

NAME = "outliers"
HELP = ("per-layer activation statistics (max, percentiles, kurtosis, top channels) of every "
        "linear layer's input, clean vs masked, with a heatmap; super-outlier channels of the "
        "residual stream")


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
    p.add_argument("--super-ratio", type=float, default=20.0,
                   help="super-outlier rule: a residual-stream channel is an outlier in a layer "
                        "when its max |h| over all tokens is at least this many times the "
                        "median channel's (default: 20)")
    p.add_argument("--super-min-layers", type=int, default=3,
                   help="super-outlier rule: the channel must be an outlier in at least this "
                        "many consecutive layers (default: 3)")


def run(args, overrides):
    if overrides:
        from qdlm_jax.errors import ConfigOverrideError
        raise ConfigOverrideError(f"{overrides[0]}: qdlm outliers takes no --config overrides")
    from qdlm_jax.evals.outliers import OutlierSpec, run_outliers
    from qdlm_jax.evals.super_outliers import SuperOutlierSpec

    out = Path(args.out or Path("runs/outliers") / Path(args.model).name)
    spec = OutlierSpec(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                       source=args.source,
                       super_outlier=SuperOutlierSpec(ratio=args.super_ratio,
                                                      min_layers=args.super_min_layers))
    r = run_outliers(args.model, spec, out)
    print(r["markdown"])
    print(f"run dir: {out}")
    return 0
