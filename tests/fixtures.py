"""Tiny fixtures every method reuses: a target, a draft model sharing its vocabulary, a head that
reads the target's hidden states, and an early-exit self-drafter (the target's first layers).

``TinyEngine`` offers what a method factory needs from an Engine (model, draft_model,
cost_curve, vocab_subset), so every registered method gets a tiny configuration from its
``MethodSpec.test_opts``.
"""
from __future__ import annotations

import torch

from draftwise.drafters.base import Context, Drafter, Needs, Proposal
from draftwise.models.transformer import Transformer
from draftwise.policies.budget import CostCurve
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset
from tests.conftest import DEVICE, make_tiny_hf

VOCAB = 96


def tiny_pair(tmp_path, dtype=torch.float64, target_seed=11, draft_seed=None, kernels="auto"):
    """A tiny target and a draft sharing its vocabulary. draft_seed None: the draft is the target's
    weights with small noise (high but imperfect agreement, so accept and reject paths both run).
    kernels: both models' (models/transformer.py KERNEL_MODES)."""
    make_tiny_hf("qwen2", tmp_path / "t", seed=target_seed, vocab=VOCAB)
    target = Transformer.from_pretrained(tmp_path / "t", dtype=dtype, max_len=256, device=DEVICE, kernels=kernels)
    if draft_seed is None:
        from draftwise.models.checkpoint import load_config, load_state_dict

        state = load_state_dict(tmp_path / "t")
        g = torch.Generator().manual_seed(5)
        noisy = {k: v + 0.006 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.dim() == 2 else v
                 for k, v in state.items()}
        draft = Transformer(load_config(tmp_path / "t"), noisy, dtype=dtype, max_len=256, device=DEVICE, kernels=kernels)
    else:
        make_tiny_hf("llama", tmp_path / "d", seed=draft_seed, vocab=VOCAB)
        draft = Transformer.from_pretrained(tmp_path / "d", dtype=dtype, max_len=256, device=DEVICE, kernels=kernels)
    return target, draft


class TinyEngine:
    """The parts of draftwise.api.Engine a method factory uses, over in-memory tiny models."""

    def __init__(self, model, draft_model=None, draft_bridge=None):
        self.model, self.draft_model, self.draft_bridge = model, draft_model, draft_bridge
        self.tokenizer, self.shared = None, {}

    def cost_curve(self) -> CostCurve:
        return CostCurve.flat()

    def draft_cost_curve(self) -> CostCurve:
        return CostCurve((1, 1024), (0.3, 0.3))      # a draft step costs 30% of a target pass

    def vocab_subset(self, k: int) -> VocabSubset:
        return VocabSubset(torch.arange(min(k, self.model.cfg.vocab_size)), self.model.cfg.vocab_size)


class HiddenHeadDrafter(Drafter):
    """Reads the target's final-norm hidden states and one layer's output (declared in ``needs``)
    and drafts one token through a fixed random projection of them: tests the plumbing of
    features to drafters (EAGLE, LDLP) without training."""

    name = "tiny-head"

    def __init__(self, model: Transformer, layer: int = 1):
        self.needs = Needs(hidden_layers=(layer,), final_hidden=True)
        g = torch.Generator().manual_seed(3)
        d = model.cfg.hidden_size
        self.proj = torch.randn(2 * d, d, generator=g, dtype=model.dtype).to(model.device) / d ** 0.5
        self.model, self.layer = model, layer
        self.feature: torch.Tensor | None = None       # [2D] features of the newest committed token
        self.seen_prefill_rows = 0
        self.seen_steps = 0

    def begin(self, ctx, out):
        assert out.hidden.shape[0] == len(ctx.tokens) - 1          # every prompt position
        self.seen_prefill_rows = out.hidden.shape[0]
        self.feature = torch.cat([out.hidden[-1], out.layer_hidden[self.layer][-1]])

    def propose(self, ctx):
        h = self.feature @ self.proj                                  # [D]
        logits = self.model.lm_head(self.model.norm.unsqueeze(0) * h.unsqueeze(0))
        return DraftTree.chain(ctx.root, [int(logits.argmax())], device=ctx.device)

    def observe(self, tree, out, accepted, ctx):
        node = accepted.path[-1]
        assert out.hidden.shape[0] == tree.size and out.layer_hidden[self.layer].shape[0] == tree.size
        self.feature = torch.cat([out.hidden[node], out.layer_hidden[self.layer][node]])
        self.seen_steps += 1


class EarlyExitDrafter(Drafter):
    """Self-drafting with the target's first ``n_layers`` layers, its final norm and LM head (no
    trained exit layer): a chain of k tokens drafted in the target's own cache (pending rows), then
    verified from layer n_layers on through the proposal's settings."""

    name = "tiny-early-exit"

    def __init__(self, model: Transformer, n_layers: int = 1, k: int = 3):
        self.model, self.n, self.k = model, n_layers, k

    def propose(self, ctx: Context):
        m, cache = self.model, ctx.cache
        k = min(self.k, max(0, ctx.remaining - 1))
        base = cache.length
        toks, hs = [ctx.root], []
        for d in range(k + 1):
            out = m.forward(torch.tensor([toks[-1]], device=m.device), torch.tensor([base + d], device=m.device),
                            cache, end_layer=self.n, hidden_layers=(self.n - 1,))
            cache.hold(1)
            h = out.layer_hidden[self.n - 1]                 # raw output of layer n-1 = input of layer n
            hs.append(h)
            if d == k:
                break
            logits = m.lm_head(torch.nn.functional.rms_norm(h, m.norm.shape, m.norm, m.cfg.rms_norm_eps))
            toks.append(int(logits[0].argmax()))
        tree = DraftTree.chain(ctx.root, toks[1:], device=ctx.device)
        return Proposal(tree, start_layer=self.n, hidden_in=torch.cat(hs))
