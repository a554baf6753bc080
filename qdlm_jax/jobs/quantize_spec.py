"""The quantize job's settings: `job_spec(cfg) -> JobSpec`, every flag checked before any work.

`JobSpec` holds the weight-only (`PTQSpec`) or weight-activation (`WASpec`) spec, the
calibration (`CalibSpec`), the evaluation settings, an optional bit budget and the MoE
settings of a DiffusionGemma run; `run_name` names the run directory from all of them. Errors
name the flag a user sets (`--config.group_size`, not `QuantSpec.group_size`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from qdlm_jax.checkpoints.load import read_model_config, resolve_checkpoint
from qdlm_jax.data import sources
from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.evals.tasks import BUILTIN, MCTask
from qdlm_jax.fsutil import settings_digest
from qdlm_jax.jobs.config_flags import project_path
from qdlm_jax.jobs.quantize_gemma import check_gemma
from qdlm_jax.jobs.streaming import can_stream
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.bit_alloc import BudgetSpec
from qdlm_jax.quant.calibration import CalibSpec
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec
from qdlm_jax.quant.gemma_gptq import DAQOptions, GemmaGPTQSettings
from qdlm_jax.quant.gemma_plan import PARTS
from qdlm_jax.quant.gptq_experts_core import ThinExperts
from qdlm_jax.quant.kv_core import KVSpec
from qdlm_jax.quant.layerwise import METHODS, PTQSpec
from qdlm_jax.quant.quantizer_core import QuantSpec
from qdlm_jax.quant.wa import WA_METHODS, WASpec, check_act_widths

ALL_METHODS = METHODS + tuple(m for m in WA_METHODS if m not in METHODS)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    model: str
    out_dir: str
    ptq: PTQSpec
    calib: CalibSpec
    source: str
    eval_windows: int
    eval_mc_num: int
    eval_arith_n: int
    skip_fp: bool
    save: bool
    stream: str = "auto"  # "auto" | "true" | "false" (`use_streaming`)
    eval_tasks: tuple[str, ...] = ()  # built-in tasks scored beside the bound (`eval_task_specs`)
    eval_task_limit: int = 100
    wa: WASpec | None = None  # weight-activation PTQ (activations quantized) when set
    budget: BudgetSpec | None = None  # mixed precision: widths per block from a bit plan
    config: dict = dataclasses.field(default_factory=dict, compare=False)  # resolved config
    overwrite: bool = False  # redo a finished run instead of reusing its results
    quantize_router: bool = False  # MoE models: quantize the router projections too
    router_bits: int = 0  # MoE models: a quantized router's width (0: the weight bits)
    moe_parts: tuple[str, ...] = tuple(PARTS)  # MoE models: the parts quantized
    moe_gptq: GemmaGPTQSettings = GemmaGPTQSettings()  # MoE models: GPTQ's calibration

    @property
    def method(self) -> str:
        if self.wa is None:
            return self.ptq.method
        return self.wa.method if self.wa.method != "rtn" else self.wa.weight_quantizer

    @property
    def act_bits(self) -> int:
        return 16 if self.wa is None else self.wa.act.bits

    @property
    def act_group_size(self) -> int | None:
        """Input channels per activation scale (`per_group`), None otherwise."""
        act = None if self.wa is None else self.wa.act
        return act.group_size if act is not None and act.granularity == "per_group" else None

    @property
    def needs_calibration(self) -> bool:
        return (self.ptq if self.wa is None else self.wa).needs_calibration

    @property
    def weight_bits(self) -> str:
        """The weights' width as run names and logs show it: "3", or "mix3.5" under a bit
        budget of 3.5."""
        return (str(self.ptq.weight.bits) if self.budget is None
                else f"mix{self.budget.budget:g}")

    @property
    def config_hash(self) -> str:
        """8 hex digits of sha256 over the resolved config (where results go excluded)."""
        keyed = {k: v for k, v in self.config.items() if k not in ("out_dir", "overwrite")}
        if keyed.get("bits_budget") is None:  # uniform runs keep the hash they had before
            keyed = {k: v for k, v in keyed.items() if k not in ("bits_budget", "mixed")}
        if _moe_at_defaults(keyed.get("moe")):  # so do runs with the MoE settings' defaults
            keyed = {k: v for k, v in keyed.items() if k != "moe"}
        return settings_digest(keyed, 8)

    @property
    def run_name(self) -> str:
        """`<model>-<method>-w<bits>[a<bits>[ag<act group>]]g<group>-<calibration>-<config
        hash>` (w<bits> is wmix<budget> under a bit budget): two runs share a directory only
        when every setting is the same."""
        g = self.ptq.weight.group_size
        cal = self.calib.mode if self.needs_calibration else "nocal"
        a = "" if self.wa is None else f"a{self.act_bits}"
        if self.act_group_size is not None:
            a += f"ag{self.act_group_size}"
        if self.wa is not None and self.wa.kv is not None:
            a += f"kv{self.wa.kv.bits}" + ("-iaaq-" if self.wa.iaaq else "")
        return (f"{model_label(self.model)}-{self.method}-w{self.weight_bits}{a}g{g}-{cal}"
                f"-{self.config_hash}")


def model_label(path: str) -> str:
    """A readable name for a checkpoint path (a packed model's `model/` dir takes its run's
    name)."""
    p = Path(path).resolve()
    if p.parent.name == "snapshots":  # a hub id's snapshot in the Hugging Face cache
        return p.parent.parent.name.split("--")[-1]
    return p.parent.name if p.name == "model" else p.name


# Spec field -> the flag a user sets, for error messages that name the flag.
_FLAG_NAMES = {"QuantSpec.": "--config.", "CalibSpec.mode": "--config.calibration",
               "CalibSpec.": "--config.calib.", "ActSpec.bits": "--config.act_bits",
               "ActSpec.": "--config.act.", "KVSpec.": "--config.act.kv.",
               "PTQSpec.": "--config.", "BudgetSpec.budget": "--config.bits_budget",
               "BudgetSpec.": "--config.mixed."}


def job_spec(cfg: ml_collections.ConfigDict) -> JobSpec:
    """Validates the whole config up front (one clear error naming the flag, before any
    work)."""
    try:
        return _job_spec(cfg)
    except ValueError as e:
        text = str(e)
        for spec_name, flag in _FLAG_NAMES.items():
            text = text.replace(spec_name, flag)
        if text == str(e):
            raise
        raise ConfigOverrideError(text) from None


def check_family(spec: JobSpec) -> str:
    """The checkpoint's family; refuses, in one line, a family the quantize passes do not
    handle and, on DiffusionGemma, what its pass does not do yet (`check_gemma`)."""
    config = read_model_config(spec.model)
    family = config.family
    if family == GEMMA_FAMILY:
        check_gemma(spec, config)
        return family
    if family not in ("llada", "dream"):
        raise ConfigOverrideError(f"--config.model={spec.model}: a {family} model; qdlm "
                                  "quantize handles LLaDA, Dream and DiffusionGemma checkpoints")
    if spec.quantize_router:
        raise ConfigOverrideError(f"--config.moe.quantize_router=true: {spec.model} is a "
                                  f"{family} model, which has no router")
    if spec.moe_parts != tuple(PARTS):
        raise ConfigOverrideError(f"--config.moe.parts={','.join(spec.moe_parts)}: {spec.model} "
                                  f"is a {family} model, which has no experts")
    return family


def _job_spec(cfg: ml_collections.ConfigDict) -> JobSpec:
    if cfg.method not in ALL_METHODS:
        raise ValueError(f"--config.method={cfg.method!r}: expected one of {ALL_METHODS}")
    weight = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                       clip_ratio=cfg.clip_ratio)
    wa = _wa_spec(cfg, weight)
    ptq = PTQSpec(method=cfg.method if cfg.method in METHODS else "rtn", weight=weight,
                  damp=cfg.gptq.damp,
                  block_size=cfg.gptq.block_size, act_order=cfg.gptq.act_order,
                  static_groups=cfg.gptq.static_groups, awq_grid=cfg.awq.grid,
                  awq_clip=cfg.awq.clip,
                  daq_ratio=cfg.daq.abmp_ratio, daq_iters=cfg.daq.iters,
                  daq_salient=cfg.daq.salient, daq_data_weight=cfg.daq.data_weight,
                  daq_compensate=cfg.daq.compensate, daq_refit=cfg.daq.refit,
                  daq_abmp_check=cfg.daq.abmp_check)
    c = cfg.calib
    calib = CalibSpec(mode=cfg.calibration, n_samples=c.n_samples, seq_len=c.seq_len,
                      prefix_frac=c.prefix_frac, certainty_weights=c.certainty_weights,
                      unmasked_weight=c.unmasked_weight, trajectory_steps=c.trajectory_steps,
                      seed=c.seed)
    model = project_path(cfg.model)
    if not model.exists():  # a hub id, through the Hugging Face cache
        model = resolve_checkpoint(cfg.model)
        if not model.exists():
            raise FileNotFoundError(f"--config.model={cfg.model}: no such checkpoint directory")
    return JobSpec(model=str(model), out_dir=cfg.out_dir, ptq=ptq, calib=calib,
                   source=sources.resolve_source(c.source),
                   eval_windows=cfg.eval.n_windows, eval_mc_num=cfg.eval.mc_num,
                   eval_arith_n=cfg.eval.arith_n, skip_fp=cfg.eval.skip_fp, save=cfg.save,
                   eval_tasks=_eval_tasks(cfg.eval.get("tasks", ())),
                   eval_task_limit=int(cfg.eval.get("task_limit", 100)),
                   stream=_stream_setting(cfg.get("stream", "auto")),
                   wa=wa, budget=_budget_spec(cfg),
                   config={**cfg.to_dict(), "model": str(model)},
                   overwrite=bool(cfg.get("overwrite", False)),
                   quantize_router=_quantize_router(cfg), moe_gptq=_moe_gptq(cfg),
                   **_moe_plan(cfg))


# `--config.moe` as the config file sets it: a run at these values keeps the hash it had
# before the MoE settings existed
MOE_DEFAULTS = dict(quantize_router=False, router_bits=0, parts=tuple(PARTS),
                    calib_modes="both", levels=(0.25, 0.5, 0.75, 1.0), self_condition=True,
                    thin_min_rows=16, thin_fallback="damp", thin_damp=0.1)


def _moe_at_defaults(moe) -> bool:
    moe = dict(moe or {})
    if "levels" in moe:
        moe["levels"] = tuple(moe["levels"])
    return all(moe.get(k, v) == v for k, v in MOE_DEFAULTS.items())


def _moe_settings(cfg: ml_collections.ConfigDict) -> dict:
    """`--config.moe` over MOE_DEFAULTS (a config without the section gets the defaults)."""
    return {**MOE_DEFAULTS, **dict(cfg.get("moe", None) or {})}


def _moe_gptq(cfg: ml_collections.ConfigDict) -> GemmaGPTQSettings:
    """GPTQ's (and DAQ's) MoE settings (`--config.moe.*` with `--config.gptq.damp /
    block_size` and `--config.daq.*`)."""
    moe = _moe_settings(cfg)
    try:
        thin = ThinExperts(min_rows=moe["thin_min_rows"], fallback=moe["thin_fallback"],
                           thin_damp=moe["thin_damp"])
        calib = GemmaCalibSpec(modes=moe["calib_modes"], levels=tuple(moe["levels"]),
                               self_condition=bool(moe["self_condition"]), seed=cfg.calib.seed)
    except ValueError as e:
        raise ConfigOverrideError(f"--config.moe: {e}") from None
    d = cfg.daq
    daq = DAQOptions(ratio=d.abmp_ratio, iters=d.iters, salient=d.salient,
                     data_weight=d.data_weight, compensate=d.compensate, refit=d.refit,
                     abmp_check=d.abmp_check)
    return GemmaGPTQSettings(damp=cfg.gptq.damp, block_size=cfg.gptq.block_size, thin=thin,
                             calib=calib, daq=daq)


def _moe_plan(cfg: ml_collections.ConfigDict) -> dict:
    """{"router_bits", "moe_parts"} of `--config.moe.router_bits / parts`, checked."""
    moe = _moe_settings(cfg)
    bits, parts = moe["router_bits"], moe["parts"]
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    if bits not in (0, 2, 3, 4, 8) or isinstance(bits, bool):
        raise ConfigOverrideError(f"--config.moe.router_bits={bits!r}: expected 0 (the weight "
                                  "bits), 2, 3, 4 or 8")
    if bits and not moe["quantize_router"]:
        raise ConfigOverrideError(f"--config.moe.router_bits={bits}: the routers are kept; "
                                  "add --config.moe.quantize_router=true")
    if any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigOverrideError(f"--config.moe.parts={','.join(parts)}: expected distinct "
                                  f"names among {','.join(PARTS)}")
    return {"router_bits": int(bits), "moe_parts": parts}


def _quantize_router(cfg: ml_collections.ConfigDict) -> bool:
    value = (cfg.get("moe", None) or {}).get("quantize_router", False)
    if not isinstance(value, bool):
        raise ConfigOverrideError(f"--config.moe.quantize_router={value!r}: expected true or "
                                  "false")
    return value


def _budget_spec(cfg: ml_collections.ConfigDict) -> BudgetSpec | None:
    """`--config.bits_budget` (None: uniform `bits`) with `--config.mixed.*`."""
    value = cfg.get("bits_budget", None)
    if value is None:
        return None
    if cfg.method not in ("rtn", "gptq", "awq") or cfg.get("act_bits", 16) != 16:
        why = (" (daq's bits are a mean number of binary planes, which ABMP already moves "
               "between each matrix's column blocks)" if cfg.method == "daq" else "")
        raise ConfigOverrideError(f"--config.bits_budget={value}: mixed precision spreads the "
                                  "widths of weight-only rtn, gptq or awq (act_bits 16); "
                                  f"method={cfg.method} act_bits={cfg.get('act_bits', 16)} "
                                  f"takes uniform --config.bits{why}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigOverrideError(f"--config.bits_budget={value!r}: expected a number of bits "
                                  "(e.g. 3.5) or None")
    mixed = cfg.get("mixed", None) or {}
    return BudgetSpec(budget=float(value), widths=tuple(mixed.get("widths", (2, 3, 4, 8))),
                      samples=int(mixed.get("samples", 8)), seed=cfg.calib.seed)


def _stream_setting(value) -> str:
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigOverrideError(f"--config.stream={value!r}: expected auto, true or false")
    return text


def _wa_spec(cfg: ml_collections.ConfigDict, weight: QuantSpec) -> WASpec | None:
    """The weight-activation spec, or None for weight-only PTQ (act_bits 16 and a
    weight-only method)."""
    act_bits = cfg.get("act_bits", 16)
    if act_bits not in (16, 8, 4):
        raise ValueError(f"--config.act_bits={act_bits!r}: expected 16 (float), 8 or 4")
    kv_cfg = cfg.act.get("kv", None)
    kv = None
    if kv_cfg is not None and kv_cfg.bits != 16:
        kv = KVSpec(bits=kv_cfg.bits, granularity=kv_cfg.granularity, sym=kv_cfg.sym,
                    group_size=kv_cfg.group_size)
    ia = cfg.act.get("iaaq", None)
    if cfg.method in METHODS and act_bits == 16:
        if kv is not None or (ia is not None and ia.enabled):
            raise ValueError("--config.act.kv.bits / --config.act.iaaq.enabled quantize keys "
                             "and values of a weight-activation method: set "
                             "--config.act_bits=8 or 4 (rtn, gptq, smoothquant, quarot, "
                             "duquant)")
        return None
    if cfg.method in ("awq", "daq"):
        raise ValueError(f"--config.method={cfg.method} quantizes weights only; with "
                         f"--config.act_bits={act_bits} use rtn, gptq, smoothquant, quarot or "
                         "duquant")
    a, w = cfg.act, cfg.wa
    act = None if act_bits == 16 else ActSpec(bits=act_bits, granularity=a.granularity,
                                              sym=a.sym, clip_ratio=a.clip_ratio,
                                              group_size=a.get("group_size", 128))
    if act is None:
        raise ValueError(f"--config.method={cfg.method} needs --config.act_bits=8 or 4")
    method = cfg.method if cfg.method in WA_METHODS and cfg.method != "rtn" else "rtn"
    quantizer = cfg.method if cfg.method in ("rtn", "gptq") else w.weight_quantizer
    return WASpec(method=method, weight=weight, act=act, weight_quantizer=quantizer,
                  alpha=w.alpha, block=w.block, rotation_steps=w.rotation_steps,
                  online_heads=w.online_heads, quantize_lm_head=w.quantize_lm_head, seed=w.seed,
                  damp=cfg.gptq.damp, block_size=cfg.gptq.block_size, kv=kv,
                  iaaq=bool(ia is not None and ia.enabled),
                  iaaq_keys=bool(ia is not None and ia.search_keys),
                  iaaq_grid=10 if ia is None else ia.grid,
                  iaaq_lowest=0.55 if ia is None else ia.lowest)


def check_weight_widths(config, ptq: PTQSpec):
    c = config
    for name, width in (("hidden_size", c.hidden_size), ("o_proj input", c.num_heads * c.head_dim),
                        ("intermediate_size", c.intermediate_size)):
        try:
            ptq.weight.check_width(width)
        except ValueError:
            raise ValueError(f"--config.group_size={ptq.weight.group_size} does not divide the "
                             f"model's {name}={width}; use -1 or a divisor of {width}") from None


def check_activation_widths(model, spec: JobSpec) -> None:
    """A per-group activation size that does not divide some linear's input width, as a flag
    error naming the linear (before calibration or evaluation)."""
    if spec.wa is None:
        return
    try:
        check_act_widths(model, spec.wa)
    except ValueError as e:
        raise ConfigOverrideError(str(e).replace("ActSpec.", "--config.act.").replace(
            "KVSpec.", "--config.act.kv.")) from None


def _eval_tasks(value) -> tuple[str, ...]:
    """`--config.eval.tasks`: built-in task names (a comma-separated string or a sequence)."""
    names = tuple(n.strip() for n in (value.split(",") if isinstance(value, str) else value)
                  if n.strip())
    for n in names:
        if n not in BUILTIN:
            raise ConfigOverrideError(f"--config.eval.tasks: {n!r} is not a built-in task; "
                                      f"expected names from {sorted(BUILTIN)}")
    return names


def eval_task_specs(spec: JobSpec) -> list:
    """The extra tasks at `eval_task_limit` items (multiple choice: 16 Monte Carlo samples)."""
    out = []
    for name in spec.eval_tasks:
        t = dataclasses.replace(BUILTIN[name], limit=spec.eval_task_limit)
        if isinstance(t, MCTask):
            t = dataclasses.replace(t, mc_num=16, batch_size=16)
        out.append(t)
    return out


def use_streaming(spec: JobSpec) -> bool:
    """`stream`: "true", "false", or "auto" = a weight-only method on a hub checkpoint
    directory of more than 2 GiB (the in-memory pass also gives fp figures and KL to fp)."""
    if spec.stream == "false":
        return False
    possible = spec.wa is None and can_stream(spec.model)
    if spec.stream == "true":
        if not possible:
            raise ConfigOverrideError(
                f"--config.stream=true: streaming quantizes weight-only methods (rtn, gptq, "
                f"awq, daq) of a hub checkpoint directory; {spec.model} with method="
                f"{spec.method} act_bits={spec.act_bits} is not one (use --config.stream=false)")
        return True
    size = sum(f.stat().st_size for f in Path(spec.model).glob("*") if f.is_file())
    return possible and size > 2 * 2**30


