"""Activation outlier statistics: exact moment combination, capture, the run dir."""

import json

import numpy as np
import pytest

from qdlm_jax.evals import outliers


def chunks_of(x, parts):
    out = []
    for c in np.array_split(x, parts, axis=0):
        a = np.abs(c)
        d = c - c.mean()
        idx = np.searchsorted(outliers.HIST_EDGES, a.ravel())
        out.append({"sum": c.sum(), "c2": (d ** 2).sum(), "c3": (d ** 3).sum(),
                    "c4": (d ** 4).sum(), "ch_max": a.max((0, 1)), "tok_max": a.max(-1),
                    "hist": np.bincount(idx, minlength=len(outliers.HIST_EDGES) + 1)})
    return out


def test_combination_is_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, size=(6, 20, 16)) + 0.3
    x[2, 5, 3] = 80.0  # one massive value: token (2, 5), channel 3
    s = outliers._combine(chunks_of(x, 3), top_k=2, massive_factor=10.0)
    flat = x.ravel()
    m2 = ((flat - flat.mean()) ** 2).mean()
    m4 = ((flat - flat.mean()) ** 4).mean()
    assert s["kurtosis"] == pytest.approx(m4 / m2 ** 2, rel=1e-9)
    assert s["std"] == pytest.approx(flat.std(), rel=1e-9)
    assert s["max_abs"] == 80.0 and s["top_channels"][0] == [3, 80.0]
    assert s["massive_token_frac"] == pytest.approx(1 / 120)
    p50 = np.percentile(np.abs(flat), 50)
    assert p50 <= s["p50"] <= p50 * 10 ** 0.011  # the histogram bin's upper edge
    assert s == outliers._combine(chunks_of(x, 1), top_k=2, massive_factor=10.0) | {
        "kurtosis": pytest.approx(s["kurtosis"]), "std": pytest.approx(s["std"]),
        "mean": pytest.approx(s["mean"])}


def test_run_dir_on_a_local_source(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document {i} is about the river, the "
                                               f"mill and the town."}) + "\n"
                           for i in range(300)))
    spec = outliers.OutlierSpec(n_samples=4, seq_len=32, source=str(src), batch_size=2)
    r = outliers.run_outliers(root / "assets" / "tiny-llada", spec, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    n_layers = json.loads((root / "assets" / "tiny-llada" / "config.json").read_text())[
        "n_layers"]
    names = {f"layers.{i}.{t}" for i in range(n_layers) for t in outliers.LINEAR_TYPES}
    assert set(stats["clean"]) == names | {"lm_head"} == set(stats["masked"])
    assert stats["masked_mask_ratio_mean"] > 0 == stats["clean_mask_ratio_mean"]
    s = stats["clean"]["layers.0.q_proj"]
    assert s["max_abs"] >= s["p99"] >= s["p50"] > 0 and s["tokens"] == 4 * 32
    assert "| down_proj |" in r["markdown"]
    section = stats["super_outliers"]
    assert section["conditions"] == ["clean", "masked"] and section["tokens"] == 2 * 4 * 32
    assert section["spec"] == {"ratio": 20.0, "min_layers": 3}
    assert section["found"] == bool(section["runs"]) and 0 <= section["largest"]["layer"] < n_layers
    assert "## Super-outliers\n\nsuper-outliers: " in r["markdown"]
    png = (tmp_path / "run" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
