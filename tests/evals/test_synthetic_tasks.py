"""The synthetic tasks as evaluation tasks: built-in specs, held-out items, scoring with stubs
whose answers are known (reference completions pass the sandboxed hidden tests, wrong ones
fail)."""

from qdlm_jax.data import synthetic as S
from qdlm_jax.evals import code_gen, math_gen, tasks
from qdlm_jax.evals import multiple_choice as mc


def test_builtin_synthetic_tasks():
    for name in tasks.SYNTHETIC_TASKS:
        assert name in tasks.BUILTIN
    assert tasks.resolve_task("synthetic_code").source == "synthetic_code"
    assert tasks.resolve_task("synthetic_compare").path == "synthetic:compare"
    assert tasks.resolve_task("arithmetic_3digit").digits == (3,)
    sub = tasks.resolve_task("arithmetic_subtract")
    assert sub.digits == (2,) and sub.ops == ("-",)


def test_arithmetic_subtract_items_heldout():
    _, items = math_gen.load_problems("arithmetic", limit=400, num_fewshot=0, seed=0,
                                      digits=(2,), ops=("-",))
    assert len({it.query for it in items}) == 400 and all("-" in it.query for it in items)
    train = {p for p, _ in S.task_pairs("sub2", 20000, seed=0)}
    assert not train & {it.query for it in items}


def test_arithmetic_3digit_items_heldout():
    shots, items = math_gen.load_problems("arithmetic", limit=400, num_fewshot=0, seed=0,
                                          digits=(3,), ops=("+",))
    assert not shots and len({it.query for it in items}) == 400
    train = {p for p, _ in S.task_pairs("add3", 20000, seed=0)}
    assert not train & {it.query for it in items}


def test_synthetic_code_scoring_in_sandbox():
    problems = code_gen.load_problems("synthetic_code", limit=12)
    assert len({p.task_id for p in problems}) == 12
    by_id = {p.task_id: p for p in S.code_problems(12, seed=0, split="heldout", n_ops=(2,),
                                                     unique=True)}
    right = [by_id[p.task_id].completion for p in problems]
    r = code_gen.score_problems(problems, lambda prompts: right)
    assert r["pass@1"] == 1.0, r["examples"]
    wrong = [c + " + 1" for c in right]
    assert code_gen.score_problems(problems, lambda prompts: wrong)["pass@1"] == 0.0


def test_synthetic_compare_scoring():
    items = mc.read_items("synthetic:compare")
    assert len(items) == mc.SYNTHETIC_N == len({(i.prompt) for i in items})
    held = {(i.prompt) for i in items}
    assert not held & {p for p, _ in S.task_pairs("compare", 20000, seed=0)}

    def oracle(prompt, option, key):  # prefers the right number
        kind = "largest" if "largest" in prompt else "smallest"
        nums = [int(x) for x in prompt.split(": ")[2].split("?")[0].split(", ")]
        best = max(nums) if kind == "largest" else min(nums)
        return 0.0 if int(option) == best else -1.0

    assert mc.score_items(items[:50], oracle, progress=False)["acc"] == 1.0
    assert mc.score_items(items[:50], lambda p, o, k: -float(o), progress=False)["acc"] < 0.7
