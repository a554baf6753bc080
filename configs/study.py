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

Activation granularity: every weight-activation method at W4A4 and W4A8 (per-channel
weights), with per-token activation scales and per-group scales of 128 and 32 input
channels (rows `quarot-w4a4`, `quarot-w4a4-ag128`, `quarot-w4a4-ag32`, `quarot-w4a8`, ...:
24 rows and fp), on the tasks the tiny models can do (`TINY_TASKS`):

    qdlm study --config configs/study.py --config.models=assets/tiny-llada \\
        --config.methods= --config.wa_rows= --config.wa_bits=4 --config.wa_act_bits=4,8 \\
        --config.act_granularities=per_token,g128,g32 --config.only_tasks=$TINY_TASKS \\
        --config.out_dir=runs/study_actgroups

Bit allocation: RTN and GPTQ at uniform W4 and W3 against mixed precision at a mean of 3.0
and 3.5 bits (rows `gptq-wmix3`, `gptq-wmix3.5`; uniform widths cannot average 3.5, so
that row stands between W3 and W4):

    qdlm study --config configs/study.py --config.models=assets/tiny-llada \\
        --config.methods=rtn,gptq --config.bits=4,3 --config.bits_budgets=3.0,3.5 \\
        --config.wa_methods= --config.wa_rows= --config.only_tasks=$TINY_TASKS \\
        --config.out_dir=runs/study_budgets

with TINY_TASKS=wikipedia_bound,arithmetic,arithmetic_subtract,synthetic_code,synthetic_compare
(2026-12-05, tiny-llada: 25 and 9 variants x 5 tasks; docs/results_tiny.md).

"""

import ml_collections

N_ITEMS = 8  # items per task (small, for 2 CPU cores)
SYNTH_ITEMS = 200  # items of the synthetic math tasks (half that for code and choices)
MC = dict(limit=N_ITEMS, mc_num=16, batch_size=16)
SHORT_GEN = dict(steps=32, gen_length=32, block_length=32)
# The tasks the tiny models score above chance / 0 on (the others stay there for every row)
TINY_TASKS = ("wikipedia_bound,arithmetic,arithmetic_subtract,synthetic_code,"
              "synthetic_compare")


def get_config():
    c = ml_collections.ConfigDict()
    c.models = ("assets/tiny-llada", "assets/tiny-dream")
    c.methods = ("rtn", "gptq", "awq")  # any method `qdlm quantize` knows, passed through
    c.bits = (8, 4, 3)
    # Mixed precision: for every method, a row per budget (the blocks' mean weight bits,
    # spread by sensitivity: the job's --config.bits_budget; rtn, gptq, awq), e.g. 3.0,3.5.
    c.bits_budgets = ()
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
    # Activation bits of those rows (empty: each row's weight bits, W8A8 / W4A4); e.g.
    # wa_bits=4 with wa_act_bits=4,8 gives W4A4 and W4A8.
    c.wa_act_bits = ()
    # Activation granularities of those rows, each a row of its own: per_token, or g<N>
    # (per-group scales of N consecutive input channels, labelled `<method>-w4a4-agN`; N
    # must divide every linear's input width). Not applied to `wa_rows`.
    c.act_granularities = ("per_token",)
    c.wa_quantize = ml_collections.ConfigDict(dict(group_size=-1))
    # Any main-job key may be set here from the command line, e.g. 4-bit K/V for every WA row:
    # --config.wa_quantize.act.kv.bits=4 (checked against configs/quantize.py).
    # Extra weight-activation rows, each on top of `quantize` + `wa_quantize`: names from
    # qdlm_jax/jobs/study.py WA_ROWS, or mappings {name, method, bits[, act_bits],
    # quantize: {main-job key: value}}; `--config.wa_rows=` runs none. The defaults:
    # QuaRot W4A4 with 4-bit K/V (act.kv.bits=4, per head, asymmetric), and the same with
    # DLLMQuant's IA-AQ on K and V (act.iaaq.enabled/search_keys, masked calibration).
    c.wa_rows = ["quarot-w4a4+kv4", "quarot-w4a4+kv4-iaaq"]
    # Extra weight-only rows: names from qdlm_jax/jobs/study_rows.py WO_ROWS (MoE models:
    # experts-only, attention-only, router8, router4, router4-only) or mappings {name,
    # method, bits, quantize: {main-job key: value}} (configs/study_moe.py uses them).
    c.rows = []
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
    # Run only these of `tasks`, by name, at the sizes above (empty: all), e.g. the tasks the
    # tiny models can do: TINY_TASKS.
    c.only_tasks = ()
    return c
