"""One process of the multi-process test (tests/test_multihost.py): joins a job of NPROC
processes through `jax.distributed` (8 // NPROC fake CPU devices each, gloo collectives),
loads the checkpoint onto the global (data 2, model 4) mesh, runs the layer-wise PTQ over
it, and (process 0) writes every quantized leaf, gathered, to OUT.

    python tests/multihost_worker.py PID NPROC PORT CHECKPOINT OUT.npz METHOD
"""

import os
import sys

pid, nproc, port, src, out, method = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                      sys.argv[4], sys.argv[5], sys.argv[6])
os.environ["XLA_FLAGS"] = " ".join(  # the test run's other XLA flags are kept
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={8 // nproc}"])
os.environ["JAX_PLATFORMS"] = "cpu"

from qdlm_jax.models.distributed import initialize  # noqa: E402

initialize(coordinator=f"localhost:{port}", num_processes=nproc, process_id=pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from qdlm_jax import load_model  # noqa: E402
from qdlm_jax.models.distributed import gather_params  # noqa: E402
from qdlm_jax.models.sharding import make_mesh  # noqa: E402
from qdlm_jax.quant import CalibSpec, PTQSpec, QuantSpec, build_calibration  # noqa: E402
from qdlm_jax.quant.layerwise import quantize_model  # noqa: E402

assert jax.process_count() == nproc and len(jax.devices()) == 8
model = load_model(src, dtype="float32", mesh=make_mesh(model=4, data=2))
kernel = model.layers[0].q_proj.kernel[...]
assert {d.process_index for d in kernel.sharding.device_set} == set(range(nproc))
assert kernel.is_fully_addressable == (nproc == 1)
windows = np.random.default_rng(0).integers(0, 240, (8, 32)).astype(np.int32)
calib = build_calibration(model, windows, CalibSpec(mode="masked", n_samples=8, seq_len=32))
qmodel, _ = quantize_model(model, calib, PTQSpec(method=method,
                                                 weight=QuantSpec(bits=4, group_size=64)),
                           progress=False)
leaves = gather_params(qmodel)
if pid == 0:
    np.savez(out, **leaves)
# and as `qdlm quantize --distributed` saves it: every process gathers, process 0 writes alone
from jax.experimental import multihost_utils  # noqa: E402

from qdlm_jax.checkpoints.orbax_format import save_checkpoint  # noqa: E402
from qdlm_jax.models.distributed import to_host  # noqa: E402
from qdlm_jax.models.params import get_params  # noqa: E402

params = to_host(get_params(qmodel))
if pid == 0:
    save_checkpoint(out + ".ckpt", qmodel.config, params)
multihost_utils.sync_global_devices("worker done")
print("OK", pid, flush=True)
