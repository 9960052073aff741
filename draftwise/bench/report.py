"""report.md and PNG plots from summary.json."""
from __future__ import annotations

import json
from pathlib import Path

from draftwise.bench.baselines import EXTERNAL_METHODS


def answers_file(label: str) -> str:
    """The JSONL file of one method label's answers inside a run's folder."""
    return f"answers-{label.replace('/', '--')}.jsonl"


def _fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def _x(ratio) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def table(summary: dict) -> str:
    assisted = any(d["overall"].get("speedup_vs_hf_assisted") is not None for d in summary["methods"].values())
    rows = ["| method | tokens/s | speedup vs our AR | speedup vs HF generate | "
            + ("speedup vs HF assisted | " if assisted else "")
            + "τ (tokens/pass) | mean tree | draft s / verify s | output = AR | samples |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if assisted else "")]
    for m, d in summary["methods"].items():
        o = d["overall"]
        if m in EXTERNAL_METHODS:
            o = {**o, "tau": None, "mean_tree_size": None}     # baselines do not report their target passes
        same = "–" if o.get("same_as_ar") is None else f"{o['same_as_ar']}/{o['samples']}"
        times = "–" if m in EXTERNAL_METHODS else f"{o.get('draft_time', 0):.0f} / {o.get('verify_time', 0):.0f}"
        rows.append(f"| {m} | {_fmt(o['tokens_per_s'])} | {_x(o['speedup_vs_ar'])} | {_x(o.get('speedup_vs_hf'))} | "
                    + (f"{_x(o.get('speedup_vs_hf_assisted'))} | " if assisted else "")
                    + f"{_fmt(o['tau'])} | {_fmt(o['mean_tree_size'], '.1f')} | {times} | {same} | {o['samples']} |")
    return "\n".join(rows)


def write_report(out: Path, summary: dict, engine=None) -> None:
    cfg = summary["config"]
    lines = [f"# draftwise bench: {cfg['model']}", "",
             f"max_new_tokens {cfg['max_new_tokens']}, temperature {cfg['temperature']}, threads {cfg['threads']}, "
             f"device {cfg['device']} ({cfg.get('processor', '')}), torch {cfg['torch']}, "
             f"prepacked kernels {cfg['kernels']}, weights {cfg.get('weights', 'fp32')}"
             f"{', int8 activations on ' + cfg['isa'] if cfg.get('isa') and cfg.get('weights') == 'gguf' else ''}.",
             "", "## Overall", "", table(summary), ""]
    cats = sorted({c for d in summary["methods"].values() for c in d["categories"]})
    if len(cats) > 1:
        lines += ["## Speedup vs our AR by category", "",
                  "| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for m, d in summary["methods"].items():
            lines.append(f"| {m} | " + " | ".join(_fmt(d["categories"].get(c, {}).get("speedup_vs_ar")) for c in cats) + " |")
        lines.append("")
    depth_rows = [(m, d["overall"].get("acceptance_by_depth") or []) for m, d in summary["methods"].items()]
    depth_rows = [(m, a) for m, a in depth_rows if a]
    if depth_rows:
        lines += ["## Acceptance rate by depth (accepted / drafted nodes at depth d)", ""]
        lines += [f"- {m}: " + ", ".join(f"d{i + 1} {x:.2f}" for i, x in enumerate(a[:8])) for m, a in depth_rows]
        lines.append("")
    mism = summary.get("mismatches") or []
    lines += ["## Lossless check", "",
              "all greedy outputs identical to AR" if not mism else f"**{len(mism)} mismatches**: {mism[:10]}", ""]
    w = summary.get("weights_mb") or {}
    wtxt = ", ".join(f"{k} {v:.0f} MB" for k, v in w.items())
    lines.append(f"Peak RSS: {summary.get('peak_rss_mb', 0):.0f} MB (whole process: our models, and the Hugging Face "
                 f"copies the hf baselines load); weights in our engine: {wtxt or 'n/a'}.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plots(out, summary, engine)               # matplotlib is a dependency: plots always come


def _speedup_map(path: Path, methods: dict, plt) -> None:
    """Speedup over our AR by method (rows) and category (columns, then overall) as a heat map centred
    on 1.0 (AR): blue wins, red loses, each cell labelled with its value."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    rows = [m for m in methods if m != "ar"] or list(methods)
    cats = sorted({c for d in methods.values() for c in d["categories"]})
    cols = cats + ["overall"] if len(cats) != 1 else cats            # one category: it is the overall
    val = np.full((len(rows), len(cols)), np.nan)
    for i, m in enumerate(rows):
        d = methods[m]
        for j, c in enumerate(cats):
            v = d["categories"].get(c, {}).get("speedup_vs_ar")
            val[i, j] = np.nan if v is None else v
        if len(cols) > len(cats):
            v = d["overall"].get("speedup_vs_ar")
            val[i, -1] = np.nan if v is None else v
    finite = val[np.isfinite(val)]
    span = max(0.05, float(np.abs(finite - 1.0).max())) if finite.size else 0.5
    w = min(14.0, max(4.8, 2.4 + 0.8 * len(cols)))
    h = min(10.0, max(3.4, 1.6 + 0.42 * len(rows)))
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(val, cmap="RdBu", norm=TwoSlopeNorm(1.0, 1.0 - span, 1.0 + span), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    if len(cols) > len(cats):
        ax.axvline(len(cats) - 0.5, color="k", lw=1.2)                 # categories | overall
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(val[i, j]):
                dark = abs(val[i, j] - 1.0) > 0.6 * span
                ax.text(j, i, f"{val[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("speedup vs our AR (1.0 = AR)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax.set_title("speedup over plain decoding, by category", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plots(out: Path, summary: dict, engine) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    _speedup_map(out / "speedup.png", methods, plt)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        p = out / answers_file(m)
        if not p.is_file():
            continue
        acc = [a for line in p.read_text().splitlines() for t in json.loads(line)["choices"][0]["accept_lengths"] for a in t]
        if acc and max(acc) > 1:
            ax.hist(acc, bins=range(1, max(acc) + 2), alpha=0.5, label=m, align="left")
    ax.set_xlabel("tokens per target pass"); ax.set_ylabel("passes")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tau_hist.png", dpi=110); plt.close(fig)

    if engine is not None:
        curve = engine.cost_curve()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve.ns, curve.ms, "o-", label="target t(n)")
        if getattr(engine, "draft_model", None) is not None:
            dc = engine.draft_cost_curve()
            ax.plot(dc.ns, dc.ms, "s-", label="draft t(n) (full LM head)")
        for m, d in methods.items():
            size = d["overall"]["mean_tree_size"]
            if size and size > 1:
                ax.axvline(size, ls="--", lw=0.8, label=f"{m} mean tree {size:.1f}", color=f"C{hash(m) % 8 + 1}")
        ax.set_xscale("log", base=2); ax.set_xlabel("nodes per forward"); ax.set_ylabel("ms")
        ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(out / "cost_curve.png", dpi=110); plt.close(fig)
