"""Write benchmarks/data/longctx-20.jsonl: 20 prompts whose answers reuse their context.

10 "refactor" prompts: a standard-library function (its source, 25-60 lines) with the request to
add type hints and a docstring and return the whole function. 10 "document" prompts: a long
assistant answer from ShareGPT's evaluation split (conversations [0, 5000), disjoint from the
chat datastore, which holds later ones) with a request to quote its key sentences. Deterministic."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftwise.corpora import EVAL_SPLIT, sharegpt_conversations  # noqa: E402
from draftwise.datastore import stdlib_files  # noqa: E402

MODULES = ("textwrap", "shlex", "fnmatch", "colorsys", "bisect", "heapq", "ipaddress", "statistics", "difflib",
           "calendar", "random", "glob", "pprint", "gettext", "copy", "string", "base64")


def functions() -> list[tuple[str, str]]:
    files = {f.stem: f for f in stdlib_files() if f.parent.name == "lib" or f.parent.name.startswith("python3")}
    out = []
    for mod in MODULES:
        src = files[mod].read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and 25 <= node.end_lineno - node.lineno + 1 <= 60:
                out.append((mod, ast.get_source_segment(src, node)))
                break
    return out[:10]


def documents(n: int) -> list[str]:
    out = []
    for k, conv in enumerate(sharegpt_conversations()):
        if k >= EVAL_SPLIT or len(out) >= n:
            break
        for turn in conv.get("conversations", []):
            text = turn.get("value", "")
            if turn.get("from") == "gpt" and 1500 <= len(text) <= 3000 and text.isascii():
                out.append(text)
                break
    return out


def main() -> None:
    rows = []
    for i, (mod, fn) in enumerate(functions()):
        rows.append({"question_id": f"refactor-{i}", "category": "refactor", "chat": True,
                     "turns": [f"Here is a function from Python's `{mod}` module:\n\n```python\n{fn}\n```\n\n"
                               "Add type hints and a short docstring, keep the code otherwise unchanged, "
                               "and return the whole function."]})
    for i, doc in enumerate(documents(10)):
        rows.append({"question_id": f"document-{i}", "category": "document", "chat": True,
                     "turns": [f"Read this text:\n\n{doc}\n\nQuote, word for word, the three sentences that "
                               "matter most, then explain each in one line."]})
    out = Path(__file__).parent / "data" / "longctx-20.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(out, len(rows), "prompts")


if __name__ == "__main__":
    main()
