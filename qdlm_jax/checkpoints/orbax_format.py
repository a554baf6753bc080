"""Our own checkpoints: orbax-saved params plus the model config, written atomically.

Layout of a checkpoint directory:
    qdlm_config.json   {"format": 1, "model": the model config's fields (`ModelConfig`, or
                        `DiffusionGemmaConfig` with "family": "diffusion_gemma"),
                        "quantized": {param name: static QuantizedArray fields}, "meta": {...}}
    params/            orbax StandardCheckpointer tree {"layers.0.q_proj.kernel": array, ...};
    params_0001/ ...   further parts of the same tree when it was written in parts (listed
                       under "parts" in qdlm_config.json; a checkpoint without the key has
                       the one part params/): the streaming pass writes one block a part;
                       a quantized kernel is a sub-tree {"packed", "scale"[, "zero", "g_idx"]}
                       of real packed integers (a W4 checkpoint stores half a byte a weight);
                       a DAQ kernel (`BinaryPlanesArray`) is a sub-tree {"signs", "row", "col",
                       "slot_block"} with static fields {"kind": "binary_planes", ...};
                       packed MoE experts (`QuantizedExperts`) a sub-tree {"packed", "scale"[,
                       "zero"]} with static fields {"kind": "experts", "bits", "group_size",
                       "shape"}; DAQ experts (`BinaryPlanesExperts`) a sub-tree {"signs",
                       "row", "col", "slot_block"} with {"kind": "binary_planes_experts",
                       "block", "shape"};
                       an `ActKernel` (weight-activation methods) is a sub-tree {"weight"
                       (array, packed or packed-experts sub-tree)[, "r1", "perm", "r2", "act_range",
                       "kv_clip"]} whose static fields ("kind": "act_kernel", transform kind,
                       ActSpec, KVSpec and kv_rotate of K/V quantization) are in "quantized"
    tokenizer.json     (copied from the source when there is one)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import jax
import orbax.checkpoint as ocp

from qdlm_jax.errors import CheckpointError
from qdlm_jax.fsutil import atomic_dir
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig
from qdlm_jax.models.params import ParamPath, parse_path, path_str
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel, OnlineTransform
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.kv_core import KVSpec
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts

CONFIG_FILE = "qdlm_config.json"
FORMAT = 1


def is_qdlm_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


PACKED_TYPES = (QuantizedArray, BinaryPlanesArray, QuantizedExperts, BinaryPlanesExperts)
_QLEAVES = ("packed", "scale", "zero", "g_idx")
_QSTATIC = ("bits", "group_size", "shape", "orientation")
_BLEAVES = ("signs", "row", "col", "slot_block")
_BSTATIC = ("block", "shape", "orientation")
_EXPERT_LEAVES = ("packed", "scale", "zero")


def _split_qarray(v):
    if isinstance(v, QuantizedExperts):
        return ({f: getattr(v, f) for f in _EXPERT_LEAVES if getattr(v, f) is not None},
                {"kind": "experts", "bits": v.bits, "group_size": v.group_size,
                 "shape": list(v.shape)})
    if isinstance(v, BinaryPlanesExperts):
        return ({f: getattr(v, f) for f in _BLEAVES},
                {"kind": "binary_planes_experts", "block": v.block, "shape": list(v.shape)})
    if isinstance(v, BinaryPlanesArray):
        return ({f: getattr(v, f) for f in _BLEAVES},
                {"kind": "binary_planes", "block": v.block, "shape": list(v.shape),
                 "orientation": v.orientation})
    return ({f: getattr(v, f) for f in _QLEAVES if getattr(v, f) is not None},
            {f: (list(getattr(v, f)) if f == "shape" else getattr(v, f)) for f in _QSTATIC})


def _split_quantized(params):
    """({name: array or dict of quantized leaves}, {name: static fields})."""
    tree, quantized = {}, {}
    for p, v in params.items():
        k = path_str(p)
        if isinstance(v, PACKED_TYPES):
            tree[k], quantized[k] = _split_qarray(v)
        elif isinstance(v, ActKernel):
            sub, static = {}, {"kind": "act_kernel", "weight": None, "transform": None,
                               "act": None}
            if isinstance(v.weight, PACKED_TYPES):
                sub["weight"], static["weight"] = _split_qarray(v.weight)
            else:
                sub["weight"] = v.weight
            if v.transform is not None:
                t = v.transform
                static["transform"] = {"kind": t.kind, "n_heads": t.n_heads}
                sub.update({f: getattr(t, f) for f in ("r1", "perm", "r2")
                            if getattr(t, f) is not None})
            if v.act is not None:
                static["act"] = dataclasses.asdict(v.act)
            if v.act_range is not None:
                sub["act_range"] = v.act_range
            if v.kv is not None:
                static["kv"] = dataclasses.asdict(v.kv)
                static["kv_rotate"] = v.kv_rotate
            if v.kv_clip is not None:
                sub["kv_clip"] = v.kv_clip
            tree[k], quantized[k] = sub, static
        else:
            tree[k] = v
    return tree, quantized


def _join_quantized(v: dict, static: dict):
    """Inverse of `_split_quantized` for one entry."""

    def qarray(leaves, fields):
        fields = dict(fields)
        fields["shape"] = tuple(fields["shape"])
        kind = fields.pop("kind", None)
        if kind == "binary_planes":
            return BinaryPlanesArray(**dict(leaves), **fields)
        if kind == "experts":
            return QuantizedExperts(**dict(leaves), **fields)
        if kind == "binary_planes_experts":
            return BinaryPlanesExperts(**dict(leaves), **fields)
        return QuantizedArray(**dict(leaves), **fields)

    if static.get("kind") != "act_kernel":
        return qarray(v, static)
    weight = v["weight"] if static["weight"] is None else qarray(v["weight"], static["weight"])
    transform = None
    if static["transform"] is not None:
        transform = OnlineTransform(**{f: v[f] for f in ("r1", "perm", "r2") if f in v},
                                    **static["transform"])
    act = None if static["act"] is None else ActSpec(**static["act"])
    kv = None if static.get("kv") is None else KVSpec(**static["kv"])
    return ActKernel(weight=weight, transform=transform, act_range=v.get("act_range"), act=act,
                     kv=kv, kv_rotate=bool(static.get("kv_rotate", False)),
                     kv_clip=v.get("kv_clip"))


def save_checkpoint(path: str | os.PathLike, config: ModelConfig | DiffusionGemmaConfig,
                    params: dict[ParamPath, object], *, extra_files: Iterable[Path] = (),
                    overwrite: bool = False, meta: dict | None = None,
                    parts: Iterable[dict[ParamPath, object]] = ()) -> Path:
    """Writes the checkpoint (float or packed quantized params) to a temp dir beside `path`,
    then renames it into place. `meta` (JSON) records e.g. how the model was quantized.
    `parts` (an iterable, e.g. a generator yielding one block's params at a time) are further
    params written after `params`, each into its own orbax tree, so that a model larger than
    memory is written while only one part is held; loading merges them back into one dict.
    The write is this process's alone (in a multi-process job the caller gathers the params
    and one process writes): orbax is told that only this process takes part, so it waits
    at no barrier for the others."""
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    quantized, names, seen = {}, [], set()
    with atomic_dir(path, overwrite=overwrite, extra_files=extra_files) as tmp:
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
            for k, part in enumerate(itertools.chain([params], parts)):
                tree, static = _split_quantized(part)
                clash = seen.intersection(tree)
                if clash:
                    raise CheckpointError(f"{path}: part {k} repeats {sorted(clash)[:3]} of an "
                                          "earlier part")
                seen.update(tree)
                quantized.update(static)
                names.append("params" if k == 0 else f"params_{k:04d}")
                ckptr.save(tmp / names[-1], tree)
                ckptr.wait_until_finished()
                del tree, part
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"format": FORMAT, "model": config.to_dict(), "quantized": quantized,
             "meta": meta or {}, "parts": names}, indent=2))
    return Path(path).absolute()


def _as_dict(tree):
    """Nested mappings (orbax metadata or restored trees) as plain dicts."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _as_dict(v) for k, v in dict(tree).items()}
    return tree


def read_meta(path: str | os.PathLike) -> dict:
    """The whole qdlm_config.json of a checkpoint."""
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read checkpoint config ({e})") from None


def read_config(path: str | os.PathLike) -> ModelConfig | DiffusionGemmaConfig:
    """The model config a checkpoint records, of its family's config class."""
    f = Path(path) / CONFIG_FILE
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format={meta.get('format')!r}, expected {FORMAT}")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{f}: missing the \"model\" config object")
    if model.get("family") == GEMMA_FAMILY:
        return DiffusionGemmaConfig.from_dict(model, source=str(f))
    return ModelConfig.from_dict(model, source=str(f))


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    sharding_fn: Callable | None = None
                    ) -> tuple[ModelConfig | DiffusionGemmaConfig, dict[ParamPath, jax.Array]]:
    path = Path(path).absolute()
    config = read_config(path)
    about = read_meta(path)
    quantized = about.get("quantized", {})
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(p, m, shard):
        sharding = (sharding_fn(p, tuple(m.shape)) if shard and sharding_fn is not None
                    else single)
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    tree = {}
    with ocp.StandardCheckpointer() as ckptr:
        for part in about.get("parts", ["params"]):
            meta = ckptr.metadata(path / part)
            tree_meta = getattr(meta, "item_metadata", meta)
            target = {}
            for k, m in dict(tree_meta).items():
                p = parse_path(k)
                if k in quantized:  # packed leaves stay whole on one device for now
                    target[k] = jax.tree.map(lambda mm: leaf(p, mm, False), _as_dict(m),
                                             is_leaf=lambda x: hasattr(x, "shape"))
                else:
                    target[k] = leaf(p, m, True)
            tree.update(ckptr.restore(path / part, target))
    params = {}
    for k, v in tree.items():
        if k in quantized:
            params[parse_path(k)] = _join_quantized(_as_dict(v), quantized[k])
        else:
            params[parse_path(k)] = v
    if dtype is not None:
        params = {p: (v.astype(dtype) if hasattr(v, "astype") and (
            v.dtype.kind == "f" or v.dtype.name == "bfloat16") else v)
            for p, v in params.items()}
        config = config.replace(param_dtype=dtype, dtype=dtype)
    return config, params
