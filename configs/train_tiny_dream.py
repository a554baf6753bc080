"""Train the bundled tiny Dream-layout dLLM: `qdlm train --config configs/train_tiny_dream.py`.

Same size, data mix and schedule as the tiny LLaDA; Dream's structure: GQA (2 kv heads), q/k/v
biases, theta 1e6, and the right-shifted training objective.
"""

import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location(
        "train_tiny_llada", Path(__file__).with_name("train_tiny_llada.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.family = "dream"
    c.out_dir = "runs/train_tiny_dream"
    c.model.num_kv_heads = 2
    c.model.rope_theta = 1e6
    c.model.rms_norm_eps = 1e-6
    return c
