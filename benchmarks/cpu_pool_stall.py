"""How often an in-process GPTQ job on a mesh of CPU devices stalls, by CPU thread pool size.

    .venv/bin/python benchmarks/cpu_pool_stall.py                  # pools of 8 and 16, 3 runs each
    .venv/bin/python benchmarks/cpu_pool_stall.py --nproc 16 --runs 5 --iters 60

Each run is a fresh process with 8 fake CPU devices (XLA_FLAGS) and NPROC as given ("unset":
the CPU client's default pool, max(cores, devices) threads, 8 on a machine of up to 8 cores)
that quantizes the bundled tiny LLaDA `--iters` times in a row as `tests/jobs/
test_quantize_job.py` does: `jobs.quantize.run` on a (data 2, model 4) mesh, GPTQ W3 g128,
8 masked calibration rows of 64 tokens, in-memory and streaming alternately. An iteration
that takes longer than `--watchdog` seconds (they take 3-14 s on 2 cores) counts as a stall
and ends its run. The stall: every pool thread runs a device's program that waits in a
LAPACK call for tasks queued on the same pool (models/distributed.prepare_cpu_runtime).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, io, faulthandler, sys, tempfile, time
from pathlib import Path
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
from qdlm_jax.jobs.quantize import run
root, iters, watchdog = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for i in range(iters):
    faulthandler.dump_traceback_later(watchdog, exit=True)
    t = time.time()
    cfg = apply_overrides(load_config_file(root / "configs/quantize.py"), [
        f"--config.out_dir={tempfile.mkdtemp()}", "--config.method=gptq", "--config.bits=3",
        "--config.eval.n_windows=1", "--config.eval.mc_num=8", "--config.eval.arith_n=2",
        "--config.eval.skip_fp=true", "--config.calibration=masked",
        "--config.calib.n_samples=8", "--config.calib.seq_len=64",
        f"--config.stream={'true' if i % 2 else 'false'}"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(cfg, mesh_shape=(2, 4))
    print("ITER", i, round(time.time() - t, 1), flush=True)
faulthandler.cancel_dump_traceback_later()
"""


def one_run(nproc: str, iters: int, watchdog: float) -> tuple[int, bool, float]:
    """(iterations completed, stalled, seconds) of one fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    if nproc != "unset":
        env["NPROC"] = nproc
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(iters), str(watchdog)],
                           env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    done = sum(line.startswith("ITER") for line in p.stdout.splitlines())
    return done, p.returncode != 0 or done < iters, time.time() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", nargs="+", default=["unset", "16"],
                    help="NPROC values to compare ('unset': the default pool)")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per NPROC value")
    ap.add_argument("--iters", type=int, default=40, help="jobs per process")
    ap.add_argument("--watchdog", type=float, default=90.0,
                    help="seconds after which an iteration counts as stalled")
    a = ap.parse_args(argv)
    print(f"tiny-llada, GPTQ W3 g128, (data 2, model 4) mesh of 8 CPU devices, "
          f"{a.iters} jobs per run, {os.cpu_count()} cores", flush=True)
    for nproc in a.nproc:
        results = []
        for r in range(a.runs):
            done, stalled, secs = one_run(nproc, a.iters, a.watchdog)
            results.append((done, stalled))
            print(f"  NPROC={nproc} run {r + 1}: "
                  + (f"stalled in job {done + 1}" if stalled else f"{done} jobs, no stall")
                  + f" ({secs:.0f} s)", flush=True)
        n_stalled = sum(s for _, s in results)
        jobs = sum(d + s for d, s in results)
        print(f"NPROC={nproc}: {n_stalled} of {a.runs} runs stalled, "
              f"{n_stalled} stalls in {jobs} jobs", flush=True)


if __name__ == "__main__":
    main()
