"""The tiny-model training job behind `qdlm train --config configs/train_tiny_*.py`.

1. tokenizer: reuse `data.tokenizer` or train a byte-level BPE on the train split (plus
   `tokenizer_task_lines` train-split lines of each synthetic task, so their prompts get
   merged tokens);
2. token rows, drawn deterministically from (seed, step) so a resumed run sees the same
   stream. With `data.phases` (the data mix, a curriculum): each phase runs until its
   `until` step with `text_rows` Wikipedia train-split windows per step (pre-training
   objective) and `task_rows` rows of synthetic tasks (`data.synthetic`, train split;
   LLaDA's SFT objective), the task of each row drawn with the phase's `mix` weights;
   a phase may set its own `task_seq_len` (short arithmetic rows need less padding) and
   `shift` (true: both objectives predict token i from output i-1 in that phase, false:
   they do not; absent: the family's own, LLaDA unshifted and Dream shifted) and
   `text_shift` (the same for the text rows alone: shifted text beside unshifted tasks);
   Without `phases`: Wikipedia windows plus rows of packed arithmetic problems
   (`arith_frac` of each batch, the older recipe);
   For `family = "diffusion_gemma"` the rows are `CanvasBatch`es instead (uniform-state
   objective, `training/uniform_objective.py`): task rows put ``[BOS] prompt`` (left-padded
   to the phase's `task_prompt_len`) through the causal encoder and ``answer EOS PAD..`` on
   the canvas; text rows are windows of `text_prompt_len` + canvas_length tokens, the
   prefix as the prompt and the rest on the canvas;
3. train (`train.py`), exporting the newest checkpoint in the family's hub layout
   (`out_dir/hf`: config.json + bf16 model.safetensors + tokenizer.json) at every checkpoint;
4. loss curve PNG and `summary.json` (wall time, tokens, final loss).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from qdlm_jax.checkpoints.hf import load_hf_params, save_hf
from qdlm_jax.checkpoints.load import build_model
from qdlm_jax.data import arithmetic, sources, synthetic
from qdlm_jax.data import tokenizer as tok_lib
from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import DLLM, init_model
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig
from qdlm_jax.models.params import get_params
from qdlm_jax.training.trainer import (
    CanvasBatch,
    MixedBatch,
    TrainSpec,
    plot_loss,
    train,
    write_json,
)


def model_config(cfg: ml_collections.ConfigDict, special: tok_lib.SpecialTokenIds,
                 vocab_size: int) -> ModelConfig:
    m = cfg.model
    return ModelConfig(
        family=cfg.family, vocab_size=vocab_size, hidden_size=m.hidden_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, rope_theta=float(m.rope_theta),
        rms_norm_eps=float(m.rms_norm_eps), qkv_bias=cfg.family == "dream",
        rope_full_precision=cfg.family == "llada", mask_token_id=special.mask,
        pad_token_id=special.pad, eos_token_id=special.eos, bos_token_id=special.bos,
        max_position_embeddings=m.max_position_embeddings)


def gemma_model_config(cfg: ml_collections.ConfigDict, special: tok_lib.SpecialTokenIds,
                       vocab_size: int) -> DiffusionGemmaConfig:
    """The DiffusionGemma config of `cfg.model` (its fields by name) with the tokenizer's
    vocabulary and PAD / EOS / BOS ids."""
    m = cfg.model.to_dict()
    m["layer_types"] = tuple(m["layer_types"])
    return DiffusionGemmaConfig(vocab_size=vocab_size, pad_token_id=special.pad,
                                eos_token_ids=(special.eos,), bos_token_id=special.bos, **m)


def prepare_tokenizer(cfg, out_dir: Path):
    d = cfg.data
    path = Path(d.tokenizer) if d.tokenizer else out_dir / tok_lib.TOKENIZER_FILENAME
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        n_lines = int(d.get("tokenizer_task_lines", 0))
        print(f"[train] training a {d.vocab_size}-token BPE on the train split of {d.source}"
              + (f" + {n_lines} train lines of each synthetic task" if n_lines else ""))
        texts = list(sources.load_split(d.source, "train", seed=d.seed))
        for task in synthetic.TASKS if n_lines else ():
            texts += [p + a for p, a in synthetic.task_pairs(task, n_lines, seed=d.seed + 7)]
        tok = tok_lib.train_tokenizer(texts, tok_lib.TokenizerSpec(vocab_size=d.vocab_size))
        tok_lib.save_tokenizer(tok, path)
    return path, tok_lib.load_bpe_tokenizer(path)


def arithmetic_rows(tokenizer, special, d, n_rows: int, seed: int):
    """Rows of packed problems, [BOS] Question: a+b=? Answer: [c EOS EOS ...] [BOS] ...,
    with the mask that lets the noise touch the answer fields only (`arithmetic.sft_rows`)."""
    spec = arithmetic.ArithmeticSpec(digits=tuple(d.arith_digits),
                                     ops=tuple(d.get("arith_ops", arithmetic.OPS)))
    problems = arithmetic.generate_problems(d.arith_problems, seed=seed, split="train",
                                            spec=spec)
    return arithmetic.sft_rows(problems, tokenizer, seq_len=d.seq_len,
                               answer_len=d.arith_answer_len, bos_id=special.bos,
                               eos_id=special.eos, max_rows=n_rows)


def answer_len(task: str) -> int:
    """Answer field of a task's SFT rows: the generation length its evaluation uses
    (`evals.tasks`: arithmetic 8, synthetic code 12, 16 for 3 ops; comparisons, scored by
    likelihood, 4: a 2-digit answer and EOS)."""
    if task.startswith("code"):
        return 16 if task == "code3" else 12
    return 4 if task == "compare" else 8


def phase_at(phases, step: int) -> tuple[int, dict]:
    """(index, phase) of the phase that `step` falls in (the first whose `until` > step)."""
    for i, ph in enumerate(phases):
        if step < int(ph["until"]):
            return i, ph
    raise ValueError(f"step {step} is past the last phase (until={phases[-1]['until']})")


def check_phases(phases, steps: int) -> None:
    ends = [int(ph["until"]) for ph in phases]
    if ends != sorted(set(ends)) or ends[-1] < steps:
        raise ValueError(f"data.phases: `until` must increase and reach train.steps={steps} "
                         f"(phases after it are not run); got {ends}")
    for ph in phases:
        unknown = set(ph["mix"]) - set(synthetic.TASKS)
        if unknown or (ph["task_rows"] and not ph["mix"]):
            raise ValueError(f"data.phases: mix {dict(ph['mix'])}: tasks must be among "
                             f"{synthetic.TASKS}")
        if ph["text_rows"] + ph["task_rows"] <= 0:
            raise ValueError("data.phases: a phase needs text_rows + task_rows > 0")
        for key in ("shift", "text_shift"):
            if not (ph.get(key, None) is None or isinstance(ph[key], bool)):
                raise ValueError(f"data.phases: {key}={ph[key]!r} (until {ph['until']}): "
                                 "expected true, false or absent (the family's objective)")


def mixed_batches(phases, wiki: np.ndarray, tokenizer, special, *, task_seq_len: int,
                  seed: int):
    """`batches(step) -> MixedBatch` of the phased data mix (module docstring)."""
    def batches(step: int) -> MixedBatch:
        _, ph = phase_at(phases, step)
        rng = np.random.default_rng([seed, step])
        text = wiki[rng.integers(0, len(wiki), ph["text_rows"])] if ph["text_rows"] else None
        objective = dict(shift=ph.get("shift", None), text_shift=ph.get("text_shift", None))
        if not ph["task_rows"]:
            return MixedBatch(text, **objective)
        names = sorted(ph["mix"])
        w = np.asarray([float(ph["mix"][k]) for k in names])
        counts = rng.multinomial(ph["task_rows"], w / w.sum())
        parts = []
        for i, (task, k) in enumerate(zip(names, counts)):
            if k:
                pairs = synthetic.task_pairs(task, int(k), seed=int(
                    rng.integers(0, 2**31)), split="train")
                parts.append(synthetic.sft_rows(
                    pairs, tokenizer, seq_len=int(ph.get("task_seq_len", task_seq_len)),
                    answer_len=answer_len(task),
                    bos_id=special.bos, eos_id=special.eos, pad_id=special.pad))
        return MixedBatch(text, np.concatenate([r.tokens for r in parts]),
                          np.concatenate([r.answer for r in parts]),
                          np.concatenate([r.valid for r in parts]), **objective)
    return batches


def canvas_batches(phases, text: np.ndarray, tokenizer, special, *, canvas_length: int,
                   text_prompt_len: int, task_prompt_len: int, seed: int):
    """`batches(step) -> CanvasBatch` of the phased data mix for a block-diffusion model:
    `text` windows [n, text_prompt_len + canvas_length] split into prompt and canvas, task
    rows from `synthetic.canvas_rows` (a phase may set `task_prompt_len`)."""
    def batches(step: int) -> CanvasBatch:
        _, ph = phase_at(phases, step)
        rng = np.random.default_rng([seed, step])
        text_rows = None
        if ph["text_rows"]:
            w = text[rng.integers(0, len(text), ph["text_rows"])]
            text_rows = synthetic.CanvasRows(
                w[:, :text_prompt_len], np.ones((len(w), text_prompt_len), bool),
                w[:, text_prompt_len:], np.ones((len(w), canvas_length), bool))
        if not ph["task_rows"]:
            return CanvasBatch(text_rows)
        names = sorted(ph["mix"])
        weights = np.asarray([float(ph["mix"][k]) for k in names])
        counts = rng.multinomial(ph["task_rows"], weights / weights.sum())
        parts = []
        for task, k in zip(names, counts):
            if k:
                pairs = synthetic.task_pairs(task, int(k), seed=int(rng.integers(0, 2**31)),
                                             split="train")
                parts.append(synthetic.canvas_rows(
                    pairs, tokenizer, prompt_len=int(ph.get("task_prompt_len", task_prompt_len)),
                    canvas_length=canvas_length, bos_id=special.bos, eos_id=special.eos,
                    pad_id=special.pad))
        return CanvasBatch(text_rows, synthetic.CanvasRows(
            *(np.concatenate([getattr(r, f) for r in parts])
              for f in ("prompt", "prompt_valid", "canvas", "answer"))))
    return batches


def packed_arithmetic_batches(cfg, spec: TrainSpec, wiki, tokenizer, special):
    """The older recipe: `arith_frac` of each batch are packed arithmetic rows."""
    d = cfg.data
    n_arith = int(round(spec.batch_size * d.arith_frac))
    n_wiki = spec.batch_size - n_arith
    arith, arith_maskable = arithmetic_rows(tokenizer, special, d, max(n_arith * spec.steps, 1),
                                            d.seed)
    print(f"[train] {cfg.family}: {wiki.shape[0]} wiki rows, {arith.shape[0]} arithmetic "
          f"rows of {d.seq_len} tokens; per step {n_wiki} wiki + {n_arith} arithmetic")

    def batches(step: int) -> np.ndarray:
        rng = np.random.default_rng([d.seed, step])
        rows = [wiki[rng.integers(0, len(wiki), n_wiki)]]
        maskable = [np.ones_like(rows[0], bool)]
        if n_arith:
            pick = rng.integers(0, len(arith), n_arith)
            rows.append(arith[pick])
            maskable.append(arith_maskable[pick])
        return np.concatenate(rows), np.concatenate(maskable)
    return batches


MAX_GAP_S = 600.0


def training_time(records: list[dict], max_gap_s: float = MAX_GAP_S) -> float:
    """Seconds spent training: the sum of the gaps between consecutive log records, leaving
    out gaps longer than `max_gap_s` (a kill and a later resume, or a paused process)."""
    times = [r["time"] for r in records]
    return float(sum(d for d in (b - a for a, b in zip(times, times[1:])) if d <= max_gap_s))


def initial_model(cfg: ml_collections.ConfigDict, config: ModelConfig,
                  spec: TrainSpec) -> tuple[DLLM, int]:
    """The model training starts from: random (`init.from_dir` empty) at step 0, or the weights
    of a saved model directory (as `hf/` or `assets/tiny-*` hold) at step `init.step`, with a
    fresh optimizer state. A checkpoint already in `out_dir` takes precedence (resume)."""
    init = cfg.get("init", None)
    from_dir = str(init.get("from_dir", "")) if init is not None else ""
    if not from_dir:
        if config.family == GEMMA_FAMILY:
            return diffusion_gemma.init_model(config, seed=spec.seed), 0
        return init_model(config, seed=spec.seed), 0
    step = int(init.get("step", 0))
    saved_config, params = load_hf_params(from_dir, dtype=config.param_dtype)
    if config.family == GEMMA_FAMILY and saved_config.family == GEMMA_FAMILY:
        fields = tuple(f.name for f in dataclasses.fields(config)
                       if f.name not in ("dtype", "param_dtype", "expert_compute"))
    else:
        fields = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads",
                  "num_kv_heads", "intermediate_size", "qkv_bias", "mask_token_id")
    differ = [f"{f}: {getattr(saved_config, f)!r} there, {getattr(config, f)!r} in the config"
              for f in fields if getattr(saved_config, f) != getattr(config, f)]
    if differ:
        raise ValueError(f"init.from_dir={from_dir}: the saved model does not match the "
                         "training config: " + "; ".join(differ))
    if not 0 < step < spec.steps:
        raise ValueError(f"init.step={step}: expected the step the saved model was trained "
                         f"to, in (0, train.steps={spec.steps})")
    print(f"[train] initial weights: {from_dir} at step {step}, fresh optimizer state "
          "(a checkpoint in out_dir, if any, takes precedence)")
    return build_model(config, params), step


def run(cfg: ml_collections.ConfigDict) -> Path:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    t0 = time.time()
    tok_path, tokenizer = prepare_tokenizer(cfg, out_dir)
    special = tok_lib.special_token_ids(tokenizer, source=str(tok_path))
    gemma = cfg.family == GEMMA_FAMILY
    config = (gemma_model_config if gemma else model_config)(cfg, special,
                                                              tokenizer.get_vocab_size())
    seq_len = (d.text_prompt_len + config.canvas_length) if gemma else d.seq_len
    spec = TrainSpec(seq_len=seq_len, **cfg.train.to_dict())

    cache = out_dir / f"wiki_train_{seq_len}.npy"
    if cache.is_file():
        wiki = np.load(cache)
    else:
        docs = sources.load_split(d.source, "train", seed=d.seed)
        wiki = sources.token_windows(docs, tokenizer, seq_len, bos_id=special.bos,
                                     eos_id=special.eos)
        np.save(cache, wiki)
    phases = [dict(ph) for ph in d.get("phases", None) or ()]
    if phases:
        check_phases(phases, spec.steps)
        if gemma:
            batches = canvas_batches(phases, wiki, tokenizer, special,
                                     canvas_length=config.canvas_length,
                                     text_prompt_len=d.text_prompt_len,
                                     task_prompt_len=d.task_prompt_len, seed=d.seed)
        else:
            batches = mixed_batches(phases, wiki, tokenizer, special,
                                    task_seq_len=d.task_seq_len, seed=d.seed)
        print(f"[train] {config.family}: {wiki.shape[0]} wiki rows; phases " + "; ".join(
            f"until {ph['until']}: {ph['text_rows']} text + {ph['task_rows']} task rows "
            f"{dict(ph['mix'])}" for ph in phases))
    elif gemma:
        raise ValueError(f"family={cfg.family!r}: the packed-arithmetic recipe is for the "
                         "masked families; set data.phases")
    else:
        batches = packed_arithmetic_batches(cfg, spec, wiki, tokenizer, special)

    hf_dir = out_dir / "hf"

    def export(step: int, model):
        bf16 = config.replace(param_dtype="bfloat16", dtype="bfloat16")
        if gemma:
            bf16 = bf16.replace(expert_compute="grouped")
        params = {p: v.astype("bfloat16") for p, v in get_params(model).items()}
        save_hf(bf16, params, hf_dir, extra_files=[tok_path], overwrite=True)

    model, start_step = initial_model(cfg, config, spec)
    _, records = train(model, spec, batches, out_dir, on_checkpoint=export,
                       start_step=start_step)
    plot_loss(records, out_dir / "loss.png",
              f"tiny {config.family}: " + ("uniform-state" if gemma else "masked-diffusion")
              + " training loss")
    if phases:
        per_phase, start = [], 0
        for ph in phases:
            if start >= spec.steps:
                break
            end = min(int(ph["until"]), spec.steps)
            recs = [r for r in records if start < r["step"] <= end]
            per_phase.append({
                "steps": [start, end], "before_start": end <= start_step,
                "text_rows": ph["text_rows"],
                "task_rows": ph["task_rows"], "mix": dict(ph["mix"]),
                "task_seq_len": (int(ph.get("task_prompt_len", d.get("task_prompt_len", 0)))
                                 + config.canvas_length if gemma
                                 else int(ph.get("task_seq_len", d.task_seq_len))),
                "text_tokens": (end - start) * ph["text_rows"] * seq_len,
                "task_rows_seen": (end - start) * ph["task_rows"],
                "train_time_s": training_time(recs),
                "final_loss": recs[-1]["loss"] if recs else None,
                "final_text_loss": recs[-1].get("text_loss") if recs else None,
                "final_sft_loss": recs[-1].get("sft_loss" if not gemma else "task_loss")
                if recs else None})
            start = end
        tokens = sum(p["text_tokens"] + p["task_rows_seen"] * p["task_seq_len"] for p in per_phase)
    else:
        per_phase, tokens = None, spec.steps * spec.batch_size * spec.seq_len
    summary = {"family": config.family, "steps": spec.steps, "tokens": tokens,
               "start": ({"from_dir": str(cfg.init.from_dir), "step": start_step}
                         if start_step else None),
               "phases": per_phase,
               "final_loss": records[-1]["loss"] if records else None,
               "wall_time_s_this_run": time.time() - t0,
               "train_time_s_total": training_time(records),
               "config": json.loads(cfg.to_json())}
    write_json(out_dir / "summary.json", summary)
    print(f"[train] done: {hf_dir} (loss curve {out_dir / 'loss.png'})")
    return hf_dir
