"""The study: `qdlm study --config configs/study.py [--config.bits=4,3 ...]`.

Defaults: both bundled tiny models, RTN / GPTQ / AWQ at W8 / W4 / W3 (group 128), the
weight-activation methods (RTN, SmoothQuant, QuaRot, DuQuant) at W8A8 / W4A4 (per-channel
weights, per-token activations), QuaRot W4A4 with 4-bit K/V without and with IA-AQ
(`wa_rows`), plus fp, one or two
tasks per family at sizes that suit a 2-core CPU (QDLM's full settings are the task specs'
own defaults: see qdlm_jax/evals/tasks.py and docs/evaluation.md). Quick run (fp, RTN W8
and W4 on tiny-llada, the default tasks: 3 variants x 9 tasks = 27 cells; empty `wa_methods`
and `wa_rows` drop the weight-activation rows; about 4.5 minutes on 2 cores shared with
other jobs, 2026-12-04):

    qdlm study --config configs/study.py --config.models=assets/tiny-llada \\
        --config.methods=rtn --config.bits=8,4 --config.wa_methods= --config.wa_rows= \\
        --config.out_dir=runs/study-smoke

The 2-bit comparison of the dLLM-specific weight-only method (Quant-dLLM's DAQ + ABMP, an
average of 2.0 binary planes) against RTN and GPTQ, with masked calibration:

    qdlm study --config configs/study.py --config.methods=rtn,gptq,daq --config.bits=2 \\
        --config.wa_methods= --config.wa_rows= --config.quantize.calibration=masked \\
        --config.out_dir=runs/study-w2

QuaRot W4A4 against its 4-bit K/V rows, with and without IA-AQ (`wa_rows`; see
docs/weight_activation.md "In the demo and the study"):

    qdlm study --config configs/study.py --config.methods= --config.wa_methods=quarot \\
        --config.wa_bits=4 --config.out_dir=runs/study_kv

"""

import ml_collections

N_ITEMS = 8  # items per task (small, for 2 CPU cores)
SYNTH_ITEMS = 200  # items of the synthetic math tasks (half that for code and choices)
MC = dict(limit=N_ITEMS, mc_num=16, batch_size=16)
SHORT_GEN = dict(steps=32, gen_length=32, block_length=32)


def get_config():
    c = ml_collections.ConfigDict()
    c.models = ("assets/tiny-llada", "assets/tiny-dream")
    c.methods = ("rtn", "gptq", "awq")  # any method `qdlm quantize` knows, passed through
    c.bits = (8, 4, 3)
    c.include_fp = True
    c.out_dir = "runs/study"
    c.dtype = "float32"
    c.progress = True
    # The main job's config; `quantize` overrides apply to every method, `method_overrides`
    # to one method, e.g. {"smoothquant": {"act_bits": 8}}.
    c.quantize_config = "configs/quantize.py"
    c.quantize = ml_collections.ConfigDict(dict(
        group_size=128, calibration="clean", calib=dict(n_samples=16, seq_len=128)))
    c.method_overrides = ml_collections.ConfigDict()
    # Weight-activation variants: each method at W<b>A<b> for b in wa_bits (empty: none),
    # with `wa_quantize` on top of `quantize` (QDLM's W8A8/W4A4 use per-channel weights).
    c.wa_methods = ("rtn", "smoothquant", "quarot", "duquant")
    c.wa_bits = (8, 4)
    c.wa_quantize = ml_collections.ConfigDict(dict(group_size=-1))
    # Any main-job key may be set here from the command line, e.g. 4-bit K/V for every WA row:
    # --config.wa_quantize.act.kv.bits=4 (checked against configs/quantize.py).
    # Extra weight-activation rows, each on top of `quantize` + `wa_quantize`: names from
    # qdlm_jax/jobs/study.py WA_ROWS, or mappings {name, method, bits[, act_bits],
    # quantize: {main-job key: value}}; `--config.wa_rows=` runs none. The defaults:
    # QuaRot W4A4 with 4-bit K/V (act.kv.bits=4, per head, asymmetric), and the same with
    # DLLMQuant's IA-AQ on K and V (act.iaaq.enabled/search_keys, masked calibration).
    c.wa_rows = ["quarot-w4a4+kv4", "quarot-w4a4+kv4-iaaq"]
    # The decoding dimension (Fast-dLLM, docs/generation.md): each setting, a name
    # `<cache>[-tau<threshold>|-f<factor>]` or a mapping {cache, threshold, factor}, runs
    # every generation task again as `<task>@<setting>` on the rows named in decoding_rows
    # (empty: all), recording accuracy and tokens committed per forward pass. Issue 15's:
    # --config.decoding=dual-tau0.9,dual-tau0.7 (fp, W4/W3 GPTQ and W4A4 QuaRot rows).
    c.decoding = []
    c.decoding_rows = ["fp", "gptq-w4", "gptq-w3", "quarot-w4a4"]
    # Tasks: built-in names (qdlm_jax/evals/tasks.py BUILTIN) or mappings with `base`/`type`.
    # A plain list (not a tuple) so that ml_collections keeps the dicts as they are.
    c.tasks = [
        {"base": "wikipedia_bound", "n_windows": 4, "mc_num": 16, "batch_size": 16},
        {"base": "social_iqa", **MC},
        {"base": "strategyqa", **MC},
        {"base": "arithmetic", "limit": SYNTH_ITEMS},  # held-out 2-digit addition
        {"base": "gsm_symbolic", "limit": N_ITEMS, "num_fewshot": 1, "gen": SHORT_GEN},
        {"base": "humaneval", "limit": N_ITEMS, "gen": SHORT_GEN, "timeout_s": 5.0,
         "max_processes": 64, "tree_memory_mb": 1024},  # sandbox: each program's whole tree
        # The synthetic tasks the tiny models are trained for (held-out items),
        # large enough that a 5-point drop is about two standard errors at 90% accuracy.
        {"base": "arithmetic_subtract", "limit": SYNTH_ITEMS},
        {"base": "synthetic_code", "limit": SYNTH_ITEMS // 2},
        {"base": "synthetic_compare", "limit": SYNTH_ITEMS // 2, "mc_num": 16, "batch_size": 16},
    ]
    return c
