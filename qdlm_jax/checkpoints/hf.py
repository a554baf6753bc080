"""Hugging Face checkpoint directory <-> our Flax params, streaming tensor by tensor.

Reading: `config.json` (model_type `llada`, `Dream` or `diffusion_gemma`) plus one of
  - `model.safetensors`,
  - sharded `*.safetensors` with `model.safetensors.index.json`,
  - `pytorch_model.bin` / sharded `pytorch_model-*.bin` (+ index), read through torch.
Each tensor is read as a memory-mapped view, its last two axes swapped if it is a Linear
weight or an expert tensor ([.., out, in] -> [.., in, out]), cast if a dtype is asked for,
and placed on its sharding; the PyTorch model is never built.

DiffusionGemma checkpoints may hold more than the key map: the vision tower (dropped, with one
line on stderr saying how many tensors: the port is text only) and the encoder's and LM
head's tied copies of decoder weights (each checked equal to its decoder twin, bit for bit,
before anything is read).

Writing (`save_hf`) produces the same layout back; reading what it wrote gives the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.checkpoints import diffusion_gemma, dream, llada
from qdlm_jax.checkpoints.keymap import ParamPath, TensorMapping, hub_shape
from qdlm_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from qdlm_jax.data.hf_tokenizer import SpecialIds, resolve_special_ids
from qdlm_jax.errors import CheckpointError, ConfigError
from qdlm_jax.fsutil import atomic_dir
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import DiffusionGemmaConfig

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers some exporters add that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Chunk of a tied-tensor comparison: bounds what the comparison holds in memory.
_COMPARE_BYTES = 1 << 26

AnyConfig = ModelConfig | DiffusionGemmaConfig

# One module per hub layout (by `config.family`): its tensor key map and config.json mapping.
LAYOUTS = {"llada": llada, "dream": dream, GEMMA_FAMILY: diffusion_gemma}


def key_map(config: AnyConfig) -> list[TensorMapping]:
    return LAYOUTS[config.family].key_map(config)


def _swap(a, transpose: bool):
    """Our layout <-> the hub's: the last two axes swapped (a view, no copy)."""
    return np.swapaxes(a, -1, -2) if transpose else a


def config_from_hf(hf: dict, *, source: str = "config.json",
                   directory: str | os.PathLike | None = None) -> AnyConfig:
    """Reads a hub `config.json` of LLaDA (`model_type: llada`), Dream (`Dream`) or
    DiffusionGemma (`diffusion_gemma`); the special ids are resolved from it and the other
    files of `directory` (`resolve_special_ids`: the generation config and the tokenizer
    files), from `hf` alone when `directory` is None."""
    return config_and_ids_from_hf(hf, source=source, directory=directory)[0]


def config_and_ids_from_hf(hf: dict, *, source: str = "config.json",
                           directory: str | os.PathLike | None = None
                           ) -> tuple[AnyConfig, SpecialIds]:
    """`config_from_hf` with the resolved `SpecialIds` (where each id came from)."""
    model_type = hf.get("model_type")
    if diffusion_gemma.is_hub_config(hf):
        family, layout = GEMMA_FAMILY, diffusion_gemma
        ids = diffusion_gemma.special_id_config(hf)
        vocab = diffusion_gemma.text_config(hf).get("vocab_size")
    else:
        family = next((f for f, m in LAYOUTS.items() if model_type == m.MODEL_TYPE), None)
        if family is None:
            raise ConfigError(f"{source}: unknown model_type={model_type!r}; expected 'llada' "
                              "(LLaDA), 'Dream' (Dream) or 'diffusion_gemma' (DiffusionGemma)")
        layout, ids = LAYOUTS[family], hf
        vocab = hf.get("embedding_size") or hf.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ConfigError(f"{source}: vocab_size={vocab!r}: expected a positive "
                          f"integer (model_type={model_type!r})")
    if directory is None:
        special = resolve_special_ids(Path(source).parent, family=family, vocab_size=vocab,
                                      config=ids, files=False)
    else:
        special = resolve_special_ids(directory, family=family, vocab_size=vocab, config=ids)
    return layout.config_from_hf(hf, special, source=source), special


def config_to_hf(config: AnyConfig) -> dict:
    """The hub `config.json` of `config`, in its family's own key names."""
    return LAYOUTS[config.family].config_to_hf(config)


def load_hf_config(path) -> AnyConfig:
    """Our `ModelConfig` from a hub checkpoint's `config.json` (and its sibling files for the
    special ids)."""
    return load_hf_config_and_ids(path)[0]


def load_hf_config_and_ids(path) -> tuple[AnyConfig, SpecialIds]:
    """`load_hf_config` with the resolved `SpecialIds` (read once, for the tokenizer too)."""
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_and_ids_from_hf(hf, source=str(path), directory=Path(path).parent)


def expected_shape(config: AnyConfig, path: ParamPath) -> tuple[int, ...]:
    """Shape of a param in our layout (kernels are [in, out])."""
    if config.family == GEMMA_FAMILY:
        return diffusion_gemma.expected_shape(config, path)
    c = config
    d, hd = c.hidden_size, c.head_dim
    if path == ("embed",):
        return (c.vocab_size, d)
    if path == ("lm_head", "kernel"):
        return (d, c.vocab_size)
    if path[-1] == "scale":
        return (d,)
    name, leaf = path[-2], path[-1]
    outs = {"q_proj": c.num_heads * hd, "k_proj": c.num_kv_heads * hd,
            "v_proj": c.num_kv_heads * hd, "o_proj": d, "gate_proj": c.intermediate_size,
            "up_proj": c.intermediate_size, "down_proj": d}
    ins = {"o_proj": c.num_heads * hd, "down_proj": c.intermediate_size}
    if leaf == "bias":
        return (outs[name],)
    return (ins.get(name, d), outs[name])


# ---- reading -------------------------------------------------------------------------------

class _TorchBinFile:
    """The same interface as SafetensorsFile over a `pytorch_model*.bin` (needs torch)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .bin checkpoints needs PyTorch "
                                  "(`pip install torch`), or convert it to safetensors") from None
        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({e})") from None

    def keys(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def dtype(self, name) -> np.dtype:
        return self.get(name).dtype

    def get(self, name):
        import torch
        t = self._sd[name]
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def drop_resident(self):
        """Nothing to drop here: torch's memory map is not ours to advise."""

    def close(self):
        self._sd = None


class CheckpointDir:
    """The tensors of a HF checkpoint directory, looked up by name across shard files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: expected a checkpoint directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: missing config.json (expected a Hugging Face "
                                  "checkpoint directory)")
        self.config = load_hf_config(config_path)
        self.files, self.where = self._index()

    def drop_resident(self):
        """Drops the resident pages of every memory-mapped shard (`SafetensorsFile`)."""
        for f in self.files.values():
            f.drop_resident()

    def _index(self):
        p = self.path
        files: dict[str, object] = {}
        where: dict[str, str] = {}

        def add(fname, reader):
            if fname not in files:
                files[fname] = reader(p / fname)
            for k in files[fname].keys():
                where.setdefault(k, fname)

        for index_name, reader in ((SAFE_INDEX, SafetensorsFile), (BIN_INDEX, _TorchBinFile)):
            if (p / index_name).is_file():
                try:
                    weight_map = json.loads((p / index_name).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{p / index_name}: expected JSON with a 'weight_map' "
                                          f"({e})") from None
                for fname in sorted(set(weight_map.values())):
                    if not (p / fname).is_file():
                        raise CheckpointError(f"{p / index_name}: lists shard {fname!r}, which "
                                              f"is missing from {p}")
                    add(fname, reader)
                missing = [k for k, f in weight_map.items() if where.get(k) != f]
                if missing:
                    raise CheckpointError(f"{p / index_name}: tensor {missing[0]!r} is not in "
                                          f"shard {weight_map[missing[0]]!r}")
                return files, where
        safes = sorted(x.name for x in p.glob("*.safetensors"))
        bins = sorted(x.name for x in p.glob("pytorch_model*.bin"))
        if safes:
            for f in safes:
                add(f, SafetensorsFile)
        elif bins:
            for f in bins:
                add(f, _TorchBinFile)
        else:
            raise CheckpointError(f"{p}: no weights found (expected model.safetensors, sharded "
                                  f"*.safetensors with {SAFE_INDEX}, or pytorch_model*.bin)")
        return files, where

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def file_of(self, name: str) -> Path:
        return self.path / self.where[name]

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)


def extra_tensors(ckpt: CheckpointDir, mappings: Iterable[TensorMapping]
                  ) -> tuple[dict[str, str], list[str]]:
    """A DiffusionGemma checkpoint's tensors beyond its key map that are expected there:
    ({tied copy: its decoder twin}, [vision tower names]); nothing for the other families."""
    if ckpt.config.family != GEMMA_FAMILY:
        return {}, []
    mapped = {m.hf_name for m in mappings}
    twins, vision = {}, []
    for k in ckpt.keys():
        if k in mapped:
            continue
        if diffusion_gemma.is_vision_key(k):
            vision.append(k)
        elif (twin := diffusion_gemma.tied_twin(k, mapped)) is not None:
            twins[k] = twin
    return twins, sorted(vision)


def check_tied_twins(ckpt: CheckpointDir, twins: dict[str, str]) -> None:
    """Raises one CheckpointError naming the first tied copy (an encoder text weight, the LM
    head) whose bytes differ from its decoder twin; compared chunk by chunk from the memory
    maps."""
    for name, twin in sorted(twins.items()):
        a, b = ckpt.get(name), ckpt.get(twin)
        same = a.shape == b.shape and a.dtype == b.dtype
        if same and a.ndim:
            rows = max(1, _COMPARE_BYTES // max(1, a[:1].nbytes))
            for i in range(0, a.shape[0], rows):
                x = np.ascontiguousarray(a[i:i + rows]).view(np.uint8)
                y = np.ascontiguousarray(b[i:i + rows]).view(np.uint8)
                if not np.array_equal(x, y):
                    same = False
                    break
        elif same:
            same = a.tobytes() == b.tobytes()
        if not same:
            raise CheckpointError(f"{ckpt.file_of(name)}: "
                                  f"{diffusion_gemma.twin_mismatch(name, twin)}")


def check_tensors(ckpt: CheckpointDir, mappings: Iterable[TensorMapping]) -> None:
    """Raises one CheckpointError listing every missing, unexpected or misshaped tensor."""
    cfg = ckpt.config
    mappings = list(mappings)
    problems = []
    wanted = set()
    twins, vision = extra_tensors(ckpt, mappings)
    expected_extra = set(twins) | set(vision)
    for m in mappings:
        wanted.add(m.hf_name)
        want = hub_shape(expected_shape(cfg, m.path), m.transpose)
        if m.hf_name not in ckpt.where:
            problems.append(f"missing tensor {m.hf_name!r} (expected shape {list(want)})")
            continue
        found = ckpt.shape(m.hf_name)
        if tuple(found) != tuple(want):
            problems.append(f"{ckpt.file_of(m.hf_name)}: tensor {m.hf_name!r} has shape "
                            f"{list(found)}, expected {list(want)} from config.json")
    for k in ckpt.keys():
        if k not in wanted and k not in expected_extra and not k.endswith(_IGNORED_SUFFIXES) \
                and not (cfg.family == GEMMA_FAMILY and diffusion_gemma.is_ignored_key(k)):
            problems.append(f"{ckpt.file_of(k)}: unexpected tensor {k!r} (not part of the "
                            f"{cfg.family} layout with {cfg.num_layers} layers)")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match config.json: "
                              + "; ".join(problems[:5]) + more)


def load_hf_params(path: str | os.PathLike, *, dtype: str | None = None,
                   sharding_fn: Callable[[ParamPath, tuple], jax.sharding.Sharding] | None = None,
                   progress: bool = False) -> tuple[AnyConfig, dict[ParamPath, jax.Array]]:
    """Reads a HF checkpoint directory into {param path: array}, one tensor at a time.

    `dtype` casts float tensors (e.g. "float32"); `sharding_fn(path, shape)` gives the
    sharding each tensor is placed on directly (None: the default device). Every check
    (shapes, tied copies) runs before the first tensor is read.
    """
    ckpt = CheckpointDir(path)
    config = ckpt.config
    mappings = key_map(config)
    check_tensors(ckpt, mappings)
    twins, vision = extra_tensors(ckpt, mappings)
    check_tied_twins(ckpt, twins)
    if vision:
        print(f"[qdlm] {ckpt.path}: dropped {len(vision)} vision tower tensors "
              f"({', '.join(p + '*' for p in diffusion_gemma.VISION_PREFIXES)}): "
              "DiffusionGemma is loaded "
              "text only", file=sys.stderr, flush=True)
    if dtype is None:
        # Keep the tensors as stored (bit-exact round trip); record what they are.
        stored = np.dtype(ckpt.get(mappings[0].hf_name).dtype).name
        dtype = stored if stored in ("float32", "bfloat16", "float16") else config.param_dtype
        target = None
    else:
        target = np.dtype(jnp.dtype(dtype))
    config = config.replace(param_dtype=dtype, dtype=dtype)
    params = read_tensors(ckpt, mappings, dtype=None if target is None else dtype,
                          sharding_fn=sharding_fn, progress=progress)
    return config, params


def read_tensors(ckpt: CheckpointDir, mappings: Iterable[TensorMapping], *,
                 dtype: str | None = None,
                 sharding_fn: Callable[[ParamPath, tuple], jax.sharding.Sharding] | None = None,
                 progress: bool = False) -> dict[ParamPath, jax.Array]:
    """The tensors of `mappings` from the checkpoint's memory maps, one at a time, in our
    layout ([in, out] kernels), optionally cast (float tensors only) and placed on their
    shardings. Reading a subset (one block's tensors) touches only those bytes."""
    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    params = {}
    for m in tqdm(list(mappings), desc=f"reading {ckpt.path.name}", disable=not progress,
                  unit="tensor"):
        # a memory map: slicing it reads only those bytes
        view = _swap(ckpt.get(m.hf_name), m.transpose)

        def host(index=(), view=view):
            a = view[index]
            if target is not None and a.dtype != target and _is_float(a.dtype):
                a = a.astype(target)
            return np.ascontiguousarray(a)

        sharding = sharding_fn(m.path, view.shape) if sharding_fn is not None else None
        if sharding is not None and not sharding.is_fully_addressable:
            # Several processes on one global mesh: each reads only the slices it holds.
            params[m.path] = jax.make_array_from_callback(view.shape, sharding, host)
        elif sharding is not None:
            params[m.path] = jax.device_put(host(), sharding)
        else:
            params[m.path] = jnp.asarray(host())
        del view
    return params


def _is_float(dt: np.dtype) -> bool:
    return np.dtype(dt).kind == "f" or np.dtype(dt).name == "bfloat16"


# ---- writing -------------------------------------------------------------------------------

def save_hf(config: AnyConfig, params: dict[ParamPath, jax.Array], out_dir: str | os.PathLike,
            *, max_shard_bytes: int | None = None, extra_files: Iterable[Path] = (),
            overwrite: bool = False) -> Path:
    """Writes `config.json` + safetensors (one file, or shards + index) in the family's names.

    DiffusionGemma: the tensors transformers' `save_pretrained` writes for the text model
    (the decoder's, and the encoder's layer scalars), which
    `DiffusionGemmaForBlockDiffusion.from_pretrained` ties back to the encoder and LM head.
    `extra_files` (the tokenizer files, `generation_config.json`) are copied in. The
    directory appears only when complete (written to a temp dir, then renamed).
    """
    mappings = key_map(config)
    for m in mappings:
        if m.path not in params:
            raise CheckpointError(f"save_hf: params lack {'.'.join(map(str, m.path))} needed "
                                  f"for tensor {m.hf_name!r}")
    with atomic_dir(out_dir, overwrite=overwrite, extra_files=extra_files) as tmp:
        shards: list[list[TensorMapping]] = [[]]
        size = 0
        for m in mappings:
            nbytes = int(np.prod(params[m.path].shape)) * np.dtype(params[m.path].dtype).itemsize
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(m)
            size += nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))])
        weight_map, total = {}, 0
        for fname, group in zip(names, shards):
            def tensors(group=group):
                for m in group:
                    arr = np.asarray(jax.device_get(params[m.path]))
                    yield m.hf_name, _swap(arr, m.transpose)
            items = list(tensors())
            total += sum(a.nbytes for _, a in items)
            write_safetensors(tmp / fname, items, metadata={"format": "pt"})
            weight_map.update({m.hf_name: fname for m in group})
            del items
        if len(shards) > 1:
            (tmp / SAFE_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    return Path(out_dir).absolute()


__all__ = ["CheckpointDir", "load_hf_params", "save_hf", "key_map", "expected_shape",
           "hub_shape", "check_tensors", "check_tied_twins", "extra_tensors",
           "config_and_ids_from_hf", "config_from_hf", "config_to_hf", "load_hf_config",
           "load_hf_config_and_ids"]
