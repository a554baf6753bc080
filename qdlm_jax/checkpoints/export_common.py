"""What the serving-layout writers (`gptq_format`, `ct_format`) share: the packed linears of a
model, a tensor's module name, their group size, the check that a setting is the same for
all of them, and the atomic write of the directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from qdlm_jax.checkpoints.hf import config_to_hf
from qdlm_jax.checkpoints.safetensors_io import write_safetensors
from qdlm_jax.errors import CheckpointError
from qdlm_jax.fsutil import atomic_dir
from qdlm_jax.models.params import ParamPath, path_str
from qdlm_jax.quant.act_kernel import inner_weight
from qdlm_jax.quant.qarray import QuantizedArray


def packed_linears(params: dict) -> dict[ParamPath, QuantizedArray]:
    """{path: QuantizedArray} of the packed linears (inside an `ActKernel` or bare)."""
    return {p: inner_weight(v) for p, v in params.items()
            if isinstance(inner_weight(v), QuantizedArray)}


def module_name(hf_name: str) -> str:
    """The module of a hub tensor name: `a.b.q_proj.weight` -> `a.b.q_proj` (a name without
    the `.weight` suffix is returned as is)."""
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def group_of(q: QuantizedArray) -> int | None:
    """The group size of one packed linear, None when one group spans its input."""
    n_in = q.storage_shape[1]
    return None if q.group_size in (-1, n_in) else q.group_size


def one_setting(linears: dict[ParamPath, QuantizedArray], field: str, what: str):
    """The value of `field` (e.g. "bits", "sym") shared by every linear; a `CheckpointError`
    naming two linears that differ otherwise (`what`: the export's name, e.g. "--format
    gptq")."""
    by: dict = {}
    for p, q in linears.items():
        by.setdefault(getattr(q, field), path_str(p))
    if len(by) > 1:
        raise CheckpointError(f"export {what}: linears mix {field} (e.g. {by}); the layout "
                              f"has one {field} for every linear")
    return next(iter(by))


def write_quantized_dir(config, tensors: dict[str, np.ndarray], qcfg: dict,
                        out_dir: str | os.PathLike, *, extra_files: Iterable[Path] = (),
                        overwrite: bool = False) -> Path:
    """`out_dir` with model.safetensors (`tensors`) and config.json (the hub config with
    `quantization_config` = `qcfg`), and `extra_files` copied in; it appears only when
    complete."""
    with atomic_dir(out_dir, overwrite=overwrite, extra_files=extra_files) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        hf = config_to_hf(config)
        hf["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    return Path(out_dir).absolute()
