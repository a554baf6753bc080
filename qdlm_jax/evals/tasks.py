"""Task definitions: frozen specs for the four families, built-in tasks, loading from config.

A task is one of

- `LMTask` (category `language_modeling`): masked-likelihood bound on held-out text
  (metric `bits_per_token`, lower is better; `evals/lm.py`);
- `MCTask` (category `multiple_choice`): accuracy of the highest Monte Carlo likelihood
  option (metric `acc`; `evals/multiple_choice.py`);
- `MathTask` (category `math`): few-shot generation + answer extraction, exact match
  (metric `exact_match`; `evals/math_gen.py`);
- `CodeTask` (category `code`): HumanEval-format generation run in the sandbox, pass@1
  (metric `pass@1`; `evals/code_gen.py`);
- `FidelityTask` (category `fidelity`, type `fidelity`): KL of the model's predictions to a
  reference (the fp model) on held-out windows, half noised (metric `kl_bits`, lower is
  better; LLaDA / Dream: `basic.output_kl` with the mask token, DiffusionGemma:
  `canvas_kl.canvas_kl` on a clean prompt and a noised canvas, plus the share of the
  reference's top-k expert choices that change, `canvas_kl.route_changes`). It needs
  `run_task(..., reference=)`, which the study passes; it is not a built-in task of
  `qdlm eval`, which scores one model.

Generation settings are a `generate.GenerationConfig` per task holding both families'
fields (LLaDA: steps, gen_length, block_length, remasking; Dream: steps, gen_length as
max_new_tokens, alg, ...); each model reads its own family's fields. Defaults are QDLM's
evaluation settings (gsm8k: gen_length 256, steps 256, block_length 32, low-confidence
remasking, greedy; humaneval: 512 / 512 / 32; Dream: alg `entropy`, greedy; Monte Carlo
likelihood: mc_num 128).

From config (`task_from_mapping`, `load_task_file`): a mapping with `type` (`lm`,
`multiple_choice`, `math`, `code`) and the spec's fields; `gen` is a mapping of
GenerationConfig fields applied over the type's defaults; `base` names a built-in task
whose fields are the defaults. A JSON task file holds one such object or a list of them.
Unknown keys or types raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Union

from qdlm_jax.data import sources
from qdlm_jax.fsutil import settings_digest
from qdlm_jax.inference.generate import GenerationConfig

CATEGORIES = ("language_modeling", "multiple_choice", "math", "code", "fidelity")

QDLM_GSM8K_GEN = GenerationConfig(steps=256, gen_length=256, block_length=32,
                                  remasking="low_confidence", alg="entropy")
QDLM_HUMANEVAL_GEN = GenerationConfig(steps=512, gen_length=512, block_length=32,
                                      remasking="low_confidence", alg="entropy")
# The project's arithmetic task as the model cards measure it (evals/basic.py).
ARITHMETIC_GEN = GenerationConfig(steps=8, gen_length=8, block_length=8,
                                  remasking="low_confidence", alg="maskgit_plus")
# The synthetic code task (`data.synthetic`, 2 ops): a one-line body of at most 12 tokens.
SYNTHETIC_CODE_GEN = GenerationConfig(steps=12, gen_length=12, block_length=12,
                                      remasking="low_confidence", alg="maskgit_plus")


def _check(spec, positive=(), optional_positive=(), choices=None):
    """Up-front field checks: one ValueError naming the task, field and value."""
    for name in positive + optional_positive:
        v = getattr(spec, name)
        if v is None and name in optional_positive:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"task {spec.name!r}: {name}={v!r}: expected a positive integer")
    for name, allowed in (choices or {}).items():
        if getattr(spec, name) not in allowed:
            raise ValueError(f"task {spec.name!r}: {name}={getattr(spec, name)!r}: expected "
                             f"one of {allowed}")
    if hasattr(spec, "mc_num") and spec.mc_num % spec.batch_size:
        raise ValueError(f"task {spec.name!r}: mc_num={spec.mc_num} is not divisible by "
                         f"batch_size={spec.batch_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMTask:
    name: str
    category: str = "language_modeling"
    source: str = "bigbench-wikipedia"  # a data.sources name or a local text/JSONL path
    split: str = "heldout"
    seq_len: int = 128
    n_windows: int = 16
    mc_num: int = 128
    batch_size: int = 32  # Monte Carlo samples per forward pass
    seed: int = 0
    type: str = dataclasses.field(default="lm", init=False)
    metric = "bits_per_token"
    higher_is_better = False

    def __post_init__(self):
        _check(self, ("seq_len", "n_windows", "mc_num", "batch_size"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MCTask:
    name: str
    path: str  # bigbench:<task> | BIG-bench task.json | lm-eval-style .jsonl
    category: str = "multiple_choice"
    format: str = "auto"  # auto | jsonl | bigbench
    limit: int | None = None  # first `limit` items after the few-shot ones
    num_fewshot: int = 0
    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    seed: int = 0
    chat_template: str = "auto"  # auto | on | off (backends.TextModel.chat_setting)
    type: str = dataclasses.field(default="multiple_choice", init=False)
    metric = "acc"
    higher_is_better = True

    def __post_init__(self):
        _check(self, ("mc_num", "batch_size"), ("limit",),
               {"format": ("auto", "jsonl", "bigbench")})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathTask:
    name: str
    source: str  # arithmetic | gsm_symbolic | GSM8K-format .jsonl
    category: str = "math"
    limit: int | None = None
    num_fewshot: int = 4
    gen: GenerationConfig = QDLM_GSM8K_GEN
    stops: tuple[str, ...] = ("Question:", "\n\n")
    extract: str = "last"  # last | first number when there is no `#### N`
    batch_size: int = 8
    seed: int = 0
    digits: tuple[int, ...] = (2,)  # arithmetic source only
    ops: tuple[str, ...] = ("+",)  # arithmetic source only
    chat_template: str = "auto"  # auto | on | off; on: few-shot examples as earlier turns
    type: str = dataclasses.field(default="math", init=False)
    metric = "exact_match"
    higher_is_better = True

    def __post_init__(self):
        _check(self, ("batch_size",), ("limit",), {"extract": ("last", "first")})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodeTask:
    name: str
    source: str = "humaneval"  # humaneval | HumanEval-format .jsonl[.gz]
    category: str = "code"
    limit: int | None = None
    gen: GenerationConfig = QDLM_HUMANEVAL_GEN
    stops: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@", "\n```")
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 1024  # address space of each process of a program
    max_processes: int = 64  # processes and threads of a program's whole tree
    tree_memory_mb: int | None = None  # memory of the whole tree together (None: memory_mb)
    workers: int = 2  # sandbox processes at a time
    batch_size: int = 4
    chat_template: str = "auto"  # auto | on | off
    type: str = dataclasses.field(default="code", init=False)
    metric = "pass@1"
    higher_is_better = True

    def __post_init__(self):
        _check(self, ("batch_size", "workers", "memory_mb", "max_processes"),
               ("limit", "tree_memory_mb"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FidelityTask:
    name: str
    category: str = "fidelity"
    source: str = "bigbench-wikipedia"  # a data.sources name or a local text/JSONL path
    split: str = "heldout"
    seq_len: int = 48  # tokens per window (DiffusionGemma: prompt + one canvas)
    n_windows: int = 16
    noise_ratio: float = 0.5  # share of positions masked / replaced by uniform noise
    batch_size: int = 8
    seed: int = 0
    type: str = dataclasses.field(default="fidelity", init=False)
    metric = "kl_bits"
    higher_is_better = False

    def __post_init__(self):
        _check(self, ("seq_len", "n_windows", "batch_size"))
        if not 0.0 < self.noise_ratio <= 1.0:
            raise ValueError(f"task {self.name!r}: noise_ratio={self.noise_ratio!r}: expected "
                             "a value in (0, 1]")


TaskSpec = Union[LMTask, MCTask, MathTask, CodeTask, FidelityTask]
TYPES: dict[str, type] = {"lm": LMTask, "multiple_choice": MCTask, "math": MathTask,
                          "code": CodeTask, "fidelity": FidelityTask}

BUILTIN: dict[str, TaskSpec] = {t.name: t for t in (
    LMTask(name="wikipedia_bound"),
    MCTask(name="social_iqa", path="bigbench:social_iqa"),
    MCTask(name="strategyqa", path="bigbench:strategyqa"),
    MCTask(name="bigbench_arithmetic", path="bigbench:arithmetic/2_digit_addition"),
    MathTask(name="arithmetic", source="arithmetic", num_fewshot=0, gen=ARITHMETIC_GEN,
             batch_size=50, extract="first"),
    MathTask(name="gsm_symbolic", source="gsm_symbolic"),
    CodeTask(name="humaneval", source="humaneval"),
    # Synthetic tasks the tiny models are trained for (`data.synthetic`; held-out items).
    MathTask(name="arithmetic_3digit", source="arithmetic", digits=(3,), num_fewshot=0,
             gen=ARITHMETIC_GEN, batch_size=50, extract="first", limit=400),
    MathTask(name="arithmetic_subtract", source="arithmetic", digits=(2,), ops=("-",),
             num_fewshot=0, gen=ARITHMETIC_GEN, batch_size=50, extract="first", limit=400),
    CodeTask(name="synthetic_code", source="synthetic_code", gen=SYNTHETIC_CODE_GEN,
             stops=("\n",), batch_size=50, limit=200),
    MCTask(name="synthetic_compare", path="synthetic:compare", limit=200),
)}
SYNTHETIC_TASKS = ("arithmetic", "arithmetic_subtract", "arithmetic_3digit", "synthetic_code",
                   "synthetic_compare")


def _coerce(key: str, value, where: str):
    """Config values -> field types (lists -> tuples; `gen` must be a mapping)."""
    if key == "gen" and not isinstance(value, (Mapping, GenerationConfig)):
        raise ValueError(f"{where}: gen={value!r}: expected a mapping of generation settings")
    return tuple(value) if isinstance(value, list) else value


def _merge_gen(gen0: GenerationConfig, overrides: Mapping) -> GenerationConfig:
    GenerationConfig.from_mapping(overrides)  # validates the keys
    return dataclasses.replace(gen0, **dict(overrides))


def task_from_mapping(d: Mapping, where: str = "task") -> TaskSpec:
    """A spec from a config mapping (see the module docstring)."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    base = None
    if "base" in d:
        name = d.pop("base")
        if name not in BUILTIN:
            raise ValueError(f"{where}: base={name!r}: unknown task; built-in tasks: "
                             f"{sorted(BUILTIN)}")
        base = BUILTIN[name]
    kind = d.pop("type", base.type if base is not None else None)
    if kind not in TYPES:
        raise ValueError(f"{where}: type={kind!r}: expected one of {sorted(TYPES)}")
    cls = TYPES[kind]
    if base is not None and not isinstance(base, cls):
        raise ValueError(f"{where}: base={base.name!r} is a {base.type} task, not {kind}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for a {kind} task; known: "
                         f"{sorted(fields)}")
    values = {k: _coerce(k, v, where) for k, v in d.items()}
    if isinstance(values.get("gen"), Mapping):
        gen0 = base.gen if base is not None else next(
            f.default for f in dataclasses.fields(cls) if f.name == "gen")
        try:
            values["gen"] = _merge_gen(gen0, values["gen"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: gen: {e}") from None
    if "category" in values and values["category"] not in CATEGORIES:
        raise ValueError(f"{where}: category={values['category']!r}: expected one of "
                         f"{CATEGORIES}")
    try:
        if base is not None:
            return dataclasses.replace(base, **values)
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def resolve_task(item, where: str = "tasks") -> TaskSpec:
    """A built-in task name, a spec, or a config mapping -> spec."""
    if isinstance(item, tuple(TYPES.values())):
        return item
    if isinstance(item, str):
        if item in BUILTIN:
            return BUILTIN[item]
        if item.endswith(".json") and Path(item).is_file():
            specs = load_task_file(item)
            if len(specs) != 1:
                raise ValueError(f"{item}: holds {len(specs)} tasks; expected one here")
            return specs[0]
        raise ValueError(f"{where}: unknown task {item!r}; built-in tasks: {sorted(BUILTIN)} "
                         "(or a task JSON file)")
    if isinstance(item, Mapping) or hasattr(item, "to_dict"):
        return task_from_mapping(item, where)
    raise ValueError(f"{where}: {item!r}: expected a task name, a mapping or a task spec")


def load_task_file(path) -> list[TaskSpec]:
    """Specs from a JSON file holding one task object or a list of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    items = data if isinstance(data, list) else [data]
    return [task_from_mapping(d, f"{path}[{i}]") if isinstance(d, Mapping)
            else resolve_task(d, f"{path}[{i}]") for i, d in enumerate(items)]


def spec_dict(spec: TaskSpec) -> dict:
    """JSON-able fields of a spec (GenerationConfig expanded). Fields added after a study was
    run are left out at their defaults (`chat_template`, the sandbox's `max_processes` and
    `tree_memory_mb`, and `cache`, `threshold` of `gen`),
    so the study's finished cells keep their keys."""
    d = json.loads(json.dumps(dataclasses.asdict(spec)))
    for name, default in _LATER_DEFAULTS.items():
        if d.get(name, default) == default:
            d.pop(name, None)
    gen = d.get("gen")
    if isinstance(gen, dict):
        for name, default in _LATER_GEN_DEFAULTS.items():
            if gen.get(name, default) == default:
                gen.pop(name, None)
    return d


_LATER_GEN_DEFAULTS = {"cache": "none", "threshold": None}
_LATER_DEFAULTS = {"chat_template": "auto", "max_processes": 64, "tree_memory_mb": None}


def spec_hash(spec: TaskSpec) -> str:
    """First 10 hex digits of sha256 of the spec's canonical JSON (keys a study's cells)."""
    return settings_digest(spec_dict(spec), 10)


def run_task(tm, spec: TaskSpec, *, progress: bool = True, reference=None) -> dict:
    """Evaluates `tm` (a `backends.TextModel`) on one task. Returns a dict with `task`,
    `type`, `category`, `metric`, `value` (the metric), `higher_is_better`, `n`, `time_s`,
    the family's other figures and a few `examples`. Prompts of the generation and
    multiple-choice tasks go through the chat template as `spec.chat_template` says. A
    `FidelityTask` compares `tm` with `reference` (a TextModel: the fp model)."""
    if isinstance(spec, FidelityTask):
        if reference is None:
            raise ValueError(f"task {spec.name!r}: a fidelity task compares two models; "
                             "pass reference= (the fp model)")
        from qdlm_jax.evals.fidelity import fidelity
        r = fidelity(reference, tm, spec)
    elif isinstance(spec, LMTask):
        from qdlm_jax.evals import lm
        from qdlm_jax.evals.basic import heldout_windows
        w = heldout_windows(tm.tokenizer, source=spec.source, split=spec.split,
                            seq_len=spec.seq_len, n_windows=spec.n_windows, seed=spec.seed)
        r = lm.score_windows(tm.model, w, mc_num=spec.mc_num, batch_size=spec.batch_size,
                             seed=spec.seed)
        r = {**r, "source": sources.resolve_source(spec.source)}
    elif isinstance(spec, MCTask):
        from qdlm_jax.evals import multiple_choice as mc
        items = mc.read_items(spec.path, spec.format)
        preamble, items = mc.fewshot_split(items, spec.num_fewshot)
        if spec.limit is not None:
            items = items[:spec.limit]
        tm = tm.with_chat(spec.chat_template)
        r = mc.score_items(items, tm.loglik_fn(mc_num=spec.mc_num, batch_size=spec.batch_size,
                                               cfg_scale=spec.cfg_scale),
                           seed=spec.seed, preamble=preamble, progress=progress,
                           desc=spec.name)
    elif isinstance(spec, MathTask):
        from qdlm_jax.evals import math_gen
        shots, items = math_gen.load_problems(spec.source, limit=spec.limit,
                                              num_fewshot=spec.num_fewshot, seed=spec.seed,
                                              digits=spec.digits, ops=spec.ops)
        tm = tm.with_chat(spec.chat_template)
        gen_fn = tm.generate_fn(spec.gen, stops=spec.stops, batch_size=spec.batch_size,
                                progress=progress, desc=spec.name)
        r = math_gen.score_problems(shots, items, gen_fn, extract=spec.extract,
                                    multiturn=tm.chat)
    elif isinstance(spec, CodeTask):
        from qdlm_jax.evals import code_gen
        from qdlm_jax.evals.sandbox import SandboxLimits
        problems = code_gen.load_problems(spec.source, spec.limit)
        tm = tm.with_chat(spec.chat_template)
        gen_fn = tm.generate_fn(spec.gen, stops=spec.stops, batch_size=spec.batch_size,
                                progress=progress, desc=spec.name)
        limits = SandboxLimits(timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                               max_processes=spec.max_processes,
                               tree_memory_mb=spec.tree_memory_mb)
        r = code_gen.score_problems(problems, gen_fn, limits, workers=spec.workers)
    else:
        raise ValueError(f"{spec!r}: not a task spec")
    return {"task": spec.name, "type": spec.type, "category": spec.category,
            "chat_template": bool(getattr(tm, "chat", False)), "metric": spec.metric,
            "value": r[spec.metric],
            "higher_is_better": spec.higher_is_better, "se": standard_error(spec, r), **r}


def standard_error(spec: TaskSpec, r: dict) -> float:
    """The metric's standard error: over windows for the LM bound, binomial for accuracies."""
    from qdlm_jax.evals.basic import binomial_se
    if isinstance(spec, LMTask):
        return r["bits_per_token_se"]
    if isinstance(spec, FidelityTask):
        return r["kl_bits_se"]
    return binomial_se(r[spec.metric], r["n"])
