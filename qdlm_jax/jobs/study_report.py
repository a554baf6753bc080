"""The study's outputs: `table.md` and `plot_<model>.png`.

`markdown_table`: rows model x method x bits with the fp row first; columns the tasks grouped
by category, as in the QDLM paper's tables; each cell `value ± standard error`; a reference
row (chance, the unigram entropy). `plot_model`: metric against bits, one line per method,
one panel per category (the mean over the tasks the fp model can do), fp as a dashed
reference line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qdlm_jax.evals.basic import format_pm
from qdlm_jax.evals.tasks import CATEGORIES, TaskSpec
from qdlm_jax.fsutil import atomic_file
from qdlm_jax.jobs.study_rows import FP

# ---- table and plots ---------------------------------------------------------------------

CATEGORY_TITLES = {"language_modeling": "Language modelling", "multiple_choice":
                   "Multiple choice", "math": "Math", "code": "Code",
                   "fidelity": "Fidelity to fp"}


def _ordered_tasks(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(tasks, key=lambda t: order.get(t.category, len(order)))


def _fmt(rec: dict | None) -> str:
    if rec is None:
        return "–"
    v, se = rec["value"], rec.get("se")
    tps = rec.get("tokens_per_step")
    if rec.get("decoding") and tps is not None:  # a decoded task: accuracy and parallelism
        return format_pm(v, se, ".1f", 100) + f" ({tps:.2f} tok/step)"
    if rec["higher_is_better"]:
        return format_pm(v, se, ".1f", 100)
    return format_pm(v, se, ".4f" if rec.get("category") == "fidelity" else ".3f")


def _row(r: dict) -> tuple:
    """(model, method, weight bits (a budget row: the budget), activation bits or None,
    extra row name or "", activation granularity text or "", bit budget or None) of a
    record."""
    return (r["model_name"], r["method"], r["bits"], r.get("act_bits"), r.get("variant") or "",
            _act_text(r), r.get("bits_budget"))


def _act_text(r: dict) -> str:
    """"" for per-token activations (and weight-only rows), "ag32" for groups of 32 input
    channels, "per-tensor" for static per-tensor scales."""
    if r.get("act_group_size"):
        return f"ag{r['act_group_size']}"
    return "per-tensor" if r.get("act_granularity") == "per_tensor" else ""


def _row_order(records: list[dict]) -> list[tuple]:
    """fp first, then weight-only rows, then weight-activation rows; within each, methods in
    first-seen order, weight bits descending (a budget row after the uniform row of its
    width), activation bits descending, per-token activations before groups (largest
    first), a method's extra rows (`wa_rows`) after its plain row of the same bits."""
    rows = list(dict.fromkeys(_row(r) for r in records))
    models = list(dict.fromkeys(r[0] for r in rows))
    methods = list(dict.fromkeys(r[1] for r in rows if r[1] != FP))
    extras = [""] + list(dict.fromkeys(r[4] for r in rows if r[4]))

    def act_rank(text: str) -> float:
        return 0.0 if not text else 1.0 / int(text[2:]) if text.startswith("ag") else 2.0

    return sorted(rows, key=lambda r: (models.index(r[0]), r[1] != FP, r[3] is not None,
                                       methods.index(r[1]) if r[1] != FP else -1,
                                       -(r[2] or 0), r[6] is not None, -(r[3] or 0),
                                       act_rank(r[5]), extras.index(r[4])))


def _kv_text(kv: dict | None) -> str:
    """", or ", KV4" with what differs from per-head asymmetric K/V."""
    if not kv:
        return ""
    text = f", KV{kv['bits']}" + (" sym" if kv.get("sym") else "")
    if kv.get("granularity", "per_head") != "per_head":
        text += f" {kv['granularity']} {kv.get('group_size')}"
    return text


def _iaaq_text(ia: dict | None) -> str:
    """"", or " + IA-AQ (K,V; masked)": what IA-AQ searched and on which calibration."""
    if not ia:
        return ""
    grid = "" if (ia.get("grid"), ia.get("lowest")) == (10, 0.55) else \
        f", grid {ia.get('grid')} to {ia.get('lowest')}"
    return (f" + IA-AQ ({'K,V' if ia.get('search_keys') else 'V'}; "
            f"{ia.get('calibration')}{grid})")


def _bits_cell(bits, act_bits, kv: dict | None = None, act: str = "",
               budget: float | None = None, plan: Sequence[int] | None = None) -> str:
    """4 | mix3.5 (4 3 3 4) | W4A8 | W4A4 ag32 | W4A4, KV4."""
    if budget is not None:
        return f"mix{budget:g}" + (f" ({' '.join(map(str, plan))})" if plan else "")
    if bits is None:
        return "–"
    if act_bits is None:
        return str(bits)
    return f"W{bits}A{act_bits}" + (f" {act}" if act else "") + _kv_text(kv)


def markdown_table(records: list[dict], tasks: Sequence[TaskSpec]) -> str:
    """QDLM-paper layout: a category header row, then task names; accuracies in %, the LM
    bound in bits/token (↓)."""
    tasks = _ordered_tasks(tasks)
    by = {(*_row(r), r["task"]): r for r in records}
    cats, prev = [], None
    for t in tasks:
        cats.append(CATEGORY_TITLES.get(t.category, t.category) if t.category != prev else "")
        prev = t.category
    unit = {t.name: _unit(t, f"{t.metric} %") for t in tasks}
    lines = ["| | | | " + " | ".join(cats) + " |",
             "|---|---|---|" + "---|" * len(tasks),
             "| **model** | **method** | **bits** | " +
             " | ".join(f"**{t.name}** ({unit[t.name]})" for t in tasks) + " |"]
    first = {}  # row -> its first record: the row's K/V and IA-AQ settings
    for r in records:
        first.setdefault(_row(r), r)
    overridden = []
    for row in _row_order(records):
        model, method, bits, act_bits, extra, act, budget = row
        cells = [_fmt(by.get((*row, t.name))) for t in tasks]
        r0 = first[row]
        label = "FP" if method == FP else method.upper() + _iaaq_text(r0.get("iaaq"))
        bits_text = _bits_cell(bits, act_bits, r0.get("kv"), act, budget, r0.get("bit_plan"))
        if extra and act_bits is None:  # a named weight-only row (`rows`)
            bits_text += f" +{extra}"
        lines.append(f"| {model} | {label} | {bits_text} | " + " | ".join(cells) + " |")
        if extra and r0.get("overrides") and extra not in [o[0] for o in overridden]:
            overridden.append((extra, f"{method}-{_variant_bits(bits, act_bits)}+{extra}",
                               r0["overrides"], "rows" if act_bits is None else "wa_rows"))
    models = sorted({r["model_name"]: r.get("model", r["model_name"]) for r in records}.items())
    unigrams = [(name, _unigram(path)) for name, path in models]
    lines.append("| *reference* | chance / unigram | – | " + " | ".join(
        _reference(t, records, unigrams) for t in tasks) + " |")
    notes = ["± is one standard error (over windows for the bound, binomial for accuracies); "
             "the reference row is what a model that knows nothing scores: chance for multiple "
             "choice (the mean of 1 / options over the items), about 0 for exact match and "
             "pass@1, and for bits/token the entropy of a unigram model fitted on the train "
             "split (a trained model must be below it)."]
    notes += [f"{name}: unigram reference {u:.3f} bits/token (its model card)."
              for name, u in unigrams if u is not None]
    if any(r.get("bits_budget") is not None for r in records):
        notes.append("Bits `mix<B>`: mixed precision (`bits_budgets`), the blocks' weights at "
                     "a mean of B bits (parameter-weighted), spread by each block's measured "
                     "sensitivity; in brackets the width of each block, first to last.")
    if any(r.get("act_bits") is not None for r in records) and any(
            _act_text(r) for r in records):
        notes.append("Bits `W<b>A<a> ag<g>`: activation scales per group of g consecutive "
                     "input channels (`act_granularities`); W<b>A<a> alone: per token.")
    if any(r.get("decoding") for r in records):
        notes.append("Columns `<task>@<setting>`: the task under Fast-dLLM decoding "
                     "(`<cache>-tau<threshold>` / `-f<factor>`), cells with the mean tokens "
                     "committed per forward pass; – where the row was not run that way.")
    notes += [f"Row {label} (`{key}`) sets, on top of the study's "
              f"{'weight-activation ' if key == 'wa_rows' else ''}settings: " + ", ".join(
                  f"`{k}={_value_text(v)}`" for k, v in ov.items()) + "."
              for _, label, ov, key in overridden]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def moe_table(records: list[dict], tasks: Sequence[TaskSpec]) -> str:
    """The MoE rows at a glance, one line per row of the models whose records hold expert
    choices (DiffusionGemma): each scored task (accuracies in %, the text score in bits per
    token, KL to fp in bits per position, ± one standard error), the share of the fp
    model's top-k expert choices that changed (the fidelity task), and the sampler's figures
    pooled over the row's generation tasks: tokens committed per forward pass, and forward
    passes per item (for the entropy-bound sampler, the steps to its early stop) ± one
    standard error over items."""
    moe_models = {r["model_name"] for r in records if r.get("expert_choices_changed") is not None}
    records = [r for r in records if r["model_name"] in moe_models]
    tasks = _ordered_tasks(tasks)
    by = {(*_row(r), r["task"]): r for r in records}
    unit = {t.name: _unit(t, "%") for t in tasks}
    lines = ["| **model** | **row** | " + " | ".join(f"**{t.name}** ({unit[t.name]})"
                                                    for t in tasks)
             + " | **expert choices changed** (%) | **tokens / forward** | "
               "**forwards / item** |",
             "|---|---|" + "---|" * (len(tasks) + 3)]
    for row in _row_order(records):
        mine = [r for r in records if _row(r) == row]
        cells = [_fmt(by.get((*row, t.name))) for t in tasks]
        changed = [r["expert_choices_changed"] for r in mine
                   if r.get("expert_choices_changed") is not None]
        cells.append(f"{100 * changed[0]:.2f}" if changed else "–")
        cells += _decode_cells(mine)
        lines.append(f"| {row[0]} | {_row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _unit(t: TaskSpec, accuracy: str) -> str:
    """A task column's unit: KL bits for fidelity, bits/token for the bound, else `accuracy`."""
    if t.category == "fidelity":
        return "KL bits ↓"
    return "bits/tok ↓" if not t.higher_is_better else accuracy


def _row_label(row: tuple) -> str:
    """FP, or `RTN 4`, `RTN W4A8`, `RTN 4 +router4` (a named row)."""
    _, method, bits, act_bits, extra, _, _ = row
    if method == FP:
        return "FP"
    return f"{method.upper()} {_bits_cell(bits, act_bits)}" + (f" +{extra}" if extra else "")


def decode_stats(recs: list[dict]) -> tuple[float, float, float] | None:
    """(tokens per forward pass, forwards per item, its standard error) pooled over the
    generation records among a row's records (`moe_table`), or None when they hold no
    sampler figures."""
    recs = [r for r in recs if r.get("tokens_per_step") is not None and not r.get("decoding")]
    if not recs or any(r.get("forward_passes_per_row") is None for r in recs):
        return None
    passes = [r["result"]["forward_passes"] for r in recs]
    items = [p / r["forward_passes_per_row"] for p, r in zip(passes, recs)]
    tokens = sum(r["tokens_per_step"] * p for r, p in zip(recs, passes))
    se = sum((n * (r.get("forward_passes_per_row_se") or 0.0)) ** 2
             for n, r in zip(items, recs)) ** 0.5 / sum(items)
    return tokens / sum(passes), sum(passes) / sum(items), se


def plot_decoding(records: list[dict], model: str, path: Path) -> Path:
    """Forwards per item of the sampler (± one standard error) against KL to fp, one point
    per row of `model` (a MoE study's `kl_to_fp` fidelity task), fp as a dashed line: does
    a row that is further from fp decode slower? PNG via Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = Path(model).name
    recs = [r for r in records if r["model_name"] == name]
    points = []
    for row in _row_order(recs):
        mine = [r for r in recs if _row(r) == row]
        kl = [r for r in mine if r.get("category") == "fidelity"]
        stats = decode_stats(mine)
        if kl and stats:
            points.append((_row_label(row), kl[0]["value"], kl[0].get("se") or 0.0,
                           *stats[1:]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, kl, kl_se, fwd, fwd_se in points:
        if label == "FP":
            ax.axhline(fwd, color="black", linestyle="--", linewidth=1, label="fp")
            continue
        ax.errorbar(max(kl, 1e-4), fwd, xerr=kl_se, yerr=fwd_se, marker="o", capsize=3,
                    linestyle="none")
        ax.annotate(label, (max(kl, 1e-4), fwd), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KL to fp (bits per canvas position, log scale)")
    ax.set_ylabel("sampler forward passes per item")
    ax.set_title(f"{name}: distance from fp against decoding steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _decode_cells(recs: list[dict]) -> list[str]:
    """[tokens per forward pass, forwards per item ± se] of a row's records (`decode_stats`)."""
    stats = decode_stats(recs)
    if stats is None:
        return ["–", "–"]
    return [f"{stats[0]:.2f}", format_pm(stats[1], stats[2], ".2f")]


def _value_text(v) -> str:
    """An override's value as the command line writes it (a sequence comma-joined)."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _variant_bits(bits, act_bits) -> str:
    return f"w{bits}" if act_bits is None else f"w{bits}a{act_bits}"


def _reference(task: TaskSpec, records: list[dict],
               unigrams: Sequence[tuple[str, float | None]] = ()) -> str:
    if task.category == "fidelity":
        return "fp: 0"
    if not task.higher_is_better:
        known = [f"{u:.3f}" + (f" ({name})" if len(unigrams) > 1 else "")
                 for name, u in unigrams if u is not None]
        return "unigram " + " / ".join(known) if known else "–"
    chances = [r["chance"] for r in records
               if r["task"] == task.name and r.get("chance") is not None]
    if chances:
        return f"{100 * chances[0]:.1f}"
    return "–" if task.type == "multiple_choice" else "≈ 0"


def _unigram(path: str) -> float | None:
    from qdlm_jax.jobs.quantize import unigram_reference
    return unigram_reference(path)


def axis_limits(values: Sequence[float], *, percent: bool) -> tuple[float, float]:
    """An honest y range for a panel: percentages at least 10 points tall inside [0, 100];
    bits/token at least 0.1 bits tall, so a gap of a few thousandths of a bit (Monte Carlo
    noise) is drawn as small as it is."""
    mid = (min(values) + max(values)) / 2
    if percent:
        half = max(5.0, (max(values) - min(values)) / 2 + 2.0)
        lo = max(0.0, min(max(0.0, mid - half), 100.0 - 2 * half))
        return lo, min(100.0, lo + 2 * half)
    half = max(0.05, (max(values) - min(values)) / 2 * 1.1)
    return mid - half, mid + half


def fp_can_do(task: TaskSpec, records: list[dict], model_name: str) -> bool:
    """Whether the fp model scores on `task` (accuracy at least 5 points above chance, or any
    bits/token); True when there is no fp record. Category means use these tasks only: a task
    the fp model scores 0 on carries no signal about what quantization did."""
    fp = [r for r in records if r["model_name"] == model_name and r["method"] == FP
          and r["task"] == task.name]
    if not fp or not task.higher_is_better:
        return True
    return fp[0]["value"] >= (fp[0].get("chance") or 0.0) + 0.05


def _series(r: dict) -> tuple:
    """A record's line in the plots: (method, activation bits: None weight-only, "=" at the
    weight bits, else the number, activation granularity text, extra row name, whether a
    bit-budget row); its points are the rows' (weight or budget) bits."""
    a = r.get("act_bits")
    act = None if a is None else "=" if a == r.get("bits") else a
    return (r["method"], act, _act_text(r), r.get("variant") or "",
            r.get("bits_budget") is not None)


def _series_label(ser: tuple) -> str:
    method, act, act_text, extra, budget = ser
    return (method.upper() + ("" if act is None else " W=A" if act == "=" else f" A{act}")
            + (f" {act_text}" if act_text else "") + (" mix" if budget else "")
            + (f" +{extra}" if extra else ""))


def plot_model(records: list[dict], tasks: Sequence[TaskSpec], model: str, path: Path) -> Path:
    """Metric against bits per method, one panel per category (mean over the category's
    tasks the fp model can do, `fp_can_do`; accuracies in %), fp as a dashed horizontal
    line. Weight-only methods are solid lines at their weight bits; weight-activation
    methods (W<b>A<b>) dotted lines at b. PNG via Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = Path(model).name
    recs = [r for r in records if r["model_name"] == name]
    cats = [c for c in CATEGORIES if any(t.category == c for t in tasks)]
    cats += sorted({t.category for t in tasks} - set(cats))
    fig, axes = plt.subplots(1, max(1, len(cats)), figsize=(4.2 * max(1, len(cats)), 3.8),
                             squeeze=False)
    series = list(dict.fromkeys(_series(r) for r in recs if r["method"] != FP))
    for ax, cat in zip(axes[0], cats):
        all_ctasks = [t for t in tasks if t.category == cat]
        ctasks = [t for t in all_ctasks if fp_can_do(t, recs, name)] or all_ctasks
        left_out = [t.name for t in all_ctasks if t not in ctasks]
        pct = ctasks[0].higher_is_better
        scale = 100.0 if pct else 1.0

        def mean_se_of(series, bits):
            """(category mean, its standard error) or (None, None)."""
            rs = [r for r in recs if _series(r) == series and r["bits"] == bits
                  and r["task"] in {t.name for t in ctasks}]
            if len(rs) != len(ctasks):
                return None, None
            se = float(np.sqrt(sum((r.get("se") or 0.0) ** 2 for r in rs))) / len(rs)
            return scale * float(np.mean([r["value"] for r in rs])), scale * se

        fp, fp_se = mean_se_of(_series({"method": FP}), None)
        shown = [fp] if fp is not None else []
        if fp is not None:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1.2, label="fp")
            if fp_se:
                ax.axhspan(fp - fp_se, fp + fp_se, color="black", alpha=0.08)
        all_bits = sorted({r["bits"] for r in recs if r["bits"] is not None}, reverse=True)
        for ser in series:
            pts = [(b, *mean_se_of(ser, b)) for b in all_bits]
            pts = [(b, y, e) for b, y, e in pts if y is not None]
            if pts:
                wa = ser[1] is not None
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[p[2] or 0.0 for p in pts], capsize=3,
                            marker="s" if wa else "^" if ser[4] else "o",
                            linestyle=":" if wa else "--" if ser[4] else "-",
                            label=_series_label(ser))
                shown += [p[1] + s * (p[2] or 0.0) for p in pts for s in (-1, 1)]
        if shown:
            ax.set_ylim(*axis_limits(shown, percent=pct))
        ax.set_xticks(all_bits or [4])
        if all_bits:
            ax.set_xlim(max(all_bits) + 0.5, min(all_bits) - 0.5)  # fewer bits to the right
        ax.set_xlabel("bits (weights; W=A: weights and activations)"
                      if any(ser[1] is not None for ser in series) else "weight bits")
        metric = ctasks[0].metric
        ylabel = f"{metric} (%)" if pct else f"{metric} (lower is better)"
        if len(ctasks) > 1:
            ylabel = f"mean {ylabel}"
        ax.set_ylabel(ylabel)
        ax.set_title(f"{CATEGORY_TITLES.get(cat, cat)}\n"
                     f"({', '.join(t.name for t in ctasks)})"
                     + (f"\nleft out (fp at chance): {', '.join(left_out)}" if left_out
                        else ""), fontsize=9)
        ax.grid(alpha=0.3)
    handles: dict = {}  # one legend for the figure, below the panels (none covers a line)
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   ncol=min(len(handles), 8), fontsize=9, frameon=False)
    fig.suptitle(f"{name}: quality against bits")
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
