"""Run untrusted Python programs (model-written code) in a separate, resource-limited process.

Each program is written to a fresh temporary directory and run by a launcher script
(`python -I -B launcher.py`, which runs `prog.py` as `__main__`) with that directory as
working directory, no stdin, a minimal environment, and these limits, which the launcher
sets on its own process before the program starts:

- RLIMIT_AS = memory_mb MiB (address space: a memory bomb gets MemoryError or dies),
- RLIMIT_CPU = ceil(timeout_s) + 1 s (a busy loop gets SIGXCPU / SIGKILL),
- RLIMIT_FSIZE = 16 MiB (no huge files), RLIMIT_CORE = 0,
- its own session (process group), so a wall-clock timeout (`timeout_s`, e.g. a sleeping
  program) kills the whole group with SIGKILL.

The harness never `exec`s model code in its own process. This is containment of runaway
resource use, not a security boundary: the child can still read files and use the
network if the machine allows it; run untrusted code in a container for real isolation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

FSIZE_LIMIT = 16 << 20
STDERR_TAIL = 400


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: expected > 0")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb!r}: expected an integer >= 64")


@dataclasses.dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout
    returncode: int | None
    stderr: str  # the last STDERR_TAIL characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_LAUNCHER = """\
import resource, runpy, sys
mem, cpu, fsize = {mem}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
del resource
runpy.run_path({prog!r}, run_name="__main__")
"""


def launcher_source(prog: str, limits: SandboxLimits) -> str:
    """The child's entry script: set the limits on itself, then run `prog` as __main__
    (limits are set inside the child rather than in a `preexec_fn`, which is unsafe in a
    threaded parent such as a JAX process)."""
    return _LAUNCHER.format(mem=limits.memory_mb << 20, cpu=math.ceil(limits.timeout_s) + 1,
                            fsize=FSIZE_LIMIT, prog=prog)


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `source` as a Python program in a limited child process (module docstring).
    passed = exit status 0 within the limits; failed = any other exit (exception, failed
    assert, MemoryError, killed by a resource limit); timeout = wall clock exceeded."""
    with tempfile.TemporaryDirectory(prefix="qdlm-sandbox-") as tmp:
        prog = Path(tmp) / "prog.py"
        prog.write_text(source, encoding="utf-8")
        launcher = Path(tmp) / "launcher.py"
        launcher.write_text(launcher_source(str(prog), limits), encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0",
               "HOME": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(launcher)], cwd=tmp,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, err = proc.communicate()
            return RunResult("timeout", proc.returncode, _tail(err))
    status = "passed" if proc.returncode == 0 else "failed"
    return RunResult(status, proc.returncode, _tail(err))


def _tail(err: bytes | None) -> str:
    return (err or b"").decode("utf-8", "replace")[-STDERR_TAIL:]


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int = 2) -> list[RunResult]:
    """`run_program` over many programs, `workers` child processes at a time (in order)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
