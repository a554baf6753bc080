"""Mesh and partition rules for the param tree.

Tensor parallelism over the mesh axis "model" (Megatron style): the kernels that fan out of
the residual stream (q/k/v/gate/up, LM head) are split along their output dim, the ones that
fan back in (o/down) along their input dim, the embedding along its hidden dim; norms are
replicated. A dim that the axis size does not divide stays replicated, so any mesh works.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qdlm_jax.models.distributed import check_cpu_pool

MODEL_AXIS = "model"
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")


def make_mesh(model: int | None = None, data: int = 1) -> Mesh:
    """A ("data", "model") mesh over the available devices (all on "model" by default). On
    CPU, warns when this process's devices share too small a thread pool (`check_cpu_pool`)."""
    n = len(jax.devices())
    model = model or n // data
    if model * data != n:
        raise ValueError(f"make_mesh: data={data} x model={model} != {n} available devices")
    if jax.default_backend() == "cpu":
        check_cpu_pool(jax.local_device_count())
    devices = np.array(jax.devices()).reshape(data, model)
    return Mesh(devices, ("data", MODEL_AXIS))


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of the param at `path` (as in the converters' key maps)."""
    size = mesh.shape.get(MODEL_AXIS, 1)

    def on(dim):
        spec = [None] * len(shape)
        if size > 1 and shape[dim] % size == 0:
            spec[dim] = MODEL_AXIS
        return P(*spec)

    names = [p for p in path if isinstance(p, str)]
    if path == ("embed",):
        return on(1)
    if any(n in _COLUMN for n in names):
        return on(len(shape) - 1)  # kernel [in, out] -> out; bias [out] -> out
    if any(n in _ROW for n in names):
        return on(0) if names[-1] == "kernel" else P()
    return P()


def activation_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Calibration activations [N, T, D]: the hidden dim over "model" (as the sharded
    embedding's rows come out), replicated when the axis does not divide it."""
    size = mesh.shape.get(MODEL_AXIS, 1)
    last = MODEL_AXIS if size > 1 and shape[-1] % size == 0 else None
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), last))


def param_sharding(mesh: Mesh):
    """sharding_fn(path, shape) for the converters and checkpoint restore."""
    return lambda path, shape: NamedSharding(mesh, param_spec(path, shape, mesh))
