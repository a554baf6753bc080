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
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig, default_layer_types

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tiny_config(family: str, **overrides) -> ModelConfig | DiffusionGemmaConfig:
    """1-2 layer configs with the family's structure (GQA and biases for Dream; for
    DiffusionGemma one sliding and one full layer, GQA on both, K = V on the full one, a
    global head twice the sliding one, 4 experts top-2)."""
    if family == GEMMA_FAMILY:
        num_layers = overrides.pop("num_layers", 2)
        cfg = dict(vocab_size=128, hidden_size=32, num_layers=num_layers,
                   layer_types=default_layer_types(num_layers), num_heads=4, num_kv_heads=2,
                   head_dim=8, num_global_kv_heads=1, global_head_dim=16, intermediate_size=48,
                   num_experts=4, top_k=2, moe_intermediate_size=24, sliding_window=4,
                   canvas_length=8, rope_theta=100.0, global_rope_theta=1000.0,
                   max_position_embeddings=512)
        cfg.update(overrides)
        return DiffusionGemmaConfig(**cfg)
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
        raise ValueError(f"tiny_config: unknown family {family!r}; expected 'llada', 'dream' or "
                         f"{GEMMA_FAMILY!r}")
    cfg.update(overrides)
    return ModelConfig(**cfg)


def hf_tensors(config: ModelConfig | DiffusionGemmaConfig,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights named and shaped as in the hub checkpoint ([out, in] Linear weights)."""
    if config.family == GEMMA_FAMILY:
        return gemma_hf_tensors(config, seed)
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


def gemma_hub_shapes(config: DiffusionGemmaConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what transformers' `save_pretrained` writes for the DiffusionGemma text
    model: the decoder's tensors ([out, in] Linear weights, experts [E, 2I, H] and
    [E, H, I]) and the encoder's layer scalars, in that order."""
    c = config
    h, i, v, e, mi = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_experts,
                      c.moe_intermediate_size)
    d = "model.decoder"
    out = {f"{d}.embed_tokens.weight": (v, h), f"{d}.norm.weight": (h,),
           f"{d}.self_conditioning.pre_norm.weight": (h,),
           f"{d}.self_conditioning.gate_proj.weight": (i, h),
           f"{d}.self_conditioning.up_proj.weight": (i, h),
           f"{d}.self_conditioning.down_proj.weight": (h, i)}
    for n in range(c.num_layers):
        b = f"{d}.layers.{n}"
        kv, hd = c.layer_heads(n)
        out[f"{b}.self_attn.q_proj.weight"] = (c.num_heads * hd, h)
        out[f"{b}.self_attn.k_proj.weight"] = (kv * hd, h)
        if c.is_sliding(n):  # full layers have no v_proj (V = K)
            out[f"{b}.self_attn.v_proj.weight"] = (kv * hd, h)
        out[f"{b}.self_attn.o_proj.weight"] = (h, c.num_heads * hd)
        out[f"{b}.self_attn.q_norm.weight"] = (hd,)
        out[f"{b}.self_attn.k_norm.weight"] = (hd,)
        out[f"{b}.mlp.gate_proj.weight"] = (i, h)
        out[f"{b}.mlp.up_proj.weight"] = (i, h)
        out[f"{b}.mlp.down_proj.weight"] = (h, i)
        out[f"{b}.router.proj.weight"] = (e, h)
        out[f"{b}.router.scale"] = (h,)
        out[f"{b}.router.per_expert_scale"] = (e,)
        out[f"{b}.experts.gate_up_proj"] = (e, 2 * mi, h)
        out[f"{b}.experts.down_proj"] = (e, h, mi)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            out[f"{b}.{norm}.weight"] = (h,)
        out[f"{b}.layer_scalar"] = (1,)
    for n in range(c.num_layers):
        out[f"model.encoder.language_model.layers.{n}.layer_scalar"] = (1,)
    return out


def gemma_tensor_kind(name: str) -> str:
    """How a random DiffusionGemma tensor is drawn: "embed" (std 1), "qk_norm" (about 0.5:
    with attention scale 1 a q/k norm near 1 makes the softmax very sharp), "scale" (norms,
    router scales, layer scalars: about 1) or "weight" (std 1/sqrt(fan_in))."""
    if name.endswith("embed_tokens.weight"):
        return "embed"
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return "qk_norm"
    if name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
        return "scale"
    return "weight"


def gemma_hf_tensors(config: DiffusionGemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random DiffusionGemma weights in the hub layout (`gemma_hub_shapes`), with distinct
    encoder and decoder layer scalars."""
    rng = np.random.default_rng(seed)
    dt = _NP[config.param_dtype]
    out = {}
    for name, shape in gemma_hub_shapes(config).items():
        kind = gemma_tensor_kind(name)
        noise = rng.standard_normal(shape)
        if kind == "embed":
            a = noise
        elif kind == "qk_norm":
            a = 0.5 * (1.0 + 0.2 * noise)
        elif kind == "scale":
            a = 1.0 + 0.2 * noise
        else:
            a = noise / np.sqrt(shape[-1])
        out[name] = a.astype(dt)
    return out


def gemma_generation_config(config: DiffusionGemmaConfig) -> dict:
    """A `generation_config.json` with the sampler defaults transformers applies when a
    checkpoint leaves them unset, spelled out as a published checkpoint does."""
    eos = config.eos_token_ids
    return {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else list(eos),
            "max_new_tokens": 256, "max_denoising_steps": 48,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
            "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
            "confidence_threshold": 0.005, "return_dict_in_generate": True}


def write_hf_checkpoint(out_dir: str | os.PathLike, config: ModelConfig | DiffusionGemmaConfig,
                        tensors: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                        num_shards: int = 1, fmt: str = "safetensors") -> Path:
    """Writes a hub-layout directory: config.json + weights (1 file, or shards + index).

    fmt="bin" writes `pytorch_model.bin` files through torch instead of safetensors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else hf_tensors(config, seed)
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    if config.family == GEMMA_FAMILY:
        (out / "generation_config.json").write_text(
            json.dumps(gemma_generation_config(config), indent=2))
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
