"""What a key map is: one entry per checkpoint tensor, naming its place in our param tree."""

from __future__ import annotations

import dataclasses
from typing import Any

from qdlm_jax.models.config import DTYPES
from qdlm_jax.models.params import ParamPath


def hf_dtype(hf: dict[str, Any]) -> str:
    """Our dtype name for a hub config's `torch_dtype` (float32 when absent or unknown)."""
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_name: str  # tensor name in the hub checkpoint
    path: ParamPath  # where it lives in our params
    # PyTorch Linear [out, in] <-> our kernel [in, out]; expert tensors [E, out, in] <->
    # [E, in, out]: the last two axes swap
    transpose: bool


def hub_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    """The hub shape of a tensor of our `shape` (the last two axes swapped if `transpose`)."""
    return tuple(shape[:-2]) + tuple(shape[-2:])[::-1] if transpose else tuple(shape)


def linear(hf_name: str, *path) -> TensorMapping:
    return TensorMapping(hf_name, tuple(path), True)


def plain(hf_name: str, *path) -> TensorMapping:
    return TensorMapping(hf_name, tuple(path), False)

