"""Our own checkpoints: orbax-saved params plus the model config, written atomically.

Layout of a checkpoint directory:
    qdlm_config.json   {"format": 1, "model": ModelConfig fields}
    params/            orbax StandardCheckpointer tree {"layers.0.q_proj.kernel": array, ...}
    tokenizer.json     (copied from the source when there is one)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import jax
import orbax.checkpoint as ocp

from qdlm_jax.converters.safetensors_io import CheckpointError
from qdlm_jax.fsutil import atomic_dir
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.params import ParamPath, parse_path, path_str

CONFIG_FILE = "qdlm_config.json"
FORMAT = 1


def is_qdlm_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_checkpoint(path: str | os.PathLike, config: ModelConfig,
                    params: dict[ParamPath, jax.Array], *, extra_files: Iterable[Path] = (),
                    overwrite: bool = False) -> Path:
    """Writes the checkpoint to a temp dir beside `path`, then renames it into place."""
    with atomic_dir(path, overwrite=overwrite, extra_files=extra_files) as tmp:
        tree = {path_str(p): v for p, v in params.items()}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", tree)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "model": config.to_dict()},
                                                  indent=2))
    return Path(path).absolute()


def read_config(path: str | os.PathLike) -> ModelConfig:
    f = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read checkpoint config ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format={meta.get('format')!r}, expected {FORMAT}")
    return ModelConfig.from_dict(meta["model"], source=str(f))


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    sharding_fn: Callable | None = None
                    ) -> tuple[ModelConfig, dict[ParamPath, jax.Array]]:
    path = Path(path).absolute()
    config = read_config(path)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / "params")
        tree_meta = getattr(meta, "item_metadata", meta)
        target = {}
        for k, m in dict(tree_meta).items():
            p = parse_path(k)
            sharding = (sharding_fn(p, tuple(m.shape)) if sharding_fn is not None else
                        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            target[k] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
        tree = ckptr.restore(path / "params", target)
    params = {parse_path(k): v for k, v in tree.items()}
    if dtype is not None:
        params = {p: (v.astype(dtype) if v.dtype.kind == "f" or v.dtype.name == "bfloat16"
                      else v) for p, v in params.items()}
        config = config.replace(param_dtype=dtype, dtype=dtype)
    return config, params
