"""`qdlm eval` / `qdlm study` / `qdlm outliers`: bad input gives one clear line, exit 2."""

import json
from pathlib import Path

import pytest

from qdlm_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "assets" / "tiny-llada")


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", MODEL, "--tasks", "nope"], "--tasks: unknown task 'nope'"),
    (["eval", "--model", MODEL], "no tasks"),
    (["eval", "--model", MODEL, "--task-file", "missing.json"], "missing.json: no such task "
                                                                "file"),
    (["eval", "--model", "no/model", "--tasks", "arithmetic"], "no/model"),
    (["study", "--config", str(ROOT / "configs" / "study.py"), "--config.tasks=nope"],
     "unknown task 'nope'"),
    (["study", "--config", str(ROOT / "configs" / "study.py"), "--config.bitz=3"],
     "unknown key 'bitz'"),
    (["study", "--config", str(ROOT / "configs" / "study.py"),
      "--config.wa_quantize.act.kv.bitz=4"], "--config.wa_quantize.act.kv.bitz=4: checked "
                                             "against the main job's config"),
    (["outliers", "--model", MODEL, "--n-samples", "0"], "n_samples=0"),
    (["outliers", "--model", MODEL, "--super-ratio", "0.5"], "ratio=0.5"),
    (["eval", "--model", MODEL, "--tasks", "arithmetic", "--threshold", "0.9", "--factor",
      "1"], "set one of them"),
    (["eval", "--model", MODEL, "--tasks", "arithmetic", "--threshold", "1.5"],
     "threshold=1.5"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, out = run(capsys, *argv)
    assert code == 2
    err = out.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], out.err


def test_malformed_task_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": \n')
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"type": "multiple_choice", "name": "mine",
                                 "path": str(data)}))
    code, out = run(capsys, "eval", "--model", MODEL, "--task-file", str(tasks),
                    "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"{data}:2: not valid JSON" in out.err.strip().splitlines()[-1]


def test_eval_writes_results(tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text('{"query": "Question: 12+34=? Answer:", "choices": ["46", "47"], '
                    '"gold": 0}\n')
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"type": "multiple_choice", "name": "mine", "path": str(data),
                                  "mc_num": 4, "batch_size": 4}]))
    code, out = run(capsys, "eval", "--model", MODEL, "--task-file", str(tasks), "--out",
                    str(tmp_path / "o"), "--no-progress")
    assert code == 0 and "mine" in out.out and "acc" in out.out
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["tasks"]["mine"]["n"] == 1


def test_eval_with_fast_dllm_decoding_records_tokens_per_step(tmp_path, capsys):
    """`qdlm eval --cache dual --threshold 0.9`: generation tasks run Fast-dLLM decoding and
    report tokens committed per forward pass."""
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"base": "arithmetic", "name": "add", "limit": 2,
                                  "gen": {"steps": 8, "gen_length": 8, "block_length": 4}}]))
    code, out = run(capsys, "eval", "--model", MODEL, "--task-file", str(tasks), "--out",
                    str(tmp_path / "o"), "--no-progress", "--cache", "dual",
                    "--threshold", "0.9")
    assert code == 0, out.err
    assert "tokens/step" in out.out
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert 1.0 <= r["tasks"]["add"]["tokens_per_step"] <= 4.0
    gen = r["settings"]["tasks"][0]["gen"]
    assert (gen["cache"], gen["threshold"]) == ("dual", 0.9)
    assert r["settings"]["decoding"] == {"cache": "dual", "threshold": 0.9}
