"""Hostile checkpoint files, the load side: each test is an attack that used to run code, exhaust
memory, score a broken model or end in a traceback, and must now be one UserError naming the file."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_pretrain import ModelConfig, Transformer, UserError
from llama_pretrain.interop import load_checkpoint, save_native
from llama_pretrain.interop.meta import save_meta
from llama_pretrain.interop.training_checkpoint import (METADATA_GLOBALS, SUMS_FILE, MetadataUnpickler,
                                                        payload_files, read_trainer_state, sha256_file)

from helpers.runs import as_overrides, tiny_run
from helpers.train_data import make_dataset

DEBUG = ModelConfig.from_preset("llama2-debug")


def run_config(data: Path, steps: int):
    from llama_pretrain.train.config import load_run_config
    items = tiny_run({"data.path": str(data), "training.max_steps": steps, "checkpoint.every_steps": 2})
    return load_run_config(None, as_overrides(items))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data")


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory) -> Path:
    from llama_pretrain.train.loop import train
    run = tmp_path_factory.mktemp("run") / "r"
    train(run_config(dataset, 2), run)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    shutil.copytree(trained_run, tmp_path / "r")
    return tmp_path / "r"


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "step-0000002"


def reseal(ckpt: Path) -> None:
    """Recompute SHA256SUMS, as anyone who can edit the files can."""
    (ckpt / SUMS_FILE).write_text("".join(f"{sha256_file(f)}  {f.relative_to(ckpt).as_posix()}\n"
                                          for f in payload_files(ckpt)))


# -- 1. code execution through DCP's .metadata ---------------------------------------------------
def _s(text: str) -> bytes:
    raw = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _stack_global(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + pickle.STACK_GLOBAL


FS, MD = "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.metadata"


def _payloads(cmd: str) -> dict[str, bytes]:
    """Opcodes that run ``cmd`` (or poison a module), to put in front of a real metadata pickle."""
    call = _s(cmd) + pickle.TUPLE1 + pickle.REDUCE + pickle.POP
    return {
        "stack_global+reduce": _stack_global(FS, "os.system") + call,
        "global+reduce": pickle.GLOBAL + f"{FS}\nos.system\n".encode() + call,
        "inst": pickle.MARK + _s(cmd) + pickle.INST + f"{FS}\nos.system\n".encode() + pickle.POP,
        "obj": pickle.MARK + _stack_global(FS, "os.system") + _s(cmd) + pickle.OBJ + pickle.POP,
        "nested dotted": _stack_global(MD, "torch.os.system") + call,
        "nested dotted 2": _stack_global(FS, "os.path.os.system") + call,
        # A whole module under an admitted prefix, its attributes then set by BUILD.
        "build": _stack_global(FS, "os") + pickle.NONE + pickle.EMPTY_DICT + _s("hostile_marker")
        + pickle.NEWTRUE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.POP,
    }


def plant(ckpt: Path, prefix: bytes) -> None:
    real = (ckpt / ".metadata").read_bytes()
    assert real[:2] == b"\x80\x04"
    (ckpt / ".metadata").write_bytes(real[:2] + prefix + real[2:])
    reseal(ckpt)


@pytest.mark.parametrize("variant", list(_payloads("x")))
def test_metadata_payload_runs_nothing(variant, run_copy, tmp_path):
    marker = tmp_path / "marker"
    plant(ckpt_of(run_copy), _payloads(f"touch {marker}")[variant])
    with pytest.raises(UserError, match="not allowed"):
        load_checkpoint(ckpt_of(run_copy))
    assert not marker.exists() and not hasattr(os, "hostile_marker")


def test_payload_planted_in_a_real_metadata_would_run(trained_run, tmp_path):
    """The control: an unrestricted unpickler runs the prefix and still returns the real metadata."""
    marker = tmp_path / "marker"
    data = (ckpt_of(trained_run) / ".metadata").read_bytes()
    planted = data[:2] + _payloads(f"touch {marker}")["stack_global+reduce"] + data[2:]
    assert type(pickle.loads(planted)).__name__ == "Metadata" and marker.exists()


def test_payload_through_export_hf_and_resume(dataset, run_copy, tmp_path):
    from llama_pretrain.cli import main as cli_main
    from llama_pretrain.train.loop import train

    marker = tmp_path / "marker"
    plant(ckpt_of(run_copy), _payloads(f"touch {marker}")["stack_global+reduce"])
    assert cli_main(["export-hf", str(ckpt_of(run_copy)), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="not allowed"):
        train(run_config(dataset, 4), run_copy)
    assert not marker.exists()


def test_real_metadata_needs_only_the_admitted_globals(trained_run):
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(ckpt_of(trained_run) / ".metadata", "rb") as fh:
        Recording(fh).load()
    assert seen <= METADATA_GLOBALS and not any("." in name for _, name in METADATA_GLOBALS)
    with pytest.raises(pickle.UnpicklingError):
        MetadataUnpickler(__import__("io").BytesIO(pickle.dumps(print))).load()


def _rewrite_metadata(ckpt: Path, edit) -> None:
    with open(ckpt / ".metadata", "rb") as fh:
        metadata = MetadataUnpickler(fh).load()
    edit(metadata)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata, protocol=4))
    reseal(ckpt)


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "missing.distcp"])
def test_metadata_pointing_outside_the_checkpoint(target, run_copy):
    def point_away(md):
        for info in md.storage_data.values():
            info.relative_path = target
    _rewrite_metadata(ckpt_of(run_copy), point_away)
    with pytest.raises(UserError, match="storage entry points"):
        load_checkpoint(ckpt_of(run_copy))


def test_metadata_claiming_more_than_its_files_hold(run_copy):
    def inflate(md):
        md.state_dict_metadata["model.norm.weight"].size = torch.Size([10 ** 9])
    _rewrite_metadata(ckpt_of(run_copy), inflate)
    with pytest.raises(UserError, match="model.norm.weight .* needs 4000000000 bytes"):
        load_checkpoint(ckpt_of(run_copy))


# -- 6. trainer_state.json ---------------------------------------------------------------------------
def _edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    edit(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    reseal(ckpt)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("identity"), "identity.model is missing"),
    (lambda s: s["rng"][0].update(torch=base64.b64encode(b"short").decode()), r"rng\[0\].torch is not a CPU RNG state"),
    (lambda s: s["rng"][0].update(torch=base64.b64encode(os.urandom(5056)).decode()), r"rng\[0\].torch is not"),
    (lambda s: s["rng"][0].update(torch="not base64!"), r"rng\[0\].torch is not"),
    (lambda s: s.update(rng=[]), "rng must be a list with one entry per rank"),
    (lambda s: s.update(step="2"), "step must be a non-negative integer"),
])
def test_broken_trainer_state_is_one_line(edit, message, run_copy):
    _edit_state(ckpt_of(run_copy), edit)
    with pytest.raises(UserError, match=message) as e:
        read_trainer_state(ckpt_of(run_copy))
    assert "trainer_state.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=message):
        load_checkpoint(ckpt_of(run_copy))


def test_bad_rng_state_fails_a_resume_before_training(dataset, run_copy):
    from llama_pretrain.train.loop import train
    _edit_state(ckpt_of(run_copy), lambda s: s["rng"][0].update(torch=base64.b64encode(b"x" * 5056).decode()))
    with pytest.raises(UserError, match="not a CPU RNG state"):
        train(run_config(dataset, 4), run_copy)


def test_identity_claiming_a_huge_model_is_refused_before_allocating(run_copy):
    _edit_state(ckpt_of(run_copy), lambda s: s["identity"]["model"].update(dim=65536, n_heads=256, n_layers=4096))
    r = limited(f"from llama_pretrain.interop import load_checkpoint; load_checkpoint({str(ckpt_of(run_copy))!r})")
    assert "tensors do not match the config" in r.stderr or "has shape" in r.stderr, r.stderr[-2000:]


def test_tampered_files_are_refused_before_the_trainer_state_is_read(run_copy):
    (ckpt_of(run_copy) / "trainer_state.json").write_text("{}")  # SHA256SUMS not recomputed
    with pytest.raises(UserError, match="damaged checkpoint"):
        load_checkpoint(ckpt_of(run_copy))


# -- 4. configs that disagree with their weights, under a memory limit -------------------------------
MEMORY_LIMIT = 1536 << 20  # torch alone maps ~650 MB; the attacks used to need several GB


def limited(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python whose address space is capped; a UserError exits 2 with one line."""
    script = ("import resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
              "from llama_pretrain.errors import UserError\n"
              "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
              "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr[-2000:])
    return r


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_native(Transformer(DEBUG).state_dict(), DEBUG, tmp_path_factory.mktemp("native") / "m")


def with_config(src: Path, dst: Path, **model) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    meta["model"].update(model)
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("fields,message", [
    (dict(n_layers=100_000), "model.n_layers must be at most 4096"),
    (dict(n_layers=10 ** 9), "model.n_layers must be at most"),
    (dict(dim=10 ** 9), "model.dim must be at most"),
    (dict(ffn_dim_multiplier=1e30), "model.ffn_dim_multiplier must be at most 64"),
    (dict(max_seq_len=10 ** 12), "model.max_seq_len must be at most"),
])
def test_oversized_config_fails_fast_in_little_memory(fields, message, native_dir, tmp_path):
    d = with_config(native_dir, tmp_path / "m", **fields)
    r = limited(f"from llama_pretrain.interop import load_model; load_model({str(d)!r})")
    assert message in r.stderr and ("config.json" in r.stderr or "model.safetensors" in r.stderr), r.stderr


def test_long_context_generates_without_a_context_sized_rope_table(native_dir, tmp_path):
    d = with_config(native_dir, tmp_path / "m", max_seq_len=1 << 24)  # 1.5 GB of fp32 tables up front
    code = ("from llama_pretrain.interop import load_model\n"
            "from llama_pretrain.generate import generate_ids\n"
            f"m = load_model({str(d)!r})\n"
            "assert len(generate_ids(m, [1, 5, 7], max_new_tokens=3)) == 3\n"
            "raise UserError('done: ' + str(m.rope_cos.shape[0]))")
    assert "done: 4096" in limited(code).stderr


@pytest.mark.parametrize("text,message", [
    ('{"format": "llama-pretrain", "model": [1, 2]}', "model must be a JSON object"),
    ('{"format": "llama-pretrain", "model": {"ffn_dim_multiplier": Infinity}}', "must be finite"),
])
def test_malformed_native_config_is_one_line(text, message, native_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(native_dir, d)
    (d / "config.json").write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(d)
    assert "config.json" in str(e.value)


# -- 5. weights that are not floating point and finite -------------------------------------------------
@pytest.mark.parametrize("poison,message", [
    (lambda sd: sd.update({k: torch.full_like(v, float("nan")) for k, v in sd.items()}), "NaN or infinite"),
    (lambda sd: sd["norm.weight"].__setitem__(3, float("inf")), "norm.weight holds NaN or infinite"),
    (lambda sd: sd.update({k: torch.zeros(v.shape, dtype=torch.int32) for k, v in sd.items()}), "not floating point"),
])
def test_non_float_or_non_finite_weights_are_refused(poison, message, tmp_path):
    sd = Transformer(DEBUG).state_dict()
    poison(sd)
    with pytest.raises(UserError, match=message):
        load_checkpoint(save_native(sd, DEBUG, tmp_path / "native"))
    with pytest.raises(UserError, match=message):
        load_checkpoint(save_meta(sd, DEBUG, tmp_path / "meta"))


# -- 6. Meta shards that disagree -----------------------------------------------------------------------
def _meta_two_shards(tmp_path: Path, edit_second) -> Path:
    sd = Transformer(DEBUG).state_dict()
    d = save_meta(sd, DEBUG, tmp_path / "meta")
    second = {k: v.clone() for k, v in sd.items()}
    edit_second(second)
    torch.save(second, d / "consolidated.01.pth")
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("norm.weight"), "holds other tensors than consolidated.00.pth"),
    (lambda sd: sd.update({"layers.0.attention.wq.weight": torch.zeros(64, 65)}), "shards disagree on the shape"),
    (lambda sd: sd.update({"norm.weight": torch.zeros(65)}), "shards disagree on the shape of 'norm.weight'"),
    (lambda sd: sd.update({"norm.weight": 3}), "entry 'norm.weight' is a int, not a tensor"),
])
def test_disagreeing_meta_shards_are_one_line(edit, message, tmp_path):
    d = _meta_two_shards(tmp_path, edit)
    with pytest.raises(UserError, match=message):
        load_checkpoint(d)


# -- 6. eval on an HF dir whose config is broken ---------------------------------------------------------
@pytest.mark.parametrize("patch,message", [
    ({"hidden_size": [64]}, "config.json: head_dim 16 x 4 heads != hidden_size"),
    ({"num_attention_heads": 0}, "config.json: head_dim"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_attention_heads": 0},
     "cannot load .* with transformers"),  # not ours to read: transformers raises ZeroDivisionError
    ({"num_hidden_layers": 4000}, "tensors do not match the config"),
])
def test_eval_on_broken_hf_dir_is_one_line(patch, message, tmp_path):
    from llama_pretrain.eval.harness import load_lm
    from llama_pretrain.interop import save_hf

    d = save_hf(Transformer(DEBUG).state_dict(), DEBUG, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(patch)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message) as e:
        load_lm(str(d))
    assert "\n" not in str(e.value)
