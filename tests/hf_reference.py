"""Independent reference: transformers' Llama (for LLaDA) and Qwen2 (for Dream) models,
loaded from the same tiny checkpoint files and run with bidirectional attention."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from qdlm_jax.converters.safetensors_io import SafetensorsFile

# LLaDA hub names -> LlamaForCausalLM names, written out independently of our key map.
_LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def _llama_name(name: str) -> str:
    if name == "model.transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name == "model.transformer.ln_f.weight":
        return "model.norm.weight"
    if name == "model.transformer.ff_out.weight":
        return "lm_head.weight"
    parts = name.split(".")  # model.transformer.blocks.{i}.{mod}.weight
    i, mod = parts[3], parts[4]
    return f"model.layers.{i}.{_LLADA_TO_LLAMA[mod]}.weight"


def reference_model(ckpt_dir, config):
    """A transformers model with our checkpoint's weights, fp32, bidirectional attention."""
    c = config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
                  max_position_embeddings=c.max_position_embeddings,
                  attn_implementation="eager")
    if c.family == "llada":
        hf_cfg = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": c.rope_theta})
        model = transformers.LlamaForCausalLM(hf_cfg)
        rename = _llama_name
    else:
        hf_cfg = transformers.Qwen2Config(**common, use_sliding_window=False,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": c.rope_theta})
        model = transformers.Qwen2ForCausalLM(hf_cfg)
        rename = lambda n: n  # noqa: E731  Dream's names are Qwen2's
    hf_cfg.is_causal = False
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    f = SafetensorsFile(f"{ckpt_dir}/model.safetensors")
    state = {rename(k): torch.from_numpy(np.asarray(f.get(k), np.float32).copy())
             for k in f.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing
    return model.float().eval()


def reference_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        mask = None if attention_mask is None else torch.from_numpy(
            np.asarray(attention_mask, np.int64))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
