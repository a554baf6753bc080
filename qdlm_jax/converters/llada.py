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

from qdlm_jax.converters.keymap import TensorMapping, linear, plain
from qdlm_jax.models.config import ModelConfig

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
