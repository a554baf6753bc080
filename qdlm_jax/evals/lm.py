"""Language modelling: the masked-likelihood bound on held-out text, in bits per token.

Windows of `seq_len` tokens are cut from the held-out split of a text source
(`data.sources.load_split`; documents as [BOS] + tokens + [EOS], concatenated), and
`evals.basic.heldout_bound` estimates the per-token negative ELBO with
`likelihood.perplexity_bound`:

    bits/token = -(sum over windows of the Monte Carlo bound on log p(window)) / (tokens * ln 2)
    ppl bound  = exp(nats/token)      (an upper bound on the perplexity, in expectation)

Lower is better. The special ids are the model config's (bos/eos), so any tokenizer works.
"""

from __future__ import annotations

import time

import numpy as np

from qdlm_jax.data import sources
from qdlm_jax.evals.basic import heldout_bound


def windows_for(tokenizer, config, *, source: str, split: str, seq_len: int, n_windows: int,
                seed: int = 0) -> np.ndarray:
    """`[n_windows, seq_len]` int32 token windows of a split; ValueError if too few."""
    docs = sources.load_split(source, split, seed=seed)
    w = sources.token_windows(docs, tokenizer, seq_len, bos_id=config.bos_token_id,
                              eos_id=config.eos_token_id, max_windows=n_windows)
    if len(w) < n_windows:
        raise ValueError(f"source {source!r}/{split}: only {len(w)} windows of {seq_len} "
                         f"tokens, asked for n_windows={n_windows}")
    return w


def score_windows(model, windows: np.ndarray, *, mc_num: int, batch_size: int,
                  seed: int = 0) -> dict:
    t0 = time.time()
    r = heldout_bound(model, windows, mc_num=mc_num, batch_size=batch_size, seed=seed)
    return {**r, "n": int(len(windows)), "time_s": time.time() - t0}
