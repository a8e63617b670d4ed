"""Hostile model directories (Hugging Face, Meta, ours): each test is an attack through what a
command reads from the directory that used to run its code, copy a private file out, mix or drop
weights silently, exhaust memory, hang, or end in a traceback; now each is one line, exit 2."""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_pretrain import ModelConfig, Transformer, UserError
from llama_pretrain.cli import main
from llama_pretrain.interop import load_checkpoint, save_hf, save_native
from llama_pretrain.interop.hf import hf_config_dict

CFG = ModelConfig.from_preset("llama2-debug", vocab_size=320)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    from llama_pretrain.tokenizer import train_tokenizer

    text = [f"the {c} sky number {i} is blue and red" for i in range(300) for c in ("blue", "red")]
    return train_tokenizer(text, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=320, progress=False)


@pytest.fixture(scope="module")
def hf_src(sp_model, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_hf(Transformer(CFG).state_dict(), CFG, tmp_path_factory.mktemp("hf") / "m", tokenizer_model=sp_model)


@pytest.fixture
def hf_dir(hf_src, tmp_path) -> Path:
    return Path(shutil.copytree(hf_src, tmp_path / "hf"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "piqa").mkdir()
    (d / "piqa" / "validation.jsonl").write_text(
        "".join(json.dumps({"goal": f"q{i}", "sol1": "a", "sol2": "b", "label": 0}) + "\n" for i in range(2)))
    return d


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def one_line_error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- 2. code shipped with the model ----------------------------------------------------------------
def plant_code(d: Path, where: str, marker: Path) -> None:
    """An ``auto_map`` to a module of the dir that leaves ``marker`` when imported. transformers asks
    before running it only when it has no class of its own for the config (hence no model_type /
    tokenizer_class), and takes a "y" on stdin as consent."""
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig): model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM): config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast): pass\n")
    if where == "config":
        edit_json(d / "config.json", model_type="evil",
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        edit_json(d / "tokenizer_config.json", tokenizer_class=None,
                  auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})


@pytest.mark.parametrize("where,backend", [("config", ["--backend", "hf"]), ("tokenizer_config", [])])
def test_eval_never_runs_a_module_named_by_auto_map(where, backend, hf_dir, data_dir, tmp_path):
    marker = tmp_path / "MARKER"
    plant_code(hf_dir, where, marker)
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", "eval", str(hf_dir), "--tasks", "piqa",
                        "--data-dir", str(data_dir), *backend], input="y\n" * 5, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    err = [line for line in r.stderr.splitlines() if line.startswith("llama-pretrain")]
    assert r.returncode == 2 and len(err) == 1 and "auto_map" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where,backend,as_tokenizer", [("config", "auto", False), ("tokenizer_config", "hf", False),
                                                        ("tokenizer_config", "native", True)])
def test_auto_map_is_refused_before_anything_is_loaded(where, backend, as_tokenizer, hf_dir, sp_model,
                                                       tmp_path, monkeypatch):
    from llama_pretrain.eval.harness import load_lm

    monkeypatch.setattr("builtins.input", lambda *_: "y")  # whoever answers transformers' question
    marker = tmp_path / "MARKER"
    plant_code(hf_dir, where, marker)
    model = save_native(Transformer(CFG).state_dict(), CFG, tmp_path / "ours", sp_model) if as_tokenizer else hf_dir
    with pytest.raises(UserError, match="auto_map names code shipped with the model"):
        load_lm(str(model), backend=backend, tokenizer=str(hf_dir) if as_tokenizer else None)
    assert not marker.exists()


def test_a_peft_adapter_is_refused(hf_dir):
    from llama_pretrain.eval.harness import load_lm

    (hf_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/model"}))
    with pytest.raises(UserError, match="adapter_config.json: a PEFT adapter"):
        load_lm(str(hf_dir))


# -- 3. files taken from the model dir -----------------------------------------------------------------
def test_import_hf_copies_no_file_from_outside_the_dir(hf_dir, sp_model, tmp_path, capsys):
    secret = tmp_path / "private" / "tokenizer.model"  # a private tokenizer: even a valid one stays put
    secret.parent.mkdir()
    shutil.copyfile(sp_model, secret)
    secret.chmod(0o600)
    (hf_dir / "tokenizer.model").unlink()
    (hf_dir / "tokenizer.model").symlink_to(secret)
    err = one_line_error(capsys, "import-hf", hf_dir, "--out", tmp_path / "out")
    assert "tokenizer.model: a symlink to" in err and "outside" in err and not (tmp_path / "out").exists()
    # The Hugging Face cache's layout still loads: a snapshot's links into the model's own blobs.
    cache = tmp_path / "models--org--tiny"
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in hf_dir.iterdir() if not p.is_symlink())):
        shutil.copyfile(f, cache / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    (snapshot / "tokenizer.model").symlink_to(Path("../../blobs") / "tok")
    shutil.copyfile(sp_model, cache / "blobs" / "tok")
    assert main(["import-hf", str(snapshot), "--out", str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "tokenizer.model").read_bytes() == sp_model.read_bytes()


@pytest.mark.parametrize("command", ["import-hf", "export-hf"])
def test_a_tokenizer_model_that_is_not_sentencepiece_is_one_line(command, hf_dir, tmp_path, capsys):
    src = hf_dir if command == "import-hf" else save_native(Transformer(CFG).state_dict(), CFG, tmp_path / "ours")
    (src / "tokenizer.model").write_bytes(b"not a tokenizer")
    err = one_line_error(capsys, command, src, "--out", tmp_path / "out")
    assert "tokenizer.model: not a SentencePiece model" in err and not (tmp_path / "out").exists()


# -- 4. exactly the weights the directory names -----------------------------------------------------
def test_a_stray_safetensors_file_is_never_read(hf_dir):
    import transformers

    head = load_file(hf_dir / "model.safetensors")["lm_head.weight"]
    save_file({"lm_head.weight": torch.zeros_like(head)}, hf_dir / "zz-stale.safetensors")
    _, state, _ = load_checkpoint(hf_dir)
    assert torch.equal(state["output.weight"], head)
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir, trust_remote_code=False, local_files_only=True)
    assert torch.equal(theirs.lm_head.weight.detach(), state["output.weight"])  # both read the same file


def shard(d: Path) -> dict:
    """Split model.safetensors into two shards and an index, as save_pretrained does; returns the index."""
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in parts.items():
        save_file({n: state[n] for n in part}, d / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def _duplicate_into_second_shard(d: Path, index: dict) -> None:
    second = d / "model-00002-of-00002.safetensors"
    name = next(n for n, f in index["weight_map"].items() if f != second.name)
    state = load_file(second)
    state[name] = torch.zeros_like(load_file(d / index["weight_map"][name])[name])
    save_file(state, second)


def _index_naming(file: str):
    def edit(d: Path, index: dict) -> None:
        index["weight_map"][next(iter(index["weight_map"]))] = file
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


@pytest.mark.parametrize("edit,message", [
    (_duplicate_into_second_shard, "holds other tensors than the index names for it"),
    (_index_naming("../elsewhere.safetensors"), "expected a .safetensors file name in this directory"),
    (_index_naming("model-00003-of-00002.safetensors"), "model-00003-of-00002.safetensors: no such file"),
])
def test_weights_the_index_does_not_name_are_refused(edit, message, hf_dir):
    index = shard(hf_dir)
    edit(hf_dir, index)
    with pytest.raises(UserError, match=message):
        load_checkpoint(hf_dir)


def test_a_shard_the_index_does_not_name_is_never_read(hf_dir):
    head = load_file(hf_dir / "model.safetensors")["lm_head.weight"]
    shard(hf_dir)
    save_file({"lm_head.weight": torch.zeros_like(head)}, hf_dir / "model-00003-of-00003.safetensors")
    assert torch.equal(load_checkpoint(hf_dir)[1]["output.weight"], head)


def mistral_dir(d: Path) -> Path:
    import transformers

    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
    transformers.MistralForCausalLM(cfg).save_pretrained(d)
    return d


def _only_the_head(d: Path) -> None:
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save({"lm_head.weight": state["lm_head.weight"]}, d / "pytorch_model.bin")


def _extra_tensor(d: Path) -> None:
    state = load_file(d / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(4)}, d / "model.safetensors")


@pytest.mark.parametrize("arch,edit,message", [
    ("llama", _only_the_head, "tensors do not match the config"),  # the .bin's shapes, before transformers
    ("mistral", _only_the_head, "lacks 20 of the model's weights"),  # transformers' loading report
    ("mistral", _extra_tensor, "holds 1 tensors the model does not have .model.extra.weight"),
])
def test_transformers_backend_refuses_a_partly_random_model(arch, edit, message, hf_dir, sp_model, tmp_path):
    from llama_pretrain.eval.harness import load_lm

    d = hf_dir if arch == "llama" else mistral_dir(tmp_path / "mistral")
    edit(d)
    with pytest.raises(UserError, match=message):
        load_lm(str(d), tokenizer=str(sp_model))


def _expanded(state: dict) -> dict:
    """Every tensor a stride-0 view of one element: a file of a few bytes per tensor."""
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in state.items()}


def _aliased(state: dict) -> dict:
    """Every layer's tensors the same storage as layer 0's."""
    return {k: state[k.replace(k.split(".")[2], "0", 1)] if k.startswith("model.layers.") else v
            for k, v in state.items()}


@pytest.mark.parametrize("edit,message", [(_expanded, "is not backed by its storage"),
                                          (_aliased, "tensors share bytes")])
def test_bin_tensors_must_be_backed_by_the_file(edit, message, hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    torch.save(state, hf_dir / "pytorch_model.bin")
    expected = load_checkpoint(hf_dir)[1]  # the .bin as torch.save writes it reads as the safetensors did
    torch.save(edit(state), hf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=message):
        load_checkpoint(hf_dir)
    assert set(expected) == set(Transformer(CFG).state_dict())


# -- 4. the same attacks in little memory, and files that are not files ----------------------------
MEMORY_LIMIT = 1536 << 20  # torch alone maps ~650 MB; the attacks needed several GB


def limited(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python whose address space is capped; a UserError exits 2 with one line."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    script = ("import sys\nfrom llama_pretrain.errors import UserError\ntry:\n"
              + "".join(f"    {line}\n" for line in code.splitlines())
              + "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=cap, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = [line for line in r.stderr.splitlines() if "Loading weights" not in line]
    assert r.returncode == 2 and len(err) == 1, (r.returncode, r.stderr[-2000:])
    return r


def test_a_tiny_bin_with_a_70b_config_is_refused_before_transformers_allocates(hf_dir, sp_model):
    (hf_dir / "model.safetensors").unlink()
    torch.save({}, hf_dir / "pytorch_model.bin")
    (hf_dir / "config.json").write_text(json.dumps(hf_config_dict(ModelConfig.from_preset("llama2-70b"))))
    r = limited("from llama_pretrain.eval.harness import load_lm\n"
                f"load_lm({str(hf_dir)!r}, tokenizer={str(sp_model)!r})")
    assert "tensors do not match the config" in r.stderr


def test_a_stride_zero_bin_claiming_a_7b_model_is_refused_in_little_memory(hf_dir):
    big = ModelConfig.from_preset("llama2-7b")
    from llama_pretrain.interop.checks import expected_shapes
    from llama_pretrain.interop.hf import to_hf_state_dict

    meta = to_hf_state_dict({k: torch.empty(s, device="meta") for k, s in expected_shapes(big).items()}, big)
    (hf_dir / "model.safetensors").unlink()
    torch.save(_expanded(meta), hf_dir / "pytorch_model.bin")
    (hf_dir / "config.json").write_text(json.dumps(hf_config_dict(big)))
    r = limited(f"from llama_pretrain.interop import load_model\nload_model({str(hf_dir)!r})")
    assert "is not backed by its storage" in r.stderr


class _Storage:
    pass


class _Tensor:
    def __init__(self, storage, numel):
        self.storage, self.numel = storage, numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict())


class _Deflated:
    """zipfile's compressor for the bomb: 16 MB of zeros deflate to the same bytes after every full
    flush, so 1.3 GB of them are written without compressing 1.3 GB."""

    chunk = bytes(16 << 20)
    _c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = _c.compress(chunk) + _c.flush(zlib.Z_FULL_FLUSH)

    def compress(self, data: bytes) -> bytes:
        assert data == self.chunk
        return self.block

    def flush(self) -> bytes:
        return zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def deflate_bomb(path: Path, chunks: int = 82) -> None:
    """A torch.save-layout zip (about 1.3 MB) whose one storage, deflated, is 1.3 GB of zeros."""
    storage, numel = _Storage(), chunks * len(_Deflated.chunk) // 4

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    pkl = __import__("io").BytesIO()
    Pickler(pkl, protocol=2).dump({"model.embed_tokens.weight": _Tensor(storage, numel)})
    original = zipfile._get_compressor
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        zipfile._get_compressor = lambda *_: _Deflated()
        try:
            with z.open(info, "w") as fh:
                for _ in range(chunks):
                    fh.write(_Deflated.chunk)
        finally:
            zipfile._get_compressor = original


@pytest.mark.parametrize("load", ["from llama_pretrain.interop import load_checkpoint\nload_checkpoint({d!r})",
                                  "from llama_pretrain.eval.harness import load_lm\nload_lm({d!r}, tokenizer={tok!r})"])
def test_a_deflate_bomb_bin_is_refused_before_it_is_inflated(load, hf_dir, sp_model):
    (hf_dir / "model.safetensors").unlink()
    deflate_bomb(hf_dir / "pytorch_model.bin")
    assert (hf_dir / "pytorch_model.bin").stat().st_size < 2 << 20
    r = limited(load.format(d=str(hf_dir), tok=str(sp_model)), timeout=60)
    assert "pytorch_model.bin: member 'archive/data/0' is compressed" in r.stderr


@pytest.mark.parametrize("name,command", [("model.safetensors", "import-hf"), ("pytorch_model.bin", "generate")])
def test_a_fifo_for_weights_is_one_line_not_a_hang(name, command, hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    os.mkfifo(hf_dir / name)
    args = ["--out", str(tmp_path / "out")] if command == "import-hf" else ["--prompt", "the sky"]
    r = limited(f"from llama_pretrain.cli import main\nsys.exit(main({[command, str(hf_dir), *args]!r}))", timeout=60)
    assert f"{name}: not a regular file" in r.stderr and not (tmp_path / "out").exists()


# -- 6. JSON nested too deep, tokenizers of unknown kinds ------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


def _deep_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "x": ' + DEEP + "}")


def _deep_native_config(d: Path) -> None:
    (d / "config.json").write_text('{"format": "llama-pretrain", "model": ' + DEEP + "}")


def _deep_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"model": ' + DEEP + "}")


def _unknown_tokenizer_model(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["type"] = "Evil"
    (d / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("edit,load,message", [
    (_deep_config, "checkpoint", "config.json is not valid JSON: nested deeper than Python can parse"),
    (_deep_native_config, "checkpoint", "config.json is not valid JSON: nested deeper than Python can parse"),
    (_deep_tokenizer, "lm", "cannot load a tokenizer from .*RecursionError"),
    (_unknown_tokenizer_model, "lm", "cannot load a tokenizer from"),
])
def test_nested_or_unknown_json_is_one_line(edit, load, message, hf_dir):
    from llama_pretrain.eval.harness import load_lm

    edit(hf_dir)
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(hf_dir) if load == "checkpoint" else load_lm(str(hf_dir))
    assert "\n" not in str(e.value)
