"""Evaluate a trained tiny model and ship it: `python -m qdlm_jax.jobs.model_card RUN_DIR DEST`.

RUN_DIR is a `qdlm train` output (its `hf/` export, `summary.json`, `log.jsonl`,
`loss.png`); DEST (e.g. `assets/tiny-llada`) receives config.json, model.safetensors,
tokenizer.json, loss.png and a README.md model card with the measured figures:
held-out masked-likelihood bound vs the unigram entropy of the train split (and in bits per
byte of text, which does not depend on the vocabulary), held-out 2-digit addition exact
match through the denoising loop, and the synthetic tasks of `evals.tasks` (3-digit
addition, synthetic code pass@1 in the sandbox, 4-way comparisons by Monte Carlo
likelihood), each with its standard error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qdlm_jax.checkpoints.load import load_model, load_tokenizer
from qdlm_jax.evals.backends import TextModel
from qdlm_jax.evals.basic import (
    ArithmeticEval,
    arithmetic_accuracy,
    binomial_se,
    heldout_bound,
    heldout_windows,
    unigram_entropy,
)
from qdlm_jax.evals.tasks import BUILTIN, run_task
from qdlm_jax.fsutil import atomic_dir
from qdlm_jax.jobs import gemma_card
from qdlm_jax.models.config import family_shifts_logits
from qdlm_jax.models.dllm import count_params
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.training.trainer import step_objective

_LAYOUT = {"llada": "LLaDA (`model_type: llada`, `model.transformer.blocks.*` keys)",
           "dream": "Dream (`model_type: Dream`, Qwen2 `model.layers.*` keys, GQA, q/k/v biases)"}


# The synthetic tasks of the card (evals.tasks built-ins; held-out items), with the card's
# changes to the built-in settings (fewer Monte Carlo samples than the studies' 128: the
# card is made on 2 CPU cores; the options share their noise draws).
SYNTHETIC = ("arithmetic_subtract", "arithmetic_3digit", "synthetic_code", "synthetic_compare")
CARD_SETTINGS = {"synthetic_compare": {"mc_num": 32}}


def synthetic_scores(model, tokenizer, names=SYNTHETIC) -> dict:
    """{task: {metric, value, se, n, examples}} of the synthetic built-in tasks."""
    tm = TextModel(model, tokenizer)
    out = {}
    for name in names:
        spec = dataclasses.replace(BUILTIN[name], **CARD_SETTINGS.get(name, {}))
        r = run_task(tm, spec, progress=False)
        out[name] = {"metric": r["metric"], "value": r["value"], **CARD_SETTINGS.get(name, {}),
                     "se": r["se"], "n": r["n"],
                     "examples": r.get("examples", [])[:3]}
        print(f"[card] {name}: {r['metric']} {r['value']:.3f} (n={r['n']})", flush=True)
    return out


def bytes_per_token(tokenizer, windows) -> float:
    """UTF-8 bytes of text per token of `windows` (special tokens count 0 bytes)."""
    n_bytes = sum(len(tokenizer.decode([int(t) for t in w], skip_special_tokens=True)
                      .encode("utf-8")) for w in windows)
    return n_bytes / np.asarray(windows).size


def evaluate(hf_dir: Path, train_dir: Path, *, n_windows: int, mc_num: int, n_arith: int):
    model = load_model(hf_dir, dtype="float32")
    tokenizer = load_tokenizer(hf_dir)
    summary = json.loads((train_dir / "summary.json").read_text())
    seq_len = summary["config"]["data"]["seq_len"]
    train_windows = np.load(train_dir / f"wiki_train_{seq_len}.npy")
    t0 = time.time()
    uni = unigram_entropy(train_windows, model.config.vocab_size)
    windows = heldout_windows(tokenizer, seq_len=seq_len, n_windows=n_windows)
    bound = heldout_bound(model, windows, mc_num=mc_num)
    bpt = bytes_per_token(tokenizer, windows)
    bound["bits_per_byte"] = bound["bits_per_token"] / bpt
    uni["bits_per_byte"] = uni["bits_per_token"] / bpt
    arith = arithmetic_accuracy(model, tokenizer, ArithmeticEval(n=n_arith))
    arith.setdefault("se", binomial_se(arith["accuracy"], arith["n"]))
    synth = synthetic_scores(model, tokenizer)
    return {"params": count_params(model), "unigram_entropy": uni, "heldout_bound": bound,
            "bound_vs_unigram": bound["bits_per_token"] / uni["bits_per_token"] - 1.0,
            "arithmetic_2digit_add": arith, "synthetic": synth,
            "eval_time_s": time.time() - t0, "train": summary}


ANSWER_FORMATS = [
    "- Answer formats (the answer field of every task row is the answer's tokens, then EOS "
    "up to its length; digits are single tokens):",
    "  - arithmetic: `Question: 347+582=? Answer:` → ` 929`, `Question: 83-47=? Answer:` → "
    "` 36` (most significant digit first, no padding; answer field 8 tokens, generation "
    "length 8);",
    "  - code: `def f(x):\\n    \"add 3, then multiply by 2\"\\n    return` → "
    "` (x + 3) * 2` (every earlier step parenthesised; answer field 12 tokens);",
    "  - comparisons: `Question: Which is the largest: 47, 83, 12, 55? Answer:` → ` 83` "
    "(answer field 4 tokens; scored by the likelihood of each of the 4 options).",
]


def objective(family: str | None, phase: dict) -> str:
    """"shifted / unshifted": whether a phase's text rows and task rows predict token i from
    output i-1 (its `shift` / `text_shift` keys, else the family's own: Dream shifted)."""
    rows = step_objective(family_shifts_logits(family), phase.get("shift"),
                          phase.get("text_shift"))
    return " / ".join("shifted" if x else "unshifted" for x in rows)


def phase_lines(s: dict, c: dict) -> list[str]:
    """Data mix, objective and training time of each phase (a markdown table); the phases
    of `s` (the run summary) are those of the config `c`, in order."""
    phases = s.get("phases")
    if not phases:
        return [f"- Data mix: `{c['data'].get('arith_frac', 0):.0%}` of rows packed "
                "arithmetic problems, the rest Wikipedia windows."]
    lines = ["- Data mix, phase by phase (task rows: `data.synthetic` train split; text rows: "
             f"Wikipedia windows of {c['data']['seq_len']} tokens; task rows right-padded "
             "to the phase's length):", "",
             "| steps | rows per step (text + task) | task row length | task mix (weights) | "
             "objective (text / task) | text tokens | task rows seen | training time | "
             "final text / SFT loss (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    configured = c["data"].get("phases") or [{}] * len(phases)
    for p, ph in zip(phases, configured):
        mix = ", ".join(f"{k} {v:g}" for k, v in p["mix"].items())
        tl = "–" if p["final_text_loss"] is None else f"{p['final_text_loss']:.3f}"
        sl = "–" if p["final_sft_loss"] is None else f"{p['final_sft_loss']:.3f}"
        tsl = p.get("task_seq_len", c["data"]["task_seq_len"])
        time_s = ("earlier run" if p.get("before_start")
                  else f"{p['train_time_s'] / 60:.1f} min")
        lines.append(f"| {p['steps'][0]}–{p['steps'][1]} | {p['text_rows']} + "
                     f"{p['task_rows']} | {tsl} | {mix} | {objective(s.get('family'), ph)} | "
                     f"{p['text_tokens'] / 1e6:.2f}M | "
                     f"{p['task_rows_seen']:,} | {time_s} | "
                     f"{tl} / {sl} |")
    return lines + [""]


def card(family: str, r: dict, note: str = "") -> str:
    """The model card; `note` (markdown) goes at the end of "Data and training", e.g. how a
    resumed run's configuration changed along the way."""
    s = r["train"]
    c = s["config"]
    b, u, a = r["heldout_bound"], r["unigram_entropy"], r["arithmetic_2digit_add"]
    hours = s["train_time_s_total"] / 3600
    m = c["model"]
    lines = [
        f"# tiny-{family}: a {r['params'] / 1e6:.1f}M-parameter masked-diffusion LM",
        "",
        f"Trained by qdlm-jax as the offline default model, stored in the {_LAYOUT[family]}",
        "hub layout so it loads through the same converters as a real checkpoint.",
        "",
        "## Model",
        f"- {m['num_layers']} layers, width {m['hidden_size']}, {m['num_heads']} heads "
        f"({m['num_kv_heads']} kv heads), SwiGLU {m['intermediate_size']}, RoPE θ="
        f"{m['rope_theta']:g}, vocab {c['data']['vocab_size']} (byte-level BPE, `tokenizer.json`);"
        f" weights stored in bf16.",
        "",
        "## Data and training",
        "- English Wikipedia documents from the BIG-bench `paragraph_segmentation` task "
        "(fetched at run time from the `bigbench==1.0.0` sdist; train split of a "
        "document-level 90/5/5 split), plus project-generated task rows (held-out items "
        "never trained on: a salted hash of each item decides its split).",
        *phase_lines(s, c),
        *(ANSWER_FORMATS if s.get("phases") else []),
        f"- Objective: masked diffusion, p_mask=(1-ε)t+ε, loss on masked tokens / p_mask"
        f"{' with logits shifted right by one (Dream)' if family == 'dream' else ''} on text "
        "rows; LLaDA's SFT objective on task rows (prompt never masked, loss summed over "
        "masked answer tokens / p_mask and divided by the answer length); the two weighted "
        "by their share of the rows.",
        f"- {s['steps']} AdamW steps, {s['tokens'] / 1e6:.2f}M tokens; peak lr "
        f"{c['train']['lr']}, warmup {c['train']['warmup_steps']}, cosine decay to "
        f"{c['train']['final_lr_frac']:g}× peak; final training loss {s['final_loss']:.3f} nats.",
        f"- Training time: {hours:.2f} h on a 2-core CPU, shared with a second training run "
        "(sum of logged intervals; pauses over 10 min left out)"
        + (f" for steps {s['start']['step']}–{s['steps']}: this run started from the weights "
           f"of `{Path(s['start']['from_dir']).name}` at step {s['start']['step']} with a "
           "fresh optimizer state; the earlier phases' times and losses are in that model's "
           "card." if s.get("start") else "."),
        *([f"- {note}"] if note else []),
        "",
        "![loss curve](loss.png)",
        "",
        "## Evaluation (held-out data)",
        "| measure | value |",
        "|---|---|",
        f"| masked-likelihood bound, {b['tokens']} held-out tokens, mc_num={b['mc_num']} | "
        f"{b['bits_per_token']:.3f} bits/token ({b['nll_nats']:.3f} nats; perplexity ≤ "
        f"{b['ppl_bound']:.1f}) |",
        f"| unigram entropy fitted on the train split | {u['bits_per_token']:.3f} bits/token |",
        f"| bound relative to unigram | {r['bound_vs_unigram']:+.1%} |",
        *([f"| bound / unigram in bits per byte of text | {b['bits_per_byte']:.3f} / "
           f"{u['bits_per_byte']:.3f} |"] if "bits_per_byte" in b else []),
        f"| 2-digit addition exact match (n={a['n']}, greedy, 8 steps) | {a['accuracy']:.1%}"
        f"{' ± %.1f' % (100 * a['se']) if 'se' in a else ''} |",
        *[f"| `{k}` {v['metric']} (n={v['n']}, held out"
          f"{', mc_num=%d' % v['mc_num'] if 'mc_num' in v else ''}) | {v['value']:.1%} ± "
          f"{100 * v['se']:.1f} |" for k, v in r.get("synthetic", {}).items()],
        "",
        "± is one standard error.",
        "",
        "## Reproduce",
        "`make retrain-tiny` retrains both tiny models from scratch side by side and rewrites",
        "`assets/`; for this model alone:",
        "```bash",
        "qdlm train --config configs/train_tiny_llada.py --tokenizer-only --config.out_dir=runs",
        f"qdlm train --config configs/train_tiny_{family}.py "
        "--config.data.tokenizer=runs/tokenizer.json",
        f"python converters/export_tiny.py runs/train_tiny_{family} assets/tiny-{family}",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--n-windows", type=int, default=32)
    p.add_argument("--mc-num", type=int, default=32)
    p.add_argument("--n-arith", type=int, default=400)
    p.add_argument("--note", default="", help="markdown line added to 'Data and training'")
    args = p.parse_args(argv)
    hf = args.run_dir / "hf"
    summary = json.loads((args.run_dir / "summary.json").read_text())
    if summary["family"] == GEMMA_FAMILY:
        return _ship_gemma(args, hf, summary)
    r = evaluate(hf, args.run_dir, n_windows=args.n_windows, mc_num=args.mc_num,
                 n_arith=args.n_arith)
    family = r["train"]["family"]
    print(json.dumps({k: v for k, v in r.items() if k != "train"}, indent=2))
    with atomic_dir(args.dest, overwrite=True) as tmp:
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            shutil.copy2(hf / f, tmp / f)
        shutil.copy2(args.run_dir / "loss.png", tmp / "loss.png")
        (tmp / "README.md").write_text(card(family, r, args.note))
        (tmp / "eval.json").write_text(json.dumps({k: v for k, v in r.items()
                                                   if k != "train"}, indent=2))
    print(f"wrote {args.dest}")
    return 0


def _ship_gemma(args, hf: Path, summary: dict) -> int:
    model = load_model(hf, dtype="float32")
    r = gemma_card.evaluate(model, load_tokenizer(hf), args.run_dir, summary,
                            n_windows=args.n_windows, mc_num=args.mc_num)
    print(json.dumps({k: v for k, v in r.items() if k != "train"}, indent=2))
    with atomic_dir(args.dest, overwrite=True) as tmp:
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            shutil.copy2(hf / f, tmp / f)
        shutil.copy2(args.run_dir / "loss.png", tmp / "loss.png")
        gemma_card.plot_expert_load(r["expert_load"], tmp / "expert_load.png")
        (tmp / "README.md").write_text(gemma_card.card(r, args.note))
        (tmp / "eval.json").write_text(json.dumps({k: v for k, v in r.items()
                                                   if k != "train"}, indent=2))
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
