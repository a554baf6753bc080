"""A real GPTQ consumer: transformers' GPTQ integration (optimum + GPTQModel's CPU kernels)
loads a Qwen2-layout GPTQ checkpoint and writes its logits. Run in an environment that has
those packages (it is not the project's: GPTQModel pins its own torch), as

    python tests/references/gptq_consumer.py EXPORT WORK IDS.npy OUT.npz

EXPORT is a `qdlm export --format gptq` of a Dream-layout model (Dream's tensor names are
Qwen2's); WORK receives a copy whose config.json names Qwen2ForCausalLM. Attention is made
bidirectional (Dream's) on every module, as converters/parity.py does for the float model.
OUT.npz holds `logits` [B, T, V] and `q_proj` (layer 0's weight as the consumer dequantizes
it, [out, in] float32) and `kernel` (the quantized linear class it chose).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main(export, work, ids_file, out):
    shutil.copytree(export, work, dirs_exist_ok=True)
    cfg = json.loads((Path(work) / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
               rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]})
    (Path(work) / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(work, device_map="cpu", dtype=torch.float32,
                                                 attn_implementation="eager")
    model.config.is_causal = False
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    q_proj = model.model.layers[0].self_attn.q_proj
    ids = torch.from_numpy(np.load(ids_file)).long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()
        w = q_proj.dequantize_weight().float().numpy()  # [in, out]
    np.savez(out, logits=logits, q_proj=w.T, kernel=type(q_proj).__name__)


if __name__ == "__main__":
    main(*sys.argv[1:5])
