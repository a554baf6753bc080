"""Activation outliers: statistics of every linear layer's input, clean vs masked inputs.

Inputs are calibration windows of a text source built by `calibration.feeders
.build_calibration` in mode `clean` (text as is) and `masked` (Quant-dLLM's MCS: sample i
masked at ratio t_i = (i + 1) / N), so the two conditions see the same text. For each linear
layer (hook points `layers.{i}.{q,k,v,o,gate,up,down}_proj`, `lm_head`) and condition, over
all N * T tokens and all D input channels of its input x:

    max_abs          = max |x|
    mean, std        = mean of x, sqrt(m2)            (m_k = mean of (x - mean)^k)
    kurtosis         = m4 / m2^2                      (Pearson; 3 for a Gaussian)
    p50 .. p99.99    = percentiles of |x| from a log-spaced histogram (bins 10^(1/100) wide
                       from 1e-8 to 1e8; the reported value is the bin's upper edge)
    top_channels     = the `top_k` channels with the largest max |x| (index, value)
    channel_ratio    = largest channel max |x| / median channel max |x|
    massive_token_frac = fraction of tokens whose max |x| over channels exceeds
                         `massive_factor` x the median over tokens of that max
                         (QDLM's "massive outliers": huge values on a few tokens)

Moments are accumulated per forward chunk as (count, sum, central sums about the chunk
mean) and combined exactly on the host in float64.

The same forward passes record each block's output (the residual stream) for the
super-outlier detector of `super_outliers.py`: channels many times the median channel that
persist across consecutive layers (`stats.json`'s "super_outliers", the summary's section).

`run_outliers` writes `stats.json`, `summary.md` and `heatmap.png` (rows: max |x| and
kurtosis; columns: clean and masked; each panel layers x linear type, log colour scale
shared by the two conditions) to the run dir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qdlm_jax.evals import super_outliers
from qdlm_jax.evals.super_outliers import ResidualStats, SuperOutlierSpec
from qdlm_jax.fsutil import atomic_file, atomic_write_text
from qdlm_jax.models.capture import Capture

LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONDITIONS = ("clean", "masked")
HIST_EDGES = np.logspace(-8, 8, 1601)  # 100 bins per decade
PERCENTILES = (50.0, 99.0, 99.9, 99.99)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutlierSpec:
    n_samples: int = 16
    seq_len: int = 128
    source: str = "bigbench-wikipedia"
    seed: int = 0
    top_k: int = 8
    batch_size: int = 8  # sequences per forward chunk
    massive_factor: float = 10.0
    super_outlier: SuperOutlierSpec = SuperOutlierSpec()

    def __post_init__(self):
        for name in ("n_samples", "seq_len", "top_k", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive integer")


def _reduce(x):
    """Per-chunk reductions of one layer input x [B, T, D] (see the module docstring)."""
    xf = x.astype(jnp.float32)
    a = jnp.abs(xf)
    mu = jnp.mean(xf)
    d = xf - mu
    idx = jnp.searchsorted(jnp.asarray(HIST_EDGES, jnp.float32), a.ravel())
    return {"sum": jnp.sum(xf), "c2": jnp.sum(d ** 2), "c3": jnp.sum(d ** 3),
            "c4": jnp.sum(d ** 4), "ch_max": jnp.max(a, axis=(0, 1)),
            "tok_max": jnp.max(a, axis=-1),
            "hist": jnp.bincount(idx, length=len(HIST_EDGES) + 1)}


@functools.lru_cache(maxsize=8)
def _capture_fn(graphdef):
    @jax.jit
    def run(state, ids, mask):
        model = nnx.merge(graphdef, state)
        cap = Capture(names=None, fn=_reduce, residual_fn=super_outliers.residual_reduce)
        model(ids, mask, capture=cap)  # the logits are unused (XLA drops the head matmul)
        return cap.values, cap.residual

    return run


def _combine(chunks: list[dict], top_k: int, massive_factor: float) -> dict:
    """Exact float64 combination of per-chunk reductions -> the layer's statistics."""
    n_c = np.asarray([c["tok_max"].size * c["ch_max"].size for c in chunks], np.float64)
    s1 = np.asarray([float(c["sum"]) for c in chunks])
    n = n_c.sum()
    mu = s1.sum() / n
    m2 = m3 = m4 = 0.0
    for c, nc, s in zip(chunks, n_c, s1):
        delta = s / nc - mu
        c2, c3, c4 = float(c["c2"]), float(c["c3"]), float(c["c4"])
        m2 += c2 + nc * delta ** 2
        m3 += c3 + 3 * delta * c2 + nc * delta ** 3
        m4 += c4 + 4 * delta * c3 + 6 * delta ** 2 * c2 + nc * delta ** 4
    m2, m4 = m2 / n, m4 / n
    ch_max = np.max(np.stack([np.asarray(c["ch_max"]) for c in chunks]), axis=0)
    tok_max = np.concatenate([np.asarray(c["tok_max"]).ravel() for c in chunks])
    hist = np.sum(np.stack([np.asarray(c["hist"], np.int64) for c in chunks]), axis=0)
    cum = np.cumsum(hist) / hist.sum()
    upper = np.concatenate([HIST_EDGES, [np.inf]])  # bin j holds |x| in (e[j-1], e[j]]
    pct = {f"p{p:g}": float(upper[np.searchsorted(cum, p / 100.0)]) for p in PERCENTILES}
    top = np.argsort(-ch_max)[:top_k]
    med_tok = float(np.median(tok_max))
    return {"max_abs": float(ch_max.max()), "mean": float(mu), "std": float(np.sqrt(m2)),
            "kurtosis": float(m4 / m2 ** 2) if m2 > 0 else float("nan"), **pct,
            "top_channels": [[int(i), float(ch_max[i])] for i in top],
            "channel_ratio": float(ch_max.max() / max(np.median(ch_max), 1e-30)),
            "massive_token_frac": float(np.mean(tok_max > massive_factor * med_tok)),
            "tokens": int(tok_max.size)}


def layer_stats(model, ids: np.ndarray, attention_mask: np.ndarray, spec: OutlierSpec, *,
                desc: str = "activations") -> tuple[dict[str, dict], ResidualStats]:
    """({linear layer name: statistics} of the model's linear inputs, the residual stream's
    per-channel sums) on `ids` [N, T]."""
    graphdef, state = nnx.split(model)
    fn = _capture_fn(graphdef)
    per_layer: dict[str, list] = {}
    residual = []
    for start in tqdm(range(0, len(ids), spec.batch_size), desc=desc, leave=False):
        vals, res = jax.device_get(fn(state, jnp.asarray(ids[start:start + spec.batch_size]),
                                      jnp.asarray(attention_mask[start:start + spec.batch_size])))
        residual.append(res)
        for name, v in vals.items():
            per_layer.setdefault(name, []).append(v)
    return ({name: _combine(chunks, spec.top_k, spec.massive_factor)
             for name, chunks in per_layer.items()},
            super_outliers.residual_stats(residual))


def collect(model, tokenizer, spec: OutlierSpec) -> dict:
    """{"clean": {layer: stats}, "masked": {...}, "<cond>_mask_ratio_mean": ...,
    "super_outliers": the detector's section over both conditions}."""
    from qdlm_jax.evals.basic import heldout_windows
    from qdlm_jax.quant.calibration import CalibSpec, build_calibration
    w = heldout_windows(tokenizer, source=spec.source, split="calib",
                        seq_len=spec.seq_len, n_windows=spec.n_samples, seed=0)
    out, residual = {}, {}
    for cond in CONDITIONS:
        batch = build_calibration(model, w, CalibSpec(mode=cond, n_samples=spec.n_samples,
                                                      seq_len=spec.seq_len, seed=spec.seed))
        out[cond], residual[cond] = layer_stats(model, batch.ids, batch.attention_mask, spec,
                                                desc=cond)
        out[f"{cond}_mask_ratio_mean"] = float(np.mean(batch.mask_ratio))
    out["super_outliers"] = super_outliers.report(residual, spec.super_outlier)
    return out


def grid(stats: dict[str, dict], num_layers: int, key: str) -> np.ndarray:
    """[num_layers, len(LINEAR_TYPES)] of one statistic."""
    g = np.full((num_layers, len(LINEAR_TYPES)), np.nan)
    for i in range(num_layers):
        for j, t in enumerate(LINEAR_TYPES):
            s = stats.get(f"layers.{i}.{t}")
            if s is not None:
                g[i, j] = s[key]
    return g


def heatmap(result: dict, num_layers: int, title: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = (("max_abs", "max |x|"), ("kurtosis", "kurtosis"))
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 2.2 + 0.38 * num_layers * 2), squeeze=False)
    for r, (key, label) in enumerate(rows):
        grids = [grid(result[c], num_layers, key) for c in CONDITIONS]
        finite = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
        vmin, vmax = (finite.min(), finite.max()) if finite.size else (1e-3, 1.0)
        for c, (cond, g) in enumerate(zip(CONDITIONS, grids)):
            ax = axes[r, c]
            norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.0001))
            im = ax.imshow(g, aspect="auto", cmap="viridis", norm=norm)
            ax.set_xticks(range(len(LINEAR_TYPES)),
                          [t.replace("_proj", "") for t in LINEAR_TYPES])
            ax.set_yticks(range(num_layers))
            ax.set_ylabel("layer")
            ax.set_title(f"{label}, {cond} inputs", fontsize=10)
            for i in range(g.shape[0]):
                for j in range(g.shape[1]):
                    if np.isfinite(g[i, j]):
                        ax.text(j, i, f"{g[i, j]:.3g}", ha="center", va="center", fontsize=6,
                                color="black" if norm(g[i, j]) > 0.6 else "white")
            fig.colorbar(im, ax=ax, label=f"{label} (log scale)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict, num_layers: int, model_name: str) -> str:
    lines = [f"# Activation outliers: {model_name}", "",
             f"Inputs: {result['spec']['n_samples']} x {result['spec']['seq_len']} tokens of "
             f"`{result['spec']['source']}` (calib split); masked: mean mask ratio "
             f"{result['masked_mask_ratio_mean']:.2f}.", "",
             "Per linear type, over layers: mean of max |x|, mean kurtosis, mean fraction "
             "of massive-outlier tokens.", "",
             "| linear | max abs clean | max abs masked | kurtosis clean | kurtosis masked | "
             "massive tok clean | massive tok masked |", "|---|---|---|---|---|---|---|"]
    for j, t in enumerate(LINEAR_TYPES):
        vals = []
        for key in ("max_abs", "kurtosis", "massive_token_frac"):
            for c in CONDITIONS:
                vals.append(float(np.nanmean(grid(result[c], num_layers, key)[:, j])))
        lines.append(f"| {t} | {vals[0]:.3g} | {vals[1]:.3g} | {vals[2]:.3g} | {vals[3]:.3g} "
                     f"| {vals[4]:.3f} | {vals[5]:.3f} |")
    for c in CONDITIONS:
        top = sorted(result[c].items(), key=lambda kv: -kv[1]["max_abs"])[:5]
        lines += ["", f"Largest max |x| ({c}): " + ", ".join(
            f"`{k}` {v['max_abs']:.3g} (ch {v['top_channels'][0][0]})" for k, v in top)]
    lines += ["", "## Super-outliers", "", *super_outliers.markdown(result["super_outliers"])]
    return "\n".join(lines) + "\n"


def run_outliers(model_path, spec: OutlierSpec, out_dir) -> dict:
    """Collects the statistics of `model_path` and writes stats.json, summary.md,
    heatmap.png to `out_dir`."""
    from qdlm_jax.evals.backends import load_text_model
    t0 = time.time()
    tm = load_text_model(model_path)
    result = collect(tm.model, tm.tokenizer, spec)
    result["spec"] = dataclasses.asdict(spec)
    result["model"] = str(model_path)
    result["time_s"] = time.time() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = tm.model.config.num_layers
    name = Path(model_path).name
    md = markdown(result, n_layers, name)
    atomic_write_text(out / "stats.json", json.dumps(result, indent=1))
    atomic_write_text(out / "summary.md", md)
    heatmap(result, n_layers, f"{name}: linear-layer input activations", out / "heatmap.png")
    return {**result, "markdown": md}
