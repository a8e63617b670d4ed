"""Carbon (Table 2), GPU table, token parsing, run planning and the `carbon` / `plan` CLIs."""

import json

import pytest

from llama_pretrain.cli import main
from llama_pretrain.compute.carbon import table2, tco2eq, truncate_hundredth
from llama_pretrain.compute.flops import param_counts
from llama_pretrain.compute.gpus import GPUS, get_gpu, peak_flops_for_device
from llama_pretrain.compute.plan import parse_count, plan
from llama_pretrain.config import ModelConfig
from llama_pretrain.errors import UserError

# Table 2 of the paper, typed in independently of the code's copy.
PAPER = {"7B": (184320, 400, "31.22"), "13B": (368640, 400, "62.44"),
         "34B": (1038336, 350, "153.90"), "70B": (1720320, 400, "291.42")}


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_table2_every_row_and_total(capsys):
    rc, out, _ = run_cli(capsys, "carbon", "--table2", "--json")
    assert rc == 0
    t = json.loads(out)
    assert [r["model"] for r in t["rows"]] == list(PAPER)
    for r in t["rows"]:
        hours, power, printed = PAPER[r["model"]]
        assert (r["gpu_hours"], r["power_w"], r["display"]) == (hours, power, printed)
        assert r["tco2eq"] == pytest.approx(hours * power / 1000 * 1.1 * 0.385 / 1000, rel=1e-12)
        assert abs(r["tco2eq"] - float(printed)) < 0.01
    assert t["total"]["gpu_hours"] == 3311616
    assert t["total"]["display"] == "539.00"
    assert t["total"]["tco2eq"] == pytest.approx(539.0, abs=0.005)


def test_truncation_rule_is_needed():
    # Rounding would print 62.45 for 13B; the paper cuts to 62.44.
    exact = 368640 * 0.4 * 1.1 * 0.385 / 1000
    assert f"{exact:.2f}" == "62.45"
    assert truncate_hundredth("62.447616") == "62.44"
    assert table2()["rows"][1]["display"] == "62.44"


def test_tco2eq_function():
    assert tco2eq(184320, 400) == pytest.approx(31.223808)
    assert tco2eq(gpu_hours=1000, power_w=400, pue=1.0, intensity=0.5) == pytest.approx(0.2)
    assert tco2eq(kwh=1000, pue=1.0, intensity=0.385) == pytest.approx(0.385)
    for bad in (dict(gpu_hours=0, power_w=400), dict(gpu_hours=-1, power_w=400),
                dict(gpu_hours=1, power_w=400, pue=0), dict(gpu_hours=float("nan"), power_w=1)):
        with pytest.raises(UserError):
            tco2eq(**bad)


def test_carbon_cli_arbitrary_and_json(capsys):
    rc, out, _ = run_cli(capsys, "carbon", "--gpu-hours", "1000", "--power-w", "350", "--pue", "1.2",
                         "--intensity", "0.4", "--json")
    assert rc == 0
    d = json.loads(out)
    assert set(d["rows"][0]) >= {"model", "gpu_hours", "power_w", "tco2eq"}
    assert d["total"]["tco2eq"] == pytest.approx(1000 * 0.35 * 1.2 * 0.4 / 1000)
    rc, out, _ = run_cli(capsys, "carbon", "--gpu-hours", "10", "--gpu", "h100")
    assert rc == 0 and "700 W" in out


@pytest.mark.parametrize("argv, needle", [
    (["carbon", "--gpu-hours", "0"], "--gpu-hours"),
    (["carbon", "--gpu-hours", "-5"], "--gpu-hours"),
    (["carbon", "--gpu-hours", "5", "--pue", "-1"], "--pue"),
    (["carbon"], "--gpu-hours"),
    (["carbon", "--gpu-hours", "5", "--gpu", "b200"], "a100-40gb, a100-80gb, h100, h200"),
    (["plan", "--preset", "llama2-7b", "--gpu", "v100"], "a100-40gb, a100-80gb, h100, h200"),
    (["plan", "--preset", "llama2-7b", "--gpu-hours", "0"], "--gpu-hours"),
    (["plan", "--preset", "llama2-7b", "--gpu-hours", "-100"], "--gpu-hours"),
    (["plan", "--preset", "llama2-7b", "--tokens", "2x"], "token count"),
    (["plan", "--preset", "llama2-7b", "--tokens", "two trillion"], "token count"),
    (["plan", "--preset", "llama2-7b", "--gpus", "0"], "--gpus"),
    (["plan", "--preset", "llama2-7b", "--interconnect", "carrier-pigeon"], "ib-200"),
    (["plan", "--preset", "nope"], "unknown preset"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["2T", "2.0T", "2e12", "2E12", "2,000,000,000,000", "2000000000000",
                                  "2_000_000_000_000", "2000B", " 2t "])
def test_token_counts_parse(text):
    assert parse_count(text) == 2 * 10**12


@pytest.mark.parametrize("text", ["", "T", "2x", "2TT", "-2T", "2e", "1,0x", "0", "1e-5", "nan", "inf"])
def test_garbage_token_counts_rejected(text):
    with pytest.raises(UserError):
        parse_count(text)


def test_gpu_table_and_aliases():
    assert set(GPUS) == {"a100-40gb", "a100-80gb", "h100", "h200"}
    assert get_gpu("A100").name == "a100-80gb" and get_gpu("h100-sxm").name == "h100"
    assert get_gpu("a100-80gb").bf16_peak_flops == 312e12 and get_gpu("h200").bf16_peak_flops == 989e12
    assert get_gpu("h200").memory_bytes > get_gpu("h100").memory_bytes
    assert peak_flops_for_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device("NVIDIA H100 PCIe") is None
    assert peak_flops_for_device("NVIDIA GeForce RTX 4090") is None


# GPU-hours of Table 2 and the MFU REFERENCE.md derives from them.
PLAN_CASES = [("llama2-7b", 184320, 0.445), ("llama2-13b", 368640, 0.421), ("llama2-70b", 1720320, 0.460)]


@pytest.mark.parametrize("preset, hours, mfu", PLAN_CASES)
def test_plan_reproduces_table2_hours_and_inverse(capsys, preset, hours, mfu):
    rc, out, _ = run_cli(capsys, "plan", "--preset", preset, "--tokens", "2.0T", "--gpu", "a100-80gb",
                         "--gpus", "2048", "--mfu", str(mfu), "--json")
    assert rc == 0
    d = json.loads(out)
    assert abs(d["gpu_hours"] / hours - 1) < 0.01
    # Independent recomputation of the FLOPs: 6 N_non-embedding + 12 L H Q T, T = 4096.
    cfg = ModelConfig.from_preset(preset)
    n_ne = param_counts(cfg).total - cfg.vocab_size * cfg.dim
    assert d["flops_total"] == pytest.approx(2e12 * (6 * n_ne + 12 * cfg.n_layers * cfg.dim * 4096))
    assert d["days"] == pytest.approx(d["gpu_hours"] / 2048 / 24)
    assert d["energy_kwh"] == pytest.approx(d["gpu_hours"] * 0.4 * 1.1)
    assert d["tco2eq"] == pytest.approx(d["energy_kwh"] * 0.385 / 1000)
    for key in ("flops_total", "gpu_hours", "days", "energy_kwh", "tco2eq", "memory_per_gpu_bytes"):
        assert isinstance(d[key], (int, float)) and d[key] > 0
    rc, out, _ = run_cli(capsys, "plan", "--preset", preset, "--tokens", "2,000,000,000,000",
                         "--gpu-hours", str(hours), "--json")
    assert rc == 0
    assert json.loads(out)["mfu"] == pytest.approx(mfu, abs=0.0005)


def test_plan_memory_fits_and_checkpointing():
    cfg = ModelConfig.from_preset("llama2-70b")
    a100 = get_gpu("a100-80gb")
    small = plan(cfg, 2 * 10**12, a100, 64, mfu=0.4)
    big = plan(cfg, 2 * 10**12, a100, 1024, mfu=0.4)
    assert not small["fits"]  # 16 bytes/param of state alone is 16 GiB+ per GPU at 64; plus activations
    assert big["memory_per_gpu_bytes"] < small["memory_per_gpu_bytes"]
    assert big["memory_per_gpu_bytes_checkpointing"] < big["memory_per_gpu_bytes"]
    assert big["fits_with_checkpointing"]


def test_communication_scaling_ib_vs_roce():
    cfg = ModelConfig.from_preset("llama2-7b")
    r = plan(cfg, 2 * 10**12, get_gpu("a100-80gb"), 512, mfu=0.45)
    ib, roce = r["scaling"]["ib-200"], r["scaling"]["roce-200"]
    assert [x["gpus"] for x in ib] == [64, 128, 256, 512, 1024, 2048]
    for a, b in zip(ib, roce):
        assert b["comm_s"] > a["comm_s"] and b["scaling_efficiency"] <= a["scaling_efficiency"]
    effs = [x["scaling_efficiency"] for x in ib]
    assert effs == sorted(effs, reverse=True) and effs[0] > 0.99
    # Bytes per GPU per step: 2 bf16 all-gathers + 1 fp32 reduce-scatter of all parameters.
    n = param_counts(cfg).total
    assert ib[0]["bytes_per_gpu"] == pytest.approx((2 * 2 + 4) * n * 63 / 64)
    one_node = plan(cfg, 2 * 10**12, get_gpu("h100"), 8, mfu=0.45, interconnect="nvlink")
    assert one_node["comm"]["nodes"] == 1 and one_node["scaling"] == {}


def test_plan_text_output(capsys):
    rc, out, _ = run_cli(capsys, "plan", "--preset", "llama2-13b", "--mfu", "42.1", "--gpus", "1024",
                         "--interconnect", "roce-200")
    assert rc == 0
    for needle in ("GPU-hours", "368,", "days", "kWh", "tCO2eq", "memory/GPU", "roce-200", "2048"):
        assert needle in out
