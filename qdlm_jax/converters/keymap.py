"""What a key map is: one entry per checkpoint tensor, naming its place in our param tree."""

from __future__ import annotations

import dataclasses

ParamPath = tuple  # e.g. ("layers", 3, "q_proj", "kernel"), as in nnx.to_pure_dict


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_name: str  # tensor name in the hub checkpoint
    path: ParamPath  # where it lives in our params
    transpose: bool  # PyTorch Linear [out, in] <-> our kernel [in, out]


def linear(hf_name: str, *path) -> TensorMapping:
    return TensorMapping(hf_name, tuple(path), True)


def plain(hf_name: str, *path) -> TensorMapping:
    return TensorMapping(hf_name, tuple(path), False)
