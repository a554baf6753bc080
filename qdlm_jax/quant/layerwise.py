"""Layer-wise PTQ: quantize one transformer block at a time on its own calibration inputs.

    x_0 = embed(calibration ids)
    for block i:
        for group in (q,k,v) -> (o) -> (gate,up) -> (down):
            inputs of the group = block_i run on x_i with the earlier groups already quantized
            quantize the group's linears (RTN / GPTQ from a Hessian / AWQ scales + clipping /
            DAQ + ABMP binary planes from the Hessian, docs/quantization.md)
        x_{i+1} = quantized block_i(x_i)

Peak memory is one block's calibration activations `[N, T, D]` (plus one group's captured
inputs when a method needs them) on top of the model. Params may be sharded over a mesh:
every step is a jitted function of the (sharded) block state.

Hessians are token-weighted, H = (2 / sum_j c_j) sum_j c_j x_j x_j^T, with c = 1 for plain
calibration and DLLMQuant's certainty-guided weights when the feeder provides them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from qdlm_jax.models.dllm import DLLM
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import awq
from qdlm_jax.quant.block import (
    GROUPS,
    BlockInputs,
    BlockRunner,
    GroupGrams,
    block_inputs,
    install,
    quantize_daq,
    quantize_gptq,
    stage,
    weight,
)
from qdlm_jax.quant.calibration import CalibBatch
from qdlm_jax.quant.gptq_core import hessian
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec
from qdlm_jax.quant.rtn import rtn_quantize_params

METHODS = ("rtn", "gptq", "awq", "daq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQSpec:
    method: str  # rtn | gptq | awq | daq
    weight: QuantSpec  # bits, group size, symmetry, clip ratio
    damp: float = 0.01  # GPTQ: dampening fraction of mean(diag H)
    block_size: int = 128  # GPTQ lazy-batch width
    act_order: bool = False  # GPTQ desc_act
    static_groups: bool = False  # GPTQ static groups
    awq_grid: int = 20  # AWQ: alpha grid points in [0, 1]
    awq_clip: bool = True  # AWQ: weight clipping search after scaling
    # DAQ + ABMP (Quant-dLLM; weight.bits = mean binary planes, weight.group_size = block)
    daq_ratio: float = 0.1  # ABMP: fraction of blocks moved up (and down) one plane
    daq_iters: int = 15  # RSR rounds (ARB-LLM's count)
    daq_salient: float = 2.0  # DOR: weight lambda of salient weights (not published)
    daq_data_weight: bool = True  # Omega_ij includes diag(H)_j (the MCS statistic)
    daq_compensate: str = "column"  # GPTQ-style error feedback: none | block | column
    daq_refit: int = 1  # column compensation: scale refits on the values the loop met
    daq_abmp_check: bool = True  # keep ABMP only where it lowers the layer's output error
    chunk: int = 8  # calibration sequences per forward chunk
    # Mixed precision: the width of each block's linears (a `bit_alloc.BitPlan`'s bits), in
    # place of weight.bits; None: weight.bits everywhere.
    block_bits: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.block_bits is not None and self.method == "daq":
            raise ValueError("method=daq takes no per-block widths: its bits are a mean "
                             "number of binary planes that ABMP already moves between a "
                             "matrix's column blocks; use rtn, gptq or awq")
        if self.daq_compensate not in ("none", "block", "column"):
            raise ValueError(f"daq_compensate={self.daq_compensate!r}: expected none, block "
                             "or column")

    def for_block(self, index: int) -> "PTQSpec":
        """The spec block `index` is quantized with: weight.bits from `block_bits`."""
        if self.block_bits is None:
            return self
        if not 0 <= index < len(self.block_bits):
            raise ValueError(f"block_bits has {len(self.block_bits)} widths; block {index} "
                             "has none (a bit plan for another model?)")
        weight = dataclasses.replace(self.weight, bits=self.block_bits[index])
        return dataclasses.replace(self, weight=weight, block_bits=None)

    @property
    def needs_calibration(self) -> bool:
        if self.method == "daq":
            return (self.daq_data_weight or self.daq_compensate != "none"
                    or self.daq_ratio > 0)
        return self.method != "rtn"


def quantize_model(model: DLLM, calib: CalibBatch | None, spec: PTQSpec, *,
                   progress: bool = True) -> tuple[DLLM, dict]:
    """Returns (quantized model, stats). The input model is not modified.

    RTN needs no calibration (`calib` may be None). The LM head and embedding stay in
    floating point, as in QDLM's setup.
    """
    t0 = time.time()
    config = model.config
    stats = {"method": spec.method, "bits": spec.weight.bits,
             "group_size": spec.weight.group_size, "sym": spec.weight.sym, "layers": {}}
    if spec.block_bits is not None:
        if len(spec.block_bits) != config.num_layers:
            raise ValueError(f"block_bits has {len(spec.block_bits)} widths for a model of "
                             f"{config.num_layers} blocks")
        stats["block_bits"] = list(spec.block_bits)
    if spec.method == "rtn":
        params = get_params(model)
        if spec.block_bits is None:
            params = rtn_quantize_params(params, spec.weight)
        for i in range(config.num_layers if spec.block_bits is not None else 0):
            params = rtn_quantize_params(params, spec.for_block(i).weight,
                                         select=lambda p, _, i=i: p[:2] == ("layers", i))
        qmodel = model_from_params(config, params)
        stats["time_s"] = time.time() - t0
        return qmodel, stats
    qmodel = model_from_params(config, dict(get_params(model)))  # a copy we may mutate
    if calib is None:
        raise ValueError(f"method={spec.method!r} needs calibration data")
    inputs = block_inputs(qmodel.embed[...], config, calib)
    x = inputs.x

    bar = progress_bar(spec, config.num_layers, progress)
    for i, block in enumerate(qmodel.layers):
        x, stats["layers"][i] = quantize_block(block, inputs, x, i, spec, bar=bar)
    bar.close()
    stats["time_s"] = time.time() - t0
    return qmodel, stats


def daq_settings(spec: PTQSpec) -> dict:
    w = spec.weight
    return dict(bits=w.bits, block_size=w.group_size, ratio=spec.daq_ratio,
                iters=spec.daq_iters, salient=spec.daq_salient,
                data_weight=spec.daq_data_weight, compensate=spec.daq_compensate,
                refit=spec.daq_refit, abmp_check=spec.daq_abmp_check, damp=spec.damp)


def progress_bar(spec: PTQSpec, num_layers: int, progress: bool = True):
    bits = spec.weight.bits if spec.block_bits is None else "mixed"
    return tqdm(total=num_layers * len(GROUPS), unit="group", disable=not progress,
                desc=f"{spec.method} W{bits} ({num_layers} blocks x "
                     f"{len(GROUPS)} linear groups)")


class _Timer:
    """Seconds per phase, accumulated into a dict (outputs are waited on, so the asynchronous
    dispatch does not move time between phases). A no-op without a dict."""

    def __init__(self, into: dict | None):
        self.into = into

    def __call__(self, phase: str, fn, *args, **kwargs):
        if self.into is None:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.into[phase] = self.into.get(phase, 0.0) + time.perf_counter() - t
        return out


def quantize_block(block, inputs: BlockInputs, x, index: int, spec: PTQSpec, *,
                   bar=None, timings: dict | None = None) -> tuple[jax.Array, dict]:
    """Quantizes one block in place on its calibration input `x` (the previous quantized
    block's output); returns (this quantized block's output, its stats). RTN, GPTQ, AWQ,
    DAQ.

    GPTQ and DAQ take each group's Gram matrix from `GroupGrams`, which runs each part of
    the block once (the group's input with the earlier groups quantized) instead of a whole
    block forward per group. `timings` collects seconds per phase: forward_s (the float
    block's forward, for the block error), capture_s (the group inputs and their Gram
    matrices), gptq_s (GPTQ calls), pack_s (packing and staging), output_s (the quantized
    block's output); AWQ and RTN time only the two forwards."""
    spec = spec.for_block(index)
    runner = BlockRunner(block, inputs, spec.chunk)
    timed = _Timer(timings)
    prefix = f"layers.{index}."
    y_fp, _ = timed("forward_s", runner.run, x)
    layer_stats, pending = {}, {}
    if spec.method == "awq":
        layer_stats["awq"] = awq.quantize_block(block, runner, x, prefix, spec, pending,
                                                seed=index)
    elif spec.method == "rtn":
        for name in (n for g in GROUPS for n in g):
            w = weight(block, name)
            stage(block, name, QuantizedArray.quantize(w, spec.weight, scale_dtype=w.dtype),
                  pending)
    grams = GroupGrams(block, inputs, x, spec.chunk) if spec.method in ("gptq", "daq") else None
    for k, group in enumerate(GROUPS):
        if spec.method == "daq":
            layer_stats.setdefault("daq", {}).update(quantize_daq(
                block, group, grams.gram(k), inputs.weight_sum, pending,
                **daq_settings(spec)))
        if spec.method == "gptq":
            # The Gram matrix is a temporary here: freed once its Hessian exists.
            h = hessian(timed("capture_s", grams.gram, k), inputs.weight_sum)
            quantize_gptq(block, group, h, spec.weight, pending,
                          damp=spec.damp, block_size=spec.block_size,
                          act_order=spec.act_order, static_groups=spec.static_groups,
                          timed=timed)
            del h
        if bar is not None:
            bar.update(1)
    if grams is not None:
        x_next = timed("output_s", grams.output)
    else:
        x_next, _ = timed("forward_s", runner.run, x)
    install(block, pending)
    layer_stats["block_out_rel_err"] = float(jnp.linalg.norm(x_next - y_fp)
                                             / jnp.linalg.norm(y_fp))
    return x_next, layer_stats
