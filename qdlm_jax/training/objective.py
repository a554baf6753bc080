"""Masked-diffusion training objective (LLaDA pre-training loss, and Dream's shifted variant).

For a clean sequence x of length L, draw t ~ U(0, 1) per sequence and
    p_mask = (1 - eps) * t + eps,
mask each token independently with probability p_mask (replace it with the mask id), and
minimise
    loss = (1 / (B * L)) * sum_{b, i masked} CE(logits[b, i], x[b, i]) / p_mask[b]
which upper-bounds the negative log-likelihood (the 1/t weight of the ELBO).

Dream predicts token i from the output at position i-1 (its logits are shifted right by one),
so its first position is never masked and the loss reads `logits[:, i-1]` for target i.

Task rows (prompt, answer) use LLaDA's SFT objective (`sft_loss`): the prompt is never
masked; the answer tokens (answer + EOS padding) are masked with p_mask as above, and

    loss = (1 / B) * sum_b (1 / |answer_b|) * sum_{i in answer_b masked} CE(b, i) / p_mask[b]

(the loss of a row is divided by its answer length, then rows are averaged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from qdlm_jax.models.dllm import shift_logits


def mask_tokens(key: jax.Array, tokens: Int[Array, "B T"], mask_id: int, *, eps: float = 1e-3,
                keep_first: bool = False, loss_mask: Int[Array, "B T"] | None = None):
    """Noises a batch: returns (noisy tokens, masked [B, T] bool, p_mask [B]).

    `keep_first` never masks position 0 (Dream); `loss_mask` (1 = may be masked) excludes
    positions such as padding.
    """
    b, t = tokens.shape
    k_t, k_m = jax.random.split(key)
    time = jax.random.uniform(k_t, (b,))
    p_mask = (1.0 - eps) * time + eps
    masked = jax.random.uniform(k_m, (b, t)) < p_mask[:, None]
    if keep_first:
        masked = masked.at[:, 0].set(False)
    if loss_mask is not None:
        masked = masked & loss_mask.astype(bool)
    noisy = jnp.where(masked, mask_id, tokens)
    return noisy, masked, p_mask


def diffusion_loss(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], masked, p_mask,
                   *, shift: bool) -> tuple[jax.Array, dict]:
    """The ELBO loss above; `shift` applies Dream's right shift to the logits first."""
    if shift:
        logits = shift_logits(logits)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    weighted = jnp.where(masked, nll / p_mask[:, None], 0.0)
    b, t = tokens.shape
    loss = weighted.sum() / (b * t)
    n_masked = jnp.maximum(masked.sum(), 1)
    metrics = {"loss": loss, "masked_nll": jnp.where(masked, nll, 0.0).sum() / n_masked,
               "mask_frac": masked.mean()}
    return loss, metrics


def sft_loss(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], masked, p_mask,
             answer, *, shift: bool) -> tuple[jax.Array, dict]:
    """LLaDA's SFT loss above: `answer` [B, T] marks each row's answer field (`masked` must
    lie inside it, e.g. `mask_tokens(..., loss_mask=answer)`); `shift` as in
    `diffusion_loss`."""
    if shift:
        logits = shift_logits(logits)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    masked = masked & answer.astype(bool)
    per_row = jnp.where(masked, nll / p_mask[:, None], 0.0).sum(axis=1)
    answer_len = jnp.maximum(answer.astype(jnp.float32).sum(axis=1), 1.0)
    loss = (per_row / answer_len).mean()
    n_masked = jnp.maximum(masked.sum(), 1)
    metrics = {"sft_loss": loss, "sft_masked_nll": jnp.where(masked, nll, 0.0).sum() / n_masked}
    return loss, metrics
