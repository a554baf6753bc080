"""Pieces both denoising loops share: input checks, top-k selection, progress, padding.

The loops themselves are in `llada.py` and `dream.py`; `generate.py` dispatches by family and
documents both algorithms.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")



def top_k_select(scores: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Bool mask of the k (traced, <= k_max static) highest scores per row; ties -> lower
    index first (lax.top_k's order)."""
    b, n = scores.shape
    k_max = max(1, min(k_max, n))
    _, idx = jax.lax.top_k(scores, k_max)  # [B, k_max]
    take = jnp.arange(k_max)[None, :] < k
    sel = jnp.zeros((b, n), bool)
    return sel.at[jnp.arange(b)[:, None], idx].set(take)


def _progress_print(step, total):
    step = int(step) + 1
    width = 30
    done = width * step // total
    end = "\n" if step == total else ""
    print(f"\r  step {step:>5}/{total} [{'#' * done}{'.' * (width - done)}]", end=end,
          file=sys.stderr, flush=True)


def maybe_progress(enabled: bool, g, total: int):
    if enabled:
        jax.debug.callback(functools.partial(_progress_print, total=total), g)


def default_key(key, stochastic: bool, what: str):
    if key is not None:
        return key
    if stochastic:
        raise ValueError(f"key=None: {what} is stochastic; pass key=jax.random.key(seed)")
    return jax.random.key(0)  # unused by deterministic settings


def prepare_inputs(model, input_ids, attention_mask):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [batch, prompt_len], got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(jnp.int32)
    mask = None
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape} != input_ids shape "
                             f"{ids.shape}")
        mask = mask.astype(jnp.int32)
    mask_id = model.config.mask_token_id
    if not isinstance(ids, jax.core.Tracer):
        valid = np.ones(ids.shape, bool) if mask is None or isinstance(mask, jax.core.Tracer) \
            else np.asarray(mask).astype(bool)
        if np.any((np.asarray(ids) == mask_id) & valid):
            raise ValueError(f"input_ids: the prompt contains the mask token {mask_id}; "
                             "prompt positions are conditioning and must not be masked")
    return ids, mask



def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, W], attention_mask [B, W]) with each row right-aligned (left padding);
    W = `width` (at least the longest row) or the longest row."""
    longest = max(len(r) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"width={width}: shorter than the longest row ({longest} tokens)")
    width = longest if width is None else width
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask
