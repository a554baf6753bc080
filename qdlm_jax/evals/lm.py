"""Language modelling: the masked-likelihood bound on held-out text, in bits per token.

Windows of `seq_len` tokens are cut from the held-out split of a text source
(`data.sources.load_split`; documents as [BOS] + tokens + [EOS], concatenated), and
`evals.basic.heldout_bound` estimates the per-token negative ELBO with
`likelihood.perplexity_bound`:

    bits/token = -(sum over windows of the Monte Carlo bound on log p(window)) / (tokens * ln 2)
    ppl bound  = exp(nats/token)      (an upper bound on the perplexity, in expectation)

Lower is better. The windows are `evals.basic.heldout_windows`: the checkpoint's tokenizer and
its BOS / EOS ids.
"""

from __future__ import annotations

import time

import numpy as np

from qdlm_jax.evals.basic import heldout_bound


def score_windows(model, windows: np.ndarray, *, mc_num: int, batch_size: int,
                  seed: int = 0) -> dict:
    t0 = time.time()
    r = heldout_bound(model, windows, mc_num=mc_num, batch_size=batch_size, seed=seed)
    return {**r, "n": int(len(windows)), "time_s": time.time() - t0}
