"""Parity check: a checkpoint through qdlm-jax against transformers' own model on the same
weights (Llama for LLaDA, Qwen2 for Dream, both run with bidirectional attention).

    python converters/parity.py path/to/checkpoint [--tokens 32] [--batch 2] [--seed 0]

Reads the hub layout's safetensors independently of qdlm's key maps (the names below are
written out from the hub layouts), builds the transformers model in fp32, and reports the
largest absolute logit difference and the argmax agreement on random token ids (with one
left-padded row). Exit status 1 if the difference exceeds --atol. Needs torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# LLaDA hub names -> LlamaForCausalLM names.
_LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def llama_name(name: str) -> str:
    if name == "model.transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name == "model.transformer.ln_f.weight":
        return "model.norm.weight"
    if name == "model.transformer.ff_out.weight":
        return "lm_head.weight"
    parts = name.split(".")  # model.transformer.blocks.{i}.{mod}.weight
    return f"model.layers.{parts[3]}.{_LLADA_TO_LLAMA[parts[4]]}.weight"


def reference_model(ckpt_dir, config):
    """A transformers model with the checkpoint's weights, fp32, bidirectional attention."""
    import torch
    import transformers

    from qdlm_jax.checkpoints.safetensors_io import SafetensorsFile

    c = config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
                  max_position_embeddings=c.max_position_embeddings,
                  attn_implementation="eager")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.family == "llada":
        hf_cfg = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False,
                                          rope_parameters=rope)
        model, rename = transformers.LlamaForCausalLM(hf_cfg), llama_name
    else:
        hf_cfg = transformers.Qwen2Config(**common, use_sliding_window=False,
                                          rope_parameters=rope)
        model, rename = transformers.Qwen2ForCausalLM(hf_cfg), (lambda n: n)  # Qwen2 names
    hf_cfg.is_causal = False
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    state = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        st = SafetensorsFile(f)
        state.update({rename(k): torch.from_numpy(np.asarray(st.get(k), np.float32).copy())
                      for k in st.keys()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all("rotary" in m for m in missing):
        raise ValueError(f"{ckpt_dir}: unexpected tensors {unexpected}, missing {missing}")
    return model.float().eval()


def reference_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        mask = None if attention_mask is None else torch.from_numpy(
            np.asarray(attention_mask, np.int64))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def check(ckpt_dir, *, tokens: int = 32, batch: int = 2, seed: int = 0) -> dict:
    """{'max_abs_diff', 'argmax_agree', 'max_abs_logit'} over the valid positions."""
    from qdlm_jax import load_model

    model = load_model(ckpt_dir, dtype="float32")
    c = model.config
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(c.vocab_size, c.mask_token_id), (batch, tokens))
    mask = np.ones_like(ids)
    mask[0, : tokens // 4] = 0  # one left-padded row
    ref = reference_logits(reference_model(ckpt_dir, c), ids, mask)
    ours = np.asarray(model(ids, mask), np.float32)
    valid = mask.astype(bool)
    return {"max_abs_diff": float(np.max(np.abs(ours - ref)[valid])),
            "argmax_agree": float(np.mean((ours.argmax(-1) == ref.argmax(-1))[valid])),
            "max_abs_logit": float(np.max(np.abs(ref)[valid]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path, help="hub-layout checkpoint directory")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=1e-3)
    args = p.parse_args(argv)
    r = check(args.ckpt, tokens=args.tokens, batch=args.batch, seed=args.seed)
    print(f"max |logit diff| {r['max_abs_diff']:.3g} (logits up to {r['max_abs_logit']:.3g}), "
          f"argmax agreement {100 * r['argmax_agree']:.1f}%")
    return 0 if r["max_abs_diff"] <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
