"""The project's default evaluation settings match the reference studies' published ones
(evals/published_settings.json, transcribed from the studies' scripts)."""

import json
from pathlib import Path

from qdlm_jax.evals.tasks import BUILTIN, QDLM_GSM8K_GEN, QDLM_HUMANEVAL_GEN

SETTINGS = json.loads((Path(__file__).resolve().parents[2] / "evals/published_settings.json")
                      .read_text())


def test_gsm8k_and_humaneval_generation_defaults_are_qdlms():
    qdlm = SETTINGS["qdlm_llada"]["tasks"]
    for gen, task in ((QDLM_GSM8K_GEN, "gsm8k"), (QDLM_HUMANEVAL_GEN, "humaneval")):
        for key in ("gen_length", "steps", "block_length"):
            assert getattr(gen, key) == qdlm[task][key], (task, key)
        assert gen.temperature == SETTINGS["qdlm_llada"]["generation"]["temperature"]
        assert gen.remasking == SETTINGS["qdlm_llada"]["generation"]["remasking"]


def test_likelihood_tasks_default_to_the_studies_mc_num():
    mc = SETTINGS["qdlm_llada"]["tasks"]["piqa"]["mc_num"]
    for spec in BUILTIN.values():
        if hasattr(spec, "mc_num"):
            assert spec.mc_num == mc, spec.name


def test_every_setup_names_its_study_and_tasks():
    for name, setup in SETTINGS.items():
        if name.startswith("_"):
            continue
        assert setup["study"] and setup["tasks"], name
