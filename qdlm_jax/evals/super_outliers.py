"""Super-outliers: residual-stream channels that stay huge across consecutive layers.

A super-outlier is one hidden-state channel whose magnitude dwarfs the others' and that the
residual stream carries from block to block (LLaDA-8B holds one through its early layers).
The statistics come from the residual stream h_l after each block l (l = 0 .. L-1, the
model's `Capture(residual_fn=...)` hook), over every token the outliers command feeds it:
all positions of all sequences, clean and masked (every mask ratio), pooled.

Per layer l and channel c, over the N tokens t:

    M[l, c] = max_t |h_l[t, c]|                                  (channel magnitude)
    R[l, c] = M[l, c] / median_c' M[l, c']                       (against the median channel)
    S[l, c] = mean_t h_l[t, c]^2 / ||h_l[t]||_2^2                (share of the squared norm)
    F[l, c] = fraction of tokens t with argmax_c' |h_l[t, c']| = c

The rule: channel c is an outlier at layer l when R[l, c] >= `ratio`; a super-outlier is a
maximal run of consecutive layers first..last in which c is an outlier at every layer, with
last - first + 1 >= `min_layers`. A channel with two such runs is reported twice. The median
over channels is what makes the rule robust: a handful of huge channels do not move it, so
the ratio measures a channel against the bulk of the stream, not against the other outliers.
M is a max, so a channel that is huge on a few tokens only (a massive activation on one
token) qualifies too; S and F tell the two apart (a channel-wide super-outlier holds a large
share on most tokens, a one-token one a small mean share).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Rows of the markdown table; stats.json lists every run.
MAX_TABLE_ROWS = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuperOutlierSpec:
    ratio: float = 20.0  # outlier when a channel's max |h| >= ratio x the median channel's
    min_layers: int = 3  # shortest run of consecutive outlier layers that counts

    def __post_init__(self):
        if not self.ratio > 1:
            raise ValueError(f"super-outlier ratio={self.ratio!r} (--super-ratio): expected a "
                             f"number > 1 (a channel's max |h| against the median channel's)")
        if not isinstance(self.min_layers, int) or self.min_layers <= 0:
            raise ValueError(f"super-outlier min_layers={self.min_layers!r} "
                             f"(--super-min-layers): expected a positive integer")


@dataclasses.dataclass(frozen=True)
class ResidualStats:
    """Sums over tokens of one condition (or several, pooled), per layer and channel."""

    channel_max: Float[np.ndarray, "L D"]  # M: max_t |h[t, c]|
    share_sum: Float[np.ndarray, "L D"]  # sum_t h[t, c]^2 / ||h[t]||^2
    top_count: Float[np.ndarray, "L D"]  # tokens whose largest |h| is channel c
    tokens: int

    def pooled(self, other: ResidualStats) -> ResidualStats:
        return ResidualStats(np.maximum(self.channel_max, other.channel_max),
                             self.share_sum + other.share_sum, self.top_count + other.top_count,
                             self.tokens + other.tokens)


def residual_reduce(h: Float[Array, "B T D"]) -> dict[str, Array]:
    """Per-chunk sums of one block's output (jittable; combined by `residual_stats`)."""
    hf = h.astype(jnp.float32)
    sq = hf * hf
    norm2 = jnp.sum(sq, axis=-1, keepdims=True)
    share = jnp.where(norm2 > 0, sq / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
    top = jnp.argmax(sq, axis=-1).ravel()
    return {"channel_max": jnp.max(jnp.abs(hf), axis=(0, 1)),
            "share_sum": jnp.sum(share, axis=(0, 1)),
            "top_count": jnp.bincount(top, length=h.shape[-1]).astype(jnp.float32)}


def residual_stats(chunks: list[dict[int, dict]]) -> ResidualStats:
    """Combines `residual_reduce` outputs ({layer: sums} per chunk)."""
    layers = sorted(chunks[0])

    def stack(key, combine):
        return np.stack([combine(np.stack([np.asarray(c[i][key], np.float64) for c in chunks]))
                         for i in layers])

    top_count = stack("top_count", lambda a: a.sum(0))
    return ResidualStats(stack("channel_max", lambda a: a.max(0)),
                         stack("share_sum", lambda a: a.sum(0)), top_count,
                         int(round(top_count[0].sum())))  # every token tops one channel


def median_ratio(channel_max: Float[np.ndarray, "L D"]) -> Float[np.ndarray, "L D"]:
    """R = M / median over channels of M, per layer (the median floored at 1e-30)."""
    med = np.median(channel_max, axis=1, keepdims=True)
    return channel_max / np.maximum(med, 1e-30)


def find_super_outliers(channel_max: Float[np.ndarray, "L D"],
                        norm_share: Float[np.ndarray, "L D"],
                        spec: SuperOutlierSpec) -> list[dict]:
    """The maximal runs of the module docstring's rule, largest peak ratio first.

    Each run: channel, first, last (layers, inclusive), layers (= last - first + 1), and over
    the run's layers the ratio R and share S per layer and their peaks."""
    ratio = median_ratio(np.asarray(channel_max, np.float64))
    outlier = ratio >= spec.ratio
    runs = []
    for c in np.flatnonzero(outlier.any(axis=0)):
        col = np.concatenate([[False], outlier[:, c], [False]]).astype(np.int8)
        starts = np.flatnonzero(np.diff(col) == 1)
        ends = np.flatnonzero(np.diff(col) == -1)  # one past the run's last layer
        for a, b in zip(starts, ends):
            if b - a >= spec.min_layers:
                r, s = ratio[a:b, c], np.asarray(norm_share, np.float64)[a:b, c]
                runs.append({"channel": int(c), "first": int(a), "last": int(b - 1),
                             "layers": int(b - a), "ratio_peak": float(r.max()),
                             "share_peak": float(s.max()), "ratio": r.tolist(),
                             "share": s.tolist()})
    return sorted(runs, key=lambda r: (-r["ratio_peak"], r["first"], r["channel"]))


def report(by_condition: dict[str, ResidualStats], spec: SuperOutlierSpec) -> dict:
    """The JSON section: the rule's runs on every condition pooled, each with its peak ratio
    per condition and token fractions, plus the largest ratio anywhere (found or not)."""
    conds = list(by_condition)
    pooled = by_condition[conds[0]]
    for c in conds[1:]:
        pooled = pooled.pooled(by_condition[c])
    share = pooled.share_sum / pooled.tokens
    runs = find_super_outliers(pooled.channel_max, share, spec)
    for run in runs:
        span = slice(run["first"], run["last"] + 1)
        run["max_abs"] = float(pooled.channel_max[span, run["channel"]].max())
        run["top_token_frac"] = (pooled.top_count[span, run["channel"]]
                                 / pooled.tokens).tolist()
        run["ratio_peak_by_condition"] = {
            c: float(median_ratio(s.channel_max)[span, run["channel"]].max())
            for c, s in by_condition.items()}
    ratio = median_ratio(pooled.channel_max)
    layer, channel = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return {"found": bool(runs), "spec": dataclasses.asdict(spec), "conditions": conds,
            "tokens": pooled.tokens, "runs": runs,
            "largest": {"layer": int(layer), "channel": int(channel),
                        "ratio": float(ratio[layer, channel]),
                        "share": float(share[layer, channel])}}


def markdown(section: dict) -> list[str]:
    """The summary's lines: 'super-outliers: none' with the largest ratio seen, or a table."""
    spec, big = section["spec"], section["largest"]
    rule = (f"channel max |h| >= {spec['ratio']:g}x the median channel's in >= "
            f"{spec['min_layers']} consecutive layers' residual stream, "
            f"{section['tokens']} tokens of {' + '.join(section['conditions'])} inputs")
    largest = (f"largest ratio {big['ratio']:.3g} (layer {big['layer']}, channel "
               f"{big['channel']}, {100 * big['share']:.1f}% of the squared norm)")
    if not section["found"]:
        return [f"super-outliers: none ({rule}; {largest})."]
    runs = section["runs"]
    lines = [f"super-outliers: {len(runs)} ({rule})", "",
             "| channel | layers | max abs | ratio to median (peak) | "
             + " | ".join(f"peak ratio {c}" for c in section["conditions"])
             + " | share of squared norm (peak) | tokens it tops (peak) |",
             "|---|---|---|---|" + "---|" * len(section["conditions"]) + "---|---|"]
    for r in runs[:MAX_TABLE_ROWS]:
        by_cond = " | ".join(f"{r['ratio_peak_by_condition'][c]:.3g}"
                             for c in section["conditions"])
        lines.append(f"| {r['channel']} | {r['first']}..{r['last']} | {r['max_abs']:.3g} | "
                     f"{r['ratio_peak']:.3g} | {by_cond} | {100 * r['share_peak']:.1f}% | "
                     f"{100 * max(r['top_token_frac']):.0f}% |")
    if len(runs) > MAX_TABLE_ROWS:
        lines.append(f"\n({len(runs) - MAX_TABLE_ROWS} more runs in stats.json)")
    return lines
