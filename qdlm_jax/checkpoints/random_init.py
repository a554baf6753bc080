"""Tiny random checkpoints in the real hub layouts, for tests and the offline demo.

The tensor names are spelled out here as the hub checkpoints spell them (not derived from the
converters' key maps), so a converter that maps a name wrongly fails against these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from qdlm_jax.checkpoints.hf import config_to_hf
from qdlm_jax.checkpoints.safetensors_io import write_safetensors
from qdlm_jax.models.config import ModelConfig

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tiny_config(family: str, **overrides) -> ModelConfig:
    """1-2 layer configs with the family's structure (GQA and biases for Dream)."""
    if family == "llada":
        cfg = dict(family="llada", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=4, intermediate_size=96, rope_theta=500000.0, rms_norm_eps=1e-5,
                   qkv_bias=False, rope_full_precision=True, mask_token_id=250,
                   pad_token_id=251, eos_token_id=251, bos_token_id=252, eot_token_id=253,
                   max_position_embeddings=512)
    elif family == "dream":
        cfg = dict(family="dream", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_size=96, rope_theta=1e6, rms_norm_eps=1e-6,
                   qkv_bias=True, rope_full_precision=False, mask_token_id=250,
                   pad_token_id=251, eos_token_id=251, bos_token_id=252,
                   max_position_embeddings=512)
    else:
        raise ValueError(f"tiny_config: unknown family {family!r}; expected 'llada' or 'dream'")
    cfg.update(overrides)
    return ModelConfig(**cfg)


def hf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights named and shaped as in the hub checkpoint ([out, in] Linear weights)."""
    c = config
    rng = np.random.default_rng(seed)
    dt = _NP[c.param_dtype]
    d, hd, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    qd, kvd = c.num_heads * hd, c.num_kv_heads * hd

    def w(*shape, std=None):
        std = std if std is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * std).astype(dt)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(dt)

    t: dict[str, np.ndarray] = {}
    if c.family == "llada":
        p = "model.transformer"
        t[f"{p}.wte.weight"] = w(v, d, std=1.0)
        for i in range(c.num_layers):
            b = f"{p}.blocks.{i}"
            t[f"{b}.attn_norm.weight"] = norm()
            t[f"{b}.q_proj.weight"] = w(qd, d)
            t[f"{b}.k_proj.weight"] = w(kvd, d)
            t[f"{b}.v_proj.weight"] = w(kvd, d)
            t[f"{b}.attn_out.weight"] = w(d, qd)
            t[f"{b}.ff_norm.weight"] = norm()
            t[f"{b}.ff_proj.weight"] = w(f, d)
            t[f"{b}.up_proj.weight"] = w(f, d)
            t[f"{b}.ff_out.weight"] = w(d, f)
        t[f"{p}.ln_f.weight"] = norm()
        t[f"{p}.ff_out.weight"] = w(v, d)
    else:
        t["model.embed_tokens.weight"] = w(v, d, std=1.0)
        for i in range(c.num_layers):
            b = f"model.layers.{i}"
            t[f"{b}.input_layernorm.weight"] = norm()
            for name, out in (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)):
                t[f"{b}.self_attn.{name}.weight"] = w(out, d)
                t[f"{b}.self_attn.{name}.bias"] = w(out, std=0.1)
            t[f"{b}.self_attn.o_proj.weight"] = w(d, qd)
            t[f"{b}.post_attention_layernorm.weight"] = norm()
            t[f"{b}.mlp.gate_proj.weight"] = w(f, d)
            t[f"{b}.mlp.up_proj.weight"] = w(f, d)
            t[f"{b}.mlp.down_proj.weight"] = w(d, f)
        t["model.norm.weight"] = norm()
        t["lm_head.weight"] = w(v, d)
    return t


def write_hf_checkpoint(out_dir: str | os.PathLike, config: ModelConfig,
                        tensors: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                        num_shards: int = 1, fmt: str = "safetensors") -> Path:
    """Writes a hub-layout directory: config.json + weights (1 file, or shards + index).

    fmt="bin" writes `pytorch_model.bin` files through torch instead of safetensors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else hf_tensors(config, seed)
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    names = list(tensors)
    groups = [names[i::num_shards] for i in range(num_shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    files = ([f"{stem}.{ext}"] if num_shards == 1 else
             [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}" for i in range(num_shards)])
    weight_map = {}
    for fname, group in zip(files, groups):
        if fmt == "safetensors":
            write_safetensors(out / fname, {k: tensors[k] for k in group}, {"format": "pt"})
        else:
            import torch
            sd = {}
            for k in group:
                a = tensors[k]
                if a.dtype == ml_dtypes.bfloat16:
                    sd[k] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
                else:
                    sd[k] = torch.from_numpy(np.ascontiguousarray(a))
            torch.save(sd, out / fname)
        weight_map.update({k: fname for k in group})
    if num_shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else \
            "pytorch_model.bin.index.json"
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
