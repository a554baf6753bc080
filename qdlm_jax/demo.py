"""`make demo`: the main job on the bundled tiny LLaDA.

Runs `qdlm quantize` (configs/quantize.py) for RTN, GPTQ and AWQ at W4 and W3 (group 128),
evaluating the FP model once, and prints one table: held-out masked-likelihood bound,
2-digit addition exact match and the bytes of the packed linear weights. Results go to
`runs/demo/` (one run directory per cell, plus `report.md` and `results.json` for all).
Override any config field as with `qdlm quantize`, e.g.
`python -m qdlm_jax.demo --config.calibration=masked`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qdlm_jax.config_flags import apply_overrides, load_config_file, split_config_args
from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.quantize_job import report, run as run_job

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("rtn", "gptq", "awq")
BITS = (4, 3)


def main(argv=None) -> int:
    _, overrides = split_config_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.time()
    fp_cache: dict = {}
    results = []
    out_dir = ROOT / "runs" / "demo"
    for method in METHODS:
        for bits in BITS:
            cfg = apply_overrides(load_config_file(ROOT / "configs" / "quantize.py"),
                                  [f"--config.model={ROOT / 'assets' / 'tiny-llada'}",
                                   f"--config.out_dir={out_dir}", f"--config.method={method}",
                                   f"--config.bits={bits}", *overrides])
            results.append(run_job(cfg, fp_cache=fp_cache))
    table = report(results)
    atomic_write_text(out_dir / "report.md", table)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str))
    print("\n" + table)
    print(f"[demo] {len(results)} runs in {time.time() - t0:.0f}s; report: {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
