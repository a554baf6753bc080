"""The README's Python section runs as written (from the repository root)."""

import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_section_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own code)
    out = capsys.readouterr().out
    assert "layers.0.down_proj" in out
    assert scope["tokens"].shape == (2, scope["input_ids"].shape[1] + 8)
    assert scope["logits"].shape[:2] == scope["input_ids"].shape
    # The packed model is close to the float one and not identical to it.
    # (in float32: numpy's mean of a bfloat16 array accumulates in bfloat16)
    logits = np.asarray(scope["logits"], np.float32)
    diff = np.abs(np.asarray(scope["qlogits"], np.float32) - logits)
    assert 0 < diff.mean() < 0.1 * np.abs(logits).mean()
    assert os.getcwd() == str(ROOT)
