"""Our own checkpoints: orbax-saved params plus the model config, written atomically.

Layout of a checkpoint directory:
    qdlm_config.json   {"format": 1, "model": ModelConfig fields,
                        "quantized": {param name: static QuantizedArray fields}, "meta": {...}}
    params/            orbax StandardCheckpointer tree {"layers.0.q_proj.kernel": array, ...};
                       a quantized kernel is a sub-tree {"packed", "scale"[, "zero", "g_idx"]}
                       of real packed integers (a W4 checkpoint stores half a byte a weight)
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


_QLEAVES = ("packed", "scale", "zero", "g_idx")
_QSTATIC = ("bits", "group_size", "shape", "orientation")


def _split_quantized(params):
    """({name: array or dict of QuantizedArray leaves}, {name: static fields})."""
    from qdlm_jax.quant.qarray import QuantizedArray  # noqa: PLC0415 (import cycle)
    tree, quantized = {}, {}
    for p, v in params.items():
        k = path_str(p)
        if isinstance(v, QuantizedArray):
            tree[k] = {f: getattr(v, f) for f in _QLEAVES if getattr(v, f) is not None}
            quantized[k] = {f: (list(getattr(v, f)) if f == "shape" else getattr(v, f))
                            for f in _QSTATIC}
        else:
            tree[k] = v
    return tree, quantized


def save_checkpoint(path: str | os.PathLike, config: ModelConfig,
                    params: dict[ParamPath, object], *, extra_files: Iterable[Path] = (),
                    overwrite: bool = False, meta: dict | None = None) -> Path:
    """Writes the checkpoint (float or packed quantized params) to a temp dir beside `path`,
    then renames it into place. `meta` (JSON) records e.g. how the model was quantized."""
    tree, quantized = _split_quantized(params)
    with atomic_dir(path, overwrite=overwrite, extra_files=extra_files) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", tree)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"format": FORMAT, "model": config.to_dict(), "quantized": quantized,
             "meta": meta or {}}, indent=2))
    return Path(path).absolute()


def read_meta(path: str | os.PathLike) -> dict:
    """The whole qdlm_config.json of a checkpoint."""
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read checkpoint config ({e})") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    f = Path(path) / CONFIG_FILE
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format={meta.get('format')!r}, expected {FORMAT}")
    return ModelConfig.from_dict(meta["model"], source=str(f))


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    sharding_fn: Callable | None = None
                    ) -> tuple[ModelConfig, dict[ParamPath, jax.Array]]:
    path = Path(path).absolute()
    config = read_config(path)
    quantized = read_meta(path).get("quantized", {})
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(p, m, shard):
        sharding = (sharding_fn(p, tuple(m.shape)) if shard and sharding_fn is not None
                    else single)
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / "params")
        tree_meta = getattr(meta, "item_metadata", meta)
        target = {}
        for k, m in dict(tree_meta).items():
            p = parse_path(k)
            if k in quantized:  # packed leaves stay whole on one device for now
                target[k] = {f: leaf(p, mm, False) for f, mm in dict(m).items()}
            else:
                target[k] = leaf(p, m, True)
        tree = ckptr.restore(path / "params", target)
    params = {}
    for k, v in tree.items():
        if k in quantized:
            from qdlm_jax.quant.qarray import QuantizedArray  # noqa: PLC0415
            static = dict(quantized[k])
            static["shape"] = tuple(static["shape"])
            params[parse_path(k)] = QuantizedArray(**dict(v), **static)
        else:
            params[parse_path(k)] = v
    if dtype is not None:
        params = {p: (v.astype(dtype) if hasattr(v, "astype") and (
            v.dtype.kind == "f" or v.dtype.name == "bfloat16") else v)
            for p, v in params.items()}
        config = config.replace(param_dtype=dtype, dtype=dtype)
    return config, params
