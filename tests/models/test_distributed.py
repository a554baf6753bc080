"""`prepare_cpu_runtime`: the CPU client's thread pool really grows to twice the devices (the
LAPACK-in-the-pool stall of docs/scale.md needs more pool threads than devices); the test
processes get such a pool, and `make_mesh` names one that is too small."""

import glob
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from qdlm_jax.models.distributed import CpuPoolWarning
from qdlm_jax.models.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import glob, os
from qdlm_jax.models.distributed import prepare_cpu_runtime
prepare_cpu_runtime()
import jax, jax.numpy as jnp
jnp.ones(3).block_until_ready()  # the CPU client and its pool exist from here
names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
print("NPROC", os.environ["NPROC"], "POOL", names.count("tf_XLAEigen"), len(jax.devices()))
"""


def _run(devices, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={**base, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                              **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("NPROC"))
    _, nproc, _, pool, n_dev = line.split()
    return int(nproc), int(pool), int(n_dev)


def test_pool_is_twice_the_devices():
    nproc, pool, n_dev = _run(4)
    assert n_dev == 4
    assert nproc == max(os.cpu_count() or 1, 8)
    if sys.platform.startswith("linux"):  # thread names from /proc
        assert pool == nproc > n_dev


def test_a_users_nproc_is_kept():
    nproc, pool, _ = _run(4, NPROC="5")
    assert nproc == 5
    if sys.platform.startswith("linux"):
        assert pool == 5


def test_the_pool_is_sized_from_the_jobs_devices():
    """A process of a two-process job of 8 devices gets the pool of a one-process run of 8
    (the pool size changes how Eigen splits sums, so equal pools give equal bits)."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    script = ("import os\nfrom qdlm_jax.models.distributed import prepare_cpu_runtime\n"
              "prepare_cpu_runtime(8)\nprint('NPROC', os.environ['NPROC'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**base, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"NPROC {max(os.cpu_count() or 1, 16)}" in out.stdout
    assert _run(8)[0] == max(os.cpu_count() or 1, 16)


def test_make_mesh_names_a_cpu_pool_too_small_for_its_devices(monkeypatch):
    """8 devices on a pool of 8 threads (NPROC=8) is the stall's setting: make_mesh warns and
    names the remedy; a pool of twice the devices (NPROC=16) passes silently."""
    jax.devices()  # the CPU client (and its pool) exists before NPROC changes: the pool of
    monkeypatch.setenv("NPROC", "8")  # this process stays as tests/conftest.py sized it
    with pytest.warns(CpuPoolWarning, match=r"pool of 8 threads.*NPROC=(1[6-9]|[2-9]\d|\d{3,})"):
        make_mesh(model=4, data=2)
    monkeypatch.setenv("NPROC", "16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_mesh(model=4, data=2)


def test_the_test_processes_pool_leaves_threads_free():
    """tests/conftest.py sizes this process's pool before JAX starts: at least twice the 8
    devices, counted from the pool's threads (the in-process mesh jobs of the suite stall on a
    pool of 8)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("thread names from /proc")
    jnp.ones(3).block_until_ready()
    names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
    assert jax.local_device_count() == 8
    assert names.count("tf_XLAEigen") >= 16
