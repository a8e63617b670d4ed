"""Log-likelihood requests laid out as token trees, packed into rows of one forward pass.

The requests that share a context form a tree: the context once, then each continuation's tokens
(all but its last, which is only predicted), where continuations that start alike share their
common first tokens too (PIQA's two solutions often differ in a word or two). The tree is laid
out in depth-first order, so a token's ancestors are exactly the earlier tokens whose subtree
still covers it: with ``end[k]`` the index after token k's subtree, query q sees key k iff
``k <= q < end[k]``. Each token's position is its depth. Trees (units) are then packed
first-fit into rows, several per row, so rows are about equally long and padding is small.

Every token's hidden state is the one its own sequence ``context + continuation`` gives
unbatched: it sees exactly its ancestors, at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


@dataclass
class Unit:
    """One context's tree: ``tokens``, their ``positions``, ``end`` (index after each token's
    subtree, relative to the unit), and per request (id, predicting token indices, targets)."""
    tokens: list[int]
    positions: list[int]
    end: list[int]
    preds: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def units(ctx: Sequence[int], members: list[int], pairs: Pairs, cap: int) -> list[Unit]:
    """The trees of one context's requests, each at most ``cap`` tokens (or the context and one
    continuation, when they alone are longer): a context shared by many questions (acc_uncond's
    "Answer:") is split, so no row grows with the number of questions."""
    c = len(ctx)
    # Sorted, each continuation shares with the one before it the longest prefix any earlier has.
    order = sorted(members, key=lambda i: list(pairs[i][1][:-1]))
    out: list[Unit] = []
    unit: Unit | None = None
    prev: Sequence[int] = ()
    path: list[int] = []  # token indices of the previous continuation's path
    for i in order:
        cont = pairs[i][1]
        body = cont[:-1]
        shared = _lcp(prev, body) if unit is not None else 0
        if unit is None or (unit.preds and len(unit.tokens) + len(body) - shared > cap):
            if unit is not None:
                out.append(unit)
            unit = Unit(list(ctx), list(range(c)), [0] * c)
            shared, path = 0, []
        path = path[:shared]
        for t in body[shared:]:
            path.append(len(unit.tokens))
            unit.positions.append(c + len(path) - 1)
            unit.tokens.append(t)
            unit.end.append(0)
        for k in path:  # every token on the path covers up to the path's last token
            unit.end[k] = max(unit.end[k], path[-1] + 1)
        unit.preds.append((i, [c - 1, *path], list(cont)))
        prev = body
    assert unit is not None, "a context with no requests"
    out.append(unit)
    for u in out:
        u.end[:c] = [len(u.tokens)] * c  # the context is every token's ancestor
    return out


def pack(all_units: list[Unit], row_tokens: int) -> list[list[Unit]]:
    """Rows of units, first-fit by decreasing size into rows of ``row_tokens`` (or the largest
    unit, when longer); rows returned longest first."""
    all_units = sorted(all_units, key=lambda u: -len(u.tokens))
    cap = max(row_tokens, len(all_units[0].tokens)) if all_units else row_tokens
    rows: list[list[Unit]] = []
    room: list[int] = []
    for u in all_units:
        n = len(u.tokens)
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([u])
            room.append(cap - n)
        else:
            rows[r].append(u)
            room[r] -= n
    order = sorted(range(len(rows)), key=lambda r: room[r])
    return [rows[r] for r in order]


@dataclass
class Batch:
    tokens: torch.Tensor      # [B, T] right-padded
    positions: torch.Tensor   # [B, T]
    end: torch.Tensor         # [B, T] (a pad's end is itself + 1: it sees itself alone)
    nodes: torch.Tensor       # flat b * T + t of the distinct predicting tokens
    node_of: torch.Tensor     # per prediction, its index into nodes
    targets: torch.Tensor     # per prediction, the token predicted
    spans: list[tuple[int, int, int]]  # (request, start, end) of its predictions

    def mask(self) -> torch.Tensor:
        """[B, 1, T, T]: query q sees key k iff k <= q < end[k]."""
        T = self.tokens.shape[1]
        idx = torch.arange(T, device=self.end.device)
        return ((idx[None, :] <= idx[:, None])[None] & (idx[None, :, None] < self.end[:, None, :]))[:, None]


def batch(rows: list[list[Unit]], pad_id: int) -> Batch:
    T = max(sum(len(u.tokens) for u in row) for row in rows)
    tokens: list[list[int]] = []
    positions: list[list[int]] = []
    ends: list[list[int]] = []
    flat: list[int] = []
    targets: list[int] = []
    spans: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        tok: list[int] = []
        pos: list[int] = []
        end: list[int] = []
        for u in row:
            off = len(tok)
            tok += u.tokens
            pos += u.positions
            end += [e + off for e in u.end]
            for i, nodes, tg in u.preds:
                spans.append((i, len(targets), len(targets) + len(tg)))
                flat += [b * T + off + k for k in nodes]
                targets += tg
        n = len(tok)
        tokens.append(tok + [pad_id] * (T - n))
        positions.append(pos + [0] * (T - n))
        ends.append(end + list(range(n + 1, T + 1)))
    nodes, node_of = torch.unique(torch.tensor(flat), return_inverse=True)
    return Batch(torch.tensor(tokens), torch.tensor(positions), torch.tensor(ends), nodes, node_of,
                 torch.tensor(targets), spans)
