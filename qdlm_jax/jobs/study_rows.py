"""The study's rows and dimensions as parsed from a study config: `Variant` (fp, or one
quantization of a model), the named extra rows (`WA_ROWS`: weight-activation rows with K/V
and IA-AQ settings; `WO_ROWS`: weight-only rows, e.g. one part of a MoE model or its routers
at a given width) and `wa_row` that reads one, the decoding settings (`Decoding`,
`decoding_setting`), activation granularities, bit budgets and widths. `study_spec` puts
them together.
"""

from __future__ import annotations

import dataclasses

from qdlm_jax.evals.tasks import TaskSpec

FP = "fp"


@dataclasses.dataclass(frozen=True)
class Variant:
    """fp, or one quantization (method, weight bits[, activation bits]) of a model."""

    method: str
    bits: int | None = None
    act_bits: int | None = None  # None: weight-only (activations stay in float)
    # An extra weight-activation row (`wa_rows`): its name and its own overrides of the main
    # job's config, as sorted (dotted key, value) pairs, e.g. (("act.kv.bits", 4),).
    name: str | None = None
    overrides: tuple = ()
    # Activation scales per group of this many input channels (`act_granularities`: g<N>);
    # None: the config's granularity (per token unless `wa_quantize` says otherwise).
    act_group: int | None = None
    # Mixed precision (`bits_budgets`): the blocks' mean weight width, spread by sensitivity
    # (`bits` is then None: the job does not use it).
    budget: float | None = None

    @property
    def bits_text(self) -> str:
        """w4, w4a8, w4a4-ag32, wmix3.5, w4a4+kv4: the part of the label after the method."""
        if self.budget is not None:
            text = f"wmix{self.budget:g}"
        else:
            text = "-" if self.bits is None else (
                f"w{self.bits}" if self.act_bits is None else f"w{self.bits}a{self.act_bits}")
        if self.act_group is not None:
            text += f"-ag{self.act_group}"
        return text if self.name is None else f"{text}+{self.name}"

    @property
    def label(self) -> str:
        return FP if self.method == FP else f"{self.method}-{self.bits_text}"


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One setting of the study's decoding dimension: Fast-dLLM's KV cache and parallel rule
    (threshold or factor), applied to every generation task of the rows it selects; such a
    task runs as `<task>@<name>` and its cells record tokens committed per forward pass."""

    name: str
    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None

    def apply(self, task: TaskSpec) -> TaskSpec:
        gen = dataclasses.replace(task.gen, cache=self.cache, threshold=self.threshold,
                                  factor=self.factor)
        return dataclasses.replace(task, name=f"{task.name}@{self.name}", gen=gen)


def decoding_setting(entry, where: str) -> Decoding:
    """A decoding setting from a name `<cache>[-tau<threshold>|-f<factor>]` (e.g.
    `dual-tau0.9`, `prefix`, `none-f1.0`) or a mapping {cache, threshold, factor[, name]}."""
    from qdlm_jax.inference.generate import GenerationConfig
    if isinstance(entry, str):
        cache, _, rule = entry.partition("-")
        d = {"cache": cache}
        try:
            if rule.startswith("tau"):
                d["threshold"] = float(rule[3:])
            elif rule.startswith("f"):
                d["factor"] = float(rule[1:])
            elif rule:
                raise ValueError
        except ValueError:
            raise ValueError(f"{where}={entry!r}: expected <cache>[-tau<threshold>|-f<factor>], "
                             "e.g. dual-tau0.9, or a mapping {cache, threshold, factor}") from None
        d["name"] = entry
    else:
        d = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        unknown = sorted(set(d) - {"name", "cache", "threshold", "factor"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected name, cache, "
                             "threshold, factor")
    dec = Decoding(str(d.get("name") or _decoding_name(d)), d.get("cache", "none"),
                   d.get("threshold"), d.get("factor"))
    try:
        GenerationConfig(cache=dec.cache, threshold=dec.threshold, factor=dec.factor)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return dec


def _decoding_name(d: dict) -> str:
    rule = (f"-tau{d['threshold']}" if d.get("threshold") is not None else
            f"-f{d['factor']}" if d.get("factor") is not None else "")
    return f"{d.get('cache', 'none')}{rule}"



PER_TOKEN = "per_token"
BUDGET_METHODS = ("rtn", "gptq", "awq")  # the job's mixed precision (`--config.bits_budget`)


def act_granularities(values) -> tuple[int | None, ...]:
    """`--config.act_granularities`: per_token -> None, g<N> -> N (per-group activation
    scales of N consecutive input channels), in the given order."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for i, value in enumerate(values):
        text = str(value).strip()
        where = f"--config.act_granularities[{i}]={text!r}"
        if text == PER_TOKEN:
            out.append(None)
            continue
        try:
            if not text.startswith("g"):
                raise ValueError
            group = int(text[1:])
        except ValueError:
            raise ValueError(f"{where}: expected per_token or g<group size> (per-group "
                             "activation scales, e.g. g128, g32)") from None
        if group < 2:
            raise ValueError(f"{where}: a group holds at least 2 input channels")
        out.append(group)
    if not out:
        raise ValueError("--config.act_granularities: expected at least one (per_token for "
                         "the usual per-token rows)")
    if len(set(out)) != len(out):
        raise ValueError(f"--config.act_granularities={','.join(map(str, values))}: "
                         "duplicate entries")
    return tuple(out)


def ints(values, key: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool) or float(v) != int(float(v)):
                raise ValueError
            out.append(int(float(v)))
        except ValueError:
            raise ValueError(f"{key}[{i}]={v!r}: expected an integer number of bits") from None
    if len(set(out)) != len(out):
        raise ValueError(f"{key}={','.join(map(str, out))}: duplicate entries")
    return tuple(out)


def budgets(values) -> tuple[float, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise ValueError
            b = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"--config.bits_budgets[{i}]={v!r}: expected a mean number of "
                             "weight bits, e.g. 3.0 or 3.5") from None
        if not b > 0:
            raise ValueError(f"--config.bits_budgets[{i}]={v!r}: expected a positive number "
                             "of bits")
        out.append(b)
    if len(set(out)) != len(out):
        raise ValueError(f"--config.bits_budgets={','.join(f'{b:g}' for b in out)}: duplicate "
                         "entries")
    return tuple(out)


# Extra weight-activation rows by name (`--config.wa_rows=quarot-w4a4+kv4,...`); a row may
# also be a mapping {name, method, bits[, act_bits], quantize: {main-job key: value}}.
# IA-AQ searches on masked calibration and for K and V: the setting that lowered KL to FP on
# tiny-dream in docs/weight_activation.md (the reference studies publish none).
WA_ROWS = {
    "quarot-w4a4+kv4": dict(name="kv4", method="quarot", bits=4,
                            quantize={"act.kv.bits": 4}),
    "quarot-w4a4+kv4-iaaq": dict(name="kv4-iaaq", method="quarot", bits=4, quantize={
        "act.kv.bits": 4, "act.iaaq.enabled": True, "act.iaaq.search_keys": True,
        "calibration": "masked"}),
}
_ROW_KEYS = ("name", "method", "bits", "act_bits", "quantize")
_WO_ROW_KEYS = ("name", "method", "bits", "quantize")

# Extra weight-only rows by name (`--config.rows=router4,...`): which parts of a MoE model are
# quantized (`--config.moe.parts`, the rest kept in float) and the routers' width
# (`--config.moe.quantize_router / router_bits`), each beside RTN at W4; a row may also be a
# mapping {name, method, bits, quantize: {main-job key: value}}.
WO_ROWS = {
    "experts-only": dict(name="experts-only", method="rtn", bits=4,
                         quantize={"moe.parts": ("experts",)}),
    "attention-only": dict(name="attention-only", method="rtn", bits=4,
                           quantize={"moe.parts": ("attention",)}),
    "router8": dict(name="router8", method="rtn", bits=4,
                    quantize={"moe.quantize_router": True, "moe.router_bits": 8}),
    "router4": dict(name="router4", method="rtn", bits=4,
                    quantize={"moe.quantize_router": True, "moe.router_bits": 4}),
    "router4-only": dict(name="router4-only", method="rtn", bits=4, quantize={
        "moe.quantize_router": True, "moe.router_bits": 4, "moe.parts": ()}),
}


def wa_row(entry, where: str, *, weight_only: bool = False) -> Variant:
    """One extra row: a `WA_ROWS` name or a mapping (see there); with `weight_only` (the
    study's `rows`) a `WO_ROWS` name or a mapping without `act_bits`. Keys of `quantize` are
    the main job's (`configs/quantize.py`), dotted or nested; the study checks them against
    that config (`study_spec`)."""
    named, keys = (WO_ROWS, _WO_ROW_KEYS) if weight_only else (WA_ROWS, _ROW_KEYS)
    if isinstance(entry, str):
        if entry not in named:
            raise ValueError(f"{where}={entry!r}: unknown row; built-in rows: "
                             f"{sorted(named)} (or a mapping with keys {keys})")
        entry = named[entry]
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a row name or a mapping, got {entry!r}")
    for k in entry:
        if k not in keys:
            raise ValueError(f"{where}.{k}: unknown key; expected {keys}")
    for k in ("name", "method", "bits"):
        if k not in entry:
            raise ValueError(f"{where}: missing {k!r} (keys: {_ROW_KEYS})")
    name = str(entry["name"])
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"{where}.name={name!r}: expected letters, digits, '-', '_', '.'")
    quantize = entry.get("quantize", {}) or {}
    quantize = quantize.to_dict() if hasattr(quantize, "to_dict") else dict(quantize)
    bits = int(entry["bits"])
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flatten_keys(quantize).items()}
    act_bits = None if weight_only else int(entry.get("act_bits", bits))
    return Variant(str(entry["method"]), bits, act_bits, name=name,
                   overrides=tuple(sorted(flat.items())))  # hashable: a Variant keys dicts


def flatten_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
