"""Between a model and its flat param dict {path tuple: array}.

Every pass in the project works on the flat dict or on `nnx.split` state; these helpers build
a model from params without ever allocating random weights (the graph comes from
`nnx.eval_shape`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import DLLM, Block, abstract_model

ParamPath = tuple  # e.g. ("layers", 3, "q_proj", "kernel"), as in nnx.to_pure_dict


def flatten(tree: dict, prefix: tuple = ()) -> dict[ParamPath, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[ParamPath, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def path_str(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)


def parse_path(s: str) -> ParamPath:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


def cast_floats(params: dict[ParamPath, object], dtype) -> dict[ParamPath, object]:
    """The plain float arrays (NumPy or JAX) of `params` cast to `dtype`; packed and other
    leaves as they are. Used to store the unquantized tensors in the source checkpoint's dtype."""
    return {p: v.astype(dtype) if isinstance(v, (np.ndarray, jax.Array))
            and jnp.issubdtype(v.dtype, jnp.floating) else v for p, v in params.items()}


def get_params(model: DLLM) -> dict[ParamPath, jax.Array]:
    """Flat {path: array} of the model's params (no copy)."""
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def model_from_params(config: ModelConfig, params: dict[ParamPath, object]) -> DLLM:
    """A model holding exactly `params`; raises if a path is missing or unexpected."""
    graphdef, state = nnx.split(abstract_model(config))
    expected = flatten(nnx.to_pure_dict(state))
    missing = sorted(path_str(p) for p in expected if p not in params)
    extra = sorted(path_str(p) for p in params if p not in expected)
    if missing or extra:
        raise KeyError(f"model_from_params: missing params {missing[:5]}, unexpected {extra[:5]}")
    nnx.replace_by_pure_dict(state, unflatten(params))
    return nnx.merge(graphdef, state)


def block_from_params(config: ModelConfig, index: int, params: dict[ParamPath, object]) -> Block:
    """Transformer block `index` holding exactly `params` (keys `("layers", index, ...)`),
    without building the rest of the model: the streaming pass holds one block at a time."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(config, index,
                                                             rngs=nnx.Rngs(0))))
    expected = flatten(nnx.to_pure_dict(state))
    local = {p[2:]: v for p, v in params.items() if p[:2] == ("layers", index)}
    missing = sorted(path_str(p) for p in expected if p not in local)
    extra = sorted(path_str(p) for p in local if p not in expected)
    if missing or extra or len(local) != len(params):
        raise KeyError(f"block_from_params(layers.{index}): missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    nnx.replace_by_pure_dict(state, unflatten(local))
    return nnx.merge(graphdef, state)
