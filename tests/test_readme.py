"""The README's Python section runs as written (from the repository root)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from qdlm_jax import generate

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
    # The packed model runs and is not the float one.
    assert np.abs(np.asarray(scope["qlogits"], np.float32)
                  - np.asarray(scope["logits"], np.float32)).mean() > 0
    # Where a masked-diffusion model is trained to predict (masked positions; the outputs at
    # visible positions are unconstrained), the packed model is close to the float one, and
    # it answers the arithmetic prompt as the float model does.
    model, qmodel, ids, mask = (scope[k] for k in ("model", "qmodel", "input_ids",
                                                   "attention_mask"))
    x = np.concatenate([ids, np.full((len(ids), 8), model.config.mask_token_id)], 1)
    m = np.concatenate([mask, np.ones((len(ids), 8), bool)], 1)
    # (in float32: numpy's mean of a bfloat16 array accumulates in bfloat16)
    logits = np.asarray(model(x, m), np.float32)[:, -8:]
    diff = np.abs(np.asarray(qmodel(x, m), np.float32)[:, -8:] - logits)
    assert 0 < diff.mean() < 0.1 * np.abs(logits).mean()
    qtokens = np.asarray(generate(qmodel, ids, mask, gen_length=8, steps=8, block_length=8))
    tok = scope["tok"]
    answer = [tok.decode(np.asarray(t[ids.shape[1]:]).tolist()) for t in (scope["tokens"][0],
                                                                          qtokens[0])]
    assert answer[0].strip() == answer[1].strip() == "46", answer
    assert os.getcwd() == str(ROOT)


def readme_commands(page: str = "README.md",
                    heading: str = "## Command line\n\n") -> list[list[str]]:
    """The `qdlm ...` commands of the first bash block after `heading` in a page, as argv
    lists (continuation lines joined, comments dropped)."""
    import shlex
    text = (ROOT / page).read_text()
    block = re.search(re.escape(heading) + r".*?```bash\n(.*?)```", text, re.S).group(1)
    block = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines()
            if line.startswith("qdlm ")]


def test_readme_command_line_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every README command that needs no earlier run directory (convert both ways, info,
    generate on the bundled model) runs as written and gives the answer the page shows; the
    quantize / study / train commands have their own tests."""
    import shutil

    from qdlm_jax.cli import main
    monkeypatch.chdir(tmp_path)  # `runs/` goes here; the bundled paths resolve from anywhere
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    ran = []
    for argv in readme_commands():
        if argv[1] in ("convert", "info") or (argv[1] == "generate" and "<hash>" not in
                                               " ".join(argv)):
            assert main(argv[1:]) == 0, argv
            ran.append(argv[1])
            out = capsys.readouterr().out
            if argv[1] == "generate":
                assert out.strip().startswith("Question: 12+34=? Answer: 46"), out
    assert ran.count("convert") == 2 and "info" in ran and "generate" in ran
    shutil.rmtree(tmp_path / "runs")


# slow: docs/evaluation.md's commands (the README's run in `make test`)
@pytest.mark.slow
def test_evaluation_page_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/evaluation.md's first `qdlm eval` and `qdlm outliers` commands on the bundled
    model run as written (the others need files of the reader's own, or are the study)."""
    from qdlm_jax.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    commands = readme_commands("docs/evaluation.md", "# Evaluation\n")
    runnable = [a for a in commands if a[1] in ("eval", "outliers")
                and not any("<" in x or "my_" in x for x in a)]
    assert [a[1] for a in runnable] == ["eval", "outliers"]
    for argv in runnable:
        assert main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "arithmetic" in out and "social_iqa" in out


def test_readme_diffusion_gemma_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The DiffusionGemma block: the random tiny checkpoint is written, `info` and `generate`
    run on it as written (the generated ids follow the prompt's)."""
    import importlib
    import shlex
    import sys

    from qdlm_jax.cli import main
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### DiffusionGemma\n.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line]
    assert lines[0][:2] == ["python", "converters/random_checkpoint.py"]
    sys.path.insert(0, str(ROOT / "converters"))
    try:
        recipe = importlib.import_module("random_checkpoint")
    finally:
        sys.path.pop(0)
    assert recipe.main(lines[0][2:]) in (0, None)
    for argv in lines[1:]:
        assert argv[0] == "qdlm" and main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert re.search(r"^5 17 42( \d+)+", out, re.M), out
