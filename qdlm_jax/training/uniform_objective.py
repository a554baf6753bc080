"""Uniform-state block-diffusion training objective (DiffusionGemma), beside the masked one.

A task row is a prompt (left-padded, `prompt_valid` False on padding) and one canvas of L
tokens: the clean answer a, then EOS / pad. `answer` [B, L] marks the positions that are
noised and scored (the answer and its end-of-sequence token; padding after it is neither).

    t_b      ~ U(eps, 1)                                     (one noise level per row)
    m_bi     ~ Bernoulli(t_b) on answer positions,  u_bi ~ U{0..V-1}
    x_bi     = u_bi if m_bi else a_bi                        (the noisy canvas)
    cache_b  = Enc(prompt_b)                                 (causal, clean, as generation)
    sc       = none, or (with probability `sc_prob`, one draw per step)
               stop_gradient(Dec(x, none, cache)) / T(t_b),  T(t) = t_min + (t_max - t_min) t
               (the sampler's temperature at the step n/N = t; cast to the embedding dtype)
    CE_bi    = -log softmax(Dec(x, sc, cache))_bi[a_bi]      (fp32, soft-capped logits)
    loss     = 1/B sum_b  1/|answer_b| sum_{i in answer_b} CE_bi

Every answer position is scored, noised or not: uniform-state diffusion must also learn to
keep a correct token, since any token of the canvas may be noise. The self-conditioning
draw is per step (one `lax.cond`), so a step runs either one decoder pass or two.

The experts are kept in use by the Switch Transformer's load-balancing loss (Fedus et al.,
2021), per layer l and pass (the encoder over the valid prompt tokens, the decoder pass the
CE reads over the canvas), with N tokens, k choices each and router probabilities p_te:

    f_e  = 1/(N k) sum_t sum_j [e_tj = e]        (share of the choices; no gradient)
    P_e  = 1/N sum_t p_te                         (mean router probability)
    aux  = mean over (pass, layer) of  E sum_e f_e P_e      (1 when balanced, E at collapse)
    total = loss + aux_weight * aux
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from qdlm_jax.models.diffusion_gemma import DiffusionGemma, init_cache

__all__ = ["gemma_task_loss", "load_balance_loss", "sc_temperature", "uniform_noise",
           "uniform_state_loss"]


def uniform_noise(key: jax.Array, tokens: Int[Array, "B L"], answer: Bool[Array, "B L"],
                  vocab_size: int, *, eps: float = 1e-3):
    """(noisy canvas, noised [B, L] bool, t [B]): each answer position of row b is replaced
    by a uniform vocabulary id with probability t_b ~ U(eps, 1)."""
    b, n = tokens.shape
    k_t, k_m, k_u = jax.random.split(key, 3)
    t = eps + (1.0 - eps) * jax.random.uniform(k_t, (b,))
    noised = (jax.random.uniform(k_m, (b, n)) < t[:, None]) & answer.astype(bool)
    ids = jax.random.randint(k_u, (b, n), 0, vocab_size, dtype=tokens.dtype)
    return jnp.where(noised, ids, tokens), noised, t


def sc_temperature(t: Float[Array, " B"], t_min: float, t_max: float) -> Float[Array, " B"]:
    """T(t) = t_min + (t_max - t_min) t: the temperature of the fed-back logits."""
    return jnp.float32(t_min) + jnp.float32(t_max - t_min) * t


def uniform_state_loss(logits: Float[Array, "B L V"], tokens: Int[Array, "B L"],
                       answer: Bool[Array, "B L"], noised: Bool[Array, "B L"] | None = None
                       ) -> tuple[jax.Array, dict]:
    """The row-normalised CE over answer positions (module docstring); metrics split it into
    noised and kept positions when `noised` is given."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    answer = answer.astype(bool)
    per_row = jnp.where(answer, ce, 0.0).sum(axis=1)
    loss = (per_row / jnp.maximum(answer.sum(axis=1), 1)).mean()
    metrics = {"loss": loss}
    if noised is not None:
        kept = answer & ~noised
        metrics["noised_nll"] = jnp.where(noised, ce, 0.0).sum() / jnp.maximum(noised.sum(), 1)
        metrics["kept_nll"] = jnp.where(kept, ce, 0.0).sum() / jnp.maximum(kept.sum(), 1)
        metrics["noise_frac"] = noised.sum() / jnp.maximum(answer.sum(), 1)
    return loss, metrics


def load_balance_loss(routes: dict, num_experts: int,
                      valid: Bool[Array, "B T"] | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean over layers of E sum_e f_e P_e, f [layers, E]) of one pass's `routes` ({layer:
    (top_ids [B, T, k], weights, probs [B, T, E])}, as `encode` / `decode` fill them), over
    the tokens where `valid` (default: all)."""
    terms, shares = [], []
    for layer in sorted(routes):
        top_ids, _, probs = routes[layer]
        w = (jnp.ones(top_ids.shape[:2], jnp.float32) if valid is None
             else valid.astype(jnp.float32))
        n = jnp.maximum(w.sum(), 1.0)
        chosen = jax.nn.one_hot(top_ids, num_experts, dtype=jnp.float32).sum(axis=2)
        f = jax.lax.stop_gradient((chosen * w[..., None]).sum((0, 1)) / (n * top_ids.shape[-1]))
        p = (probs.astype(jnp.float32) * w[..., None]).sum((0, 1)) / n
        terms.append(num_experts * jnp.sum(f * p))
        shares.append(f)
    return jnp.mean(jnp.stack(terms)), jnp.stack(shares)


def gemma_task_loss(model: DiffusionGemma, key: jax.Array, prompt: Int[Array, "B P"],
                    prompt_valid: Bool[Array, "B P"], canvas: Int[Array, "B L"],
                    answer: Bool[Array, "B L"], *, sc_prob: float = 0.5, eps: float = 1e-3,
                    t_min: float = 0.4, t_max: float = 0.8,
                    aux_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """The total loss of the module docstring for a batch of (prompt, canvas) rows;
    differentiable in the model's parameters (encoder and decoder passes share them).
    Metrics: `loss` (the total), `ce_loss`, `aux_loss`, `expert_share_max` (the largest f_e
    times E, averaged over layers and passes: 1 when balanced), and the noise statistics."""
    c = model.config
    b, p = prompt.shape
    n = canvas.shape[1]
    if n != c.canvas_length:
        raise ValueError(f"canvas: {n} tokens per row, the model's canvas_length is "
                         f"{c.canvas_length}")
    k_noise, k_sc = jax.random.split(key)
    x, noised, t = uniform_noise(k_noise, canvas, answer, c.vocab_size, eps=eps)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    enc_routes = {}
    cache = model.encode(prompt, positions, init_cache(c, b, p), prompt_valid,
                         routes=enc_routes)
    enc_aux, enc_share = load_balance_loss(enc_routes, c.num_experts, prompt_valid)
    canvas_positions = jnp.broadcast_to(p + jnp.arange(n, dtype=jnp.int32), (b, n))
    emb_dtype = model.embed[...].dtype

    def decode(sc):
        routes = {}
        logits = model.decode(x, sc, cache, canvas_positions, routes=routes)
        return (logits, *load_balance_loss(routes, c.num_experts))

    def plain():
        return decode(None)

    def self_conditioned():
        first = jax.lax.stop_gradient(model.decode(x, None, cache, canvas_positions))
        temperature = sc_temperature(t, t_min, t_max)[:, None, None]
        return decode((first / temperature).astype(emb_dtype))

    use_sc = jax.random.uniform(k_sc, ()) < sc_prob
    logits, dec_aux, dec_share = jax.lax.cond(use_sc, self_conditioned, plain)
    ce, metrics = uniform_state_loss(logits, canvas, answer, noised)
    aux = (enc_aux + dec_aux) / 2
    share_max = (enc_share.max(-1).mean() + dec_share.max(-1).mean()) / 2 * c.num_experts
    loss = ce + aux_weight * aux
    return loss, {**metrics, "loss": loss, "ce_loss": ce, "aux_loss": aux,
                  "expert_share_max": share_max,
                  "self_conditioned": use_sc.astype(jnp.float32), "t_mean": t.mean()}
