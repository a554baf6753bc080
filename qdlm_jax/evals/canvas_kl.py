r"""How far a quantized DiffusionGemma's denoising predictions are from the fp model's, without
Monte Carlo noise (the family has no mask token, so `basic.output_kl` does not apply).

Each window w of P + L tokens (L = canvas_length) is a clean prompt w[:P] and a canvas
w[P:] with each position replaced by a uniform vocabulary id with probability 1/2 (the
family's noise, drawn as the calibration draws it; the same draw for every model compared).
Both models decode the canvas twice after encoding the prompt, as two sampler steps do:

    step 1:  logits_m = Dec_m(x, none, Enc_m(prompt))
    step 2:  logits_m = Dec_m(x, sc, Enc_m(prompt)),   sc = logits_fp(step 1) / T  (both m)

with T = 0.6 (the sampler's temperature at noise level 1/2, t_min 0.4, t_max 0.8) and sc cast
to the embedding dtype, so the self-conditioning MLP is exercised (without sc its input is 0). Then

    KL = mean over (window, step, canvas position) of sum_v p_fp(v) (log p_fp(v) - log p_q(v))
         / ln 2                                                          bits per position

with its standard error over windows.

`route_changes` counts, on the same prompts and noisy canvases, how many of the fp model's
top-k expert choices the other model does not make: each model routes its own forward
(the encoder over the prompt, the decoder's first step over the canvas), and

    changed = sum over (layer, token, pass) of |top_k_fp \ top_k_model| / (layers x tokens x
              passes x k)

the fraction of choices that changed (a token whose k experts are the same in another order
counts none).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.evals.basic import mean_se
from qdlm_jax.models.diffusion_gemma import init_cache
from qdlm_jax.quant.gemma_calibration import noised_canvases

LN2 = math.log(2.0)
SC_TEMPERATURE = 0.6  # t_min + (t_max - t_min) / 2 of the sampler's default schedule


def _two_steps(state, prompt, canvas, sc, *, graphdef):
    """(step-1 logits, step-2 logits, the sc fed to step 2) of one model; `sc` None: its
    own step-1 logits / T in the embedding dtype (module docstring). One encode."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    cache = model.encode(prompt, None, init_cache(model.config, b, p + canvas.shape[1]))
    first = model.decode(canvas, None, cache)
    if sc is None:
        sc = (first / SC_TEMPERATURE).astype(model.embed[...].dtype)
    return first, model.decode(canvas, sc, cache), sc


_two_steps_jit = jax.jit(_two_steps, static_argnames="graphdef")


def _kl(a, b):
    """sum_v p_a (log p_a - log p_b) per row, fp32 log-softmax of the logits."""
    la, lb = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
    return jnp.sum(jnp.exp(la) * (la - lb), axis=-1)


def split_windows(windows: np.ndarray, canvas_length: int, vocab_size: int, *,
                  noise_ratio: float = 0.5, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """(prompts [n, P], noisy canvases [n, L]) of windows [n, P + L]: the canvases noised as
    the calibration noises them (`gemma_calibration.noised_canvases`, key `seed`)."""
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] <= canvas_length:
        raise ValueError(f"windows: expected [n, P + {canvas_length}] with P > 0, got {w.shape}")
    clean = jnp.asarray(w[:, -canvas_length:], jnp.int32)
    canvases = noised_canvases(clean, noise_ratio, jax.random.key(seed), vocab_size)
    return jnp.asarray(w[:, :-canvas_length], jnp.int32), canvases


def _routes(state, prompt, canvas, *, graphdef):
    """{(pass, layer): top_ids} of the encoder over the prompt and the decoder's first step."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    enc, dec = {}, {}
    cache = model.encode(prompt, None, init_cache(model.config, b, p + canvas.shape[1]),
                         routes=enc)
    model.decode(canvas, None, cache, routes=dec)
    return ({("encoder", i): v[0] for i, v in enc.items()}
            | {("decoder", i): v[0] for i, v in dec.items()})


_routes_jit = jax.jit(_routes, static_argnames="graphdef")


def route_changes(reference, model, windows: np.ndarray, *, noise_ratio: float = 0.5,
                  batch_size: int = 8, seed: int = 0) -> dict:
    """The fraction of the reference's top-k expert choices `model` does not make (module
    docstring) on `windows` [n, P + L]."""
    c = reference.config
    prompts, canvases = split_windows(windows, c.canvas_length, c.vocab_size,
                                      noise_ratio=noise_ratio, seed=seed)
    (g_ref, s_ref), (g_model, s_model) = nnx.split(reference), nnx.split(model)
    changed = total = 0
    for i in range(0, len(prompts), batch_size):
        p, x = prompts[i:i + batch_size], canvases[i:i + batch_size]
        a = _routes_jit(s_ref, p, x, graphdef=g_ref)
        b = _routes_jit(s_model, p, x, graphdef=g_model)
        for key, ids in a.items():
            same = jnp.any(ids[..., :, None] == b[key][..., None, :], axis=-1)
            changed += int(jnp.sum(~same))
            total += int(same.size)
    return {"changed_fraction": changed / total, "choices": total}


def canvas_kl(reference, model, windows: np.ndarray, *, noise_ratio: float = 0.5,
              batch_size: int = 8, seed: int = 0) -> dict:
    """Mean KL(reference || model) in bits per canvas position (module docstring) on
    `windows` [n, P + L], L = the reference's canvas_length."""
    c = reference.config
    prompts, canvases = split_windows(windows, c.canvas_length, c.vocab_size,
                                      noise_ratio=noise_ratio, seed=seed)
    (g_ref, s_ref), (g_model, s_model) = nnx.split(reference), nnx.split(model)
    per_window = []
    for i in range(0, len(prompts), batch_size):
        p, x = prompts[i:i + batch_size], canvases[i:i + batch_size]
        a1, a2, sc = _two_steps_jit(s_ref, p, x, None, graphdef=g_ref)
        b1, b2, _ = _two_steps_jit(s_model, p, x, sc, graphdef=g_model)
        kl = (jnp.mean(_kl(a1, b1), axis=1) + jnp.mean(_kl(a2, b2), axis=1)) / 2
        per_window += np.asarray(kl, np.float64).tolist()
    per_window = np.asarray(per_window) / LN2
    return {"kl_bits": float(per_window.mean()), "kl_bits_se": mean_se(per_window),
            "positions": int(2 * canvases.size), "noise_ratio": noise_ratio,
            "n_windows": int(len(prompts)), "prompt_len": int(prompts.shape[1]),
            "canvas_length": int(canvases.shape[1])}


__all__ = ["SC_TEMPERATURE", "canvas_kl", "route_changes", "split_windows"]
