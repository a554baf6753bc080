"""The model card of a tiny DiffusionGemma-shaped model (`jobs/model_card.py` dispatches here).

Measured on held-out data with the family's own entropy-bound sampler (greedy draws):

- text: the continuation NLL of held-out windows (`evals.basic.continuation_ce`: the last
  canvas scored left to right, each position with the true tokens before it and noise after
  it) against the entropy of a unigram model fitted on the train windows, both in bits per
  token; and the fully noised (parallel) score of the sampler's first step beside it;
- the synthetic tasks of `evals.tasks` (2-digit addition and subtraction, 3-digit addition,
  synthetic code pass@1, 4-way comparisons by the denoising score), each with its standard
  error and the sampler's tokens per forward pass;
- the expert load: the share of the top-k choices each expert receives, per layer, in the
  encoder pass over held-out task prompts and the decoder's first pass over their noised
  answer canvases (`expert_load.png`, and the table of the card). A balanced layer gives
  every expert 1 / E.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.data import synthetic
from qdlm_jax.evals.backends import TextModel
from qdlm_jax.evals.basic import continuation_ce, heldout_windows, unigram_entropy
from qdlm_jax.evals.tasks import BUILTIN, run_task
from qdlm_jax.models.diffusion_gemma import init_cache
from qdlm_jax.models.dllm import count_params

# The card's tasks (held-out items) and its changes to the built-in settings.
TASKS = ("arithmetic", "arithmetic_subtract", "arithmetic_3digit", "synthetic_code",
         "synthetic_compare")
CARD_SETTINGS = {"arithmetic": {"limit": 400}, "synthetic_compare": {"mc_num": 32}}
LOAD_TASKS = ("add2", "sub2", "code2", "compare")  # rows the expert load is measured on


def task_scores(model, tokenizer, names=TASKS) -> dict:
    """{task: {metric, value, se, n, tokens_per_step, examples}} of the built-in tasks."""
    tm = TextModel(model, tokenizer)
    out = {}
    for name in names:
        spec = dataclasses.replace(BUILTIN[name], **CARD_SETTINGS.get(name, {}))
        tm.take_decode_stats()
        r = run_task(tm, spec, progress=False)
        r.update(tm.take_decode_stats())
        out[name] = {"metric": r["metric"], "value": r["value"], "se": r["se"], "n": r["n"],
                     **CARD_SETTINGS.get(name, {}),
                     **({"tokens_per_step": r["tokens_per_step"]}
                        if "tokens_per_step" in r else {}),
                     "examples": r.get("examples", [])[:3]}
        print(f"[card] {name}: {r['metric']} {r['value']:.3f} ± {r['se']:.3f} (n={r['n']})",
              flush=True)
    return out


@nnx.jit
def _route_counts(model, prompt, valid, canvas):
    """{pass: [layers, E] choice counts} of the encoder over `prompt` (valid tokens) and the
    decoder's first pass over `canvas`."""
    c = model.config
    b, p = prompt.shape
    enc, dec = {}, {}
    cache = model.encode(prompt, None, init_cache(c, b, p + canvas.shape[1]), valid,
                         routes=enc)
    model.decode(canvas, None, cache, routes=dec)

    def counts(routes, weight):
        return jnp.stack([(jax.nn.one_hot(routes[i][0], c.num_experts).sum(2)
                           * weight[..., None]).sum((0, 1)) for i in sorted(routes)])
    return {"encoder": counts(enc, valid.astype(jnp.float32)),
            "decoder": counts(dec, jnp.ones(canvas.shape, jnp.float32))}


def expert_load(model, tokenizer, *, n_per_task: int = 64, noise: float = 0.5,
                seed: int = 0) -> dict:
    """{"encoder" | "decoder": [layers][E] shares of the choices} on held-out rows of
    `LOAD_TASKS`, the canvases noised at `noise` (each answer position replaced by a uniform
    id with that probability)."""
    c = model.config
    special = tokenizer.special
    rows = [synthetic.canvas_rows(
        synthetic.task_pairs(t, n_per_task, seed=seed, split="heldout"), tokenizer,
        prompt_len=32, canvas_length=c.canvas_length, bos_id=special.bos,
        eos_id=special.eos, pad_id=special.pad) for t in LOAD_TASKS]
    prompt = np.concatenate([r.prompt for r in rows])
    valid = np.concatenate([r.prompt_valid for r in rows])
    canvas = np.concatenate([r.canvas for r in rows])
    rng = np.random.default_rng(seed)
    noised = rng.random(canvas.shape) < noise
    canvas = np.where(noised, rng.integers(0, c.vocab_size, canvas.shape), canvas)
    counts = _route_counts(model, jnp.asarray(prompt), jnp.asarray(valid),
                           jnp.asarray(canvas, jnp.int32))
    return {k: (np.asarray(v) / np.asarray(v).sum(-1, keepdims=True)).tolist()
            for k, v in counts.items()}


def plot_expert_load(load: dict, path: Path) -> None:
    """One panel per pass: each layer's share of the choices per expert, and 1/E."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(load), figsize=(5 * len(load), 3.4), dpi=120, sharey=True)
    for ax, (name, shares) in zip(np.atleast_1d(axes), load.items()):
        shares = np.asarray(shares)
        layers, experts = shares.shape
        width = 0.8 / layers
        for i in range(layers):
            ax.bar(np.arange(experts) + (i - (layers - 1) / 2) * width, shares[i], width,
                   label=f"layer {i}")
        ax.axhline(1 / experts, color="k", ls="--", lw=1, label="balanced (1/E)")
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_title(f"{name} pass")
        ax.grid(alpha=0.3, axis="y")
    np.atleast_1d(axes)[0].set_ylabel("share of top-k choices")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def evaluate(model, tokenizer, train_dir: Path, summary: dict, *, n_windows: int,
             mc_num: int) -> dict:
    c = summary["config"]
    seq_len = c["data"]["text_prompt_len"] + model.config.canvas_length
    t0 = time.time()
    uni = unigram_entropy(np.load(train_dir / f"wiki_train_{seq_len}.npy"),
                          model.config.vocab_size)
    windows = heldout_windows(tokenizer, source=c["data"]["source"], seq_len=seq_len,
                              n_windows=n_windows)
    text = continuation_ce(model, windows, samples=mc_num)
    parallel = continuation_ce(model, windows, samples=mc_num, order="parallel")
    return {"params": count_params(model), "unigram_entropy": uni, "text": text,
            "text_parallel": parallel,
            "text_vs_unigram_bits": text["bits_per_token"] - uni["bits_per_token"],
            "tasks": task_scores(model, tokenizer), "expert_load": expert_load(model, tokenizer),
            "eval_time_s": time.time() - t0, "train": summary}


def _phase_table(s: dict) -> list[str]:
    lines = ["| steps | rows per step (text + task) | task prompt + canvas | task mix (weights) "
             "| training time | final text / task CE (nats) |", "|---|---|---|---|---|---|"]
    for p in s["phases"]:
        mix = ", ".join(f"{k} {v:g}" for k, v in p["mix"].items())
        tl = "–" if p["final_text_loss"] is None else f"{p['final_text_loss']:.3f}"
        sl = "–" if p["final_sft_loss"] is None else f"{p['final_sft_loss']:.3f}"
        time_s = "earlier run" if p.get("before_start") else f"{p['train_time_s'] / 60:.1f} min"
        lines.append(f"| {p['steps'][0]}–{p['steps'][1]} | {p['text_rows']} + {p['task_rows']} "
                     f"| {p['task_seq_len']} | {mix} | {time_s} | {tl} / {sl} |")
    return lines


# The asset's targets on held-out items: (task, lowest accepted score, what it is).
TARGETS = (("arithmetic", 0.90, "2-digit addition"),
           ("synthetic_code", 0.50, "synthetic code pass@1"),
           ("synthetic_compare", 0.80, "4-way comparisons"))


def targets(r: dict) -> list[str]:
    """The card's targets table: each task target and the text one (at least two standard
    errors below the unigram entropy), measured value, met or not."""
    lines = ["## Targets", "| target | measured | met |", "|---|---|---|"]
    for task, floor, what in TARGETS:
        v = r["tasks"][task]
        lines.append(f"| {what} >= {floor:.0%} | {v['value']:.1%} ± {100 * v['se']:.1f} | "
                     f"{'yes' if v['value'] >= floor else 'no'} |")
    x, u = r["text"], r["unigram_entropy"]
    diff, se = x["bits_per_token"] - u["bits_per_token"], x["bits_per_token_se"]
    lines.append(f"| held-out text clearly better than a unigram model (by more than two "
                 f"standard errors) | {diff:+.3f} bits/token, {diff / se:+.1f} standard errors "
                 f"| {'yes' if diff < -2 * se else 'no'} |")
    return lines


def card(r: dict, note: str = "") -> str:
    s = r["train"]
    c = s["config"]
    m, t = c["model"], c["train"]
    u, x, xp = r["unigram_entropy"], r["text"], r.get("text_parallel")
    load = r["expert_load"]
    n_exp = m["num_experts"]
    kinds = ", ".join(f"{m['layer_types'].count(k)} {k.split('_')[0]}"
                      for k in ("sliding_attention", "full_attention"))
    lines = [
        f"# tiny-diffusiongemma: a {r['params'] / 1e6:.1f}M-parameter MoE block-diffusion LM",
        "",
        "Trained by qdlm-jax as the offline DiffusionGemma-shaped model, stored in the hub",
        "layout that transformers' `DiffusionGemmaForBlockDiffusion.from_pretrained` loads "
        "(`model_type: diffusion_gemma`).",
        "",
        "## Model",
        f"- {m['num_layers']} layers ({kinds}; sliding window {m['sliding_window']} tokens, "
        "shorter than the task prompts), width "
        f"{m['hidden_size']}, {m['num_heads']} query heads; sliding layers {m['num_kv_heads']} "
        f"kv heads × {m['head_dim']}, full layers {m['num_global_kv_heads']} kv head × "
        f"{m['global_head_dim']} with K = V and partial RoPE.",
        f"- Each layer: the dense GeGLU MLP ({m['intermediate_size']}) in parallel with "
        f"{n_exp} routed experts (top-{m['top_k']}, GeGLU {m['moe_intermediate_size']} each); "
        "self-conditioning MLP on the decoder's input; one weight stack run as the causal "
        f"encoder over the prompt and the bidirectional decoder over a {m['canvas_length']}-"
        "token canvas.",
        f"- Vocabulary {r['train']['config']['data']['vocab_size']} (the project's byte-level "
        "BPE, `tokenizer.json`); weights stored in bf16.",
        "",
        "## Data and training",
        f"- Text: `{c['data']['source']}` windows of {c['data']['text_prompt_len']} + "
        f"{m['canvas_length']} tokens (prefix through the encoder, continuation on the "
        "canvas); tasks: project-generated rows (`data.synthetic` train split; held-out items "
        "are never trained on: a salted hash of each item decides its split), `[BOS] prompt` "
        "left-padded through the encoder and `answer EOS PAD..` on the canvas.",
        *_phase_table(s),
        "",
        "- Objective: uniform-state diffusion (noise level t ~ U(ε, 1) per row, canvas "
        "positions replaced by uniform vocabulary ids with probability t, cross-entropy of the "
        f"clean canvas on every position); with probability {t['sc_prob']:g} a step feeds a "
        "first pass's detached logits / T(t) back as the self-conditioning input; plus "
        f"{t['aux_weight']:g} × the Switch load-balancing loss E Σ_e f_e P_e per layer and "
        "pass (encoder and decoder).",
        f"- {s['steps']} AdamW steps, {s['tokens'] / 1e6:.2f}M tokens; peak lr {t['lr']}, "
        f"warmup {t['warmup_steps']}, cosine decay to {t['final_lr_frac']:g}× peak; final "
        f"training loss {s['final_loss']:.3f} nats; {s['train_time_s_total'] / 3600:.2f} h on a "
        "2-core CPU (sum of logged intervals; pauses over 10 min left out).",
        *([f"- {note}"] if note else []),
        "",
        "![loss curve](loss.png)",
        "",
        "## Evaluation (held-out data, the entropy-bound sampler, greedy draws)",
        "| measure | value | tokens per forward pass |",
        "|---|---|---|",
        f"| text: left-to-right NLL of the last {m['canvas_length']} of {x['seq_len']} tokens "
        f"({x['n_windows']} windows, {x['mc_num']} noise draws per position) | "
        f"{x['bits_per_token']:.3f} ± {x['bits_per_token_se']:.3f} bits/token | – |",
        f"| unigram entropy fitted on the train windows | {u['bits_per_token']:.3f} bits/token "
        "| – |",
        f"| text against unigram | {r['text_vs_unigram_bits']:+.3f} bits/token "
        f"({x['bits_per_token'] / u['bits_per_token'] - 1:+.1%}) | – |",
        *([f"| text, the same tokens fully noised (the sampler's first step; each position "
           f"from the prompt alone) | {xp['bits_per_token']:.3f} ± "
           f"{xp['bits_per_token_se']:.3f} bits/token | – |"] if xp else []),
        *[f"| `{k}` {v['metric']} (n={v['n']}"
          f"{', mc_num=%d' % v['mc_num'] if 'mc_num' in v else ''}) | {v['value']:.1%} ± "
          f"{100 * v['se']:.1f} | "
          f"{'%.2f' % v['tokens_per_step'] if 'tokens_per_step' in v else '–'} |"
          for k, v in r["tasks"].items()],
        "",
        "± is one standard error. Left to right, position i is predicted with the true tokens "
        "before it on the canvas and uniform noise after it (`gemma_likelihood."
        "left_to_right_nll`): the likelihood of decoding the text one token per step, a proper "
        "sequence likelihood like the unigram model's. `arithmetic` is 2-digit addition; the "
        "comparisons rank the 4 options by the denoising score "
        "(`gemma_likelihood.answer_score`).",
        "",
        *targets(r),
        "",
        "## Expert load",
        f"Share of the top-{m['top_k']} choices per expert (balanced: {1 / n_exp:.3f}), on "
        "held-out task rows: the encoder over the prompts, the decoder's first pass over the "
        "answer canvases with half of the positions noised.",
        "",
        "![expert load](expert_load.png)",
        "",
        "| pass | layer | " + " | ".join(f"e{e}" for e in range(n_exp)) + " | max / balanced |",
        "|---|---|" + "---|" * (n_exp + 1),
        *[f"| {name} | {i} | " + " | ".join(f"{v:.3f}" for v in row)
          + f" | {max(row) * n_exp:.2f} |"
          for name, shares in load.items() for i, row in enumerate(shares)],
        "",
        "## Reproduce",
        "```bash",
        "qdlm train --config configs/train_tiny_diffusiongemma.py",
        "python converters/export_tiny.py runs/train_tiny_diffusiongemma "
        "assets/tiny-diffusiongemma",
        "```",
        "`make retrain-tiny` retrains every tiny model; a killed training run resumes from its "
        "newest checkpoint when the same command runs again.",
        "",
    ]
    return "\n".join(lines)
