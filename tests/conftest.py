"""Test setup: 8 fake CPU devices so sharded code runs on a CPU-only machine, and a CPU thread
pool of twice the devices (NPROC, inherited by the tests' subprocesses): with a pool of 8, an
in-process GPTQ job on a (2, 4) mesh of the 8 devices stalled for good in 3 of 3 runs of
`python benchmarks/cpu_pool_stall.py` (docs/scale.md), the likely cause of a CI run that waited
until its time ran out."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them is most of their time. LLVM's cheaper
# optimization level compiles about a quarter faster, and XLA:CPU's elemental emitters (in
# place of its MLIR fusion emitters) take half the compile time again. Every path under test,
# and each reference it is compared with, is compiled the same way. The elemental emitters
# let LLVM fuse a multiply and an add into one FMA where it sees them, which differs between
# two programs that state the same sums; with code for AVX (no FMA instructions) every
# product is rounded as written, so exact comparisons of such programs (an interpreted
# kernel against the XLA path) still hold.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_cpu_use_fusion_emitters" not in flags:
    flags += " --xla_cpu_use_fusion_emitters=false --xla_cpu_max_isa=AVX"
os.environ["XLA_FLAGS"] = flags.strip()

# One persistent compilation cache for the run, shared by both xdist workers and every
# subprocess the tests start (they inherit the environment): the many tests that build the
# same small models compile each program once. It starts empty, so a fresh clone's run pays
# every first compile; a cache dir set by the user is used and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qdlm-jax-test-cache-")
    os.environ["QDLM_TEST_OWNS_JAX_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from qdlm_jax.models.distributed import prepare_cpu_runtime  # noqa: E402  (after XLA_FLAGS)

prepare_cpu_runtime()  # before JAX's first computation, which sizes the pool

import gc  # noqa: E402

import pytest  # noqa: E402  (after the environment above is set)

# The files that take longest (`make test` prints the slowest tests), handed out first: xdist's
# `--dist loadfile` gives each worker the next file in collection order, so a long file
# collected last keeps one worker busy while the other idles (40 s of a 8-minute run).
LONGEST_FIRST = (
    "tests/jobs/test_study_moe.py",
    "tests/jobs/test_gemma_streaming.py",
    "tests/inference/test_fast_decoding.py",
    "tests/evals/test_sandbox.py",
    "tests/inference/test_diffusion_gemma_sampler.py",
    "tests/quant/test_layerwise.py",
    "tests/checkpoints/test_gptq_format.py",
    "tests/test_readme.py",
    "tests/jobs/test_quantize_job.py",
    "tests/training/test_trainer.py",
    "tests/quant/test_gemma_smoothquant.py",
    "tests/quant/test_gemma_quarot.py",
)


def pytest_collection_modifyitems(config, items):
    """The `LONGEST_FIRST` files first (a stable sort: every other file, and the tests within
    each file, keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A worker's heap holds millions of objects by mid-run (JAX's caches of every program so
    far), and each full garbage collection scans them all: a third of a second each, and the
    streaming passes collect after every block. While a test runs (its fixtures included) the
    older objects are frozen (`gc.freeze`), so its collections scan only what it made; after
    it they are unfrozen and collectable as before."""
    gc.freeze()
    try:
        return (yield)
    finally:
        gc.unfreeze()


@pytest.fixture
def assert_same_checkpoint():
    """check(dir_a, dir_b) -> dir_a's params: two saved checkpoints hold the same params, with
    the same structure (packed fields included), dtypes and bytes."""
    import jax
    import numpy as np

    from qdlm_jax.checkpoints.orbax_format import load_checkpoint

    def check(dir_a, dir_b):
        _, a = load_checkpoint(dir_a)
        _, b = load_checkpoint(dir_b)
        assert set(a) == set(b)
        for path in a:
            assert jax.tree.structure(a[path]) == jax.tree.structure(b[path]), path
            for x, y in zip(jax.tree.leaves(a[path]), jax.tree.leaves(b[path])):
                x, y = np.asarray(x), np.asarray(y)
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path
        return a
    return check


def pytest_unconfigure(config):
    """The controlling process removes the run's compilation cache (xdist workers leave it)."""
    if hasattr(config, "workerinput") or not os.environ.get("QDLM_TEST_OWNS_JAX_CACHE"):
        return
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
