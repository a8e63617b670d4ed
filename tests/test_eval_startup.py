"""What `eval` does before it scores: loading a checkpoint for inference stays cheap and exact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llama_pretrain.config import ModelConfig
from llama_pretrain.errors import UserError
from llama_pretrain.interop import load_model, save_native
from llama_pretrain.interop.checks import check_weights
from llama_pretrain.model import Transformer


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=300, tie_embeddings=True)
    model = Transformer(cfg).eval()
    d = tmp_path_factory.mktemp("tied")
    save_native({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, cfg, d)
    return model, d


def test_load_model_uses_the_checkpoint_tensors_tied_and_in_the_model_dtype(tied):
    model, d = tied
    got = load_model(d)
    assert got.output.weight is got.tok_embeddings.weight  # one Parameter, as Transformer makes it
    assert {p.dtype for p in got.parameters()} == {torch.float32}  # a bf16 checkpoint read as fp32
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    tokens = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        ref = Transformer(model.config).eval()
        ref.load_state_dict(want)
        assert torch.equal(got(tokens), ref(tokens))
    assert load_model(d, dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16


def test_loading_a_model_imports_neither_dynamo_nor_dtensor(tied):
    """Both cost about a second of start-up and inference needs neither."""
    code = ("import sys; from llama_pretrain.interop import load_model; "
            f"m = load_model({str(tied[1])!r}); m(__import__('torch').tensor([[1, 2]])); "
            "print(sorted(k for k in ('torch._dynamo', 'torch.distributed.tensor') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_check_finds_any_nan_or_infinity(dtype, bad):
    t = torch.randn(64, 8).to(dtype)
    check_weights({"w": t, "empty": torch.empty(0)}, "ckpt")
    t[37, 5] = bad
    with pytest.raises(UserError, match="w holds NaN or infinite"):
        check_weights({"w": t}, "ckpt")


def test_eval_reads_a_checkpoint_tokenizer_once_and_refuses_a_broken_one(tied, tmp_path, monkeypatch):
    import shutil

    from llama_pretrain.eval import tokenization
    from llama_pretrain.tokenizer import Tokenizer

    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    d = tmp_path / "ckpt"
    shutil.copytree(tied[1], d)
    shutil.copyfile(tmp_path / "sp.model", d / "tokenizer.model")
    seen = []
    real = Tokenizer.__init__

    def counting(self, path):
        seen.append(path)
        real(self, path)
    monkeypatch.setattr(Tokenizer, "__init__", counting)
    tok = tokenization.load_tokenizer(d, native=True)
    assert tok.encode("the fox") and len(seen) == 1
    (d / "tokenizer.model").write_bytes(b"not a tokenizer")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        tokenization.load_tokenizer(d, native=True)
