"""Python API: ``engine = draftwise.load(model); engine.generate(prompt, method="recycling")``."""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from draftwise import methods
from draftwise.decoding import Stats, decode
from draftwise.drafters.base import Drafter
from draftwise.errors import ConfigError, PromptError
from draftwise.models import catalog
from draftwise.models.checkpoint import resolve
from draftwise.models.transformer import WEIGHT_MODES, Transformer
from draftwise.policies.budget import CostCurve, load_or_measure
from draftwise.sampling import Sampling

MAX_DRAFTERS = 8      # drafters kept per engine (least recently used dropped): one per method + option set


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: Stats
    method: str


class Engine:
    """A loaded target model (plus an optional draft model) and the drafters built for it.

    ``engine.model``: the target Transformer; ``engine.draft_model``: the draft Transformer or None.
    Drafters are built from the method registry (``draftwise.methods``) and kept across calls,
    so learned state (the recycling matrix, acceptance estimates) hot-starts.
    """

    def __init__(self, model: Transformer, tokenizer, model_id: str, path: Path,
                 draft_model: Transformer | None = None, draft_id: str | None = None, draft_bridge=None):
        self.model, self.tokenizer, self.model_id, self.path = model, tokenizer, model_id, path
        self.draft_model, self.draft_id = draft_model, draft_id
        self.draft_bridge = draft_bridge      # crossvocab.VocabBridge when the draft has another tokenizer
        self.eos_ids = _eos_ids(path, model, tokenizer)
        self._drafters: OrderedDict[tuple, Drafter] = OrderedDict()   # least recently used first
        self.max_drafters = MAX_DRAFTERS
        self._custom: dict[str, Drafter] = {}
        self._subsets: dict[int, object] = {}
        self.shared: dict = {}                # objects drafters share (drafters/spec.py EngineView)
        self._cost: CostCurve | None = None
        self._draft_cost: CostCurve | None = None
        self._cache = None
        self.last_token_ids: list[int] = []   # token ids of the latest stream() call
        self.guard = True                     # the realized-throughput guard (draftwise/policies/guard.py)

    @classmethod
    def load(cls, model: str = catalog.DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | str | None = None,
             max_len: int | None = None, threads: int | None = None, fast: bool = True,
             progress: bool = True, draft: str | None = None, graphs: str = "auto", compile: str = "off",
             weights: str = "auto", draft_weights: str = "auto", kernels: str = "auto") -> "Engine":
        """weights: the target's ("auto": the GGUF blocks on CPU when the model came from a GGUF, else fp32).
        draft_weights: the draft model's, chosen on their own ("auto" likewise): a draft's weights
        change only how fast it proposes, never the output, so an fp32 target may draft from blocks.
        kernels: "auto" (the batch-invariant kernels on CUDA in 16 bits, where greedy output then stays
        identical to plain decoding), "torch" or "invariant" (models/transformer.py KERNEL_MODES)."""
        from transformers import AutoTokenizer

        for name, kind in (("weights", weights), ("draft_weights", draft_weights)):
            if kind not in WEIGHT_MODES:
                raise ConfigError(f"{name} must be one of {', '.join(WEIGHT_MODES)}, got {kind!r}")
        if threads is not None:
            if threads < 1:
                raise ConfigError("threads must be >= 1")
            torch.set_num_threads(threads)
        check_device(device)
        dtype = _dtype(dtype)
        path = resolve(model, progress=progress)
        net = Transformer.from_pretrained(path, device=device, dtype=dtype, max_len=max_len, fast=fast, graphs=graphs,
                                          compile=compile, weights=weights, kernels=kernels)
        tok = AutoTokenizer.from_pretrained(str(path))
        draft_net = bridge = None
        if draft is not None:
            dpath = resolve(draft, progress=progress)
            dtok = AutoTokenizer.from_pretrained(str(dpath))
            same = _tokenizer_difference(tok, dtok) is None
            draft_net = Transformer.from_pretrained(dpath, device=device, dtype=dtype, max_len=net.max_len if same else None,
                                                   fast=fast, graphs=graphs, compile=compile, weights=draft_weights,
                                                   kernels=kernels)
            if same and draft_net.cfg.vocab_size != net.cfg.vocab_size:
                raise ConfigError(f"draft model {draft!r} has a vocabulary of {draft_net.cfg.vocab_size} rows, "
                                  f"the target {net.cfg.vocab_size}: they must match")
            if not same:                      # another tokenizer: draft through the shared vocabulary
                from draftwise.crossvocab import VocabBridge

                bridge = VocabBridge(tok, dtok, net.cfg.vocab_size, draft_net.cfg.vocab_size)
                bridge.check(model, draft)
        return cls(net, tok, model, path, draft_net, draft, bridge)

    # ------------------------------------------------------------------ text
    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("empty prompt")
        _check_text(prompt)
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError(f"{self.model_id} has no chat template; drop --chat")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat messages [{"role", "content"}] -> prompt ids ending with the assistant header."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{self.model_id} has no chat template")
        for m in messages:
            _check_text(m["content"])
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ methods
    def cost_curve(self, refresh: bool = False) -> CostCurve:
        if self._cost is None or refresh:
            # measured once per model/device/threads and cached (a progress bar shows the first time)
            self._cost = load_or_measure(self.model, self.model_id, refresh=refresh, progress=True)
        return self._cost

    def draft_cost_curve(self, refresh: bool = False) -> CostCurve:
        """The draft model's t(n), measured and cached like the target's (needs a draft model)."""
        if self.draft_model is None:
            raise ConfigError("no draft model loaded (--draft NAME)")
        if self._draft_cost is None or refresh:
            self._draft_cost = load_or_measure(self.draft_model, self.draft_id, refresh=refresh, progress=True)
        return self._draft_cost

    def vocab_subset(self, k: int):
        """The k most frequent tokens of this tokenizer (for draft heads; counted once, cached)."""
        from draftwise.vocab import load_subset

        if k not in self._subsets:
            self._subsets[k] = load_subset(self.tokenizer, self.model.cfg.vocab_size, k, self.eos_ids)
        return self._subsets[k]

    def register(self, name: str, drafter: Drafter) -> None:
        """Make a custom drafter instance available as method `name` (for experiments and tests)."""
        self._custom[name] = drafter

    @property
    def custom_methods(self) -> frozenset[str]:
        """Names of the drafter instances registered with ``register`` (they take no options)."""
        return frozenset(self._custom)

    def has_method(self, method: str) -> bool:
        return method in self._custom or method in methods.names()

    def drafter(self, method: str, method_opts: dict | None = None, instance: str | None = None) -> Drafter:
        """The drafter for a method and its options; kept across calls so state hot-starts. ``instance``
        names a separate drafter for the same method and options (the bench gives each label its own,
        so two labels never share what one of them learned)."""
        opts = methods.check(method, method_opts, self.draft_model is not None, self._custom)
        if opts is None:
            return self._custom[method]
        key = (method, json.dumps(opts, sort_keys=True), instance)
        if key in self._drafters:
            self._drafters.move_to_end(key)
            return self._drafters[key]
        d = methods.get(method).factory(self, **opts)
        self._drafters[key] = d
        while len(self._drafters) > self.max_drafters:      # each option set is a drafter with its own state
            self._drafters.popitem(last=False)
        return d

    # ------------------------------------------------------------------ generation
    def _tokens(self, prompt: str | list[int], method: str, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int | None, chat: bool, stop, stats: Stats,
                method_opts: dict | None, interrupt=None, guard: bool | None = None,
                instance: str | None = None) -> Iterator[list[int]]:
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        d = self.drafter(method, method_opts, instance)
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt, chat=chat)
        if self._cache is None:
            self._cache = self.model.new_cache()
        return decode(self.model, ids, drafter=d, sampling=sampling, max_new_tokens=max_new_tokens,
                      eos_ids=self.eos_ids, stop=stop, detok=self.decode_text, stats=stats, cache=self._cache,
                      interrupt=interrupt, guard=self.guard if guard is None else guard)

    def generate(self, prompt: str | list[int], method: str = "auto", max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, stop: list[str] | None = None, method_opts: dict | None = None,
                 guard: bool | None = None, instance: str | None = None) -> GenerationResult:
        """guard: the throughput guard for this call (None: ``engine.guard``, on by default); instance: a
        separate drafter (see ``drafter``)."""
        stats = Stats()
        out: list[int] = []
        for piece in self._tokens(prompt, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
                                  stop, stats, method_opts, guard=guard, instance=instance):
            out.extend(piece)
        return GenerationResult(self._final_text(out, stop), out, stats, method)

    def stream(self, prompt: str | list[int], method: str = "auto", max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               chat: bool = False, stop: list[str] | None = None, stats: Stats | None = None,
               method_opts: dict | None = None, interrupt=None) -> Iterator[str]:
        """Yield text pieces as they are generated (the concatenation equals generate().text).

        interrupt: a callable checked between prefill chunks and steps; a string it returns ends the
        generation early with that ``stats.stop_reason`` (the server's deadline and cancellation)."""
        stats = stats if stats is not None else Stats()
        out: list[int] = []
        shown = ""
        self.last_token_ids = out
        for piece in self._tokens(prompt, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
                                  stop, stats, method_opts, interrupt):
            out.extend(piece)
            text = self.decode_text(out)
            if text.endswith("\ufffd"):       # incomplete UTF-8 sequence: wait for more tokens
                continue
            if stop:
                text = self._final_text(out, stop)
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        final = self._final_text(out, stop)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown):]

    def _final_text(self, ids: list[int], stop) -> str:
        text = self.decode_text(ids)
        for s in stop or ():
            if s and s in text:
                text = text[: text.index(s)]
        return text


def _check_text(text: str) -> None:
    """Text a tokenizer can take: Unicode that encodes to UTF-8 (no lone surrogates, as bytes that were
    not UTF-8 become when read with surrogateescape, or a JSON "\\udc80")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the text is not valid Unicode (a lone surrogate at character {e.start}; "
                          f"was the input UTF-8?)") from None


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N (N an existing GPU): a ConfigError otherwise, before anything loads."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,3})?", device):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 by default on every device: it keeps greedy output identical to plain decoding.

    In bfloat16/float16 a tree pass and a one-token pass round differently, so near-tied argmaxes
    can flip and speculative output may differ from plain decoding (measured on an H100: see
    benchmarks/results/gpu-h100).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _eos_ids(path: Path, model: Transformer, tokenizer) -> tuple[int, ...]:
    ids = set(model.cfg.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(e if isinstance(e, list) else ([e] if e is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _tokenizer_difference(target_tok, draft_tok) -> str | None:
    """None when the draft shares the target's tokenizer (the same vocabulary, ids and strings, and the
    same special tokens), else how they differ (such a draft drafts through a VocabBridge)."""
    from draftwise.vocab import fingerprint

    def specials(t) -> dict:
        return {k: (v, t.convert_tokens_to_ids(v)) for k, v in t.special_tokens_map.items() if isinstance(v, str)}

    why = None
    if len(target_tok) != len(draft_tok):
        why = f"{len(draft_tok)} vs {len(target_tok)} tokens"
    elif fingerprint(target_tok) != fingerprint(draft_tok):
        why = f"vocabulary fingerprints {fingerprint(draft_tok)} vs {fingerprint(target_tok)}"
    elif specials(target_tok) != specials(draft_tok):
        a, b = specials(target_tok), specials(draft_tok)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        why = "special tokens differ: " + ", ".join(f"{k} {b.get(k, (None,))[0]!r} vs {a.get(k, (None,))[0]!r}"
                                                    for k in diff)
    return why
