"""Every tensor accounted for: a quantization plan made before quantizing, a guard after.

A plan lists every param of a model with its tensor kind, its parameter count and share of
the model's parameters, and the action: quantize (method, bits, group, the packed type it
must end up as) or keep (and why). After quantizing, `check_coverage` compares the result
with the plan:

  - a tensor the plan quantizes must be of the planned packed type, at the planned bits and
    group size, with its logical shape; with planned activation bits, wrapped in an
    `ActKernel` quantizing its inputs to those bits (and without, not wrapped);
  - a tensor the plan keeps must still be a plain array of its shape and dtype;
  - the result holds exactly the plan's tensors.

Any mismatch raises `CoverageError` naming every tensor at fault: a pass that silently skips
a tensor (say, the fused 3-D expert weights) fails instead of reporting success.

`coverage_table(plan.rows())` is the report's summary: one row per (kind, action) with tensors,
parameters and share.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qdlm_jax.models.params import ParamPath, path_str


class CoverageError(RuntimeError):
    """The quantized params do not match the plan (a tensor skipped, or changed unplanned)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorPlan:
    """What happens to one param."""

    path: ParamPath
    kind: str  # e.g. "expert gate_up", "attention", "router", "norm"
    shape: tuple[int, ...]
    params: int  # elements
    share: float  # params / the model's params
    packed_type: str | None  # e.g. "QuantizedArray", "QuantizedExperts"; None: kept as is
    method: str | None = None  # quantized: "rtn", ...
    bits: int | None = None
    group_size: int | None = None  # resolved (the input width when per channel)
    act_bits: int | None = None  # quantized inputs (ActKernel around the packed weight)
    transform: str | None = None  # online input transform of the ActKernel (e.g. "hadamard")
    reason: str = ""  # kept: why

    @property
    def name(self) -> str:
        return path_str(self.path)

    @property
    def quantized(self) -> bool:
        return self.packed_type is not None

    @property
    def action(self) -> str:
        """"rtn W4 g128" (per channel: "rtn W4 per-channel"; quantized inputs: "rtn W4A8
        g128"), or "kept (reason)"."""
        if not self.quantized:
            return f"kept ({self.reason})" if self.reason else "kept"
        group = "per-channel" if self.group_size == self.shape[-2] else f"g{self.group_size}"
        act = f"A{self.act_bits}" if self.act_bits else ""
        return f"{self.method} W{self.bits}{act} {group}"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "params": self.params, "share": self.share, "action": self.action}


@dataclasses.dataclass(frozen=True)
class CoveragePlan:
    """The plan of a whole model (`TensorPlan` per param, in the params' order)."""

    tensors: tuple[TensorPlan, ...]
    kinds: tuple[str, ...] = ()  # the order of the kinds in `rows` (others after them)

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def quantized_share(self) -> float:
        return sum(t.share for t in self.tensors if t.quantized)

    def paths(self, packed_type: str | None = None, *, kinds: tuple[str, ...] | None = None
              ) -> list[ParamPath]:
        """Paths the plan quantizes (into `packed_type`, of one of `kinds`, when given)."""
        return [t.path for t in self.tensors
                if t.quantized and packed_type in (None, t.packed_type)
                and (kinds is None or t.kind in kinds)]

    def by_path(self) -> dict[ParamPath, TensorPlan]:
        return {t.path: t for t in self.tensors}

    def subset(self, paths) -> "CoveragePlan":
        """The plan of `paths` alone (a part of the model checked as it is quantized)."""
        keep = set(paths)
        return dataclasses.replace(self, tensors=tuple(t for t in self.tensors
                                                       if t.path in keep))

    def rows(self) -> list[dict]:
        """One row per (kind, action), kinds in `kinds` order: tensors, params, share."""
        rows: dict[tuple[str, str], dict] = {}
        for t in self.tensors:
            r = rows.setdefault((t.kind, t.action), {"kind": t.kind, "action": t.action,
                                                     "tensors": 0, "params": 0, "share": 0.0})
            r["tensors"] += 1
            r["params"] += t.params
            r["share"] += t.share
        order = {k: i for i, k in enumerate(self.kinds)}
        return sorted(rows.values(), key=lambda r: order.get(r["kind"], len(order)))

    def to_json(self) -> list[dict]:
        return [t.to_json() for t in self.tensors]


def make_plan(shapes: dict[ParamPath, tuple[int, ...]], decide,
              kinds: tuple[str, ...] = ()) -> CoveragePlan:
    """The plan of params of `shapes`; `decide(path, shape) -> dict` gives each tensor's
    kind and action (the `TensorPlan` fields other than path, shape, params and share);
    `kinds` orders the table's rows."""
    total = sum(math.prod(s) for s in shapes.values())
    out = []
    for path, shape in shapes.items():
        n = math.prod(shape)
        out.append(TensorPlan(path=path, shape=tuple(shape), params=n,
                              share=n / total if total else 0.0, **decide(path, tuple(shape))))
    return CoveragePlan(tuple(out), kinds)


def check_coverage(plan: CoveragePlan, before: dict[ParamPath, object],
                   after: dict[ParamPath, object]) -> None:
    """Raises `CoverageError` naming every tensor where `after` (the quantized params)
    departs from `plan` given `before` (the float params) (module docstring)."""
    planned = plan.by_path()
    wrong = [f"{path_str(p)}: in the quantized params but not in the plan"
             for p in after if p not in planned]
    for p, t in planned.items():
        problem = _departure(t, before[p], after[p]) if p in after else "missing from the " \
            "quantized params"
        if problem:
            wrong.append(f"{t.name} ({t.kind}, {t.params:,} params): {problem}")
    if wrong:
        raise CoverageError(f"{len(wrong)} tensor(s) depart from the quantization plan: "
                            + "; ".join(wrong))


def _departure(t: TensorPlan, before, v) -> str:
    """What is wrong with `v` as the result of `t`'s action ("" when nothing)."""
    if t.quantized:
        wrapped = type(v).__name__ == "ActKernel"
        act_bits = v.act.bits if wrapped and v.act is not None else None
        if act_bits != t.act_bits:
            return (f"planned {t.action}, but the result's inputs are "
                    f"{'float' if act_bits is None else f'{act_bits}-bit'}")
        transform = v.transform.kind if wrapped and v.transform is not None else None
        if transform != t.transform:
            return (f"planned {t.action} with input transform {t.transform}, but the result "
                    f"has {transform}")
        v = v.weight if wrapped else v
        if type(v).__name__ != t.packed_type:
            return (f"planned {t.action} as {t.packed_type}, but the result holds a "
                    f"{_describe(v)}; it was not quantized")
        # binary planes (DAQ): bits = the mean planes per block, group = the block
        bits, group = ((v.mean_planes, v.block) if hasattr(v, "mean_planes")
                       else (v.bits, v.group_size))
        if (bits, group, tuple(v.shape)) != (t.bits, t.group_size, t.shape):
            return (f"planned {t.action} of shape {t.shape}, got {bits:g} bits, group "
                    f"{group}, shape {tuple(v.shape)}")
        return ""
    if (not _is_plain_array(v) or tuple(v.shape) != tuple(before.shape)
            or np.dtype(v.dtype) != np.dtype(before.dtype)):
        return (f"planned {t.action}, but the result holds a {_describe(v)} where the model "
                f"had a {_describe(before)}")
    return ""


def _is_plain_array(v) -> bool:
    return hasattr(v, "__array__") and hasattr(v, "dtype") and hasattr(v, "shape")


def _describe(v) -> str:
    if _is_plain_array(v):
        return f"{np.dtype(v.dtype).name} array {tuple(v.shape)}"
    return type(v).__name__


def coverage_table(rows: list[dict]) -> str:
    """Markdown of `CoveragePlan.rows()` (also as stored in results.json): kind | tensors |
    params | share | action, then the total and the quantized share."""
    lines = ["| kind | tensors | params | share | action |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['tensors']} | {r['params']:,} | "
                     f"{100 * r['share']:.2f}% | {r['action']} |")
    quantized = sum(r["share"] for r in rows if not r["action"].startswith("kept"))
    lines.append(f"| all | {sum(r['tensors'] for r in rows)} | "
                 f"{sum(r['params'] for r in rows):,} | 100% | "
                 f"{100 * quantized:.2f}% of the parameters quantized |")
    return "\n".join(lines) + "\n"


__all__ = ["CoverageError", "CoveragePlan", "TensorPlan", "check_coverage", "coverage_table",
           "make_plan"]
