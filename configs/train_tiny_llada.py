"""Train the bundled tiny LLaDA-layout dLLM: `qdlm train --config configs/train_tiny_llada.py`.

Each step mixes Wikipedia windows (pre-training objective) with synthetic task rows
(`data.synthetic`, LLaDA's SFT objective: prompt never masked, loss over the answer field).
`PHASES` sets that mix over time. The recipe, the phases and the commands (resume, extend,
start from saved weights): docs/training.md; each phase's rows, tokens and time: the model
card, assets/tiny-llada/README.md.
"""

import ml_collections

ARITH = 20  # [BOS] + 11 prompt tokens + 8-token answer field
LONG = 33  # code: [BOS] + 20 + 12; comparisons: [BOS] + 25 + 4
# The training step of the shipped assets/tiny-llada.
SHIPPED_STEP = 5400
# The balanced task mix.
ALL = dict(add2=1.5, sub2=2.0, compare=1.0, code1=0.5, code2=1.5)
# The data mix over time (keys: `data.phases` below; `text_shift`: text rows shifted).
PHASES = [
    # 2-digit addition alone.
    dict(until=1000, text_rows=0, task_rows=256, task_seq_len=ARITH, mix=dict(add2=1.0)),
    # Subtraction, with some addition.
    dict(until=1600, text_rows=16, task_rows=192, task_seq_len=ARITH, mix=dict(sub2=3.0, add2=1.0)),
    # Subtraction and addition in equal shares.
    dict(until=1900, text_rows=16, task_rows=192, task_seq_len=ARITH, mix=dict(sub2=1.0, add2=1.0)),
    # Code and comparisons join the arithmetic.
    dict(until=2200, text_rows=16, task_rows=128, task_seq_len=LONG,
         mix=dict(code1=1.0, code2=3.0, compare=1.5, sub2=1.5, add2=1.5)),
    # Text-heavy, with a small task share.
    dict(until=2600, text_rows=48, task_rows=64, task_seq_len=LONG, mix=ALL),
    # Code-heavy.
    dict(until=2900, text_rows=16, task_rows=128, task_seq_len=LONG,
         mix=dict(code1=1.0, code2=4.0, compare=1.0, sub2=1.0, add2=1.0)),
    # Balanced tail.
    dict(until=3100, text_rows=16, task_rows=128, task_seq_len=LONG,
         mix=dict(code1=0.5, code2=2.0, compare=2.5, sub2=1.0, add2=1.0)),
    # Text rows shifted (token i from output i-1), task rows unshifted: lifts the text loss.
    dict(until=3600, text_rows=64, task_rows=96, task_seq_len=LONG, text_shift=True,
         mix=dict(add2=2.0, sub2=2.0, compare=1.0, code1=0.5, code2=1.5)),
    # The same mix, all unshifted.
    dict(until=4200, text_rows=64, task_rows=96, task_seq_len=LONG,
         mix=dict(add2=2.0, sub2=2.0, compare=1.0, code1=0.5, code2=1.5)),
    # Balanced tail.
    dict(until=4400, text_rows=16, task_rows=128, task_seq_len=LONG,
         mix=dict(code1=0.5, code2=2.0, compare=2.5, sub2=1.0, add2=1.0)),
    # More text and an addition-heavy task mix, to the shipped step.
    dict(until=5400, text_rows=64, task_rows=128, task_seq_len=LONG,
         mix=dict(add2=4.0, sub2=2.5, code1=0.5, code2=1.5, compare=1.5)),
    # Beyond SHIPPED_STEP: trained only with a larger train.steps.
    dict(until=5800, text_rows=64, task_rows=128, task_seq_len=LONG,
         mix=dict(add2=6.0, sub2=3.0, code1=0.3, code2=1.0, compare=1.5)),
]


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "llada"  # llada | dream: the hub layout and the text objective
    c.out_dir = "runs/train_tiny_llada"  # checkpoints, log, loss curve, HF export
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512))
    c.data = ml_collections.ConfigDict(dict(
        source="bigbench-wikipedia",  # or a local .txt/.jsonl file, or wikitext2/c4/pile
        tokenizer="",  # path of a tokenizer.json to reuse; "" trains one on the train split
        vocab_size=1024,
        tokenizer_task_lines=3000,  # train lines of each synthetic task in the BPE corpus
        seq_len=128,  # Wikipedia rows
        task_seq_len=LONG,  # task rows ([BOS] prompt answer-field, right-padded); per phase too
        # The data mix: per step `text_rows` Wikipedia rows + `task_rows` task rows, each
        # row's task drawn with the `mix` weights (data.synthetic.TASKS), until step `until`.
        phases=PHASES,
        seed=0,
        # The older packed-arithmetic recipe (used only when `phases` is empty).
        arith_frac=0.375, arith_digits=(1, 2, 2, 2, 2, 3), arith_ops=("+", "+", "+", "-"),
        arith_answer_len=8, arith_problems=200_000))
    # Start from a saved model (an `hf/` export or `assets/tiny-*`) at step `step` of this
    # schedule, with a fresh optimizer state; "" starts from random weights at step 0.
    c.init = ml_collections.ConfigDict(dict(from_dir="", step=0))
    # AdamW, warm-up then cosine decay to lr * final_lr_frac; batch_size: rows per step
    # without phases; eps: the smallest mask probability; ckpt_every/log_every in steps.
    c.train = ml_collections.ConfigDict(dict(
        steps=SHIPPED_STEP, batch_size=72, lr=3e-3, warmup_steps=100, final_lr_frac=0.05,
        weight_decay=0.01, grad_clip=1.0, eps=1e-3, seed=0, ckpt_every=100, log_every=10))
    return c
