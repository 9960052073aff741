"""Results tables from bench summary.json files: one summary row per run, then each run's table.

    python benchmarks/make_table.py bench_out/quick/*/summary.json              # print markdown
    python benchmarks/make_table.py --readme docs/results.md bench_out/quick/*/summary.json
        # rewrite the README's table between <!-- results:begin --> and <!-- results:end -->
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from draftwise.bench.baselines import EXTERNAL_METHODS  # noqa: E402
from draftwise.bench.report import table  # noqa: E402

COLUMNS = [("recycling", "recycling"), ("lookup", "lookup"), ("hf", "HF generate"),
           ("hf-lookup", "HF lookup"), ("hf-assisted", "HF assisted"), ("llamacpp", "llama.cpp"),
           ("llamacpp-lookup", "llama.cpp lookup")]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _short(model: str) -> str:
    return model.replace("qwen2.5-coder-", "Qwen2.5-Coder-").replace("-instruct", "").replace("b", "B")


def summary_table(summaries: list[dict]) -> str:
    used = [(m, name) for m, name in COLUMNS if any(m in s["methods"] for s in summaries)]
    head = ["model", "dataset", "turns", "our AR tok/s"] + [f"{name} ×AR" for _, name in used] + \
           ["τ recycling / lookup", "draftwise = AR", "HF = AR"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        c, ms = s["config"], s["methods"]
        ar = ms["ar"]["overall"]
        cells = [_short(c["model"]), str(c.get("dataset")), str(ar["turns"]) if "turns" in ar else f"{ar['samples']} samples",
                 f"{ar['tokens_per_s']:.2f}"]
        for m, _ in used:
            o = ms.get(m, {}).get("overall")
            cells.append("–" if o is None or o["speedup_vs_ar"] is None else f"{o['speedup_vs_ar']:.2f}×")
        cells.append(" / ".join(f"{ms[m]['overall']['tau']:.2f}" if m in ms else "–" for m in ("recycling", "lookup")))
        ours = [m for m in ms if m != "ar" and m not in EXTERNAL_METHODS]
        n_ours = sum(ms[m]["overall"]["samples"] for m in ours)
        if s.get("mismatches"):
            cells.append(f"**{len(s['mismatches'])} mismatches**")
        elif all("same_as_ar" in ms[m]["overall"] for m in ours):
            cells.append(f"{sum(ms[m]['overall']['same_as_ar'] for m in ours)}/{n_ours}")
        else:   # summaries written before same_as_ar existed: the lossless check still ran
            cells.append(f"all ({n_ours})")
        hf = ms.get("hf", {}).get("overall")
        cells.append("–" if hf is None or "same_as_ar" not in hf else f"{hf['same_as_ar']}/{hf['samples']}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def details(summaries: list[dict]) -> str:
    out = []
    for s in summaries:
        c = s["config"]
        out.append(f"### {c['model']} on {c.get('dataset')} (limit {c.get('limit')}, {c['max_new_tokens']} new tokens, "
                   f"{c['threads']} threads, {c.get('processor', '')})\n")
        out.append(table(s))
        mism = s.get("mismatches") or []
        out.append(f"\nLossless check: {'all greedy outputs identical to AR' if not mism else f'{len(mism)} mismatches'}.\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("--readme", help="rewrite the table between the results markers of this file")
    a = ap.parse_args()
    summaries = [json.loads(Path(p).read_text()) for p in a.summaries]
    if a.readme:
        path = Path(a.readme)
        text = path.read_text()
        if BEGIN not in text or END not in text:
            sys.exit(f"{path} has no {BEGIN} ... {END} section")
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        path.write_text(f"{pre}{BEGIN}\n{summary_table(summaries)}\n{END}{post}")
        return
    print(summary_table(summaries) + "\n")
    print(details(summaries))


if __name__ == "__main__":
    main()
