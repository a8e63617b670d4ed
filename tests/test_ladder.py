"""`llama-pretrain ladder`: a 2-size mini ladder writes ladder.json and figure5.png, reuses finished
members, scales the peak LR by 1/width, and refuses bad input in one line; the plot's labelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pretrain.cli import main as cli_main

from helpers.runs import read_metrics
from helpers.train_data import make_dataset

MINI = """
[ladder]
sizes = [{{name = "a", dim = 32, n_layers = 1, n_heads = 2, n_kv_heads = 1}},
         {{name = "b", dim = 64, n_layers = 2, n_heads = 4, n_kv_heads = 2}}]

[model]
preset = "llama2-debug"

[data]
path = "{data}"

[schedule]
warmup_steps = 2

[training]
max_steps = 4
seq_len = 32
micro_batch_size = 2
global_batch_tokens = 128
eval_every_steps = 2
eval_batches = 2

[checkpoint]
every_steps = 0
keep_last = 1

[logging]
progress = false
tensorboard = "off"
peak_flops = 1e11

[parallel]
mixed_precision = "fp32"
"""


@pytest.fixture(scope="module")
def ladder_toml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    path = root / "mini.toml"
    path.write_text(MINI.format(data=make_dataset(root / "data", train_tokens=8_000, val_tokens=1_000)))
    return path


def test_mini_ladder_writes_ladder_json_and_figure_then_reuses_finished_members(ladder_toml, tmp_path, capsys):
    out = tmp_path / "lad"
    assert cli_main(["ladder", "--config", str(ladder_toml), "--run-dir", str(out)]) == 0
    ladder = json.loads((out / "ladder.json").read_text())
    assert [r["name"] for r in ladder["runs"]] == ["a", "b"]
    for r in ladder["runs"]:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert r["tokens"] == summary["tokens_seen"] == 4 * 128
        assert r["final_train_loss"] == summary["final_train_loss"]
        assert r["final_val_loss"] == summary["final_val_loss"] is not None
        assert 0 < r["non_embedding_params"] < r["params"]
    a, b = ladder["runs"]
    assert b["params"] > a["params"]
    assert a["peak_lr"] == pytest.approx(1e-3 * 64 / 32) and b["peak_lr"] == pytest.approx(1e-3)  # 1/width
    assert (out / "figure5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[1:3]] == [["a", f"{a['params']:,}"], ["b", f"{b['params']:,}"]]

    metrics = out / "a" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns, (out / "b" / "summary.json").read_bytes()
    assert cli_main(["ladder", "--config", str(ladder_toml), "--run-dir", str(out)]) == 0
    assert "finished, reusing" in capsys.readouterr().err
    assert (metrics.stat().st_mtime_ns, (out / "b" / "summary.json").read_bytes()) == before
    assert json.loads((out / "ladder.json").read_text())["runs"] == ladder["runs"]


def test_sizes_trains_only_the_named_ones(ladder_toml, tmp_path):
    out = tmp_path / "lad"
    assert cli_main(["ladder", "--config", str(ladder_toml), "--run-dir", str(out), "--sizes", "b"]) == 0
    assert [r["name"] for r in json.loads((out / "ladder.json").read_text())["runs"]] == ["b"]
    assert not (out / "a").exists()


@pytest.mark.parametrize("sizes", ["nope", "a,a", "a,", ""])
def test_bad_sizes_is_one_line_and_writes_nothing(ladder_toml, tmp_path, capsys, sizes):
    out = tmp_path / "lad"
    assert cli_main(["ladder", "--config", str(ladder_toml), "--run-dir", str(out), "--sizes", sizes]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sizes" in err and "a, b" in err
    assert not out.exists()


def test_a_bad_size_or_a_fixed_lr_is_refused_before_anything_trains(ladder_toml, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(ladder_toml.read_text().replace("n_heads = 4, n_kv_heads = 2", "n_heads = 4, n_kv_heads = 3"))
    assert cli_main(["ladder", "--config", str(bad), "--run-dir", str(tmp_path / "x")]) == 2
    assert "size b" in capsys.readouterr().err and not (tmp_path / "x").exists()
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(ladder_toml.read_text() + "\n[optimizer]\nlr = 1e-3\n")
    assert cli_main(["ladder", "--config", str(fixed), "--run-dir", str(tmp_path / "x")]) == 2
    assert "optimizer.lr" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("line, says", [('lr_ref = "fast"', "ladder.lr_ref"), ("dim_ref = 0", "ladder.dim_ref"),
                                         ("size = []", "unknown [ladder] keys size"),
                                         ("lr_exponent = -1", "ladder.lr_exponent")])
def test_bad_ladder_keys_are_one_line(ladder_toml, tmp_path, capsys, line, says):
    bad = tmp_path / "bad.toml"
    bad.write_text(ladder_toml.read_text().replace("[ladder]\n", f"[ladder]\n{line}\n"))
    assert cli_main(["ladder", "--config", str(bad), "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_lr_reference_can_be_set(ladder_toml, tmp_path):
    from llama_pretrain.train.ladder import load_ladder

    own = tmp_path / "own.toml"
    own.write_text(ladder_toml.read_text().replace("[ladder]\n", "[ladder]\nlr_ref = 2e-3\ndim_ref = 32\n"))
    assert [m.cfg.peak_lr for m in load_ladder(own, tmp_path).members] == pytest.approx([2e-3, 1e-3])
    own.write_text(ladder_toml.read_text().replace("[ladder]\n", "[ladder]\nlr_ref = 2e-3\ndim_ref = 32\n"
                                                                 "lr_exponent = 0.5\n"))
    assert [m.cfg.peak_lr for m in load_ladder(own, tmp_path).members] == pytest.approx([2e-3, 2e-3 / 2 ** 0.5])


def test_builtin_ladder_has_four_sizes_growing_in_width_and_the_gpu_config_loads(tmp_path):
    from llama_pretrain.compute.flops import param_counts
    from llama_pretrain.train.ladder import load_ladder

    builtin = load_ladder(None, tmp_path)
    params = [param_counts(m.cfg.model_config()).total for m in builtin.members]
    assert len(params) >= 4 and params == sorted(params)
    tokens = {m.cfg.training.max_steps * m.cfg.training.global_batch_tokens for m in builtin.members}
    assert len(tokens) == 1  # the same budget for every size
    gpu = load_ladder(Path(__file__).parents[1] / "configs" / "ladder-gpu.toml", tmp_path)
    sizes = [param_counts(m.cfg.model_config()).total for m in gpu.members]
    assert len(sizes) >= 4 and 100e6 < sizes[0] and sizes[-1] < 1.6e9
    assert {m.cfg.seq_len for m in gpu.members} == {4096}
    assert gpu.members[0].cfg.peak_lr > gpu.members[-1].cfg.peak_lr


def test_token_axis_labels_have_units_not_an_offset():
    from llama_pretrain.train.plot import token_count

    assert [token_count(v) for v in (0, 500, 2_000, 1_500_000, 2e9)] == ["0", "500", "2k", "1.5M", "2B"]


def test_plot_names_training_perplexity_and_draws_validation(ladder_toml, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llama_pretrain.train import plot

    out = tmp_path / "lad"
    assert cli_main(["ladder", "--config", str(ladder_toml), "--run-dir", str(out), "--sizes", "a"]) == 0
    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    plot.plot_runs([out / "a"], tmp_path / "f.png")
    ax = seen["fig"].axes[0]
    assert "perplexity" in ax.get_title().lower() and "loss" not in ax.get_title().lower()
    val_steps = [r for r in read_metrics(out / "a") if r.get("val_loss") is not None]
    xs = [list(line.get_xdata()) for line in ax.get_lines()]
    assert [r["tokens_seen"] for r in val_steps] in xs  # the validation curve is drawn
    assert ax.xaxis.get_offset_text().get_text() == ""
