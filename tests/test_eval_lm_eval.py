"""The lm-evaluation-harness adapter, checked against our own harness and evaluator.

Everything is local: a tiny random model with a SentencePiece tokenizer trained here, lm-eval
``Instance`` objects built by hand, and lm-eval tasks written as YAML over JSON-lines files in the
test's directory (lm-eval's ``json`` dataset builder). Sockets are refused while the tests run,
so nothing can be downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.api.model")

from helpers.train_data import fit_on_tokens  # noqa: E402

# Log-likelihoods (nats, absolute) from lm-eval through the adapter vs our harness: the same
# weights and the same harness core, float32 on the CPU; only the order and grouping of the
# requests into batches may differ, which would move sums by float rounding only (measured: 0.0).
TOL = 1e-4

PIQA = [{"goal": f"How do I tell whether {n} is even?", "sol1": "divide it by two" + " and look" * (i % 3),
         "sol2": "it is odd and that is fine", "label": i % 2}
        for i, n in enumerate(["4", "seven", "10", "the number 3", "12", "a big one"])]
TEXTS = ["the number 4 is even and that is fine.",
         "the number 7 is odd and that is fine. " * 12]  # 12 copies: longer than the 128-token context
QUESTIONS = [{"question": f"is the number {i} even", "answer": "even" if i % 2 == 0 else "odd"} for i in range(4)]
GEN_UNTIL, GEN_TOKENS = ["\n", ".", ","], 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer
    from llama_pretrain.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("lm_eval")
    text = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and that is fine." for i in range(300)]
    sp = train_tokenizer(text, d / "tok.model", vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, max_seq_len=128)
    save_native(Transformer(cfg).state_dict(), cfg, d / "ckpt", tokenizer_model=sp)
    return d / "ckpt"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _adapter(ckpt, **config):
    from lm_eval.api.registry import get_model

    import llama_pretrain.eval.lm_eval_adapter  # noqa: F401 - registers the model
    return get_model("llama-pretrain").create_from_arg_string(f"path={ckpt}", {"batch_size": 4, **config})


def _write_tasks(d):
    """Three lm-eval tasks over local files, one per request type, and our piqa split."""
    (d / "piqa").mkdir(parents=True)
    (d / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA))
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = d / "tasks"
    tasks.mkdir()

    def task(name, data, body):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
            f"  cache_dir: {d / 'hf_cache'}\nvalidation_split: validation\n" + body)

    # Our piqa task's format (tasks/commonsense.py): "Question: <goal>\nAnswer:" + " " + choice.
    task("local_piqa", d / "piqa" / "validation.jsonl",
         'output_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\n'
         'doc_to_choice: "{{[sol1, sol2]}}"\ndoc_to_target: label\n'
         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task("local_rolling", d / "texts.jsonl",
         'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n")
    task("local_gen", d / "questions.jsonl",
         'output_type: generate_until\ndoc_to_text: "Q: {{question}}?\\nA:"\ndoc_to_target: answer\n'
         f"generation_kwargs:\n  until: {json.dumps(GEN_UNTIL)}\n  max_gen_toks: {GEN_TOKENS}\n"
         "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return tasks


def _samples(out, task):
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_tasks_score_like_our_evaluator(ckpt, tmp_path):
    """lm-eval's own evaluator, through the adapter, vs our evaluator and harness on the same
    requests: log-likelihoods per choice within TOL, the same accuracies, rolling log-likelihoods
    within TOL, the same greedy generations."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llama_pretrain.eval.lm_eval_adapter  # noqa: F401 - registers the model
    from llama_pretrain.eval.evaluator import evaluate
    from llama_pretrain.eval.harness import GenRequest, load_lm
    from llama_pretrain.eval.tasks import TASKS

    tasks = _write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="llama-pretrain", model_args=f"path={ckpt}", tasks=["local_piqa", "local_rolling", "local_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=4,
        device="cpu", num_fewshot=0, log_samples=True, bootstrap_iters=0)

    lm = load_lm(str(ckpt), batch_size=4)
    ours = evaluate(lm, ["piqa"], data_dir=tmp_path, shots=0, log=lambda m: None)

    # Multiple choice: the same (context, continuation) requests, the same scores.
    theirs = _samples(out, "local_piqa")
    assert len(theirs) == len(PIQA) == len(ours["samples"]["piqa"])
    diffs = []
    for s, row, rec in zip(theirs, ours["samples"]["piqa"], PIQA):
        assert [tuple(a) for a in s["arguments"]] == TASKS["piqa"].requests(rec, "")
        lls = [r[0] for r in s["filtered_resps"]]
        diffs += [abs(a - b) for a, b in zip(lls, row["loglikelihoods"])]
    assert max(diffs) < TOL, max(diffs)
    res = out["results"]["local_piqa"]
    assert res["acc,none"] == pytest.approx(ours["results"]["piqa"]["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours["results"]["piqa"]["acc_norm"])

    # Rolling log-likelihood (perplexity), including a text longer than the context.
    rolled = [float(s["filtered_resps"][0]) for s in _samples(out, "local_rolling")]
    want = lm.loglikelihood_rolling(TEXTS)
    assert max(abs(a - b) for a, b in zip(rolled, want)) < TOL
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)  # lm-eval's word count (a trailing space counts)
    assert out["results"]["local_rolling"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(want) / words), rel=1e-4)

    # Greedy generation cut at the task's stop sequences.
    gen = [s["filtered_resps"][0] for s in _samples(out, "local_gen")]
    want = lm.generate([GenRequest(f"Q: {q['question']}?\nA:", tuple(GEN_UNTIL), GEN_TOKENS) for q in QUESTIONS])
    assert gen == want
    assert not any(c in g for g in gen for c in GEN_UNTIL)


def test_adapter_requests_equal_the_harness(ckpt):
    """The three request types as lm-eval hands them over (Instance objects), shared contexts included."""
    from lm_eval.api.instance import Instance

    from llama_pretrain.eval.harness import GenRequest, load_lm

    lm = _adapter(ckpt, device="cpu")
    ref = load_lm(str(ckpt), batch_size=3)
    reqs = [("the number 4 is", " even"), ("the number 4 is", " odd"), ("the number 4 is ", "odd and fine"),
            ("", "the number"), ("the number 10 is even and", " that is fine.")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)])
    want = ref.loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) < TOL
    assert [a[1] for a in got] == [b[1] for b in want]  # greedy flags
    texts = ["the number 3 is odd.", TEXTS[1]]
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    assert max(abs(a - b) for a, b in zip(roll, ref.loglikelihood_rolling(texts))) < TOL
    gen = lm.generate_until([Instance("generate_until", {}, ("the number", {"until": ["."], "max_gen_toks": 8}), 0),
                             Instance("generate_until", {}, ("the number 2 is", {"until": "\n"}), 1)])
    assert gen == ref.generate([GenRequest("the number", (".",), 8), GenRequest("the number 2 is", ("\n",), 256)])
    assert "." not in gen[0]


@pytest.mark.parametrize("device", [None, "cuda", "cuda:0"])
def test_falls_back_to_cpu_without_cuda(ckpt, monkeypatch, caplog, device):
    """lm-eval's CLI passes device="cuda:0" when --device is not given; on a machine without CUDA
    the adapter must run on the CPU (as lm-eval's HF backend does), not fail loading the model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    config = {} if device is None else {"device": device}
    with caplog.at_level(logging.WARNING, logger="llama_pretrain.eval.lm_eval_adapter"):
        lm = _adapter(ckpt, **config)
    assert lm.device == torch.device("cpu")
    assert lm.lm.device == torch.device("cpu")
    if device is not None:
        assert any("not available" in r.getMessage() for r in caplog.records)
    from lm_eval.api.instance import Instance
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("the number 4 is", " even"), 0)])[0][0] < 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ckpt):
    """The fixture's model trained for a few seconds, so greedy text is words, not byte pieces
    (which Hugging Face's and SentencePiece's decoders render differently when invalid UTF-8),
    and its Hugging Face export (`export-hf`) for lm-eval's own HF backend."""
    import subprocess

    from llama_pretrain.interop import load_checkpoint, save_native
    from llama_pretrain.model import Transformer
    from llama_pretrain.tokenizer import Tokenizer

    cfg, state, _ = load_checkpoint(ckpt)
    tok = Tokenizer(ckpt / "tokenizer.model")
    ids = torch.tensor(sum((tok.encode(f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and that is fine.")
                            for i in range(300)), []))
    torch.manual_seed(0)
    model = Transformer(cfg)
    fit_on_tokens(model, ids, 120)
    d = tmp_path_factory.mktemp("trained")
    save_native(model.state_dict(), cfg, d / "ckpt", tokenizer_model=ckpt / "tokenizer.model")
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", "export-hf", d / "ckpt", "--out", d / "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / "ckpt", d / "hf"


def _evaluate(model, model_args, task_names, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=task_names, batch_size=4, device="cpu", num_fewshot=0,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        bootstrap_iters=0)


def test_adapter_equals_lm_evals_hf_backend_on_the_exported_weights(trained, tmp_path, monkeypatch):
    """The three request types of local task YAMLs scored by lm-eval through our adapter and
    through lm-eval's HF backend (HFLM, transformers) on the `export-hf` weights: the same
    log-likelihoods (within TOL), the same rolling log-likelihoods, the same greedy text (but for
    the leading space HFLM's decoding drops).
    HFLM's rolling log-likelihood puts BOS in front of a window that already starts with one
    (its default add_bos_token for Llama), so that task is compared with add_bos_token=False."""
    pytest.importorskip("accelerate")  # lm-eval's HF backend imports it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval.models.huggingface  # noqa: F401 - registers "hf"

    import llama_pretrain.eval.lm_eval_adapter  # noqa: F401 - registers the model

    ckpt, hf = trained
    tasks = _write_tasks(tmp_path)
    names = ["local_piqa", "local_rolling", "local_gen"]
    ours = _evaluate("llama-pretrain", f"path={ckpt}", names, tasks)
    theirs = _evaluate("hf", f"pretrained={hf},dtype=float32", ["local_piqa", "local_gen"], tasks)
    rolling = _evaluate("hf", f"pretrained={hf},dtype=float32,add_bos_token=False", ["local_rolling"], tasks)

    def lls(out, task):
        return [float(r[0]) if isinstance(r, (list, tuple)) else float(r)
                for s in _samples(out, task) for r in s["filtered_resps"]]

    a, b = lls(ours, "local_piqa"), lls(theirs, "local_piqa")
    assert len(a) == 2 * len(PIQA) and max(abs(x - y) for x, y in zip(a, b)) < TOL
    a, b = lls(ours, "local_rolling"), lls(rolling, "local_rolling")
    assert len(a) == len(TEXTS) and max(abs(x - y) for x, y in zip(a, b)) < TOL
    # The same greedy tokens; HFLM decodes the continuation alone, and a Llama tokenizer's decoder
    # then drops the first piece's "▁" (its dummy prefix), where ours keeps the space the model wrote.
    gen = [s["filtered_resps"][0] for s in _samples(ours, "local_gen")]
    assert [g[1:] if g.startswith(" ") else g for g in gen] == [
        s["filtered_resps"][0] for s in _samples(theirs, "local_gen")]
    assert any(g.strip() for g in gen)  # text was generated, not only stop sequences
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["local_piqa"][metric] == theirs["results"]["local_piqa"][metric]


def test_eval_device_defaults_to_auto(ckpt, monkeypatch):
    """`eval` without --device takes a GPU when there is one, like train and generate."""
    from llama_pretrain.cli import build_parser

    args = build_parser().parse_args(["eval", str(ckpt), "--tasks", "piqa"])
    assert args.device == "auto"
    seen = []
    monkeypatch.setattr("llama_pretrain.eval.harness.load_lm", lambda *a, **k: seen.append(k["device"]) or 1 / 0)
    monkeypatch.setattr("llama_pretrain.eval.evaluator.preflight", lambda *a: None)  # no task data here
    with pytest.raises(ZeroDivisionError):
        args.func(args)
    assert seen == ["auto"]
