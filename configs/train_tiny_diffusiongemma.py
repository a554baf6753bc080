"""Train the bundled tiny DiffusionGemma-shaped MoE dLLM:
`qdlm train --config configs/train_tiny_diffusiongemma.py`.

DiffusionGemma's structure at a size 2 CPU cores train in about an hour: sliding and full
attention layers (the task prompts are longer than the sliding window), 8 routed experts with
top-2 beside the dense MLP, self-conditioning, one weight stack run as the causal encoder
over the prompt and as the bidirectional decoder over a 16-token canvas. Each step mixes
text windows (prefix through the encoder, continuation on the canvas) with synthetic task
rows (`data.synthetic`), under the uniform-state objective with self-conditioning and the
experts' load-balancing loss (`training/uniform_objective.py`). `PHASES` sets the mix over
time. The recipe and commands: docs/training.md; each phase's rows and time: the model card,
assets/tiny-diffusiongemma/README.md.
"""

import ml_collections

ARITH = 12  # [BOS] + 11 prompt tokens
LONG = 26  # comparisons: [BOS] + 25; code: [BOS] + 20
# The training step of the shipped assets/tiny-diffusiongemma.
SHIPPED_STEP = 4000
ALL = dict(add2=2.0, sub2=1.0, compare=1.5, code1=0.5, code2=1.5)
PHASES = [
    # 2-digit addition alone.
    dict(until=800, text_rows=0, task_rows=128, task_prompt_len=ARITH, mix=dict(add2=1.0)),
    # Every task joins, with a little text.
    dict(until=2400, text_rows=16, task_rows=112, task_prompt_len=LONG, mix=ALL),
    # More text.
    dict(until=3200, text_rows=48, task_rows=80, task_prompt_len=LONG, mix=ALL),
    # Balanced tail.
    dict(until=4000, text_rows=24, task_rows=104, task_prompt_len=LONG, mix=ALL),
]


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "diffusion_gemma"
    c.out_dir = "runs/train_tiny_diffusiongemma"  # checkpoints, log, loss curve, HF export
    # DiffusionGemmaConfig fields (vocabulary and special ids come from the tokenizer);
    # expert_compute "dense" runs every expert on every token, faster on CPU at this size
    # (the export is the standard layout).
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, num_layers=4,
        layer_types=("sliding_attention",) * 3 + ("full_attention",),
        num_heads=4, num_kv_heads=2, head_dim=32, num_global_kv_heads=1, global_head_dim=64,
        intermediate_size=256, num_experts=8, top_k=2, moe_intermediate_size=64,
        sliding_window=8, canvas_length=16, rope_theta=10_000.0, global_rope_theta=1e6,
        global_partial_rotary_factor=0.25, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
        max_position_embeddings=512, expert_compute="dense"))
    c.data = ml_collections.ConfigDict(dict(
        source="austen",  # a data.sources name, or a local .txt/.jsonl file
        tokenizer="assets/tiny-llada/tokenizer.json",  # "" trains one on the train split
        vocab_size=1024,
        tokenizer_task_lines=3000,
        text_prompt_len=48,  # text rows: 48 prompt tokens, then one canvas
        task_prompt_len=LONG,  # task rows' prompt ([BOS] prompt, left-padded); per phase too
        phases=PHASES,
        seed=0))
    c.init = ml_collections.ConfigDict(dict(from_dir="", step=0))
    # AdamW, warm-up then cosine decay; eps: the smallest noise level; sc_prob: share of
    # self-conditioned steps; aux_weight: the experts' load-balancing loss.
    c.train = ml_collections.ConfigDict(dict(
        steps=SHIPPED_STEP, batch_size=128, lr=3e-3, warmup_steps=100, final_lr_frac=0.05,
        weight_decay=0.01, grad_clip=1.0, eps=1e-3, seed=0, ckpt_every=100, log_every=10,
        sc_prob=0.5, aux_weight=0.01))
    return c
