"""The main job: load -> calibrate -> quantize -> evaluate FP vs quantized -> save.

Writes, in `out_dir/<method>-w<bits>g<group>-<calibration>/`:
  - `model/`: orbax checkpoint of the packed model (`qdlm generate --model` loads it as is),
  - `results.json`: the settings and every figure,
  - `report.md`: a table of FP vs quantized quality.
Bad config values are rejected before any work starts.

The settings are `quantize_spec.job_spec` (every flag checked first); the three run paths
here (in memory, on a mesh across processes, streaming block by block) share the spec, the
calibration, the tokenizer and the result record; the report is `quantize_report`. A
DiffusionGemma checkpoint (`quantize_gemma.METHODS`) runs `quantize_gemma.run_gemma` after the
same spec and run directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from qdlm_jax.checkpoints.hf import load_hf_config
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
from qdlm_jax.evals.basic import (
    ArithmeticEval,
    arithmetic_accuracy,
    heldout_bound,
    heldout_windows,
    output_kl,
)
from qdlm_jax.evals.tasks import run_task
from qdlm_jax.fsutil import atomic_write_text, settings_digest
from qdlm_jax.jobs.quantize_gemma import quantize_gemma, run_gemma
from qdlm_jax.jobs.quantize_report import report
from qdlm_jax.jobs.quantize_spec import (
    JobSpec,
    check_activation_widths,
    check_family,
    check_weight_widths,
    eval_task_specs,
    job_spec,
    use_streaming,
)
from qdlm_jax.jobs.streaming import (
    assemble,
    config_shim,
    quantize_streaming,
    save_packed,
    stream_sensitivity,
)
from qdlm_jax.models.distributed import to_host
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.params import cast_floats, get_params, model_from_params
from qdlm_jax.models.sharding import make_mesh
from qdlm_jax.quant.act_kernel import inner_weight
from qdlm_jax.quant.bit_alloc import BitPlan, make_plan, model_sensitivity
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.calibration import build_calibration
from qdlm_jax.quant.layerwise import quantize_model
from qdlm_jax.quant.qarray import QuantizedArray, quantized_param_bytes
from qdlm_jax.quant.wa import quantize_model_wa


def evaluate(model, tokenizer, windows, spec: JobSpec) -> dict:
    t0 = time.time()
    bound = heldout_bound(model, windows, mc_num=spec.eval_mc_num)
    arith = arithmetic_accuracy(model, tokenizer, ArithmeticEval(n=spec.eval_arith_n))
    tasks, tm = {}, TextModel(model, tokenizer)
    for t in eval_task_specs(spec):
        r = run_task(tm, t, progress=False)
        tasks[t.name] = {"metric": r["metric"], "value": r["value"],
                         "se": r["se"], "n": r["n"]}
    return {"tasks": tasks,
            "bits_per_token": bound["bits_per_token"],
            "bits_per_token_se": bound["bits_per_token_se"], "ppl_bound": bound["ppl_bound"],
            "arith_acc": arith["accuracy"], "arith_se": arith["se"], "arith_n": arith["n"],
            "n_windows": bound["n_windows"], "seq_len": bound["seq_len"],
            "mc_num": spec.eval_mc_num, "eval_s": time.time() - t0}


def _fp_cache_file(spec: JobSpec) -> Path:
    """Where the fp model's evaluation under these settings is kept across runs: keyed by the
    checkpoint's files (path, size, mtime) and every evaluation setting."""
    files = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in Path(spec.model).rglob("*") if f.is_file())
    digest = settings_digest({"files": files, "source": spec.source,
                              "seq_len": spec.calib.seq_len, "windows": spec.eval_windows,
                              "mc_num": spec.eval_mc_num, "arith_n": spec.eval_arith_n,
                              "tasks": list(spec.eval_tasks),
                              "task_limit": spec.eval_task_limit, "format": 3}, 16)
    return sources.cache_dir() / "fp_eval" / f"{digest}.json"


def unigram_reference(model_path: str) -> float | None:
    """The unigram entropy (bits/token) a model's card recorded (`eval.json`), if any."""
    f = Path(model_path) / "eval.json"
    try:
        return float(json.loads(f.read_text())["unigram_entropy"]["bits_per_token"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def calibration_windows(tokenizer, spec: JobSpec):
    """The calibration split's token windows [n_samples, seq_len] (`sources.calibration_
    windows`)."""
    return sources.calibration_windows(tokenizer, spec.source, spec.calib.seq_len,
                                       spec.calib.n_samples)


def start_run_dir(run_dir: Path, spec: JobSpec) -> None:
    """Creates the run directory and records the run's config (`config.json`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(spec.config, indent=2, default=str))


def run_streaming(spec: JobSpec, run_dir: Path, t0: float, mesh=None) -> dict:
    """The job with `quant.streaming`: the fp model is never resident (fp figures and KL to fp
    are skipped); the packed model is written one block at a time (`save_packed`), then loaded
    back (it is small) and evaluated; without saving it is assembled in memory. `mesh`: this
    process's devices to quantize each block on."""


    start_run_dir(run_dir, spec)
    if spec.calib.mode == "trajectory" or spec.calib.certainty_weights:
        raise ConfigOverrideError("--config.stream: trajectory calibration and certainty "
                                  "weights run the fp model, which streaming never holds; use "
                                  "--config.calibration=clean|masked or --config.stream=false")
    config = load_hf_config(Path(spec.model) / "config.json")
    check_weight_widths(config, spec.ptq)
    tokenizer = load_tokenizer(spec.model)
    print(f"[quantize] tokenizer: {tokenizer.describe()}")
    print(f"[quantize] {spec.model}: {config.family}, streaming {spec.method} "
          f"W{spec.weight_bits} g{spec.ptq.weight.group_size} calibration={spec.calib.mode}"
          + (f" on a {dict(mesh.shape)} mesh" if mesh is not None else "")
          + f" -> {run_dir} (fp figures and KL to fp are skipped: the fp model is never "
          "resident; --config.stream=false computes them)")
    spec, plan = with_bit_plan(  # before any block, so a resumed run has the same plan
        spec, tokenizer,
        lambda w: stream_sensitivity(spec.model, w, spec.budget, spec.ptq.weight), run_dir)
    calib = build_calibration(config_shim(config), calibration_windows(tokenizer, spec),
                              spec.calib)
    t_q = time.time()
    _, qstats = quantize_streaming(spec.model, calib, spec.ptq, run_dir / "blocks", mesh=mesh)
    quant_s = time.time() - t_q
    meta = {"method": spec.method, "bits": spec.ptq.weight.bits, "act_bits": 16,
            "group_size": spec.ptq.weight.group_size, "sym": spec.ptq.weight.sym,
            "calibration": spec.calib.mode if spec.needs_calibration else "none",
            "config_hash": spec.config_hash}
    record_plan(plan, meta)
    if spec.save:  # written one block at a time, then loaded back (the packed model is small)
        save_packed(spec.model, run_dir / "blocks", run_dir / "model",
                    extra_files=tokenizer_files(spec.model), meta=meta)
        cfg, stored = load_checkpoint(run_dir / "model")
    else:
        cfg, params = assemble(spec.model, run_dir / "blocks")
        stored = cast_floats(params, cfg.param_dtype)
        del params
    q = None
    if spec.eval_windows:
        windows = heldout_windows(tokenizer, source=spec.source, seq_len=spec.calib.seq_len,
                                  n_windows=spec.eval_windows)
        print("[quantize] evaluating the quantized model")
        q = evaluate(model_from_params(cfg, stored), tokenizer, windows, spec)
    summary = param_summary(stored)
    linear = param_summary({p: v for p, v in stored.items() if not isinstance(v, jnp.ndarray)})
    result = {
        "model": spec.model, "run_dir": str(run_dir), "config": spec.config,
        "family": cfg.family, "method": spec.method, "bits": spec.ptq.weight.bits,
        "act_bits": 16, "group_size": spec.ptq.weight.group_size, "sym": spec.ptq.weight.sym,
        "calibration": meta["calibration"], "streaming": True, "fp": None, "quantized": q,
        "mesh": None if mesh is None else dict(mesh.shape),
        "quantize_s": quant_s,
        "unigram_bits_per_token": unigram_reference(spec.model),
        "packed_bytes": summary["bytes"], "bytes_vs_bf16": summary["bytes"] /
        summary["bf16_bytes"], "linear_bytes_vs_bf16": linear["bytes"] / linear["bf16_bytes"],
        "total_s": time.time() - t0,
        "stats": qstats,
        "tokenizer": tokenizer.describe(),
    }
    record_plan(plan, result)
    atomic_write_text(run_dir / "results.json", json.dumps(result, indent=2, default=str))
    if q is not None:
        atomic_write_text(run_dir / "report.md", report([result]))
        print(report([result]))
    print(f"[quantize] streamed {cfg.num_layers} blocks in {quant_s:.1f}s; packed model "
          f"{summary['bytes'] / 2**20:.1f} MiB ({result['bytes_vs_bf16']:.2f}x bf16) -> "
          f"{run_dir}")
    return result


PLAN_FILE = "plan.json"


def plan_settings(spec: JobSpec) -> dict:
    """What a bit plan depends on: a run dir's plan.json is reused only when they match."""
    weight = {k: v for k, v in dataclasses.asdict(spec.ptq.weight).items() if k != "bits"}
    return json.loads(json.dumps({"model": spec.model, "budget": dataclasses.asdict(spec.budget),
                                  "weight": weight, "source": spec.source,
                                  "seq_len": spec.calib.seq_len, "format": 1}))


def with_bit_plan(spec: JobSpec, tokenizer, sensitivity, run_dir: Path | None = None
                  ) -> tuple[JobSpec, BitPlan | None]:
    """(spec with each block's width, the plan) under `--config.bits_budget`; (spec, None)
    without one. The plan is `run_dir/plan.json` when that holds one made with these settings
    (a resumed or repeated run uses the same plan); otherwise `sensitivity(windows)` (the
    in-memory or the streaming pass) measures the table on the calibration windows, the
    allocator makes the plan and it is written there before any block is quantized."""
    if spec.budget is None:
        return spec, None
    settings, plan = plan_settings(spec), None
    file = None if run_dir is None else Path(run_dir) / PLAN_FILE
    if file is not None and file.is_file():
        saved = BitPlan.from_json(json.loads(file.read_text()))
        if saved.settings == settings:
            plan = saved
            print(f"[quantize] bit plan: {file} (made with these settings)")
    if plan is None:
        t0 = time.time()
        table, params = sensitivity(calibration_windows(tokenizer, spec))
        plan = make_plan(spec.budget, table, params, settings=settings,
                         seconds=time.time() - t0)
        if file is not None:
            atomic_write_text(file, json.dumps(plan.to_json(), indent=2))
    print(f"[quantize] bit plan for a budget of {plan.budget:g} bits: blocks at "
          f"{' '.join(map(str, plan.bits))} bits, mean {plan.mean_bits:.4g}")
    return dataclasses.replace(spec, ptq=dataclasses.replace(spec.ptq, block_bits=plan.bits)), plan


def record_plan(plan: BitPlan | None, *records: dict) -> None:
    """A planned run's `bits` is the plan's mean width, and the plan goes with it: into the
    results and the checkpoint's metadata."""
    for d in records if plan is not None else ():
        d["bits"] = plan.mean_bits
        d["bit_plan"] = plan.to_json()


def stats_plan(qstats: dict) -> BitPlan | None:
    """The bit plan `calibrate_and_quantize` ran with (None: uniform widths)."""
    return BitPlan.from_json(qstats["bit_plan"]) if "bit_plan" in qstats else None


def calibrate_and_quantize(model, tokenizer, spec: JobSpec, run_dir: Path | None = None):
    """The job's calibration + layer-wise quantization (shared with `qdlm study`):
    returns (quantized model, stats, calibration batch or None, seconds spent quantizing).
    Under a bit budget the plan (`with_bit_plan`, kept in `run_dir` when given) comes first
    and is in stats["bit_plan"]."""

    check_activation_widths(model, spec)
    spec, plan = with_bit_plan(
        spec, tokenizer, lambda w: model_sensitivity(model, w, spec.budget, spec.ptq.weight),
        run_dir)
    calib = None
    if spec.needs_calibration:
        calib = build_calibration(model, calibration_windows(tokenizer, spec), spec.calib)
    t_q = time.time()
    if spec.wa is not None:
        qmodel, qstats = quantize_model_wa(model, calib, spec.wa)
    else:
        qmodel, qstats = quantize_model(model, calib, spec.ptq)
    if plan is not None:
        qstats["bit_plan"] = plan.to_json()
    return qmodel, qstats, calib, time.time() - t_q


def quantize_from_config(cfg: ml_collections.ConfigDict, *, model=None):
    """(quantized model, stats) for a `configs/quantize.py`-style config, without the job's
    evaluation or saving; `model` (the fp model of cfg.model) skips loading it again."""

    spec = job_spec(cfg)
    if check_family(spec) == GEMMA_FAMILY:
        model = model if model is not None else load_model(spec.model, dtype="float32")
        tokenizer = None
        if spec.method != "rtn":
            try:
                tokenizer = load_tokenizer(spec.model)
            except CheckpointError as e:
                if "no tokenizer" not in str(e):
                    raise
        qmodel, plan, qstats = quantize_gemma(model, spec, tokenizer)
        return qmodel, {"coverage": plan.rows(), **qstats}
    if model is None:
        model = load_model(spec.model, dtype="float32")
    check_weight_widths(model.config, spec.ptq)
    tokenizer = load_tokenizer(spec.model)
    qmodel, qstats, _, _ = calibrate_and_quantize(model, tokenizer, spec)
    return qmodel, qstats


def run_on_mesh(spec: JobSpec, mesh_shape: tuple[int, int], t0: float) -> dict:
    """The job on a global (data, model) mesh (model 0: every device not on the data axis),
    in one process or several (`qdlm quantize --distributed`, `models/distributed.py`).
    Every process runs it: each loads only the checkpoint slices its devices hold, the
    layer-wise PTQ runs on the global arrays, the packed params are gathered to every host
    and process 0 writes `run_dir/model` and `results.json`. Evaluation is not run here
    (`qdlm eval` the saved model, which is small). `--config.stream=true` in one process
    streams the blocks onto the mesh instead (`run_streaming`)."""


    if spec.stream == "true" and jax.process_count() > 1:
        raise ConfigOverrideError("--config.stream=true: the streaming pass runs in one process "
                                  "(on its own devices); across processes drop "
                                  "--config.stream (the in-memory pass holds 1/devices of the "
                                  "model per device)")
    data, model_axis = mesh_shape
    mesh = make_mesh(model=model_axis or None, data=data)
    spec = dataclasses.replace(spec, config={**spec.config, "mesh": dict(mesh.shape)})
    run_dir = Path(spec.out_dir) / spec.run_name
    if spec.stream == "true":
        use_streaming(spec)  # refuses what cannot stream, with the reason
        return run_streaming(spec, run_dir, t0, mesh=mesh)
    writer = jax.process_index() == 0
    source_dtype = read_model_config(spec.model).param_dtype
    model = load_model(spec.model, dtype="float32", mesh=mesh)
    check_weight_widths(model.config, spec.ptq)
    tokenizer = load_tokenizer(spec.model)
    if writer:
        start_run_dir(run_dir, spec)
    print(f"[quantize] {spec.model}: {model.config.family}, {spec.method} on a "
          f"{dict(mesh.shape)} mesh, process {jax.process_index()} of {jax.process_count()}"
          + (f" -> {run_dir}" if writer else ""))
    qmodel, qstats, calib, quant_s = calibrate_and_quantize(model, tokenizer, spec)
    params = to_host(get_params(qmodel))  # a collective: every process
    result = {"model": spec.model, "run_dir": str(run_dir), "config": spec.config,
              "family": model.config.family, "method": spec.method,
              "bits": spec.ptq.weight.bits, "act_bits": spec.act_bits,
              "act_group_size": spec.act_group_size,
              "group_size": spec.ptq.weight.group_size, "sym": spec.ptq.weight.sym,
              "calibration": spec.calib.mode if calib else "none", "mesh": dict(mesh.shape),
              "processes": jax.process_count(), "fp": None, "quantized": None,
              "quantize_s": quant_s, "total_s": time.time() - t0, "stats": qstats,
              "tokenizer": tokenizer.describe()}
    meta = {"method": spec.method, "bits": spec.ptq.weight.bits,
            "config_hash": spec.config_hash}
    plan = stats_plan(qstats)
    record_plan(plan, result, meta)
    if writer:
        if plan is not None:  # every process made it (a collective pass); one writes it
            atomic_write_text(run_dir / PLAN_FILE, json.dumps(plan.to_json(), indent=2))
        if spec.save:
            stored = cast_floats(params, source_dtype)
            save_checkpoint(run_dir / "model",
                            qmodel.config.replace(param_dtype=source_dtype, dtype=source_dtype),
                            stored, overwrite=True,
                            extra_files=tokenizer_files(spec.model), meta=meta)
        atomic_write_text(run_dir / "results.json", json.dumps(result, indent=2, default=str))
        print(f"[quantize] quantized in {quant_s:.1f}s; saved {run_dir / 'model'} (evaluate it "
              "with `qdlm eval`)")
    multihost_utils.sync_global_devices("qdlm quantize done")
    return result


def run(cfg: ml_collections.ConfigDict, *, fp_cache: dict | None = None,
        mesh_shape: tuple[int, int] | None = None) -> dict:
    """Runs the job; `fp_cache` (a dict) lets a sweep evaluate the FP model once;
    `mesh_shape` = (data, model) runs it on a global mesh (`run_on_mesh`)."""


    spec = job_spec(cfg)
    gemma = check_family(spec) == GEMMA_FAMILY
    if gemma and mesh_shape is not None:
        raise ConfigOverrideError(f"--mesh on {GEMMA_FAMILY}: not yet (the pass runs in "
                                  "memory on one device)")
    if mesh_shape is not None:
        return run_on_mesh(spec, mesh_shape, time.time())
    run_dir = Path(spec.out_dir) / spec.run_name
    if (run_dir / "results.json").is_file() and not spec.overwrite:
        print(f"[quantize] {run_dir} holds this exact config's finished run: reusing its "
              "results (--config.overwrite=true runs it again)")
        return json.loads((run_dir / "results.json").read_text())
    t0 = time.time()
    if gemma:
        start_run_dir(run_dir, spec)
        return run_gemma(spec, run_dir, t0, tasks=eval_task_specs(spec))
    if use_streaming(spec):
        return run_streaming(spec, run_dir, t0)
    source_dtype = read_model_config(spec.model).param_dtype
    model = load_model(spec.model, dtype="float32")
    check_weight_widths(model.config, spec.ptq)
    check_activation_widths(model, spec)
    tokenizer = load_tokenizer(spec.model)
    print(f"[quantize] tokenizer: {tokenizer.describe()}")
    seq = spec.calib.seq_len
    windows = heldout_windows(tokenizer, source=spec.source, seq_len=seq,
                              n_windows=spec.eval_windows)
    start_run_dir(run_dir, spec)
    print(f"[quantize] {spec.model}: {model.config.family}, method={spec.method} "
          f"W{spec.weight_bits}A{spec.act_bits}"
          + (f" (act groups of {spec.act_group_size})" if spec.act_group_size else "")
          + f" g{spec.ptq.weight.group_size} calibration="
          f"{spec.calib.mode} -> {run_dir}")

    fp_key = (spec.model, spec.source, seq, spec.eval_windows, spec.eval_mc_num,
              spec.eval_arith_n, spec.eval_tasks, spec.eval_task_limit)
    fp = None
    if not spec.skip_fp:
        cache_file = _fp_cache_file(spec)
        if fp_cache is not None and fp_key in fp_cache:
            fp = fp_cache[fp_key]
        elif cache_file.is_file():
            fp = json.loads(cache_file.read_text())
            print(f"[quantize] FP model: evaluated before with these settings ({cache_file})")
        else:
            print("[quantize] evaluating the FP model")
            fp = evaluate(model, tokenizer, windows, spec)
            atomic_write_text(cache_file, json.dumps(fp))
            if fp_cache is not None:
                fp_cache[fp_key] = fp

    qmodel, qstats, calib, quant_s = calibrate_and_quantize(model, tokenizer, spec, run_dir)
    print("[quantize] evaluating the quantized model")
    q = evaluate(qmodel, tokenizer, windows, spec)
    kl = output_kl(model, qmodel, windows)
    q["kl_to_fp_bits"], q["kl_to_fp_bits_se"] = kl["kl_bits"], kl["kl_bits_se"]

    params = get_params(qmodel)
    packed = {p: inner_weight(v) for p, v in params.items()
              if isinstance(inner_weight(v), (QuantizedArray, BinaryPlanesArray))}
    linear_q = quantized_param_bytes(packed)
    fp_linear = sum(int(np.prod(get_params(model)[p].shape)) * 2 for p in packed)  # as bf16
    result = {
        "model": spec.model, "run_dir": str(run_dir), "config": spec.config,
        "family": model.config.family, "method": spec.method,
        "bits": spec.ptq.weight.bits, "act_bits": spec.act_bits,
        "act_group_size": spec.act_group_size,
        "kv_bits": 16 if spec.wa is None or spec.wa.kv is None else spec.wa.kv.bits,
        "iaaq": bool(spec.wa is not None and spec.wa.iaaq),
        "group_size": spec.ptq.weight.group_size,
        "sym": spec.ptq.weight.sym, "calibration": spec.calib.mode if calib else "none",
        "calib_mask_ratio_mean": None if calib is None else float(calib.mask_ratio.mean()),
        "fp": fp, "quantized": q, "quantize_s": quant_s,
        "unigram_bits_per_token": unigram_reference(spec.model),
        "linear_bytes_vs_bf16": linear_q / fp_linear if fp_linear else None,
        "linear_bits_per_weight": 16.0 * linear_q / fp_linear if fp_linear else None,
        "total_s": time.time() - t0, "stats": qstats,
        "tokenizer": tokenizer.describe(),
    }
    record_plan(stats_plan(qstats), result)
    if spec.save:  # unquantized tensors go back to the source checkpoint's dtype
        stored = cast_floats(params, source_dtype)
        save_checkpoint(run_dir / "model",
                        qmodel.config.replace(param_dtype=source_dtype, dtype=source_dtype),
                        stored, overwrite=True, extra_files=tokenizer_files(spec.model),
                        meta={**{k: result[k] for k in ("method", "bits", "act_bits",
                                                        "act_group_size", "group_size", "sym",
                                                        "calibration")
                                 + (("bit_plan",) if "bit_plan" in result else ())},
                              "config_hash": spec.config_hash})
        result["packed_bytes"] = param_summary(stored)["bytes"]
    atomic_write_text(run_dir / "results.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(run_dir / "report.md", report([result]))
    print(report([result]))
    return result
