"""The study's MoE rows: `qdlm study --config configs/study_moe.py` (and `make demo
ARGS=--moe`, which prints `table_moe.md`).

On the bundled tiny DiffusionGemma (8 experts top-2, router kept in float unless a row says
otherwise): fp; RTN, GPTQ and AWQ at W4 / W3 / W2 (group 32, two-mode calibration); DAQ at
2 planes (block 32); RTN, SmoothQuant and QuaRot at W8A8 and W4A8; and, at RTN W4, the parts
one at a time: experts only, attention only, the routers at 8 and 4 bits beside everything
else, and the routers at
4 bits alone (`rows`, qdlm_jax/jobs/study_rows.py WO_ROWS). Each row is scored on held-out
2-digit addition and subtraction, synthetic code pass@1, 4-way comparisons, the
left-to-right continuation NLL of held-out text, and KL to fp with the share of the fp
model's expert choices that change; its generation tasks record the entropy-bound sampler's
tokens per forward pass and forward passes per item
(docs/results_tiny.md, "MoE rows"). W8A8 and W4A8 rows have weights per output channel
and 8-bit per-token inputs to every quantized tensor (SmoothQuant's scales folded first,
QuaRot's online Hadamard transforms); DuQuant does not run on DiffusionGemma.

Settings are those of configs/study.py with the overrides below; any of them can be changed
from the command line as there (e.g. `--config.rows=router4 --config.methods=rtn`).
"""

from pathlib import Path

from qdlm_jax.jobs.config_flags import load_config_file

ITEMS = 100  # held-out items per task
TEXT = "austen"  # the text the tiny DiffusionGemma was trained on (its model card)


def get_config():
    c = load_config_file(Path(__file__).with_name("study.py"))
    c.models = ("assets/tiny-diffusiongemma",)
    c.methods = ("rtn", "gptq", "awq")
    c.bits = (4, 3, 2)
    c.out_dir = "runs/study_moe"
    # group 32: the tiny model's widths (hidden 64, expert width 32) take no larger group
    c.quantize.group_size = 32
    c.quantize.calib.source = TEXT
    c.rows = ["experts-only", "attention-only", "router8", "router4", "router4-only",
              {"name": "binary-planes", "method": "daq", "bits": 2}]
    # W8A8 and W4A8: weights per output channel (the study's wa_quantize), every quantized
    # tensor's inputs per token (the experts' rows one by one)
    c.wa_methods = ("rtn", "smoothquant", "quarot")
    c.wa_bits = (8, 4)
    c.wa_act_bits = (8,)
    c.wa_rows = []
    c.decoding = []
    c.decoding_rows = []
    c.tasks = [
        {"base": "wikipedia_bound", "name": "text_nll", "source": TEXT, "seq_len": 64,
         "n_windows": 32,
         "mc_num": 8, "batch_size": 8},
        {"base": "arithmetic", "limit": ITEMS},
        {"base": "arithmetic_subtract", "limit": ITEMS},
        {"base": "synthetic_code", "limit": ITEMS},
        {"base": "synthetic_compare", "limit": ITEMS, "mc_num": 16, "batch_size": 16},
        {"type": "fidelity", "name": "kl_to_fp", "source": TEXT, "seq_len": 64,
         "n_windows": 32},
    ]
    c.only_tasks = ()
    return c
