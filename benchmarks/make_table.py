"""Regenerate the README's results section from bench summary.json files.

Usage: python benchmarks/make_table.py bench_out/*/summary.json > benchmarks/RESULTS.md
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from draftwise.bench.report import table  # noqa: E402


def main(paths: list[str]) -> None:
    for p in paths:
        s = json.loads(Path(p).read_text())
        c = s["config"]
        print(f"### {c['model']} on {c.get('dataset')} (limit {c.get('limit')}, {c['max_new_tokens']} new tokens, "
              f"{c['threads']} threads, {c.get('processor', '')})\n")
        print(table(s))
        mism = s.get("mismatches") or []
        print(f"\nLossless check: {'all greedy outputs identical to AR' if not mism else f'{len(mism)} mismatches'}.\n")


if __name__ == "__main__":
    main(sys.argv[1:])
