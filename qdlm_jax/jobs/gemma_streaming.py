"""GPTQ (or DAQ: `spec.method == "daq"`) of a DiffusionGemma hub checkpoint layer by layer:
memory bounded by one layer, resumable after a kill.

    x_enc = E[prompts] sqrt(H); c_j = the canvases noised at level j (the draws of
        `gemma_calibration`); e_j = E[c_j] sqrt(H)        (only those rows of the
        memory-mapped embedding are read)
    soft_j (with calib.self_condition): one float pass, layer by layer, of the encoder over
        the prompts and the decoder over each c_j without self-conditioning, then
        soft_j = soft_embedding(logits_j / T_j)                -> work/soft.npy
    part "self-conditioning": the SC MLP's statistics from (e_j, soft_j), GPTQ, then each
        level's decoder input x_dec_j = rms(e_j + SC^(soft_j))  -> work/self_conditioning
    for layer i: read it (float32), record its statistics from (x_enc, x_dec)
        (`gemma_calibration.hidden_layer_stats`), GPTQ it as the in-memory pass does
        (`gemma_gptq.gptq_part`), run the quantized layer to get the next inputs, and commit
        work/layer_i (packed weights, x_enc, x_dec, stats) atomically
    save_packed_gemma: the packed model written part by part (embedding and final norm, the
        SC part, each layer), never holding the whole model

The statistics are the in-memory pass's (`gemma_gptq.gptq_quantize_gemma`) with one
difference: the self-conditioning logits come from the float model, computed once before any
part is quantized, where the in-memory pass recomputes them through the model quantized so
far. Without self-conditioning (or for the SC part itself, quantized first) the two record
the same statistics. Peak memory is one layer (its routed experts in the stored dtype, cast
or dequantized one expert at a time), its routed rows and the working set of one group of
experts (`gemma_gptq.GROUP_BYTES`), plus the activations [B, P + N L, H]; the float
pre-pass also holds the float32 embedding for the logits (docs/scale.md has the figures at
26B-A4B's shapes). With a mesh, each layer is held on it.
A killed run resumes at the first part without a committed directory; each committed part
stores the exact float32 activations it produced, so the resumed run computes what an
uninterrupted one does. `work_dir/state.json` records the
settings: a work dir made with others is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qdlm_jax.checkpoints import orbax_format
from qdlm_jax.checkpoints.hf import CheckpointDir, check_tensors, key_map, read_tensors
from qdlm_jax.errors import CheckpointError
from qdlm_jax.fsutil import settings_digest
from qdlm_jax.jobs.streaming import claim_work_dir, memory_gib, outer_params, release_memory
from qdlm_jax.models.diffusion_gemma import (
    param_shapes,
    partial_model,
    scaled_embedding,
)
from qdlm_jax.models.params import ParamPath, cast_floats
from qdlm_jax.models.sharding import param_sharding
from qdlm_jax.quant.coverage import check_coverage
from qdlm_jax.quant.gemma_calibration import (
    hidden_layer_forward,
    hidden_layer_stats,
    noised_canvases,
    sc_forward,
    sc_stats,
)
from qdlm_jax.quant.gemma_gptq import GemmaGPTQSettings, gptq_part
from qdlm_jax.quant.gemma_plan import (
    EXPERT_KINDS,
    GemmaPTQSpec,
    attach_act,
    forward_parts,
    gemma_plan,
    hook_name,
    tensor_kind,
)

SC = "self_conditioning"
X_ENC, X_DEC, SOFT = "x_enc.npy", "x_dec.npy", "soft.npy"


def _part_dir(work: Path, layer: int | None) -> Path:
    return work / (SC if layer is None else f"layer_{layer:04d}")


class _Source:
    """The hub checkpoint's tensors by param path, read from its memory maps in float32."""

    def __init__(self, src: Path, mesh=None):
        self.ckpt = CheckpointDir(src)
        self.mappings = key_map(self.ckpt.config)
        check_tensors(self.ckpt, self.mappings)
        self.config = self.ckpt.config.replace(param_dtype="float32", dtype="float32")
        self.sharding_fn = None if mesh is None else param_sharding(mesh)

    def read(self, keep) -> dict[ParamPath, jax.Array]:
        """The tensors whose path `keep` accepts, in float32 (the routed experts in the stored
        dtype: every use casts them to float32 one expert at a time, so a bf16 layer's
        experts never exist in float32 all at once): read in the stored dtype and cast on the
        device, one at a time (no float32 host copy beside the device's)."""
        params = {}
        for m in self.mappings:
            if keep(m.path):
                (v,) = read_tensors(self.ckpt, [m], sharding_fn=self.sharding_fn).values()
                cast = (jnp.issubdtype(v.dtype, jnp.floating)
                        and tensor_kind(m.path) not in EXPERT_KINDS)
                params[m.path] = v.astype(jnp.float32) if cast else v
                del v
                self.ckpt.drop_resident()
        return params

    def layer(self, i: int) -> dict[ParamPath, jax.Array]:
        return self.read(lambda p: p[:2] == ("layers", i))

    def embedded(self, ids: np.ndarray) -> jax.Array:
        """E[ids] sqrt(H) of any shape of ids: only those rows are read."""
        name = next(m.hf_name for m in self.mappings if m.path == ("embed",))
        rows = np.asarray(self.ckpt.get(name)[np.asarray(ids).reshape(-1)], np.float32)
        self.ckpt.drop_resident()
        return scaled_embedding(self.config, jnp.asarray(rows)).reshape(
            *np.shape(ids), self.config.hidden_size)


def _levels(spec: GemmaGPTQSettings, canvases: np.ndarray, vocab: int) -> np.ndarray:
    """[N, B, L] the canvases noised at each decoder level (gemma_calibration's draws)."""
    c = spec.calib
    if c.modes == "encoder":
        return np.zeros((0,) + canvases.shape, np.int32)
    return np.stack([np.asarray(noised_canvases(jnp.asarray(canvases, jnp.int32), level,
                                                jax.random.fold_in(jax.random.key(c.seed), j),
                                                vocab))
                     for j, level in enumerate(c.levels)])


def _float_soft(src: _Source, prompts, levels, spec: GemmaGPTQSettings, progress: bool):
    """[N, B, L, H] soft_j of the float model (module docstring), one layer at a time."""
    config, c = src.config, spec.calib
    sc_params = src.read(lambda p: p[0] == SC)
    x_enc = src.embedded(prompts)
    x_dec = sc_forward(partial_model(config, sc_params), src.embedded(levels),
                       jnp.zeros(levels.shape + (config.hidden_size,), jnp.float32))
    for i in tqdm(range(config.num_layers), desc="float pass (self-conditioning logits)",
                  unit="layer", disable=not progress):
        x_enc, x_dec = hidden_layer_forward(partial_model(config, src.layer(i)), i, x_enc,
                                            x_dec)
        release_memory()
    graphdef, state = nnx.split(partial_model(
        config, src.read(lambda p: p[0] in ("embed", "final_norm"))))
    soft = []
    for j, level in enumerate(c.levels):  # one row at a time: logits are [L, V]
        temperature = c.t_min + (c.t_max - c.t_min) * level
        soft.append(jnp.concatenate([
            _soft_row(state, x_dec[j, b:b + 1], temperature, graphdef=graphdef)
            for b in range(x_dec.shape[1])]))
    return np.asarray(jnp.stack(soft))


def _soft_row(state, x, temperature, *, graphdef):
    """soft_embedding(logits(x) / T) of one canvas row. Two plain jits of the split state:
    `nnx.jit` also returns the module's state (a copy of the float32 embedding), and one
    program using the embedding in both products held a transposed copy of it."""
    sc = _row_logits(state, x, temperature, graphdef=graphdef)
    return _row_soft(state, sc, graphdef=graphdef)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_logits(state, x, temperature, *, graphdef):
    head = nnx.merge(graphdef, state)
    logits = head.logits(head.final_norm(x))
    return (logits / temperature).astype(head.embed[...].dtype)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_soft(state, sc, *, graphdef):
    return nnx.merge(graphdef, state).soft_embedding(sc)


def _settings(src: Path, prompts, canvases, spec: GemmaPTQSpec,
              settings: GemmaGPTQSettings, mesh) -> str:
    return settings_digest({"src": str(src.resolve()), "spec": dataclasses.asdict(spec),
                            "mesh": None if mesh is None else dict(mesh.shape),
                            "gptq": dataclasses.asdict(settings),
                            "prompts": settings_digest(np.asarray(prompts).tolist(), 16),
                            "canvases": settings_digest(np.asarray(canvases).tolist(), 16)}, 16)


def _commit(work: Path, layer: int | None, config, packed: dict, arrays: dict, stats: dict):
    """Writes the part's packed weights with its activations and stats in one rename."""
    staging = work / f".staging_{_part_dir(work, layer).name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, a in arrays.items():
        np.save(staging / name, np.asarray(a))
    (staging / "stats.json").write_text(json.dumps(stats))
    orbax_format.save_checkpoint(_part_dir(work, layer), config, packed, overwrite=True,
                                 extra_files=[staging / n for n in (*arrays, "stats.json")],
                                 meta={"part": SC if layer is None else layer})
    shutil.rmtree(staging)


def gptq_streaming_gemma(src: str | Path, prompts, canvases, spec: GemmaPTQSpec,
                         settings: GemmaGPTQSettings, work_dir: str | Path, *,
                         progress: bool = True, timings: dict | None = None,
                         mesh=None) -> dict:
    """GPTQ of the DiffusionGemma hub checkpoint `src` part by part into `work_dir`, calibrated
    on `prompts` [B, P] and their continuations `canvases` [B, L] (module docstring). Returns
    stats: per part the seconds (read, statistics, GPTQ, forward, write) and, in `timings`
    when given, the peak memory after each part. `mesh`: this process's devices to hold each
    layer on, with the model's partition rules (`models/sharding.py`: the experts' E dim over
    an "expert" axis, their intermediate dim and the dense kernels over "model"); a work dir
    is resumed only on the mesh shape it was started with."""
    if spec.weight is None:
        raise ValueError("gptq_streaming_gemma: spec.weight is None (16 bits): nothing to do")
    if mesh is not None and not all(d.process_index == jax.process_index()
                                    for d in mesh.devices.flat):
        raise ValueError("gptq_streaming_gemma: the mesh spans several processes; streaming "
                         "runs on one process's devices")
    src, work = Path(src), Path(work_dir)
    source = _Source(src, mesh)
    config = source.config
    prompts, canvases = np.asarray(prompts, np.int32), np.asarray(canvases, np.int32)
    plan = gemma_plan(param_shapes(config), spec)
    experts = set(plan.paths(kinds=EXPERT_KINDS))
    claim_work_dir(work, _settings(src, prompts, canvases, spec, settings, mesh))

    t0 = time.time()
    levels = _levels(settings, canvases, config.vocab_size)
    stats = {"parts": {}, "resumed_at": None, "how": {}}
    calib = settings.calib
    if calib.self_condition and levels.shape[0]:
        if not (work / SOFT).is_file():
            t = time.time()
            soft = _float_soft(source, prompts, levels, settings, progress)
            tmp = work / f".{SOFT}"
            np.save(tmp, soft)
            tmp.rename(work / SOFT)
            stats["float_pass_s"] = time.time() - t
            if timings is not None:
                timings["float_pass"] = {"seconds": stats["float_pass_s"], **memory_gib()}
        soft = jnp.asarray(np.load(work / SOFT))
    else:
        soft = jnp.zeros(levels.shape + (config.hidden_size,), jnp.float32)
    release_memory()

    x_enc = x_dec = None
    shapes = param_shapes(config)
    planned = {label: (paths, layer) for label, paths, layer
               in forward_parts(config.num_layers, plan)}
    for key in tqdm([None, *range(config.num_layers)], desc=f"{spec.method} (streaming)",
                    unit="part",
                    disable=not progress):  # the SC part, then each layer
        is_sc = key is None
        label = "self-conditioning" if is_sc else f"layer {key}"
        paths, layer = planned.get(label, ([], None))  # every part runs, planned or not
        done = _part_dir(work, key)
        if (done / X_DEC).is_file():
            x_enc, x_dec = np.load(done / X_ENC), np.load(done / X_DEC)
            part = json.loads((done / "stats.json").read_text())
            stats["parts"][label] = part
            stats["how"].update(part.get("how", {}))
            continue
        if stats["resumed_at"] is None:
            stats["resumed_at"] = label
        seconds = {}
        t = time.time()
        if is_sc:
            params = source.read(lambda p: p[0] == SC)
            embeds = source.embedded(levels)
            x_enc = source.embedded(prompts)
        else:
            params = source.layer(key)
        seconds["read_s"] = time.time() - t
        names = tuple(hook_name(p) for p in paths)
        model = partial_model(config, params)
        t = time.time()
        if not paths and layer is None:  # nothing planned here: only its forward runs
            part_stats = None
        elif is_sc:
            part_stats = sc_stats(model, embeds, soft, names=names)
        else:
            part_stats = hidden_layer_stats(model, key, x_enc, x_dec, calib, names=names,
                                            experts=layer is not None)
        jax.block_until_ready(jax.tree.leaves(part_stats.grams) if part_stats else ())
        seconds["stats_s"] = time.time() - t
        t = time.time()
        packed, how = ({}, {}) if part_stats is None else gptq_part(
            params, paths, layer, part_stats, config, spec, settings, experts)
        seconds["gptq_s"] = time.time() - t
        del part_stats
        out = {**params, **packed}
        mine = plan.subset([p for p in shapes if p[0] == SC] if is_sc else
                           [p for p in shapes if p[:2] == ("layers", key)])
        attach_act(out, mine, spec.act)
        check_coverage(mine, params, out)
        t = time.time()
        qmodel = partial_model(config, out)
        if is_sc:
            x_dec = sc_forward(qmodel, embeds, soft)
        else:
            x_enc, x_dec = hidden_layer_forward(qmodel, key, x_enc, x_dec)
        x_enc, x_dec = np.asarray(x_enc), np.asarray(x_dec)
        seconds["forward_s"] = time.time() - t
        t = time.time()
        part = {"seconds": seconds, "how": how}
        _commit(work, key, config, out, {X_ENC: x_enc, X_DEC: x_dec}, part)
        seconds["write_s"] = time.time() - t
        stats["parts"][label] = part
        stats["how"].update(how)
        if timings is not None:
            timings.setdefault("parts", []).append({"part": label, **seconds, **memory_gib()})
        del params, packed, out, model, qmodel
        release_memory()
    stats["time_s"] = time.time() - t0
    return stats


def part_dirs(work_dir: str | Path, num_layers: int) -> list[Path]:
    """The committed parts of a streamed run, in forward order (the SC part, each layer)."""
    return [_part_dir(Path(work_dir), None)] + [_part_dir(Path(work_dir), i)
                                                for i in range(num_layers)]


def gemma_outer_params(ckpt: CheckpointDir) -> dict[ParamPath, jax.Array]:
    """The hub checkpoint's embedding and final norm in their stored dtype (what the
    streamed parts do not hold)."""
    return outer_params(ckpt, key_map(ckpt.config), ("embed", "final_norm"))


def save_packed_gemma(src: str | Path, work_dir: str | Path, dest: str | Path, *,
                      extra_files=(), meta: dict | None = None, progress: bool = True):
    """Writes the packed model of `work_dir` to the checkpoint `dest` (atomically) part by
    part: the embedding and final norm (source dtype), the self-conditioning part, then each
    layer; float tensors stay in the source dtype. Returns the config."""
    ckpt = CheckpointDir(Path(src))
    config = ckpt.config
    done = part_dirs(work_dir, config.num_layers)
    for d in done:  # refuse before writing anything
        if not (d / X_DEC).is_file():
            raise CheckpointError(f"{d}: not finished; run the quantization again to resume")
    outer = gemma_outer_params(ckpt)
    dtype = np.dtype(outer[("embed",)].dtype).name

    def parts():
        for d in tqdm(done, desc=f"writing {Path(dest).name}", unit="part",
                      disable=not progress):
            release_memory()
            yield cast_floats(orbax_format.load_checkpoint(d)[1], dtype)

    orbax_format.save_checkpoint(dest, config.replace(param_dtype=dtype, dtype=dtype), outer,
                                 parts=parts(), extra_files=extra_files, overwrite=True,
                                 meta=meta)
    release_memory()
    return config
