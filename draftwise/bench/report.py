"""report.md and PNG plots from summary.json."""
from __future__ import annotations

import json
from pathlib import Path

from draftwise.bench.baselines import EXTERNAL_METHODS
from draftwise.bench.runner import answers_file


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
             f"{', int8 activations on ' + cfg['isa'] if cfg.get('isa') and cfg.get('weights') == 'gguf' else ''}.", "", "## Overall", "", table(summary), ""]
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


def _plots(out: Path, summary: dict, engine) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    cats = sorted({c for d in methods.values() for c in d["categories"]})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(cats) * max(1, len(methods)) / 2), 3.5))
    w = 0.8 / max(1, len(methods))
    for i, (m, d) in enumerate(methods.items()):
        ys = [d["categories"].get(c, {}).get("speedup_vs_ar") or 0 for c in cats]
        ax.bar([j + i * w for j in range(len(cats))], ys, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(cats))], cats, rotation=20)
    ax.set_ylabel("speedup vs our AR"); ax.legend(fontsize=7); fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110); plt.close(fig)

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
