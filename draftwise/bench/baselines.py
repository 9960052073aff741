"""Baselines outside draftwise, run in the same process on the same weights.

- Hugging Face `generate`: plain greedy (`hf`), prompt lookup (`hf-lookup`) and assisted
  generation with a draft model (`hf-assisted`) and its untrained self-speculative early exit
  (`hf-early-exit`: the target's first N layers draft through its own head, LayerSkip style;
  N = ``early_exit_layer``), on our model's device and dtype.
- llama.cpp through llama-cpp-python (optional peer, not a dependency): plain (`llamacpp`) and
  its prompt-lookup draft (`llamacpp-lookup`), on the model's own GGUF file (quantized weights,
  so its text is reported as matching ours or not, never as a lossless failure).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from draftwise.errors import ConfigError

HF_METHODS = ("hf", "hf-lookup", "hf-assisted", "hf-early-exit")
LLAMACPP_METHODS = ("llamacpp", "llamacpp-lookup")
EXTERNAL_METHODS = HF_METHODS + LLAMACPP_METHODS


def gguf_file(path: Path) -> Path:
    """The GGUF file an installed model was converted from (registry models keep it)."""
    files = sorted(Path(path).glob("*.gguf"))
    if not files:
        raise ConfigError(f"the llama.cpp peer needs the model's GGUF file and {path} holds none "
                          "(use a registry model or a .gguf path)")
    return files[0]


class Baselines:
    def __init__(self, engine, draft: str | None = None, early_exit_layer: int | None = None):
        self.engine, self.draft = engine, draft
        layers = engine.model.cfg.num_layers
        self.early_exit_layer = early_exit_layer or max(1, layers // 4)
        if not 1 <= self.early_exit_layer < layers:
            raise ConfigError(f"--early-exit-layer must be in [1, {layers - 1}], got {early_exit_layer}")
        self._hf: dict[str, object] = {}
        self._llama: dict[str, object] = {}
        self.first_token_s: float | None = None   # llama.cpp: its last generation's prompt pass + first token

    def check(self, methods: list[str]) -> None:
        """Fail early, before any sample runs, when a requested baseline cannot run."""
        if "hf-assisted" in methods and not self.draft:
            raise ConfigError("hf-assisted needs --draft")
        if any(m in LLAMACPP_METHODS for m in methods):
            try:
                import llama_cpp  # noqa: F401
            except ImportError as e:
                raise ConfigError("llamacpp methods need llama-cpp-python (pip install llama-cpp-python; "
                                  "it builds from source)") from e
            if self.engine.model.device.type != "cpu":
                raise ConfigError("the llama.cpp peer runs on the CPU only")
            gguf_file(self.engine.path)

    def generate(self, method: str, ids: list[int], max_new: int) -> list[int]:
        if method in HF_METHODS:
            return self._hf_generate(method, ids, max_new)
        if method in LLAMACPP_METHODS:
            return self._llama_generate(method, ids, max_new)
        raise ConfigError(f"unknown baseline {method!r}")

    # ------------------------------------------------------------------ Hugging Face
    def _hf_model(self, which: str):
        if which not in self._hf:
            from transformers import AutoModelForCausalLM

            from draftwise.models.checkpoint import resolve

            path = self.engine.path if which == "target" else resolve(self.draft)
            m = self.engine.model                                   # same device and dtype as ours
            self._hf[which] = AutoModelForCausalLM.from_pretrained(str(path), dtype=m.dtype).to(m.device).eval()
        return self._hf[which]

    @torch.inference_mode()
    def _hf_generate(self, method: str, ids: list[int], max_new: int) -> list[int]:
        model = self._hf_model("target")
        eos = list(self.engine.eos_ids)
        kw = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                  temperature=None, top_p=None, top_k=None)
        if method == "hf-lookup":
            kw["prompt_lookup_num_tokens"] = 10
        elif method == "hf-assisted":
            kw["assistant_model"] = self._hf_model("draft")
            if self.engine.draft_bridge is not None:       # another tokenizer: HF's Universal Assisted Generation
                from transformers import AutoTokenizer

                from draftwise.models.checkpoint import resolve

                kw["tokenizer"] = self.engine.tokenizer
                kw["assistant_tokenizer"] = AutoTokenizer.from_pretrained(str(resolve(self.draft)))
        elif method == "hf-early-exit":
            kw["assistant_early_exit"] = self.early_exit_layer
        x = torch.tensor([ids], device=self.engine.model.device)
        return model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(ids):].tolist()

    # ------------------------------------------------------------------ llama.cpp
    def _llama_model(self, method: str, need: int):
        """The llama.cpp model for ``method`` with room for ``need`` tokens.

        With a draft (lookup), llama-cpp-python keeps logits for every position but sizes that
        buffer by its ``logits_all`` argument, which the draft overrides: past n_batch (512) prompt
        tokens ``eval`` fails to broadcast into an empty slice. So lookup is built with
        ``logits_all=True`` and a context sized to the prompt ([n_ctx, vocab] floats), rebuilt
        larger when a longer prompt comes."""
        have = self._llama.get(method)
        lookup = method == "llamacpp-lookup"
        if have is None or (lookup and have.n_ctx() < need):
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            max_len = self.engine.model.max_len
            n_ctx = min(max_len, -(-need // 512) * 512) if lookup else max_len
            draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
            self._llama.pop(method, None)
            self._llama[method] = Llama(model_path=str(gguf_file(self.engine.path)), n_ctx=n_ctx,
                                        n_threads=torch.get_num_threads(), draft_model=draft, logits_all=lookup,
                                        verbose=False)
        return self._llama[method]

    def _llama_generate(self, method: str, ids: list[int], max_new: int) -> list[int]:
        llm = self._llama_model(method, len(ids) + max_new + 16)
        llm.reset()                         # no KV reuse from the previous prompt: same work as ours
        eos = set(self.engine.eos_ids)
        out: list[int] = []
        t0 = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:                     # the prompt's pass and the first token: split off like our prefill
                self.first_token_s = time.perf_counter() - t0
            out.append(int(tok))
            if tok in eos or len(out) >= max_new:
                break
        return out
