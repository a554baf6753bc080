"""The code sandbox: limits kill runaway programs; the harness survives."""

import os

import pytest

from qdlm_jax.evals.sandbox import SandboxLimits, run_program, run_programs

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256)


def test_correct_and_wrong_programs():
    assert run_program("assert 1 + 1 == 2\n", LIMITS).status == "passed"
    r = run_program("assert 1 + 1 == 3\n", LIMITS)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_busy_loop_is_killed():
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert r.status in ("timeout", "failed") and not r.passed


def test_sleeper_times_out():
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0,
                                                                    memory_mb=256))
    assert r.status == "timeout"


@pytest.mark.parametrize("bomb", [
    "x = 'a' * (10 ** 10)\n",
    "xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n",
])
def test_memory_bomb_is_stopped(bomb):
    r = run_program(bomb, LIMITS)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_harness_survives_and_runs_in_order():
    pid = os.getpid()
    progs = ["import os, signal\nos.kill(os.getppid(), 0)\nraise SystemExit(3)\n",
             "assert True\n", "import sys\nsys.exit(0)\n", "raise ValueError('x')\n"]
    assert [r.status for r in run_programs(progs, LIMITS)] == ["failed", "passed", "passed",
                                                               "failed"]
    assert os.getpid() == pid


def test_program_runs_in_a_scratch_dir(tmp_path):
    r = run_program("import os\nopen('out.txt', 'w').write('x')\n"
                    "assert os.getcwd() != %r\n" % str(tmp_path), LIMITS)
    assert r.passed and not (tmp_path / "out.txt").exists()


def test_bad_limits():
    with pytest.raises(ValueError, match="memory_mb=10"):
        SandboxLimits(memory_mb=10)
