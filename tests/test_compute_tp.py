"""`plan --tp`: memory, tensor-parallel and FSDP traffic and layouts, by independent arithmetic."""

import json

import pytest

from llama_pretrain.cli import main
from llama_pretrain.compute.flops import flops_per_token, param_counts
from llama_pretrain.compute.gpus import get_gpu
from llama_pretrain.compute.memory import tp_local_params, training_memory
from llama_pretrain.compute.plan import (NVLINK_EFFICIENCY, comm_step, get_interconnect, plan,
                                         tp_comm_step)
from llama_pretrain.config import ModelConfig

A100 = get_gpu("a100-80gb")
FP32 = dict(param_dtype="fp32", compute_dtype="fp32")  # no mixed-precision gather buffers


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_tp_local_params_match_a_real_model():
    from llama_pretrain.model import Transformer

    cfg = ModelConfig.from_preset("llama2-debug")
    model = Transformer(cfg)
    for tp in (1, 2):
        # every matrix split over tp, the RMSNorm weights whole on each rank
        held = sum(p.numel() if "norm" in name else p.numel() / tp for name, p in model.named_parameters())
        assert tp_local_params(cfg, tp) == held


def test_model_states_halved_at_tp2_and_equal_at_same_world():
    cfg = ModelConfig.from_preset("llama2-70b")
    P = param_counts(cfg).total
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    dp = 16
    tp1 = training_memory(cfg, 4096, 1, dp, **FP32)
    tp2 = training_memory(cfg, 4096, 1, 2 * dp, tp=2, **FP32)  # same dp, twice the GPUs
    assert (tp2["tp"], tp2["dp"]) == (2, dp)
    # the sharded part of every model state is exactly halved; the norms stay
    for key, per_param in (("weights", 4), ("gradients", 4)):
        assert tp1[key] == P * per_param // dp
        assert tp2[key] - norms * per_param // dp == (tp1[key] - norms * per_param // dp) // 2
    counters = 4 * (9 * cfg.n_layers + 3)  # AdamW's step, one per tensor, on every rank
    assert tp2["optimizer"] - counters - 8 * norms // dp == (tp1["optimizer"] - counters - 8 * norms // dp) // 2
    # same dp x tp product: identical but for the norms, replicated over tp instead of sharded
    flat = training_memory(cfg, 4096, 1, 2 * dp, **FP32)
    assert tp2["weights"] - flat["weights"] == pytest.approx(norms * 4 * (1 / dp - 1 / (2 * dp)), abs=1)


@pytest.mark.parametrize("ckpt", [False, True])
def test_sequence_parallel_activations(ckpt):
    cfg = ModelConfig.from_preset("llama2-7b")
    T, L, d, e = 4096, cfg.n_layers, cfg.dim, 2
    one = training_memory(cfg, T, 1, 8, activation_checkpointing=ckpt, fused_loss=False)
    for tp in (2, 4, 8):
        m = training_memory(cfg, T, 1, 8, activation_checkpointing=ckpt, tp=tp)
        # whole on every rank: the gathered norm outputs (2 per block, 1 for the head) and the
        # head's per-token logsumexp; everything else is a sequence, head or vocabulary shard
        blocks = L if not ckpt else 1
        whole = (blocks * 2 * e * d + e * d + 4) * T
        assert m["activations"] == pytest.approx((one["activations"] - whole) / tp + whole, abs=2)
        assert m["transient"] == pytest.approx(one["transient"] / tp, abs=1)
        assert whole < m["activations"] < one["activations"]


def test_tp_traffic_hand_count():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=16)
    tokens = 2 * 16  # two sequences of 16 on one data-parallel rank
    # per block: forward all-gather x2 + reduce-scatter x2, backward the same; embedding and head
    # 2 each; every collective moves (tp-1)/tp of the bf16 [32, 64] activation per GPU
    hand = (2 * 8 + 4) * (1 / 2) * tokens * 64 * 2
    t = tp_comm_step(cfg, A100, 2, tokens, 2)
    assert t["bytes_per_gpu"] == hand == 40960
    assert t["comm_bandwidth_s"] == pytest.approx(hand / (300e9 * NVLINK_EFFICIENCY))
    assert t["comm_latency_s"] == pytest.approx(20 * 2 * 1 * 1e-6)
    recompute = tp_comm_step(cfg, A100, 2, tokens, 2, activation_checkpointing=True)
    assert recompute["bytes_per_gpu"] == (2 * 12 + 4) * (1 / 2) * tokens * 64 * 2
    assert tp_comm_step(cfg, A100, 1, tokens, 2)["comm_s"] == 0
    four = tp_comm_step(cfg, A100, 4, tokens, 2)
    assert four["bytes_per_gpu"] == 20 * (3 / 4) * tokens * 64 * 2


@pytest.mark.parametrize("tp, nics", [(1, 8), (2, 4), (8, 1)])
def test_fsdp_over_dp_only(tp, nics):
    cfg = ModelConfig.from_preset("llama2-70b")
    n_gpus, dp = 2048, 2048 // tp
    p_tp = (param_counts(cfg).total - (2 * cfg.n_layers + 1) * cfg.dim) / tp + (2 * cfg.n_layers + 1) * cfg.dim
    c = comm_step(cfg, A100, n_gpus, get_interconnect("ib-200"), compute_s=1.0, tp=tp)
    assert c["dp"] == dp
    # two bf16 all-gathers + one fp32 reduce-scatter of this rank's parameters, ring over dp
    assert c["bytes_per_gpu"] == pytest.approx((dp - 1) / dp * (2 * 2 + 4) * p_tp)
    # the tp concurrent rings share the node's 8 NICs (200 Gb/s at 90%)
    assert c["bus_bandwidth_Bps"] == pytest.approx(min(300e9 * 0.8, nics * 25e9 * 0.9))
    assert c["comm_latency_s"] == pytest.approx(3 * (cfg.n_layers + 2) * (dp - 1) * 3e-6)


@pytest.mark.parametrize("gpus, tp, batch", [
    (2000, 1, "4M"), (2000, 2, "4M"), (2048, 1, "4M"), (1024, 1, "4M"), (1032, 1, "4M"),
    (4096, 2, "4M"), (4096, 4, "4M"), (2048, 1, "8M"), (256, 8, "131072"), (256, 8, "126976"),
    (256, 8, "128K")])
def test_dp_alone_message_exactly_when_sequences_below_dp(capsys, gpus, tp, batch):
    rc, out, _ = run_cli(capsys, "plan", "--preset", "llama2-70b", "--gpus", str(gpus), "--tp", str(tp),
                         "--global-batch-tokens", batch, "--mfu", "0.46")
    assert rc == 0
    # the CLI reads a whole "4M" as 4 x 2^20 (the paper's batch) and "128K" as 128,000
    tokens = int(batch[:-1]) * {"M": 2**20, "K": 10**3}[batch[-1]] if batch[-1] in "MK" else int(batch)
    sequences = tokens / 4096
    assert ("data parallelism alone cannot use the GPUs given" in out) == (sequences < gpus // tp)


def test_idle_and_unequal_ranks_in_efficiency():
    cfg = ModelConfig.from_preset("llama2-70b")
    r = plan(cfg, 2 * 10**12, A100, 2048, mfu=0.46, tp_degrees=(1, 2, 4, 8))
    ideal = 4 * 2**20 * flops_per_token(cfg, 4096) / (2048 * 312e12 * 0.46)
    one, two = r["tp_layouts"][:2]
    # tp 1: half the ranks idle, the other half run one whole sequence: twice the ideal time
    assert one["ideal_compute_s"] == pytest.approx(ideal) and one["compute_s"] == pytest.approx(2 * ideal)
    assert one["sequences_below_dp"] and one["idle_dp_ranks"] == 1024
    assert two["compute_s"] == pytest.approx(ideal) and two["balanced"]
    assert r["min_tp_for_every_dp_rank"] == 2 and r["dp_alone_cannot_use_gpus"]
    # 2000 GPUs at tp 8: 1024 sequences over 250 ranks, the busiest runs 5 of 4.096 on average
    r2000 = plan(cfg, 2 * 10**12, A100, 2000, mfu=0.46, tp=8)
    lay = r2000["layout"]
    assert lay["sequences_busiest_rank"] == 5 and not lay["balanced"]
    assert lay["balanced_batches_sequences"] == [1000, 1250]
    for v in lay["networks"].values():
        assert v["scaling_efficiency"] < 4.096 / 5


def test_paper_70b_which_tp_fit():
    cfg = ModelConfig.from_preset("llama2-70b")
    r = plan(cfg, 2 * 10**12, A100, 2048, mfu=0.46, tp_degrees=(1, 2, 4, 8))
    lays = {lay["tp"]: lay for lay in r["tp_layouts"]}
    assert not lays[1]["fits"] and lays[1]["fits_with_checkpointing"]
    assert all(lays[t]["fits"] for t in (2, 4, 8))
    mem = [lays[t]["memory_per_gpu_bytes"] for t in (1, 2, 4, 8)]
    assert mem == sorted(mem, reverse=True)
    tp_s = [lays[t]["tp_comm"]["comm_s"] for t in (2, 4, 8)]
    assert tp_s == sorted(tp_s) and lays[1]["tp_comm"]["comm_s"] == 0
    for lay in lays.values():
        ib, roce = lay["networks"]["ib-200"], lay["networks"]["roce-200"]
        assert ib["scaling_efficiency"] >= roce["scaling_efficiency"]
        assert ib["fsdp"]["dp"] == lay["dp"]
    efficiency = {tp: lays[tp]["networks"]["ib-200"]["scaling_efficiency"] for tp in (1, 2)}
    assert efficiency[2] > 1.9 * efficiency[1]


def test_tp1_keeps_output_and_list_adds_layouts(capsys):
    base = ["plan", "--preset", "llama2-70b", "--gpus", "2000", "--mfu", "0.46", "--json"]
    _, default, _ = run_cli(capsys, *base)
    _, tp1, _ = run_cli(capsys, *base, "--tp", "1")
    assert default == tp1
    rc, many, _ = run_cli(capsys, *base, "--tp", "1,2,4,8")
    assert rc == 0
    d, m = json.loads(default), json.loads(many)
    for key in d:
        if key != "tp_layouts":
            assert m[key] == d[key], key
    assert [lay["tp"] for lay in m["tp_layouts"]] == [1, 2, 4, 8]
    rc, text, _ = run_cli(capsys, *base[:-1], "--tp", "1,2,4,8")
    assert rc == 0 and "tensor parallelism (2000 x a100-80gb" in text and "efficiency ib-200, roce-200" in text


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "3"], "--tp 3 must divide --gpus-per-node (8)"),
    (["--tp", "16"], "--tp 16 must divide --gpus-per-node (8)"),
    (["--tp", "0"], "--tp must be at least 1"),
    (["--tp", "two"], "--tp takes a degree"),
    (["--tp", "1,2,,8"], "--tp takes a degree"),
    (["--tp", "8", "--gpus", "12"], "--tp 8 must divide --gpus (12)"),
    (["--tp", "3", "--gpus", "6", "--gpus-per-node", "6"], "n_heads (64)"),
    (["--tp", "16", "--gpus", "32", "--gpus-per-node", "16"], "n_kv_heads (8)"),
    (["--tp", "1,2,3"], "--tp 3 must divide"),
    (["--tp", "8", "--seq-len", "4092"], "sequence length (4092)"),
])
def test_bad_tp_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run_cli(capsys, "plan", "--preset", "llama2-70b", *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
