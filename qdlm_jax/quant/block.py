"""One transformer block under PTQ: what the weight-only and weight-activation drivers share.

- `block_inputs`: the calibration batch turned into the first block's input (embeddings),
  its key-padding bias, RoPE angles and per-token Hessian weights.
- `BlockRunner`: runs one block over the calibration set in chunks (jitted), capturing a
  statistic of chosen linears' inputs (Gram matrix, raw inputs, absmax, min/max).
- staging: a quantized linear's dequantized weight is put in place for the rest of the
  block's calibration passes (`stage`); the packed weights are installed when the block is
  done (`install`), so the block's jitted forward keeps one signature meanwhile.
- folding: a per-channel scale s moves between a linear group's input producer (an RMSNorm
  or the producing linear's output channels) and the group's weights, `x / s` and `W * s`,
  leaving the float block unchanged (AWQ, SmoothQuant, DuQuant).
- `quantize_gptq`: GPTQ on a group of linears that share one input Hessian.
- `quantize_daq`: Quant-dLLM's DAQ + ABMP (binary planes) on such a group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdlm_jax.models.capture import Capture
from qdlm_jax.models.config import ModelConfig
from qdlm_jax.models.dllm import rope_angles
from qdlm_jax.quant import awq_core, daq_core
from qdlm_jax.quant.act_kernel import inner_weight, with_weight
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.calibration import CalibBatch
from qdlm_jax.quant.gptq_core import gptq, hessian
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec

# The linears of a block in calibration order; each group shares one input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
          ("down_proj",))
# group -> (producer of the group's input, kind): where a per-channel input scale folds.
PRODUCERS = {
    ("q_proj", "k_proj", "v_proj"): ("attn_norm", "norm"),
    ("o_proj",): ("v_proj", "linear"),
    ("gate_proj", "up_proj"): ("mlp_norm", "norm"),
    ("down_proj",): ("up_proj", "linear"),
}


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """The first block's calibration input and what every block's forward needs with it."""

    x: jax.Array  # [N, T, D] embeddings of the calibration ids, compute dtype
    key_bias: jax.Array | None  # [N, T] additive attention bias; None when nothing is padded
    cos: jax.Array  # RoPE angles of positions 0..T-1
    sin: jax.Array
    token_weights: jax.Array  # [N, T] float32 Hessian weights (1 unless certainty-guided)

    @property
    def weight_sum(self) -> float:
        return float(self.token_weights.sum())


def placeholder_calibration(config: ModelConfig) -> CalibBatch:
    """One all-mask row: drives the block loop of passes that need no calibration data."""
    one = np.ones((1, 8), np.int32)
    return CalibBatch(ids=one * config.mask_token_id, attention_mask=one,
                      is_masked=one.astype(bool), token_weights=one.astype(np.float32),
                      mask_ratio=np.ones((1,), np.float32))


def block_inputs(embed: jax.Array, config: ModelConfig, calib: CalibBatch) -> BlockInputs:
    """Embeds the calibration ids (`embed` [V, D]) and prepares the block forward's inputs."""
    x = jnp.take(embed, jnp.asarray(calib.ids), axis=0)
    return block_inputs_from_x(x, config, calib)


def block_inputs_from_x(x: jax.Array, config: ModelConfig, calib: CalibBatch) -> BlockInputs:
    """The block forward's inputs around given first-block activations `x` [N, T, D] (the
    streaming pass embeds only the calibration rows of a memory-mapped embedding)."""
    n, t = calib.ids.shape
    mask = jnp.asarray(calib.attention_mask)
    key_bias = None if bool(jnp.all(mask == 1)) else jnp.where(
        mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    cos, sin = rope_angles(pos, config.head_dim, config.rope_theta)
    return BlockInputs(x=jnp.asarray(x).astype(config.compute_dtype), key_bias=key_bias,
                       cos=cos, sin=sin,
                       token_weights=jnp.asarray(calib.token_weights, jnp.float32))


# What a block run records at each requested hook point, per chunk, and how chunks combine.
CAPTURE_MODES = ("gram", "raw", "absmax", "minmax")


def _gram(v, w):
    """Token-weighted Gram matrix sum_j w_j v_j v_j^T of inputs v [..., in] (fp32)."""
    v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
    return jnp.einsum("ti,tj->ij", v * w.reshape(-1, 1), v)


@functools.lru_cache(maxsize=64)
def _block_fn(graphdef, names, mode):
    """jit: (block state, x, key_bias, cos, sin, w) -> (y, {name: statistic of its input}):
    gram = token-weighted x^T x, raw = the input itself, absmax = per-channel max |x|,
    minmax = per-channel (min, max)."""

    def stat(v, w):
        if mode == "gram":
            return _gram(v, w)
        v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
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


class BlockRunner:
    """Runs one block over the calibration set in chunks, capturing a group's inputs."""

    def __init__(self, block, inputs: BlockInputs, chunk: int):
        self.block, self.key_bias, self.cos, self.sin = (block, inputs.key_bias, inputs.cos,
                                                         inputs.sin)
        self.weights, self.chunk = inputs.token_weights, chunk

    def run(self, x, names=(), weighted=True, mode=None):
        """(block output, {name: statistic}); `mode` one of CAPTURE_MODES (default: "gram"
        if `weighted` else "raw")."""
        mode = mode or ("gram" if weighted else "raw")
        graphdef, state = nnx.split(self.block)
        if not names:
            graphdef = _canonical_graphdef(self.block, graphdef, state)
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


_CANONICAL_GRAPHDEFS: dict = {}


def _canonical_graphdef(block, graphdef, state):
    """Blocks of one model differ only in their linears' hook-point names ("layers.i.q_proj"),
    which are static in the graphdef, so a function jitted per graphdef compiles again for
    every block. A function that records no hook point named by its caller runs every block
    on the first graphdef seen with the same config and state structure: one compilation."""
    key = (block.config, jax.tree.structure(state))
    return _CANONICAL_GRAPHDEFS.setdefault(key, graphdef)


@functools.lru_cache(maxsize=64)
def _stage_fns(graphdef):
    """The block forward cut at each linear group's input (jitted, per chunk), for
    `GroupGrams`. Each piece runs the block's own methods; a group's Gram matrix is recorded
    by the group's first linear through a `Capture` (what its weight multiplies), and that
    linear's output, unused, is dropped by XLA."""

    def gram_of(block, linear, v, w):
        cap = Capture(names=(linear.name,), fn=lambda u: _gram(u, w))
        linear(v, cap)
        return cap.values[linear.name]

    @jax.jit
    def qkv(state, x, w):  # attention input
        block = nnx.merge(graphdef, state)
        return gram_of(block, block.q_proj, block.attn_norm(x), w)

    @jax.jit
    def heads(state, x, key_bias, cos, sin, w):  # o_proj input (q, k, v quantized)
        block = nnx.merge(graphdef, state)
        out = block.attention_heads(block.attn_norm(x), key_bias, cos, sin, None)
        return out, gram_of(block, block.o_proj, out, w)

    @jax.jit
    def mlp_in(state, x, out, w):  # gate/up input (o quantized); h is the residual stream
        block = nnx.merge(graphdef, state)
        h = x + block.o_proj(out)
        n = block.mlp_norm(h)
        return h, n, gram_of(block, block.gate_proj, n, w)

    @jax.jit
    def down_in(state, n, w):  # down_proj input (gate, up quantized)
        block = nnx.merge(graphdef, state)
        return gram_of(block, block.down_proj, block.mlp_hidden(n), w)

    @jax.jit
    def down_in_kept(state, n, w):  # the same, also returning the MLP hidden activations
        block = nnx.merge(graphdef, state)
        hidden = block.mlp_hidden(n)
        return hidden, gram_of(block, block.down_proj, hidden, w)

    @jax.jit
    def output(state, h, n):  # the block's output (everything quantized)
        block = nnx.merge(graphdef, state)
        return h + block.down_proj(block.mlp_hidden(n))

    @jax.jit
    def output_kept(state, h, hidden):  # the same from the kept MLP hidden activations
        block = nnx.merge(graphdef, state)
        return h + block.down_proj(hidden)

    return qkv, heads, mlp_in, (down_in, down_in_kept), (output, output_kept)


# GroupGrams keeps the MLP's hidden activations silu(gate(n)) * up(n) [N, T, intermediate]
# between down_proj's Gram matrix and the block output when they take at most this many
# bytes (8 x 256 calibration tokens at LLaDA-8B's width: 96 MiB in fp32); larger calibration
# sets recompute them from n instead.
KEEP_HIDDEN_BYTES = 2**30


class GroupGrams:
    """GPTQ's sequential calibration of one block without rerunning the block per group.

    `gram(k)` returns the token-weighted Gram matrix of GROUPS[k]'s input, computed with the
    block's current weights, so with groups 0..k-1 already staged (quantized) when the caller
    goes in order; `output()` then gives the block's output with every group quantized. Each
    part of the block runs once: the attention heads' output (o_proj's input), the residual
    stream h, the MLP's normed input n and its hidden activations (`keep_hidden`; default:
    when they take at most KEEP_HIDDEN_BYTES, else `output` recomputes them from n) are kept
    between calls, per chunk. The four captures and the output then cost about one block
    forward plus the Gram matrices. The arithmetic is the full block forward's, cut at the
    groups' inputs: the Gram matrices and the output equal `BlockRunner.run`'s bit for bit
    (tests/quant/test_layerwise.py)."""

    def __init__(self, block, inputs: BlockInputs, x, chunk: int,
                 keep_hidden: bool | None = None):
        self.block, self.inputs = block, inputs
        self.spans = _chunks(x.shape[0], chunk)
        self.x = [x[a:b] for a, b in self.spans]
        if keep_hidden is None:
            hidden = (x.size // x.shape[-1] * block.config.intermediate_size
                      * jnp.dtype(x.dtype).itemsize)
            keep_hidden = hidden <= KEEP_HIDDEN_BYTES
        self.keep_hidden = keep_hidden
        self.next = 0
        self.out = self.h = self.n = self.hidden = None

    def _fns(self):
        graphdef, state = nnx.split(self.block)
        return (*_stage_fns(_canonical_graphdef(self.block, graphdef, state)), state)

    def _args(self, a, b):
        i = self.inputs
        kb = None if i.key_bias is None else i.key_bias[a:b]
        return kb, i.cos[a:b], i.sin[a:b], i.token_weights[a:b]

    def gram(self, k: int):
        if k != self.next:
            raise ValueError(f"GroupGrams: group {k} asked for before group {self.next}")
        self.next += 1
        qkv, heads, mlp_in, (down_in, down_in_kept), _, state = self._fns()
        grams, kept = [], []
        for c, (a, b) in enumerate(self.spans):
            kb, cos, sin, w = self._args(a, b)
            if k == 0:
                grams.append(qkv(state, self.x[c], w))
            elif k == 1:
                out, g = heads(state, self.x[c], kb, cos, sin, w)
                kept.append(out)
                grams.append(g)
            elif k == 2:
                h, n, g = mlp_in(state, self.x[c], self.out[c], w)
                kept.append((h, n))
                grams.append(g)
            elif self.keep_hidden:
                hidden, g = down_in_kept(state, self.n[c], w)
                kept.append(hidden)
                grams.append(g)
            else:
                grams.append(down_in(state, self.n[c], w))
        if k == 1:
            self.out = kept
        elif k == 2:
            self.out = None
            self.h, self.n = [h for h, _ in kept], [n for _, n in kept]
        elif k == 3 and self.keep_hidden:
            self.hidden, self.n = kept, None
        return sum(grams)

    def output(self):
        if self.next != len(GROUPS):
            raise ValueError("GroupGrams: output() before every group's Gram matrix")
        *_, (output, output_kept), state = self._fns()
        if self.keep_hidden:
            return jnp.concatenate([output_kept(state, h, g) for h, g in zip(self.h,
                                                                             self.hidden)])
        return jnp.concatenate([output(state, h, n) for h, n in zip(self.h, self.n)])


def weight(block, name):
    """The weight a block linear multiplies ([in, out]; inside an `ActKernel` if wrapped)."""
    return inner_weight(getattr(block, name).kernel[...])


def set_kernel(block, name, value):
    """Sets a linear's weight, keeping an `ActKernel`'s input stage around it."""
    lin = getattr(block, name)
    lin.kernel.value = with_weight(lin.kernel[...], value)


def stage(block, name, q: QuantizedArray, pending: dict):
    """Puts the dequantized weight in place for the rest of this block's calibration passes
    (same math as the packed matmul, and the block's jitted forward keeps one signature);
    the packed weight is installed by `install` when the block is done."""
    set_kernel(block, name, q.dequantize(weight(block, name).dtype))
    pending[name] = q


def install(block, pending: dict):
    for name, q in pending.items():
        set_kernel(block, name, q)
    pending.clear()


def _untimed(phase, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def quantize_gptq(block, names, h, weight_spec: QuantSpec, pending: dict,
                  *, damp: float, block_size: int, act_order: bool = False,
                  static_groups: bool = False, timed=_untimed):
    """GPTQ on linears that share one input, from its Hessian `h` (`gptq_core.hessian` of the
    token-weighted Gram matrix: callers that build it in one expression, as `layerwise`
    does, free the Gram matrix before GPTQ runs, one in x in matrix less at the peak); the
    results are staged into `pending`. `timed(phase, fn, *args)` may time the GPTQ calls
    ("gptq_s") and the packing + staging ("pack_s")."""
    for name in names:
        kernel = weight(block, name)
        w = kernel.T.astype(jnp.float32)  # [out, in]
        r = timed("gptq_s", functools.partial(
            gptq, bits=weight_spec.bits, group_size=weight_spec.group_size,
            sym=weight_spec.sym, damp=damp, block_size=block_size, act_order=act_order,
            static_groups=static_groups), w, h)
        g_idx = r.g_idx if (act_order and not static_groups) else None

        def pack(r=r, g_idx=g_idx, name=name, kernel=kernel):
            q = QuantizedArray.from_codes(r.codes, r.scales, r.zeros, bits=weight_spec.bits,
                                          group_size=weight_spec.group_size,
                                          sym=weight_spec.sym, g_idx=g_idx,
                                          scale_dtype=kernel.dtype)
            stage(block, name, q, pending)
            return q, weight(block, name)

        timed("pack_s", pack)


def foldable(block, group, producer, kind) -> bool:
    """Whether x / s has an exact fold into the producer (not v -> o under GQA, where one v
    channel feeds several o inputs)."""
    if kind == "norm":
        return True
    return weight(block, producer).shape[1] == weight(block, group[0]).shape[0]


def fold(block, group, producer, kind, s):
    """x / s folded into the producer (norm weight, or a linear's output channels and bias),
    W * s into the group's weights: the float block is unchanged. Kernels may already carry
    an input stage (`ActKernel`), which is kept."""
    nxt = [weight(block, n) for n in group]  # [in, out] kernels
    if kind == "norm":
        norm = getattr(block, producer)
        prev, new_next, _ = awq_core.fold_scales(norm.scale[...], nxt, s, layout="in_out")
        norm.scale.value = prev
    else:
        lin = getattr(block, producer)
        bias = None if lin.bias is None else lin.bias[...]
        prev, new_next, new_bias = awq_core.fold_scales(weight(block, producer), nxt, s,
                                                        prev_bias=bias, layout="in_out")
        set_kernel(block, producer, prev)
        if bias is not None:
            lin.bias.value = new_bias
    for n, w in zip(group, new_next):
        set_kernel(block, n, w)


def quantize_daq(block, names, gram, weight_sum: float, pending: dict, *, bits: int,
                 block_size: int, ratio: float, iters: int, salient: float,
                 data_weight: bool, compensate: str, damp: float, refit: int = 1,
                 abmp_check: bool = True) -> dict:
    """DAQ + ABMP (`daq_core`) on linears that share one input, from its token-weighted Gram
    matrix; packed `BinaryPlanesArray`s are staged into `pending`. Returns per-linear stats
    (planes per block, bits per weight with scales, weighted objective)."""
    h = hessian(gram, weight_sum)
    info = {}
    for name in names:
        kernel = weight(block, name)
        r = daq_core.daq_quantize(kernel.T.astype(jnp.float32), h, bits=bits,
                                  block=block_size, ratio=ratio, iters=iters,
                                  salient=salient, data_weight=data_weight,
                                  compensate=compensate, damp=damp, refit=refit,
                                  abmp_check=abmp_check)
        q = BinaryPlanesArray.from_planes(r.signs, r.row, r.col, r.slot_block)
        stage(block, name, q, pending)
        info[name] = {"planes": r.planes.tolist(), "bits_per_weight": q.bits_per_weight,
                      "objective": r.objective}
    return info
