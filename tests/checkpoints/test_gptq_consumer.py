"""Optional: the GPTQ export loads in a real consumer, transformers' GPTQ integration with
GPTQModel's CPU kernels, and gives our packed model's logits.

GPTQModel and optimum are not project dependencies (GPTQModel pins its own torch), so the
consumer runs in another interpreter: $QDLM_GPTQ_PYTHON, else ~/.cache/qdlm/gptq_venv (made as
docs/scale.md says), else this one if it has both packages; the test skips when none has them.
The first run compiles GPTQModel's CPU extension (about 4 minutes), hence slow-marked.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.gptq_format import save_gptq
from qdlm_jax.models.params import get_params
from qdlm_jax.quant import QuantizedArray, QuantSpec, rtn_quantize_params

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import gptqmodel, optimum, transformers, torch"


def consumer_python() -> str | None:
    candidates = [os.environ.get("QDLM_GPTQ_PYTHON"),
                  str(Path.home() / ".cache/qdlm/gptq_venv/bin/python"), sys.executable]
    for py in candidates:
        if py and Path(py).is_file() and subprocess.run(
                [py, "-c", PROBE], capture_output=True, timeout=300).returncode == 0:
            return py
    return None


@pytest.mark.slow
def test_transformers_gptq_integration_loads_the_export(tmp_path):
    py = consumer_python()
    if py is None:
        pytest.skip("no interpreter with gptqmodel + optimum (docs/scale.md: the GPTQ venv)")
    model = load_model(ROOT / "assets/tiny-dream", dtype="float32")
    params = rtn_quantize_params(get_params(model), QuantSpec(bits=4, group_size=64, sym=False))
    save_gptq(model.config, params, tmp_path / "export")
    ours_model = load_model(tmp_path / "export", dtype="float32")  # scales rounded to fp16
    ids = np.random.default_rng(0).integers(4, model.config.vocab_size, (2, 24))
    np.save(tmp_path / "ids.npy", ids)
    ours = np.asarray(ours_model(jnp.asarray(ids, jnp.int32)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    run = subprocess.run([py, str(ROOT / "tests/references/gptq_consumer.py"),
                          str(tmp_path / "export"), str(tmp_path / "work"),
                          str(tmp_path / "ids.npy"), str(tmp_path / "theirs.npz")],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = np.load(tmp_path / "theirs.npz")
    # The consumer dequantizes layer 0's q_proj to our weights (fp16, as it computes).
    q = ours_model.layers[0].q_proj.kernel[...]
    assert isinstance(q, QuantizedArray)
    w_ours = np.asarray(q.dequantize(jnp.float32)).T  # [out, in]
    np.testing.assert_allclose(theirs["q_proj"], w_ours, rtol=1e-3, atol=1e-5)
    # Logits: the consumer's kernel runs in reduced precision; ours in fp32.
    diff = np.abs(theirs["logits"] - ours).max()
    assert diff < 0.02 * np.abs(ours).max(), (diff, str(theirs["kernel"]))
    assert np.mean(theirs["logits"].argmax(-1) == ours.argmax(-1)) > 0.99
