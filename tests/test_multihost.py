"""PTQ across processes: two local CPU processes (4 fake devices each, gloo collectives) load
a checkpoint onto one global 8-device mesh, each reading only its slices, and run the
layer-wise PTQ; the result equals the single-process run: bit for bit except the last bits
of the down_proj scales (see the test)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(nproc, src, out, method):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
                               str(i), str(nproc), str(port), str(src), str(out), method],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(nproc)]
    for p in procs:
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0, e[-3000:]
        assert "OK" in o
    return dict(np.load(out))


@pytest.mark.parametrize("method", ["gptq"])
def test_two_processes_equal_one(tmp_path, method):
    """The same (data 2, model 4) mesh of 8 CPU devices, as one process or as two processes
    of 4 devices each (the model axis inside a process, the data axis across them, as on a
    pod slice); both use gloo collectives, so every reduction sums in the same order."""
    src = write_hf_checkpoint(tmp_path / "src", tiny_config("llada", hidden_size=128,
                                                             intermediate_size=256))
    single = _run(1, src, tmp_path / "single.npz", method)
    multi = _run(2, src, tmp_path / "multi.npz", method)
    # process 0 wrote the gathered model alone (orbax waits at no barrier for process 1)
    from qdlm_jax.checkpoints.orbax_format import load_checkpoint
    _, saved = load_checkpoint(str(tmp_path / "multi.npz") + ".ckpt")
    assert len(saved) > 10
    assert set(single) == set(multi) and len(single) > 10
    assert any(k.endswith(".packed") for k in single)
    for k in single:
        a, b = single[k], multi[k]
        assert a.dtype == b.dtype
        if k.endswith("down_proj']['kernel'].value.scale"):
            # Known gap: the down_proj scales (the input-sharded linear) differ from the
            # one-process run in the last bits (max relative 7e-6 seen); every code, zero
            # point and other tensor is bit-identical. docs/scale.md says so.
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=0)
            continue
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), k
