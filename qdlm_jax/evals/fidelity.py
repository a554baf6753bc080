"""The fidelity task: how far a model's predictions are from a reference's (the fp model),
on held-out text windows with a share `noise_ratio` of positions noised.

    LLaDA, Dream      basic.output_kl: KL per position, the noised positions the mask token
    DiffusionGemma    canvas_kl.canvas_kl: a clean prompt of seq_len - canvas_length tokens
                      and one canvas, noised with uniform ids, decoded without and with
                      self-conditioning; and canvas_kl.route_changes: the share of the
                      reference's top-k expert choices the model does not make

Both models see the same windows and the same noise; the result is `kl_bits` (bits per
position) with its standard error over windows, and for DiffusionGemma
`expert_choices_changed`. The reference compared with itself scores 0 without a forward.
"""

from __future__ import annotations

import time

from qdlm_jax.evals.basic import heldout_windows, output_kl
from qdlm_jax.evals.canvas_kl import canvas_kl, route_changes
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY


def fidelity(reference, tm, spec) -> dict:
    """The `FidelityTask` `spec` of TextModel `tm` against TextModel `reference`."""
    t0 = time.time()
    config = reference.model.config
    if config.family == GEMMA_FAMILY and spec.seq_len <= config.canvas_length:
        raise ValueError(f"task {spec.name!r}: seq_len={spec.seq_len} leaves no prompt before "
                         f"the canvas of {config.canvas_length} tokens; expected more")
    w = heldout_windows(reference.tokenizer, source=spec.source, split=spec.split,
                        seq_len=spec.seq_len, n_windows=spec.n_windows, seed=spec.seed)
    if tm.model is reference.model:  # the reference itself (the study's fp row): exactly 0
        r = {"kl_bits": 0.0, "kl_bits_se": 0.0, "noise_ratio": spec.noise_ratio,
             "n_windows": int(len(w)), "reference_itself": True}
        if config.family == GEMMA_FAMILY:
            r.update(expert_choices_changed=0.0, expert_choices=None)
    elif config.family == GEMMA_FAMILY:
        r = canvas_kl(reference.model, tm.model, w, noise_ratio=spec.noise_ratio,
                      batch_size=spec.batch_size, seed=spec.seed)
        rc = route_changes(reference.model, tm.model, w, noise_ratio=spec.noise_ratio,
                           batch_size=spec.batch_size, seed=spec.seed)
        r = {**r, "expert_choices_changed": rc["changed_fraction"],
             "expert_choices": rc["choices"]}
    else:
        r = output_kl(reference.model, tm.model, w, mask_ratio=spec.noise_ratio,
                      batch_size=spec.batch_size, seed=spec.seed)
    return {**r, "n": int(len(w)), "time_s": time.time() - t0}


__all__ = ["fidelity"]
