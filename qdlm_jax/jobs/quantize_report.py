"""The quantize job's `report.md`: FP then one row per quantized run, every figure with its
standard error (`format_pm`), the extra tasks' columns, and notes on what each figure was
measured on (windows, Monte Carlo samples, problems, the tokenizer and special ids); a
DiffusionGemma run's report (`gemma_report`) ends with its coverage table."""

from __future__ import annotations

from pathlib import Path

from qdlm_jax.evals.basic import format_pm
from qdlm_jax.quant.coverage import coverage_table


def _kl_text(q) -> str:
    return format_pm(q.get("kl_to_fp_bits"), q.get("kl_to_fp_bits_se"), ".4f")


def _act_text(act_bits: int, kv_bits: int = 16, act_group_size: int | None = None) -> str:
    """"4", "4 g64" (activation scales per group of 64 input channels), "4, KV 4"."""
    text = "float" if act_bits >= 16 else str(act_bits)
    text += f" g{act_group_size}" if act_group_size and act_bits < 16 else ""
    return text if kv_bits >= 16 else f"{text}, KV {kv_bits}"


def _iaaq_searched(result: dict) -> str:
    """"K,V" or "V": what a run's IA-AQ searched (its resolved config)."""
    ia = ((result.get("config") or {}).get("act") or {}).get("iaaq") or {}
    return "K,V" if ia.get("search_keys") else "V"


_TASK_HEAD = {"arithmetic_subtract": "2-digit sub acc", "synthetic_code": "code pass@1",
              "synthetic_compare": "4-way choice acc", "arithmetic_3digit": "3-digit add acc"}


def _task_cells(ev: dict, names) -> str:
    """One `value ± se` cell (in %) per extra task; – where the run did not score it."""
    t = ev.get("tasks", {})
    return "".join(f"{format_pm(t[n]['value'], t[n].get('se'), '.1f', 100)}% | " if n in t
                   else "– | " for n in names)


def _bits_text(result: dict) -> str:
    plan = result.get("bit_plan")
    return str(result["bits"]) if not plan else f"{plan['mean_bits']:.3g} mixed"


def plan_table(result: dict) -> str:
    """A mixed-precision run's bit plan: per block its width, its linear weights and its
    sensitivity at every candidate width (the KL to fp of the model with that block alone
    RTN-quantized; `quant/bit_alloc.py`)."""
    p = result["bit_plan"]
    b = p.get("settings", {}).get("budget", {})
    lines = [f"Bit plan of {Path(result['run_dir']).name}: budget {p['budget']:g} bits, "
             f"parameter-weighted mean {p['mean_bits']:.4g}. Sensitivity: KL(fp ‖ model with "
             "the block alone RTN-quantized), bits per position, on "
             f"{b.get('samples', '?')} calibration windows with "
             f"{100 * b.get('mask_ratio', 0.5):.0f}% of positions masked.", "",
             "| block | bits | linear weights | "
             + " | ".join(f"KL at {w} bits" for w in p["widths"]) + " |",
             "|---|---|---|" + "---|" * len(p["widths"])]
    for i, (bits, n, row) in enumerate(zip(p["bits"], p["params"], p["sensitivity"])):
        lines.append(f"| {i} | {bits} | {n:,} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def report(results: list[dict]) -> str:
    """Markdown table: FP baseline then one row per quantized run ("A bits" is "float" when
    activations are not quantized, weight-only PTQ and the FP model alike)."""
    task_names = list(dict.fromkeys(t for r in results for t in (r.get("fp") or {}).get(
        "tasks", {}) | r["quantized"].get("tasks", {})))
    lines = ["| model | method | W bits | A bits | group | calibration | bits/token (↓) | "
             "ppl bound | KL to FP, bits (↓) | 2-digit add acc | " +
             "".join(f"{_TASK_HEAD.get(t, t)} | " for t in task_names) +
             "linear bytes vs bf16 | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(task_names) + "---|---|"]
    seen_fp = set()
    for r in results:
        fp = r.get("fp")
        if fp and r["model"] not in seen_fp:
            seen_fp.add(r["model"])
            lines.append(f"| {Path(r['model']).name} | FP | float | float | – | – | "
                         f"{format_pm(fp['bits_per_token'], fp.get('bits_per_token_se'), '.3f')} | "
                         f"{fp['ppl_bound']:.1f} | – | "
                         f"{format_pm(fp['arith_acc'], fp.get('arith_se'), '.1f', 100)}% | "
                         f"{_task_cells(fp, task_names)}– | – |")
    for r in results:
        q = r["quantized"]
        label = r['method'].upper() + (f" + IA-AQ ({_iaaq_searched(r)})" if r.get("iaaq")
                                        else "")
        ag = r.get("act_group_size")
        lines.append(f"| {Path(r['model']).name} | {label} | {_bits_text(r)} | "
                     f"{_act_text(r.get('act_bits', 16), r.get('kv_bits', 16), ag)} | "
                     f"{r['group_size']} | "
                     f"{r['calibration']} | "
                     f"{format_pm(q['bits_per_token'], q.get('bits_per_token_se'), '.3f')} | "
                     f"{q['ppl_bound']:.1f} | {_kl_text(q)} | "
                     f"{format_pm(q['arith_acc'], q.get('arith_se'), '.1f', 100)}% | "
                     f"{_task_cells(q, task_names)}"
                     f"{r['linear_bytes_vs_bf16']:.3f} | {r['quantize_s']:.1f} |")
    notes = []
    for r in {r["model"]: r for r in results}.values():
        q = r["quantized"]
        ref = r.get("unigram_bits_per_token")
        notes.append(
            f"{Path(r['model']).name}: bits/token on {q.get('n_windows', '?')} held-out windows "
            f"of {q.get('seq_len', '?')} tokens, {q.get('mc_num', '?')} Monte Carlo samples "
            "each" + (f"; unigram reference {ref:.3f} bits/token" if ref else "") +
            f"; 2-digit addition on {q['arith_n']} held-out problems (chance ≈ 0)" +
            "".join(f"; {t} on {v['n']} held-out items ({v['metric']}"
                    f"{', chance 25%' if v['metric'] == 'acc' else ''})"
                    for t, v in q.get("tasks", {}).items()))
        if r.get("tokenizer"):
            notes.append(f"{Path(r['model']).name}: tokenizer {r['tokenizer']}")
    footer = ("\n± is one standard error (over windows for the bound and KL, binomial for "
              "accuracy).\n" + "".join(f"{n}.\n" for n in notes))
    plans = "".join(f"\n{plan_table(r)}" for r in results if r.get("bit_plan"))
    return "\n".join(lines) + "\n" + footer + plans


def gemma_report(result: dict) -> str:
    """A DiffusionGemma run's report: FP and quantized rows (KL to fp on held-out canvases;
    2-digit addition and the extra tasks when the checkpoint has a tokenizer), the packed size
    against bf16, notes, then the coverage table: what happened to every tensor kind."""
    fp, q = result.get("fp") or {}, result["quantized"]
    task_names = list(dict.fromkeys([*fp.get("tasks", {}), *q.get("tasks", {})]))
    name = Path(result["model"]).name

    def acc(ev):
        return (f"{format_pm(ev['arith_acc'], ev.get('arith_se'), '.1f', 100)}%"
                if "arith_acc" in ev else "–")

    lines = ["| model | method | W bits | group | router | KL to FP, bits (↓) | 2-digit add acc | "
             + "".join(f"{_TASK_HEAD.get(t, t)} | " for t in task_names)
             + "bytes vs bf16 | experts vs bf16 | quantize s |",
             "|---|---|---|---|---|---|---|" + "---|" * len(task_names) + "---|---|---|"]
    if fp:
        lines.append(f"| {name} | FP | float | – | float | – | {acc(fp)} | "
                     f"{_task_cells(fp, task_names)}1.000 | 1.000 | – |")
    router = (f"W{result.get('router_bits') or result['bits']}"
              if result.get("quantize_router") else "float")
    act = result.get("act_bits", 16)
    bits = f"{result['bits']}" + (f" (A{act})" if act < 16 else "")
    lines.append(f"| {name} | {result['method'].upper()} | {bits} | "
                 f"{result['group_size']} | {router} | {_kl_text(q)} | {acc(q)} | "
                 f"{_task_cells(q, task_names)}{result['bytes_vs_bf16']:.3f} | "
                 f"{result['expert_bytes_vs_bf16']:.3f} | {result['quantize_s']:.1f} |")
    notes = list(result.get("notes", []))
    if "kl_to_fp_bits" in q:
        notes.append(f"KL to FP on {q['kl_windows']} held-out windows ({q['kl_input']}): a "
                     f"clean prompt of {q['kl_prompt_len']} tokens, then a canvas of "
                     f"{q['kl_canvas_length']} tokens, each position uniform noise with "
                     "probability 1/2, decoded without and with self-conditioning "
                     "(evals/canvas_kl.py)")
    if "arith_acc" in q:
        notes.append(f"2-digit addition on {q['arith_n']} held-out problems")
    if "expert_choices_changed" in q:
        routers = "quantized" if result.get("quantize_router") else "kept"
        notes.append(f"{100 * q['expert_choices_changed']:.2f}% of the fp model's top-k expert "
                     f"choices changed (routers {routers}; {q['expert_choices']} choices on "
                     "the KL windows: the encoder over the prompt, the decoder's first step "
                     "over the canvas)")
    notes.append(f"packed {result['packed_bytes'] / 2**20:.2f} MiB against "
                 f"{result['bf16_bytes'] / 2**20:.2f} MiB in bf16 (every tensor counted; "
                 "unquantized ones in the source dtype)")
    if result.get("tokenizer"):
        notes.append(f"tokenizer {result['tokenizer']}")
    return ("\n".join(lines) + "\n\n± is one standard error.\n" + "".join(f"{n}.\n" for n in notes)
            + f"\nCoverage of {name} (every tensor, planned before quantizing and checked "
            "after):\n\n" + coverage_table(result["coverage"]))
