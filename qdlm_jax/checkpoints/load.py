"""`load_model` and `load_tokenizer`: one entry point each for HF checkpoint directories, hub
ids and our own checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from qdlm_jax.checkpoints import gptq_format
from qdlm_jax.checkpoints import orbax_format as checkpoint
from qdlm_jax.checkpoints.hf import load_hf_config, load_hf_config_and_ids, load_hf_params
from qdlm_jax.data.hf_tokenizer import (
    CheckpointTokenizer,
    SpecialIds,
    load_hf_tokenizer,
)
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import DLLM
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig
from qdlm_jax.models.params import model_from_params
from qdlm_jax.models.sharding import param_sharding
from qdlm_jax.quant.act_kernel import inner_weight


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory as given, or a hub id ("GSAI-ML/LLaDA-8B-Instruct") resolved through
    the Hugging Face cache (`HF_HUB_CACHE` / `HF_HOME`): the cached snapshot when present,
    otherwise a download where a network exists (set `HF_HUB_OFFLINE=1` to never try)."""
    p = Path(path_or_id)
    text = str(path_or_id)
    if p.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return p
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return p
    # The cache location is read now (huggingface_hub reads its variables once, at import).
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise CheckpointError(f"{text}: no such local directory, and not in the Hugging Face "
                              "cache (HF_HUB_OFFLINE is set, so it is not downloaded)")
    try:
        return Path(snapshot_download(text, cache_dir=cache, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py"]))
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: one clear line)
        raise CheckpointError(f"{text}: no such local directory, not in the Hugging Face "
                              f"cache, and the download failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def not_a_checkpoint(p: Path) -> CheckpointError:
    """The error for a directory that holds no checkpoint this project reads."""
    return CheckpointError(f"{p}: not a model checkpoint (expected config.json of a Hugging "
                           f"Face checkpoint, or {checkpoint.CONFIG_FILE} of a `qdlm convert` "
                           "output)")


def load_params(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
                progress: bool = False):
    """(config, flat params) from a HF checkpoint dir, a hub id, or a `qdlm convert` output."""
    p = resolve_checkpoint(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    sharding_fn = param_sharding(mesh) if mesh is not None else None
    if checkpoint.is_qdlm_checkpoint(p):
        return checkpoint.load_checkpoint(p, dtype=dtype, sharding_fn=sharding_fn)
    if gptq_format.is_gptq_checkpoint(p):
        return gptq_format.load_gptq(p, dtype=dtype)
    if (p / "config.json").is_file():
        return load_hf_params(p, dtype=dtype, sharding_fn=sharding_fn, progress=progress)
    raise not_a_checkpoint(p)


def build_model(config: ModelConfig | DiffusionGemmaConfig, params: dict):
    """The model of `config`'s family holding exactly `params`: `DLLM` (LLaDA, Dream) or
    `DiffusionGemma`."""
    if config.family == GEMMA_FAMILY:
        return diffusion_gemma.model_from_params(config, params)
    return model_from_params(config, params)


def load_model(path: str | os.PathLike, *, dtype: str | None = None,
               mesh: Mesh | None = None,
               progress: bool = False) -> DLLM | diffusion_gemma.DiffusionGemma:
    """Loads a model from a local directory or a hub id (`resolve_checkpoint`): a `DLLM` for
    LLaDA and Dream, a `DiffusionGemma` for that family (text only). `dtype`
    ("float32"/"bfloat16") sets both param and compute dtype; `mesh` places every param
    straight onto its sharding (`models.sharding`)."""
    config, params = load_params(path, dtype=dtype, mesh=mesh, progress=progress)
    return build_model(config, params)


def read_model_config(path: str | os.PathLike) -> ModelConfig | DiffusionGemmaConfig:
    """The model config of a checkpoint (HF dir, hub id or qdlm) without reading any weights."""
    p = resolve_checkpoint(path)
    if checkpoint.is_qdlm_checkpoint(p):
        return checkpoint.read_config(p)
    if (p / "config.json").is_file():
        return load_hf_config(p / "config.json")
    raise not_a_checkpoint(p)


def read_generation_config(path: str | os.PathLike) -> dict:
    """A checkpoint's `generation_config.json` as a dict ({} when it has none): HF dir, hub
    id, or a `qdlm convert` / `qdlm quantize` output (which copies the file)."""
    f = resolve_checkpoint(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def load_tokenizer(path: str | os.PathLike) -> CheckpointTokenizer:
    """The tokenizer of a checkpoint (HF dir, hub id or `qdlm convert` / `qdlm quantize`
    output) as transformers loads it, with the special ids the model uses: resolved from the
    checkpoint's files for a HF dir (`data.hf_tokenizer.resolve_special_ids`), as stored in
    its config for a qdlm checkpoint (resolved when it was converted)."""
    p = resolve_checkpoint(path)
    if checkpoint.is_qdlm_checkpoint(p):
        special = SpecialIds.of_config(checkpoint.read_config(p), checkpoint.CONFIG_FILE)
    elif (p / "config.json").is_file():
        _, special = load_hf_config_and_ids(p / "config.json")
    else:
        raise not_a_checkpoint(p)
    return CheckpointTokenizer(load_hf_tokenizer(p), special, str(p))


def param_summary(params: dict) -> dict:
    """Logical parameter count, stored bytes (packed storage for quantized weights), and the
    bytes of the same parameters in bf16."""
    n = stored = 0
    for v in params.values():
        n += int(np.prod(inner_weight(v).shape))
        stored += sum(int(x.nbytes) for x in jax.tree.leaves(v))
    return {"params": n, "bytes": stored, "bf16_bytes": 2 * n}


def quantization_banner(path: str | os.PathLike, params: dict | None = None) -> str | None:
    """One line saying how a packed checkpoint was quantized and its size against bf16
    (None for a float checkpoint)."""
    p = Path(path)
    if not checkpoint.is_qdlm_checkpoint(p):
        return None
    meta = checkpoint.read_meta(p)
    if not meta.get("quantized"):
        return None
    q = meta.get("meta", {})
    if params is None:
        _, params = checkpoint.load_checkpoint(p)
    s = param_summary(params)
    act = q.get("act_bits", 16)
    group = q.get("group_size")
    plan = q.get("bit_plan")
    bits = q.get("bits", "?") if not plan else (
        f"{plan['mean_bits']:.3g} (blocks at {'/'.join(map(str, plan['bits']))} bits)")
    return (f"quantized: {q.get('method', '?')} W{bits}"
            f"{'' if act in (None, 16) else f'A{act}'} "
            f"{'per-channel' if group == -1 else f'g{group}'}, calibration "
            f"{q.get('calibration', '?')}; {s['bytes'] / 2**20:.1f} MiB = "
            f"{s['bytes'] / s['bf16_bytes']:.2f}x the bf16 size "
            f"({s['bf16_bytes'] / 2**20:.1f} MiB)")
