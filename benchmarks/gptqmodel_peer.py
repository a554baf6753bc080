"""The peer side of `bench_gemma_streaming.py --peer-python`: GPTQModel's GPTQ of the same
DiffusionGemma checkpoint on CPU, run in GPTQModel's own environment (it needs torch >= 2.14,
which the project's environment does not pin):

    python3 -m venv /tmp/gptqmodel-venv
    /tmp/gptqmodel-venv/bin/pip install torch==2.14.1 transformers==5.23.0 gptqmodel==7.7.0
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptqmodel-venv/bin/python benchmarks/gptqmodel_peer.py \\
        MODEL_DIR --samples 8 --prompt 256 --bits 4 --group 64 --out peer.json

MODEL_DIR is the hub checkpoint with a tokenizer.json beside it (GPTQModel's loader needs a
tokenizer; the ids below are given already tokenized, so any tokenizer file serves). What
this changes in GPTQModel 7.7.0 for a checkpoint without a processor: the DiffusionGemma
definition's processor loading is switched off and its chat-template dataset preparation
replaced by the base class's, which takes {"input_ids", "attention_mask"} as given.
GPTQModel calibrates the encoder only (its capture is the encoder's first layer; the decoder
reuses the quantized modules), so the side-by-side runs ours with --modes encoder too.

Measured: quantize() wall seconds (the model loads lazily, a layer at a time), peak resident
memory of the process, and how many expert and dense linears GPTQModel quantized. Writes a
JSON report to --out. Saving is not part of the measure.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="hub checkpoint dir with a tokenizer.json")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--out", default="gptqmodel-peer.json")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.models.definitions.diffusion_gemma import DiffusionGemmaQModel

    DiffusionGemmaQModel.require_load_processor = False
    DiffusionGemmaQModel.prepare_dataset = BaseQModel.prepare_dataset

    # the same random prompt ids as the project's side (numpy seed 0)
    ids = np.random.default_rng(0).integers(0, a.vocab, (a.samples, a.prompt))
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * a.prompt} for row in ids]
    config = QuantizeConfig(bits=a.bits, group_size=a.group, device="cpu")
    t0 = time.perf_counter()
    model = GPTQModel.load(a.model, config)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=1)
    quantize_s = time.perf_counter() - t0
    # one entry per quantized module: {"layer", "module" (e.g. "experts.5.gate_proj"), ...}
    names = [str(r.get("module")) for r in model.quant_log]
    report = {
        "peer": "GPTQModel", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "calibration": {"windows": a.samples, "prompt_tokens": a.prompt, "modes": "encoder"},
        "weight": f"W{a.bits} g{a.group}", "load_s": load_s, "quantize_s": quantize_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "quantized_linears": len(names),
        "expert_linears": sum(n.startswith("experts.") for n in names),
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
