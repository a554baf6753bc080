"""The compressed-tensors checkpoint layout (what transformers' compressed-tensors integration
and the `compressed-tensors` package's decompressors read), written from packed models.

Every quantized linear `P.weight` ([out, in] in the hub layout; codes `c` in [0, 2**b), zero
points `z`, scales `s` per output channel and group of `in`) becomes one of two formats:

    "pack-quantized" (any b in 2..8):
        P.weight_packed      int32 [out, ceil(in * b / 32)]  c densely bit-packed along `in`:
                                                              element j at bits j*b .. j*b+b-1
        P.weight_scale       [out, groups]                    s, in the model's scale dtype
        P.weight_zero_point  int32 [ceil(out * b / 32), groups]  z packed along `out`
                                                              (asymmetric weights only)
        P.weight_shape       int64 [2] = (out, in)
    "int-quantized" (b = 8):
        P.weight             int8 [out, in]                   c - 128
        P.weight_scale       [out, groups]
        P.weight_zero_point  int8 [out, groups]               z - 128 (asymmetric only)

The package stores signed values q = c - 2**(b-1) and zero points zp = z - 2**(b-1), and its
packer adds 2**(b-1) back, so the stored bits are c and z themselves. Its decompressor computes
(q - zp) * s = (c - z) * s in the scale's dtype, which is `QuantizedArray.dequantize` bit for
bit (an integer of at most 8 bits times a scale is exact in fp32 and rounds once to bf16).

`config.json` carries `quantization_config` = {quant_method: "compressed-tensors", format,
quantization_status: "compressed", config_groups: {group_0: {targets: ["Linear"], weights:
{num_bits, type: int, symmetric, strategy: group | channel, group_size}, input_activations:
None, or {num_bits, type: int, symmetric: true, strategy: token, dynamic: true} when the
linears' inputs are quantized per token (W8A8, W4A8)}}, ignore: the linears kept in float}.
One scheme covers every quantized linear (transformers' loader reads one scheme for them).

Routed experts (`QuantizedExperts`, DiffusionGemma's fused `experts.gate_up_proj` [E, 2I, H]
and `experts.down_proj` [E, H, I]): transformers' compressed-tensors loader reads quantized
experts only through a per-expert merge that the model type's conversion mapping defines, and
DiffusionGemma has none (transformers 5.23), so packed fused experts would not load. An export
of a model with packed experts is refused unless `dequantize_experts=True`, which writes them
dequantized in the model's dtype (the same weights, no longer compressed).

Refused with one line before anything is written (`check_representable`): DAQ's binary
planes, online input transforms (QuaRot / DuQuant at run time), K/V quantization, static or
per-group activation scales, asymmetric or clipped activations, and linears that mix bits,
symmetry or group size.
"""

from __future__ import annotations

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
from qdlm_jax.checkpoints.hf import key_map
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig
from qdlm_jax.models.params import path_str
from qdlm_jax.quant.act_kernel import ActKernel, inner_weight
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts

# DiffusionGemma's vision tower: linears in transformers' model that the text export lacks.
VISION_IGNORE = (r"re:^model\.encoder\.vision_tower\..*", r"re:^model\.encoder\.embed_vision\..*")
CT_FORMAT = ("packed 2-8-bit weights (one bits / group size / symmetry per model), optional "
             "8-bit dynamic per-token activations; no online transforms, K/V quantization or "
             "binary planes; packed DiffusionGemma experts only dequantized")


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"export --format compressed-tensors: {what}")


def check_representable(params: dict, *, dequantize_experts: bool = False) -> None:
    """Raises `CheckpointError` (one line: the feature, an example tensor, why) unless the
    layout holds the packed model (module docstring)."""
    features: dict[str, list[str]] = {}
    for path, v in params.items():
        w, where = inner_weight(v), path_str(path)
        if isinstance(w, (BinaryPlanesArray, BinaryPlanesExperts)):
            features.setdefault("DAQ's binary planes", []).append(where)
        if isinstance(w, QuantizedExperts) and not dequantize_experts:
            features.setdefault(
                "packed routed experts (transformers' compressed-tensors loader has no "
                "per-expert merge for DiffusionGemma's fused experts; pass "
                "--dequantize-experts to write them dequantized)", []).append(where)
        if not isinstance(v, ActKernel):
            continue
        if v.transform is not None:
            features.setdefault(f"online {v.transform.kind} transforms of the linear inputs",
                                []).append(where)
        if v.kv is not None or v.kv_rotate or v.kv_clip is not None:
            features.setdefault("K/V quantization inside attention", []).append(where)
        a = v.act
        if a is not None and not isinstance(w, QuantizedExperts) and (
                a.granularity != "per_token" or not a.sym or a.clip_ratio != 1.0
                or a.bits != 8):
            features.setdefault(f"{a.bits}-bit {a.granularity} activations (sym={a.sym}, "
                                f"clip {a.clip_ratio}; the layout holds 8-bit symmetric "
                                "per-token ones)", []).append(where)
    if features:
        text = "; ".join(f"{f} (e.g. {paths[0]}, {len(paths)} tensors)"
                         for f, paths in features.items())
        raise _refuse(f"the model uses {text}")


def quantization_config(config, params: dict, *, dequantize_experts: bool = False) -> dict:
    """The `quantization_config` of a packed model (module docstring)."""
    check_representable(params, dequantize_experts=dequantize_experts)
    linears = packed_linears(params)
    if not linears:
        raise _refuse("the model has no quantized linear (quantize it first: qdlm quantize)")
    bits, sym = (one_setting(linears, f, "--format compressed-tensors") for f in ("bits", "sym"))
    groups = {group_of(q) for q in linears.values()}
    if len(groups) > 1:
        raise _refuse(f"linears mix group sizes ({sorted(g or -1 for g in groups)}, -1: one "
                      "group over the input); quantize with one --config.group_size that "
                      "divides every input width, or -1")
    acts = {params[p].act if isinstance(params[p], ActKernel) else None for p in linears}
    if len(acts) > 1:
        raise _refuse("some linears quantize their inputs and others do not; the layout has "
                      "one scheme for every linear")
    sym, group, act = bool(sym), groups.pop(), acts.pop()
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group is None else "group", "group_size": group,
               "observer": "minmax"}
    activations = None if act is None else {
        "num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
        "observer": None}
    fmt = "int-quantized" if bits == 8 else "pack-quantized"
    kept = sorted(module_name(m.hf_name) for m in key_map(config)
                  if m.transpose and m.hf_name.endswith(".weight") and m.path not in linears)
    if isinstance(config, DiffusionGemmaConfig):
        kept += list(VISION_IGNORE)
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations,
                                          "output_activations": None, "format": fmt}},
            "ignore": ["lm_head"] + kept}


def describe(config, params: dict) -> str:
    """One line on what an export of `params` holds (format, scheme, what stays in float)."""
    q = quantization_config(config, params, dequantize_experts=True)
    w = q["config_groups"]["group_0"]["weights"]
    a = q["config_groups"]["group_0"]["input_activations"]
    experts = sum(isinstance(inner_weight(v), QuantizedExperts) for v in params.values())
    group = "per channel" if w["group_size"] is None else f"group {w['group_size']}"
    text = (f"compressed-tensors {q['format']}, W{w['num_bits']} {group} "
            f"{'sym' if w['symmetric'] else 'asym'}"
            f"{', 8-bit per-token activations' if a else ''}, "
            f"{len(packed_linears(params))} linears packed, {len(q['ignore'])} kept in float")
    return text + (f", {experts} expert tensors dequantized" if experts else "")


# ---- packing --------------------------------------------------------------------------------

def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """int32 [rows, ceil(cols * bits / 32)]: each row's values (in [0, 2**bits)) densely
    bit-packed, element j at bit positions j*bits .. j*bits+bits-1 of the row's little-endian
    word stream."""
    v = np.asarray(values, np.uint8)
    rows, cols = v.shape
    words = -(-cols * bits // 32)
    stream = np.unpackbits(v[..., None], axis=-1, count=bits, bitorder="little")
    stream = stream.reshape(rows, cols * bits)
    stream = np.pad(stream, ((0, 0), (0, words * 32 - cols * bits)))
    return np.packbits(stream, axis=-1, bitorder="little").view("<u4").astype(np.uint32) \
        .view(np.int32).reshape(rows, words)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of `pack_int32`: uint8 [rows, cols]."""
    p = np.ascontiguousarray(packed, np.int32).astype("<i4")
    stream = np.unpackbits(p.view(np.uint8), axis=-1, bitorder="little")
    stream = stream[:, : cols * bits].reshape(p.shape[0], cols, bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., 0]


def linear_tensors(prefix: str, q: QuantizedArray, fmt: str) -> dict[str, np.ndarray]:
    """The tensors of one packed linear in `fmt` (module docstring)."""
    if q.g_idx is not None:
        raise _refuse(f"{prefix}: act-order group indices; the layout has contiguous groups")
    codes = np.asarray(q.codes())  # [out, in]
    scale = np.asarray(q.scale)  # [out, groups]
    zeros = None if q.sym else np.asarray(q.zeros()).astype(np.int64)
    half = 1 << (q.bits - 1)
    if fmt == "int-quantized":
        out = {f"{prefix}.weight": (codes.astype(np.int16) - half).astype(np.int8),
               f"{prefix}.weight_scale": scale}
        if zeros is not None:
            out[f"{prefix}.weight_zero_point"] = (zeros - half).astype(np.int8)
        return out
    out = {f"{prefix}.weight_packed": pack_int32(codes, q.bits),
           f"{prefix}.weight_scale": scale,
           f"{prefix}.weight_shape": np.asarray(q.storage_shape, np.int64)}
    if zeros is not None:
        out[f"{prefix}.weight_zero_point"] = np.ascontiguousarray(
            pack_int32(zeros.T.astype(np.uint8), q.bits).T)
    return out


def save_compressed_tensors(config, params: dict, out_dir: str | os.PathLike, *,
                            dequantize_experts: bool = False, extra_files: Iterable[Path] = (),
                            overwrite: bool = False) -> Path:
    """Writes the packed model in the compressed-tensors layout (one safetensors file +
    config.json with its `quantization_config`); the directory appears only when complete."""
    qcfg = quantization_config(config, params, dequantize_experts=dequantize_experts)
    fmt = qcfg["format"]
    linears = packed_linears(params)
    tensors: dict[str, np.ndarray] = {}
    for m in key_map(config):
        if m.path in linears:
            tensors.update(linear_tensors(module_name(m.hf_name), linears[m.path], fmt))
            continue
        w = inner_weight(params[m.path])
        arr = np.asarray(w.dequantize() if isinstance(w, QuantizedExperts) else w)
        tensors[m.hf_name] = np.ascontiguousarray(np.swapaxes(arr, -1, -2) if m.transpose
                                                  else arr)
    return write_quantized_dir(config, tensors, qcfg, out_dir, extra_files=extra_files,
                               overwrite=overwrite)


__all__ = ["CT_FORMAT", "check_representable", "describe", "quantization_config", "pack_int32",
           "unpack_int32", "linear_tensors", "save_compressed_tensors"]
