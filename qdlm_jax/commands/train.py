"""qdlm train --config configs/train_tiny_llada.py [--config.train.steps=...]"""

from __future__ import annotations

NAME = "train"
HELP = ("train a tiny dLLM (masked diffusion for LLaDA / Dream, uniform-state for "
        "DiffusionGemma; resumable)")


def add_arguments(p):
    p.add_argument("--config", required=True, help="ml-collections config file "
                   "(configs/train_tiny_llada.py, train_tiny_dream.py or "
                   "train_tiny_diffusiongemma.py)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="only train (or find) the tokenizer: OUT_DIR/tokenizer.json")


def run(args, overrides):
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    from qdlm_jax.jobs.train import prepare_tokenizer
    from qdlm_jax.jobs.train import run as run_job

    cfg = apply_overrides(load_config_file(args.config), overrides)
    if args.tokenizer_only:
        from pathlib import Path
        path, _ = prepare_tokenizer(cfg, Path(cfg.out_dir))
        print(f"tokenizer: {path}")
        return 0
    run_job(cfg)
    return 0
