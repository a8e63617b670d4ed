"""Harness core and task scoring against plain transformers computations written out here."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llama_pretrain.config import ModelConfig  # noqa: E402
from llama_pretrain.eval.evaluator import evaluate  # noqa: E402
from llama_pretrain.eval.harness import CausalLM, GenRequest, HFBackend, NativeBackend  # noqa: E402
from llama_pretrain.interop import save_hf  # noqa: E402
from llama_pretrain.model import Transformer  # noqa: E402

from helpers.byte_tok import ByteTok, TOK  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=259, max_seq_len=512)
    ours = Transformer(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    save_hf(ours.state_dict(), cfg, d)
    hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    return ours, hf


# -- reference computations: one sequence at a time, whole forward, no cache -------------------
@torch.no_grad()
def ref_logprob(hf, ctx: str, cont: str) -> float:
    c = [1] + TOK.encode(ctx)
    ids = c + TOK.encode(cont)
    lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(c), len(ids)))


@torch.no_grad()
def ref_generate(hf, prompt: str, n: int) -> str:
    ids = torch.tensor([[1] + TOK.encode(prompt)])
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    return TOK.decode(new[:new.index(2)] if 2 in new else new)  # generation ends at EOS


def test_loglikelihood_matches_reference_and_native_equals_hf(models):
    ours, hf = models
    reqs = [("Question: is it?\nAnswer:", " yes"), ("Question: is it?\nAnswer:", " no, not at all"),
            ("Q: x", " y"), ("Hello there friend ", "z z z"), ("a", " b" * 30)]
    for backend in (NativeBackend(ours), HFBackend(hf)):
        got = CausalLM(backend, TOK, batch_size=3).loglikelihood(reqs)
        for (c, x), (lp, _) in zip(reqs, got):
            want = ref_logprob(hf, c.rstrip(" "), c[len(c.rstrip(" ")):] + x)
            assert lp == pytest.approx(want, abs=1e-3)


def test_batch_wider_than_the_context(models):
    """Each request fits the context but their padded batch does not: a long context beside a long
    continuation. Positions, not columns, are bounded by the context."""
    ours, hf = models
    L = ours.config.max_seq_len
    torch.manual_seed(3)
    pairs = [([1] + torch.randint(3, 259, (L - 10,)).tolist(), [5, 6]),
             ([1, 7], torch.randint(3, 259, (L - 20,)).tolist())]
    want = []
    with torch.no_grad():
        for ctx, cont in pairs:
            lp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].float(), -1)
            want.append(sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)))
    for backend in (NativeBackend(ours), HFBackend(hf)):
        got = CausalLM(backend, TOK, batch_size=2).loglikelihood_tokens(pairs)
        assert [lp for lp, _ in got] == pytest.approx(want, abs=1e-3)


def test_rolling_loglikelihood_windows(models):
    ours, hf = models
    small = CausalLM(NativeBackend(ours), TOK)
    small.max_length = 40  # force three windows
    text = "the quick brown fox jumps over the lazy dog " * 2
    ids = [1] + TOK.encode(text)
    want = 0.0
    with torch.no_grad():
        for a in range(1, len(ids), 40):  # every token predicted once, from <= 40 tokens of context
            b = min(a + 40, len(ids))
            lo = max(0, b - 1 - 40)
            lp = torch.log_softmax(hf(torch.tensor([ids[lo:b]])).logits[0].float(), -1)
            want += sum(lp[p - 1 - lo, ids[p]].item() for p in range(a, b))
    assert small.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-3)


def test_generation_matches_hf_generate_and_stops(models):
    ours, hf = models
    prompts = ["Q: what?\nA:", "longer prompt with more words in it:", "x"]
    refs = [ref_generate(hf, p, 12) for p in prompts]
    for backend in (NativeBackend(ours), HFBackend(hf)):
        lm = CausalLM(backend, TOK, batch_size=2)
        assert lm.generate([GenRequest(p, (), 12) for p in prompts]) == refs
        stop = refs[0][3:5]  # a stop string taken from the reference output
        cut = lm.generate([GenRequest(prompts[0], (stop,), 12)])[0]
        assert cut == refs[0][:refs[0].find(stop)]


# -- task fixtures in each family's published format -------------------------------------------
def _write(d, task, split, rows):
    (d / task).mkdir(parents=True, exist_ok=True)
    (d / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


MC_ROWS = {
    "piqa": [{"goal": f"How to do thing {i}?", "sol1": "Use a spoon" + "!" * i, "sol2": "Use a fork",
              "label": i % 2} for i in range(4)],
    "arc_easy": [{"id": f"a{i}", "question": f"What is {i}?", "choices": {"text": ["one", "two thing", "3"],
                  "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]} for i in range(3)],
    "hellaswag": [{"ctx_a": "A man sits.", "ctx_b": f"he reads {i}", "activity_label": "Reading",
                   "endings": ["a book [title] now.", "the sky", "fast", "nothing at all"], "label": str(i % 4)}
                  for i in range(3)],
    "winogrande": [{"sentence": f"The cup beat the jug {i} because _ was strong.", "option1": "cup",
                    "option2": "jug", "answer": str(1 + i % 2)} for i in range(3)],
    "boolq": [{"question": f"is it {i}", "passage": "Some passage text.", "answer": bool(i % 2)} for i in range(3)],
    "mmlu": [{"question": f"Pick {i}", "subject": "high_school_math", "choices": ["w", "x", "y", "z"],
              "answer": i % 4} for i in range(3)],
}


def _mc_prompt(task, r):
    if task == "piqa":
        return f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]
    if task == "arc_easy":
        return f"Question: {r['question']}\nAnswer:", r["choices"]["text"], "ABC".index(r["answerKey"])
    if task == "hellaswag":
        ctx = "Reading: A man sits. " + r["ctx_b"].capitalize()
        return ctx, ["a book. now.", "the sky", "fast", "nothing at all"], int(r["label"])
    if task == "boolq":
        return f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"])
    if task == "mmlu":
        return (f"The following are multiple choice questions (with answers) about high school math.\n\n"
                f"{r['question']}\nA. w\nB. x\nC. y\nD. z\nAnswer:", list("ABCD"), r["answer"])
    raise KeyError(task)


def test_multiple_choice_tasks_equal_direct_transformers(models, tmp_path):
    _, hf = models
    for task, rows in MC_ROWS.items():
        _write(tmp_path, task, "validation" if task not in ("arc_easy", "mmlu") else "test", rows)
    lm = CausalLM(HFBackend(hf), TOK, batch_size=4)
    doc = evaluate(lm, list(MC_ROWS), data_dir=tmp_path, shots=0, log=lambda m: None)
    for task, rows in MC_ROWS.items():
        accs, norms, unconds = [], [], []
        for r in rows:
            if task == "winogrande":
                head, tail = r["sentence"].split("_")
                lps = [ref_logprob(hf, head + o, " " + tail.strip()) for o in (r["option1"], r["option2"])]
                lens, gold = [len(" " + tail.strip()) - 1] * 2, int(r["answer"]) - 1
            else:
                ctx, choices, gold = _mc_prompt(task, r)
                lps = [ref_logprob(hf, ctx, " " + c) for c in choices]
                lens = [len(c) for c in choices]
                if task == "boolq":
                    unc = [ref_logprob(hf, "Answer:", " " + c) for c in choices]
                    unconds.append(max(range(2), key=lambda j: lps[j] - unc[j]) == gold)
            accs.append(max(range(len(lps)), key=lambda j: lps[j]) == gold)
            norms.append(max(range(len(lps)), key=lambda j: lps[j] / lens[j]) == gold)
        res = doc["results"][task]
        assert res["n"] == len(rows)
        assert res["acc"] == pytest.approx(sum(accs) / len(rows)), task
        assert res["acc_norm"] == pytest.approx(sum(norms) / len(rows)), task
        if unconds:
            assert res["acc_uncond"] == pytest.approx(sum(unconds) / len(rows)), task


def _norm(s):
    import re
    import string
    s = "".join(c for c in s.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def test_generative_qa_equals_direct_transformers(models, tmp_path):
    """Gold answers are set from the reference model's own output for half the questions, so exact
    match and F1 are exercised on hits, partial hits and misses."""
    _, hf = models
    qs = [f"who is {n}?" for n in ("alpha", "beta", "gamma", "delta")]
    shots = [{"question": "where is x?", "answer": ["here"]}]
    prefix = "Answer these questions:\nQ: where is x?\nA: here\n"
    raw = [ref_generate(hf, prefix + f"Q: {q}\nA:", 32) for q in qs]
    preds = []
    for t in raw:  # LLaMA's rule: up to the first newline, dot or comma
        t = t.split("\n")[0]
        for ch in ".,":
            t = t.split(ch)[0]
        preds.append(t.strip())
    golds = [[preds[0]], ["nothing like it"], [preds[2] + " extra words", "zzz"], ["no"]]
    _write(tmp_path, "naturalquestions", "validation", [{"question": q, "answer": g} for q, g in zip(qs, golds)])
    _write(tmp_path, "naturalquestions", "train", shots)
    lm = CausalLM(HFBackend(hf), TOK, batch_size=3)
    res = evaluate(lm, ["naturalquestions"], data_dir=tmp_path, shots=1, log=lambda m: None)["results"]
    em = [float(any(_norm(p) == _norm(g) for g in gs)) for p, gs in zip(preds, golds)]

    def f1(p, g):
        from collections import Counter
        p, g = _norm(p).split(), _norm(g).split()
        common = sum((Counter(p) & Counter(g)).values())
        if not p or not g:
            return float(p == g)
        return 0.0 if not common else 2 * common / (len(p) + len(g))
    f1s = [max(f1(p, g) for g in gs) for p, gs in zip(preds, golds)]
    assert res["naturalquestions"]["exact_match"] == pytest.approx(sum(em) / 4)
    assert res["naturalquestions"]["f1"] == pytest.approx(sum(f1s) / 4)
    assert 0 < res["naturalquestions"]["exact_match"]


def test_native_and_hf_export_score_identically(models, tmp_path):
    ours, hf = models
    for task, rows in MC_ROWS.items():
        _write(tmp_path, task, "validation" if task not in ("arc_easy", "mmlu") else "test", rows)
    _write(tmp_path, "gsm8k", "test", [{"question": f"What is {i}+1?", "answer": f"so #### {i + 1}"}
                                       for i in range(2)])
    docs = [evaluate(CausalLM(be, TOK, batch_size=5), list(MC_ROWS) + ["gsm8k"], data_dir=tmp_path, shots=0,
                     log=lambda m: None) for be in (NativeBackend(ours), HFBackend(hf))]
    for task in docs[0]["results"]:
        a, b = docs[0]["results"][task], docs[1]["results"][task]
        assert {m: a[m] for m in a["metrics"]} == {m: b[m] for m in b["metrics"]}, task
        for ra, rb in zip(docs[0]["samples"][task], docs[1]["samples"][task]):
            if "loglikelihoods" in ra:
                assert ra["loglikelihoods"] == pytest.approx(rb["loglikelihoods"], abs=1e-3)
            else:
                assert ra["completion"] == rb["completion"]


# -- start token, row cap, truncation ----------------------------------------------------------
class Recording:
    """A backend that records the rows and real token ids of every forward pass it runs."""

    def __init__(self, inner):
        self.inner, self.max_length, self.device, self.name = inner, inner.max_length, inner.device, inner.name
        self.rows: list[int] = []
        self.prefills: list[list[int]] = []

    def forward(self, tokens, mask, cache=None, last_only=False):
        self.rows.append(tokens.shape[0])
        if cache is None:
            self.prefills += [t[m].tolist() for t, m in zip(tokens, mask)]
        return self.inner.forward(tokens, mask, cache, last_only)

    def select(self, cache, rows):
        return self.inner.select(cache, rows)


class SmolTok(ByteTok):
    add_bos = False  # declares a BOS (SmolLM2's <|im_start|>) but does not add it


class NoStartTok(ByteTok):
    bos_id = None


@pytest.mark.parametrize("tok,bos,starts", [(TOK, "auto", True), (TOK, "never", False), (SmolTok(), "auto", False),
                                            (SmolTok(), "always", True), (NoStartTok(), "auto", False)])
def test_start_token_as_the_tokenizer_adds_it_or_as_forced(models, tok, bos, starts):
    ours, hf = models
    be = Recording(NativeBackend(ours))
    lm = CausalLM(be, tok, bos=bos)
    got = lm.loglikelihood([("Q: is it?\nAnswer:", " yes")])[0][0]
    ctx = TOK.encode("Q: is it?\nAnswer:")
    assert be.prefills == [([1] if starts else []) + ctx] and lm.start_token == (1 if starts else None)
    ids = torch.tensor([be.prefills[0] + TOK.encode(" yes")])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
    n = len(be.prefills[0])
    assert got == pytest.approx(sum(lp[n + i - 1, t].item() for i, t in enumerate(TOK.encode(" yes"))), abs=1e-3)


def test_bos_always_without_a_start_token_is_refused(models):
    from llama_pretrain.errors import UserError

    with pytest.raises(UserError, match="no start"):
        CausalLM(NativeBackend(models[0]), NoStartTok(), bos="always")


def test_rows_capped_whatever_context_is_shared(models):
    """acc_uncond-like: 1,000 questions whose requests all share one context. Every forward pass
    holds at most batch_size rows (so memory does not grow with the questions), and each score
    equals the sequence's own unbatched forward."""
    ours, hf = models
    answers = [" " + "abcdefghij"[i % 10] * (1 + i % 7) for i in range(70)]  # 70 distinct, lengths 2..8
    reqs = [("Answer:", answers[q % 70]) for q in range(1000)]
    be = Recording(NativeBackend(ours))
    got = CausalLM(be, TOK, batch_size=8).loglikelihood(reqs)
    assert max(be.rows) <= 8 and len(be.rows) >= 2 * 1000 // 8  # a prefill and an extension per chunk
    want = {}
    with torch.no_grad():
        for x in answers:
            ids = [1] + TOK.encode("Answer:" + x)
            lp = torch.log_softmax(ours(torch.tensor([ids]))[0].float(), -1)
            want[x] = sum(lp[p - 1, ids[p]].item() for p in range(len(ids) - len(TOK.encode(x)), len(ids)))
    assert [lp for lp, _ in got] == pytest.approx([want[x] for _, x in reqs], abs=1e-4)


def test_long_context_truncated_from_the_left_as_lm_eval_does(models):
    from llama_pretrain.errors import UserError

    ours, hf = models
    be = NativeBackend(ours)
    be.max_length = 24
    lm = CausalLM(be, TOK, batch_size=4)
    ctx = "a long context that does not fit in twenty-four tokens\nAnswer:"
    conts = [" yes", " no, never ever"]
    got = lm.loglikelihood([(ctx, x) for x in conts])
    for x, (lp, _) in zip(conts, got):
        c, t = [1] + TOK.encode(ctx), TOK.encode(x)
        inp = (c + t)[-(24 + 1):][:-1]  # lm-eval's window: continuation whole, context's end
        with torch.no_grad():
            out = torch.log_softmax(hf(torch.tensor([inp])).logits[0].float(), -1)
        assert lp == pytest.approx(sum(out[len(inp) - len(t) + i, k].item() for i, k in enumerate(t)), abs=1e-3)
    with pytest.raises(UserError, match="longer than the model's context"):
        lm.loglikelihood([("x", " y" * 13)])
