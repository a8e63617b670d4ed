"""The lm-evaluation-harness adapter (only when lm-eval is installed; it is an optional extra)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.api.model")


def test_adapter_registered_and_scores_like_the_harness(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import llama_pretrain.eval.lm_eval_adapter  # noqa: F401 - registers the model
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.eval.harness import load_lm
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer
    from llama_pretrain.tokenizer import train_tokenizer

    text = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and that is fine." for i in range(300)]
    sp = train_tokenizer(text, tmp_path / "tok.model", vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, max_seq_len=128)
    save_native(Transformer(cfg).state_dict(), cfg, tmp_path / "ckpt", tokenizer_model=sp)

    cls = get_model("llama-pretrain")
    lm = cls.create_from_arg_string(f"path={tmp_path / 'ckpt'}", {"batch_size": 4, "device": "cpu"})
    reqs = [("the number 4 is", " even"), ("the number 4 is", " odd")]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    ours = load_lm(str(tmp_path / "ckpt")).loglikelihood(reqs)
    assert [x[0] for x in lm.loglikelihood(inst)] == pytest.approx([x[0] for x in ours], abs=1e-5)
    gen = lm.generate_until([Instance("generate_until", {}, ("the number", {"until": ["."], "max_gen_toks": 8}), 0)])
    assert isinstance(gen[0], str) and "." not in gen[0]
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the number 3 is odd.",), 0)])
    assert roll[0] < 0
