"""`qdlm quantize` on a DiffusionGemma checkpoint: RTN, GPTQ, AWQ, DAQ, SmoothQuant or
QuaRot, every tensor accounted for.

    plan  (quant/gemma_plan.py)  every param: kind, share, action; refused before any work when
                                 the group size does not divide a quantized tensor's width
    load  fp32 (the quantization and both models' evaluation run in fp32)
    RTN   (quant/gemma_rtn.py)   dense kernels -> QuantizedArray, experts -> QuantizedExperts,
                                 then the coverage guard (an unplanned tensor is an error)
    SmoothQuant (quant/gemma_smoothquant.py)  per-channel scales from the two-mode
                                 calibration folded where AWQ folds its scales, then RTN
    QuaRot (quant/gemma_rtn.py)  RTN of H^T W behind an online Hadamard transform of every
                                 quantized tensor's input (no fold: the post-norms and fused
                                 experts leave no place for one)
    GPTQ  (quant/gemma_gptq.py)  the same, part by part, on calibration windows of
                                 calib.seq_len prompt tokens plus one canvas (the calib split
                                 encoded by the tokenizer, or random ids without one): two-mode
                                 statistics (--config.moe.calib_modes / levels /
                                 self_condition), per-expert Hessians with the thin-expert
                                 rule (--config.moe.thin_*)
    DAQ   (quant/gemma_gptq.py)  the same Hessians into Quant-dLLM's DAQ + ABMP binary planes
                                 (--config.daq.*; bits = mean planes, 2-4; group = block):
                                 BinaryPlanesArray, experts BinaryPlanesExperts
    AWQ   (quant/gemma_awq.py)   part by part on the same windows and two-mode calibration:
                                 scales folded where an exact fold exists (one scale shared by
                                 every expert's gate_up, one per expert for down), then clip
                                 (--config.awq.grid / clip) and llm-awq's grid
    eval  KL to fp on held-out canvases and the fraction of the fp model's top-k expert
          choices that changed (evals/canvas_kl.py): text windows encoded by the
          checkpoint's tokenizer, or windows of random token ids when it has none (said in
          the log and the report); with a tokenizer also 2-digit addition and
          --config.eval.tasks on both models (without one they are skipped, said likewise)
    save  run_dir/model (orbax, packed; unquantized tensors in the source dtype), results.json
          (with the per-tensor plan), report.md ending with the coverage table

`rtn`, `gptq`, `awq` and `daq` (clean calibration) run here, `rtn` and `gptq` also with
--config.act_bits 8 or 4, `smoothquant` and `quarot` with it (every quantized tensor's
inputs quantized per token or per group, `gemma_plan.attach_act`: W8A8, W4A8);
`check_gemma` refuses the rest in one line before any work. The run is in memory (no mesh),
except `gptq` or `daq` with --config.stream=true (`run_gemma_streaming`: layer by layer from the hub
checkpoint's memory maps, `jobs/gemma_streaming.py`; nothing evaluated).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from qdlm_jax.checkpoints.hf import CheckpointDir
from qdlm_jax.checkpoints.load import (
    load_model,
    load_tokenizer,
    param_summary,
    read_model_config,
)
from qdlm_jax.checkpoints.orbax_format import load_checkpoint, save_checkpoint
from qdlm_jax.data import sources
from qdlm_jax.data.hf_tokenizer import tokenizer_files
from qdlm_jax.errors import CheckpointError, ConfigOverrideError
from qdlm_jax.evals.backends import TextModel
from qdlm_jax.evals.basic import ArithmeticEval, arithmetic_accuracy, heldout_windows
from qdlm_jax.evals.canvas_kl import canvas_kl, route_changes
from qdlm_jax.evals.tasks import run_task
from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.jobs.gemma_streaming import (
    gemma_outer_params,
    gptq_streaming_gemma,
    part_dirs,
    save_packed_gemma,
)
from qdlm_jax.jobs.quantize_report import gemma_report
from qdlm_jax.jobs.streaming import can_stream
from qdlm_jax.models.diffusion_gemma import model_from_params, param_shapes
from qdlm_jax.models.gemma_config import FAMILY
from qdlm_jax.models.params import cast_floats, get_params
from qdlm_jax.quant.gemma_awq import GemmaAWQSettings, awq_quantize_gemma
from qdlm_jax.quant.gemma_gptq import gptq_quantize_gemma
from qdlm_jax.quant.gemma_plan import EXPERT_KINDS, GemmaPTQSpec, gemma_plan
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma_model
from qdlm_jax.quant.gemma_smoothquant import smoothquant_gemma

# The methods this pass runs on the family: those without calibration data, and those that
# rotate or smooth the linear inputs and so quantize them too (--config.act_bits).
METHODS = ("rtn", "gptq", "awq", "daq", "smoothquant", "quarot")
# The methods that quantize from per-part Hessians (the layer-by-layer GPTQ driver, which also
# streams).
HESSIAN = ("gptq", "daq")
UNCALIBRATED = ("rtn", "quarot")
WEIGHT_ACTIVATION = ("smoothquant", "quarot")


def gemma_ptq_spec(spec) -> GemmaPTQSpec:
    """The PTQ spec of a job spec (`jobs.quantize_spec.JobSpec`)."""
    router = (dataclasses.replace(spec.ptq.weight, bits=spec.router_bits)
              if spec.router_bits else None)
    return GemmaPTQSpec(method=spec.method, weight=spec.ptq.weight,
                        quantize_router=spec.quantize_router, router_weight=router,
                        parts=spec.moe_parts, act=None if spec.wa is None else spec.wa.act)


def check_gemma(spec, config) -> None:
    """Refuses, in one line and before any work, what this pass does not do on the family,
    and a group size that does not divide some quantized tensor's input width."""
    where = f"on {FAMILY}: not yet"
    if spec.method == "duquant":
        raise ConfigOverrideError(f"--config.method={spec.method} {where} (its rotation folds "
                                  "are not written for the Gemma post-norms and the fused "
                                  "experts; W8A8 / W4A8 run with rtn, gptq, smoothquant or "
                                  "quarot and --config.act_bits)")
    if spec.method not in METHODS:
        raise ConfigOverrideError(f"--config.method={spec.method} {where} "
                                  f"({', '.join(METHODS[:-1])} or {METHODS[-1]})")
    if (spec.method in WEIGHT_ACTIVATION and spec.wa is not None
            and spec.wa.weight_quantizer != "rtn"):
        raise ConfigOverrideError(f"--config.wa.weight_quantizer={spec.wa.weight_quantizer} "
                                  f"with {spec.method} {where} (rtn)")
    if spec.method not in UNCALIBRATED and spec.calib.mode != "clean":
        raise ConfigOverrideError(f"--config.calibration={spec.calib.mode} {where} (its "
                                  "calibration is two-mode: --config.moe.calib_modes)")
    if spec.wa is not None:
        if spec.wa.kv is not None or spec.wa.iaaq:
            kv_bits = spec.wa.kv.bits if spec.wa.kv is not None else 16
            raise ConfigOverrideError(f"--config.act.kv.bits={kv_bits} / act.iaaq {where} "
                                      "(K/V stay in float; --config.act_bits quantizes the "
                                      "linear inputs)")
        if spec.wa.act.granularity == "per_tensor":
            raise ConfigOverrideError(f"--config.act.granularity=per_tensor {where} (dynamic "
                                      "per_token or per_group scales)")
    if spec.budget is not None:
        raise ConfigOverrideError(f"--config.bits_budget={spec.budget.budget:g} {where} "
                                  "(uniform --config.bits)")
    if spec.method == "daq":
        widths = [spec.ptq.weight.bits] + ([spec.router_bits] if spec.router_bits else [])
        if max(widths) > 4:
            raise ConfigOverrideError(f"--config.bits / moe.router_bits {max(widths)} with "
                                      "method=daq: its bits are a mean number of binary "
                                      "planes (2, 3 or 4)")
    if spec.stream == "true" and (spec.method not in HESSIAN or spec.wa is not None
                                  or not can_stream(spec.model)):
        raise ConfigOverrideError(f"--config.stream=true with method={spec.method} "
                                  f"act_bits={spec.act_bits} {where} (streaming runs "
                                  "weight-only gptq or daq on a hub checkpoint directory; "
                                  "drop --config.stream for the in-memory pass)")
    try:
        gemma_plan(param_shapes(config), gemma_ptq_spec(spec))
    except ValueError as e:
        raise ConfigOverrideError(f"--config.group_size={spec.ptq.weight.group_size}: {e}"
                                  ) from None


def _log(msg: str) -> None:
    print(f"[quantize] {msg}", flush=True)


def _tokenizer(path: str):
    """The checkpoint's tokenizer, or None (with a line) when it has none."""
    try:
        return load_tokenizer(path)
    except CheckpointError as e:
        if "no tokenizer" not in str(e):
            raise
        return None


def kl_windows(spec, config, tokenizer) -> np.ndarray:
    """`eval_windows` windows of `calib.seq_len` prompt tokens plus one canvas: held-out text
    encoded by the tokenizer, or uniform random token ids (seed 0) without one."""
    n, width = spec.eval_windows, spec.calib.seq_len + config.canvas_length
    if tokenizer is None:
        return np.random.default_rng(0).integers(0, config.vocab_size, (n, width))
    return heldout_windows(tokenizer, source=spec.source, seq_len=width, n_windows=n)


def evaluate_text(model, tokenizer, spec, tasks) -> dict:
    """2-digit addition and the extra tasks (they need a tokenizer)."""
    out = {"tasks": {}}
    if spec.eval_arith_n:
        a = arithmetic_accuracy(model, tokenizer, ArithmeticEval(n=spec.eval_arith_n),
                                progress=False)
        out.update(arith_acc=a["accuracy"], arith_se=a["se"], arith_n=a["n"])
    tm = TextModel(model, tokenizer)
    for t in tasks:
        r = run_task(tm, t, progress=False)
        out["tasks"][t.name] = {"metric": r["metric"], "value": r["value"], "se": r["se"],
                                "n": r["n"]}
    return out


def gemma_calibration_windows(spec, config, tokenizer) -> np.ndarray:
    """`calib.n_samples` windows of `calib.seq_len` prompt tokens plus one canvas from the
    calibration split, or uniform random ids (seed 1) without a tokenizer."""
    n, width = spec.calib.n_samples, spec.calib.seq_len + config.canvas_length
    if tokenizer is None:
        return np.random.default_rng(1).integers(0, config.vocab_size, (n, width))
    return sources.calibration_windows(tokenizer, spec.source, width, n)


def quantize_gemma(model, spec, tokenizer):
    """(quantized model, plan, stats) of the job's method (module docstring)."""
    gspec = gemma_ptq_spec(spec)
    if spec.method in UNCALIBRATED:
        qmodel, plan = rtn_quantize_gemma_model(model, gspec)
        return qmodel, plan, {}
    windows = gemma_calibration_windows(spec, model.config, tokenizer)
    seq = spec.calib.seq_len
    if spec.method == "smoothquant":
        qparams, plan = smoothquant_gemma(model, windows[:, :seq], windows[:, seq:], gspec,
                                          alpha=spec.wa.alpha, calib=spec.moe_gptq.calib)
        return model_from_params(model.config, qparams), plan, {}
    if spec.method == "awq":
        settings = GemmaAWQSettings(n_grid=spec.ptq.awq_grid, clip=spec.ptq.awq_clip,
                                    calib=spec.moe_gptq.calib)
        qparams, plan, info = awq_quantize_gemma(model, windows[:, :seq], windows[:, seq:],
                                                 gspec, settings, progress=True)
        empty = sum(len(v) for v in info["empty_experts"].values())
        return model_from_params(model.config, qparams), plan, {"empty_experts": empty}
    qparams, plan, how = gptq_quantize_gemma(model, windows[:, :seq], windows[:, seq:], gspec,
                                             spec.moe_gptq, progress=True)  # gptq, daq
    counts = {}
    for kinds in how.values():
        for k in kinds:
            counts[k] = counts.get(k, 0) + 1
    return model_from_params(model.config, qparams), plan, {"expert_hessians": counts}


def _bytes_vs_bf16(params: dict) -> float | None:
    s = param_summary(params)
    return s["bytes"] / s["bf16_bytes"] if s["bf16_bytes"] else None


def run_gemma(spec, run_dir: Path, t0: float, *, tasks=()) -> dict:
    """The job on a DiffusionGemma checkpoint (module docstring); `run_dir` exists.
    `tasks`: the built-in task specs of `--config.eval.tasks`."""
    if spec.stream == "true":
        return run_gemma_streaming(spec, run_dir, t0)
    source_dtype = read_model_config(spec.model).param_dtype
    model = load_model(spec.model, dtype="float32")
    config = model.config
    tokenizer = _tokenizer(spec.model)
    notes = []
    if tokenizer is None:
        notes.append(f"{spec.model} has no tokenizer: KL to fp on windows of random token "
                     "ids; 2-digit addition and --config.eval.tasks skipped (they need one)")
        _log(notes[-1])
    else:
        _log(f"tokenizer: {tokenizer.describe()}")
    _log(f"{spec.model}: {FAMILY}, method={spec.method} W{spec.ptq.weight.bits}A{spec.act_bits} "
         f"g{spec.ptq.weight.group_size}, router "
         f"{'quantized' if spec.quantize_router else 'kept'} -> {run_dir}")

    fp = None
    if tokenizer is not None and not spec.skip_fp:
        _log("evaluating the FP model")
        fp = evaluate_text(model, tokenizer, spec, tasks)

    t_q = time.time()
    qmodel, plan, qstats = quantize_gemma(model, spec, tokenizer)
    quant_s = time.time() - t_q
    if "expert_hessians" in qstats:
        _log(f"expert Hessians: {qstats['expert_hessians']}")
    if "empty_experts" in qstats:
        _log(f"experts with no routed calibration row (quantized without scales or clip): "
             f"{qstats['empty_experts']}")
    _log(f"quantized in {quant_s:.1f}s; {100 * plan.quantized_share:.2f}% of the parameters "
         "packed, every planned tensor checked")

    q = {"tasks": {}}
    if tokenizer is not None:
        _log("evaluating the quantized model")
        q = evaluate_text(qmodel, tokenizer, spec, tasks)
    if spec.eval_windows:
        windows = kl_windows(spec, config, tokenizer)
        kl = canvas_kl(model, qmodel, windows)
        q.update(kl_to_fp_bits=kl["kl_bits"], kl_to_fp_bits_se=kl["kl_bits_se"],
                 kl_windows=kl["n_windows"], kl_prompt_len=kl["prompt_len"],
                 kl_canvas_length=kl["canvas_length"],
                 kl_input="text" if tokenizer is not None else "random token ids")
        rc = route_changes(model, qmodel, windows)
        q.update(expert_choices_changed=rc["changed_fraction"], expert_choices=rc["choices"])
        _log(f"{100 * rc['changed_fraction']:.2f}% of the fp model's expert choices changed "
             f"(routers {'quantized' if spec.quantize_router else 'kept'})")

    stored = cast_floats(get_params(qmodel), source_dtype)
    packed = {p: stored[p] for p in plan.paths()}
    experts = {p: stored[p] for p in plan.paths(kinds=EXPERT_KINDS)}
    summary = param_summary(stored)
    w = spec.ptq.weight
    result = {
        "model": spec.model, "run_dir": str(run_dir), "config": spec.config,
        "family": FAMILY, "method": spec.method, "bits": w.bits, "act_bits": spec.act_bits,
        "group_size": w.group_size, "sym": w.sym,
        "calibration": "none" if spec.method in UNCALIBRATED else
        f"two-mode ({spec.moe_gptq.calib.modes}), {spec.calib.n_samples} windows",
        **qstats,
        "quantize_router": spec.quantize_router, "router_bits": spec.router_bits,
        "moe_parts": list(spec.moe_parts), "fp": fp, "quantized": q,
        "quantize_s": quant_s, "packed_bytes": summary["bytes"],
        "bf16_bytes": summary["bf16_bytes"],
        "bytes_vs_bf16": summary["bytes"] / summary["bf16_bytes"],
        "linear_bytes_vs_bf16": _bytes_vs_bf16(packed),
        "expert_bytes_vs_bf16": _bytes_vs_bf16(experts),
        "coverage": plan.rows(), "coverage_tensors": plan.to_json(),
        "experts_quantized": all(t.quantized for t in plan.tensors
                                 if t.kind in EXPERT_KINDS),
        "notes": notes,
        "tokenizer": tokenizer.describe() if tokenizer is not None else None,
    }
    if spec.save:
        save_checkpoint(run_dir / "model",
                        config.replace(param_dtype=source_dtype, dtype=source_dtype), stored,
                        overwrite=True, extra_files=tokenizer_files(spec.model),
                        meta=_model_meta(result, spec))
    _write_results(run_dir, result, t0)
    _log(f"packed model {summary['bytes'] / 2**20:.2f} MiB = {result['bytes_vs_bf16']:.3f}x "
         f"bf16 -> {run_dir}")
    return result


__all__ = ["check_gemma", "evaluate_text", "gemma_calibration_windows", "gemma_ptq_spec",
           "kl_windows", "quantize_gemma", "run_gemma"]


def _model_meta(result: dict, spec) -> dict:
    """What the saved model's metadata records of how it was quantized."""
    return {**{k: result[k] for k in ("method", "bits", "act_bits", "group_size", "sym",
                                      "calibration", "quantize_router", "coverage")},
            "config_hash": spec.config_hash}


def _write_results(run_dir: Path, result: dict, t0: float) -> None:
    """results.json and report.md (printed), with the run's total seconds."""
    result["total_s"] = time.time() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(result, indent=2, default=str))
    text = gemma_report(result)
    atomic_write_text(run_dir / "report.md", text)
    print(text)


def _stored_summary(params: dict, dtype: str, plan) -> dict:
    """param_summary of one part as saved (floats in `dtype`), of its packed tensors and of
    its packed experts."""
    stored = cast_floats(params, dtype)
    packed = set(plan.paths())
    experts = set(plan.paths(kinds=EXPERT_KINDS))
    return {"all": param_summary(stored),
            "packed": param_summary({p: v for p, v in stored.items() if p in packed}),
            "experts": param_summary({p: v for p, v in stored.items() if p in experts})}


def run_gemma_streaming(spec, run_dir: Path, t0: float) -> dict:
    """`--config.stream=true`: GPTQ (or DAQ) layer by layer from the hub checkpoint's memory maps
    (`jobs.gemma_streaming`), the packed model written part by part; the model is never
    resident, so the run evaluates nothing (`qdlm eval` the saved model)."""
    config = read_model_config(spec.model)
    source_dtype = config.param_dtype
    tokenizer = _tokenizer(spec.model)
    windows = gemma_calibration_windows(spec, config, tokenizer)
    seq = spec.calib.seq_len
    gspec = gemma_ptq_spec(spec)
    plan = gemma_plan(param_shapes(config), gspec)
    work = run_dir / "parts"
    _log(f"{spec.model}: {FAMILY}, {spec.method} W{spec.ptq.weight.bits} "
         f"g{spec.ptq.weight.group_size}"
         f" streamed layer by layer -> {work}")
    t_q = time.time()
    stats = gptq_streaming_gemma(spec.model, windows[:, :seq], windows[:, seq:], gspec,
                                 spec.moe_gptq, work, progress=True)
    quant_s = time.time() - t_q
    counts: dict[str, int] = {}
    for kinds in stats["how"].values():
        for k in kinds:
            counts[k] = counts.get(k, 0) + 1
    _log(f"quantized in {quant_s:.1f}s (resumed at {stats['resumed_at']}); expert Hessians: "
         f"{counts}")
    total = {k: {"params": 0, "bytes": 0, "bf16_bytes": 0} for k in ("all", "packed",
                                                                     "experts")}
    parts = (load_checkpoint(d)[1] for d in part_dirs(work, config.num_layers))
    outer = gemma_outer_params(CheckpointDir(Path(spec.model)))
    for params in itertools.chain([outer], parts):  # one at a time
        for k, v in _stored_summary(params, source_dtype, plan).items():
            for f in total[k]:
                total[k][f] += v[f]
    w = spec.ptq.weight
    result = {
        "model": spec.model, "run_dir": str(run_dir), "config": spec.config,
        "family": FAMILY, "method": spec.method, "bits": w.bits, "act_bits": spec.act_bits,
        "group_size": w.group_size, "sym": w.sym, "streaming": True,
        "calibration": f"two-mode ({spec.moe_gptq.calib.modes}), {spec.calib.n_samples} "
                       "windows, self-conditioning logits of the float model",
        "expert_hessians": counts, "quantize_router": spec.quantize_router,
        "router_bits": spec.router_bits, "moe_parts": list(spec.moe_parts), "fp": None,
        "quantized": {"tasks": {}}, "quantize_s": quant_s, "parts": stats["parts"],
        "packed_bytes": total["all"]["bytes"], "bf16_bytes": total["all"]["bf16_bytes"],
        "bytes_vs_bf16": total["all"]["bytes"] / total["all"]["bf16_bytes"],
        "linear_bytes_vs_bf16": total["packed"]["bytes"] / total["packed"]["bf16_bytes"],
        "expert_bytes_vs_bf16": (total["experts"]["bytes"] / total["experts"]["bf16_bytes"]
                                 if total["experts"]["bf16_bytes"] else None),
        "coverage": plan.rows(), "coverage_tensors": plan.to_json(),
        "experts_quantized": all(t.quantized for t in plan.tensors
                                 if t.kind in EXPERT_KINDS),
        "notes": ["streamed layer by layer: nothing evaluated (the float model is never "
                  "resident); `qdlm eval` the saved model"],
        "tokenizer": tokenizer.describe() if tokenizer is not None else None,
    }
    if spec.save:
        save_packed_gemma(spec.model, work, run_dir / "model",
                          extra_files=tokenizer_files(spec.model), meta=_model_meta(result, spec))
    _write_results(run_dir, result, t0)
    return result
