"""DraftTree: the candidate tokens a drafter proposes, rooted at the last committed token.

Nodes are stored parents-first (parent index < child index). Node 0 is the root: the newest
token, emitted already but not yet in the target's KV cache. Logits at node i predict the
child of i, so one target pass over all nodes verifies every edge of the tree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor                  # [n] long
    parents: torch.Tensor                 # [n] long, -1 for the root
    depths: torch.Tensor                  # [n] long, 0 for the root
    scores: torch.Tensor | None = None    # [n] draft path probability p̂ (optional)
    q: torch.Tensor | None = None         # [n, V] draft distribution at node i over its children,
                                          # None: children are deterministic (one-hot q)
    template_ids: torch.Tensor | None = None  # [n] drafter bookkeeping (e.g. template node ids)

    def __post_init__(self):
        n = self.tokens.numel()
        if self.parents.numel() != n or self.depths.numel() != n:
            raise ValueError("tokens, parents and depths must have the same length")
        if n == 0 or int(self.parents[0]) != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if n > 1 and not bool((self.parents[1:] < torch.arange(1, n, device=self.parents.device)).all()):
            raise ValueError("nodes must be ordered parents-first")

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @classmethod
    def root_only(cls, token: int, device="cpu") -> "DraftTree":
        z = torch.zeros(1, dtype=torch.long, device=device)
        return cls(torch.tensor([token], device=device), z - 1, z)

    @classmethod
    def chain(cls, root: int, tokens: list[int] | torch.Tensor, device="cpu") -> "DraftTree":
        toks = torch.cat([torch.tensor([root]), torch.as_tensor(tokens, dtype=torch.long).cpu()]).to(device)
        n = toks.numel()
        ar = torch.arange(n, device=device)
        return cls(toks, ar - 1, ar)

    @classmethod
    def from_parents(cls, tokens, parents, scores=None, device="cpu") -> "DraftTree":
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
        parents = torch.as_tensor(parents, dtype=torch.long, device=device)
        depths = torch.zeros_like(parents)
        for i in range(1, parents.numel()):   # small trees built once, not on the hot path
            depths[i] = depths[parents[i]] + 1
        return cls(tokens, parents, depths, scores)

    def to(self, device) -> "DraftTree":
        """The same tree on another device (no copy when it is there already).

        template_ids stay where they are: they are the drafter's own bookkeeping."""
        dev, cur = torch.device(device), self.tokens.device
        if dev.type == cur.type and dev.index in (None, cur.index):      # "cuda" is "cuda:0" here
            return self
        mv = lambda t: None if t is None else t.to(device)   # noqa: E731
        return DraftTree(self.tokens.to(device), self.parents.to(device), self.depths.to(device),
                         mv(self.scores), mv(self.q), self.template_ids)

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: mask[i, j] is True when j is i or an ancestor of i."""
        n = self.size
        dev = self.tokens.device
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        if n == 1:
            return eye
        par = self.parents.clamp(min=0)
        mask = eye.clone()
        mask[1:] |= eye[par[1:]]
        for _ in range(int(self.depths.max()) - 1):   # one gather per level
            nxt = eye.clone()
            nxt[1:] |= mask[par[1:]]
            mask = nxt
        return mask

    def positions(self, committed: int) -> torch.Tensor:
        return self.depths + committed

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to node (inclusive)."""
        par = self.parents.tolist()
        out = [node]
        while par[out[-1]] >= 0:
            out.append(par[out[-1]])
        return out[::-1]

    def leaves(self) -> list[int]:
        has_child = torch.zeros(self.size, dtype=torch.bool)
        has_child[self.parents[1:].cpu()] = True
        return torch.nonzero(~has_child).flatten().tolist()

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as lists of node indices."""
        return [self.path_to(leaf) for leaf in self.leaves()]

    def select(self, keep: torch.Tensor) -> "DraftTree":
        """Sub-tree of the nodes in keep (ascending indices, closed under parents, root included)."""
        keep = keep.to(self.tokens.device)
        remap = torch.full((self.size,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        par = self.parents[keep]
        new_par = torch.where(par >= 0, remap[par.clamp(min=0)], par)
        if bool((new_par[1:] < 0).any()):
            raise ValueError("selection is not closed under parents")
        return DraftTree(self.tokens[keep], new_par, self.depths[keep],
                         None if self.scores is None else self.scores[keep],
                         None if self.q is None else self.q[keep])


def merge_tries(root: int, sequences: list[list[int]], max_nodes: int | None = None) -> tuple[list[int], list[int]]:
    """Merge token sequences (continuations of root) into a trie. Returns (tokens, parents).

    Shared prefixes share nodes; earlier sequences win when max_nodes cuts the trie.
    """
    tokens, parents = [root], [-1]
    children: dict[tuple[int, int], int] = {}
    for seq in sequences:
        node = 0
        for tok in seq:
            key = (node, int(tok))
            nxt = children.get(key)
            if nxt is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                nxt = len(tokens)
                tokens.append(int(tok))
                parents.append(node)
                children[key] = nxt
            node = nxt
    return tokens, parents


def merge_trees(a: DraftTree, b: DraftTree) -> DraftTree:
    """Fuse tree b into tree a by longest-prefix matching from the shared root (RASD fusion)."""
    if int(a.tokens[0]) != int(b.tokens[0]):
        raise ValueError("trees must share the root token")
    toks, pars = a.tokens.tolist(), a.parents.tolist()
    children = {(p, t): i for i, (t, p) in enumerate(zip(toks, pars)) if p >= 0}
    mapping = {0: 0}
    for i, (t, p) in enumerate(zip(b.tokens.tolist(), b.parents.tolist())):
        if i == 0:
            continue
        parent = mapping[p]
        j = children.get((parent, t))
        if j is None:
            j = len(toks)
            toks.append(t)
            pars.append(parent)
            children[(parent, t)] = j
        mapping[i] = j
    return DraftTree.from_parents(toks, pars, device=a.tokens.device)
