"""Weight-activation PTQ, block by block: RTN baseline, SmoothQuant, QuaRot, DuQuant.

    quarot:  params <- quarot.rotate(params)   (norms folded, residual stream rotated,
                                                online Hadamards on o_proj / down_proj inputs)
    x_0 = embed(calibration ids)
    for block i:
        smoothquant / duquant, group by group (q,k,v) -> (o) -> (gate,up) -> (down):
            m = per-channel max |input| on x_i;  s = smooth_scales(m, W, alpha)
            fold 1/s into the producer (RMSNorm weight or the producing linear's outputs;
            o_proj is skipped with GQA, where no exact fold exists), W <- W * s
            duquant: T = R1 P R2 from m / s (duquant_core); W <- T^T W, T applied online
        weights: RTN on the configured grid, or GPTQ on Hessians of the inputs the weights
                 really see (after the online transforms, activations in float)
        activations: every linear's input quantized per token or per group of input
                 channels (dynamic) or per tensor (static range calibrated here), after its
                 online transform (so groups cut the rotated / smoothed input)
        K/V (`kv`, every method): keys after RoPE and values quantized inside attention
                 (`kv_core`); quarot first rotates q and k by H_hd online (`kv_rotate`);
                 IA-AQ (`iaaq`) searches each kv head's clip ratio of V (and of K with
                 `iaaq_keys`) against the importance-weighted attention-output error on
                 the calibration inputs, with this block's quantized weights and inputs
        x_{i+1} = quantized block_i(x_i)

The attention products (Q K^T, P V) are computed in floating point from the (fake-)
quantized keys and values; queries and probabilities are not quantized. The LM head stays in
floating point unless `quantize_lm_head`. With `weight=None` and `act=None` only the
transforms are applied: the float model computes the
same function (the invariance the tests check).
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

from qdlm_jax.models.dllm import DLLM
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import duquant_core, kv_core, quarot, smoothquant_core
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel, OnlineTransform, inner_weight
from qdlm_jax.quant.block import (
    GROUPS,
    PRODUCERS,
    BlockRunner,
    block_inputs,
    fold,
    foldable,
    install,
    placeholder_calibration,
    quantize_gptq,
    stage,
    weight,
)
from qdlm_jax.quant.calibration import CalibBatch
from qdlm_jax.quant.gptq_core import hessian
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec

WA_METHODS = ("rtn", "smoothquant", "quarot", "duquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WASpec:
    method: str  # rtn | smoothquant | quarot | duquant
    weight: QuantSpec | None  # None: weights stay in float
    act: ActSpec | None  # None: activations stay in float
    weight_quantizer: str = "rtn"  # rtn | gptq
    alpha: float = 0.5  # smoothing migration strength (smoothquant, duquant)
    block: int = 128  # duquant rotation block
    rotation_steps: int = 256  # duquant greedy steps per block
    online_heads: bool = True  # quarot: mix heads online before o_proj
    quantize_lm_head: bool = False
    seed: int = 0  # quarot signs, duquant rotations
    damp: float = 0.01  # GPTQ
    block_size: int = 128  # GPTQ
    chunk: int = 8  # calibration sequences per forward chunk
    kv: kv_core.KVSpec | None = None  # K/V quantization inside attention (None: float)
    kv_rotate: bool | None = None  # Hadamard on q, k before K quantization (None: quarot)
    iaaq: bool = False  # DLLMQuant's IA-AQ clip search for V
    iaaq_keys: bool = False  # ... and for K
    iaaq_grid: int = 10  # clip ratios 1.0 .. iaaq_lowest
    iaaq_lowest: float = 0.55

    def __post_init__(self):
        if self.iaaq and self.kv is None:
            raise ValueError("IA-AQ (iaaq=True) searches K/V quantization parameters: set "
                             "the K/V bits (kv) to 8 or 4")
        if self.method not in WA_METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {WA_METHODS}")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer={self.weight_quantizer!r}: expected one of "
                             f"{WEIGHT_QUANTIZERS}")
        if self.block <= 0 or self.block & (self.block - 1):
            raise ValueError(f"DuQuant block={self.block}: expected a power of two")

    @property
    def needs_calibration(self) -> bool:
        """Smoothing and DuQuant read activation ranges, GPTQ reads Hessians, static
        activation ranges are calibrated; RTN weights with dynamic activations need nothing."""
        return (self.method in ("smoothquant", "duquant") or self.weight_quantizer == "gptq"
                or (self.act is not None and self.act.granularity == "per_tensor")
                or self.iaaq)

    @property
    def rotate_keys(self) -> bool:
        return self.method == "quarot" if self.kv_rotate is None else self.kv_rotate


def _wrap_transform(block, name, t: OnlineTransform):
    w = weight(block, name)
    getattr(block, name).kernel.value = ActKernel(weight=t.pair_weight(w).astype(w.dtype),
                                                  transform=t)


def _transform_block(block, runner, x, prefix, spec: WASpec, seed: int) -> dict:
    """Smoothing (and DuQuant's rotations) for every group of one block. The folds and
    rotations are exact, so each group's input statistics are those of the float block and
    one capture run serves all four groups."""
    info = {}
    names = tuple(prefix + g[0] for g in GROUPS)
    _, cap = runner.run(x, names, mode="absmax")
    for group in GROUPS:
        producer, kind = PRODUCERS[group]
        m = cap[prefix + group[0]]
        entry = {"act_absmax": float(jnp.max(m))}
        if foldable(block, group, producer, kind):
            s = smoothquant_core.smooth_scales(m, [weight(block, n).T for n in group],
                                               alpha=spec.alpha)
            fold(block, group, producer, kind, s)
            m = m / s
            entry["smoothed_absmax"] = float(jnp.max(m))
        else:
            entry["note"] = "no exact smoothing fold (GQA v -> o): not smoothed"
        if spec.method == "duquant":
            r1, perm, r2 = duquant_core.dual_transform(np.asarray(m), block=spec.block,
                                                       steps=spec.rotation_steps, seed=seed)
            t = OnlineTransform(kind="duquant", r1=jnp.asarray(r1), perm=jnp.asarray(perm),
                                r2=jnp.asarray(r2))
            for n in group:
                _wrap_transform(block, n, t)
        info[group[0]] = entry
    return info


def _quantize_weights(block, runner, x, prefix, spec: WASpec, weight_sum, pending):
    ws = spec.weight
    for group in GROUPS:
        if spec.weight_quantizer == "gptq":
            names = tuple(prefix + g for g in group)
            _, grams = runner.run(x, names[:1], mode="gram")
            quantize_gptq(block, group, hessian(grams[names[0]], weight_sum), ws, pending,
                          damp=spec.damp, block_size=spec.block_size)
        else:
            for name in group:
                w = weight(block, name)
                stage(block, name, QuantizedArray.quantize(w, ws, scale_dtype=w.dtype), pending)


def _add_act_quant(block, runner, x, prefix, act: ActSpec):
    names = [n for g in GROUPS for n in g]
    ranges = {}
    if act.granularity == "per_tensor":
        _, cap = runner.run(x, tuple(prefix + n for n in names), mode="minmax")
        ranges = {n: jnp.stack([jnp.min(cap[prefix + n][0]), jnp.max(cap[prefix + n][1])])
                  for n in names}
    for n in names:
        lin = getattr(block, n)
        k = lin.kernel[...]
        base = k if isinstance(k, ActKernel) else ActKernel(weight=k)
        lin.kernel.value = base.replace(act=act, act_range=ranges.get(n))


@functools.lru_cache(maxsize=16)
def _qkv_fn(graphdef):
    """jit: (block state, x, cos, sin) -> q, k (after RoPE and the block's attention
    stage), v, as attention computes them."""

    @jax.jit
    def run(state, x, cos, sin):
        block = nnx.merge(graphdef, state)
        return block.qkv(block.attn_norm(x), cos, sin)

    return run


def _set_kv(lin, kv, clip, rotate=False):
    k = lin.kernel[...]
    base = k if isinstance(k, ActKernel) else ActKernel(weight=k)
    lin.kernel.value = base.replace(kv=kv, kv_clip=clip, kv_rotate=rotate)


def _add_kv_quant(block, inputs, x, spec: WASpec) -> dict:
    """K/V quantization of one block; with IA-AQ, each kv head's clip ratios are searched on
    the calibration inputs `x` (kv_core: importance-weighted attention-output error)."""
    kv, rotate = spec.kv, spec.rotate_keys
    if not spec.iaaq:
        _set_kv(block.k_proj, kv, None, rotate)
        _set_kv(block.v_proj, kv, None)
        return {}
    grid = kv_core.default_grid(spec.iaaq_grid, spec.iaaq_lowest)
    _set_kv(block.k_proj, None, None, rotate)  # float q, k, v as attention will see them
    _set_kv(block.v_proj, None, None)
    graphdef, state = nnx.split(block)
    fn = _qkv_fn(graphdef)
    chunks = [(a, min(a + spec.chunk, x.shape[0])) for a in range(0, x.shape[0], spec.chunk)]

    def parts(a, b):
        q, k, v = fn(state, x[a:b], inputs.cos[a:b], inputs.sin[a:b])
        bias = None if inputs.key_bias is None else inputs.key_bias[a:b]
        return q, k, v, bias

    info = {"grid": [float(g) for g in grid]}
    n_kv = block.config.num_kv_heads
    clip_k = jnp.ones((n_kv,), jnp.float32)
    if spec.iaaq_keys:
        err_k = sum(kv_core.k_errors(q, k, v, kv, grid, bias)
                    for q, k, v, bias in (parts(a, b) for a, b in chunks))
        clip_k = kv_core.best_clip(err_k, grid)
        info["k_clip"] = np.asarray(clip_k).tolist()
        info["k_err_ratio"] = float(jnp.sum(jnp.min(err_k, 0)) / jnp.sum(err_k[0]))
    err_v = 0.0
    for a, b in chunks:
        q, k, v, bias = parts(a, b)
        err_v = err_v + kv_core.v_errors(q, k, v, kv, grid, bias,
                                         k_hat=kv_core.kv_fake_quant(k, kv, clip_k))
    clip_v = kv_core.best_clip(err_v, grid)
    info["v_clip"] = np.asarray(clip_v).tolist()
    info["v_err_ratio"] = float(jnp.sum(jnp.min(err_v, 0)) / jnp.sum(err_v[0]))
    _set_kv(block.k_proj, kv, clip_k if spec.iaaq_keys else None, rotate)
    _set_kv(block.v_proj, kv, clip_v)
    return info


def check_act_widths(model: DLLM, spec: WASpec) -> None:
    """ValueError naming the first linear whose input width the activation group size
    (`per_group`) does not divide (the transforms keep every width, so the float model's
    widths are the ones quantized), or when K/V channel groups do not divide the head dim."""
    kv, hd = spec.kv, model.config.head_dim
    if kv is not None and kv.granularity == "per_channel_group" and hd % kv.group_size:
        raise ValueError(f"KVSpec.group_size={kv.group_size} does not divide the head dim "
                         f"{hd} (per_channel_group); use a divisor of {hd}")
    if spec.act is None:
        return
    linears = [(f"layers.0.{n}", getattr(model.layers[0], n)) for g in GROUPS for n in g]
    linears += [("lm_head", model.lm_head)] if spec.quantize_lm_head else []
    for name, lin in linears:
        spec.act.check_width(inner_weight(lin.kernel[...]).shape[0], name)


def quantize_model_wa(model: DLLM, calib: CalibBatch | None, spec: WASpec, *,
                      progress: bool = True) -> tuple[DLLM, dict]:
    """Returns (transformed and quantized model, stats). The input model is not modified."""
    t0 = time.time()
    config = model.config
    check_act_widths(model, spec)
    stats = {"method": spec.method, "weight_bits": spec.weight and spec.weight.bits,
             "act_bits": spec.act and spec.act.bits, "kv_bits": spec.kv and spec.kv.bits,
             "iaaq": spec.iaaq, "layers": {}}
    params = dict(get_params(model))
    if spec.method == "quarot":
        params, stats["quarot"] = quarot.rotate(params, config, seed=spec.seed,
                                                online_heads=spec.online_heads)
    qmodel = model_from_params(config, params)
    if spec.needs_calibration and calib is None:
        raise ValueError(f"method={spec.method!r} with these settings needs calibration data")
    inputs = block_inputs(qmodel.embed[...], config, calib or placeholder_calibration(config))
    x = inputs.x

    label = f"{spec.method} W{spec.weight.bits if spec.weight else 16}A" \
            f"{spec.act.bits if spec.act else 16}"
    for i, block in enumerate(tqdm(qmodel.layers, desc=label, unit="block", disable=not progress)):
        runner = BlockRunner(block, inputs, spec.chunk)
        prefix = f"layers.{i}."
        layer_stats, pending = {}, {}
        if spec.method in ("smoothquant", "duquant"):
            layer_stats["transform"] = _transform_block(block, runner, x, prefix, spec,
                                                        seed=spec.seed + 1000 * i)
        if spec.weight is not None:
            _quantize_weights(block, runner, x, prefix, spec, inputs.weight_sum, pending)
            install(block, pending)
        if spec.act is not None:
            _add_act_quant(block, runner, x, prefix, spec.act)
        if spec.kv is not None:
            layer_stats["kv"] = _add_kv_quant(block, inputs, x, spec)
        x, _ = runner.run(x)
        stats["layers"][i] = layer_stats
    if spec.quantize_lm_head and (spec.weight is not None or spec.act is not None):
        head = qmodel.lm_head
        w = inner_weight(head.kernel[...])
        if spec.weight is not None:
            w = QuantizedArray.quantize(w, spec.weight, scale_dtype=w.dtype)
        if spec.act is not None and spec.act.granularity == "per_tensor":
            raise ValueError("quantize_lm_head with per_tensor activations is not supported; "
                             "use per_token or per_group")
        head.kernel.value = ActKernel(weight=w, act=spec.act)
    stats["time_s"] = time.time() - t0
    return qmodel, stats
