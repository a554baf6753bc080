"""Test setup: 8 fake CPU devices so sharded code runs on a CPU-only machine, and a CPU thread
pool of twice the devices (NPROC, inherited by the tests' subprocesses): with a pool of 8, an
in-process GPTQ job on a (2, 4) mesh of the 8 devices stalled for good in 3 of 3 runs of
`python benchmarks/cpu_pool_stall.py` (docs/scale.md), the likely cause of a CI run that waited
until its time ran out."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

from qdlm_jax.models.distributed import prepare_cpu_runtime  # noqa: E402  (after XLA_FLAGS)

prepare_cpu_runtime()  # before JAX's first computation, which sizes the pool

import pytest  # noqa: E402  (after the environment above is set)


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
