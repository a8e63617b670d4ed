"""The native backend's packed log-likelihood path (eval/packing.py): token trees packed into rows
score exactly what the cached path and each sequence's own unbatched forward score."""

from __future__ import annotations

import pytest
import torch

from llama_pretrain.config import ModelConfig
from llama_pretrain.eval import packing
from llama_pretrain.eval.harness import PACK_TOKENS, CausalLM, NativeBackend
from llama_pretrain.model import Transformer

from helpers.byte_tok import TOK


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("llama2-debug", vocab_size=259, max_seq_len=512)).eval()


class Cached:
    """The native backend without ``packed_hidden``: the harness takes its KV-cache path."""

    def __init__(self, inner):
        self.inner, self.max_length, self.device, self.name = inner, inner.max_length, inner.device, inner.name

    def forward(self, tokens, mask, cache=None, last_only=False):
        return self.inner.forward(tokens, mask, cache, last_only)

    def select(self, cache, rows):
        return self.inner.select(cache, rows)


class Counting(NativeBackend):
    """Records each packed pass's shape and its real (non-pad) tokens."""

    def __init__(self, model):
        super().__init__(model)
        self.shapes: list[tuple[int, int]] = []
        self.real = 0

    def packed_hidden(self, tokens, positions, mask):
        self.shapes.append(tuple(tokens.shape))
        self.real += int((tokens != TOK.eos_id).sum())
        return super().packed_hidden(tokens, positions, mask)


@torch.no_grad()
def unbatched(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = ctx + cont
    lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)[len(ctx) - 1:]
    t = torch.tensor(cont)
    return lp.gather(1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all())


REQUESTS = [
    ("Question: how to boil an egg?\nAnswer:", " put the egg in boiling water for ten minutes"),
    ("Question: how to boil an egg?\nAnswer:", " put the egg in cold water for ten minutes"),  # shared start
    ("Question: how to boil an egg?\nAnswer:", " put the egg"),  # a prefix of both
    ("Question: how to boil an egg?\nAnswer:", " put the egg"),  # the same request twice
    ("Q: pick one", " A"), ("Q: pick one", " B"), ("Q: pick one", " C"),  # one-token continuations
    ("Answer:", " yes"), ("Answer:", " no"), ("", " an empty context"),
    ("A much longer context that runs on and on, " * 6, " short"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_packed_equals_the_cached_path_and_each_sequence_alone(model, batch_size):
    packed = CausalLM(NativeBackend(model), TOK, batch_size=batch_size).loglikelihood(REQUESTS)
    cached = CausalLM(Cached(NativeBackend(model)), TOK, batch_size=batch_size).loglikelihood(REQUESTS)
    lm = CausalLM(NativeBackend(model), TOK)
    alone = [unbatched(model, *lm.encode_pair(c, x)) for c, x in REQUESTS]
    assert [g for _, g in packed] == [g for _, g in cached] == [g for _, g in alone]
    assert [lp for lp, _ in packed] == pytest.approx([lp for lp, _ in cached], abs=1e-5)
    assert [lp for lp, _ in packed] == pytest.approx([lp for lp, _ in alone], abs=1e-5)


def test_shared_first_tokens_of_continuations_run_once(model):
    """One context, two continuations sharing their first 9 tokens: the pass holds the context,
    the shared tokens once, and each continuation's own (less its last token, only predicted)."""
    ctx, a, b = "Goal: x\nAnswer:", " abcdefgh ijk", " abcdefgh xyzw"
    be = Counting(model)
    got = CausalLM(be, TOK).loglikelihood([(ctx, a), (ctx, b)])
    shared = len(" abcdefgh ")
    assert be.real == 1 + len(ctx) + shared + (len(a) - shared - 1) + (len(b) - shared - 1)
    lm = CausalLM(NativeBackend(model), TOK)
    assert [lp for lp, _ in got] == pytest.approx([unbatched(model, *lm.encode_pair(ctx, x))[0] for x in (a, b)],
                                                  abs=1e-5)


def test_questions_common_opening_runs_once(model):
    """Two questions whose contexts open alike (MMLU's subject line, WinoGrande's sentence before
    the blank): the opening is in the pass once."""
    head = "The following are questions about algebra.\n\n"
    reqs = [(head + "Q: 1+1?\nA:", " 2"), (head + "Q: 2+2?\nA:", " 4")]
    be = Counting(model)
    got = CausalLM(be, TOK).loglikelihood(reqs)
    # BOS, the opening and "Q: " once; each question's own rest and the space before its answer
    assert be.real == 1 + len(head) + len("Q: ") + 2 * (len("1+1?\nA:") + 1)
    lm = CausalLM(NativeBackend(model), TOK)
    assert [lp for lp, _ in got] == pytest.approx([unbatched(model, *lm.encode_pair(c, x))[0] for c, x in reqs],
                                                  abs=1e-5)


def test_packed_rows_capped_whatever_context_is_shared(model):
    """acc_uncond-like: 1,000 questions whose requests share one context. Every pass holds at most
    batch_size rows of about PACK_TOKENS tokens, so memory does not grow with the questions."""
    answers = [" " + "abcdefghij"[i % 10] * (1 + i % 7) + "klmnopq"[i % 7] for i in range(70)]
    reqs = [("Answer:", answers[q % 70]) for q in range(1000)]
    be = Counting(model)
    got = CausalLM(be, TOK, batch_size=4).loglikelihood(reqs)
    assert max(b for b, _ in be.shapes) <= 4 and max(t for _, t in be.shapes) <= PACK_TOKENS
    lm = CausalLM(NativeBackend(model), TOK)
    want = {x: unbatched(model, *lm.encode_pair("Answer:", x))[0] for x in answers}
    assert [lp for lp, _ in got] == pytest.approx([want[x] for _, x in reqs], abs=1e-5)


def test_tree_layout_sees_exactly_its_ancestors():
    """Each token sees the tokens of its own sequence before it, never a sibling's, whichever
    request they came from; pads see only themselves."""
    contexts = [(1, 5, 6), (1, 5, 6), (1, 5, 6), (1, 5, 9)]
    conts = [[7, 8, 9], [7, 4, 3], [10], [2]]  # 7 shared; one-token ones add nothing
    (row,) = packing.pack(contexts, conts, row_tokens=64)
    assert row.tokens == [1, 5, 6, 7, 4, 8, 9]  # sorted: ..6 7 4 before ..6 7 8, then ..9
    assert row.positions == [0, 1, 2, 3, 4, 4, 2]
    assert sorted(row.preds) == [(0, [2, 3, 5], [7, 8, 9]), (1, [2, 3, 4], [7, 4, 3]), (2, [2], [10]),
                                 (3, [6], [2])]
    b = packing.batch([row, packing.pack([(1,)], [[2, 3]], row_tokens=64)[0]], pad_id=0)
    seen = b.mask()[0, 0].int().tolist()
    assert seen[4] == [1, 1, 1, 1, 1, 0, 0]  # 4 (after 7): 1 5 6 7 and itself
    assert seen[5] == [1, 1, 1, 1, 0, 1, 0]  # 8 (after 7): not its sibling 4
    assert seen[6] == [1, 1, 0, 0, 0, 0, 1]  # 9 (after 5): not 6's subtree
    assert b.mask()[1, 0].int().tolist()[3] == [0, 0, 0, 1, 0, 0, 0]  # a pad


def test_rows_split_where_full_and_batches_bounded():
    """Sequences past a row's budget start a new row (their shared prefix repeated there); a
    sequence longer than the budget gets a row of its own; batches stay within rows and tokens."""
    contexts = [(1, 2, 3, 4)] * 6 + [tuple(range(1, 30))]
    conts = [[10 + i, 20, 21, 22] for i in range(6)] + [[5]]
    rows = packing.pack(contexts, conts, row_tokens=12)
    assert [len(r.tokens) for r in rows] == [29, 10, 10, 10]  # 4 + 2 * 3 continuation tokens per row
    assert sorted(i for r in rows for i, _, _ in r.preds) == list(range(7))
    assert [len(b) for b in packing.batches(rows, max_rows=2, row_tokens=12)] == [1, 2, 1]
