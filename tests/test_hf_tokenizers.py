"""Hugging Face tokenizer.json tokenizers: the ids of ``AutoTokenizer``, BOS as the tokenizer adds
it, and every command that takes a tokenizer (data prepare, generate, native eval, init_from,
export-hf, export-gguf).

Two byte-level BPE tokenizers are trained here with the ``tokenizers`` library: one like SmolLM2's
(digits split, no BOS added, GPT2Tokenizer class) and one like Llama 3's (its split regex,
``ignore_merges``, a TemplateProcessing post-processor that adds ``<|begin_of_text|>``).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFLibTokenizer  # noqa: E402

from llama_pretrain.cli import main  # noqa: E402
from llama_pretrain.config import ModelConfig  # noqa: E402
from llama_pretrain.data.normalize import normalize_text  # noqa: E402
from llama_pretrain.data.shards import iter_documents, read_manifest  # noqa: E402
from llama_pretrain.errors import UserError  # noqa: E402
from llama_pretrain.interop import save_hf  # noqa: E402
from llama_pretrain.model import Transformer  # noqa: E402
from llama_pretrain.tokenizer import Tokenizer  # noqa: E402

from helpers.runs import as_flags, data_config, tiny_run  # noqa: E402
from helpers.synthetic_text import prose  # noqa: E402

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
FLAVOURS = ("smollm", "llama3")
TEXTS = ["The 12345 cats sat.", " leading space", "two  spaces\tand\ttabs\n\nnew lines  ",
         "café naïve 日本語 😀 Ünïcödé", "", "9", "<|im_start|>user\nhi 42<|im_end|>",
         "a <|endoftext|> b <custom> c", "<|begin_of_text|>already there", "x" * 300,
         "don't I'm they're 3.14159 1,000,000"]


def _corpus() -> list[str]:
    rng = random.Random(0)
    extra = ["café naïve 日本語 😀 Ünïcödé", "don't I'm they're we've", "3.14159 and 1,000,000 and 2024"]
    return [prose(rng) for _ in range(300)] + extra * 5


def build_tokenizer(out: Path, flavour: str) -> Path:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json, generation_config.json)."""
    llama3 = flavour == "llama3"
    tok = HFLibTokenizer(models.BPE(ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken("<custom>", special=False)])
    out.mkdir(parents=True, exist_ok=True)
    if llama3:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|end_of_text|>",
                  "clean_up_tokenization_spaces": True}
        # no added_tokens_decoder in the config: the map's eos overrides the config's, as transformers reads it
        (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": "<|eot_id|>"}))
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.token_to_id(bos),
             "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}))
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out / "tokenizer.json"


def model_dir(out: Path, tokenizer_json: Path) -> Path:
    """A tiny random llama2-debug-sized HF model with this tokenizer's vocabulary and files."""
    n = Tokenizer(tokenizer_json).vocab_size
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=n)
    torch.manual_seed(0)
    save_hf(Transformer(cfg).state_dict(), cfg, out, tokenizer_model=tokenizer_json)
    return out


@pytest.fixture(scope="module", params=FLAVOURS)
def flavour(request, tmp_path_factory):
    """(flavour, tokenizer.json, model dir, AutoTokenizer of the model dir)."""
    root = tmp_path_factory.mktemp(request.param)
    tj = build_tokenizer(root / "tok", request.param)
    d = model_dir(root / "model", tj)
    auto = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    return request.param, tj, d, auto


def auto_ids(auto, text: str) -> list[int]:
    return auto(text)["input_ids"]


# -- the ids of AutoTokenizer ------------------------------------------------------------------------

def test_ids_and_text_equal_autotokenizer(flavour):
    name, tj, d, auto = flavour
    tok = Tokenizer(d / "tokenizer.json")
    assert type(tok).__name__ == "HFTokenizer" and tok.sha256 == Tokenizer(tj).sha256
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (len(auto), auto.bos_token_id, auto.eos_token_id)
    assert tok.pad_id == (auto.pad_token_id if auto.pad_token_id is not None else -1)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == auto_ids(auto, text), text
        assert tok.decode(ids) == auto.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, bos=False, eos=True) == [tok.encode(t, bos=False, eos=True) for t in TEXTS]
    again = pickle.loads(pickle.dumps(tok))  # how it reaches data prepare's workers
    assert type(again) is type(tok) and again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    custom = tok.encode("<custom>", bos=False)
    assert len(custom) == 1 and tok.id_to_piece(custom[0]) == "<custom>"  # an added token, whole


def test_bos_only_where_the_tokenizer_adds_it_and_never_twice(flavour):
    name, _, d, auto = flavour
    tok = Tokenizer(d / "tokenizer.json")
    text = "The 12345 cats sat."
    plain = tok.encode(text, bos=False)
    assert tok.add_bos == (name == "llama3") and not tok.add_eos
    if name == "llama3":  # <|begin_of_text|> once, from the TemplateProcessing post-processor
        assert tok.encode(text) == [tok.bos_id] + plain == tok.encode(text, bos=True)
        assert tok.stop_ids == [auto.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    else:  # SmolLM2 declares <|im_start|> its BOS but adds none
        assert tok.encode(text) == plain and tok.bos_id not in plain
        assert tok.encode(text, bos=True) == [tok.bos_id] + plain  # asked for: once
        assert tok.stop_ids == [tok.eos_id]
    assert tok.encode(text, eos=True) == tok.encode(text) + [tok.eos_id]


def test_broken_and_unknown_tokenizer_json_is_one_line(tmp_path, flavour):
    _, tj, _, _ = flavour
    spec = json.loads(tj.read_text())
    spec["model"]["type"] = "Evil"
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizer model type 'Evil' is not one of BPE") as e:
        Tokenizer(bad)
    bad.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match="not valid JSON") as e2:
        Tokenizer(bad)
    spec["model"]["type"] = "BPE"
    spec["model"]["merges"] = [["no-such-piece", "x"]]
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="not a tokenizer the tokenizers library reads") as e3:
        Tokenizer(bad)
    assert all("\n" not in str(x.value) for x in (e, e2, e3))
    spec["model"] = json.loads(tj.read_text())["model"]
    bad.write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(UserError, match="auto_map names code"):  # its tokenizer would be that code
        Tokenizer(bad)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer_config.json").symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="outside"):  # a model directory's files stay in it
        Tokenizer(bad)


# -- data prepare ----------------------------------------------------------------------------------

def test_data_prepare_with_a_tokenizer_json_writes_autotokenizer_ids(flavour, tmp_path):
    _, tj, _, _ = flavour
    auto = transformers.AutoTokenizer.from_pretrained(str(tj.parent), local_files_only=True)
    rng = random.Random(1)
    docs = [prose(rng) + f" 12345 {i} café <|im_start|>" for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "data"
    assert main(["data", "prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tj), "--out",
                 str(out), "--no-quality", "--val-fraction", "0.1", "--quiet"]) == 0
    m = read_manifest(out)
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == Tokenizer(tj).sha256
    got = sorted(d.tolist() for sp in ("train", "val") for d in iter_documents(out, sp))
    want = sorted(auto(normalize_text(t))["input_ids"] + [auto.eos_token_id] for t in docs)
    assert got == want


def test_a_vocabulary_past_65536_gets_uint32_shards_the_loader_reads(tmp_path):
    from llama_pretrain.data.loader import TokenLoader

    n = 70_000
    words = [f"w{i}" for i in range(n)]
    tok = HFLibTokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]", "[EOS]"])},
                                          unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]", "unk_token": "[UNK]"}))
    rng = random.Random(2)
    docs = [" ".join(f"w{rng.randrange(n)}" for _ in range(40)) + f" w{n - 1 - i}" for i in range(20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "data"
    assert main(["data", "prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--out", str(out), "--no-quality", "--val-fraction", "0",
                 "--quiet"]) == 0
    assert read_manifest(out)["dtype"] == "uint32"
    want = sorted([int(w[1:]) for w in t.split()] + [n + 1] for t in docs)
    assert sorted(d.tolist() for d in iter_documents(out, "train")) == want
    loader = TokenLoader(out, split="train", batch_size=2, seq_len=16)
    batch = next(loader)
    assert loader.vocab_size == n + 2 and int(batch.max()) > 65_535


# -- generate and the native eval backend ------------------------------------------------------------

def test_generate_greedy_equals_transformers(flavour, capsys):
    from llama_pretrain.generate import generate_ids
    from llama_pretrain.interop import load_model

    name, _, d, auto = flavour
    tok = Tokenizer(d / "tokenizer.json")
    prompt = "The 12345 cats"
    ids = tok.encode(prompt)
    ours = generate_ids(load_model(d), ids, max_new_tokens=12, eos_id=tok.stop_ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()
    with torch.no_grad():
        full = hf.generate(torch.tensor([auto_ids(auto, prompt)]), max_new_tokens=12, do_sample=False)[0].tolist()
    theirs = full[len(ids):]
    stop = next((i for i, t in enumerate(theirs) if t in tok.stop_ids), len(theirs))
    assert full[:len(ids)] == ids and ours == theirs[:stop]
    assert main(["generate", str(d), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    if name == "smollm":  # nothing to continue from: no text and no start token
        assert main(["generate", str(d), "--prompt", "", "--device", "cpu"]) == 2
        assert "adds no start token" in capsys.readouterr().err


def test_native_eval_backend_scores_as_the_hf_backend(flavour):
    from llama_pretrain.eval.harness import load_lm
    from llama_pretrain.eval.tokenization import HFText, TokenizerText

    name, _, d, _ = flavour
    native, hf = load_lm(str(d), backend="native"), load_lm(str(d), backend="hf")
    assert isinstance(native.tok, TokenizerText) and isinstance(hf.tok, HFText)
    assert native.tok.add_bos == hf.tok.add_bos == (name == "llama3")
    reqs = [("Question: what is 12 + 30?\nAnswer:", " 42"), ("", "hello there"), ("The cats", " sat."),
            ("<|begin_of_text|>The cats", " sat.")]
    pairs = [native.encode_pair(c, x) for c, x in reqs]
    assert pairs == [hf.encode_pair(c, x) for c, x in reqs]
    bos = native.tok.bos_id
    assert [p[0][:1] == [bos] for p in pairs] == [name == "llama3", True, name == "llama3", name == "llama3"]
    assert all(p[0][:2] != [bos, bos] for p in pairs)  # never twice, even where the text starts with it
    ours, theirs = native.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert np.allclose([s for s, _ in ours], [s for s, _ in theirs], atol=1e-4)
    assert np.allclose(native.loglikelihood_rolling(["The 12345 cats sat."]),
                       hf.loglikelihood_rolling(["The 12345 cats sat."]), atol=1e-4)


# -- import, export, init_from ---------------------------------------------------------------------

def test_import_and_export_hf_keep_the_tokenizer_files(flavour, tmp_path):
    _, tj, d, auto = flavour
    assert main(["import-hf", str(d), "--out", str(tmp_path / "native")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "native" / name).read_bytes() == (tj.parent / name).read_bytes()
    assert main(["export-hf", str(tmp_path / "native"), "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert not (out / "tokenizer.model").exists()
    for f in tj.parent.iterdir():
        if f.name != "generation_config.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    again = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert [auto_ids(again, t) for t in TEXTS] == [auto_ids(auto, t) for t in TEXTS]
    tok = Tokenizer(out / "tokenizer.json")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (tok.stop_ids, tok.stop_ids[0]) and gen["bos_token_id"] == tok.bos_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == gen["eos_token_id"]


def test_init_from_refuses_data_prepared_with_another_tokenizer(flavour, tmp_path, capsys):
    _, tj, d, _ = flavour
    rng = random.Random(3)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(40)))
    other = tmp_path / "other"  # the same vocabulary, other bytes: a different tokenizer to the checks
    shutil.copytree(tj.parent, other)
    (other / "tokenizer.json").write_text(json.dumps(json.loads(tj.read_text()), indent=1))
    for tokenizer, ok in ((other / "tokenizer.json", False), (tj, True)):
        data = tmp_path / f"data-{ok}"
        assert main(["data", "prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer),
                     "--out", str(data), "--no-quality", "--quiet"]) == 0
        run_dir = tmp_path / f"run-{ok}"
        run = tiny_run({"training.max_steps": 1, "training.global_batch_tokens": 64,
                        "checkpoint.export_final": ok}, drop=["model.preset"])
        code = main(["train", "--config", str(data_config(data, run_dir)), "--run-dir", str(run_dir),
                     "--init-from", str(d), *as_flags(run)])
        err = capsys.readouterr().err.strip()
        if ok:  # RUN_DIR/final carries the tokenizer files, and generate reads them
            assert code == 0, err
            for f in tj.parent.iterdir():
                assert (run_dir / "final" / f.name).read_bytes() == f.read_bytes(), f.name
            assert Tokenizer(run_dir / "final" / "tokenizer.json").stop_ids == Tokenizer(tj).stop_ids
        else:
            assert code == 2 and len(err.splitlines()) == 1 and "another tokenizer" in err, err
            assert not (tmp_path / "run-False").exists()


# -- export-gguf -------------------------------------------------------------------------------------

def test_export_gguf_writes_llama_cpp_gpt2_tokenizer(flavour, tmp_path):
    gguf = pytest.importorskip("gguf")
    name, tj, d, _ = flavour
    tok = Tokenizer(d / "tokenizer.json")
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(d), "--out", str(out)]) == 0
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"smollm": "smollm", "llama3": "llama-bpe"}[name]
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    merges = json.loads(tj.read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = fields["tokenizer.ggml.token_type"]
    kind = gguf.TokenType
    assert types[tok.encode("<|im_start|>", bos=False)[0]] == kind.CONTROL
    assert types[tok.encode("<custom>", bos=False)[0]] == kind.USER_DEFINED
    assert types[tok.encode("cat", bos=False)[0]] == kind.NORMAL
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] == (name == "llama3")


def test_export_gguf_refuses_a_pre_tokenizer_llama_cpp_does_not_know(flavour, tmp_path, capsys):
    _, tj, d, _ = flavour
    odd = tmp_path / "odd"
    shutil.copytree(d, odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, *spec["pre_tokenizer"]["pretokenizers"][1:]]}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(odd), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama.cpp knows no tokenizer like this one" in err, err
    assert "llama-bpe" in err and "smollm" in err and not out.exists()
