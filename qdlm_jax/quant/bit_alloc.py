"""Mixed precision for the weight-only methods: a bit plan (one width per transformer block)
under a mean-bit budget, from a sensitivity pass (thin driver; the allocator and the KL are
`bit_alloc_core`).

Sensitivity of block i at width b: the KL(fp || model) of the model's output distribution,
in bits per position (`bit_alloc_core.kl_bits_per_window`, averaged over the windows), when
block i alone has its seven linears RTN-quantized at b (the job's group size, symmetry and
clip ratio) and every other block stays fp. RTN is the proxy for every method: cheap, and
the ranking of blocks it gives is what the allocator needs. Inputs: the first `samples`
calibration windows with a fixed `mask_ratio` of their positions replaced by the mask token
(seeded), the inputs the job's `KL to FP` column uses on held-out windows.

One pass over the blocks computes the whole table, reading each fp block once:

    x = embed(ids);  streams = {}
    for block j:
        every stream (i, b), i < j:  stream <- block_j(stream)          (fp block j)
        for b in widths:             streams[(j, b)] <- RTN_b(block_j)(x)
        x <- block_j(x)
    S[i, b] = KL(head(x) || head(streams[(i, b)]))

so it holds 1 + blocks x widths activations [samples, T, D] (LLaDA-8B, 8 x 128 tokens, four
widths: 32 x 4 x 16 MiB = 2 GiB in fp32) besides one block. `blocks` is any iterable of fp
blocks in order: the in-memory model's layers, or the streaming pass's blocks read one at a
time from a checkpoint's memory maps (`jobs/streaming.stream_sensitivity`); both give the same
table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.models.layers import rms_normalize
from qdlm_jax.models.project import project
from qdlm_jax.quant.bit_alloc_core import allocate_bits, kl_bits_per_window, mean_bits
from qdlm_jax.quant.block import (
    GROUPS,
    BlockInputs,
    BlockRunner,
    block_inputs,
    set_kernel,
    stage,
    weight,
)
from qdlm_jax.quant.calibration import CalibBatch
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import SUPPORTED_BITS, QuantSpec

LINEARS = tuple(n for g in GROUPS for n in g)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    budget: float  # mean bits per linear weight of the blocks (parameter-weighted), e.g. 3.5
    widths: tuple[int, ...] = (2, 3, 4, 8)  # candidate widths of a block
    samples: int = 8  # calibration windows the sensitivity KL is measured on
    mask_ratio: float = 0.5  # fraction of their positions masked (seeded)
    seed: int = 0  # the masking draw

    def __post_init__(self):
        widths = tuple(int(w) for w in self.widths)
        if not widths or any(w not in SUPPORTED_BITS for w in widths):
            raise ValueError(f"BudgetSpec.widths={self.widths!r}: expected widths from "
                             f"{SUPPORTED_BITS}")
        object.__setattr__(self, "widths", tuple(sorted(set(widths))))
        if not self.budget >= min(self.widths):
            raise ValueError(f"BudgetSpec.budget={self.budget!r}: below the narrowest "
                             f"candidate width {min(self.widths)}; no plan fits")
        if self.samples < 1:
            raise ValueError(f"BudgetSpec.samples={self.samples!r}: expected >= 1")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"BudgetSpec.mask_ratio={self.mask_ratio!r}: expected [0, 1]")


@dataclasses.dataclass(frozen=True)
class BitPlan:
    """A bit plan and what it was made from (`plan.json` in a run directory)."""

    budget: float
    widths: tuple[int, ...]
    bits: tuple[int, ...]  # width of each block
    params: tuple[int, ...]  # linear weights of each block
    sensitivity: tuple[tuple[float, ...], ...]  # [block][width]: KL to fp in bits
    settings: dict = dataclasses.field(default_factory=dict)  # what the table depends on
    seconds: float = 0.0  # the sensitivity pass

    @property
    def mean_bits(self) -> float:
        """The parameter-weighted mean width over the blocks' linear weights."""
        return float(mean_bits(self.params, self.bits))

    def to_json(self) -> dict:
        return {"granularity": "block", "proxy": "rtn",
                "measure": "KL(fp || model with the block alone quantized), bits/position",
                "budget": self.budget, "mean_bits": self.mean_bits,
                "widths": list(self.widths), "bits": list(self.bits),
                "params": list(self.params),
                "sensitivity": [list(r) for r in self.sensitivity],
                "settings": self.settings, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "BitPlan":
        return cls(budget=d["budget"], widths=tuple(d["widths"]), bits=tuple(d["bits"]),
                   params=tuple(d["params"]),
                   sensitivity=tuple(tuple(r) for r in d["sensitivity"]),
                   settings=d.get("settings", {}), seconds=d.get("seconds", 0.0))


def make_plan(spec: BudgetSpec, sensitivity: np.ndarray, params, *, settings=None,
              seconds: float = 0.0) -> BitPlan:
    """The allocator's plan for a sensitivity table [blocks, widths] (`bit_alloc_core`)."""
    bits = allocate_bits(params, spec.widths, sensitivity, spec.budget)
    return BitPlan(budget=spec.budget, widths=spec.widths, bits=bits,
                   params=tuple(int(p) for p in params),
                   sensitivity=tuple(tuple(float(v) for v in r) for r in sensitivity),
                   settings=dict(settings or {}), seconds=seconds)


def sensitivity_batch(windows: np.ndarray, mask_id: int, spec: BudgetSpec) -> CalibBatch:
    """The first `spec.samples` windows with each position masked with probability
    `spec.mask_ratio` (seeded), unpadded and unweighted."""
    w = np.asarray(windows)[:spec.samples].astype(np.int32)
    rng = np.random.default_rng(spec.seed)
    masked = rng.random(w.shape) < spec.mask_ratio
    ones = np.ones(w.shape, np.int32)
    return CalibBatch(ids=np.where(masked, mask_id, w).astype(np.int32), attention_mask=ones,
                      is_masked=masked, token_weights=ones.astype(np.float32),
                      mask_ratio=masked.mean(axis=1).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Head:
    """The model after its last block: logits = RMSNorm(x) @ lm_head, as `DLLM` computes
    them (`final_norm`, `lm_head`)."""

    norm_scale: jax.Array  # [D]
    kernel: object  # [D, V] LM head kernel (an array or a packed weight)
    eps: float


@functools.partial(jax.jit, static_argnames="eps")
def _kl_rows(x_ref, x, norm_scale, kernel, eps):
    def logits(h):
        normed = rms_normalize(h.astype(jnp.float32), eps).astype(h.dtype)
        return project(normed * norm_scale.astype(h.dtype), kernel)

    return kl_bits_per_window(logits(x_ref), logits(x))


def _output_kl(head: Head, x_ref, x, chunk: int) -> float:
    rows = [_kl_rows(x_ref[a:a + chunk], x[a:a + chunk], head.norm_scale, head.kernel,
                     eps=head.eps) for a in range(0, x.shape[0], chunk)]
    return float(jnp.mean(jnp.concatenate(rows)))


def block_sensitivity(blocks: Iterable, inputs: BlockInputs, head: Head, weight_spec: QuantSpec,
                      widths: tuple[int, ...], *, chunk: int = 8, progress: bool = True
                      ) -> tuple[np.ndarray, list[int]]:
    """(S [blocks, widths], linear weights per block): the table of the module docstring.
    Each block's kernels are RTN-staged for a moment and put back before the next block is
    drawn from `blocks`, so an in-memory model is left as it was."""
    x = inputs.x
    streams: dict[tuple[int, int], jax.Array] = {}
    params = []
    bar = tqdm(desc="bit plan: sensitivity (RTN, one block at a time)", unit="block",
               disable=not progress)
    for j, block in enumerate(blocks):
        runner = BlockRunner(block, inputs, chunk)
        for key in streams:
            streams[key], _ = runner.run(streams[key])
        kept = {name: weight(block, name) for name in LINEARS}
        params.append(sum(int(np.prod(w.shape)) for w in kept.values()))
        try:
            for k, bits in enumerate(widths):
                spec = dataclasses.replace(weight_spec, bits=bits)
                for name, w in kept.items():
                    stage(block, name, QuantizedArray.quantize(w, spec, scale_dtype=w.dtype), {})
                streams[(j, k)], _ = runner.run(x)
        finally:
            for name, w in kept.items():
                set_kernel(block, name, w)
        x, _ = runner.run(x)
        bar.update(1)
    bar.close()
    table = np.zeros((len(params), len(widths)))
    for (i, k), xs in streams.items():
        table[i, k] = _output_kl(head, x, xs, chunk)
    return table, params


def model_sensitivity(model, windows: np.ndarray, spec: BudgetSpec, weight_spec: QuantSpec, *,
                      progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """`block_sensitivity` of an in-memory fp model on calibration `windows` [n, T]."""
    config = model.config
    inputs = block_inputs(model.embed[...], config,
                          sensitivity_batch(windows, config.mask_token_id, spec))
    head = Head(model.final_norm.scale[...], model.lm_head.kernel[...], config.rms_norm_eps)
    return block_sensitivity(iter(model.layers), inputs, head, weight_spec, spec.widths,
                             progress=progress)


__all__ = ["BitPlan", "BudgetSpec", "Head", "block_sensitivity", "make_plan",
           "model_sensitivity", "sensitivity_batch"]
