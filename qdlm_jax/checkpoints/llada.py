"""LLaDA checkpoint key map (GSAI-ML/LLaDA-8B-*, `model_type: llada`, llama block).

    model.transformer.wte.weight                     -> embed                  [V, D]
    model.transformer.blocks.{i}.attn_norm.weight    -> layers.i.attn_norm.scale
    model.transformer.blocks.{i}.{q,k,v}_proj.weight -> layers.i.{q,k,v}_proj.kernel (T)
    model.transformer.blocks.{i}.attn_out.weight     -> layers.i.o_proj.kernel (T)
    model.transformer.blocks.{i}.ff_norm.weight      -> layers.i.mlp_norm.scale
    model.transformer.blocks.{i}.ff_proj.weight      -> layers.i.gate_proj.kernel (T)  (SiLU side)
    model.transformer.blocks.{i}.up_proj.weight      -> layers.i.up_proj.kernel (T)
    model.transformer.blocks.{i}.ff_out.weight       -> layers.i.down_proj.kernel (T)
    model.transformer.ln_f.weight                    -> final_norm.scale
    model.transformer.ff_out.weight                  -> lm_head.kernel (T)     (untied head)

(T): PyTorch Linear weights are [out, in]; our kernels are [in, out].
"""

from __future__ import annotations

from typing import Any

from qdlm_jax.checkpoints.keymap import TensorMapping, hf_dtype, linear, plain
from qdlm_jax.data.hf_tokenizer import SpecialIds
from qdlm_jax.errors import ConfigError
from qdlm_jax.models.config import ModelConfig

MODEL_TYPE = "llada"  # `model_type` in the hub config.json

_BLOCK = (
    ("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("attn_out", "o_proj"),
    ("ff_proj", "gate_proj"), ("up_proj", "up_proj"), ("ff_out", "down_proj"),
)


def key_map(config: ModelConfig) -> list[TensorMapping]:
    t = "model.transformer"
    out = [plain(f"{t}.wte.weight", "embed")]
    for i in range(config.num_layers):
        b = f"{t}.blocks.{i}"
        out.append(plain(f"{b}.attn_norm.weight", "layers", i, "attn_norm", "scale"))
        out.append(plain(f"{b}.ff_norm.weight", "layers", i, "mlp_norm", "scale"))
        for hf, ours in _BLOCK:
            out.append(linear(f"{b}.{hf}.weight", "layers", i, ours, "kernel"))
    out.append(plain(f"{t}.ln_f.weight", "final_norm", "scale"))
    out.append(linear(f"{t}.ff_out.weight", "lm_head", "kernel"))
    return out


def config_from_hf(hf: dict[str, Any], special: SpecialIds, *,
                   source: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from a hub `config.json` of this layout, with the checkpoint's special
    ids (`data.hf_tokenizer.resolve_special_ids`) (`model_type: llada`)."""

    def need(key):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r} required for "
                              f"model_type={MODEL_TYPE!r}")
        return hf[key]

    if hf.get("block_type", "llama") != "llama":
        raise ConfigError(f"{source}: block_type={hf['block_type']!r} is not supported; "
                          "expected 'llama' (the LLaDA-8B layout)")
    if hf.get("weight_tying", False):
        raise ConfigError(f"{source}: weight_tying=true is not supported (LLaDA has an "
                          "untied LM head)")
    if hf.get("include_bias", False) or hf.get("include_qkv_bias", False):
        raise ConfigError(f"{source}: biases are not supported in the LLaDA layout")
    vocab = hf.get("embedding_size") or need("vocab_size")
    n_heads = need("n_heads")
    return ModelConfig(
        family="llada",
        vocab_size=int(vocab),
        hidden_size=int(need("d_model")),
        num_layers=int(need("n_layers")),
        num_heads=int(n_heads),
        num_kv_heads=int(hf.get("n_kv_heads") or n_heads),
        intermediate_size=int(need("mlp_hidden_size")),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qkv_bias=False,
        rope_full_precision=bool(hf.get("rope_full_precision", True)),
        **special.config_fields(),
        max_position_embeddings=int(hf.get("max_sequence_length", 4096)),
        param_dtype=hf_dtype(hf),
        dtype=hf_dtype(hf),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The hub `config.json` of this layout, in its own key names."""
    return {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "d_model": config.hidden_size,
        "n_layers": config.num_layers,
        "n_heads": config.num_heads,
        "n_kv_heads": config.num_kv_heads,
        "mlp_hidden_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "embedding_size": config.vocab_size,
        "max_sequence_length": config.max_position_embeddings,
        "rope": True,
        "rope_theta": config.rope_theta,
        "rope_full_precision": config.rope_full_precision,
        "layer_norm_type": "rms",
        "rms_norm_eps": config.rms_norm_eps,
        "layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "activation_type": "silu",
        "block_type": "llama",
        "weight_tying": False,
        "mask_token_id": config.mask_token_id,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "eot_token_id": config.eot_token_id,
        "torch_dtype": config.param_dtype,
    }
