"""`llama-pretrain eval` and `contamination` end to end on tiny fixtures of every task's format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_pretrain.cli import main
from llama_pretrain.eval import sandbox as _sandbox
from llama_pretrain.eval.tasks import TASKS

from helpers.tiny_checkpoint import tiny_checkpoint

CHOICES = {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}


def _rows(task: str, i: int) -> dict:
    """One record of ``task`` in its Hugging Face dataset's field names."""
    q = f"question number {i} about colours"
    return {
        "piqa": {"goal": q, "sol1": "paint it", "sol2": "wash it", "label": i % 2},
        "siqa": {"context": "Ann met Bo.", "question": q, "answerA": "happy", "answerB": "sad",
                 "answerC": "calm", "label": str(1 + i % 3)},
        "hellaswag": {"ctx_a": "A cat sits.", "ctx_b": "it", "activity_label": "Pets",
                      "endings": ["purrs.", "jumps.", "sleeps.", "eats."], "label": str(i % 4)},
        "winogrande": {"sentence": "Ann gave Bo a pen because _ was kind.", "option1": "Ann", "option2": "Bo",
                       "answer": str(1 + i % 2)},
        "arc_easy": {"id": f"e{i}", "question": q, "choices": CHOICES, "answerKey": "ABC"[i % 3]},
        "arc_challenge": {"id": f"c{i}", "question": q, "choices": CHOICES, "answerKey": "ABC"[i % 3]},
        "openbookqa": {"id": f"o{i}", "question_stem": q, "choices": CHOICES, "answerKey": "ABC"[i % 3]},
        "commonsense_qa": {"id": f"q{i}", "question": q, "question_concept": "colour", "choices": CHOICES,
                           "answerKey": "ABC"[i % 3]},
        "commonsense_qa_letters": {"id": f"q{i}", "question": q, "choices": CHOICES, "answerKey": "ABC"[i % 3]},
        "naturalquestions": {"question": q, "answer": ["red"]},
        "triviaqa": {"question": q, "question_id": f"t{i}", "answer": {"value": "Red", "aliases": ["red"]}},
        "squad": {"id": f"s{i}", "title": "Colours", "context": "The sky is blue.", "question": q,
                  "answers": {"text": ["blue"], "answer_start": [11]}},
        "quac": {"dialogue_id": f"d{i}", "wikipedia_page_title": "Colours", "section_title": "Sky",
                 "context": "The sky is blue. CANNOTANSWER", "questions": ["what colour?", "why?"],
                 "answers": {"texts": [["blue"], ["CANNOTANSWER"]], "answer_starts": [[11], [17]]},
                 "orig_answers": {"texts": ["blue", "CANNOTANSWER"], "answer_starts": [11, 17]}},
        "boolq": {"question": q, "passage": "The sky is blue.", "answer": bool(i % 2)},
        "gsm8k": {"question": f"What is {i} + 2?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"},
        "math": {"problem": f"Compute ${i}+1$.", "solution": f"It is $\\boxed{{{i + 1}}}$.", "level": "Level 1",
                 "type": "Algebra"},
        "mmlu": {"question": q, "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": i % 4},
        "bbh": {"input": f"not ( True ) and {i % 2 == 0} is", "target": "False"},
        "agieval": {"query": f"Q: {q} Answer Choices: (A)x (B)y\nA: Among A through B, the answer is",
                    "choices": ["(A)x", "(B)y"], "gold": [i % 2]},
        "mbpp": {"task_id": 11 + i, "text": "Write a function to add one.", "code": "def f(x):\n    return x + 1",
                 "test_list": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"],
                 "test_setup_code": "", "challenge_test_list": []},
    }[task]


def _write(root, task, split, rows, sub=None):
    d = root / task / sub if sub else root / task
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llama_pretrain.interop import save_hf

    root = tmp_path_factory.mktemp("eval")
    cfg, state = tiny_checkpoint(root, max_seq_len=1024)
    save_hf(state, cfg, root / "hf")
    data = root / "data"
    for tid, task in TASKS.items():
        if tid == "humaneval":
            continue
        if tid in ("bbh", "agieval"):  # published per sub-task
            for sub in ("one", "two"):
                _write(data, tid, task.split, [_rows(tid, i) for i in range(3)], sub)
            continue
        _write(data, tid, task.split, [_rows(tid, i) for i in range(3)])
        if task.fewshot_split:
            _write(data, tid, task.fewshot_split, [_rows(tid, i) for i in range(10, 18)])
    return root, data


def test_eval_all_tasks_table_and_json(setup, capsys):
    root, data = setup
    out = root / "results.json"
    rc = main(["eval", str(root / "ckpt"), "--tasks", "all", "--data-dir", str(data), "--limit", "2",
               "--batch-size", "8", "--out", str(out), "--timeout", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == set(TASKS) - {"commonsense_qa_letters"}  # a variant outside Table 3
    for g in ("Code", "Commonsense Reasoning", "World Knowledge", "Reading Comprehension", "Math", "MMLU",
              "BBH", "AGI Eval"):
        assert g in printed and doc["groups"][g]["complete"]
    r = doc["results"]
    for tid in ("piqa", "hellaswag", "mmlu", "agieval"):
        assert {"acc", "acc_norm"} <= set(r[tid])
    assert "acc_uncond" in r["openbookqa"] and "acc_uncond" in r["boolq"]
    assert {"exact_match", "f1"} <= set(r["squad"]) and "f1" in r["quac"]
    assert "maj1@1" in r["gsm8k"] and "maj1@1" in r["math"] and "pass@1" in r["humaneval"]
    # Paper shot counts by default, recorded with the prompt settings.
    assert r["commonsense_qa"]["settings"]["shots"] == 7 and r["gsm8k"]["settings"]["shots"] == 8
    assert r["mmlu"]["settings"]["fewshot_split"] == "dev" and r["piqa"]["settings"]["shots"] == 0
    assert r["bbh"]["settings"]["fewshot_split"].startswith("test")
    assert r["quac"]["n"] == 2 and r["humaneval"]["n"] == 2  # quac: turns of the first dialogue
    assert len(doc["samples"]["piqa"]) == 2


def test_samples_file_scores_code_without_a_model(setup, tmp_path, capsys):
    _, data = setup
    samples = tmp_path / "s.jsonl"
    rows = [{"task_id": 11, "completion": "def f(x):\n    return x + 1\n"},
            {"task_id": 11, "completion": "def f(x):\n    return x\n"},
            {"task_id": 12, "completion": "def f(x):\n    while True: pass\n"}]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["eval", "--tasks", "mbpp", "--data-dir", str(data), "--samples", str(samples),
                 "--out", str(out), "--timeout", "2"]) == 0
    r = json.loads(out.read_text())["results"]["mbpp"]
    assert r["n"] == 2 and r["pass@1"] == pytest.approx((0.5 + 0.0) / 2)


def test_native_and_hf_dirs_score_identically_through_the_cli(setup, tmp_path):
    root, data = setup
    docs = []
    hf_flags = ["--backend", "hf", "--tokenizer", str(root / "tok.model")]
    for model, extra in ((root / "ckpt", []), (root / "hf", hf_flags)):
        out = tmp_path / f"{model.name}.json"
        assert main(["eval", str(model), "--tasks", "piqa,hellaswag,winogrande,naturalquestions", "--data-dir",
                     str(data), "--out", str(out), *extra]) == 0
        docs.append(json.loads(out.read_text()))
    for tid, a in docs[0]["results"].items():
        b = docs[1]["results"][tid]
        assert {m: a[m] for m in a["metrics"]} == {m: b[m] for m in b["metrics"]}


def test_bos_option_is_recorded_and_applied(setup, tmp_path):
    """SentencePiece adds <s>: auto keeps it, never drops it; the results say which was used."""
    root, data = setup
    docs = {}
    for bos in ("auto", "never"):
        out = tmp_path / f"{bos}.json"
        assert main(["eval", str(root / "ckpt"), "--tasks", "piqa", "--data-dir", str(data), "--bos", bos,
                     "--out", str(out)]) == 0
        docs[bos] = json.loads(out.read_text())
    assert docs["auto"]["config"]["bos"] == "auto" and docs["auto"]["start_token"] == 1
    assert docs["never"]["config"]["bos"] == "never" and docs["never"]["start_token"] is None
    assert docs["auto"]["samples"]["piqa"] != docs["never"]["samples"]["piqa"]  # other ids, other scores


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, data = setup
    assert main(["eval", str(root / "ckpt"), "--tasks", "piqa,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err and True
    bad = tmp_path / "bad"
    _write(bad, "piqa", "validation", [{"question": "x", "a": 1}])
    assert main(["eval", str(root / "ckpt"), "--tasks", "piqa", "--data-dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "expected the fields of ybisk/piqa: goal, sol1, sol2, label; found: a, question" in err
    assert main(["eval", str(root / "ckpt"), "--tasks", "siqa", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none'}/siqa/validation.jsonl" in err and len(err.strip().splitlines()) == 1


def test_contamination_finds_planted_overlaps(setup, tmp_path, capsys):
    from llama_pretrain.data.shards import FORMAT, ShardWriter
    from llama_pretrain.eval.tokenization import TokenizerText

    root, data = setup
    tok = TokenizerText(root / "tok.model")
    goals = ["how do I paint wooden fences quickly with a brush and rollers on a sunny day",
             "what keeps a bicycle chain from rusting during a long wet winter",
             "where should young seedlings stand to get plenty of morning light",
             "why does bread dough need time to rise before it goes into the oven"]
    sols = [("use thin coats", "use one thick coat"), ("oil it often", "leave it wet"),
            ("by an east window", "in a dark cupboard"), ("yeast makes gas", "flour is heavy")]
    recs = [{"goal": g, "sol1": a, "sol2": b, "label": 0} for g, (a, b) in zip(goals, sols)]
    _write(tmp_path / "d", "piqa", "validation", recs)
    task = TASKS["piqa"]
    toks = [tok.encode(task.example(r)) for r in recs]
    L = 10
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    w = ShardWriter(shards, "train", "uint16", shard_tokens=5000)
    noise = lambda n: rng.integers(3, 320, n)  # noqa: E731
    # Sample 0: all but its "Question: " template (10 tokens with this character-level tokenizer,
    # shared by every sample, so planting it would rightly contaminate them all).
    w.add(np.concatenate([noise(3000), toks[0][10:], noise(3000)]))
    w.add(np.concatenate([noise(2000), toks[1][5:5 + L], noise(50)]))  # sample 1: exactly L tokens
    w.add(np.concatenate([noise(2000), toks[2][5:5 + L - 1], noise(50)]))  # sample 2: L-1: not contaminated
    meta = w.close()
    (shards / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "dtype": "uint16", "tokenizer": {"path": str(root / "tok.model")},
        "splits": {"train": {"tokens": sum(s["tokens"] for s in meta), "shards": meta}}}))
    out = tmp_path / "report.json"
    assert main(["contamination", "--shards", str(shards), "--task", "piqa", "--data-dir", str(tmp_path / "d"),
                 "--min-match", str(L), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    s = {r["id"]: r for r in rep["samples"]}
    assert s["0"]["contaminated_tokens"] == len(toks[0]) - 10 and "Dirty" in s["0"]["subsets"]
    assert s["1"]["contaminated_tokens"] == L
    assert s["2"]["contaminated_tokens"] == 0 and s["3"]["contaminated_tokens"] == 0
    assert "Clean" in s["3"]["subsets"]
    assert rep["subsets"]["Dirty"]["n"] == 1 and rep["subsets"]["Clean"]["n"] == 3
    base = ["contamination", "--shards", str(shards), "--task", "piqa", "--data-dir", str(tmp_path / "d")]
    assert main(base + ["--limit", "0"]) == 2  # not "no limit"
    assert "--limit must be >= 1" in capsys.readouterr().err
    for rows in ([{"id": "0", "acc": "high"}], [{"acc": 1.0}], 7):
        res = tmp_path / "res.json"
        res.write_text(json.dumps({"results": {"piqa": {"primary": "acc"}}, "samples": {"piqa": rows}}))
        assert main(base + ["--results", str(res)]) == 2
        err = capsys.readouterr().err
        assert "need an id and a numeric 'acc'" in err and "Traceback" not in err


def test_contamination_mismatches_and_streaming():
    from llama_pretrain.eval.contamination import find_contamination

    rng = np.random.default_rng(1)
    ev = [rng.integers(10, 60000, 80) for _ in range(3)]
    train = rng.integers(10, 60000, 300_000).astype(np.uint16)
    train[100_000:100_030] = ev[0][20:50]                 # exact, across a chunk boundary below
    fuzzy = ev[1][10:40].copy()
    fuzzy[[12, 20]] += 1                                   # two substitutions inside
    train[200_000:200_030] = fuzzy
    for seed, want1 in ((None, 0), (5, 30)):              # seed L misses runs broken below L
        marks = find_contamination(ev, [train[:150_000], train[150_000:]], min_match=15, seed=seed,
                                   chunk_tokens=100_010)
        assert np.flatnonzero(marks[0]).tolist() == list(range(20, 50))
        assert int(marks[1].sum()) == want1 and not marks[2].any()


# -- the code sandbox's opt-in where generated code cannot be isolated ---------------------------
_REAL_REQUIRE_ISOLATION = _sandbox.require_isolation


@pytest.fixture(autouse=True)
def _fixture_code_runs_where_namespaces_are_refused(monkeypatch):
    """Where the kernel refuses namespaces the code tasks refuse untrusted code; the programs of
    these tests are the fixtures' own, so they opt in as a user would with --allow-unsandboxed."""
    if not _sandbox.namespace_prefix():
        monkeypatch.setattr(_sandbox, "require_isolation", lambda allow=False: None)


def _mbpp_samples(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": 11, "completion": "def f(x):\n    return x + 1\n"}) + "\n")
    return str(samples)


def test_code_tasks_refuse_to_run_unisolated_without_the_flag(setup, tmp_path, capsys, monkeypatch):
    _, data = setup
    monkeypatch.setattr(_sandbox, "require_isolation", _REAL_REQUIRE_ISOLATION)
    monkeypatch.setattr(_sandbox, "namespace_prefix", lambda: ())
    base = ["eval", "--tasks", "mbpp", "--data-dir", str(data), "--samples", _mbpp_samples(tmp_path)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--allow-unsandboxed" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    out = tmp_path / "r.json"
    assert main(base + ["--allow-unsandboxed", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["results"]["mbpp"]["pass@1"] == 1.0 and doc["config"]["allow_unsandboxed"] is True
    assert doc["results"]["mbpp"]["settings"]["sandbox"]["isolation"][0].startswith("UNSANDBOXED")
