"""The study's cells: what a study config asks for, as frozen specs.

`study_spec(cfg)` turns a `configs/study.py` config (with `apply_study_overrides`) into a
`StudySpec`: the models, the variants (fp, every weight-only (method, bits) and (method, bit
budget), every weight-activation (wa_method, W<b>A<a>, activation granularity) and the extra
`wa_rows`), the tasks and the decoding settings. Each variant's main-job config is
`quantize_config`; a cell is keyed by

    model | method | w<bits>[a<act_bits>][-ag<act group>] or wmix<budget>
          | <hash of the study's quantize settings> | task | <task spec hash>

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
from qdlm_jax.jobs.study_rows import (
    BUDGET_METHODS,
    FP,
    PER_TOKEN,
    Decoding,
    Variant,
    act_granularities,
    budgets,
    decoding_setting,
    flatten_keys,
    ints,
    wa_row,
)

RESULTS = "results.jsonl"


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
    rows: tuple[Variant, ...] = ()  # extra named weight-only rows (MoE parts, ...): wa_row()
    # Activation bits of the WA rows (empty: each row's weight bits, W<b>A<b>).
    wa_act_bits: tuple[int, ...] = ()
    # Activation granularities of the WA rows: None per token, g per group of g channels.
    act_groups: tuple[int | None, ...] = (None,)
    bits_budgets: tuple[float, ...] = ()  # mixed-precision rows of every weight-only method
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
        for m in self.methods:
            v += [Variant(m, b) for b in self.bits]
            v += [Variant(m, budget=x) for x in self.bits_budgets]
        return v + list(self.rows) + [
            Variant(m, b, a, act_group=g) for m in self.wa_methods for b in self.wa_bits
            for a in (self.wa_act_bits or (b,)) for g in self.act_groups] + list(self.wa_rows)


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
    only = tuple(str(n).strip() for n in cfg.get("only_tasks", ()) if str(n).strip())
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--config.only_tasks: {unknown} are not tasks of --config.tasks "
                         f"({', '.join(names)})")
    if only:
        tasks = tuple(t for t in tasks if t.name in only)
    bits = tuple(int(b) for b in cfg.bits)
    wa_bits = tuple(int(b) for b in cfg.get("wa_bits", ()))
    wa_methods = tuple(cfg.get("wa_methods", ()))
    if wa_methods and not wa_bits:
        raise ValueError(f"--config.wa_methods={','.join(wa_methods)}: expected "
                         "--config.wa_bits too (e.g. 8,4 for W8A8 and W4A4)")
    wa_act_bits = ints(cfg.get("wa_act_bits", ()), "--config.wa_act_bits")
    act_groups = act_granularities(cfg.get("act_granularities", (PER_TOKEN,)))
    bits_budgets = budgets(cfg.get("bits_budgets", ()))
    methods = tuple(cfg.methods)
    if (wa_act_bits or act_groups != (None,)) and not wa_methods:
        key = "--config.wa_act_bits" if wa_act_bits else "--config.act_granularities"
        raise ValueError(f"{key}: sets the weight-activation rows (--config.wa_methods), and "
                         "there are none")
    if bits_budgets:
        text = "--config.bits_budgets=" + ",".join(f"{b:g}" for b in bits_budgets)
        if not methods:
            raise ValueError(f"{text}: adds mixed-precision rows to the weight-only methods "
                             "(--config.methods), and there are none")
        other = [m for m in methods if m not in BUDGET_METHODS]
        if other:
            raise ValueError(f"{text}: mixed precision spreads the widths of "
                             f"{', '.join(BUDGET_METHODS)}; --config.methods also has "
                             f"{', '.join(other)} (run it in a study of its own)")

    def to_dict(x):
        return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    spec = StudySpec(models=models, methods=methods, bits=bits, tasks=tasks,
                     include_fp=bool(cfg.include_fp), out_dir=str(cfg.out_dir),
                     quantize_config=str(cfg.quantize_config),
                     quantize=to_dict(cfg.quantize), method_overrides={
                         k: to_dict(v) for k, v in to_dict(cfg.method_overrides).items()},
                     wa_methods=wa_methods, wa_bits=wa_bits, wa_act_bits=wa_act_bits,
                     act_groups=act_groups, bits_budgets=bits_budgets,
                     wa_quantize=to_dict(cfg.get("wa_quantize", {})),
                     wa_rows=tuple(wa_row(r, f"--config.wa_rows[{i}]")
                                   for i, r in enumerate(cfg.get("wa_rows", ()))),
                     rows=tuple(wa_row(r, f"--config.rows[{i}]", weight_only=True)
                                for i, r in enumerate(cfg.get("rows", ()))),
                     dtype=str(cfg.dtype), progress=bool(cfg.get("progress", True)),
                     decoding=tuple(decoding_setting(d, f"--config.decoding[{i}]")
                                    for i, d in enumerate(cfg.get("decoding", ()))),
                     decoding_rows=tuple(str(r) for r in cfg.get("decoding_rows", ())))
    labels = [v.label for v in spec.variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--config.rows / wa_rows: two rows share a label: {labels}")
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
    if act_groups != (None,):
        _check_act_groups(spec)
    rows = {v: f"--config.wa_rows[{i}] ({v.label})" for i, v in enumerate(spec.wa_rows)}
    rows.update({v: f"--config.rows[{i}] ({v.label})" for i, v in enumerate(spec.rows)})
    for v in spec.variants:  # the job validates method / bits / overrides up front
        if v.method != FP:
            from qdlm_jax.jobs.quantize_spec import job_spec
            try:
                job_spec(quantize_config(spec, models[0], v))
            except ValueError as e:
                if v in rows:
                    raise ConfigOverrideError(f"{rows[v]}: {e}") from None
                if v.budget is not None:
                    raise ConfigOverrideError(f"--config.bits_budgets={v.budget:g} (row "
                                              f"{v.label}): {e}") from None
                if v.act_bits is not None and (spec.wa_act_bits or v.act_group is not None):
                    raise ConfigOverrideError(f"row {v.label}: {e}") from None
                raise
    return spec


def _check_act_groups(spec: StudySpec) -> None:
    """Every activation group size divides every linear input width of every model (the
    job checks the same after loading the model; here before any cell runs), and the
    granularity is set by `act_granularities` alone."""
    from qdlm_jax.checkpoints.load import read_model_config
    for key, where in (("wa_quantize", spec.wa_quantize), *(
            (f"method_overrides.{m}", spec.method_overrides.get(m, {}))
            for m in spec.wa_methods)):
        act = where.get("act", {}) if isinstance(where.get("act"), dict) else {}
        set_here = [k for k in ("granularity", "group_size") if k in act] + [
            k[len("act."):] for k in where if k in ("act.granularity", "act.group_size")]
        if set_here:
            raise ValueError(f"--config.{key}.act.{set_here[0]}: the activation granularity "
                             "of the weight-activation rows is --config.act_granularities' "
                             "(per_token,g128,...); set it there only")
    for model in spec.models:
        c = read_model_config(model)
        widths = {"hidden_size": getattr(c, "hidden_size", None),
                  "attention output (heads x head dim)":
                      getattr(c, "num_heads", 0) * getattr(c, "head_dim", 0) or None,
                  "intermediate_size": getattr(c, "intermediate_size", None)}
        for g in (g for g in spec.act_groups if g is not None):
            for name, width in widths.items():
                if width and width % g:
                    raise ValueError(f"--config.act_granularities: g{g} does not divide "
                                     f"{Path(model).name}'s {name} {width} (a linear's input "
                                     "width); use a divisor of it")


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
                          flatten_keys(flat).items()])
    return cfg


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
    variant adds `act_bits` and the study's `wa_quantize` overrides, then its activation
    groups; a budget row sets `bits_budget` instead of `bits`; an extra row its own
    overrides last)."""
    width = {"bits": v.bits} if v.budget is None else {"bits_budget": v.budget}
    out = {"method": v.method, **width, **spec.quantize}
    if v.act_bits is not None:
        out = _merge(out, {"act_bits": v.act_bits, **spec.wa_quantize})
    out = _merge(out, spec.method_overrides.get(v.method, {}))
    if v.act_group is not None:
        out = _merge(out, {"act": {"granularity": "per_group", "group_size": v.act_group}})
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
