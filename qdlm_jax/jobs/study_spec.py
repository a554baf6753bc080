"""The study's cells: what a study config asks for, as frozen specs.

`study_spec(cfg)` turns a `configs/study.py` config (with `apply_study_overrides`) into a
`StudySpec`: the models, the variants (fp, every weight-only (method, bits), every
weight-activation (wa_method, WxAx) and the extra `wa_rows`), the tasks and the decoding
settings. Each variant's main-job config is `quantize_config`; a cell is keyed by

    model | method | w<bits>[a<act_bits>] | <hash of the study's quantize settings>
          | task | <task spec hash>

(`cell_key`), so changing a task's settings or the study's quantizer settings (`quantize`,
`method_overrides`) makes new cells instead of reusing old ones. Defaults inside
configs/quantize.py are not part of the key (a new key added there with a default must not
throw away hours of finished cells); every result line records the full resolved config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.evals.tasks import TaskSpec, resolve_task, spec_hash
from qdlm_jax.fsutil import settings_digest

FP = "fp"
RESULTS = "results.jsonl"
# Keys of the quantize config that do not change the quantized model.


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

    @property
    def bits_text(self) -> str:
        text = "-" if self.bits is None else (
            f"w{self.bits}" if self.act_bits is None else f"w{self.bits}a{self.act_bits}")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySpec:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    bits: tuple[int, ...]
    tasks: tuple[TaskSpec, ...]
    include_fp: bool = True
    out_dir: str = "runs/study"
    quantize_config: str = "configs/quantize.py"
    quantize: dict = dataclasses.field(default_factory=dict)  # overrides for every method
    method_overrides: dict = dataclasses.field(default_factory=dict)  # {method: overrides}
    wa_methods: tuple[str, ...] = ()  # weight-activation methods, run at W<b>A<b>
    wa_bits: tuple[int, ...] = ()
    wa_quantize: dict = dataclasses.field(default_factory=dict)  # overrides for WA variants
    wa_rows: tuple[Variant, ...] = ()  # extra named WA rows (K/V bits, IA-AQ, ...): wa_row()
    dtype: str = "float32"
    progress: bool = True
    # The decoding dimension: each setting runs every generation task again on the rows
    # whose labels are in `decoding_rows` (empty: every row).
    decoding: tuple[Decoding, ...] = ()
    decoding_rows: tuple[str, ...] = ()

    def tasks_for(self, v: Variant) -> list[TaskSpec]:
        """The tasks of one row: the study's, plus the decoded generation tasks if the
        decoding dimension selects the row."""
        tasks = list(self.tasks)
        if self.decoding and (not self.decoding_rows or v.label in self.decoding_rows):
            tasks += [d.apply(t) for d in self.decoding for t in self.tasks
                      if getattr(t, "gen", None) is not None]
        return tasks

    @property
    def all_tasks(self) -> list[TaskSpec]:
        """The table's columns: the study's tasks, then every decoded task."""
        return list(self.tasks) + [d.apply(t) for d in self.decoding for t in self.tasks
                                   if getattr(t, "gen", None) is not None]

    @property
    def variants(self) -> list[Variant]:
        v = [Variant(FP)] if self.include_fp else []
        v += [Variant(m, b) for m in self.methods for b in self.bits]
        return v + [Variant(m, b, b) for m in self.wa_methods for b in self.wa_bits] + list(
            self.wa_rows)


def study_spec(cfg) -> StudySpec:
    """Validates a `configs/study.py` config (one clear error before any work)."""
    from qdlm_jax.checkpoints.load import resolve_checkpoint

    models = tuple(cfg.models)
    if not models:
        raise ValueError("--config.models: expected at least one model path")
    models = tuple(m if Path(m).exists() else str(resolve_checkpoint(m)) for m in models)
    for m in models:
        if not Path(m).exists():
            raise FileNotFoundError(f"--config.models: {m}: no such checkpoint directory")
    tasks = tuple(resolve_task(t, f"--config.tasks[{i}]") for i, t in enumerate(cfg.tasks))
    if not tasks:
        raise ValueError("--config.tasks: expected at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--config.tasks: duplicate task names {names}")
    bits = tuple(int(b) for b in cfg.bits)
    wa_bits = tuple(int(b) for b in cfg.get("wa_bits", ()))
    wa_methods = tuple(cfg.get("wa_methods", ()))
    if wa_methods and not wa_bits:
        raise ValueError(f"--config.wa_methods={','.join(wa_methods)}: expected "
                         "--config.wa_bits too (e.g. 8,4 for W8A8 and W4A4)")
    def to_dict(x):
        return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    spec = StudySpec(models=models, methods=tuple(cfg.methods), bits=bits, tasks=tasks,
                     include_fp=bool(cfg.include_fp), out_dir=str(cfg.out_dir),
                     quantize_config=str(cfg.quantize_config),
                     quantize=to_dict(cfg.quantize), method_overrides={
                         k: to_dict(v) for k, v in to_dict(cfg.method_overrides).items()},
                     wa_methods=wa_methods, wa_bits=wa_bits,
                     wa_quantize=to_dict(cfg.get("wa_quantize", {})),
                     wa_rows=tuple(wa_row(r, f"--config.wa_rows[{i}]")
                                   for i, r in enumerate(cfg.get("wa_rows", ()))),
                     dtype=str(cfg.dtype), progress=bool(cfg.get("progress", True)),
                     decoding=tuple(decoding_setting(d, f"--config.decoding[{i}]")
                                    for i, d in enumerate(cfg.get("decoding", ()))),
                     decoding_rows=tuple(str(r) for r in cfg.get("decoding_rows", ())))
    labels = [v.label for v in spec.variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--config.wa_rows: two rows share a label: {labels}")
    if spec.decoding:
        unknown = sorted(set(spec.decoding_rows) - set(labels))
        if unknown:
            raise ValueError(f"--config.decoding_rows: {unknown} are not rows of this study; "
                             f"its rows: {labels}")
        if not any(getattr(t, "gen", None) is not None for t in tasks):
            raise ValueError("--config.decoding: no task of this study generates text "
                             "(math or code); the decoding settings would change nothing")
        names = [d.name for d in spec.decoding]
        if len(set(names)) != len(names):
            raise ValueError(f"--config.decoding: duplicate setting names {names}")
    rows = {v: f"--config.wa_rows[{i}] ({v.label})" for i, v in enumerate(spec.wa_rows)}
    for v in spec.variants:  # the job validates method / bits / overrides up front
        if v.method != FP:
            from qdlm_jax.jobs.quantize import job_spec
            try:
                job_spec(quantize_config(spec, models[0], v))
            except ValueError as e:
                if v not in rows:
                    raise
                raise ConfigOverrideError(f"{rows[v]}: {e}") from None
    return spec


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


def wa_row(entry, where: str) -> Variant:
    """One extra weight-activation row: a `WA_ROWS` name or a mapping (see there). Keys of
    `quantize` are the main job's (`configs/quantize.py`), dotted or nested; the study
    checks them against that config (`study_spec`)."""
    if isinstance(entry, str):
        if entry not in WA_ROWS:
            raise ValueError(f"{where}={entry!r}: unknown row; built-in rows: "
                             f"{sorted(WA_ROWS)} (or a mapping with keys {_ROW_KEYS})")
        entry = WA_ROWS[entry]
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a row name or a mapping, got {entry!r}")
    for k in entry:
        if k not in _ROW_KEYS:
            raise ValueError(f"{where}.{k}: unknown key; expected {_ROW_KEYS}")
    for k in ("name", "method", "bits"):
        if k not in entry:
            raise ValueError(f"{where}: missing {k!r} (keys: {_ROW_KEYS})")
    name = str(entry["name"])
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"{where}.name={name!r}: expected letters, digits, '-', '_', '.'")
    quantize = entry.get("quantize", {}) or {}
    quantize = quantize.to_dict() if hasattr(quantize, "to_dict") else dict(quantize)
    bits = int(entry["bits"])
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in _flatten(quantize).items()}
    return Variant(str(entry["method"]), bits, int(entry.get("act_bits", bits)), name=name,
                   overrides=tuple(sorted(flat.items())))  # hashable: a Variant keys dicts


# Study settings that hold main-job keys: `--config.wa_quantize.act.kv.bits=4` sets a key the
# study's own config does not list, checked and typed against the main job's config.
PASS_THROUGH = ("quantize", "wa_quantize", "method_overrides")


def apply_study_overrides(cfg, overrides: Sequence[str]):
    """`config_flags.apply_overrides` for a study config, plus main-job keys under
    `quantize.`, `wa_quantize.` and `method_overrides.<method>.` that the study config does
    not list yet: each must name a key of `cfg.quantize_config` (an unknown one is an error
    naming the flag) and takes that key's type. Returns the config."""
    import ml_collections

    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file

    def listed(key: str) -> bool:
        node = cfg
        for p in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                return False
            node = node[p]
        return True

    own, passed = [], []
    for item in overrides:
        key = item[len("--config."):].split("=", 1)[0] if item.startswith("--config.") else ""
        top = key.split(".", 1)[0]
        passed_through = top in PASS_THROUGH and "." in key and not listed(key)
        (passed if passed_through else own).append(item)
    apply_overrides(cfg, own)
    for item in passed:
        key, text = item[len("--config."):].split("=", 1)
        top, rest = key.split(".", 1)
        if top == "method_overrides":
            if "." not in rest:
                raise ConfigOverrideError(f"--config.{key}: expected "
                                          "--config.method_overrides.<method>.<key>=<value>")
            method, rest = rest.split(".", 1)
            path = [top, method]
        else:
            path = [top]
        job_cfg = load_config_file(cfg.quantize_config)
        try:
            apply_overrides(job_cfg, [f"--config.{rest}={text}"])
        except ConfigOverrideError as e:
            raise ConfigOverrideError(f"--config.{key}={text}: checked against the main "
                                      f"job's config {cfg.quantize_config}: {e}") from None
        node = cfg
        for p in path + rest.split(".")[:-1]:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        value = job_cfg
        for p in rest.split("."):
            value = value[p]
        node[rest.split(".")[-1]] = value
    return cfg


def quantize_config(spec: StudySpec, model: str, v: Variant):
    """The main job's config for one quantized variant."""
    from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
    cfg = load_config_file(spec.quantize_config)
    flat = {"model": model, **quant_overrides(spec, v)}
    apply_overrides(cfg, [f"--config.{k}={_override_text(val)}" for k, val in
                          _flatten(flat).items()])
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _override_text(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def _merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys set, nested mappings merged key by key (so a method's
    `calib.seed` keeps the study's `calib.n_samples`)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def _nest(flat) -> dict:
    """{"act.kv.bits": 4} -> {"act": {"kv": {"bits": 4}}}."""
    out: dict = {}
    for key, value in flat:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def quant_overrides(spec: StudySpec, v: Variant) -> dict:
    """What the study sets on the main job's config for one variant (a weight-activation
    variant adds `act_bits` and the study's `wa_quantize` overrides; an extra row its own
    overrides last)."""
    out = {"method": v.method, "bits": v.bits, **spec.quantize}
    if v.act_bits is not None:
        out = _merge(out, {"act_bits": v.act_bits, **spec.wa_quantize})
    out = _merge(out, spec.method_overrides.get(v.method, {}))
    return _merge(out, _nest(v.overrides))


def quant_hash(spec: StudySpec, model: str, v: Variant) -> str:
    """Hash of the study's settings of a variant (config file name + its overrides). The
    defaults inside the config file are not hashed, so a key added to configs/quantize.py
    with a default does not invalidate finished cells; each line records the full resolved
    config (`quantize_config`). Use a new out_dir after changing a default on purpose."""
    if v.method == FP:
        return "-"
    return settings_digest({"config": Path(spec.quantize_config).name,
                            **quant_overrides(spec, v)}, 10)


def cell_key(model: str, v: Variant, qhash: str, task: TaskSpec) -> str:
    return f"{model}|{v.method}|{v.bits_text}|{qhash}|{task.name}|{spec_hash(task)}"
