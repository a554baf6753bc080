"""The runnable recipes in converters/ and the task files in evals/, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdlm_jax.checkpoints.safetensors_io import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "converters" / name), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True)


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({k: np.asarray(st.get(k)) for k in st.keys()})
    return out


# slow: the recipes' round trip at test size (the conversions and transformers parity of
# both families are tested in tests/checkpoints)
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_random_checkpoint_convert_round_trip_and_parity(tmp_path, family):
    src = tmp_path / "random"
    r = _recipe("random_checkpoint.py", f"{family}-tiny", src, "--max-shard-gb", "0.00005")
    assert r.returncode == 0, r.stderr
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == {"llada": "llada", "dream": "Dream"}[family]
    assert cfg["torch_dtype"] == "bfloat16"
    original = _tensors(src)
    assert all(str(a.dtype) == "bfloat16" for a in original.values())

    mid, back = tmp_path / "qdlm", tmp_path / "hf"
    assert _recipe("convert.py", src, mid).returncode == 0
    again = _recipe("convert.py", src, mid)
    assert again.returncode != 0 and "already exists" in again.stderr  # checked before loading
    r = _recipe("convert.py", mid, back, "--to", "hf", "--mesh", "8")
    assert r.returncode == 0, r.stderr
    restored = _tensors(back)
    assert set(restored) == set(original)
    for k, a in original.items():
        assert np.array_equal(a.view(np.uint16), restored[k].view(np.uint16)), k

    f32 = tmp_path / "f32"
    assert _recipe("convert.py", src, f32, "--to", "hf", "--dtype", "float32").returncode == 0
    r = _recipe("parity.py", f32, "--atol", "1e-4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "argmax agreement 100.0%" in r.stdout


def test_parity_reference_sees_a_swapped_tensor(tmp_path):
    """Two layers' q_proj swapped in the file change the reference's logits."""
    from qdlm_jax.checkpoints.random_init import hf_tensors, tiny_config, write_hf_checkpoint
    config = tiny_config("llada")
    t = hf_tensors(config, seed=1)
    q = "model.transformer.blocks.{}.q_proj.weight"
    t[q.format(0)], t[q.format(1)] = t[q.format(1)], t[q.format(0)]
    good = write_hf_checkpoint(tmp_path / "good", config, hf_tensors(config, seed=1))
    bad = write_hf_checkpoint(tmp_path / "bad", config, t)
    # The reference names the hub tensors itself, so a mapping error shows as a difference.
    sys.path.insert(0, str(ROOT / "converters"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    ids = np.arange(16)[None] % 200
    a = parity.reference_logits(parity.reference_model(good, config), ids)
    b = parity.reference_logits(parity.reference_model(bad, config), ids)
    assert np.max(np.abs(a - b)) > 1e-3


def test_quick_task_file_runs_through_qdlm_eval(tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "qdlm_jax", "eval", "--model",
                        str(ROOT / "assets/tiny-llada"), "--task-file",
                        str(ROOT / "evals/tasks/quick.json"), "--limit", "2", "--out", str(out),
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"arithmetic_quick", "wikipedia_bound_quick"}
    assert results["tasks"]["arithmetic_quick"]["n"] == 2
    assert json.loads((out / "config.json").read_text())["limit"] == 2
    again = subprocess.run(r.args, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # never silently replaced


def test_bundled_task_file_is_the_builtin_tasks():
    from qdlm_jax.evals.tasks import BUILTIN, load_task_file
    specs = load_task_file(ROOT / "evals/tasks/bundled.json")
    assert {s.name: s for s in specs} == BUILTIN


# slow: lm-eval's own evaluator end to end (the adapter's requests are tested in
# tests/evals/test_lm_eval_adapter.py)
@pytest.mark.slow
def test_shipped_lm_eval_example_runs_offline_and_prints_a_table(tmp_path):
    pytest.importorskip("lm_eval")
    r = subprocess.run([sys.executable, "-m", "qdlm_jax", "eval", "--model",
                        "assets/tiny-llada", "--lm-eval-tasks", "qdlm_arith_mc",
                        "--lm-eval-include", "evals/lm_eval", "--lm-eval-args",
                        "mc_num=8,mc_batch_size=8", "--limit", "2", "--no-progress",
                        "--out", str(tmp_path / "ev")], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1",
                                       "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "|qdlm_arith_mc" in r.stdout.replace(" ", "") and "acc" in r.stdout
    assert "warning" not in r.stderr.lower()
