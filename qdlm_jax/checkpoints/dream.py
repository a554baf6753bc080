"""Dream checkpoint key map (Dream-org/Dream-v0-*-7B, `model_type: Dream`, Qwen2 layout).

    model.embed_tokens.weight                          -> embed               [V, D]
    model.layers.{i}.input_layernorm.weight            -> layers.i.attn_norm.scale
    model.layers.{i}.self_attn.{q,k,v}_proj.weight     -> layers.i.{q,k,v}_proj.kernel (T)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       -> layers.i.{q,k,v}_proj.bias
    model.layers.{i}.self_attn.o_proj.weight           -> layers.i.o_proj.kernel (T)
    model.layers.{i}.post_attention_layernorm.weight   -> layers.i.mlp_norm.scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    -> layers.i.{gate,up,down}_proj.kernel (T)
    model.norm.weight                                  -> final_norm.scale
    lm_head.weight                                     -> lm_head.kernel (T)

(T): PyTorch Linear weights are [out, in]; our kernels are [in, out].
"""

from __future__ import annotations

from typing import Any

from qdlm_jax.checkpoints.keymap import TensorMapping, hf_dtype, linear, plain
from qdlm_jax.data.hf_tokenizer import SpecialIds
from qdlm_jax.errors import ConfigError
from qdlm_jax.models.config import ModelConfig

MODEL_TYPE = "Dream"  # `model_type` in the hub config.json


def key_map(config: ModelConfig) -> list[TensorMapping]:
    out = [plain("model.embed_tokens.weight", "embed")]
    for i in range(config.num_layers):
        b = f"model.layers.{i}"
        out.append(plain(f"{b}.input_layernorm.weight", "layers", i, "attn_norm", "scale"))
        out.append(plain(f"{b}.post_attention_layernorm.weight", "layers", i, "mlp_norm", "scale"))
        for p in ("q_proj", "k_proj", "v_proj"):
            out.append(linear(f"{b}.self_attn.{p}.weight", "layers", i, p, "kernel"))
            if config.qkv_bias:
                out.append(plain(f"{b}.self_attn.{p}.bias", "layers", i, p, "bias"))
        out.append(linear(f"{b}.self_attn.o_proj.weight", "layers", i, "o_proj", "kernel"))
        for p in ("gate_proj", "up_proj", "down_proj"):
            out.append(linear(f"{b}.mlp.{p}.weight", "layers", i, p, "kernel"))
    out.append(plain("model.norm.weight", "final_norm", "scale"))
    out.append(linear("lm_head.weight", "lm_head", "kernel"))
    return out


def config_from_hf(hf: dict[str, Any], special: SpecialIds, *,
                   source: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from a hub `config.json` of this layout, with the checkpoint's special
    ids (`data.hf_tokenizer.resolve_special_ids`) (`model_type: Dream`)."""

    def need(key):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r} required for "
                              f"model_type={MODEL_TYPE!r}")
        return hf[key]

    if hf.get("tie_word_embeddings", False):
        raise ConfigError(f"{source}: tie_word_embeddings=true is not supported "
                          "(Dream has an untied LM head)")
    n_heads = need("num_attention_heads")
    return ModelConfig(
        family="dream",
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=int(n_heads),
        num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        intermediate_size=int(need("intermediate_size")),
        rope_theta=float(hf.get("rope_theta", 1e6)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        rope_full_precision=False,
        **special.config_fields(),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        param_dtype=hf_dtype(hf),
        dtype=hf_dtype(hf),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The hub `config.json` of this layout, in its own key names."""
    return {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "max_position_embeddings": config.max_position_embeddings,
        "mask_token_id": config.mask_token_id,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "torch_dtype": config.param_dtype,
    }
