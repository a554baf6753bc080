"""Run untrusted Python programs (model-written code) in a separate, limited and, where the
host allows it, contained process.

Each program is written to a fresh scratch directory (`tempfile`) and run by this file as a
launcher script (`python -I -B sandbox.py ...`, which runs `prog.py` as `__main__` with
`runpy`), with the scratch directory as working directory, HOME and TMPDIR, no stdin, no
stdout, stderr to a private temporary file (its last STDERR_TAIL characters are kept), and a
minimal environment. The model's code never runs in the harness process.

Resource limits (every mode), set by the launcher on the program's process before it starts:
RLIMIT_AS = memory_mb MiB (a memory bomb gets MemoryError or dies), RLIMIT_CPU =
ceil(timeout_s) + 1 s (a busy loop gets SIGXCPU / SIGKILL), RLIMIT_FSIZE = 16 MiB per file,
RLIMIT_CORE = 0; past the wall clock `timeout_s` (e.g. a sleeping program) the run is killed
with SIGKILL.

Containment. The mode is detected once per process by running a trivial program the same
way (`containment()`), trying in order:

- "root": `unshare --net --mount --pid --fork --kill-child --mount-proc` (needs
  CAP_SYS_ADMIN, i.e. root on an ordinary host);
- "userns": the same with `--user --map-root-user` (an unprivileged user namespace, where
  the host allows those);
- None: neither works (no `unshare`, not Linux, or namespaces refused, e.g. in a container
  without CAP_SYS_ADMIN whose seccomp profile blocks user namespaces). Programs then run
  with the resource limits only, as before this containment existed, and ONE
  `UncontainedWarning` per process says so.

In "root" and "userns" mode the launcher is PID 1 of a fresh PID namespace; before it forks
the program it sets up (`_contain`):

- network: a fresh network namespace whose only interface is loopback (brought up), so
  nothing the program opens reaches the host's network or its 127.0.0.1 services, and
  abstract Unix sockets are separate too;
- file system: a private mount namespace in which every mount is re-mounted read-only,
  except three private writable places: the scratch directory (a bind mount of itself, same
  path), a fresh tmpfs on /tmp (64 MiB) and one on /dev/shm (64 MiB); /dev is a fresh
  tmpfs holding only null, zero, full, random, urandom (bound from the host), shm and the
  fd/stdin/stdout/stderr links (no block devices, no ptys); /run is an empty tmpfs (hides
  the host's Unix sockets there, e.g. docker, dbus, databases); /proc (read-only) shows
  only the PID namespace;
- processes: the program is PID 2 under the launcher. When the program exits the launcher
  exits, and the kernel kills every process left in the namespace (including ones that
  called `setsid` or double-forked) before `run_program` returns; on a timeout the harness
  SIGKILLs the launcher, with the same effect;
- privileges: the program runs with no capabilities (empty effective, permitted,
  inheritable, ambient and bounding sets) and `no_new_privs`, so it cannot re-mount
  anything read-write, undo the namespaces or gain privileges through setuid binaries or
  file capabilities. It runs as uid 0 of its namespace (the host's root in "root" mode,
  the calling user in "userns" mode).

Not contained, in any mode: reading files (everything the user can read stays readable,
e.g. checkpoints, keys, other users' world-readable files); connecting to Unix-domain
sockets in the file system outside /run, /tmp and /dev (a read-only mount does not block
`connect`); the number of processes and threads (no pids limit; each process gets the
limits above and all die with the run); total disk use in the scratch directory (16 MiB
per file only); CPU time across many processes until the wall clock ends the run; kernel
bugs. A setup step that fails during detection selects the fallback (the warning names the
error; e.g. a Python installed under /tmp, which the private /tmp would hide); one that
fails later fails that program (exit status SETUP_FAILED): a program never runs
uncontained silently.
"""

from __future__ import annotations

import os
import sys

FSIZE_LIMIT = 16 << 20
TMPFS_SIZE = "64m"  # each of the private /tmp and /dev/shm
SETUP_FAILED = 125  # the launcher's exit status when it could not contain the program

# ---------------------------------------------------------------- launcher side
# Runs as `python -I -B sandbox.py {contain|plain} PROG MEMORY_BYTES CPU_S`, cwd = scratch.
# It comes first and imports little, because it starts once per program; the harness side
# (below the `__main__` block) is never imported by it.

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND = 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# per-mount options that must be repeated when re-mounting (inside a user namespace they are
# locked: leaving one out is EPERM)
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_DEV_NODES = ("null", "zero", "full", "random", "urandom")


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(s):
        return None if s is None else s.encode()
    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {source} on {target}")


def _mountinfo() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of every mount in this namespace."""
    import re
    out = []
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()  # id parent dev root POINT OPTIONS ... (escaped as \040 etc.)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        out.append((point, set(fields[5].split(","))))
    return out


def _contain(scratch: str) -> None:
    """Inside fresh user/net/mount/PID namespaces (as their root): private /tmp, /dev/shm,
    /dev, /run and scratch, everything else read-only, loopback up (module docstring)."""
    import sysconfig
    libs = [p for p in {sysconfig.get_path(k) for k in ("stdlib", "purelib", "platlib")}
            if os.path.isdir(p)]
    scratch_fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    dev_fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in _DEV_NODES}
    tmpfs = f"mode=1777,size={TMPFS_SIZE}"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for name, fd in dev_fds.items():
        open(f"/dev/{name}", "x").close()
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    if os.path.isdir("/run"):
        _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=4k")
    # last, so that none of the mounts above hides it (it may live under /tmp or /dev/shm)
    os.makedirs(scratch, exist_ok=True)
    _mount(f"/proc/self/fd/{scratch_fd}", scratch, None, MS_BIND)
    os.close(scratch_fd)

    writable = {os.path.realpath("/tmp"), os.path.realpath("/dev/shm"), scratch}
    failed = []
    for point, opts in _mountinfo():
        if point in writable:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in opts & _KEEP_FLAGS.keys():
            flags |= _KEEP_FLAGS[opt]
        if not opts & {"noatime", "relatime"}:
            flags |= MS_STRICTATIME
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            failed.append((point, e))
    # A mount that could not be re-mounted must be one hidden under another mount (e.g. the
    # host's /dev/pts under the new /dev): its path is then absent or read-only.
    for point, e in failed:
        if os.path.lexists(point) and not os.statvfs(point).f_flag & os.ST_RDONLY:
            raise OSError(e.errno, f"{point} stays writable: {e}")
    os.chdir(scratch)  # the new (bind) mount, not the directory under it
    for lib in libs:  # e.g. a Python installed under /tmp would lose its modules
        if not os.path.isdir(lib):
            raise OSError(f"{lib} is hidden by the private /tmp, /dev/shm or /run")
    _loopback_up()


def _loopback_up() -> None:
    import fcntl
    import socket
    import struct
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def _drop_privileges() -> None:
    """No capabilities left anywhere (bounding set too) and no_new_privs, so neither exec
    nor setuid binaries can give any back."""
    import ctypes
    libc = _libc()
    PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    _LINUX_CAPABILITY_VERSION_3 = 0x20080522
    _check(libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)),
                       (Data * 2)()), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _wait_for(pid: int) -> int:
    """As PID 1: reap every child (orphans are re-parented here) until `pid` exits; its exit
    status, or 128 + n if it died of signal n."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return SETUP_FAILED
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def _launch(how: str, prog: str, memory: int, cpu: int) -> None:
    import resource
    import runpy
    if how == "contain":
        try:
            _contain(os.getcwd())
        except Exception as e:  # noqa: BLE001 - whatever it is, the program must not run
            print(f"qdlm_jax sandbox: could not contain the program: {e!r}", file=sys.stderr)
            os._exit(SETUP_FAILED)
        pid = os.fork()
        if pid:
            os._exit(_wait_for(pid))  # then the kernel kills whatever is left
        try:
            _drop_privileges()
        except OSError as e:
            print(f"qdlm_jax sandbox: could not drop privileges: {e}", file=sys.stderr)
            os._exit(SETUP_FAILED)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    runpy.run_path(prog, run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sys.exit()


# ---------------------------------------------------------------- harness side
# (imported here, not at the top, so that the launcher does not pay for them)

import dataclasses
import math
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STDERR_TAIL = 400
MODES = ("root", "userns")  # tried in this order
_UNSHARE = {
    "root": ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"],
    "userns": ["--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
               "--kill-child", "--mount-proc"],
}


class UncontainedWarning(RuntimeWarning):
    """Programs run with resource limits only (no namespaces on this host)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: expected > 0")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb!r}: expected an integer >= 64")


@dataclasses.dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout
    returncode: int | None  # contained modes: 128 + n when the program died of signal n
    stderr: str  # the last STDERR_TAIL characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_UNKNOWN = "unknown"
_mode: str | None = _UNKNOWN  # containment(), detected once per process
_mode_lock = threading.Lock()


def containment() -> str | None:
    """"root", "userns" or None (module docstring); probed once per process (the first
    call runs an empty program in each mode until one works, ~0.1 s), then cached. Warns
    once (`UncontainedWarning`) when it is None."""
    global _mode
    with _mode_lock:
        if _mode == _UNKNOWN:
            _mode, why = _detect()
            if _mode is None:
                warnings.warn(UncontainedWarning(
                    "qdlm_jax sandbox: model-written programs are NOT contained on this host "
                    f"({why}). They run with the time, memory and file-size limits only: they "
                    "can use the network (including 127.0.0.1 services), write and delete "
                    "files anywhere this user can, and leave processes running after their "
                    "run. Run the evaluation as root or where unprivileged user namespaces "
                    "are allowed (see docs/evaluation.md)."), stacklevel=3)
        return _mode


def _detect() -> tuple[str | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"platform {sys.platform}, namespaces need Linux"
    if shutil.which("unshare") is None:
        return None, "no `unshare` on PATH (util-linux)"
    why = []
    for mode in MODES:
        ok, reason = _probe(mode)
        if ok:
            return mode, ""
        why.append(f"{mode}: {reason}")
    return None, "; ".join(why)


def _probe(mode: str) -> tuple[bool, str]:
    """Runs a trivial program contained in `mode`; it must pass and be PID 2 (the launcher
    being PID 1 of its PID namespace)."""
    r = _run("import os\nassert os.getpid() == 2, os.getpid()\n",
             SandboxLimits(timeout_s=30.0, memory_mb=256), mode)
    return r.passed, (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `source` as a Python program in a limited child process, contained where the host
    allows it (module docstring). passed = exit status 0 within the limits; failed = any
    other exit (exception, failed assert, MemoryError, killed by a resource limit, a
    containment setup error); timeout = wall clock exceeded."""
    return _run(source, limits, containment())


def _run(source: str, limits: SandboxLimits, mode: str | None) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="qdlm-sandbox-") as tmp, \
            tempfile.TemporaryFile() as err:
        prog = Path(tmp) / "prog.py"
        prog.write_text(source, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", os.path.abspath(__file__),
               "contain" if mode else "plain", str(prog), str(limits.memory_mb << 20),
               str(math.ceil(limits.timeout_s) + 1)]
        if mode:
            cmd = ["unshare", *_UNSHARE[mode], "--", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0",
               "HOME": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
        # stderr goes to a file, not a pipe: a leftover process holding the pipe open can
        # not keep the harness waiting.
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        if _wait(proc, limits.timeout_s):
            status = "passed" if proc.returncode == 0 else "failed"
        else:
            _kill(proc, contained=mode is not None)
            status = "timeout"
        return RunResult(status, proc.returncode, _tail(err))


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """True if `proc` exits within `timeout` s. Polls a pidfd, which wakes up as soon as it
    exits (`Popen.wait(timeout)` sleeps in steps of up to 50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        exited = bool(poll.poll(timeout * 1000))
    finally:
        os.close(fd)
    if exited:
        proc.wait()
    return exited


def _kill(proc: subprocess.Popen, contained: bool) -> None:
    """Wall clock exceeded. Contained: SIGKILL the launcher (PID 1 of the namespace, the only
    child of `unshare`); the kernel kills everything in the namespace and `unshare` exits
    once all of it is gone. Otherwise, or if that fails: SIGKILL the process group."""
    if contained:
        launchers = _children(proc.pid)
        for pid in launchers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launchers:
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _children(pid: int) -> list[int]:
    """Host pids whose parent is `pid` (from /proc/*/stat)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def _tail(err) -> str:
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - 4 * STDERR_TAIL))
    return err.read().decode("utf-8", "replace")[-STDERR_TAIL:]


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int = 2) -> list[RunResult]:
    """`run_program` over many programs, `workers` child processes at a time (in order)."""
    containment()  # detect (and warn) once, before the workers start
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
