"""`export-gguf`: read back with gguf's own reader, and (slow, when a build is given) run by llama.cpp.

The slow test needs llama.cpp's `llama-simple` and `llama-perplexity` in the directory named by
LLAMA_CPP_BIN (built from the llama-cpp-python sdist, BENCHMARKS.md says how); LLAMA_CPP_CKPT may
name the checkpoint to compare (default: a tiny model trained here for a few seconds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llama_pretrain.config import ModelConfig  # noqa: E402
from llama_pretrain.interop import load_checkpoint, save_hf, save_native  # noqa: E402
from llama_pretrain.model import Transformer  # noqa: E402
from llama_pretrain.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

from helpers.train_data import fit_on_tokens  # noqa: E402

TEXT = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and that is fine." for i in range(300)]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_pretrain", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=320, progress=False)


def _ckpt(path: Path, tok, cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_native(model.state_dict(), cfg, path, tokenizer_model=tok)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, max_seq_len=128)
    return _ckpt(tmp_path_factory.mktemp("gguf") / "ckpt", tok, cfg)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (GGML type, float32 array in torch's shape))."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest dimension first
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = (t.tensor_type, values.astype(np.float32))
    return fields, tensors


LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
         "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
         "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def llama_cpp_name(ours: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if ours in top:
        return top[ours]
    _, i, rest = ours.split(".", 2)
    return f"blk.{i}.{LAYER[rest.removesuffix('.weight')]}.weight"


def _expected(w: torch.Tensor, qtype) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    cast = {q.F32: torch.float32, q.F16: torch.float16, q.BF16: torch.bfloat16}
    return w.to(cast[qtype]).float().numpy() if qtype in cast else None


def check_tensor(name: str, w: torch.Tensor, qtype, got: np.ndarray) -> None:
    assert got.shape == tuple(w.shape), name
    want = _expected(w, qtype)
    if want is not None:  # f32, f16, bf16: exactly the rounded checkpoint
        assert np.array_equal(got, want), name
        return
    assert qtype == gguf.GGMLQuantizationType.Q8_0, name
    # q8_0: blocks of 32 values, int8 steps of max|x|/127 stored as f16 (whose rounding, times up
    # to 127 steps, adds at most 127 * 2^-11 of a step)
    blocks = w.float().numpy().reshape(-1, 32)
    err = np.abs(got.reshape(-1, 32) - blocks)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert (err <= step * (0.5 + 127 * 2**-11) + 1e-8).all(), name
    assert err.max() > 0, name  # really quantized


def check_metadata(fields: dict, cfg: ModelConfig, tok_path: Path, file_type: int) -> None:
    sp = Tokenizer(tok_path).sp
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == file_type
    want = {"llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
            "llama.feed_forward_length": cfg.hidden_dim, "llama.block_count": cfg.n_layers,
            "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.kv_heads,
            "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": True}
    assert {k: fields[k] for k in want} == want
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)
    n = sp.get_piece_size()
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    T = gguf.TokenType
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == T.UNKNOWN and types[1] == types[2] == T.CONTROL
    assert set(types[3:259]) == {T.BYTE} and set(types[259:]) == {T.NORMAL}
    assert "padding_token_id" not in " ".join(fields)  # Llama's tokenizer has no pad piece


FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_read_back_every_tensor_and_field(ckpt, tok, tmp_path, dtype):
    """Each tensor under llama.cpp's name, its shape and values (rounded as --dtype says, norms f32)
    and every hyperparameter and vocabulary entry, as gguf's own reader sees them."""
    out = tmp_path / "m.gguf"
    r = cli("export-gguf", ckpt, "--out", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    fields, tensors = read_gguf(out)
    cfg, state, _ = load_checkpoint(ckpt)
    check_metadata(fields, cfg, tok, FILE_TYPES[dtype])
    assert set(tensors) == {llama_cpp_name(k) for k in state}
    for name, w in state.items():
        qtype, got = tensors[llama_cpp_name(name)]
        if name.endswith("norm.weight"):
            assert qtype == gguf.GGMLQuantizationType.F32, name
        else:
            assert qtype.name == dtype.upper(), name
        check_tensor(name, w, qtype, got)


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path, tok):
    """As llama.cpp's converter does: a 48-wide row cannot be cut into 32-value blocks."""
    cfg = ModelConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=64)
    ckpt = _ckpt(tmp_path / "ckpt", tok, cfg)
    assert cli("export-gguf", ckpt, "--out", tmp_path / "m.gguf", "--dtype", "q8_0").returncode == 0
    _, tensors = read_gguf(tmp_path / "m.gguf")
    state = load_checkpoint(ckpt)[1]
    q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"][0] == q.F16
    assert tensors["blk.0.ffn_down.weight"][0] == q.Q8_0  # rows of hidden_dim = 128
    for name, w in state.items():
        check_tensor(name, w, *tensors[llama_cpp_name(name)])


def test_q_and_k_are_what_llama_cpp_converter_makes_of_the_hf_export(ckpt, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) turns HF's q/k rows back into the
    interleaved RoPE layout of its llama architecture; our file must hold exactly that."""
    from safetensors.torch import load_file

    cfg, state, _ = load_checkpoint(ckpt)
    save_hf(state, cfg, tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))

    def converter_permute(w, n_head):  # the converter's formula, for heads of this projection
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    assert cli("export-gguf", ckpt, "--out", tmp_path / "m.gguf").returncode == 0
    _, tensors = read_gguf(tmp_path / "m.gguf")
    for i in range(cfg.n_layers):
        q = converter_permute(hf[f"model.layers.{i}.self_attn.q_proj.weight"], cfg.n_heads)
        k = converter_permute(hf[f"model.layers.{i}.self_attn.k_proj.weight"], cfg.kv_heads)
        assert np.array_equal(tensors[f"blk.{i}.attn_q.weight"][1], q.numpy())
        assert np.array_equal(tensors[f"blk.{i}.attn_k.weight"][1], k.numpy())


def test_errors_are_one_line_and_write_nothing(ckpt, tmp_path, tok):
    cfg, state, _ = load_checkpoint(ckpt)
    save_native(state, cfg, tmp_path / "no_tok")
    out = tmp_path / "m.gguf"
    r = cli("export-gguf", tmp_path / "no_tok", "--out", out)
    assert r.returncode == 2 and "pass --tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = train_tokenizer(TEXT, tmp_path / "other.model", vocab_size=300, progress=False)
    r = cli("export-gguf", ckpt, "--out", out, "--tokenizer", other)
    assert r.returncode == 2 and "300 pieces" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    out.write_bytes(b"old")
    r = cli("export-gguf", ckpt, "--out", out)
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"old"
    assert cli("export-gguf", ckpt, "--out", tmp_path).returncode == 2  # a directory


def test_a_failed_write_leaves_the_previous_file(ckpt, tmp_path, monkeypatch):
    """Killed half-way through the tensors: no partial file under the name, the old one intact."""
    from llama_pretrain.interop.gguf import save_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    cfg, state, _ = load_checkpoint(ckpt)
    real, calls = gguf.quants.quantize, []

    def failing(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(5, "Input/output error")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError):
        save_gguf(state, cfg, out, ckpt / "tokenizer.model")
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ----------------------------------------------------------------------------------- llama.cpp itself

def _llama_cpp_bin() -> Path:
    where = os.environ.get("LLAMA_CPP_BIN")
    if not where:
        pytest.skip("LLAMA_CPP_BIN is not set (a dir with llama.cpp's llama-simple and llama-perplexity)")
    for tool in ("llama-simple", "llama-perplexity"):
        if not (Path(where) / tool).is_file():
            pytest.skip(f"LLAMA_CPP_BIN={where} has no {tool}")
    return Path(where)


def _trained_ckpt(path: Path, tok) -> Path:
    """llama2-debug trained for a few seconds on TEXT, so greedy text is not a tie-break lottery."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, max_seq_len=128)
    model = Transformer(cfg)
    ids = torch.tensor(sum((Tokenizer(tok).encode(t) for t in TEXT), []))
    fit_on_tokens(model, ids, 150)
    save_native(model.state_dict(), cfg, path, tokenizer_model=tok)
    return path


def llama_cpp_perplexity(model: Transformer, ids: list[int], n_ctx: int, bos: int) -> float:
    """Perplexity the way llama-perplexity computes it: the text with BOS in front cut into
    n_ctx-token chunks, each chunk's first token replaced by BOS, only the second half scored."""
    nll, count, first = 0.0, 0, n_ctx // 2
    for c in range(len(ids) // n_ctx):
        chunk = torch.tensor([bos] + ids[c * n_ctx + 1:(c + 1) * n_ctx])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).double()[0], dim=-1)
        targets = chunk[first + 1:]
        nll -= logp[first:-1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return float(np.exp(nll / count))


def _run(cmd: list) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd[0]} exited {r.returncode}: {r.stderr[-2000:]}"
    return r


def llama_cpp_reported_perplexity(bin_dir: Path, gguf: Path, text_file: Path, n_ctx: int) -> float:
    """llama-perplexity's final estimate. Its logger writes from a thread that can lose the last
    lines at exit (seen here: 1 run in 3 ends after chunk 3 of 4, exit 0), so a run without the
    final line is repeated."""
    for _ in range(5):
        r = _run([bin_dir / "llama-perplexity", "-m", gguf, "-f", text_file, "-c", n_ctx, "-b", n_ctx, "-nr"])
        log = r.stdout + r.stderr
        final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        if final:
            return float(final.group(1))
        # the running estimate after the last chunk is the final one, when that chunk's line came
        total = re.search(r"perplexity over (\d+) chunks", log)
        chunks = dict((int(i), float(v)) for i, v in re.findall(r"\[(\d+)\]([0-9.]+)", log))
        if total and int(total.group(1)) in chunks:
            return chunks[int(total.group(1))]
    raise AssertionError(f"llama-perplexity never printed its final estimate: {(r.stdout + r.stderr)[-1500:]}")


@pytest.mark.slow
def test_llama_cpp_generates_our_text_and_perplexity(tmp_path, tok):
    from llama_pretrain.generate import generate
    from llama_pretrain.interop import find_tokenizer, load_model

    bin_dir = _llama_cpp_bin()
    ckpt = Path(os.environ.get("LLAMA_CPP_CKPT") or _trained_ckpt(tmp_path / "ckpt", tok))
    model, tokenizer = load_model(ckpt), Tokenizer(find_tokenizer(ckpt))
    prompt = os.environ.get("LLAMA_CPP_PROMPT", "the number 12 is")
    text_file = Path(os.environ.get("LLAMA_CPP_TEXT") or tmp_path / "text.txt")
    if not text_file.exists():
        text_file.write_text(" ".join(TEXT[::7]))
    n_ctx = min(128, model.config.max_seq_len)
    ours_text = generate(model, tokenizer, prompt, max_new_tokens=32)
    ids = tokenizer.encode(text_file.read_text())
    ours_ppl = llama_cpp_perplexity(model, ids, n_ctx, tokenizer.bos_id)
    for dtype, rel in (("f32", 1e-4), ("q8_0", 2e-2)):
        gg = tmp_path / f"m-{dtype}.gguf"
        assert cli("export-gguf", ckpt, "--out", gg, "--dtype", dtype).returncode == 0
        ppl = llama_cpp_reported_perplexity(bin_dir, gg, text_file, n_ctx)
        print(f"\n{dtype}: perplexity ours {ours_ppl:.6f}, llama.cpp {ppl:.6f}, rel {abs(ppl / ours_ppl - 1):.2e}")
        assert ppl == pytest.approx(ours_ppl, rel=rel)
        if dtype != "f32":
            continue  # llama-simple has no -nr: its AMX repacking of quantised weights crashes on these CPUs
        # llama-simple prints the prompt's pieces (BOS included), the continuation, then a newline
        out = _run([bin_dir / "llama-simple", "-m", gg, "-n", 32, prompt]).stdout
        # llama-simple renders a generated control token (BOS starts each new document in this
        # corpus) as its text "<s>"; sentencepiece's decode, and so ours, renders it as nothing
        theirs = out.split(prompt, 1)[1].removesuffix("\n").replace("<s>", "")
        print(f"{dtype}: ours {ours_text!r}\n{dtype}: llama.cpp {theirs!r}")
        assert theirs == ours_text
