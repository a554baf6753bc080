"""What weight-only PTQ does to each tensor of a DiffusionGemma model (the family's
description for the quantization passes).

Every param has a kind (from its path in `models/diffusion_gemma.py`):

    kind                    params                                     default action
    expert gate_up          layers.i.experts.gate_up    [E, H, 2I]     quantized (QuantizedExperts)
    expert down             layers.i.experts.down       [E, I, H]      quantized (QuantizedExperts)
    attention               layers.i.self_attn.{q,k,v,o}_proj.kernel   quantized (QuantizedArray)
    dense MLP               layers.i.mlp.{gate,up,down}_proj.kernel    quantized (QuantizedArray)
    self-conditioning MLP   self_conditioning.mlp.*.kernel             quantized (QuantizedArray)
    router                  layers.i.router.proj.kernel                kept; quantized with
                                                                       `quantize_router`
                            layers.i.router.{scale, per_expert_scale}  kept
    norm                    every RMSNorm weight (layer norms, q/k norms, the final norm,
                            self-conditioning's pre norm)              kept
    layer scalar            layers.i.layer_scalar_{encoder,decoder}    kept
    embedding               embed (also the tied LM head)              kept

Routers stay exact by default: a router quantized to 4 bits (a tiny share of the
parameters) changes many expert choices, and every later layer sees them; `router_weight`
gives a quantized router its own width (e.g. 8 bits beside 4-bit experts). `parts` chooses
which of the quantized kinds are quantized (PARTS: experts, attention, dense_mlp,
self_conditioning; the others are kept, and the plan says why), so that one part's damage
can be measured alone. With `act` every quantized tensor's inputs are quantized too
(`attach_act`: dynamic per-token or per-group scales; W8A8, W4A8). A path this table does
not know is an error, so a new param cannot go unplanned. `GemmaPTQSpec(weight=None)` is the
16-bit plan: every tensor kept. `daq` packs into DAQ's binary planes instead of codes on a
grid (`BinaryPlanesArray`, experts `BinaryPlanesExperts`; `bits` the mean number of planes,
the group size the block).
"""

from __future__ import annotations

import dataclasses

from qdlm_jax.models.params import ParamPath, path_str
from qdlm_jax.quant import hadamard_core
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel
from qdlm_jax.quant.coverage import CoveragePlan, make_plan
from qdlm_jax.quant.quantizer_core import QuantSpec

EXPERT_GATE_UP = "expert gate_up"
EXPERT_DOWN = "expert down"
ATTENTION = "attention"
DENSE_MLP = "dense MLP"
SELF_CONDITIONING = "self-conditioning MLP"
ROUTER = "router"
NORM = "norm"
LAYER_SCALAR = "layer scalar"
EMBEDDING = "embedding"
KINDS = (EXPERT_GATE_UP, EXPERT_DOWN, ATTENTION, DENSE_MLP, SELF_CONDITIONING, ROUTER, NORM,
         LAYER_SCALAR, EMBEDDING)

METHODS = ("rtn", "gptq", "awq", "quarot", "smoothquant", "daq")
EXPERT_KINDS = (EXPERT_GATE_UP, EXPERT_DOWN)
# The packed types of (dense kernels, experts) per method: DAQ's binary planes, else affine
# codes.
PACKED_TYPES = {"daq": ("BinaryPlanesArray", "BinaryPlanesExperts")}
AFFINE_TYPES = ("QuantizedArray", "QuantizedExperts")
# Methods whose quantized tensors read their inputs through an online transform.
TRANSFORMS = {"quarot": "hadamard"}
# The parts `GemmaPTQSpec.parts` may name, and the kinds each holds.
PARTS = {"experts": (EXPERT_GATE_UP, EXPERT_DOWN), "attention": (ATTENTION,),
         "dense_mlp": (DENSE_MLP,), "self_conditioning": (SELF_CONDITIONING,)}
_LINEAR_KINDS = (ATTENTION, DENSE_MLP, SELF_CONDITIONING)
_PART_OF = {kind: part for part, kinds in PARTS.items() for kind in kinds}
_KEPT_REASON = {ROUTER: "router: expert choices stay exact", NORM: "norm weight",
                LAYER_SCALAR: "residual scale", EMBEDDING: "embedding and tied LM head"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaPTQSpec:
    """Weight-only PTQ of a DiffusionGemma model."""

    method: str = "rtn"  # one of METHODS
    weight: QuantSpec | None = QuantSpec()  # bits, group, symmetry; None: 16 bits (all kept)
    quantize_router: bool = False  # quantize the router projections too
    router_weight: QuantSpec | None = None  # the routers' width etc. (None: `weight`'s)
    parts: tuple[str, ...] = tuple(PARTS)  # the parts quantized (PARTS); the rest kept
    scale_dtype: str | None = None  # dtype of the scales (None: each weight's own dtype)
    act: ActSpec | None = None  # every quantized tensor's inputs quantized too (None: float)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"GemmaPTQSpec.method={self.method!r}: expected one of {METHODS}")
        if self.weight is not None and not isinstance(self.weight, QuantSpec):
            raise ValueError(f"GemmaPTQSpec.weight={self.weight!r}: expected a QuantSpec or "
                             "None (16 bits)")
        if not isinstance(self.quantize_router, bool):
            raise ValueError(f"GemmaPTQSpec.quantize_router={self.quantize_router!r}: expected "
                             "True or False")
        if self.act is not None and (not isinstance(self.act, ActSpec)
                                     or self.act.granularity == "per_tensor"):
            raise ValueError(f"GemmaPTQSpec.act={self.act!r}: expected an ActSpec with dynamic "
                             "scales (per_token or per_group) or None")
        if self.router_weight is not None and not isinstance(self.router_weight, QuantSpec):
            raise ValueError(f"GemmaPTQSpec.router_weight={self.router_weight!r}: expected a "
                             "QuantSpec or None (the weight spec)")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"GemmaPTQSpec.parts={self.parts!r}: expected distinct names "
                             f"among {tuple(PARTS)}")

    def weight_for(self, path: ParamPath) -> QuantSpec:
        """The QuantSpec of a quantized tensor: `router_weight` for a router's projection
        (when set), `weight` for every other."""
        if self.router_weight is not None and tensor_kind(path) == ROUTER:
            return self.router_weight
        return self.weight


def tensor_kind(path: ParamPath) -> str:
    """The kind of a DiffusionGemma param (module docstring); ValueError for a path the
    table does not know."""
    head, tail = path[0], path[-1]
    if path == ("embed",):
        return EMBEDDING
    if head == "final_norm" or (head == "self_conditioning" and path[1] == "pre_norm"):
        return NORM
    if head == "self_conditioning" and path[1] == "mlp" and tail == "kernel":
        return SELF_CONDITIONING
    if head == "layers" and len(path) >= 3:
        part = path[2]
        if path[2:] == ("experts", "gate_up"):
            return EXPERT_GATE_UP
        if path[2:] == ("experts", "down"):
            return EXPERT_DOWN
        if part == "self_attn":
            return ATTENTION if tail == "kernel" else NORM
        if part == "mlp" and tail == "kernel":
            return DENSE_MLP
        if part == "router":
            return ROUTER
        if str(part).startswith("layer_scalar"):
            return LAYER_SCALAR
        if "layernorm" in str(part) and tail == "scale":
            return NORM
    raise ValueError(f"{path_str(path)}: not a DiffusionGemma tensor the quantization plan "
                     "knows; add its kind to quant/gemma_plan.py")


def _decide(path: ParamPath, shape: tuple[int, ...], spec: GemmaPTQSpec) -> dict:
    kind = tensor_kind(path)
    if spec.weight is None:
        return {"kind": kind, "packed_type": None, "reason": "16 bits"}
    if kind in _PART_OF and _PART_OF[kind] not in spec.parts:
        return {"kind": kind, "packed_type": None,
                "reason": f"{_PART_OF[kind]} not in parts "
                          f"({','.join(spec.parts) or 'none'})"}
    dense_type, experts_type = PACKED_TYPES.get(spec.method, AFFINE_TYPES)
    if kind in EXPERT_KINDS:
        packed = experts_type
    elif kind in _LINEAR_KINDS or (kind == ROUTER and path[-2:] == ("proj", "kernel")
                                   and spec.quantize_router):
        packed = dense_type
    else:
        reason = _KEPT_REASON[kind]
        if kind == ROUTER and path[-1] != "kernel":
            reason = "router scale vector"
        return {"kind": kind, "packed_type": None, "reason": reason}
    weight = spec.weight_for(path)
    try:
        group = weight.check_width(shape[-2])
    except ValueError as e:
        raise ValueError(f"{path_str(path)} ({kind}, input width {shape[-2]}): {e}") from None
    if spec.act is not None:
        try:
            spec.act.check_width(shape[-2], "its input")
        except ValueError as e:
            raise ValueError(f"{path_str(path)} ({kind}): {e}") from None
    transform = TRANSFORMS.get(spec.method)
    if transform == "hadamard" and not hadamard_core.supports(shape[-2]):
        raise ValueError(f"{path_str(path)} ({kind}): no Hadamard transform of its input width "
                         f"{shape[-2]} (widths K * 2^m with K = 1 or a Paley order)")
    return {"kind": kind, "packed_type": packed, "method": spec.method,
            "bits": weight.bits, "group_size": group,
            "act_bits": None if spec.act is None else spec.act.bits, "transform": transform}


def attach_act(params: dict, plan: CoveragePlan, act: ActSpec | None) -> None:
    """In place: every tensor the plan quantizes wrapped in an `ActKernel` that quantizes its
    inputs with `act` (dense kernels through `project`, experts through `expert_project`:
    per token, or per (token, expert) row for the experts' down projection); a tensor already
    wrapped (an online transform) gets `act` in its wrapper. Nothing when `act` is None."""
    if act is None:
        return
    for p in plan.paths():
        v = params[p]
        params[p] = v.replace(act=act) if isinstance(v, ActKernel) else ActKernel(weight=v,
                                                                                   act=act)


def hook_name(path: ParamPath) -> str:
    """The capture hook of a dense kernel's path (`diffusion_gemma.linear_names`)."""
    parts = [str(p) for p in path[:-1] if p != "mlp" or path[0] != "self_conditioning"]
    return ".".join(parts)


def forward_parts(num_layers: int, plan: CoveragePlan
                  ) -> list[tuple[str, list[ParamPath], int | None]]:
    """[(label, the part's planned dense kernels, its MoE layer or None)] in forward order:
    the self-conditioning MLP, then each layer; parts with nothing planned are left out.
    Layer-by-layer passes (GPTQ, AWQ) quantize one part at a time in this order."""
    experts = plan.paths(kinds=EXPERT_KINDS)
    dense = [p for p in plan.paths() if p not in experts]
    out = [("self-conditioning", [p for p in dense if p[0] == "self_conditioning"], None)]
    for i in range(num_layers):
        mine = [p for p in dense if p[0] == "layers" and p[1] == i]
        has_experts = any(p[1] == i for p in experts)
        out.append((f"layer {i}", mine, i if has_experts else None))
    return [part for part in out if part[1] or part[2] is not None]


def gemma_plan(shapes: dict[ParamPath, tuple[int, ...]], spec: GemmaPTQSpec) -> CoveragePlan:
    """The plan for params of these shapes (`models.diffusion_gemma.param_shapes(config)`,
    or the shapes of loaded params). A group size that does not divide some quantized
    tensor's input width raises ValueError naming the tensor, before any work."""
    return make_plan(shapes, lambda p, s: _decide(p, s, spec), KINDS)


__all__ = ["ATTENTION", "DENSE_MLP", "EMBEDDING", "EXPERT_DOWN", "EXPERT_GATE_UP",
           "EXPERT_KINDS", "KINDS", "PACKED_TYPES",
           "attach_act",
           "LAYER_SCALAR", "METHODS", "NORM", "PARTS", "ROUTER", "SELF_CONDITIONING",
           "GemmaPTQSpec", "forward_parts", "gemma_plan", "hook_name", "tensor_kind"]
