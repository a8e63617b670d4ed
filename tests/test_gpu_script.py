"""The prepared GPU run of issue 17 (benchmarks/gpu_issue17.py), checked on the CPU with --smoke.

What needs CUDA there (compile on the GPU, CUDA graphs, max_memory_allocated, float8 matmuls) is
not run here; every other line of each part is. torchtitan and torchao are optional: their tests
skip where they are not installed (the project does not depend on them).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_issue17.py"


def smoke(tmp_path, *parts: str, timeout: float = 240) -> dict:
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path / "w"), "--out", str(out),
           "--parts", *parts]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["part"] for x in lines] == ["env", *parts, "summary"]
    return {x["part"]: x for x in lines}


def test_memory_and_7b_parts_run_on_cpu(tmp_path):
    res = smoke(tmp_path, "d_memory", "c_7b")
    assert res["summary"]["failed"] == []
    d = res["d_memory"]
    # ours and transformers start from different random weights but see the same tokens: both
    # losses near ln(vocab) for an untrained model, and checkpointing leaves ours unchanged
    for precision in ("fp32", "bf16-autocast"):
        ours = d["cases"][f"{precision}/ours/ac-none"]["loss"]
        assert d["cases"][f"{precision}/ours/ac-full"]["loss"] == pytest.approx(ours, abs=1e-5)
        assert abs(ours - d["cases"][f"{precision}/transformers/ac-none"]["loss"]) < 0.2
    c = res["c_7b"]
    assert c["activation_checkpointing"] == "full" and c["tokens_per_s"] > 0
    assert c["estimate_peak_bytes"] > 0


def _load_script():
    """benchmarks/gpu_issue17.py as a module, from its path (benchmarks/ is not on the import path)."""
    spec = importlib.util.spec_from_file_location(SCRIPT.stem, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import would (dataclasses need it)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None, reason="torchtitan not installed")
def test_torchtitan_config_matches_our_shape():
    from llama_pretrain.config import ModelConfig

    gpu_issue17 = _load_script()

    gpu_issue17._titan_on_cpu()
    cfg = ModelConfig.from_preset("llama2-1b")
    tc = gpu_issue17.titan_config(cfg, 4096, 8, 12, "/tmp/unused", compile=True, cuda_graphs=True)
    model = tc.model_spec.model
    layer = model.layers[0]
    assert (len(model.layers), model.dim, model.vocab_size) == (18, 2048, 32000)
    assert not model.enable_weight_tying
    assert layer.feed_forward.w1.out_features == cfg.hidden_dim == 5632  # Meta's Llama 2 rule
    assert layer.feed_forward.w2.in_features == 5632
    att = layer.attention
    assert (att.qkv_linear.n_heads, att.n_kv_heads, att.qkv_linear.head_dim) == (16, 8, 128)
    assert att.rope.theta == 10000.0 and att.rope.scaling == "none"
    assert tc.activation_checkpoint is None and tc.compile.enable
    assert (tc.training.local_batch_size, tc.training.seq_len) == (8, 4096)


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torchtitan", "torchao")),
                    reason="torchtitan / torchao not installed")
def test_every_part_runs_on_cpu(tmp_path):
    res = smoke(tmp_path, "a_ours", "b_titan", "d_memory", "c_7b", "e_float8", timeout=400)
    assert res["summary"]["failed"] == []
    b = res["b_titan"]
    assert b["params_match"] and b["params_torchtitan"] == b["params_ours"]
    assert b["flops_per_token"] > 0 and b["steps"] == 6
    assert res["a_ours"]["steps"] == 6 and "ratio_ours_to_torchtitan" in res["summary"]
    e = res["e_float8"]
    assert e["float8_layers"] == 14 and e["emulated"]  # 2 blocks x 7 linears
    assert 0 < e["max_abs_loss_diff"] < 0.05  # float8 changes the numbers, a little
