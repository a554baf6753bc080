"""Weight-only PTQ with memory bounded by one transformer block, resumable after a kill.

    x_0 = embed[calibration ids]      (only those rows are read from the memory-mapped embedding)
    for block i:
        if work_dir/block_i is committed: read its packed weights and x_{i+1}; continue
        read block i's tensors from the checkpoint's memory maps (float32)
        quantize it on x_i exactly as the in-memory pass does (`layerwise.quantize_block`)
        commit work_dir/block_i atomically: packed weights + x_{i+1} (temp dir + rename)
        drop the block
    save_packed: the checkpoint is written part by part (the final norm, the embedding,
        each block from work_dir, then the LM head), never holding the whole packed model
    stream_sensitivity: a bit plan's sensitivity table (`quant/bit_alloc.py`) from the same
        memory maps, one fp block at a time, before the blocks are quantized

Peak memory is one float block plus the calibration activations `[N, T, D]`; the packed
blocks already done stay on disk, not in memory. On a mesh (one process, several devices:
a GPU host, a TPU VM) each block is read onto the mesh with the model's partition rules
(`models/sharding.py`) and the activations are split like the in-memory pass's (the hidden
dimension over "model"), so each device holds its share of one block. A killed run restarts at the
first block
without a committed directory; since each committed block stores the exact
float32 activations it produced, the resumed run computes bit for bit what an uninterrupted
run computes. `work_dir/state.json` records the settings; a work dir made with other settings
is refused (not silently mixed).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import resource
import shutil
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qdlm_jax.checkpoints import orbax_format
from qdlm_jax.checkpoints.hf import CheckpointDir, check_tensors, key_map, read_tensors
from qdlm_jax.errors import CheckpointError
from qdlm_jax.fsutil import atomic_write_text
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.params import ParamPath, block_from_params, cast_floats, flatten
from qdlm_jax.models.sharding import activation_sharding, param_sharding
from qdlm_jax.quant.bit_alloc import BudgetSpec, Head, block_sensitivity, sensitivity_batch
from qdlm_jax.quant.block import block_inputs_from_x
from qdlm_jax.quant.calibration import CalibBatch
from qdlm_jax.quant.layerwise import PTQSpec, progress_bar, quantize_block
from qdlm_jax.quant.quantizer_core import QuantSpec

ACTIVATIONS = "x_next.npy"


def can_stream(model_path: str | Path) -> bool:
    """Streaming reads a hub checkpoint directory's memory maps (not an orbax checkpoint)."""
    p = Path(model_path)
    return (p / "config.json").is_file() and not orbax_format.is_qdlm_checkpoint(p)


def config_shim(config: ModelConfig):
    """What `build_calibration` reads of a model for the clean and masked feeders."""
    return types.SimpleNamespace(config=config)


def _settings_hash(src: Path, calib: CalibBatch, spec: PTQSpec, mesh=None) -> str:
    h = hashlib.sha256()
    layout = None if mesh is None else dict(mesh.shape)  # a resumed run keeps the same mesh
    h.update(json.dumps({"src": str(src.resolve()), "spec": dataclasses.asdict(spec),
                         **({"mesh": layout} if layout else {})},
                        sort_keys=True, default=str).encode())
    for a in (calib.ids, calib.attention_mask, calib.token_weights):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _embedded(ckpt: CheckpointDir, mappings, ids) -> np.ndarray:
    """The embeddings of `ids` [N, T] in float32: only those rows of the memory-mapped
    embedding are read, and its file pages are dropped after."""
    x = np.asarray(ckpt.get(next(m.hf_name for m in mappings if m.path == ("embed",)))[
        np.asarray(ids)], np.float32)
    ckpt.drop_resident()
    return x


def _read_block(ckpt: CheckpointDir, mappings, config: ModelConfig, index: int, mesh=None):
    """Block `index` in float32 (on `mesh` with the partition rules when given); its file
    pages are dropped once it is copied out."""
    block = block_from_params(config, index, read_tensors(
        ckpt, [m for m in mappings if m.path[:2] == ("layers", index)], dtype="float32",
        sharding_fn=None if mesh is None else param_sharding(mesh)))
    ckpt.drop_resident()
    return block


def stream_sensitivity(src: str | Path, windows: np.ndarray, spec: BudgetSpec,
                       weight_spec: QuantSpec, *, progress: bool = True
                       ) -> tuple[np.ndarray, list[int]]:
    """The bit plan's sensitivity table (`bit_alloc.block_sensitivity`) of the hub
    checkpoint `src`, reading one fp block at a time from its memory maps (and the embedding
    rows of the windows, the final norm and the LM head), as the in-memory pass computes it."""
    ckpt = CheckpointDir(Path(src))
    mappings = key_map(ckpt.config)
    check_tensors(ckpt, mappings)
    config = ckpt.config.replace(param_dtype="float32", dtype="float32")
    batch = sensitivity_batch(windows, config.mask_token_id, spec)
    x = _embedded(ckpt, mappings, batch.ids)
    outer = read_tensors(ckpt, [m for m in mappings if m.path[0] in ("final_norm", "lm_head")],
                         dtype="float32")
    ckpt.drop_resident()
    head = Head(outer[("final_norm", "scale")], outer[("lm_head", "kernel")],
                config.rms_norm_eps)
    blocks = (_read_block(ckpt, mappings, config, i) for i in range(config.num_layers))
    return block_sensitivity(blocks, block_inputs_from_x(x, config, batch), head, weight_spec,
                             spec.widths, progress=progress)


def claim_work_dir(work: Path, settings: str, **record) -> None:
    """Starts or resumes a streamed run in `work`: a work dir whose state.json records other
    settings is refused (never silently mixed); a new one records `settings` (and `record`);
    a killed run's unfinished temp dirs (`.block_*`, `.staging_*`) are removed."""
    state_file = work / "state.json"
    if state_file.is_file():
        recorded = json.loads(state_file.read_text()).get("settings")
        if recorded != settings:
            raise CheckpointError(f"{work}: holds a streaming run with other settings "
                                  f"({recorded} != {settings}); remove it or use another "
                                  "out_dir")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_file, json.dumps({"settings": settings, **record}))
    for leftover in list(work.glob(".block_*")) + list(work.glob(".staging_*")):
        shutil.rmtree(leftover, ignore_errors=True)


def quantize_streaming(src: str | Path, calib: CalibBatch, spec: PTQSpec,
                       work_dir: str | Path, *, progress: bool = True,
                       timings: dict | None = None, mesh=None) -> tuple[ModelConfig, dict]:
    """Quantizes the hub checkpoint `src` block by block into `work_dir` (module docstring).
    Returns (float32 compute config, stats). `timings`, when given, collects per-block seconds
    for reading, quantizing (`layerwise.quantize_block`'s phases) and writing, with the peak
    resident (and device) memory after each block; each block's seconds are also kept in its
    `stats.json`. `mesh`: a `jax.sharding.Mesh` of this process's devices to quantize on
    (module docstring); a work dir is resumed only on the mesh shape it was started with."""
    if mesh is not None and not all(d.process_index == jax.process_index()
                                    for d in mesh.devices.flat):
        raise ValueError("quantize_streaming: the mesh spans several processes; streaming runs "
                         "on one process's devices (use the in-memory pass across hosts)")
    src, work = Path(src), Path(work_dir)
    ckpt = CheckpointDir(src)
    mappings = key_map(ckpt.config)
    check_tensors(ckpt, mappings)
    config = ckpt.config.replace(param_dtype="float32", dtype="float32")
    claim_work_dir(work, _settings_hash(src, calib, spec, mesh), layers=config.num_layers)
    stats = {"method": spec.method, "bits": spec.weight.bits,
             "group_size": spec.weight.group_size, "sym": spec.weight.sym, "layers": {},
             "resumed_at": None}
    if spec.block_bits is not None:
        stats["block_bits"] = list(spec.block_bits)
    t0 = time.time()
    place = (jnp.asarray if mesh is None  # activations between blocks
             else lambda a: jax.device_put(a, activation_sharding(mesh, a.shape)))
    x = place(_embedded(ckpt, mappings, calib.ids))
    inputs = block_inputs_from_x(x, config, calib)
    bar = progress_bar(spec, config.num_layers, progress)
    for i in range(config.num_layers):
        done = work / f"block_{i:04d}"
        if (done / ACTIVATIONS).is_file():
            x = place(np.load(done / ACTIVATIONS))
            stats["layers"][i] = json.loads((done / "stats.json").read_text())
            if timings is not None:
                timings.setdefault("blocks", []).append(
                    {"block": i, "resumed": True, **stats["layers"][i].get("seconds", {})})
            bar.update(bar.total // config.num_layers)
            continue
        if stats["resumed_at"] is None:
            stats["resumed_at"] = i
        t_read = time.time()
        block = _read_block(ckpt, mappings, config, i, mesh)
        t_quant = time.time()
        phases: dict = {}
        x, layer_stats = quantize_block(block, inputs, x, i, spec, bar=bar, timings=phases)
        if mesh is not None:  # the next block starts from the placement a resumed run gives
            x = place(x)
        t_write = time.time()
        layer_stats["seconds"] = {"read_s": t_quant - t_read, "quantize_s": t_write - t_quant,
                                  **phases}  # kept with the block: a resumed run reports it
        params = {("layers", i) + p: v for p, v in flatten(
            nnx.to_pure_dict(nnx.state(block, nnx.Param))).items()}
        # The block's packed weights and the activations it produced appear together: the
        # extra files are copied into the checkpoint's temp dir before its rename.
        staging = work / f".staging_{i:04d}"
        staging.mkdir(exist_ok=True)
        np.save(staging / ACTIVATIONS, np.asarray(x))
        (staging / "stats.json").write_text(json.dumps(layer_stats))
        orbax_format.save_checkpoint(done, config, params, overwrite=True,
                                     extra_files=[staging / ACTIVATIONS,
                                                  staging / "stats.json"], meta={"block": i})
        shutil.rmtree(staging)
        stats["layers"][i] = layer_stats
        layer_stats["seconds"]["write_s"] = time.time() - t_write
        if timings is not None:
            timings.setdefault("blocks", []).append({"block": i, **layer_stats["seconds"],
                                                     **memory_gib()})
        del block, params
        release_memory()
    bar.close()
    stats["time_s"] = time.time() - t0
    return config, stats


def release_memory() -> None:
    """Collects garbage and returns the C heap's free pages to the system (glibc's
    `malloc_trim`; a no-op elsewhere). Freed host buffers otherwise stay in the process's
    resident set: after writing an 8B packed model, 2.6 GiB resident, 0.4 GiB after this."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def memory_gib() -> dict:
    """Peak resident memory of this process so far, the current resident set split into
    anonymous memory and file pages (Linux), and, where the backend reports it (GPU, TPU),
    the first local device's peak bytes in use, in GiB."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux
        status = []
    for line in status:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[f"{key[3:].lower()}_rss_gib"] = int(value.split()[0]) / 2**20  # kB
    try:
        mem = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        mem = {}
    if "peak_bytes_in_use" in mem:
        out["device_peak_gib"] = mem["peak_bytes_in_use"] / 2**30
    return out


def _finished_block(work: Path, i: int) -> Path:
    done = work / f"block_{i:04d}"
    if not (done / ACTIVATIONS).is_file():
        raise CheckpointError(f"{done}: block {i} is not finished; run the quantization "
                              "again to resume it")
    return done


def outer_params(ckpt: CheckpointDir, mappings, names: tuple[str, ...]) -> dict:
    """The non-block tensors whose first path entry is in `names` ("embed", "final_norm",
    "lm_head"; absent ones, e.g. a tied head, are skipped), in the stored dtype; their file
    pages are dropped once copied."""
    params = read_tensors(ckpt, [m for m in mappings if m.path[0] in names])
    ckpt.drop_resident()
    return params


def assemble(src: str | Path, work_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(config in the source dtype, full params): the packed blocks of `work_dir` with the
    source checkpoint's embedding, final norm and LM head (stored dtype). Holds the whole
    packed model; `save_packed` writes it to disk holding one block at a time."""
    src, work = Path(src), Path(work_dir)
    ckpt = CheckpointDir(src)
    mappings = key_map(ckpt.config)
    params: dict[ParamPath, object] = outer_params(
        ckpt, mappings, tuple({m.path[0] for m in mappings} - {"layers"}))
    for i in range(ckpt.config.num_layers):
        params.update(orbax_format.load_checkpoint(_finished_block(work, i))[1])
    dtype = np.dtype(params[("embed",)].dtype).name
    return ckpt.config.replace(param_dtype=dtype, dtype=dtype), params


def save_packed(src: str | Path, work_dir: str | Path, dest: str | Path, *,
                extra_files=(), meta: dict | None = None, progress: bool = True
                ) -> ModelConfig:
    """Writes the packed model of `work_dir` to the checkpoint `dest` (atomically) one part
    at a time: the final norm, the embedding, each packed block, then the LM head. Holds at
    most one part (the embedding, the head or one block) besides what orbax copies of it,
    never the whole model. Unquantized float tensors are stored in the source dtype, so `dest`
    loads to what `assemble` with `cast_floats` to that dtype holds. Returns the config."""
    src, work = Path(src), Path(work_dir)
    ckpt = CheckpointDir(src)
    mappings = key_map(ckpt.config)
    for i in range(ckpt.config.num_layers):
        _finished_block(work, i)  # refuse before writing anything
    dtype = np.dtype(ckpt.get(next(m.hf_name for m in mappings
                                   if m.path == ("embed",))).dtype).name
    config = ckpt.config.replace(param_dtype=dtype, dtype=dtype)
    first = outer_params(ckpt, mappings, ("final_norm",))  # small: nothing big stays held

    def rest():  # each part is released before the next is read
        yield outer_params(ckpt, mappings, ("embed",))
        for i in tqdm(range(config.num_layers), desc=f"writing {Path(dest).name}",
                      unit="block", disable=not progress):
            release_memory()
            yield cast_floats(orbax_format.load_checkpoint(_finished_block(work, i))[1], dtype)
        release_memory()
        if any(m.path[0] == "lm_head" for m in mappings):  # absent when tied to the embedding
            yield outer_params(ckpt, mappings, ("lm_head",))

    orbax_format.save_checkpoint(dest, config, first, parts=rest(), extra_files=extra_files,
                                 overwrite=True, meta=meta)
    release_memory()
    return config
