"""Log-likelihood requests laid out as a token tree, cut into rows of one forward pass.

Every request is the sequence ``context + continuation`` (all but the continuation's last token,
which is only predicted). Sequences that start alike share those tokens: the choices of one
question share its context, continuations that start alike share their first tokens (PIQA's two
solutions often differ in a word or two), and questions share a common opening (MMLU's subject
line, WinoGrande's sentence before the blank). Sorted, each sequence shares with the one before it
the longest prefix any earlier one has, so appending only its new tokens lays the tree out in
depth-first order: a token's ancestors are then exactly the earlier tokens whose subtree still
covers it. With ``end[k]`` the index after token k's subtree, query q sees key k iff
``k <= q < end[k]``, and each token's position is its depth. Rows are consecutive runs of the
sorted sequences, about ``row_tokens`` long, so padding is small.

Every token's hidden state is the one its own sequence gives unbatched: it sees exactly its
ancestors, at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Row:
    """``tokens``, their ``positions``, ``end`` (index after each token's subtree), and per
    request (id, the indices of the tokens predicting its continuation, the continuation)."""
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    preds: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack(contexts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]], row_tokens: int) -> list[Row]:
    """Rows for requests ``(contexts[i], conts[i])``, longest first. A row takes sequences while
    its tokens stay within ``row_tokens``, or within its first sequence when that is longer:
    however many questions share a context (acc_uncond's "Answer:"), no row grows past that."""
    seqs = [[*c, *x[:-1]] for c, x in zip(contexts, conts)]
    rows: list[Row] = []
    row, cap = Row(), 0
    prev: list[int] = []
    path: list[int] = []  # the previous sequence's token indices
    for i in sorted(range(len(seqs)), key=seqs.__getitem__):
        seq = seqs[i]
        shared = _lcp(prev, seq) if row.preds else 0
        if row.preds and len(row.tokens) + len(seq) - shared > cap:
            rows.append(row)
            row, shared = Row(), 0
        if not row.preds:
            cap = max(row_tokens, len(seq))
        path = path[:shared]
        for t in seq[shared:]:
            path.append(len(row.tokens))
            row.positions.append(len(path) - 1)
            row.tokens.append(t)
            row.end.append(0)
        for k in path:  # the newest token is the last: every token on its path covers it
            row.end[k] = len(row.tokens)
        row.preds.append((i, path[len(contexts[i]) - 1:], list(conts[i])))
        prev = seq
    if row.preds:
        rows.append(row)
    return sorted(rows, key=lambda r: -len(r.tokens))


def batches(rows: list[Row], max_rows: int, row_tokens: int) -> list[list[Row]]:
    """Runs of the rows (longest first) of at most ``max_rows`` rows and ``max_rows * row_tokens``
    padded tokens, or one row where that alone is longer."""
    out: list[list[Row]] = []
    for r in rows:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * len(out[-1][0].tokens) <= max_rows * row_tokens:
            out[-1].append(r)
        else:
            out.append([r])
    return out


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


def batch(rows: list[Row], pad_id: int) -> Batch:
    T = max(len(r.tokens) for r in rows)
    tokens: list[list[int]] = []
    positions: list[list[int]] = []
    ends: list[list[int]] = []
    flat: list[int] = []
    targets: list[int] = []
    spans: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        for i, nodes, tg in row.preds:
            spans.append((i, len(targets), len(targets) + len(tg)))
            flat += [b * T + k for k in nodes]
            targets += tg
        n = len(row.tokens)
        tokens.append(row.tokens + [pad_id] * (T - n))
        positions.append(row.positions + [0] * (T - n))
        ends.append(row.end + list(range(n + 1, T + 1)))
    nodes, node_of = torch.unique(torch.tensor(flat), return_inverse=True)
    return Batch(torch.tensor(tokens), torch.tensor(positions), torch.tensor(ends), nodes, node_of,
                 torch.tensor(targets), spans)
