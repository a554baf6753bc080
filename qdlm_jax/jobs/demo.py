"""`make demo`: the main job on the bundled tiny LLaDA.

Runs `qdlm quantize` (configs/quantize.py) for RTN, GPTQ and AWQ at W4 and W3 (group 128),
evaluating the FP model once, and prints one table: held-out masked-likelihood bound,
2-digit addition exact match and the bytes of the packed linear weights. Results go to
`runs/demo/` (one run directory per cell, plus `report.md` and `results.json` for all).
Override any config field as with `qdlm quantize`, e.g.
`python -m qdlm_jax.jobs.demo --config.calibration=masked`.

`python -m qdlm_jax.jobs.demo --wa` runs the weight-activation table instead: RTN, SmoothQuant,
QuaRot and DuQuant at W8A8 and W4A4 (per-channel weights, per-token activations), into
`runs/demo_wa/`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.jobs.config_flags import (PROJECT_ROOT as ROOT, apply_overrides, load_config_file,
                                        split_config_args)
from qdlm_jax.jobs.quantize import report, run as run_job

METHODS = ("rtn", "gptq", "awq")
BITS = (4, 3)
WA_METHODS = ("rtn", "smoothquant", "quarot", "duquant")
WA_BITS = ((8, 8), (4, 4))  # (weight bits, activation bits)


def cells(wa: bool) -> list[list[str]]:
    """The config overrides of each run of the table."""
    if not wa:
        return [[f"--config.method={m}", f"--config.bits={b}"] for m in METHODS for b in BITS]
    return [[f"--config.method={m}", f"--config.bits={w}", f"--config.act_bits={a}",
             "--config.group_size=-1"] for w, a in WA_BITS for m in WA_METHODS]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    wa = "--wa" in args
    _, overrides = split_config_args([a for a in args if a != "--wa"])
    t0 = time.time()
    fp_cache: dict = {}
    results = []
    out_dir = ROOT / "runs" / ("demo_wa" if wa else "demo")
    for cell in cells(wa):
        cfg = apply_overrides(load_config_file(ROOT / "configs" / "quantize.py"),
                              [f"--config.model={ROOT / 'assets' / 'tiny-llada'}",
                               f"--config.out_dir={out_dir}", "--config.overwrite=true", *cell,
                               *overrides])
        results.append(run_job(cfg, fp_cache=fp_cache))
    out_dir = Path(cfg.out_dir)  # the report goes beside the runs (--config.out_dir moves both)
    table = report(results)
    atomic_write_text(out_dir / "report.md", table)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str))
    print("\n" + table)
    print(f"[demo] {len(results)} runs in {time.time() - t0:.0f}s; report: {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
