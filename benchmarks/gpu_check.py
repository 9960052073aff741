"""GPU check: eager vs CUDA-graph forwards, our AR vs HF `generate`, and every method on the graph
path, in one process per model.

    python benchmarks/gpu_check.py --random-config qwen15.json --draft-config qwen05.json \
        --model smollm2.gguf --prompts prompts.jsonl --dtypes bfloat16,float32 --out gpu_out

--random-config: an HF config.json; the model gets random weights (HF's init) on the GPU: its speeds
are real for that shape, its acceptance is not (random weights draft little). --draft-config: the
random draft model for it (draft-model methods). --model: real weights (anything draftwise
resolves); it drafts for itself in the draft-model methods (an upper bound on acceptance that
still times the draft machinery). Prompts: JSONL with "ids" (token ids; taken modulo the vocabulary
for random models) or "prompt" (text, for --model; "chat": true applies the chat template). Writes results.json and results.md to --out.

Per model and dtype: the weight-streaming bound (weight bytes over the measured copy rate), the
cost curve t(n) on the eager and the graph path at a 512-token context, AR tokens/s on both paths
and HF `generate`, then each method's speedup over the graph-path AR, its tau and whether its
output equals that AR's token for token (16-bit: tree and one-token passes can round apart).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from draftwise import methods
from draftwise.decoding import generate
from draftwise.models.checkpoint import resolve
from draftwise.models.config import ModelConfig
from draftwise.models.transformer import Transformer
from draftwise.policies.budget import CostCurve, measure
from draftwise.vocab import VocabSubset

NS = (1, 2, 4, 8, 16, 32, 64, 128)
DEVICE = "cuda"


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def copy_rate() -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written)."""
    if not DEVICE.startswith("cuda"):
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 10 / (time.perf_counter() - t0)


class BenchEngine:
    """An EngineView (draftwise/drafters/spec.py) over models built in this process."""

    def __init__(self, model, draft_model, curve: CostCurve, draft_curve: CostCurve):
        self.model, self.draft_model, self.draft_bridge = model, draft_model, None
        self._curve, self._draft_curve = curve, draft_curve
        self.tokenizer, self.shared = None, {}

    def cost_curve(self, refresh: bool = False) -> CostCurve:
        return self._curve

    def draft_cost_curve(self, refresh: bool = False) -> CostCurve:
        return self._draft_curve

    def vocab_subset(self, k: int) -> VocabSubset:
        # the k lowest ids (BPE vocabularies put frequent tokens first): a stand-in for the corpus-ranked subset
        return VocabSubset(torch.arange(min(k, self.model.cfg.vocab_size)), self.model.cfg.vocab_size)


def method_runs(L: int) -> list[tuple[str, str, dict]]:
    return [("auto", "auto", {}), ("recycling", "recycling", {}), ("lookup", "lookup", {}),
            ("retrieval-online", "retrieval", {"online": True}),
            ("rasd-recycling", "rasd", {"base": "recycling", "online": True}),
            ("rasd-draft", "rasd", {"online": True}),
            ("draft-chain", "draft-model", {"tree": "chain"}),
            ("draft-static", "draft-model", {"tree": "static"}),
            ("draft-opt-tree", "draft-model", {}),
            ("eagle-untrained", "eagle", {"head": "untrained"}),
            ("early-exit-untrained", "early-exit", {"layer": max(1, L // 4)})]


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def hf_generate(hf, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=DEVICE)
    with torch.inference_mode():
        out, wall = timed(lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False))
    return out[0, len(ids):].tolist(), wall


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_model(name: str, nets: dict, draft: Transformer, hf, prompts: list[list[int]], max_new: int, rate: float,
              only: set[str] | None) -> dict:
    eager, graph = nets["off"], nets["on"]
    bound_ms = graph.weight_bytes() / (rate / 2) * 1e3          # each weight byte read once per forward
    t0 = time.perf_counter()
    curves = {k: measure(m, ns=NS, reps=20, context=512, context_long=None) for k, m in nets.items()}
    draft_curve = measure(draft, ns=NS, reps=10, context=512, context_long=None)
    measure_s = time.perf_counter() - t0
    print(name, "curves (ms):", {k: [round(x, 2) for x in c.ms] for k, c in curves.items()}, flush=True)
    eng = BenchEngine(graph, draft, curves["on"], draft_curve)
    drafters = {}
    for label, method, opts in method_runs(graph.cfg.num_layers):
        if only and label not in only:
            continue
        spec = methods.get(method)
        drafters[label] = spec.factory(eng, **spec.validate(opts))
    rows = []
    for p, ids in enumerate(prompts):
        row = {"prompt": p}
        for path, net in (("ar-eager", eager), ("ar", graph)):
            if p == 0:
                generate(net, ids, max_new_tokens=8)            # warm-up (graphs captured on second use)
                generate(net, ids, max_new_tokens=8)
            (out, st), wall = timed(lambda: generate(net, ids, max_new_tokens=max_new))
            row[path] = {"out": out, "tok_s": len(out) / wall, "tau": 1.0}
        ref = row["ar"]["out"]
        row["ar-eager"]["identical"] = row["ar-eager"]["out"] == ref
        row["ar-eager"]["first_diff"] = _first_diff(row["ar-eager"]["out"], ref)
        row["ar"]["identical"] = True
        for label, d in drafters.items():
            if p == 0:
                generate(graph, ids, drafter=d, max_new_tokens=max_new)   # warm-up: captures this method's shapes
            (out, st), wall = timed(lambda: generate(graph, ids, drafter=d, max_new_tokens=max_new))
            row[label] = {"tok_s": len(out) / wall, "tau": st.tau, "tree": sum(st.tree_sizes) / max(1, len(st.tree_sizes)),
                          "identical": out == ref, "first_diff": _first_diff(out, ref),
                          "draft_s": st.draft_s, "verify_s": st.verify_s}
        if hf is not None:
            if p == 0:
                hf_generate(hf, ids, 8)
            out, wall = hf_generate(hf, ids, max_new)
            row["hf"] = {"tok_s": len(out) / wall, "identical": out == ref, "first_diff": _first_diff(out, ref)}
        for k in ("ar", "ar-eager"):
            row[k].pop("out")
        rows.append(row)
        print(name, p, {k: (round(v["tok_s"], 1), v.get("identical")) for k, v in row.items() if k != "prompt"}, flush=True)
    keys = [k for k in rows[0] if k != "prompt"]
    summary = {}
    for k in keys:
        summary[k] = {"tok_s": sum(r[k]["tok_s"] for r in rows) / len(rows),
                      "speedup_vs_ar": sum(r[k]["tok_s"] / r["ar"]["tok_s"] for r in rows) / len(rows),
                      "identical": sum(bool(r[k]["identical"]) for r in rows)}
        if "tau" in rows[0][k]:
            summary[k]["tau"] = sum(r[k]["tau"] for r in rows) / len(rows)
        if "tree" in rows[0][k]:
            summary[k]["tree"] = sum(r[k]["tree"] for r in rows) / len(rows)
    st = graph.static
    return {"model": name, "dtype": str(graph.dtype).split(".")[-1], "weight_bytes": graph.weight_bytes(),
            "copy_rate_gbs": rate / 1e9, "bound_ms": bound_ms,
            "curve_ms": {k: dict(zip(c.ns, c.ms)) for k, c in curves.items()},
            "draft_curve_ms": dict(zip(draft_curve.ns, draft_curve.ms)), "measure_s": measure_s,
            "graphs_captured": st.captured, "capture_s": st.capture_s, "capture_failed": st.failed,
            "samples": len(rows), "summary": summary, "rows": rows}


def encode(tok, line: dict) -> list[int]:
    """A prompt line's token ids: its text, through the chat template where the line says chat."""
    if line.get("chat") and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": line["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(line["prompt"])


def build(spec: str, kind: str, dtype, seed: int = 0, kernels: str = "torch"):
    """(name, {"off": eager net, "on": graph net} sharing weights, HF model or None). kernels: the nets'
    (models/transformer.py KERNEL_MODES: torch = cuBLAS/SDPA, invariant = the batch-invariant Triton kernels)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "model":
        path = resolve(spec)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(DEVICE).eval()
        cfg, name = ModelConfig.from_hf(json.loads((path / "config.json").read_text())), Path(spec).name
    else:
        d = json.loads(Path(spec).read_text())
        hcfg = AutoConfig.for_model(d.pop("model_type"), **d)
        torch.manual_seed(seed)
        with torch.device(DEVICE):
            hf = AutoModelForCausalLM.from_config(hcfg, dtype=dtype).eval()
        cfg, name = ModelConfig.from_hf(hcfg.to_dict()), f"random-{Path(spec).stem}"
    state = hf.state_dict()
    nets = {g: Transformer(cfg, state, device=DEVICE, dtype=dtype, kernels=kernels,
                           graphs=g if DEVICE.startswith("cuda") else ("static" if g == "on" else "off"))
            for g in ("off", "on")}
    hf.generation_config.eos_token_id = None      # both sides run the full length, EOS or not
    hf.generation_config.pad_token_id = 0
    return name, nets, hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--random-config", action="append", default=[])
    ap.add_argument("--draft-config", default=None, help="random draft for the random targets (default: the target's shape)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--kernels", default="torch,invariant",
                    help="comma list: torch (cuBLAS/SDPA), invariant (batch-invariant Triton); each dtype runs each")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--methods", default=None, help="comma list of run labels (default: all)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script out")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    lines = [json.loads(x) for x in Path(a.prompts).read_text().splitlines() if x.strip()][: a.limit]
    rate = copy_rate()
    dev = {"gpu": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu", "torch": torch.__version__,
           "copy_rate_gbs": rate / 1e9}
    print(dev, flush=True)
    only = set(a.methods.split(",")) if a.methods else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    jobs = [(s, "random") for s in a.random_config] + [(s, "model") for s in a.model]
    for spec, kind, dt, kern in [(s, k, d, kn) for s, k in jobs for d in a.dtypes.split(",")
                                 for kn in a.kernels.split(",")]:
        dtype = getattr(torch, dt)
        name, nets, hf = build(spec, kind, dtype, kernels=kern)
        if kern != a.kernels.split(",")[0] and results and results[-1]["model"] == name:
            hf = None                         # HF generate once per model and dtype
        if any("ids" not in x for x in lines):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(resolve(spec)))
        prompts = [[t % nets["on"].cfg.vocab_size for t in x["ids"]] if "ids" in x else encode(tok, x)
                   for x in lines]
        if kind == "model":
            draft = nets["on"]
        else:
            dspec = a.draft_config or spec
            draft = build(dspec, "random", dtype, seed=1, kernels=kern)[1]["on"] if dspec != spec else nets["on"]
        results.append(run_model(name, nets, draft, None if a.no_hf else hf, prompts, a.max_new_tokens, rate, only))
        results[-1]["kernels"] = kern
        (out / "results.json").write_text(json.dumps({"device": dev, "results": results}, indent=1))
        del nets, hf, draft
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
    md = [f"GPU: {dev['gpu']}, torch {dev['torch']}, copy rate {rate / 1e9:.0f} GB/s, greedy, {a.max_new_tokens} new "
          f"tokens, {len(lines)} prompts, context 512 for t(n)", ""]
    for r in results:
        c, s = r["curve_ms"], r["summary"]
        md += [f"## {r['model']} {r['dtype']}, {r['kernels']} kernels", "",
               f"weights {r['weight_bytes'] / 1e9:.2f} GB, streaming bound {r['bound_ms']:.2f} ms; "
               f"{r['graphs_captured']} graphs captured in {r['capture_s']:.1f} s"
               + (f" (capture failed: {r['capture_failed']})" if r["capture_failed"] else ""), "",
               "| path | " + " | ".join(f"t({n})" for n in NS) + " |", "|---|" + "---|" * len(NS)]
        for k in ("off", "on"):
            md.append(f"| {'eager' if k == 'off' else 'graphs'} | " + " | ".join(f"{c[k][n]:.2f}" for n in NS) + " |")
        md += ["", "| run | tok/s | vs graph AR | tau | mean tree | identical to graph AR |", "|---|---|---|---|---|---|"]
        for k, v in s.items():
            md.append(f"| {k} | {v['tok_s']:.1f} | {v['speedup_vs_ar']:.2f}x | {v.get('tau', float('nan')):.2f} | "
                      f"{v.get('tree', float('nan')):.1f} | {v['identical']}/{r['samples']} |")
        md.append("")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
