"""Two-mode calibration statistics of DiffusionGemma: its one weight stack runs as a causal
encoder over clean prompts and as a bidirectional decoder over noisy canvases with
self-conditioning, and the calibration sees both uses.

With prompts P [B, p] and clean canvases C [B, L] (the text that follows each prompt):

    encoder   Enc(P) over the clean prompts (causal; every token counted)
    decoder   cache = Enc(P); for each noise level t:
                  x  = where(u < t, U{0..V-1}, C),   u ~ U[0, 1)^{B x L}
                  sc = Dec(x, none, cache) / T_t,    T_t = t_min + (t_max - t_min) t
                       (the sampler's logits fed back at its temperature for step n/N = t;
                       none without `self_condition`)
                  Dec(x, sc, cache)                  <- the recorded pass

`modes` chooses "encoder", "decoder" or "both". For each recorded linear the statistic is
its input's Gram matrix and token count summed over every recorded pass,

    gram = sum_passes sum_tokens x x^T,      count = number of tokens,

or, with `rows=True`, the input rows themselves [tokens, in] concatenated over the passes
(what AWQ's searches read); for each recorded MoE layer the experts' input rows with the
router's choices (`Capture(experts_fn=)`), concatenated over the passes: per-expert
statistics depend on which expert each row was routed to (`gptq_experts_core`).

Random numbers: level j uses `fold_in(key(seed), j)`, split into (mask key, ids key).

Layer by layer (`hidden_layer_stats` / `hidden_layer_forward`, for streaming): the same passes
from the hidden states entering layer i, Enc_i over x_enc [B, p, H] (giving layer i's keys and
values) and Dec_i over each level's x_dec [B, L, H]; `sc_stats` / `sc_forward` do the same for
the decoder's self-conditioning input. Given the hidden states that the whole-model passes
feed layer i, they record the same statistics and produce the next layer's inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from qdlm_jax.models.capture import Capture
from qdlm_jax.models.diffusion_gemma import DiffusionGemma, init_cache

MODES = ("encoder", "decoder", "both")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaCalibSpec:
    """Which passes the calibration records (module docstring)."""

    modes: str = "both"  # encoder | decoder | both
    levels: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # decoder noise levels t in (0, 1]
    self_condition: bool = True  # the recorded decoder pass gets a first pass's logits
    t_min: float = 0.4  # T_t = t_min + (t_max - t_min) t for the self-conditioning logits
    t_max: float = 0.8
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(float(t) for t in self.levels))
        if self.modes not in MODES:
            raise ValueError(f"modes={self.modes!r}: expected one of {MODES}")
        if self.modes != "encoder" and (not self.levels
                                        or not all(0 < t <= 1 for t in self.levels)):
            raise ValueError(f"levels={self.levels!r}: expected noise levels in (0, 1]")
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"t_min={self.t_min!r}, t_max={self.t_max!r}: expected "
                             "0 < t_min <= t_max")


@dataclasses.dataclass
class LayerStats:
    """What the recorded passes saw: {linear name: (gram [in, in], tokens)}, or with
    `rows=True` {linear name: input rows [tokens, in]} in `inputs` instead, and {MoE layer:
    (expert input rows [M, H], top_ids [M, k], top_weights [M, k])}."""

    grams: dict[str, tuple[jax.Array, int]]
    experts: dict[int, tuple[jax.Array, jax.Array, jax.Array]]
    inputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def _gram(x):
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.einsum("ti,tj->ij", flat, flat, precision=jax.lax.Precision.HIGHEST), \
        flat.shape[0]


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _rows(x, top_ids, top_weights):
    k = top_ids.shape[-1]
    return (x.reshape(-1, x.shape[-1]), top_ids.reshape(-1, k), top_weights.reshape(-1, k))


def noised_canvases(canvases: Int[Array, "B L"], level: float, key, vocab: int):
    """`canvases` with each token replaced by a uniform id with probability `level`."""
    k_mask, k_ids = jax.random.split(key)
    noise = jax.random.uniform(k_mask, canvases.shape) < level
    ids = jax.random.randint(k_ids, canvases.shape, 0, vocab, jnp.int32)
    return jnp.where(noise, ids, canvases)


def _pass(state, prompts, canvases, key, level, temperature, *, graphdef, names,
          expert_layers, decoder: bool, self_condition: bool, rows: bool):
    """({name: (gram, tokens)}, {layer: expert rows}) of one recorded pass (module doc)."""
    model = nnx.merge(graphdef, state)
    c = model.config
    b, p = prompts.shape
    cap = Capture(names=names, fn=_flat if rows else _gram,
                  experts_fn=_rows if expert_layers else None)
    if not decoder:
        model.encode(prompts, None, init_cache(c, b, p), capture=cap)
    else:
        cache = model.encode(prompts, None, init_cache(c, b, p))
        x = noised_canvases(canvases, level, key, c.vocab_size)
        sc = None
        if self_condition:
            sc = (model.decode(x, None, cache) / temperature).astype(model.embed[...].dtype)
        model.decode(x, sc, cache, capture=cap)
    return cap.values, {i: v for i, v in cap.experts.items() if i in expert_layers}


_pass_jit = jax.jit(_pass, static_argnames=("graphdef", "names", "expert_layers", "decoder",
                                            "self_condition", "rows"))


def gemma_layer_stats(model: DiffusionGemma, prompts: Int[Array, "B P"],
                      canvases: Int[Array, "B L"], spec: GemmaCalibSpec, *,
                      names: tuple[str, ...] = (),
                      expert_layers: tuple[int, ...] = (), rows: bool = False) -> LayerStats:
    """The statistics of the linears `names` (hook names, `diffusion_gemma.linear_names`)
    and of the MoE layers `expert_layers` over the passes of `spec` (module docstring);
    `rows`: the linears' input rows instead of their Gram matrices."""
    prompts = jnp.asarray(prompts, jnp.int32)
    canvases = jnp.asarray(canvases, jnp.int32)
    graphdef, state = nnx.split(model)
    static = dict(graphdef=graphdef, names=tuple(names), expert_layers=tuple(expert_layers),
                  rows=rows)
    passes = []
    if spec.modes in ("encoder", "both"):
        passes.append(_pass_jit(state, prompts, canvases, jax.random.key(0), 0.0, 1.0,
                                decoder=False, self_condition=False, **static))
    if spec.modes in ("decoder", "both"):
        for j, level in enumerate(spec.levels):
            temperature = spec.t_min + (spec.t_max - spec.t_min) * level
            passes.append(_pass_jit(state, prompts, canvases,
                                    jax.random.fold_in(jax.random.key(spec.seed), j), level,
                                    temperature, decoder=True,
                                    self_condition=spec.self_condition, **static))
    return _combine(passes, expert_layers, rows)


def _combine(passes, expert_layers, rows: bool) -> LayerStats:
    """The passes' records summed (grams) or concatenated (rows), in pass order."""
    if rows:
        names_seen = sorted({name for values, _ in passes for name in values})
        inputs = {name: jnp.concatenate([values[name] for values, _ in passes
                                         if name in values]) for name in names_seen}
        return LayerStats(grams={}, experts=_expert_rows(passes, expert_layers), inputs=inputs)
    grams: dict[str, tuple[jax.Array, int]] = {}
    for values, _ in passes:
        for name, (g, n) in values.items():
            if name in grams:
                grams[name] = (grams[name][0] + g, grams[name][1] + n)
            else:
                grams[name] = (g, n)
    return LayerStats(grams=grams, experts=_expert_rows(passes, expert_layers))


def _expert_rows(passes, expert_layers) -> dict[int, tuple[jax.Array, jax.Array, jax.Array]]:
    experts = {}
    for i in sorted(expert_layers):
        parts = [recorded[i] for _, recorded in passes]
        experts[i] = tuple(jnp.concatenate([part[j] for part in parts]) for j in range(3))
    return experts


def _layer_pass(state, x_enc, x_decs, *, graphdef, layer, names, experts, record_encoder,
                record_decoder):
    """(records of the recorded passes, layer `layer`'s encoder output, its decoder outputs)."""
    model = nnx.merge(graphdef, state)
    b, p = x_enc.shape[:2]

    def capture(on):
        return Capture(names=names, fn=_gram, experts_fn=_rows if experts else None) if on \
            else None

    passes = []
    cap = capture(record_encoder)
    cache, x_next = model.encode_hidden(x_enc, None, init_cache(model.config, b, p),
                                        capture=cap, layers=(layer,))
    if cap is not None:
        passes.append((cap.values, cap.experts))
    outs = []
    for j in range(x_decs.shape[0]):
        cap = capture(record_decoder)
        outs.append(model.decode_hidden(x_decs[j], cache, capture=cap, layers=(layer,)))
        if cap is not None:
            passes.append((cap.values, cap.experts))
    return passes, x_next, jnp.stack(outs) if outs else x_decs


_layer_pass_jit = jax.jit(_layer_pass, static_argnames=(
    "graphdef", "layer", "names", "experts", "record_encoder", "record_decoder"))


def hidden_layer_stats(model: DiffusionGemma, layer: int, x_enc: Float[Array, "B P H"],
                       x_decs: Float[Array, "N B L H"], spec: GemmaCalibSpec, *,
                       names: tuple[str, ...], experts: bool) -> LayerStats:
    """The statistics of layer `layer`'s linears `names` (and of its experts with `experts`)
    over `spec`'s passes, from the hidden states entering the layer: x_enc over the prompts,
    x_decs[j] over level j's canvases (module docstring). `model` needs only that layer's
    weights (`diffusion_gemma.partial_model`)."""
    graphdef, state = nnx.split(model)
    passes, _, _ = _layer_pass_jit(
        state, jnp.asarray(x_enc), jnp.asarray(x_decs), graphdef=graphdef, layer=layer,
        names=tuple(names), experts=experts, record_encoder=spec.modes in ("encoder", "both"),
        record_decoder=spec.modes in ("decoder", "both"))
    return _combine(passes, (layer,) if experts else (), rows=False)


def hidden_layer_forward(model: DiffusionGemma, layer: int, x_enc: Float[Array, "B P H"],
                         x_decs: Float[Array, "N B L H"]) -> tuple[jax.Array, jax.Array]:
    """(encoder output, decoder outputs) of layer `layer` given its inputs."""
    graphdef, state = nnx.split(model)
    _, x_next, dec_next = _layer_pass_jit(
        state, jnp.asarray(x_enc), jnp.asarray(x_decs), graphdef=graphdef, layer=layer,
        names=(), experts=False, record_encoder=False, record_decoder=False)
    return x_next, dec_next


def _sc_pass(state, embeds, soft, *, graphdef, names, record):
    model = nnx.merge(graphdef, state)
    passes, outs = [], []
    for j in range(embeds.shape[0]):
        cap = Capture(names=names, fn=_gram) if record else None
        outs.append(model.self_conditioning(embeds[j], soft[j].astype(embeds.dtype), cap))
        if cap is not None:
            passes.append((cap.values, {}))
    # no decoder level (encoder-only calibration): nothing recorded, no decoder input
    return passes, jnp.stack(outs) if outs else jnp.zeros(embeds.shape, embeds.dtype)


_sc_pass_jit = jax.jit(_sc_pass, static_argnames=("graphdef", "names", "record"))


def sc_stats(model: DiffusionGemma, embeds: Float[Array, "N B L H"],
             soft: Float[Array, "N B L H"], *, names: tuple[str, ...]) -> LayerStats:
    """The self-conditioning MLP's statistics over each level's decoder input: the noised
    canvas's scaled embeddings `embeds[j]` and the self-conditioning input `soft[j]`
    (`DiffusionGemma.soft_embedding` of the first pass's logits / T_j), as the decoder
    passes record them. `model` needs only the self-conditioning weights."""
    graphdef, state = nnx.split(model)
    passes, _ = _sc_pass_jit(state, jnp.asarray(embeds), jnp.asarray(soft),
                             graphdef=graphdef, names=tuple(names), record=True)
    return _combine(passes, (), rows=False)


def sc_forward(model: DiffusionGemma, embeds: Float[Array, "N B L H"],
               soft: Float[Array, "N B L H"]) -> jax.Array:
    """Each level's decoder input hidden states [N, B, L, H] (`decoder_inputs`)."""
    graphdef, state = nnx.split(model)
    return _sc_pass_jit(state, jnp.asarray(embeds), jnp.asarray(soft), graphdef=graphdef,
                        names=(), record=False)[1]
