"""Run untrusted Python programs (model-written code) in a separate, limited and, where the
host allows it, contained process.

One file past 500 lines by necessity: it is also the launcher script that starts inside the
contained process (`python -I -B sandbox.py`, before any harness import), and the launcher
and the harness must agree on every limit and status.

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

Process-tree limits (every mode): `max_processes` (processes and threads) and
`tree_memory_mb` (resident memory, no swap) bound everything a program starts, together,
the launcher included. How is detected once per process (`tree_limits()`), trying in order:

- "cgroup2": a cgroup per run, made under the harness's own cgroup in the v2 hierarchy,
  with pids.max, memory.max, memory.swap.max = 0 and memory.oom.group = 1 (an OOM kill
  takes the whole tree). It needs the pids and memory controllers in the harness's cgroup
  and the right to give them to its children (root, or a delegated subtree). A cgroup that
  holds processes cannot give controllers to children, so a harness alone in its cgroup
  (e.g. started by `systemd-run --scope -p Delegate=yes`) first moves itself into a leaf
  child, HARNESS_LEAF;
- "cgroup1": the same in the v1 pids and memory hierarchies (pids.max,
  memory.limit_in_bytes, memory.memsw.limit_in_bytes = the same, i.e. no swap), e.g. as
  root on a host that mounts them;
- "poll": neither works. Every POLL_S seconds the harness counts the tree's threads and
  sums its memory (proportional set sizes) from /proc, and kills it when either is over:
  between two checks a program can go past the limits. In "userns" mode as an
  unprivileged user RLIMIT_NPROC also bounds the process count for good (the tree's
  processes are the only ones of its uid in that user namespace). ONE `TreeLimitWarning`
  per process says what is not bounded.

The launcher joins the run's cgroup before anything else (containment then makes
/sys/fs/cgroup read-only, so a contained program cannot leave it). When the kernel refuses
a fork at pids.max or the OOM killer kills a process of the tree (cgroups), or a check
finds the tree over a limit (poll), the harness kills the whole tree at once and the status
is "process_limit" or "memory_limit", whatever the exit status would have been. With a
cgroup no process outlives its run in any containment mode (the harness empties and
removes the cgroup), except an uncontained program running as root that moves itself out.

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
`connect`); total disk use in the scratch directory (16 MiB per file only); CPU time
across many processes until the wall clock ends the run; kernel bugs. A setup step that fails during
detection selects the fallback (the warning names the
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
# Runs as `python -I -B sandbox.py {contain|plain} PROG MEMORY_BYTES CPU_S NPROC [CGROUP...]`
# (NPROC 0: no RLIMIT_NPROC), cwd = scratch.
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


def _join(cgroups: list[str]) -> None:
    """Moves this process, and so everything it starts, into each cgroup directory. "0"
    means the writer (a pid would be read in this PID namespace)."""
    for d in cgroups:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write("0")


def _launch(how: str, prog: str, memory: int, cpu: int, nproc: int,
            cgroups: list[str]) -> None:
    import resource
    import runpy
    try:
        _join(cgroups)  # first: the mounts made read-only below include /sys/fs/cgroup
    except OSError as e:
        print(f"qdlm_jax sandbox: could not join cgroup {e.filename}: {e.strerror}",
              file=sys.stderr)
        os._exit(SETUP_FAILED)
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
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    runpy.run_path(prog, run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
            sys.argv[6:])
    sys.exit()


# ---------------------------------------------------------------- harness side
# (imported here, not at the top, so that the launcher does not pay for them)

import dataclasses
import errno
import itertools
import math
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
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
CGROUP_METHODS = ("cgroup2", "cgroup1")  # tried in this order; "poll" is the fallback
POLL_S = 0.05  # how often the harness checks a running program's tree limits
HARNESS_LEAF = "qdlm-harness"  # cgroup v2: where the harness moves itself (module docstring)


class UncontainedWarning(RuntimeWarning):
    """Programs run with resource limits only (no namespaces on this host)."""


class TreeLimitWarning(RuntimeWarning):
    """The process count and total memory of a program's process tree are only polled (no
    usable cgroup on this host)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    # processes and threads of the program's whole tree, the launcher included (pids.max)
    max_processes: int = 64
    # resident memory of the whole tree together, no swap (memory.max); None: memory_mb
    tree_memory_mb: int | None = None

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: expected > 0")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb!r}: expected an integer >= 64")
        if not isinstance(self.max_processes, int) or self.max_processes < 2:
            raise ValueError(f"max_processes={self.max_processes!r}: expected an integer >= 2 "
                             "(the launcher and the program)")
        if self.tree_memory_mb is not None and (not isinstance(self.tree_memory_mb, int)
                                                or self.tree_memory_mb < 64):
            raise ValueError(f"tree_memory_mb={self.tree_memory_mb!r}: expected None or an "
                             "integer >= 64")

    @property
    def tree_memory_bytes(self) -> int:
        mb = self.memory_mb if self.tree_memory_mb is None else self.tree_memory_mb
        return mb << 20


@dataclasses.dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout | process_limit | memory_limit
    returncode: int | None  # contained modes: 128 + n when the program died of signal n
    stderr: str  # the last STDERR_TAIL characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_UNKNOWN = "unknown"
_mode: str | None = _UNKNOWN  # containment(), detected once per process
_mode_lock = threading.Lock()
# tree_limits(), detected once per process: (method, the cgroup directories under which
# each run gets its own; empty for "poll")
_tree: tuple[str, tuple[str, ...]] | str = _UNKNOWN
_tree_lock = threading.Lock()
_serial = itertools.count()


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


def tree_limits() -> str:
    """How the process count and total memory of each program's tree are bounded:
    "cgroup2", "cgroup1" or "poll" (module docstring); detected once per process (the
    first call creates a cgroup and runs an empty program in it, ~0.05 s), then cached.
    Warns once (`TreeLimitWarning`) when it is "poll"."""
    return _tree_method()[0]


def _tree_method() -> tuple[str, tuple[str, ...]]:
    global _tree
    with _tree_lock:
        if _tree == _UNKNOWN:
            _tree, why = _detect_tree()
            if _tree[0] == "poll":
                warnings.warn(TreeLimitWarning(
                    "qdlm_jax sandbox: no cgroup for the programs on this host "
                    f"({why}). The number of processes (threads included) and the total "
                    "memory of each program's process tree are NOT hard limits: the harness "
                    f"checks them every {POLL_S} s and kills the tree when it is over, so "
                    "between two checks a program can go past them (a fast fork bomb can "
                    "start hundreds of processes, fast allocations can take GBs), and an "
                    "uncontained program's processes that leave its tree (double-forked) are "
                    "not counted. In userns mode as an unprivileged user the process count "
                    "is also bounded by RLIMIT_NPROC. Run the evaluation as root on a host "
                    "with the pids and memory cgroup controllers, or in a delegated cgroup "
                    "v2 subtree (see docs/evaluation.md)."), stacklevel=3)
        return _tree


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
             SandboxLimits(timeout_s=30.0, memory_mb=256), mode, _tree_method())
    return r.passed, _last_line(r)


def _last_line(r: RunResult) -> str:
    return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def _detect_tree() -> tuple[tuple[str, tuple[str, ...]], str]:
    """The first cgroup method under which an empty program runs (uncontained: this tests
    creating the cgroup, setting its limits, joining and removing it), else "poll"."""
    if not sys.platform.startswith("linux"):
        return ("poll", ()), f"platform {sys.platform}, cgroups need Linux"
    why = []
    for method in CGROUP_METHODS:
        try:
            parents = tuple(_cgroup_parents(method))
            _Cgroup(method, parents, SandboxLimits()).close()
        except OSError as e:
            why.append(f"{method}: {e}")
            continue
        r = _run("pass\n", SandboxLimits(timeout_s=30.0, memory_mb=256), None,
                 (method, parents))
        if r.passed:
            return (method, parents), ""
        why.append(f"{method}: {_last_line(r)}")
    return ("poll", ()), "; ".join(why)


# ---------------------------------------------------------------- cgroups

def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(file system type, mount point, root in the hierarchy, super options) of every
    cgroup and cgroup2 mount."""
    def unescape(field):  # mountinfo writes a space as \040, etc.
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)

    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()  # id parent dev ROOT POINT ... - FSTYPE SOURCE SUPER_OPTIONS
        sep = fields.index("-")
        fstype, super_options = fields[sep + 1], set(fields[sep + 3].split(","))
        if fstype in ("cgroup", "cgroup2"):
            out.append((fstype, unescape(fields[4]), unescape(fields[3]), super_options))
    return out


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per controller ("" for the cgroup v2 hierarchy)."""
    own = {}
    for line in _read("/proc/self/cgroup").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            own[""] = path
        for controller in filter(None, controllers.split(",")):
            own[controller] = path
    return own


def _mounted_dir(point: str, root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    if rel == ".." or rel.startswith("../"):
        raise OSError(f"this process's cgroup {path} is outside the hierarchy mounted at "
                      f"{point} (its root there is {root})")
    return os.path.normpath(os.path.join(point, rel))


def _cgroup_parents(method: str) -> list[str]:
    """The directories under which each run's cgroup is made: this process's own cgroup in
    the v2 hierarchy ("cgroup2"), or in the v1 pids and in the v1 memory hierarchy
    ("cgroup1"). Raises OSError saying what is missing."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    if method == "cgroup2":
        v2 = [(point, root) for fstype, point, root, _ in mounts if fstype == "cgroup2"]
        if not v2 or "" not in own:
            raise OSError("no cgroup2 hierarchy mounted")
        d = _mounted_dir(*v2[0], own[""])
        available = set(_read(f"{d}/cgroup.controllers").split())
        if not {"pids", "memory"} <= available:
            raise OSError(f"the pids and memory controllers are not available in {d} (its "
                          f"cgroup.controllers: {' '.join(sorted(available)) or 'none'})")
        _give_controllers(d)
        return [d]
    parents = []
    for controller in ("pids", "memory"):
        v1 = [(point, root) for fstype, point, root, options in mounts
              if fstype == "cgroup" and controller in options]
        if not v1 or controller not in own:
            raise OSError(f"no cgroup v1 {controller} hierarchy mounted")
        parents.append(_mounted_dir(*v1[0], own[controller]))
    return parents  # the same directory twice where both share one hierarchy


def _give_controllers(d: str) -> None:
    """Enables pids and memory for the children of cgroup v2 directory `d` (this process's
    own). A cgroup holding processes cannot do that (cgroup v2's "no internal processes"
    rule), so if this process is alone in `d` it first moves into the leaf HARNESS_LEAF, as
    a delegated subtree is meant to be used."""
    enabled = set(_read(f"{d}/cgroup.subtree_control").split())
    if {"pids", "memory"} <= enabled:
        return
    try:
        _write(f"{d}/cgroup.subtree_control", "+pids +memory")
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise OSError(e.errno, f"cannot enable pids and memory for the children of {d}: "
                                   f"{e.strerror}") from None
    procs = _read(f"{d}/cgroup.procs").split()
    if procs != [str(os.getpid())]:
        raise OSError(errno.EBUSY, f"cannot enable pids and memory for the children of {d}: "
                                   f"it holds other processes than this one ({len(procs)} "
                                   "in all; start the evaluation alone in a cgroup of its "
                                   "own, e.g. `systemd-run --scope -p Delegate=yes ...`)")
    os.makedirs(f"{d}/{HARNESS_LEAF}", exist_ok=True)
    _write(f"{d}/{HARNESS_LEAF}/cgroup.procs", str(os.getpid()))
    _write(f"{d}/cgroup.subtree_control", "+pids +memory")


def _set(path: str, value: str, optional: bool = False) -> None:
    if optional and not os.path.exists(path):
        return
    try:
        _write(path, value)
    except OSError as e:
        raise OSError(e.errno, f"cannot set {path} to {value}: {e.strerror}") from None


def _counter(path: str, key: str) -> int:
    """The value of `key` in a cgroup events file (0 if the file is absent)."""
    try:
        text = _read(path)
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


class _Cgroup:
    """The cgroup of one run, made under the harness's own (so its limits stay inside
    whatever bounds the harness): one directory in the v2 hierarchy, or one in each of the
    v1 pids and memory hierarchies. The launcher joins it before anything else."""

    def __init__(self, method: str, parents: Sequence[str], limits: SandboxLimits):
        name = f"qdlm-sandbox-{os.getpid()}-{next(_serial)}"
        self.method = method
        self.pids_dir, self.memory_dir = f"{parents[0]}/{name}", f"{parents[-1]}/{name}"
        self.dirs = []
        try:
            for d in dict.fromkeys([self.pids_dir, self.memory_dir]):
                os.mkdir(d)
                self.dirs.append(d)
            memory = str(limits.tree_memory_bytes)
            _set(f"{self.pids_dir}/pids.max", str(limits.max_processes))
            if method == "cgroup2":
                _set(f"{self.memory_dir}/memory.max", memory)
                # absent where the kernel does not account swap
                _set(f"{self.memory_dir}/memory.swap.max", "0", optional=True)
                _set(f"{self.memory_dir}/memory.oom.group", "1")  # an OOM kill takes all
            else:
                _set(f"{self.memory_dir}/memory.limit_in_bytes", memory)
                # memory + swap = memory: no swap (absent where the kernel does not account it)
                _set(f"{self.memory_dir}/memory.memsw.limit_in_bytes", memory, optional=True)
        except OSError:
            self.close()
            raise

    def check(self) -> str | None:
        """"process_limit" if a fork was refused at pids.max, "memory_limit" if the OOM
        killer killed a process of the tree, else None."""
        if _counter(f"{self.pids_dir}/pids.events", "max"):
            return "process_limit"
        events = "memory.events" if self.method == "cgroup2" else "memory.oom_control"
        if _counter(f"{self.memory_dir}/{events}", "oom_kill"):
            return "memory_limit"
        return None

    def _procs(self) -> list[int]:
        out = set()
        for d in self.dirs:
            try:
                out.update(int(p) for p in _read(f"{d}/cgroup.procs").split())
            except FileNotFoundError:
                pass
        return sorted(out)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (one pass)."""
        kill_file = f"{self.dirs[0]}/cgroup.kill"  # cgroup v2, Linux >= 5.14
        if self.method == "cgroup2" and os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        for pid in self._procs():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kills what is left in the cgroup and removes it (retrying while the killed
        processes exit); warns if it cannot."""
        deadline = time.monotonic() + 5.0
        while self.dirs:
            try:
                if self._procs():
                    self.kill()
                os.rmdir(self.dirs[-1])
                self.dirs.pop()
            except OSError as e:
                if time.monotonic() > deadline:
                    warnings.warn(f"qdlm_jax sandbox: could not remove cgroup {self.dirs[-1]}: "
                                  f"{e.strerror or e}", RuntimeWarning, stacklevel=2)
                    return
                time.sleep(0.01)


class _PolledTree:
    """Fallback without a cgroup: the tree is every process descended from the one the
    harness started (contained modes: `unshare`, not counted, so this is the launcher and
    everything in the PID namespace; uncontained: the program, and what it started that
    still has it as ancestor). `check` counts their threads and sums their resident memory
    from /proc."""

    def __init__(self, proc: subprocess.Popen, contained: bool, limits: SandboxLimits):
        self.root, self.contained, self.limits = proc.pid, contained, limits
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every process seen

    def _scan(self) -> list[tuple[int, int, int, int]]:
        """(pid, start time, threads, resident bytes) of each process in the tree."""
        children, stats = {}, {}
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in _pids():
            stat = _stat(pid)
            if stat is None:
                continue
            # stat[k - 3] is field k of proc(5): ppid 4, threads 20, start time 22, rss 24
            children.setdefault(int(stat[1]), []).append(pid)
            stats[pid] = (int(stat[19]), int(stat[17]), int(stat[21]) * page)
        out, todo = [], list(children.get(self.root, []))
        if not self.contained:
            todo.append(self.root)
        while todo:
            pid = todo.pop()
            if pid in stats:
                out.append((pid, *stats[pid]))
                todo.extend(children.get(pid, []))
        return out

    def check(self) -> str | None:
        tree = self._scan()
        self.seen.update((pid, start) for pid, start, _, _ in tree)
        if sum(threads for _, _, threads, _ in tree) > self.limits.max_processes:
            return "process_limit"
        # resident sizes count the pages processes share (e.g. a forked Python's) once per
        # process; their sum is only an upper bound of the proportional set sizes (PSS,
        # slower to read), which decide
        limit = self.limits.tree_memory_bytes
        if (sum(rss for _, _, _, rss in tree) > limit
                and sum(_pss(pid) for pid, _, _, _ in tree) > limit):
            return "memory_limit"
        return None

    def kill(self) -> None:
        """SIGKILLs every process of the tree, and every one seen in it before (an
        uncontained program's children are re-parented when it dies), until all are gone
        (at most 2 s)."""
        deadline = time.monotonic() + 2.0
        while True:
            self.seen.update((pid, start) for pid, start, _, _ in self._scan())
            alive = [pid for pid, start in self.seen if _alive(pid, start)]
            if not alive or time.monotonic() > deadline:
                return
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def _pss(pid: int) -> int:
    """The proportional set size of process `pid` in bytes (0: no such process); its
    resident size where the kernel has no smaps_rollup (Linux < 4.14)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) << 10
    except FileNotFoundError:
        stat = _stat(pid)
        return int(stat[21]) * os.sysconf("SC_PAGE_SIZE") if stat else 0
    except OSError:
        pass
    return 0


def _alive(pid: int, start: int) -> bool:
    """Process `pid`, started at `start`, exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and int(stat[19]) == start and stat[0] not in (b"Z", b"X")


# ---------------------------------------------------------------- running a program

def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `source` as a Python program in a limited child process, contained where the host
    allows it (module docstring). passed = exit status 0 within the limits; failed = any
    other exit (exception, failed assert, MemoryError, killed by a per-process resource
    limit, a containment setup error); timeout = wall clock exceeded; process_limit /
    memory_limit = the program's tree went past `max_processes` / `tree_memory_mb` (it is
    killed at once, whatever its exit status would have been)."""
    return _run(source, limits, containment(), _tree_method())


def _run(source: str, limits: SandboxLimits, mode: str | None,
         tree: tuple[str, tuple[str, ...]]) -> RunResult:
    method, parents = tree
    with tempfile.TemporaryDirectory(prefix="qdlm-sandbox-") as tmp, \
            tempfile.TemporaryFile() as err:
        prog = Path(tmp) / "prog.py"
        prog.write_text(source, encoding="utf-8")
        group = None
        if parents:
            try:
                group = _Cgroup(method, parents, limits)
            except OSError as e:  # the program does not run unbounded
                return RunResult("failed", None,
                                 f"qdlm_jax sandbox: could not make the program's cgroup: {e}")
        try:
            # without a cgroup, in a user namespace of its own as an unprivileged user, the
            # tree's processes are exactly those of its uid there: RLIMIT_NPROC bounds them.
            # + 2: `unshare`, which made the namespace, counts there too, and one process
            # over the limit must be possible for the harness's check to see it
            nproc = (limits.max_processes + 2
                     if group is None and mode == "userns" and os.geteuid() != 0 else 0)
            cmd = [sys.executable, "-I", "-B", os.path.abspath(__file__),
                   "contain" if mode else "plain", str(prog), str(limits.memory_mb << 20),
                   str(math.ceil(limits.timeout_s) + 1), str(nproc),
                   *(group.dirs if group else [])]
            if mode:
                cmd = ["unshare", *_UNSHARE[mode], "--", *cmd]
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0",
                   "HOME": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
            # stderr goes to a file, not a pipe: a leftover process holding the pipe open can
            # not keep the harness waiting.
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            tree_check = (group if group is not None
                          else _PolledTree(proc, mode is not None, limits))
            status = _supervise(proc, limits, mode is not None, tree_check)
        finally:
            if group is not None:
                group.close()
        return RunResult(status, proc.returncode, _tail(err))


def _supervise(proc: subprocess.Popen, limits: SandboxLimits, contained: bool,
               tree: _Cgroup | _PolledTree) -> str:
    """Waits for `proc`, checking the tree limits every POLL_S; kills the run when one is
    hit or the wall clock runs out. Its status."""
    deadline = time.monotonic() + limits.timeout_s
    try:
        fd = os.pidfd_open(proc.pid)  # wakes up as soon as `proc` exits
    except (AttributeError, OSError):  # not Linux >= 5.3
        fd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if _exited(proc, fd, max(0.0, min(left, POLL_S))):
                return tree.check() or ("passed" if proc.returncode == 0 else "failed")
            hit = tree.check()
            if hit or left <= POLL_S:
                tree.kill()
                _kill(proc, contained)
                return hit or "timeout"
    finally:
        if fd is not None:
            os.close(fd)


def _exited(proc: subprocess.Popen, fd: int | None, timeout: float) -> bool:
    """True if `proc` exits within `timeout` s (then it is reaped)."""
    if fd is None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if not poll.poll(timeout * 1000):
        return False
    proc.wait()
    return True


def _kill(proc: subprocess.Popen, contained: bool) -> None:
    """Contained: SIGKILL the launcher (PID 1 of the namespace, the only child of
    `unshare`); the kernel kills everything in the namespace and `unshare` exits once all
    of it is gone. Otherwise, or if that fails: SIGKILL the process group."""
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
    _wait_group_gone(proc.pid)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Waits until no live process is left in process group `pgid` (SIGKILLing it again
    meanwhile): a killed process exits a little later, on a busy host much later, and the
    run must not return while any of its tree still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # stat[2] is field 5 of proc(5), the process group
        members = [pid for pid in _pids()
                   if (stat := _stat(pid)) is not None and int(stat[2]) == pgid
                   and stat[0] not in (b"Z", b"X")]
        if not members:
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def _pids() -> list[int]:
    """Every pid in /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _children(pid: int) -> list[int]:
    """Host pids whose parent is `pid` (from /proc/*/stat)."""
    return [child for child in _pids()
            if (stat := _stat(child)) is not None and int(stat[1]) == pid]


def _tail(err) -> str:
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - 4 * STDERR_TAIL))
    return err.read().decode("utf-8", "replace")[-STDERR_TAIL:]


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int = 2) -> list[RunResult]:
    """`run_program` over many programs, `workers` child processes at a time (in order)."""
    containment()  # detect (and warn) once, before the workers start
    tree_limits()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
