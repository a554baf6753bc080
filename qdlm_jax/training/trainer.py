"""Training driver: AdamW with warmup + cosine decay, jitted step, resumable orbax checkpoints.

The losses are in `objective.py` (masked diffusion: LLaDA, Dream) and `uniform_objective.py`
(uniform-state block diffusion: DiffusionGemma); the batch type picks the step.

The train state is a plain pytree (params, optimizer state,
step, PRNG key) saved every `ckpt_every` steps by an orbax CheckpointManager; restarting the
same command after a kill resumes from the newest checkpoint, with the data stream advanced
to the same step (the stream is a pure function of the step).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from qdlm_jax.checkpoints.load import build_model
from qdlm_jax.data.synthetic import CanvasRows
from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import DLLM
from qdlm_jax.models.params import flatten
from qdlm_jax.training.objective import diffusion_loss, mask_tokens, sft_loss
from qdlm_jax.training.uniform_objective import gemma_task_loss


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """One step's rows of both kinds: text rows under the pre-training objective, task rows
    (prompt never masked, answer field, right padding) under LLaDA's SFT objective. The two
    losses are weighted by their share of the rows. `text` may be None (a task-only step);
    `task_*` may be None (a text-only step)."""

    text: np.ndarray | None  # int32 [Bt, seq_len]
    task_tokens: np.ndarray | None = None  # int32 [Bs, Ls]
    task_answer: np.ndarray | None = None  # bool [Bs, Ls]: the answer field (maskable)
    task_valid: np.ndarray | None = None  # bool [Bs, Ls]: attention mask (False on padding)
    # Both objectives predict token i from output i-1 in this step (True) or not (False);
    # None: `TrainSpec.shift`, else the family's own. A phase of the mix may set it.
    shift: bool | None = None
    # The text rows' objective alone (overrides `shift` for them; the task rows keep
    # `shift`); None: as `shift`. A phase may train text shifted beside unshifted tasks.
    text_shift: bool | None = None

    def arrays(self):
        text = None if self.text is None else jnp.asarray(self.text, jnp.int32)
        task = None if self.task_tokens is None else (
            jnp.asarray(self.task_tokens, jnp.int32), jnp.asarray(self.task_answer, jnp.bool_),
            jnp.asarray(self.task_valid, jnp.bool_))
        if text is None and task is None:
            raise ValueError("MixedBatch: no rows")
        return text, task


@dataclasses.dataclass(frozen=True)
class CanvasBatch:
    """One step's rows for a block-diffusion model (DiffusionGemma), in two groups with their
    own prompt lengths: `text` (a window's prefix as the prompt, its continuation on the
    canvas) and `task` (prompt and answer); either may be None. Each group's loss
    (`uniform_objective.gemma_task_loss`) is weighted by its share of the rows."""

    text: CanvasRows | None
    task: CanvasRows | None = None

    def arrays(self):
        groups = tuple(None if g is None else (
            jnp.asarray(g.prompt, jnp.int32), jnp.asarray(g.prompt_valid, jnp.bool_),
            jnp.asarray(g.canvas, jnp.int32), jnp.asarray(g.answer, jnp.bool_))
            for g in (self.text, self.task))
        if groups == (None, None):
            raise ValueError("CanvasBatch: no rows")
        return groups


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    steps: int  # optimizer steps
    batch_size: int  # sequences per step
    seq_len: int  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 200
    final_lr_frac: float = 0.1  # cosine decays to lr * final_lr_frac
    weight_decay: float = 0.1
    b2: float = 0.98
    grad_clip: float = 1.0
    eps: float = 1e-3  # p_mask floor of the diffusion objective
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    # Predict token i from output i-1 (Dream's right shift); None = the family's own choice.
    # Only the LLaDA-Dream gap experiment (experiments/gap_experiment.py) overrides it.
    shift: bool | None = None
    # Length of the warmup + cosine schedule; None = `steps`. A run that stops early on a
    # longer schedule (the first part of a two-objective run) sets it.
    schedule_steps: int | None = None
    # DiffusionGemma's objective: the probability of a self-conditioned step, and the weight
    # of the experts' load-balancing loss (`uniform_objective`).
    sc_prob: float = 0.5
    aux_weight: float = 0.01

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "ckpt_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainSpec.{name}={getattr(self, name)}: expected > 0")
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            raise ValueError(f"TrainSpec.schedule_steps={self.schedule_steps}: expected >= "
                             f"steps={self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainSpec.warmup_steps={self.warmup_steps}: expected in "
                             f"[0, steps={self.steps})")


def learning_rate(spec: TrainSpec) -> optax.Schedule:
    """lr(k) = lr * k / W for k < W (warmup), then
    lr(k) = e + (lr - e) * (1 + cos(pi * (k - W) / (S - W))) / 2 with e = lr * final_lr_frac,
    W = warmup_steps and S = schedule_steps (default: steps); e after S."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.lr, warmup_steps=spec.warmup_steps,
        decay_steps=spec.schedule_steps or spec.steps, end_value=spec.lr * spec.final_lr_frac)


def make_optimizer(spec: TrainSpec) -> optax.GradientTransformation:
    schedule = learning_rate(spec)

    def decay_mask(params):  # no weight decay on norms and biases
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(spec.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=spec.b2,
                                   weight_decay=spec.weight_decay, mask=decay_mask))


def make_train_step(graphdef, config: ModelConfig, spec: TrainSpec, tx):
    shift = config.shift_logits if spec.shift is None else spec.shift

    def loss_fn(params, tokens, maskable, key):
        model = nnx.merge(graphdef, params)
        noisy, masked, p_mask = mask_tokens(key, tokens, config.mask_token_id, eps=spec.eps,
                                            keep_first=shift, loss_mask=maskable)
        return diffusion_loss(model(noisy), tokens, masked, p_mask, shift=shift)

    return optimizer_step(loss_fn, tx)


def optimizer_step(loss_fn, tx):
    """jit: (state, *batch) -> (state, metrics) for `loss_fn(params, *batch, key) ->
    (loss, metrics)`: one key split, gradients, an optax update, the gradient norm."""

    @jax.jit
    def step(state, *batch):
        key, sub = jax.random.split(state["key"])
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                         *batch, sub)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                "key": key}, metrics

    return step


def step_objective(family_shift: bool, shift: bool | None,
                   text_shift: bool | None) -> tuple[bool, bool]:
    """(text rows shifted, task rows shifted) of a mixed step: `shift` for both rows (None:
    the family's own, `family_shift`), `text_shift` for the text rows (None: as `shift`)."""
    task = family_shift if shift is None else shift
    return (task if text_shift is None else text_shift), task


def make_mixed_step(graphdef, config: ModelConfig, spec: TrainSpec, tx, *,
                    text_shift: bool | None = None):
    """The step of `MixedBatch` rows (see its docstring); `text_shift` (None: as the task
    rows) sets the text rows' objective apart."""
    text_shift, shift = step_objective(config.shift_logits, spec.shift, text_shift)

    def loss_fn(params, text, task, key):
        model = nnx.merge(graphdef, params)
        k_text, k_task = jax.random.split(key)
        n_text = 0 if text is None else text.shape[0]
        n_task = 0 if task is None else task[0].shape[0]
        loss, metrics = 0.0, {}
        if text is not None:
            noisy, masked, p_mask = mask_tokens(k_text, text, config.mask_token_id, eps=spec.eps,
                                                keep_first=text_shift)
            l_text, m = diffusion_loss(model(noisy), text, masked, p_mask, shift=text_shift)
            loss += l_text * n_text / (n_text + n_task)
            metrics.update(m, text_loss=l_text)
        if task is not None:
            tokens, answer, valid = task
            noisy, masked, p_mask = mask_tokens(k_task, tokens, config.mask_token_id,
                                                eps=spec.eps, loss_mask=answer)
            l_task, m = sft_loss(model(noisy, valid), tokens, masked, p_mask, answer,
                                 shift=shift)
            loss += l_task * n_task / (n_text + n_task)
            metrics.update(m)
        metrics["loss"] = loss
        return loss, metrics

    return optimizer_step(loss_fn, tx)


def make_canvas_step(graphdef, config, spec: TrainSpec, tx):
    """The step of `CanvasBatch` rows: the uniform-state loss of each group, weighted by its
    share of the rows, plus the load-balancing term (`spec.aux_weight`)."""
    def loss_fn(params, text, task, key):
        model = nnx.merge(graphdef, params)
        keys = jax.random.split(key)
        sizes = [0 if g is None else g[0].shape[0] for g in (text, task)]
        loss, metrics = 0.0, {}
        for name, group, k, n in zip(("text", "task"), (text, task), keys, sizes):
            if group is None:
                continue
            l_g, m = gemma_task_loss(model, k, *group, sc_prob=spec.sc_prob, eps=spec.eps,
                                     aux_weight=spec.aux_weight)
            loss += l_g * n / sum(sizes)
            metrics.update({f"{name}_loss": m["ce_loss"], f"{name}_aux": m["aux_loss"],
                            f"{name}_expert_share_max": m["expert_share_max"]})
        metrics["loss"] = loss
        return loss, metrics

    return optimizer_step(loss_fn, tx)


def train(model: DLLM, spec: TrainSpec, batches: Callable[[int], np.ndarray], out_dir: Path,
          *, on_checkpoint: Callable[[int, DLLM], None] | None = None,
          start_step: int = 0) -> tuple[DLLM, list]:
    """Trains `model` for `spec.steps`; `batches(step)` returns int32 tokens [B, seq_len],
    or a pair (tokens, maskable) where maskable [B, seq_len] is 1 on the positions the noise
    may mask (0 keeps a position always visible, e.g. the prompt of an instruction row),
    or a `MixedBatch` (text rows + SFT task rows; its shapes may change between phases), or
    for a DiffusionGemma `model` a `CanvasBatch`.

    Checkpoints go to `out_dir/ckpt`; the log (one JSON line per logged step) to
    `out_dir/log.jsonl`. Returns the trained model and the log records.

    `start_step` > 0 continues a model trained elsewhere (e.g. a shipped asset) from that step
    of the schedule and the data stream, with a fresh optimizer state; it applies only when
    `out_dir` has no checkpoint (a checkpoint there always wins, so the command resumes).
    """
    if not 0 <= start_step < spec.steps:
        raise ValueError(f"start_step {start_step} must be in [0, train.steps={spec.steps})")
    out_dir = Path(out_dir).absolute()  # orbax needs absolute paths
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(spec)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(start_step),
             "key": jax.random.key_data(jax.random.key(spec.seed))}
    state["key"] = jax.random.wrap_key_data(state["key"])

    manager = ocp.CheckpointManager(
        out_dir / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    log_path = out_dir / "log.jsonl"
    records = []
    if manager.latest_step() is not None:
        restored = manager.restore(manager.latest_step(),
                                   args=ocp.args.StandardRestore(_to_saveable(state)))
        state = _from_saveable(restored)
        if log_path.is_file():
            records = [json.loads(line) for line in log_path.read_text().splitlines()
                       if json.loads(line)["step"] <= int(state["step"])]
        print(f"[train] resumed from {out_dir / 'ckpt'} at step {int(state['step'])}")

    step_fn = canvas_fn = None  # built at their first batch
    mixed_fns = {}  # one jitted step per objective pair (shift, text_shift) the batches ask for
    start = int(state["step"])
    tokens_per_step = spec.batch_size * spec.seq_len
    bar = tqdm(total=spec.steps, initial=start, desc=f"train {config.family}", unit="step")
    t_last, n_last = time.time(), start
    for step in range(start, spec.steps):
        batch = batches(step)
        if isinstance(batch, CanvasBatch):
            text, task = batch.arrays()
            tokens_per_step = sum(g[0].size + g[2].size for g in (text, task) if g is not None)
            if canvas_fn is None:
                canvas_fn = make_canvas_step(graphdef, config, spec, tx)
            state, metrics = canvas_fn(state, text, task)
        elif isinstance(batch, MixedBatch):
            text, task = batch.arrays()
            tokens_per_step = sum(x.size for x in (text, task and task[0]) if x is not None)
            objective = (spec.shift if batch.shift is None else batch.shift, batch.text_shift)
            if objective not in mixed_fns:
                mixed_fns[objective] = make_mixed_step(
                    graphdef, config, dataclasses.replace(spec, shift=objective[0]), tx,
                    text_shift=objective[1])
            state, metrics = mixed_fns[objective](state, text, task)
        else:
            tokens, maskable = batch if isinstance(batch, tuple) else (batch, None)
            tokens = jnp.asarray(tokens, jnp.int32)
            maskable = (jnp.ones_like(tokens, jnp.bool_) if maskable is None
                        else jnp.asarray(maskable, jnp.bool_))
            if tokens.shape != (spec.batch_size, spec.seq_len) or maskable.shape != tokens.shape:
                raise ValueError(f"batches({step}) returned shapes {tokens.shape} / "
                                 f"{maskable.shape}, expected {(spec.batch_size, spec.seq_len)}")
            if step_fn is None:
                step_fn = make_train_step(graphdef, config, spec, tx)
            state, metrics = step_fn(state, tokens, maskable)
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            m = {k: float(v) for k, v in metrics.items()}
            now = time.time()
            tok_s = (done - n_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            rec = {"step": done, **m, "tokens_per_s": tok_s, "time": now}
            records.append(rec)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.update(1)
        if done % spec.ckpt_every == 0 or done == spec.steps:
            manager.save(done, args=ocp.args.StandardSave(_to_saveable(state)))
            manager.wait_until_finished()
            if on_checkpoint is not None:
                on_checkpoint(done, nnx.merge(graphdef, state["params"]))
    bar.close()
    manager.close()
    trained = build_model(config, flatten(nnx.to_pure_dict(state["params"])))
    return trained, records


def _to_saveable(state):
    s = dict(state)
    s["key"] = jax.random.key_data(state["key"])
    return s


def _from_saveable(state):
    s = dict(state)
    s["key"] = jax.random.wrap_key_data(jnp.asarray(state["key"], jnp.uint32))
    return s


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    """Loss curve PNG (training loss and masked-token NLL against step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [r["loss"] for r in records], label="training loss (row-weighted)")
    for key, label in (("text_loss", "text rows: diffusion loss (ELBO / token; "
                                     "uniform-state CE for DiffusionGemma)"),
                       ("masked_nll", "text rows: NLL of masked tokens"),
                       ("sft_loss", "task rows: SFT loss (per answer token)"),
                       ("task_loss", "task rows: uniform-state CE (per canvas token)")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))
