"""Train the bundled tiny Dream-layout dLLM: `qdlm train --config configs/train_tiny_dream.py`.

Same size, tokenizer and task rows as the tiny LLaDA (configs/train_tiny_llada.py, which
holds every other setting); Dream's structure: GQA (2 kv heads), q/k/v biases, theta 1e6, and
the right-shifted objective. The recipe and the commands: docs/training.md; each phase's
rows, tokens and time: the model card, assets/tiny-dream/README.md.
"""

import importlib.util
from pathlib import Path


def _llada():
    spec = importlib.util.spec_from_file_location(
        "train_tiny_llada", Path(__file__).with_name("train_tiny_llada.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return base


_base = _llada()
# Task mixes of the first phases: the easier tasks, then the harder ones.
EASY = dict(add1=1.0, add2=3.0, compare=2.0, code1=2.0, code2=1.0)
HARD = dict(add2=2.0, add3=3.0, compare=1.0, code1=0.5, code2=2.5)
# The data mix over time (keys as in train_tiny_llada.py).
PHASES = [
    # Every task at once.
    dict(until=250, text_rows=8, task_rows=64, task_seq_len=34, mix=EASY),
    dict(until=1000, text_rows=8, task_rows=64, task_seq_len=34, mix=HARD),
    # Addition and subtraction.
    dict(until=1400, text_rows=16, task_rows=192, task_seq_len=_base.ARITH,
         mix=dict(add2=3.0, sub2=2.0)),
    dict(until=2500, text_rows=16, task_rows=192, task_seq_len=_base.ARITH,
         mix=dict(add2=1.0, sub2=1.0)),
    # Code and comparisons join the arithmetic.
    dict(until=2800, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(code1=1.0, code2=3.0, compare=1.5, sub2=1.5, add2=1.5)),
    # Text-heavy, with a small task share.
    dict(until=3200, text_rows=48, task_rows=64, task_seq_len=_base.LONG, mix=_base.ALL),
    # Addition-heavy, then a balanced tail.
    dict(until=3500, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=3.0, sub2=1.0, code1=0.5, code2=1.5, compare=1.0)),
    dict(until=3800, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=1.5, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Arithmetic only, mostly addition, then a balanced tail.
    dict(until=4400, text_rows=8, task_rows=256, task_seq_len=_base.ARITH,
         mix=dict(add2=4.0, sub2=1.0)),
    dict(until=4700, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=1.5, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Arithmetic only, more addition still, then a balanced tail.
    dict(until=5400, text_rows=8, task_rows=256, task_seq_len=_base.ARITH,
         mix=dict(add2=6.0, sub2=1.0)),
    dict(until=5700, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=2.0, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Text-heavy (text two thirds of the loss), then a balanced tail.
    dict(until=6300, text_rows=96, task_rows=48, task_seq_len=_base.LONG,
         mix=dict(add2=3.0, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    dict(until=6500, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=2.0, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Text-heavier.
    dict(until=7000, text_rows=112, task_rows=32, task_seq_len=_base.LONG,
         mix=dict(add2=3.0, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Arithmetic only, then a balanced tail.
    dict(until=7500, text_rows=16, task_rows=256, task_seq_len=_base.ARITH,
         mix=dict(add2=3.0, sub2=1.0)),
    dict(until=7700, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=2.0, sub2=1.0, code1=0.5, code2=2.0, compare=1.5)),
    # Arithmetic only, more subtraction, then a tail with a larger arithmetic share.
    dict(until=8100, text_rows=16, task_rows=256, task_seq_len=_base.ARITH,
         mix=dict(add2=3.0, sub2=2.0)),
    dict(until=8300, text_rows=16, task_rows=128, task_seq_len=_base.LONG,
         mix=dict(add2=3.0, sub2=2.0, code1=0.5, code2=2.0, compare=1.5)),
    # Every task, arithmetic-heavy (no tail after it).
    dict(until=8900, text_rows=24, task_rows=192, task_seq_len=_base.LONG,
         mix=dict(add2=4.0, sub2=2.5, code1=0.5, code2=1.5, compare=1.5)),
    # The same with more addition, to the shipped step.
    dict(until=9300, text_rows=24, task_rows=192, task_seq_len=_base.LONG,
         mix=dict(add2=6.0, sub2=2.5, code1=0.5, code2=1.5, compare=1.5)),
]


def get_config():
    c = _base.get_config()
    c.family = "dream"
    c.out_dir = "runs/train_tiny_dream"
    c.model.num_kv_heads = 2
    c.model.rope_theta = 1e6
    c.model.rms_norm_eps = 1e-6
    c.data.phases = PHASES
    c.train.steps = 9300  # the shipped step
    return c
