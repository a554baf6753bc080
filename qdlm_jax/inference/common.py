"""Pieces both denoising loops share: input checks, top-k selection, progress, padding, and
the Fast-dLLM pieces (cache/threshold/factor checks, the commit rules, the KV-cache buffer and
the cached forward of a block).

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
CACHE_MODES = ("none", "prefix", "dual")


def check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")



def check_blocks(length_name: str, length: int, block_length: int, steps: int):
    """Blocks of a semi-autoregressive loop: `block_length` divides the generated length
    (named `length_name` in the error) and the number of blocks divides `steps`."""
    check_positive_int("block_length", block_length)
    if length % block_length:
        raise ValueError(f"{length_name}={length} is not divisible by "
                         f"block_length={block_length}")
    if steps % (length // block_length):
        raise ValueError(f"steps={steps} is not divisible by the number of blocks "
                         f"{length // block_length} ({length_name}={length} / "
                         f"block_length={block_length})")


def _is_number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer))


def check_cache_threshold(cache, threshold, factor=None):
    """Validates Fast-dLLM's decoding settings: `cache` in CACHE_MODES, `threshold` None or in
    (0, 1], `factor` None or > 0, not both a threshold and a factor."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}: expected one of {CACHE_MODES}")
    if threshold is not None and (not _is_number(threshold) or not 0 < threshold <= 1):
        raise ValueError(f"threshold={threshold!r}: expected None or a number in (0, 1]")
    if factor is not None and (not _is_number(factor) or not factor > 0):
        raise ValueError(f"factor={factor!r}: expected None or a number > 0")
    if threshold is not None and factor is not None:
        raise ValueError(f"threshold={threshold!r} and factor={factor!r}: the threshold and the "
                         "factor rule are two ways to pick a step's tokens; set one of them")


def threshold_select(conf: jax.Array, threshold: float) -> jax.Array:
    """Fast-dLLM's threshold rule on confidences with -inf off the masked positions: per row,
    the most confident masked position (ties: the lower index) plus every masked position
    with confidence >= threshold; nothing in a row without masked positions."""
    masked = conf > NEG_INF
    best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=bool)
    return (best | (conf >= threshold)) & masked


def factor_select(conf: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM's factor rule (`get_transfer_index_dynamic`) on confidences with -inf off the
    masked positions. Per row with m masked positions and confidences sorted c_0 >= c_1 >= ...:
    j* = the first rank j >= 1 with c_j < 1 - factor / (j + 2) (that is, (n + 1)(1 - c_(n)) >
    factor for the n = j + 1 most confident); commit the j* most confident positions, or all m
    when no rank fails or when j* = m - 1 (the reference's loop ends there either way). At
    least one token per row with a masked position; ties: the lower index first."""
    n = conf.shape[-1]
    masked = conf > NEG_INF
    m = masked.sum(axis=-1)
    ranked = jax.lax.top_k(conf, n)[0]  # descending
    j = jnp.arange(n)
    fails = (j >= 1) & (j < m[:, None]) & (ranked < 1.0 - factor / (j + 2.0))
    first_fail = jnp.min(jnp.where(fails, j, n), axis=-1)
    count = jnp.where(first_fail >= m - 1, m, first_fail)
    return top_k_select(conf, count[:, None], n) & masked


def commit_block(x, order, sel, x0, g, start, lb, record_order):
    """Writes x0 into the block [start, start + lb) where `sel` (and the step g into `order`)."""
    x_blk = jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1)
    x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(sel, x0, x_blk), start, axis=1)
    if record_order:
        o_blk = jax.lax.dynamic_slice_in_dim(order, start, lb, axis=1)
        order = jax.lax.dynamic_update_slice_in_dim(order, jnp.where(sel, g, o_blk), start,
                                                    axis=1)
    return x, order


def empty_kv_cache(model, batch: int, length: int):
    """The KV-cache buffer (K, V), each `[layers, batch, length, kv_heads, head_dim]` zeros in
    the compute dtype, preallocated at full length (loop state, filled at block boundaries)."""
    c = model.config
    shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
    return jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)


def refill_kv_cache(old, new):
    return jax.tree.map(lambda a, o: a.astype(o.dtype), new, old)


def prefix_windows(gen_length: int, block_length: int) -> list[int]:
    """Window sizes of the prefix-cache forward: block_length * 2^k, capped at gen_length
    (the suffix from a block on has gen_length - nb * block_length positions)."""
    sizes, w = [], block_length
    while w < gen_length:
        sizes.append(w)
        w *= 2
    return sizes + [gen_length]


def cached_block_hidden(model, x, start, kv, mask, *, cache: str, block_length: int,
                        gen_length: int, position_ids=None):
    """Final-norm hidden states `[B, block_length, D]` of the block [start, start + lb) at a
    later step of the block, over the KV cache `kv` of its first step.

    `prefix` (Fast-dLLM's forward of x[:, start:] over the cached prefix): the block and every
    position after it are computed afresh; positions before the block read the cache. For
    static shapes the window is the last W positions, W the smallest of `prefix_windows` that
    covers the block's suffix (one `lax.switch` branch per size); window positions before the
    block read the cache and their outputs are discarded.
    `dual`: only the block is computed; every other position reads the cache."""
    lb = block_length
    t_total = x.shape[1]
    if cache == "dual":
        return model.hidden_states_cached(jax.lax.dynamic_slice_in_dim(x, start, lb, axis=1),
                                          start, kv, mask, position_ids=position_ids)
    if cache != "prefix":
        raise ValueError(f"cache={cache!r}: expected 'prefix' or 'dual' here")
    windows = prefix_windows(gen_length, lb)

    def branch(w):
        def run(x, start, kv):
            ws = t_total - w
            h = model.hidden_states_cached(x[:, ws:], ws, kv, mask, position_ids=position_ids,
                                           fresh_from=start)
            return jax.lax.dynamic_slice_in_dim(h, start - ws, lb, axis=1)
        return run

    which = jnp.searchsorted(jnp.asarray(windows), t_total - start)
    return jax.lax.switch(which, [branch(w) for w in windows], x, start, kv)


def top_k_select(scores: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Bool mask of the k (traced, <= k_max static; a scalar or one per row, [B, 1]) highest
    scores per row; ties -> lower index first (lax.top_k's order)."""
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


def bucket(x: int) -> int:
    """`x` rounded up to a multiple of 2^max(3, floor(log2 x) - 2): 8, 16, ..., 64, 80, 96,
    112, 128, 160, ... (0 stays 0; at most 12.5% padding above 64)."""
    if x <= 0:
        return 0
    q = 1 << max(3, x.bit_length() - 3)
    return -(-x // q) * q
