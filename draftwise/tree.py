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
    q: torch.Tensor | None = None         # [n, V] draft distribution at node i over its sampled children
    sampled: torch.Tensor | None = None   # [n] bool: node i was drawn from q[parent(i)] (without
                                          # replacement among its sampled siblings, in node order);
                                          # False: deterministic (one-hot q). None: all nodes are
                                          # sampled when q is given, else all deterministic.
    origin: torch.Tensor | None = None    # [n] int8 source of each node (drafter-defined, e.g. model/retrieval)
    template_ids: torch.Tensor | None = None  # [n] drafter bookkeeping (e.g. template node ids)

    def __post_init__(self):
        n = self.tokens.numel()
        if self.parents.numel() != n or self.depths.numel() != n:
            raise ValueError("tokens, parents and depths must have the same length")
        if n == 0 or int(self.parents[0]) != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if n > 1 and not bool((self.parents[1:] < torch.arange(1, n, device=self.parents.device)).all()):
            raise ValueError("nodes must be ordered parents-first")
        if self.sampled is not None and self.q is None and bool(self.sampled.any()):
            raise ValueError("sampled nodes need the draft distribution q")

    def is_sampled(self) -> torch.Tensor:
        """[n] bool: which nodes were drawn from a known q (the rest are deterministic)."""
        if self.sampled is not None:
            return self.sampled
        return torch.full((self.size,), self.q is not None, dtype=torch.bool, device=self.tokens.device)

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @classmethod
    def root_only(cls, token: int, device="cpu") -> "DraftTree":
        z = torch.zeros(1, dtype=torch.long, device=device)
        return cls(torch.tensor([token], device=device), z - 1, z)

    @classmethod
    def chain(cls, root: int, tokens: list[int] | torch.Tensor, device="cpu",
              q: list[torch.Tensor | None] | None = None) -> "DraftTree":
        """root -> tokens[0] -> tokens[1] ...; q: the draft distribution [V] each token was drawn from
        (sampled drafts; None entries: greedy), stored as tree.q [n, V], the last node's row zero."""
        toks = torch.cat([torch.tensor([root]), torch.as_tensor(tokens, dtype=torch.long).cpu()]).to(device)
        n = toks.numel()
        ar = torch.arange(n, device=device)
        tree = cls(toks, ar - 1, ar)
        if q and n > 1 and q[0] is not None:
            rows = list(q[: n - 1])
            tree.q = torch.stack(rows + [torch.zeros_like(rows[0])])        # [n, V]; the last node has no child
        return tree

    @classmethod
    def from_parents(cls, tokens, parents, scores=None, device="cpu") -> "DraftTree":
        par = parents.tolist() if isinstance(parents, torch.Tensor) else [int(p) for p in parents]
        depths = [0] * len(par)
        for i in range(1, len(par)):          # plain Python: per-element tensor indexing cost ~10 us a node
            depths[i] = depths[par[i]] + 1
        return cls(torch.as_tensor(tokens, dtype=torch.long, device=device),
                   torch.tensor(par, dtype=torch.long, device=device),
                   torch.tensor(depths, dtype=torch.long, device=device), scores)

    def to(self, device) -> "DraftTree":
        """The same tree on another device (no copy when it is there already).

        template_ids stay where they are: they are the drafter's own bookkeeping."""
        dev, cur = torch.device(device), self.tokens.device
        if dev.type == cur.type and dev.index in (None, cur.index):      # "cuda" is "cuda:0" here
            return self
        mv = lambda t: None if t is None else t.to(device)   # noqa: E731
        return DraftTree(self.tokens.to(device), self.parents.to(device), self.depths.to(device),
                         mv(self.scores), mv(self.q), mv(self.sampled), mv(self.origin), self.template_ids)

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
        pick = lambda t: None if t is None else t[keep.to(t.device)]   # noqa: E731
        return DraftTree(self.tokens[keep], new_par, self.depths[keep], pick(self.scores), pick(self.q),
                         pick(self.sampled), pick(self.origin), pick(self.template_ids))


def make_template(num_nodes: int, k: int, max_depth: int, rank_prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A static tree shape, best first by prior path probability: node = (parent, rank r of the
    parent's prediction), prior = product of rank_prior[r] along the path. Returns parents,
    ranks, prior [num_nodes] in parents-first (BFS) order, node 0 = the root."""
    import heapq

    parents, ranks, prior, depth = [-1], [-1], [1.0], [0]
    heap = [(-rank_prior[r], 0, r) for r in range(k)]
    heapq.heapify(heap)
    while len(parents) < num_nodes and heap:
        negp, par, r = heapq.heappop(heap)
        idx = len(parents)
        parents.append(par); ranks.append(r); prior.append(-negp); depth.append(depth[par] + 1)
        if depth[idx] < max_depth:
            for r2 in range(k):
                heapq.heappush(heap, (negp * rank_prior[r2], idx, r2))
    # parents-first order by depth (BFS), stable within a depth
    order = sorted(range(len(parents)), key=lambda i: (depth[i], i))
    pos = {old: new for new, old in enumerate(order)}
    par_t = torch.tensor([-1 if parents[o] < 0 else pos[parents[o]] for o in order])
    return par_t, torch.tensor([ranks[o] for o in order]), torch.tensor([prior[o] for o in order])


def merge_tries(root: int, sequences: list[list[int]], max_nodes: int | None = None) -> tuple[list[int], list[int]]:
    """Merge token sequences (continuations of root) into a trie. Returns (tokens, parents).

    Shared prefixes share nodes; earlier sequences win when max_nodes cuts the trie.
    """
    tokens, parents, _ = weighted_trie(root, sequences, max_nodes=max_nodes)
    return tokens, parents


def weighted_trie(root: int, sequences: list[list[int]], weights: list[float] | None = None,
                  max_nodes: int | None = None) -> tuple[list[int], list[int], list[float]]:
    """Like merge_tries, plus counts: the total weight (default 1 each) of the sequences that pass
    through each node (the root's count is the total)."""
    tokens, parents, counts = [root], [-1], [0.0]
    children: dict[tuple[int, int], int] = {}
    for k, seq in enumerate(sequences):
        w = 1.0 if weights is None else float(weights[k])
        counts[0] += w
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
                counts.append(0.0)
                children[key] = nxt
            counts[nxt] += w
            node = nxt
    return tokens, parents, counts


def two_source_trie(root: int, first: list[list[int]], second: list[list[int]], w_second: float = 1.0
                    ) -> tuple[list[int], list[int], list[float], list[float]]:
    """weighted_trie over first + second (weights 1 and ``w_second``) in one pass, with the counts of
    ``first`` alone as well: (tokens, parents, counts, first_counts)."""
    tokens, parents, counts, firsts = [root], [-1], [0.0], [0.0]
    children: dict[tuple[int, int], int] = {}
    for k, seq in enumerate(first + second):
        one = k < len(first)
        w = 1.0 if one else w_second
        counts[0] += w
        if one:
            firsts[0] += 1.0
        node = 0
        for tok in seq:
            key = (node, tok)
            nxt = children.get(key)
            if nxt is None:
                nxt = len(tokens)
                tokens.append(tok)
                parents.append(node)
                counts.append(0.0)
                firsts.append(0.0)
                children[key] = nxt
            counts[nxt] += w
            if one:
                firsts[nxt] += 1.0
            node = nxt
    return tokens, parents, counts, firsts


def merge_trees(a: DraftTree, b: DraftTree) -> tuple[DraftTree, torch.Tensor]:
    """Fuse tree b into tree a by longest-prefix matching from the shared root (RASD fusion).

    Walks b parents-first: a node whose (parent, token) already exists in the fused tree maps to
    it, otherwise it is appended under its mapped parent. Returns the fused tree and ``mapping``
    [b.size] (node of b -> node of the fused tree). Scores, q, sampled flags and origins survive:
    a shared node keeps a's metadata; a new node brings b's (a missing score/origin becomes 0).
    Lossless sampling needs one q per parent: if a's and b's sampled children would meet under
    one node, a ValueError is raised.
    """
    if int(a.tokens[0]) != int(b.tokens[0]):
        raise ValueError("trees must share the root token")
    a_pars = a.parents.tolist()
    toks, pars, mapping = fuse_lists(a.tokens.tolist(), a_pars, b.tokens.tolist(), b.parents.tolist())
    a_sampled, b_sampled = a.is_sampled().tolist(), b.is_sampled().tolist()
    sampled = a_sampled + [False] * (len(toks) - a.size)
    q_from: dict[int, int] = {}                  # fused parent -> node of b whose q row it uses
    has_a_sampled_kids = {a_pars[i] for i in range(1, a.size) if a_sampled[i]}
    b_pars, made = b.parents.tolist(), set()
    for i in range(1, b.size):
        j = mapping[i]
        if j >= a.size and j not in made:         # the node of b that made fused node j
            made.add(j)
            if not b_sampled[i]:
                continue
            if pars[j] in has_a_sampled_kids:
                raise ValueError("both trees drew sampled children under one node: cannot verify losslessly")
            q_from[pars[j]] = b_pars[i]
            sampled[j] = True
    return _fused_tree(a, b, toks, pars, mapping, sampled, q_from)


def fuse_lists(toks: list[int], pars: list[int], b_toks: list[int], b_pars: list[int],
               children: dict | None = None) -> tuple[list[int], list[int], list[int]]:
    """merge_trees on plain lists for deterministic trees: b's nodes (parents first) map to a's node with the
    same (parent, token) or are appended. Returns the fused tokens and parents (new lists) and b's mapping.
    ``children``: a's {(parent, token): node}, when the caller has it."""
    toks, pars = list(toks), list(pars)
    if children is None:
        children = {(p, t): i for i, (t, p) in enumerate(zip(toks, pars)) if p >= 0}
    mapping = [0] * len(b_toks)
    for i in range(1, len(b_toks)):
        parent = mapping[b_pars[i]]
        key = (parent, b_toks[i])
        j = children.get(key)
        if j is None:
            j = children[key] = len(toks)
            toks.append(b_toks[i])
            pars.append(parent)
        mapping[i] = j
    return toks, pars, mapping


def _fused_tree(a: DraftTree, b: DraftTree, toks: list[int], pars: list[int], mapping: list[int],
                sampled: list[bool], q_from: dict[int, int]) -> tuple[DraftTree, torch.Tensor]:
    """merge_trees' result: the fused structure with a's metadata, then b's for the nodes new from b."""
    dev = a.tokens.device
    tree = DraftTree.from_parents(toks, pars, device=dev)
    n_new = len(toks) - a.size
    b_new = [i for i in range(1, b.size) if mapping[i] >= a.size]
    b_new = sorted(b_new, key=lambda i: mapping[i])

    def cat(ta, tb, fill, dtype):
        if ta is None and tb is None:
            return None
        ta = ta if ta is not None else torch.full((a.size,), fill, dtype=dtype, device=dev)
        tb = tb[torch.tensor(b_new, dtype=torch.long)].to(dev) if tb is not None else torch.full((n_new,), fill, dtype=dtype, device=dev)
        return torch.cat([ta.to(dtype), tb.to(dtype)])

    sdt = next((t.dtype for t in (a.scores, b.scores) if t is not None), torch.float32)
    tree.scores = cat(a.scores, b.scores, 0.0, sdt)
    tree.origin = cat(a.origin, b.origin, 0, torch.int8)
    if any(sampled):
        vocab = (a.q if a.q is not None else b.q).shape[-1]
        qdt = (a.q if a.q is not None else b.q).dtype
        q = torch.zeros(len(toks), vocab, dtype=qdt, device=dev)
        if a.q is not None:
            q[: a.size] = a.q.to(dev)
        for parent, bnode in q_from.items():
            q[parent] = b.q[bnode].to(dev)
        for bi in b_new:                       # rows of nodes new from b (their own sampled children)
            if b.q is not None:
                q[mapping[bi]] = b.q[bi].to(dev)
        tree.q = q
        tree.sampled = torch.tensor(sampled, dtype=torch.bool, device=dev)
    return tree, torch.tensor(mapping, dtype=torch.long)


def tried_nodes(tree: DraftTree, path: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For nodes 1..n-1: (tried [n-1] bool: its parent was accepted, so verification tested it;
    hit [n-1] bool: it was accepted)."""
    on_path = torch.zeros(tree.size, dtype=torch.bool)
    on_path[torch.as_tensor(path, dtype=torch.long)] = True
    par = tree.parents.cpu()
    return on_path[par[1:]], on_path[1:]
