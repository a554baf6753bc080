"""`make demo`: the main job on the bundled default model.

Uses the shipped tiny LLaDA (`assets/tiny-llada`) when present; otherwise builds a tiny
random-weight checkpoint in the LLaDA hub layout. It then converts it with `qdlm convert`,
prints `qdlm info`, and checks that the converted model gives the same logits as the source.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qdlm_jax import load_model
from qdlm_jax.cli import main as qdlm
from qdlm_jax.testing import tiny_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "assets" / "tiny-llada"


def run(out_dir: Path = ROOT / "runs" / "demo") -> int:
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (BUNDLED / "config.json").is_file():
        src = BUNDLED
        print(f"[demo] default model: {src}")
    else:
        src = out_dir / "tiny-llada-hf"
        if src.exists():
            shutil.rmtree(src)
        write_hf_checkpoint(src, tiny_config("llada", num_layers=2), seed=0)
        print(f"[demo] built a tiny random LLaDA-layout checkpoint: {src}")
    dst = out_dir / "tiny-llada-qdlm"
    print(f"[demo] $ qdlm convert {src} {dst}")
    if qdlm(["convert", str(src), str(dst), "--overwrite"]) != 0:
        return 1
    print(f"[demo] $ qdlm info {dst}")
    if qdlm(["info", str(dst)]) != 0:
        return 1
    ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8))
    a, b = load_model(src)(ids), load_model(dst)(ids)
    diff = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    print(f"[demo] logits of source vs converted checkpoint: max |diff| = {diff:g}")
    print(f"[demo] done in {time.time() - t0:.1f}s")
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(run())
