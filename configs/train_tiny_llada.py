"""Train the bundled tiny LLaDA-layout dLLM: `qdlm train --config configs/train_tiny_llada.py`."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "llada"
    c.out_dir = "runs/train_tiny_llada"  # checkpoints, log, loss curve, HF export
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512))
    c.data = ml_collections.ConfigDict(dict(
        source="bigbench-wikipedia",  # or a local .txt/.jsonl file, or wikitext2/c4/pile
        tokenizer="",  # path of a tokenizer.json to reuse; "" trains one on the train split
        vocab_size=4096,
        seq_len=128,
        arith_frac=0.375,  # fraction of rows that are packed arithmetic problems
        arith_digits=(1, 2, 2, 2, 2, 3),  # operand digit counts, drawn uniformly (2 weighted up)
        arith_ops=("+", "+", "+", "-"),  # operators, drawn uniformly (addition weighted up)
        arith_answer_len=8,  # answer field (answer + EOS padding); only it is ever masked
        arith_problems=200_000,
        seed=0))
    c.train = ml_collections.ConfigDict(dict(
        steps=3200, batch_size=16, lr=2e-3, warmup_steps=100, final_lr_frac=0.1,
        weight_decay=0.1, grad_clip=1.0, eps=1e-3, seed=0, ckpt_every=50, log_every=10))
    return c
