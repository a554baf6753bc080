"""The tiny DiffusionGemma card's targets table: each target met or not from the measured
values, the text one only when the score is more than two standard errors below the unigram
entropy; and the shipped card states its targets as its eval.json measures them."""

import json
from pathlib import Path

from qdlm_jax.jobs.gemma_card import targets

ROOT = Path(__file__).resolve().parents[2]


def _r(add, code, compare, text, se):
    task = lambda v: {"value": v, "se": 0.01}  # noqa: E731
    return {"tasks": {"arithmetic": task(add), "synthetic_code": task(code),
                      "synthetic_compare": task(compare)},
            "text": {"bits_per_token": text, "bits_per_token_se": se},
            "unigram_entropy": {"bits_per_token": 8.0}}


def test_targets_met_or_not():
    rows = targets(_r(0.95, 0.4, 0.80, 7.9, 0.04))
    met = [row.rsplit("|", 2)[-2].strip() for row in rows[3:]]
    assert met == ["yes", "no", "yes", "yes"]  # 0.80 meets >= 80%; -0.1 is 2.5 SE below
    rows = targets(_r(0.89, 0.5, 0.79, 7.95, 0.04))
    assert [row.rsplit("|", 2)[-2].strip() for row in rows[3:]] == ["no", "yes", "no", "no"]
    assert "-0.050 bits/token, -1.2 standard errors" in rows[-1]


def test_the_shipped_card_states_its_targets():
    asset = ROOT / "assets/tiny-diffusiongemma"
    r = json.loads((asset / "eval.json").read_text())
    card = (asset / "README.md").read_text()
    for row in targets(r):
        assert row in card
