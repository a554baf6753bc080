"""benchmarks/accelerator_check.py: the CPU smoke mode, failure and budget handling, and the
install helper that `make accel-check` uses beside a preinstalled accelerator JAX."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


check = _load("accelerator_check")
install = _load("accel_install")


def _report(out: Path) -> dict:
    return json.loads((out / "accel_report.json").read_text())


# slow: every section of the hardware check on CPU (its pieces have their own fast tests);
# `make test-slow` and `make accel-check` run it
@pytest.mark.slow
def test_smoke_mode_runs_every_section(tmp_path, capsys):
    # No --cpu-smoke: a machine without a GPU or TPU says so in one line and runs the smoke.
    rc = check.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "No GPU or TPU found" in printed.splitlines()[0]
    report = _report(tmp_path)
    assert report["meta"]["mode"] == "cpu-smoke"
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == [s.name for s in check.SECTIONS]
    for name in ("environment", "kernels", "generation", "quantization"):
        assert sections[name]["status"] == "ok", sections[name]
        assert sections[name]["rows"], name
    assert sections["moe"]["status"] == "skipped"
    assert sections["moe"]["notes"] == [check.MOE_SKIP]
    kernels = sections["kernels"]["rows"]
    assert {r["case"] for r in kernels} == {"bf16"} | {c.name for c in check.KERNEL_CONFIGS}
    assert all(r["time_us"] > 0 and r["mem_bound_us"] > 0 for r in kernels)
    modes = {(r["weights"], r["mode"]) for r in sections["generation"]["rows"]}
    assert modes == {(w, m) for w in ("bf16", "W4 g128") for m in check.SMOKE.generation.modes}
    assert all(r["fwd_per_token"] > 0 for r in sections["generation"]["rows"])
    quant = sections["quantization"]["rows"]
    assert [r["run"] for r in quant] == ["cold (compiles)", "warm"]
    assert any("projection to 32 blocks" in n for n in sections["quantization"]["notes"])
    md = (tmp_path / "accel_report.md").read_text()
    for s in check.SECTIONS:
        assert s.title in md
    assert check.MOE_SKIP in md


def _section(name, run):
    return check.Section(name, f"Section {name}", run)


def test_a_failing_section_keeps_the_report_and_names_the_failure(tmp_path):
    seen = {}

    def first(ctx, rec):
        rec.add_row({"item": "a", "value": 1})

    def broken(ctx, rec):
        # The earlier section is already on disk when this one starts.
        seen["before"] = _report(tmp_path)["sections"][0]
        raise ValueError("broken on purpose")

    def after(ctx, rec):
        rec.add_row({"item": "b", "value": 2})

    sections = (_section("first", first), _section("broken", broken), _section("after", after))
    rc = check.main(["--out", str(tmp_path), "--cpu-smoke"], sections=sections)
    assert rc == 1
    assert seen["before"]["status"] == "ok" and seen["before"]["rows"] == [
        {"item": "a", "value": 1}]
    report = _report(tmp_path)
    status = [(s["name"], s["status"]) for s in report["sections"]]
    assert status == [("first", "ok"), ("broken", "failed"), ("after", "ok")]
    failed = report["sections"][1]
    assert failed["error"] == "ValueError: broken on purpose"
    assert "broken on purpose" in failed["traceback"]
    md = (tmp_path / "accel_report.md").read_text()
    assert "Failure: `ValueError: broken on purpose`" in md
    assert "| a | 1 |" in md and "| b | 2 |" in md


def test_a_section_past_its_budget_stops_its_cases_and_later_sections_are_skipped(tmp_path):
    def slow(ctx, rec):
        for i in range(20):
            if not ctx.budget.allows():
                rec.skip_case(f"case {i}")
                continue
            time.sleep(0.05)
            rec.add_row({"case": i})

    sections = (_section("slow", slow), _section("late", slow))
    rc = check.main(["--out", str(tmp_path), "--cpu-smoke", "--budget-s", "0.2",
                     "--section-budget", "slow=1", "--section-budget", "late=0"],
                    sections=sections)
    assert rc == 0
    slow_rec, late = _report(tmp_path)["sections"]
    assert slow_rec["status"] == "partial"
    assert 1 <= len(slow_rec["rows"]) < 20
    assert len(slow_rec["rows"]) + len(slow_rec["not_run"]) == 20
    assert any("stopped at its time budget" in n for n in slow_rec["notes"])
    assert late["status"] == "skipped"
    assert "overall budget was spent" in late["notes"][0]


def test_bad_section_budget_is_named():
    with pytest.raises(SystemExit, match="--section-budget 'kernel=5'"):
        check.main(["--cpu-smoke", "--section-budget", "kernel=5"])


# ----- install helper -----------------------------------------------------------------------


def _names_jax(arg: str) -> bool:
    return re.fullmatch(r"(jax|jaxlib)([=<>!~\[;].*)?", arg.strip().lower()) is not None


def test_missing_set_never_holds_jax_or_jaxlib():
    reqs = install.project_requirements()
    assert any(install.requirement_name(r) == "jax" for r in reqs)  # pinned by the project
    nothing_installed = install.missing_requirements(reqs, lambda name: None)
    names = [install.requirement_name(r) for r in nothing_installed]
    assert "jax" not in names and "jaxlib" not in names
    assert "jaxtyping" in names and "flax" in names  # jax-like names are not protected
    versions = {"flax": "0.11.0", "jaxtyping": "0.3.11", "jax": "0.11.2", "jaxlib": "0.11.2"}
    some = install.missing_requirements(reqs, versions.get)
    # A package installed at another version is kept; only absent ones are installed.
    assert all(install.requirement_name(r) not in versions for r in some)


def test_install_commands_never_name_jax_or_jaxlib(tmp_path):
    reqs = install.project_requirements()
    missing = install.missing_requirements(reqs, lambda name: None)
    constraints = tmp_path / "constraints.txt"
    for isolation in (True, False):
        commands = install.install_commands("python3", ROOT, missing, build_isolation=isolation,
                                            constraints=constraints)
        editable, deps = commands
        assert editable[:5] == ["python3", "-m", "pip", "install", "--no-deps"]
        assert editable[-2:] == ["-e", str(ROOT)]
        assert ("--no-build-isolation" in editable) == (not isolation)
        assert deps[deps.index("--constraint") + 1] == str(constraints)
        for command in commands:
            assert not [a for a in command if _names_jax(a)], command
            assert "--upgrade" not in command and "-U" not in command
    # Nothing missing: only the project itself, still without its dependencies.
    assert install.install_commands("py", ROOT, [], build_isolation=True,
                                    constraints=constraints) == [
        ["py", "-m", "pip", "install", "--no-deps", "-e", str(ROOT)]]
    for bad in ("jax==0.10.2", "jaxlib", "jax[cuda12]==0.10.2", "jax-cuda12-plugin"):
        with pytest.raises(ValueError, match="must not be reinstalled"):
            install.install_commands("py", ROOT, [bad], build_isolation=True,
                                     constraints=constraints)


def test_constraints_pin_the_installed_jax():
    versions = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2"}
    text = install.constraints_text(versions.get, ("jax-cuda13-plugin",))
    assert text.splitlines() == ["jax==0.11.2", "jaxlib==0.11.2", "jax-cuda13-plugin==0.11.2"]
    assert install.is_protected("libtpu") and not install.is_protected("jaxtyping")


def test_dry_run_prints_commands_without_jax(capsys):
    assert install.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line[2:].split() for line in out.splitlines() if line.startswith("+ ")]
    assert commands and "--no-deps" in commands[0]
    assert not [a for c in commands for a in c if _names_jax(a)]


def test_make_target_installs_through_the_helper_only():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^accel-check:.*?(?=^\S|\Z)", makefile, re.M | re.S)
    assert recipe, "Makefile has no accel-check target"
    body = recipe.group(0)
    assert "benchmarks/accel_install.py" in body
    assert "benchmarks/accelerator_check.py" in body
    assert "pip install" not in body and not re.search(r"\bjax(lib)?\b", body)
