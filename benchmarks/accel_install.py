"""Install the project beside a preinstalled accelerator JAX without touching jax or jaxlib.

    python3 benchmarks/accel_install.py --has-accelerator   # exit 0 if JAX sees a GPU or TPU
    python3 benchmarks/accel_install.py --dry-run           # print the pip commands
    python3 benchmarks/accel_install.py                     # run them

A Cloud TPU VM or a CUDA box comes with a JAX built for its accelerator (jax, jaxlib and the
PJRT plugin: jax-cuda12-plugin, jax-cuda13-plugin, libtpu). Installing the project's pinned
`jax==...` there would replace it with another build, or with the CPU one. So this helper:

1. installs the project itself with `pip install --no-deps -e .` (no build isolation when a
   recent setuptools is present, so no download is needed for the build);
2. installs only the project dependencies that are not installed at all, at the project's
   pins. A package present at another version is kept: the machine's stack was installed to
   work with its JAX. jax, jaxlib and the PJRT plugins are never named, and a constraints
   file pins them at their installed versions, so a dependency of a missing package cannot
   move them either (pip fails instead).

`make accel-check` calls it where `python3`'s JAX has an accelerator (docs/hardware.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PROTECTED = ("jax", "jaxlib")  # never installed, upgraded or downgraded here
PROTECTED_PREFIXES = ("jax-cuda", "jax-rocm", "libtpu")  # the accelerator's PJRT plugins
MIN_SETUPTOOLS = (68,)  # pyproject.toml's build requirement


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'ML_Collections' -> 'ml-collections'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The project name of a requirement string ('flax==0.12.8' -> 'flax')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"requirement {requirement!r}: no project name at its start")
    return canonical(match.group(1))


def is_protected(name: str) -> bool:
    """Whether a project name belongs to the accelerator's JAX (jax, jaxlib, a PJRT plugin).
    'jaxtyping' is not one."""
    name = canonical(name)
    return name in PROTECTED or name.startswith(PROTECTED_PREFIXES)


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The base dependencies of pyproject.toml, as written there."""
    data = tomllib.loads(Path(pyproject).read_text())
    return list(data["project"]["dependencies"])


def installed_version(name: str) -> str | None:
    """The installed version of a project in this Python environment, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: list[str],
                         version_of: Callable[[str], str | None]) -> list[str]:
    """The requirements whose project is not installed at all, never a protected one."""
    return [r for r in requirements
            if not is_protected(requirement_name(r)) and version_of(requirement_name(r)) is None]


def constraints_text(version_of: Callable[[str], str | None],
                     plugins: tuple[str, ...] = ()) -> str:
    """A pip constraints file holding jax, jaxlib and the given plugins at their installed
    versions (absent ones are left out)."""
    lines = []
    for name in PROTECTED + tuple(plugins):
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "".join(line + "\n" for line in lines)


def installed_plugins() -> tuple[str, ...]:
    """Names of the installed PJRT plugin distributions (jax-cuda13-plugin, libtpu, ...)."""
    names = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()
             if d.metadata["Name"]}
    return tuple(sorted(n for n in names if n.startswith(PROTECTED_PREFIXES)))


def install_commands(python: str, project_dir: Path, missing: list[str], *,
                     build_isolation: bool, constraints: Path) -> list[list[str]]:
    """The pip commands that install the project and the missing dependencies. Raises
    ValueError if one would name a protected project (jax, jaxlib, a PJRT plugin)."""
    editable = [python, "-m", "pip", "install", "--no-deps"]
    if not build_isolation:
        editable.append("--no-build-isolation")
    commands = [editable + ["-e", str(project_dir)]]
    if missing:
        commands.append([python, "-m", "pip", "install", "--constraint", str(constraints),
                         *missing])
    for command in commands:
        named = [a for a in command[4:] if _names_protected(a)]
        if named:
            raise ValueError(f"install command would name {named}, which belong to the "
                             f"accelerator's JAX and must not be reinstalled: {command}")
    return commands


def _names_protected(arg: str) -> bool:
    """Whether a pip argument is a requirement on a protected project (options and paths
    are not requirements)."""
    if arg.startswith(("-", ".", "/")) or "/" in arg:
        return False
    try:
        return is_protected(requirement_name(arg))
    except ValueError:
        return False


def has_recent_setuptools(version_of: Callable[[str], str | None]) -> bool:
    version = version_of("setuptools")
    if version is None:
        return False
    major = re.match(r"(\d+)", version)
    return major is not None and (int(major.group(1)),) >= MIN_SETUPTOOLS


def accelerator_backend() -> str | None:
    """'gpu' or 'tpu' if this Python's JAX has such a device, else None (no JAX, or CPU)."""
    try:
        import jax
        backend = jax.default_backend()
    except Exception:  # noqa: BLE001 - no JAX, or a backend that fails to start: no accelerator
        return None
    return backend if backend in ("gpu", "tpu") else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--has-accelerator", action="store_true",
                   help="exit 0 if this Python's JAX has a GPU or TPU backend, 1 otherwise")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.has_accelerator:
        return 0 if accelerator_backend() else 1

    missing = missing_requirements(project_requirements(), installed_version)
    kept = {n: installed_version(n) for n in PROTECTED + installed_plugins()}
    print("keeping the installed " + ", ".join(f"{n} {v}" for n, v in kept.items() if v))
    print(f"missing dependencies: {', '.join(missing) if missing else 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(installed_version, installed_plugins()))
        commands = install_commands(sys.executable, ROOT, missing,
                                    build_isolation=not has_recent_setuptools(installed_version),
                                    constraints=constraints)
        for command in commands:
            print("+ " + " ".join(command), flush=True)
            if not args.dry_run:
                subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
