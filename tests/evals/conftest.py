"""Shared fixtures of the evaluation tests: the bundled tiny models, loaded once."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llada():
    from qdlm_jax.evals.backends import load_text_model
    return load_text_model(ROOT / "assets" / "tiny-llada")


@pytest.fixture(scope="session")
def tiny_dream():
    from qdlm_jax.evals.backends import load_text_model
    return load_text_model(ROOT / "assets" / "tiny-dream")
