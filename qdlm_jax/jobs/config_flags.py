"""ml-collections configs at the CLI boundary: `--config FILE` plus `--config.a.b=value`.

A config file is a Python file defining `get_config() -> ml_collections.ConfigDict`.
Overrides are parsed with the type of the value they replace (int, float, bool, str, None,
tuples as comma lists), so `--config.gen.steps=64` stays an int. An unknown key or a value of
the wrong type is an error naming the key; configs are turned into frozen dataclasses by the
commands before any jit.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

from qdlm_jax.errors import ConfigOverrideError


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
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
