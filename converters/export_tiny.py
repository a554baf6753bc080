"""Export a tiny-model training run to assets/tiny-<family> with its model card.

    python converters/export_tiny.py runs/train_tiny_llada assets/tiny-llada [--note "..."]

Evaluates the run's exported hub checkpoint (held-out Wikipedia bound against the unigram
entropy, arithmetic exact match), then writes config.json, model.safetensors, tokenizer.json,
loss.png, eval.json and README.md (the model card) into DEST atomically. Same as
`python -m qdlm_jax.jobs.model_card`.
"""

import sys

from qdlm_jax.jobs.model_card import main

if __name__ == "__main__":
    sys.exit(main())
