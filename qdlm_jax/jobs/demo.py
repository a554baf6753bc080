"""`make demo`: the main job on the bundled tiny LLaDA (`--moe`: the tiny DiffusionGemma).

Runs `qdlm quantize` (configs/quantize.py) for RTN, GPTQ and AWQ at W4 and W3 and for RTN
and GPTQ at W2 (group 128), evaluating the FP model once, and prints one table: held-out
masked-likelihood bound, KL to FP, one task per category the tiny model was trained for
(2-digit addition, 2-digit subtraction, code pass@1 in the sandbox, 4-way comparisons by
likelihood; `DEMO_TASKS`, 100 held-out items each) and the bytes of the packed linear
weights. Every table of the demo scores those tasks. Results go to
`runs/demo/` (one run directory per cell, plus `report.md` and `results.json` for all).
Override any config field as with `qdlm quantize`, e.g.
`python -m qdlm_jax.jobs.demo --config.calibration=masked`.

`python -m qdlm_jax.jobs.demo --wa` runs the weight-activation table instead: RTN, SmoothQuant,
QuaRot and DuQuant at W8A8 and W4A4 (per-channel weights, per-token activations), then QuaRot
W4A4 with 4-bit K/V (per head, asymmetric) and the same with DLLMQuant's IA-AQ (clip search
of K and V on masked calibration), into `runs/demo_wa/`.

`python -m qdlm_jax.jobs.demo --moe` runs the study's MoE rows on the bundled tiny
DiffusionGemma (`qdlm study --config configs/study_moe.py`: fp, RTN / GPTQ / AWQ at W4 / W3 /
W2, DAQ at 2 planes, the parts and router rows) into `runs/study_moe/` and prints
`table_moe.md`: accuracy per task, the text score, KL to fp, the share of expert choices
changed, and the entropy-bound sampler's tokens per forward pass and forward passes per
item. Finished cells are kept, so a second run prints the table at once; `--config.*`
flags are the study's.

`python -m qdlm_jax.jobs.demo --w2` runs the 2-bit table: RTN and GPTQ W2 g128 and
Quant-dLLM's DAQ + ABMP (an average of 2.0 binary planes, masked calibration, ABMP ratio
0.05 as published for LLaDA), into `runs/demo_w2/`. DAQ alone takes about as long to
quantize as the whole W4/W3 table, so it is not in the default run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.jobs.config_flags import PROJECT_ROOT as ROOT
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file, split_config_args
from qdlm_jax.jobs.quantize import run as run_job
from qdlm_jax.jobs.quantize_report import report

METHODS = ("rtn", "gptq", "awq")
BITS = (4, 3)
W2_ROWS = ("rtn", "gptq")  # the default table's 2-bit rows
DEMO_TASKS = "--config.eval.tasks=arithmetic_subtract,synthetic_code,synthetic_compare"
WA_METHODS = ("rtn", "smoothquant", "quarot", "duquant")
WA_BITS = ((8, 8), (4, 4))  # (weight bits, activation bits)
# After the W4A4 rows: QuaRot W4A4 with 4-bit K/V (per head, asymmetric), then with
# DLLMQuant's IA-AQ searching K's and V's clip ratios on masked calibration (the setting of
# docs/weight_activation.md's table).
WA_KV = (["--config.act.kv.bits=4"],
         ["--config.act.kv.bits=4", "--config.act.iaaq.enabled=true",
          "--config.act.iaaq.search_keys=true", "--config.calibration=masked"])


W2 = (["--config.method=rtn"], ["--config.method=gptq"],
      ["--config.method=daq", "--config.calibration=masked", "--config.daq.abmp_ratio=0.05"])


def cells(wa: bool, w2: bool = False) -> list[list[str]]:
    """The config overrides of each run of the table."""
    if w2:
        return [["--config.bits=2", "--config.group_size=128", *c] for c in W2]
    if not wa:
        return ([[f"--config.method={m}", f"--config.bits={b}"] for m in METHODS for b in BITS]
                + [[f"--config.method={m}", "--config.bits=2"] for m in W2_ROWS])
    wa = [[f"--config.method={m}", f"--config.bits={w}", f"--config.act_bits={a}",
           "--config.group_size=-1"] for w, a in WA_BITS for m in WA_METHODS]
    quarot_w4a4 = ["--config.method=quarot", "--config.bits=4", "--config.act_bits=4",
                   "--config.group_size=-1"]
    return wa + [quarot_w4a4 + kv for kv in WA_KV]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    wa, w2, moe = "--wa" in args, "--w2" in args, "--moe" in args
    if wa + w2 + moe > 1:
        print("demo: --wa, --w2 and --moe are separate tables; run one at a time",
              file=sys.stderr)
        return 2
    _, overrides = split_config_args([a for a in args if a not in ("--wa", "--w2", "--moe")])
    if moe:
        return moe_table(overrides)
    t0 = time.time()
    fp_cache: dict = {}
    results = []
    out_dir = ROOT / "runs" / ("demo_wa" if wa else "demo_w2" if w2 else "demo")
    for cell in cells(wa, w2):
        cfg = apply_overrides(load_config_file(ROOT / "configs" / "quantize.py"),
                              [f"--config.model={ROOT / 'assets' / 'tiny-llada'}",
                               f"--config.out_dir={out_dir}", "--config.overwrite=true",
                               DEMO_TASKS, *cell,
                               *overrides])
        results.append(run_job(cfg, fp_cache=fp_cache))
    out_dir = Path(cfg.out_dir)  # the report goes beside the runs (--config.out_dir moves both)
    table = report(results)
    atomic_write_text(out_dir / "report.md", table)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str))
    print("\n" + table)
    print(f"[demo] {len(results)} runs in {time.time() - t0:.0f}s; report: {out_dir / 'report.md'}")
    return 0


def moe_table(overrides: list[str]) -> int:
    """The study's MoE rows (configs/study_moe.py with `overrides`); prints table_moe.md."""
    from qdlm_jax.jobs.study import apply_study_overrides, run_study, study_spec

    t0 = time.time()
    cfg = apply_study_overrides(load_config_file(ROOT / "configs" / "study_moe.py"),
                                [f"--config.out_dir={ROOT / 'runs' / 'study_moe'}",
                                 *overrides])
    result = run_study(study_spec(cfg))
    out = Path(result["out_dir"])
    print("\n" + (out / "table_moe.md").read_text())
    print(f"[demo] {result['ran']} cells run in {time.time() - t0:.0f}s; tables: "
          f"{out / 'table_moe.md'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
