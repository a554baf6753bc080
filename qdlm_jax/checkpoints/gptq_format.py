"""The Hugging Face GPTQ checkpoint layout (what transformers' GPTQ integration and GPTQModel
load), written from and read into packed `QuantizedArray`s.

Every quantized linear `P.weight` ([out, in] in the hub layout) becomes, with
`pack = 32 // bits` values per int32 (bits 2, 4 or 8):

    P.qweight  int32 [in // pack, out]      qweight[r, o]  = sum_j code[r*pack + j, o] << (bits*j)
    P.qzeros   int32 [groups, out // pack]  qzeros[g, c]   = sum_j ((zero[g, c*pack + j] - 1)
                                                                   mod 2**bits) << (bits*j)
    P.scales   fp16  [groups, out]
    P.g_idx    int32 [in]                   group of each input channel (i // group_size, or
                                            the act-order permutation's groups)

    W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])

The zero points are stored minus one (`checkpoint_format: "gptq"`, GPTQ's v1 layout that the
loaders expect); a zero point of 0 (a group whose minimum is >= 0, rare for weights) wraps to
2**bits - 1, which this reader undoes but v1 kernels read as 2**bits. Everything else (the
embedding, norms, LM head, biases) keeps the hub names and its dtype. `config.json` carries
`quantization_config` = {quant_method: "gptq", bits, group_size (-1: per channel),
desc_act, sym, checkpoint_format: "gptq"}. Scales are stored in fp16 as the format requires
(a bf16 or fp32 scale is rounded once).

What the layout can represent (`GPTQ_FORMAT`), checked before anything is written
(`check_representable`): packed 2/4/8-bit weights with one bits / group size / symmetry for
the whole model, act-order permutations, and whatever was folded into the weights and norms
offline (AWQ's and SmoothQuant's scales, QuaRot's and DuQuant's fused rotations). It has no
place for online input transforms (QuaRot's Hadamards, DuQuant's rotations at run time),
activation quantization, K/V quantization or DAQ's binary planes: a model that uses any of
them is refused with one line naming the feature, since its export would compute something
else. A group as wide as a linear's input is one group in any group size that equals that
width, so a model quantized with g128 whose 128-wide linears hold one group exports as
group_size 128.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from qdlm_jax.checkpoints.export_common import (
    group_of,
    module_name,
    one_setting,
    packed_linears,
    write_quantized_dir,
)
from qdlm_jax.checkpoints.hf import CheckpointDir, key_map, read_tensors
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.params import ParamPath
from qdlm_jax.quant.act_kernel import ActKernel, inner_weight
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts

GPTQ_BITS = (2, 4, 8)
# What the layout holds and what it lacks (the module docstring; `qdlm export --help`).
GPTQ_FORMAT = ("packed 2/4/8-bit weights, one bits / group size / symmetry per model, "
               "act-order; no online transforms, activation or K/V quantization, or binary "
               "planes")


def _name(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)


def check_representable(params: dict) -> None:
    """Raises `CheckpointError` (one line: the feature, an example tensor, what the layout
    lacks) unless the GPTQ layout can hold the packed model exactly."""
    features: dict[str, list[str]] = {}
    for path, v in params.items():
        where = _name(path)
        if isinstance(inner_weight(v), (BinaryPlanesArray, BinaryPlanesExperts)):
            features.setdefault("DAQ's binary planes (sums of sign matrices)", []).append(where)
        if isinstance(v, QuantizedExperts):
            features.setdefault("routed experts packed per expert (QuantizedExperts: one 3-D "
                                "tensor per layer)", []).append(where)
        if not isinstance(v, ActKernel):
            continue
        if v.transform is not None:
            features.setdefault(f"online {v.transform.kind} transforms of the linear inputs "
                                "(QuaRot / DuQuant)", []).append(where)
        if v.act is not None:
            features.setdefault(f"{v.act.bits}-bit activation quantization", []).append(where)
        if v.kv is not None or v.kv_rotate or v.kv_clip is not None:
            features.setdefault("K/V quantization inside attention", []).append(where)
    if features:
        text = "; ".join(f"{f} (e.g. {paths[0]}, {len(paths)} tensors)"
                         for f, paths in features.items())
        raise CheckpointError(f"export --format gptq: the model uses {text}; the GPTQ layout "
                              "has no place for them, so its export would compute something "
                              "else (weight-only RTN / GPTQ / AWQ models export)")


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """int32 [rows // pack, cols]: `pack` consecutive rows per int32, row j at bits*j."""
    pack = 32 // bits
    v = values.astype(np.uint32).reshape(values.shape[0] // pack, pack, values.shape[1])
    out = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(pack):
        out |= v[:, j, :] << np.uint32(bits * j)
    return out.view(np.int32)


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_rows`: int32 [r, c] -> uint8 [r * pack, c]."""
    pack = 32 // bits
    p = packed.view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    out = np.stack([(p >> np.uint32(bits * j)) & mask for j in range(pack)], axis=1)
    return out.reshape(p.shape[0] * pack, p.shape[1]).astype(np.uint8)


def quantization_config(params: dict) -> dict:
    """The `quantization_config` of a packed model; one bits / group / symmetry for all."""
    check_representable(params)
    quantized = packed_linears(params)
    if not quantized:
        raise CheckpointError("export --format gptq: the model has no quantized linear "
                              "(quantize it first: qdlm quantize)")
    qs = list(quantized.values())
    bits, sym = (one_setting(quantized, f, "--format gptq") for f in ("bits", "sym"))
    groups = {g for g in map(group_of, qs) if g is not None}
    if len(groups) > 1:
        raise CheckpointError(f"export --format gptq: linears use group sizes {sorted(groups)};"
                              " the GPTQ layout has one per model (quantize with one "
                              "--config.group_size that divides every input width, or -1)")
    group = groups.pop() if groups else -1
    if group != -1:  # single-group linears fit only where their width is that group
        odd = [(_name(p), q.storage_shape[1]) for p, q in quantized.items()
               if group_of(q) is None and q.storage_shape[1] != group]
        if odd:
            raise CheckpointError(
                f"export --format gptq: {odd[0][0]} is one group over its {odd[0][1]} inputs "
                f"while other linears use groups of {group}; quantize with "
                "--config.group_size=-1 or a group size that divides every input width")
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"export --format gptq: {bits}-bit weights; the GPTQ layout "
                              f"written here packs {GPTQ_BITS} bits (3-bit has no int32 "
                              "boundary packing here)")
    return {"quant_method": "gptq", "bits": bits, "group_size": group,
            "desc_act": any(q.g_idx is not None for q in qs), "sym": bool(sym),
            "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01,
            "static_groups": False}


def gptq_tensors(prefix: str, q: QuantizedArray) -> dict[str, np.ndarray]:
    """The four GPTQ tensors of one packed linear (module docstring)."""
    out_dim, n_in = q.storage_shape
    codes = np.asarray(q.codes()).T  # [in, out]
    zeros = np.asarray(q.zeros()).astype(np.int64).T  # [groups, out]
    group = n_in if q.group_size == -1 else q.group_size
    g_idx = (np.asarray(q.g_idx, np.int32) if q.g_idx is not None
             else (np.arange(n_in) // group).astype(np.int32))
    stored_zeros = (zeros - 1) % (1 << q.bits)
    return {f"{prefix}.qweight": pack_rows(codes, q.bits),
            f"{prefix}.qzeros": pack_rows(stored_zeros.T, q.bits).T.copy(),
            f"{prefix}.scales": np.asarray(q.scale, np.float32).T.astype(np.float16),
            f"{prefix}.g_idx": g_idx}


def save_gptq(config: ModelConfig, params: dict, out_dir: str | os.PathLike, *,
              extra_files: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """Writes the packed model in the GPTQ layout (one safetensors file + config.json)."""
    qcfg = quantization_config(params)
    quantized = packed_linears(params)
    tensors: dict[str, np.ndarray] = {}
    for m in key_map(config):
        v = params[m.path]
        if m.path in quantized:
            tensors.update(gptq_tensors(module_name(m.hf_name), quantized[m.path]))
            continue
        arr = np.asarray(inner_weight(v))
        tensors[m.hf_name] = np.ascontiguousarray(arr.T if m.transpose else arr)
    return write_quantized_dir(config, tensors, qcfg, out_dir, extra_files=extra_files,
                               overwrite=overwrite)


def is_gptq_checkpoint(path: str | os.PathLike) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        q = json.loads(f.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return q.get("quant_method") == "gptq"


def load_gptq(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """A GPTQ-layout checkpoint as our params: packed `QuantizedArray`s for the quantized
    linears, arrays for the rest; `dtype` ("float32", "bfloat16") sets the model's compute
    and param dtype and casts the float tensors (default: the config's)."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    q = hf.get("quantization_config") or {}
    bits, fmt = q.get("bits"), q.get("checkpoint_format", "gptq")
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"{path}/config.json: quantization_config.bits={bits!r}; this "
                              f"reader supports {GPTQ_BITS}")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{path}/config.json: checkpoint_format={fmt!r}; expected "
                              "'gptq' or 'gptq_v2'")
    ckpt = CheckpointDir(path)  # indexes the files; the float layout's checks are not run
    config = ckpt.config
    plain, params = [], {}
    for m in key_map(config):
        prefix = module_name(m.hf_name) if m.transpose else None
        if prefix is None or f"{prefix}.qweight" not in ckpt.where:
            if m.hf_name not in ckpt.where:
                raise CheckpointError(f"{path}: missing tensor {m.hf_name!r} (and no "
                                      f"{prefix}.qweight)")
            plain.append(m)
            continue
        codes = unpack_rows(np.asarray(ckpt.get(f"{prefix}.qweight")), bits)  # [in, out]
        scales = np.asarray(ckpt.get(f"{prefix}.scales"), np.float32)  # [groups, out]
        zeros = unpack_rows(np.asarray(ckpt.get(f"{prefix}.qzeros")).T.copy(), bits).T
        zeros = zeros.astype(np.int64)[:, : scales.shape[1]]
        if fmt == "gptq":
            zeros = (zeros + 1) % (1 << bits)
        g_idx = np.asarray(ckpt.get(f"{prefix}.g_idx"), np.int32)
        n_in, n_groups = codes.shape[0], scales.shape[0]
        group = n_in // n_groups
        contiguous = np.array_equal(g_idx, np.arange(n_in) // group)
        sym = bool(q.get("sym", False)) and bool(np.all(zeros == 1 << (bits - 1)))
        params[m.path] = QuantizedArray.from_codes(
            codes.T, scales.T, zeros.T.astype(np.float32), bits=bits, group_size=group,
            sym=sym, g_idx=None if contiguous else g_idx)
    params.update(read_tensors(ckpt, plain, dtype=dtype))
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    return config, params
