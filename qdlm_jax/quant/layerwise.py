"""Layer-wise PTQ: quantize one transformer block at a time on its own calibration inputs.

    x_0 = embed(calibration ids)
    for block i:
        for group in (q,k,v) -> (o) -> (gate,up) -> (down):
            inputs of the group = block_i run on x_i with the earlier groups already quantized
            quantize the group's linears (RTN / GPTQ from a Hessian / AWQ scales + clipping)
        x_{i+1} = quantized block_i(x_i)

Peak memory is one block's calibration activations `[N, T, D]` (plus one group's captured
inputs when a method needs them) on top of the model. Params may be sharded over a mesh:
every step is a jitted function of the (sharded) block state.

Hessians are token-weighted, H = (2 / sum_j c_j) sum_j c_j x_j x_j^T, with c = 1 for plain
calibration and DLLMQuant's certainty-guided weights when the feeder provides them.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qdlm_jax.calibration.feeders import CalibBatch
from qdlm_jax.models.capture import Capture
from qdlm_jax.models.dllm import DLLM, rope_angles
from qdlm_jax.params import get_params, model_from_params
from qdlm_jax.quant.act_kernel import inner_weight, with_weight
from qdlm_jax.quant.gptq_core import gptq
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec
from qdlm_jax.quant.rtn import rtn_quantize_params

METHODS = ("rtn", "gptq", "awq")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
          ("down_proj",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQSpec:
    method: str  # rtn | gptq | awq
    weight: QuantSpec  # bits, group size, symmetry, clip ratio
    damp: float = 0.01  # GPTQ: dampening fraction of mean(diag H)
    block_size: int = 128  # GPTQ lazy-batch width
    act_order: bool = False  # GPTQ desc_act
    static_groups: bool = False  # GPTQ static groups
    awq_grid: int = 20  # AWQ: alpha grid points in [0, 1]
    awq_clip: bool = True  # AWQ: weight clipping search after scaling
    awq_tokens: int = 4096  # AWQ: calibration tokens used in the search
    chunk: int = 8  # calibration sequences per forward chunk

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")


# What a block run records at each requested hook point, per chunk, and how chunks combine.
CAPTURE_MODES = ("gram", "raw", "absmax", "minmax")


@functools.lru_cache(maxsize=64)
def _block_fn(graphdef, names, mode):
    """jit: (block state, x, key_bias, cos, sin, w) -> (y, {name: statistic of its input}):
    gram = token-weighted x^T x, raw = the input itself, absmax = per-channel max |x|,
    minmax = per-channel (min, max)."""

    def stat(v, w):
        v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
        if mode == "gram":
            return jnp.einsum("ti,tj->ij", v * w.reshape(-1, 1), v)
        if mode == "absmax":
            return jnp.max(jnp.abs(v), axis=0)
        return jnp.stack([jnp.min(v, axis=0), jnp.max(v, axis=0)])

    @jax.jit
    def run(state, x, key_bias, cos, sin, w):
        block = nnx.merge(graphdef, state)
        fn = (lambda v: v) if mode == "raw" else (lambda v: stat(v, w))
        cap = Capture(names=names, fn=fn)
        y = block(x, key_bias, cos, sin, cap)
        return y, cap.values

    return run


def _chunks(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _BlockRunner:
    """Runs one block over the calibration set in chunks, capturing a group's inputs."""

    def __init__(self, block, key_bias, cos, sin, weights, chunk):
        self.block, self.key_bias, self.cos, self.sin = block, key_bias, cos, sin
        self.weights, self.chunk = weights, chunk

    def run(self, x, names=(), weighted=True, mode=None):
        """(block output, {name: statistic}); `mode` one of CAPTURE_MODES (default: "gram"
        if `weighted` else "raw")."""
        mode = mode or ("gram" if weighted else "raw")
        graphdef, state = nnx.split(self.block)
        fn = _block_fn(graphdef, tuple(names), mode)
        ys, caps = [], []
        for a, b in _chunks(x.shape[0], self.chunk):
            kb = None if self.key_bias is None else self.key_bias[a:b]
            y, cap = fn(state, x[a:b], kb, self.cos[a:b], self.sin[a:b], self.weights[a:b])
            ys.append(y)
            caps.append(cap)
        y = jnp.concatenate(ys)
        if not names:
            return y, {}
        if mode == "gram":
            total = {n: sum(c[n] for c in caps) for n in names}
        elif mode == "raw":
            total = {n: jnp.concatenate([c[n] for c in caps]) for n in names}
        elif mode == "absmax":
            total = {n: functools.reduce(jnp.maximum, [c[n] for c in caps]) for n in names}
        else:
            total = {n: jnp.stack([jnp.min(jnp.stack([c[n][0] for c in caps]), axis=0),
                                   jnp.max(jnp.stack([c[n][1] for c in caps]), axis=0)])
                     for n in names}
        return y, total


def _weight(block, name):
    """The weight a block linear multiplies ([in, out]; inside an `ActKernel` if wrapped)."""
    return inner_weight(getattr(block, name).kernel[...])


def _set_kernel(block, name, value):
    """Sets a linear's weight, keeping an `ActKernel`'s input stage around it."""
    lin = getattr(block, name)
    lin.kernel.value = with_weight(lin.kernel[...], value)


def _stage(block, name, q: QuantizedArray, pending: dict):
    """Puts the dequantized weight in place for the rest of this block's calibration passes
    (same math as the packed matmul, and the block's jitted forward keeps one signature);
    the packed weight is installed by `_install` when the block is done."""
    _set_kernel(block, name, q.dequantize(_weight(block, name).dtype))
    pending[name] = q


def _install(block, pending: dict):
    for name, q in pending.items():
        _set_kernel(block, name, q)
    pending.clear()


def _quantize_gptq(block, names, gram, weight_sum, spec: PTQSpec, pending: dict):
    h = 2.0 * gram / weight_sum
    for name in names:
        kernel = _weight(block, name)
        w = kernel.T.astype(jnp.float32)  # [out, in]
        r = gptq(w, h, bits=spec.weight.bits, group_size=spec.weight.group_size,
                 sym=spec.weight.sym, damp=spec.damp, block_size=spec.block_size,
                 act_order=spec.act_order, static_groups=spec.static_groups)
        g_idx = r.g_idx if (spec.act_order and not spec.static_groups) else None
        q = QuantizedArray.from_codes(r.codes, r.scales, r.zeros, bits=spec.weight.bits,
                                      group_size=spec.weight.group_size, sym=spec.weight.sym,
                                      g_idx=g_idx, scale_dtype=kernel.dtype)
        _stage(block, name, q, pending)


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
    if spec.method == "rtn":
        qmodel = model_from_params(config, rtn_quantize_params(get_params(model), spec.weight))
        stats["time_s"] = time.time() - t0
        return qmodel, stats
    qmodel = model_from_params(config, dict(get_params(model)))  # a copy we may mutate
    if calib is None:
        raise ValueError(f"method={spec.method!r} needs calibration data")
    from qdlm_jax.quant import awq as awq_driver  # noqa: PLC0415 (optional dependency cycle)

    ids = jnp.asarray(calib.ids)
    n, t = ids.shape
    mask = jnp.asarray(calib.attention_mask)
    key_bias = jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
    if bool(jnp.all(mask == 1)):
        key_bias = None
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    cos, sin = rope_angles(pos, config.head_dim, config.rope_theta)
    weights = jnp.asarray(calib.token_weights, jnp.float32)
    weight_sum = float(weights.sum())
    x = jnp.take(qmodel.embed[...], ids, axis=0).astype(config.compute_dtype)

    bar = tqdm(total=config.num_layers * len(GROUPS), desc=f"{spec.method} W{spec.weight.bits}",
               disable=not progress)
    for i, block in enumerate(qmodel.layers):
        runner = _BlockRunner(block, key_bias, cos, sin, weights, spec.chunk)
        prefix = f"layers.{i}."
        y_fp, _ = runner.run(x)
        layer_stats, pending = {}, {}
        if spec.method == "awq":
            layer_stats["awq"] = awq_driver.quantize_block(block, runner, x, prefix, spec,
                                                           pending, seed=i)
            bar.update(len(GROUPS))
        else:
            for group in GROUPS:
                names = tuple(prefix + g for g in group)
                _, grams = runner.run(x, names[:1], weighted=True)
                _quantize_gptq(block, group, grams[names[0]], weight_sum, spec, pending)
                bar.update(1)
        x_next, _ = runner.run(x)
        _install(block, pending)
        layer_stats["block_out_rel_err"] = float(jnp.linalg.norm(x_next - y_fp)
                                                 / jnp.linalg.norm(y_fp))
        stats["layers"][i] = layer_stats
        x = x_next
    bar.close()
    stats["time_s"] = time.time() - t0
    return qmodel, stats
