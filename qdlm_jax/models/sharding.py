"""Mesh and partition rules for the param tree.

Tensor parallelism over the mesh axis "model" (Megatron style): the kernels that fan out of
the residual stream (q/k/v/gate/up, LM head) are split along their output dim, the ones that
fan back in (o/down) along their input dim, the embedding along its hidden dim; norms,
routers and layer scalars are replicated. A dim that the axis size does not divide stays
replicated, so any mesh works.

Routed experts (DiffusionGemma: `experts.gate_up` [E, H, 2I], `experts.down` [E, I, H]): the
expert dim E on the mesh axis "expert" when the mesh has one (expert parallelism), and the
intermediate dim (2I of gate_up, I of down) on "model", each where the axis divides it. On a
mesh without an "expert" axis the experts are therefore split like the dense MLP along the
intermediate dim. The 2I columns of gate_up are [gate | up]: split into contiguous pieces, the
gate and up columns of one unit sit on different devices, and XLA moves them for the
elementwise product; with an "expert" axis each device holds whole experts.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qdlm_jax.models.distributed import check_cpu_pool

MODEL_AXIS = "model"
EXPERT_AXIS = "expert"
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")


def make_mesh(model: int | None = None, data: int = 1, expert: int = 1) -> Mesh:
    """A ("data", "model") mesh over the available devices (all on "model" by default), or
    ("data", "expert", "model") when `expert` > 1 (routed experts split over "expert"). On
    CPU, warns when this process's devices share too small a thread pool (`check_cpu_pool`)."""
    n = len(jax.devices())
    model = model or n // (data * expert)
    if model * data * expert != n:
        raise ValueError(f"make_mesh: data={data} x expert={expert} x model={model} != {n} "
                         "available devices")
    if jax.default_backend() == "cpu":
        check_cpu_pool(jax.local_device_count())
    if expert > 1:
        devices = np.array(jax.devices()).reshape(data, expert, model)
        return Mesh(devices, ("data", EXPERT_AXIS, MODEL_AXIS))
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
    if "experts" in names and len(shape) == 3:
        return _expert_spec(names[-1], shape, mesh)
    if any(n in _COLUMN for n in names):
        return on(len(shape) - 1)  # kernel [in, out] -> out; bias [out] -> out
    if any(n in _ROW for n in names):
        return on(0) if names[-1] == "kernel" else P()
    return P()


def _expert_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """[E, in, out] experts: E over "expert", the intermediate dim over "model" (module
    docstring)."""
    spec = [None, None, None]
    experts = mesh.shape.get(EXPERT_AXIS, 1)
    if experts > 1 and shape[0] % experts == 0:
        spec[0] = EXPERT_AXIS
    size = mesh.shape.get(MODEL_AXIS, 1)
    inner = 2 if name == "gate_up" else 1  # gate_up [E, H, 2I], down [E, I, H]
    if size > 1 and shape[inner] % size == 0:
        spec[inner] = MODEL_AXIS
    return P(*spec)


def activation_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Calibration activations [N, T, D]: the hidden dim over "model" (as the sharded
    embedding's rows come out), replicated when the axis does not divide it."""
    size = mesh.shape.get(MODEL_AXIS, 1)
    last = MODEL_AXIS if size > 1 and shape[-1] % size == 0 else None
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), last))


def param_sharding(mesh: Mesh):
    """sharding_fn(path, shape) for the converters and checkpoint restore."""
    return lambda path, shape: NamedSharding(mesh, param_spec(path, shape, mesh))
