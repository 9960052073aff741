"""Spec-Bench-style runner: every method over the same prompts in one process.

Prompt-major order (each prompt runs through every method before the next prompt) so slow
drifts of the machine hit all methods alike. Greedy runs check every method's tokens against
our AR decoding; any mismatch is reported and makes the command fail.
"""
from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftwise.bench.baselines import EXTERNAL_METHODS, Baselines
from draftwise.bench.report import answers_file, write_report
from draftwise.errors import ConfigError


@dataclass
class Sample:
    method: str
    question_id: str
    category: str
    turns: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    decoding_steps: list[int] = field(default_factory=list)
    accept_lengths: list[list[int]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    draft_time: float = 0.0
    verify_time: float = 0.0
    mean_tree_size: float = 0.0
    proposed_by_depth: list[int] = field(default_factory=list)   # draft nodes per depth (1-based)
    accepted_by_depth: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.wall_time)
        return sum(self.new_tokens) / t if t > 0 else 0.0

    def to_json(self) -> dict:
        return {"question_id": self.question_id, "category": self.category, "model_id": self.method,
                "choices": [{"index": 0, "turns": self.turns, "new_tokens": self.new_tokens,
                             "wall_time": self.wall_time, "decoding_steps": self.decoding_steps,
                             "accept_lengths": self.accept_lengths}],
                "token_ids": self.token_ids, "draft_time": self.draft_time, "verify_time": self.verify_time,
                "mean_tree_size": self.mean_tree_size, "proposed_by_depth": self.proposed_by_depth,
                "accepted_by_depth": self.accepted_by_depth, "tstamp": time.time()}

    @classmethod
    def from_json(cls, method: str, d: dict) -> "Sample":
        c = d["choices"][0]
        return cls(method, str(d["question_id"]), d["category"], c["turns"], c["new_tokens"], c["wall_time"],
                   c["decoding_steps"], c["accept_lengths"], d.get("token_ids", []), d.get("draft_time", 0.0),
                   d.get("verify_time", 0.0), d.get("mean_tree_size", 0.0), d.get("proposed_by_depth", []),
                   d.get("accepted_by_depth", []))


def base_method(label: str) -> str:
    """A bench label is a method name, or METHOD/VARIANT to run one method under several option
    sets in one bench (e.g. draft-model/chain with --method-opts '{"draft-model/chain": {...}}')."""
    return label.split("/", 1)[0]


def summarize(samples: dict[str, list[Sample]], ref: str = "ar") -> dict:
    """Per method: tokens/s, speedup vs AR (mean of per-sample ratios, as Spec-Bench), tau, per category."""
    base = {s.question_id: s for s in samples.get(ref, [])}
    out = {}
    for method, ss in samples.items():
        def agg(group: list[Sample]) -> dict:
            toks = sum(sum(s.new_tokens) for s in group)
            wall = sum(sum(s.wall_time) for s in group)
            steps = sum(sum(s.decoding_steps) for s in group)
            ratios = [s.tokens_per_s / base[s.question_id].tokens_per_s for s in group
                      if s.question_id in base and base[s.question_id].tokens_per_s > 0]
            acc = [a for s in group for turn in s.accept_lengths for a in turn]
            prop_d, acc_d = _sum_lists([s.proposed_by_depth for s in group]), _sum_lists([s.accepted_by_depth for s in group])
            same = sum(1 for s in group if s.question_id in base and s.token_ids == base[s.question_id].token_ids)
            return {"samples": len(group), "turns": sum(len(s.new_tokens) for s in group), "same_as_ar": same,
                    "new_tokens": toks, "wall_time": wall,
                    "tokens_per_s": toks / wall if wall else 0.0,
                    "speedup_vs_ar": sum(ratios) / len(ratios) if ratios else None,
                    "tau": sum(acc) / len(acc) if acc else (toks / steps if steps else None),
                    "draft_time": sum(s.draft_time for s in group), "verify_time": sum(s.verify_time for s in group),
                    "mean_tree_size": (sum(s.mean_tree_size for s in group) / len(group)) if group else 0.0,
                    "acceptance_by_depth": [a / p if p else 0.0 for a, p in zip(acc_d[1:], prop_d[1:])]}
        cats = sorted({s.category for s in ss})
        out[method] = {"overall": agg(ss), "categories": {c: agg([s for s in ss if s.category == c]) for c in cats}}
    assisted = {s.question_id: s for s in samples.get("hf-assisted", [])}
    if assisted:
        for method, ss in samples.items():
            r = [s.tokens_per_s / assisted[s.question_id].tokens_per_s for s in ss
                 if s.question_id in assisted and assisted[s.question_id].tokens_per_s > 0]
            out[method]["overall"]["speedup_vs_hf_assisted"] = sum(r) / len(r) if r else None
    if "hf" in out and out["hf"]["overall"]["tokens_per_s"]:
        hf_tps = out["hf"]["overall"]["tokens_per_s"]
        for m in out.values():
            m["overall"]["speedup_vs_hf"] = m["overall"]["tokens_per_s"] / hf_tps
    return out


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for xs in lists:
        out.extend([0] * (len(xs) - len(out)))
        for i, x in enumerate(xs):
            out[i] += x
    return out


class Runner:
    def __init__(self, engine, methods: list[str], questions: list[dict], out: Path, max_new_tokens: int = 128,
                 temperature: float = 0.0, draft: str | None = None, config: dict | None = None,
                 progress: bool = True, method_opts: dict[str, dict] | None = None,
                 early_exit_layer: int | None = None):
        from draftwise import methods as method_registry

        for m in methods:
            if not engine.has_method(base_method(m)) and m not in EXTERNAL_METHODS:
                raise ConfigError(f"unknown method {m!r}; choose from {', '.join(method_registry.names() + list(EXTERNAL_METHODS))}")
        # every label keeps its own drafter for the whole run (the engine's LRU would drop some)
        engine.max_drafters = max(getattr(engine, "max_drafters", 0), len(methods) + 1)
        self.method_opts = {m: dict(o) for m, o in (method_opts or {}).items()}
        # "guard": a bench setting per label, not a method option: the throughput guard on or off
        self.guard = {m: o.pop("guard") for m, o in self.method_opts.items() if "guard" in o}
        for m, g in self.guard.items():
            if not isinstance(g, bool):
                raise ConfigError(f"--method-opts {m!r}: 'guard' must be true or false, got {g!r}")
        for m, o in self.method_opts.items():
            if not engine.has_method(base_method(m)):
                raise ConfigError(f"--method-opts names {m!r}, which is not a method; choose from "
                                  f"{', '.join(method_registry.names())}")
            if m in methods:
                engine.drafter(base_method(m), o, instance=m)   # validates options (and needs) before any sample runs
            elif base_method(m) in method_registry.names():
                method_registry.get(base_method(m)).validate(o)   # a variant this run skips: its options only
        self.baselines = Baselines(engine, draft, early_exit_layer)
        self.baselines.check(methods)
        if "ar" not in methods:
            methods = ["ar"] + methods
        self.engine, self.methods, self.questions, self.out = engine, methods, questions, Path(out)
        self.max_new, self.temperature, self.draft, self.progress = max_new_tokens, temperature, draft, progress
        self.config = {"model": engine.model_id, "draft": draft, "methods": methods, "max_new_tokens": max_new_tokens,
                       "temperature": temperature, "threads": torch.get_num_threads(),
                       "device": str(engine.model.device), "dtype": str(engine.model.dtype).split(".")[-1],
                       "kernels": engine.model.fast, "invariant": engine.model.invariant, "weights": engine.model.weights,
                       "isa": _isa() if engine.model.fast else None, "method_opts": self.method_opts,
                       **({"draft_weights": engine.draft_model.weights}
                          if getattr(engine, "draft_model", None) is not None else {}),
                       **({"early_exit_layer": self.baselines.early_exit_layer} if "hf-early-exit" in methods else {}),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.machine(), "processor": _cpu_name(), **(config or {})}
        self.mismatches: list[dict] = []

    # ------------------------------------------------------------------ files
    def _check_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_path = self.out / "config.json"
        # methods and limit may change between runs (results are per method and per question);
        # anything that changes a sample's result may not
        free = ("methods", "limit")
        key = {k: v for k, v in self.config.items() if k not in free}
        if cfg_path.is_file():
            old = json.loads(cfg_path.read_text())
            old.setdefault("method_opts", {})       # runs made before method options existed
            old_key = {k: v for k, v in old.items() if k not in free}
            if old_key != key:
                diff = sorted(k for k in set(old_key) | set(key) if old_key.get(k) != key.get(k))
                raise ConfigError(f"{self.out} holds results of a different configuration (differs in: "
                                  f"{', '.join(diff)}); use another --out")
        cfg_path.write_text(json.dumps(self.config, indent=1))

    def _answers(self, method: str) -> Path:
        return self.out / answers_file(method)

    def load_done(self) -> dict[str, dict[str, Sample]]:
        done: dict[str, dict[str, Sample]] = {}
        for m in self.methods:
            p = self._answers(m)
            done[m] = {}
            if p.is_file():
                for line in p.read_text().splitlines():
                    try:
                        s = Sample.from_json(m, json.loads(line))
                    except (json.JSONDecodeError, KeyError):
                        continue                   # a line cut by an interrupt: redo that sample
                    done[m][s.question_id] = s
        return done

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        from tqdm import tqdm

        self._check_config()
        done = self.load_done()
        self._warmup()
        todo = [(q, m) for q in self.questions for m in self.methods if str(q["question_id"]) not in done[m]]
        bar = tqdm(todo, disable=not self.progress, desc="bench", dynamic_ncols=True)
        for q, m in bar:
            s = self.run_one(m, q, done.get("ar", {}).get(str(q["question_id"])))
            done[m][s.question_id] = s
            with self._answers(m).open("a") as fh:
                fh.write(json.dumps(s.to_json()) + "\n")
            bar.set_postfix_str(f"{m} {s.question_id} {s.tokens_per_s:.1f} tok/s")
            self._check_lossless(m, s, done["ar"].get(s.question_id))
        samples = {m: [done[m][str(q["question_id"])] for q in self.questions if str(q["question_id"]) in done[m]]
                   for m in self.methods}
        summary = {"config": self.config, "methods": summarize(samples),
                   "mismatches": self.mismatches, "peak_rss_mb": _peak_rss_mb(), "weights_mb": self._weights_mb()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        write_report(self.out, summary, self.engine)
        return summary

    def _weights_mb(self) -> dict:
        """Weights of the models in memory (target, and the draft when one is loaded), in MB."""
        out = {"target": self.engine.model.weight_bytes() / 2**20}
        if getattr(self.engine, "draft_model", None) is not None:
            out["draft"] = self.engine.draft_model.weight_bytes() / 2**20
        return out

    def _warmup(self) -> None:
        ids = self.engine.encode("def fibonacci(n):")
        for m in self.methods:
            if m in EXTERNAL_METHODS:
                self.baselines.generate(m, ids, 8)
            else:
                self.engine.generate(ids, method=base_method(m), max_new_tokens=8, method_opts=self.method_opts.get(m),
                                     guard=self.guard.get(m), instance=m)

    def _prompt_ids(self, q: dict, history: list[tuple[str, str]], turn: str) -> list[int]:
        if not q.get("chat", True):
            return self.engine.encode(turn)
        msgs = []
        for u, a in history:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": turn})
        return self.engine.encode_messages(msgs)

    def run_one(self, method: str, q: dict, ar_sample: Sample | None) -> Sample:
        s = Sample(method, str(q["question_id"]), q["category"])
        history: list[tuple[str, str]] = []
        for t, turn in enumerate(q["turns"]):
            ids = self._prompt_ids(q, history, turn)
            if method in EXTERNAL_METHODS:
                t0 = time.perf_counter()
                toks = self.baselines.generate(method, ids, self.max_new)
                wall = time.perf_counter() - t0
                steps, acc, dt, vt, size = 0, [], 0.0, 0.0, 0.0   # baselines do not report their passes
            else:
                r = self.engine.generate(ids, method=base_method(method), max_new_tokens=self.max_new,
                                         temperature=self.temperature, seed=0 if self.temperature else None,
                                         method_opts=self.method_opts.get(method), guard=self.guard.get(method),
                                         instance=method)
                toks, wall, steps = r.token_ids, r.stats.wall_s, r.stats.steps + 1
                acc, dt, vt = [1] + r.stats.accept_lengths, r.stats.draft_s, r.stats.verify_s
                size = r.stats.as_dict()["mean_tree_size"]
                s.proposed_by_depth = _sum_lists([s.proposed_by_depth, r.stats.proposed_by_depth])
                s.accepted_by_depth = _sum_lists([s.accepted_by_depth, r.stats.accepted_by_depth])
            text = self.engine.decode_text(toks)
            s.turns.append(text); s.new_tokens.append(len(toks)); s.wall_time.append(wall)
            s.decoding_steps.append(steps); s.accept_lengths.append(acc); s.token_ids.append(toks)
            s.draft_time += dt; s.verify_time += vt; s.mean_tree_size = size
            # later turns continue from AR's own answer, so every method sees the same prompt
            ref_text = ar_sample.turns[t] if ar_sample is not None and t < len(ar_sample.turns) else text
            history.append((turn, ref_text))
        return s

    def _check_lossless(self, method: str, s: Sample, ref: Sample | None) -> None:
        if self.temperature or ref is None or method == "ar" or method in EXTERNAL_METHODS:
            return
        for t, (a, b) in enumerate(zip(s.token_ids, ref.token_ids)):
            if a != b:
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                self.mismatches.append({"method": method, "question_id": s.question_id, "turn": t,
                                        "first_diff": k})


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _isa() -> str:
    from draftwise import kernels

    return kernels.isa()
