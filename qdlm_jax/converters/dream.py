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

from qdlm_jax.converters.keymap import TensorMapping, linear, plain
from qdlm_jax.models.config import ModelConfig


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
