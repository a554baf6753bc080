"""The LLaDA-Dream gap, controlled: `python experiments/gap_experiment.py OUT_DIR`.

tiny-llada trailed tiny-dream by about 0.9 bits/token at equal steps. The two differ in
structure (Dream: GQA, q/k/v biases, RoPE theta 1e6) and in the objective (Dream predicts
token i from the output at i-1: the one-position shift). This trains the 2 x 2 grid

    {LLaDA structure, Dream structure} x {no shift, shift}

with the same initial seed, the same data order (the same Wikipedia windows at every step)
and the same noise draws, on text rows only, and scores every run on the same held-out
windows with the same masks: the per-token negative ELBO (bits) of
`objective.diffusion_loss`, averaged over `eval_draws` fixed noise draws, position 0 never
masked in any run (so the shifted and unshifted runs are scored on the same tokens).

If the gap follows the shift (structure changes little), it is the shift's inductive bias:
with the shift, the output at a visible position i-1 holds token i-1 itself, so a bigram
guess for a masked i needs no attention; without it, the masked position must fetch its
neighbours through attention first. A gap that follows the structure would point at a bug.
Results go to OUT_DIR/gap.json (curves and final figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.data import sources
from qdlm_jax.data import tokenizer as tok_lib
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import init_model
from qdlm_jax.training.objective import diffusion_loss, mask_tokens
from qdlm_jax.training.trainer import TrainSpec, train

LN2 = float(np.log(2.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GapSpec:
    tokenizer: str
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    eval_every: int = 50
    eval_windows: int = 32
    eval_draws: int = 4
    seed: int = 0
    structures: tuple[str, ...] = ("llada", "dream")
    shifts: tuple[bool, ...] = (False, True)
    rope_theta: float | None = None  # None: each structure's own (5e5 LLaDA, 1e6 Dream)
    shared_embed: float = 0.0  # init: add a direction shared by every token embedding
    # > 0 adds a run per structure trained with the shift for its first `shift_until` steps
    # and without it after (fresh optimizer state, the same schedule and data), scored
    # without the shift throughout: does a shifted start carry the model off the plateau?
    shift_until: int = 0


def structure(family: str, spec: GapSpec, special, vocab: int) -> ModelConfig:
    dream = family == "dream"
    return ModelConfig(
        family=family, vocab_size=vocab, hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=max(1, spec.num_heads // 2) if dream else spec.num_heads,
        intermediate_size=spec.intermediate_size,
        rope_theta=spec.rope_theta or (1e6 if dream else 5e5),
        rms_norm_eps=1e-6 if dream else 1e-5, qkv_bias=dream, rope_full_precision=not dream,
        mask_token_id=special.mask, pad_token_id=special.pad, eos_token_id=special.eos,
        bos_token_id=special.bos, max_position_embeddings=512)


def heldout_elbo(model, windows: np.ndarray, *, shift: bool, draws: int, seed: int) -> float:
    """Mean per-token negative ELBO (bits) over `draws` fixed noise draws (module doc)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def one(state, key):
        m = nnx.merge(graphdef, state)
        x = jnp.asarray(windows, jnp.int32)
        noisy, masked, p_mask = mask_tokens(key, x, m.config.mask_token_id, keep_first=True)
        loss, _ = diffusion_loss(m(noisy), x, masked, p_mask, shift=shift)
        return loss * x.shape[1] / (x.shape[1] - 1)  # per scored position (0 never is)

    keys = jax.random.split(jax.random.key(seed + 12345), draws)
    return float(np.mean([float(one(state, k)) for k in keys])) / LN2


def run(spec: GapSpec, out_dir: Path) -> dict:
    tok = tok_lib.load_bpe_tokenizer(spec.tokenizer)
    special = tok_lib.special_token_ids(tok)
    train_w = sources.token_windows(sources.load_split("bigbench-wikipedia", "train", seed=0),
                                    tok, spec.seq_len, bos_id=special.bos, eos_id=special.eos)
    held = sources.token_windows(sources.load_split("bigbench-wikipedia", "heldout", seed=0),
                                 tok, spec.seq_len, bos_id=special.bos, eos_id=special.eos,
                                 max_windows=spec.eval_windows)

    def batches(step):  # the same rows at every step in every run
        rng = np.random.default_rng([spec.seed, step])
        return train_w[rng.integers(0, len(train_w), spec.batch_size)]

    results = {"spec": dataclasses.asdict(spec), "runs": {}}
    for family in spec.structures:
        for shift in spec.shifts + (("switch",) if spec.shift_until else ()):
            label = {True: "shift", False: "noshift",
                     "switch": f"shift{spec.shift_until}_then_noshift"}[shift]
            name = f"{family}_structure_{label}"
            config = structure(family, spec, special, tok.get_vocab_size())
            curve, t0 = [], time.time()

            scored_shifted = shift is True  # the switch run is scored without the shift

            def evaluate(step, model, curve=curve, shift=scored_shifted, name=name):
                curve.append({"step": step, "heldout_bits": heldout_elbo(
                    model, held, shift=shift, draws=spec.eval_draws, seed=spec.seed)})
                print(f"[gap] {name} step {step}: held-out {curve[-1]['heldout_bits']:.3f} "
                      f"bits/token", flush=True)

            ts = TrainSpec(steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                           lr=spec.lr, warmup_steps=min(30, spec.steps // 4), weight_decay=0.01,
                           seed=spec.seed,
                           ckpt_every=spec.eval_every, log_every=10, shift=shift)
            model = init_model(config, seed=spec.seed)
            if spec.shared_embed:
                add_shared_direction(model, spec.shared_embed, spec.seed)
            if shift == "switch":
                first = dataclasses.replace(ts, steps=spec.shift_until, shift=True,
                                            schedule_steps=spec.steps)
                model, early = train(model, first, batches, out_dir / name / "shift",
                                     on_checkpoint=evaluate)
                _, later = train(model, dataclasses.replace(ts, shift=False), batches,
                                 out_dir / name / "noshift", on_checkpoint=evaluate,
                                 start_step=spec.shift_until)
                records = early + later
            else:
                _, records = train(model, ts, batches,
                                   out_dir / name, on_checkpoint=evaluate)
            for c in curve:
                c["train_loss_bits"] = next(r["loss"] for r in records
                                            if r["step"] == c["step"]) / LN2
            results["runs"][name] = {"family_structure": family, "shift": shift,
                                     "curve": curve, "time_s": time.time() - t0}
            (out_dir / "gap.json").write_text(json.dumps(results, indent=2))
    return results


def add_shared_direction(model, scale: float, seed: int) -> None:
    """Adds `scale` x (typical embedding norm) along one random unit direction to every
    token embedding: keys then carry a content-independent part from step 0, which a
    RoPE head needs to attend by relative position alone (a masked query has no content)."""
    e = model.embed[...]
    u = jax.random.normal(jax.random.key(seed + 777), (e.shape[1],), e.dtype)
    u = u / jnp.linalg.norm(u)
    norm = jnp.sqrt(jnp.mean(jnp.sum(e * e, axis=1)))
    model.embed[...] = e + scale * norm * u[None, :]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--structures", default="llada,dream",
                   help="comma-separated: llada, dream (each run with and without the shift)")
    p.add_argument("--shifts", default="0,1", help="comma-separated 0 (no shift), 1 (shift)")
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--shared-embed", type=float, default=0.0)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--shift-until", type=int, default=0,
                   help="> 0: also a run per structure with the shift for its first N steps, "
                        "then without it")
    a = p.parse_args(argv)
    run(GapSpec(tokenizer=a.tokenizer, steps=a.steps, eval_every=a.eval_every,
                structures=tuple(a.structures.split(",")),
                shifts=tuple(bool(int(x)) for x in a.shifts.split(",") if x),
                rope_theta=a.rope_theta, shared_embed=a.shared_embed, num_heads=a.num_heads,
                shift_until=a.shift_until), a.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
