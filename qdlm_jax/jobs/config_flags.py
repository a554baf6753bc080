"""ml-collections configs at the CLI boundary: `--config FILE` plus `--config.a.b=value`.

A config file is a Python file defining `get_config() -> ml_collections.ConfigDict`.
Overrides are parsed with the type of the value they replace (int, float, bool, str, None,
tuples as comma lists), so `--config.gen.steps=64` stays an int. An unknown key or a value of
the wrong type is an error naming the key; configs are turned into frozen dataclasses by the
commands before any jit.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from pathlib import Path

import ml_collections

from qdlm_jax.errors import ConfigOverrideError

# The repository the package runs from (an editable install): configs/ and assets/ live here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_path(path: str | Path) -> Path:
    """`path` as given when it exists (relative to the working directory); otherwise, for a
    relative path, the same path under the project root, so the bundled defaults
    (`configs/quantize.py`, `assets/tiny-llada`) work from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = project_path(path)
    if not path.is_file():
        raise ConfigOverrideError(f"--config: {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_qdlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigOverrideError(f"--config: {path} defines no get_config()")
    return module.get_config()


def _parse_value(key: str, text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
        raise ConfigOverrideError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(text)
        except ValueError:
            raise ConfigOverrideError(f"--config.{key}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigOverrideError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, (tuple, list)):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if current:
            items = [_parse_value(key, t, current[0]) for t in items]
        return type(current)(items)
    if isinstance(current, str):
        return text
    # None or another type: take a Python literal when it parses, else the string.
    if text.lower() == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
    """Applies `--config.a.b=value` strings in order; returns the config."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigOverrideError(f"{item!r}: expected --config.KEY=VALUE")
        key, text = item[len("--config."):].split("=", 1)
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise ConfigOverrideError(f"--config.{key}: unknown key {p!r}; known: "
                                          f"{sorted(node.keys())}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise ConfigOverrideError(f"--config.{key}: unknown key {leaf!r}; known: "
                                      f"{sorted(node.keys())}")
        value = _parse_value(key, text, node[leaf])
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigOverrideError(f"--config.{key}={text}: {e}") from None
    return config


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` overrides from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"calib.n_samples": 32, ...}: every leaf key of a config with its value."""
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def key_comments(source: str) -> dict[str, str]:
    """The comment written beside each key of a config file, by its full dotted key:
    `c.bits = 4  # ...` is `bits`; `x=1,  # ...` inside `c.act.kv = ConfigDict(dict(` is
    `act.kv.x`. A comment belongs to the keys set on its line only."""
    comments: dict[str, str] = {}
    prefix, depth = "", 0  # the open `c.<key> = ...(dict(` and its unclosed parentheses
    for line in source.splitlines():
        code, _, comment = line.partition("#")
        assign = re.match(r"\s*c\.([\w.]+)\s*=", code) if depth == 0 else None
        if assign:
            key = assign.group(1)
            prefix = key + "." if "dict(" in code else ""
            names = [key] + [prefix + n for n in re.findall(r"[(,]\s*(\w+)\s*=", code)]
        elif depth:
            names = [prefix + n for n in re.findall(r"(?:^|[(,])\s*(\w+)\s*=", code)]
        else:
            names = []
        if assign or depth:
            depth = max(0, depth + code.count("(") - code.count(")"))
        for n in names if comment.strip() else ():
            comments.setdefault(n, comment.strip())
    return comments


def describe_config(path: str | Path) -> str:
    """The `--help` text of a config file: each key with its default and the comment written
    beside it in the file (choices, meaning), so keys are documented once, in the config."""
    path = project_path(path)
    try:
        config = load_config_file(path)
    except ConfigOverrideError as e:
        return f"(config keys unavailable: {e})"
    comments = key_comments(path.read_text())
    lines = [f"config keys of {path.name} (override with --config.KEY=VALUE):"]
    for key, value in flatten_config(config).items():
        note = comments.get(key, "")
        lines.append(f"  --config.{key}={value!r}" + (f"   # {note}" if note else ""))
    return "\n".join(lines)


def suggest_config_flag(arg: str, config_path: str | Path) -> str:
    """For an unknown `--name[=value]` argument, the `--config.` spelling if `name` is a key."""
    name, _, value = arg.lstrip("-").partition("=")
    try:
        keys = flatten_config(load_config_file(config_path))
    except ConfigOverrideError:
        return ""
    matches = [k for k in keys if k == name or k.endswith("." + name)]
    if not matches:
        close = difflib.get_close_matches(name, list(keys), n=1)
        matches = close
    if not matches:
        return ""
    return f"; did you mean --config.{matches[0]}={value or '...'}?"
