"""`llama-pretrain model info` and the CLI's error contract."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from llama_pretrain.cli import main


def test_model_info_json_paper_counts(capsys):
    t0 = time.perf_counter()
    assert main(["model", "info", "--preset", "llama2-70b", "--json"]) == 0
    assert time.perf_counter() - t0 < 1.0  # arithmetic only, no weights allocated
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 68_976_648_192
    assert info["non_embedding_params"] == 68_976_648_192 - 32000 * 8192
    assert info["flops_per_token"] == 6 * info["non_embedding_params"] + 12 * 80 * 64 * 128 * 4096
    assert info["kv_cache_bytes_per_token"]["bf16"] == 2 * 80 * 8 * 128 * 2
    assert info["training_state_bytes"]["fp32"]["adamw_state"] == 8 * 68_976_648_192


def test_model_info_table_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npreset = "llama2-7b"\nn_layers = 16\n')
    assert main(["model", "info", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "FLOPs/token" in out
    assert main(["model", "info", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["n_layers"] == 16


@pytest.mark.parametrize("args,needle", [
    (["model", "info", "--preset", "llama9"], "unknown preset 'llama9'"),
    (["model", "info", "--config", "/nonexistent.json"], "cannot read /nonexistent.json"),
    (["model", "info", "--preset", "llama2-debug", "--seq-len", "0"], "--seq-len must be at least 1"),
])
def test_user_errors_are_one_line_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bad_model_field_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"dim": 100, "n_heads": 3}))
    assert main(["model", "info", "--config", str(cfg)]) == 2
    assert "model.dim (100) must be divisible by model.n_heads (3)" in capsys.readouterr().err


def test_python_dash_m_is_the_console_script():
    a = subprocess.run([sys.executable, "-m", "llama_pretrain", "model", "info", "--preset", "llama2-13b",
                        "--json"], capture_output=True, text=True, check=True)
    assert json.loads(a.stdout)["total_params"] == 13_015_864_320
    exe = shutil.which("llama-pretrain")
    if exe:  # installed entry point
        b = subprocess.run([exe, "model", "info", "--preset", "llama2-13b", "--json"],
                           capture_output=True, text=True, check=True)
        assert a.stdout == b.stdout


@pytest.mark.parametrize("name, text, needle", [
    ("params.json", "[1, 2]", "expected a JSON object, got list"),
    ("config.json", '"x"', "expected a JSON object, got str"),
    ("params.json", '{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": "x"}',
     "model.vocab_size must be an integer"),
])
def test_config_file_that_is_not_an_object_is_a_user_error(tmp_path, capsys, name, text, needle):
    (tmp_path / name).write_text(text)
    assert main(["model", "info", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, needle", [
    (["model", "info", "--preset", "llama2-7b", "--no-such-flag"], "unrecognized arguments"),
    (["train", "--training.max_steps=abc"], "--training.max_steps must be an integer"),
])
@pytest.mark.parametrize("env, waits, says", [
    # torchrun, rank 0's node: wait for torchrun to stop us after rank 0 reports; if it never does
    # (rank 0 did not fail), report it here after all
    ({"RANK": "1", "TORCHELASTIC_RUN_ID": "r", "GROUP_RANK": "0"}, True, True),
    ({"RANK": "0", "TORCHELASTIC_RUN_ID": "r", "GROUP_RANK": "0"}, False, True),  # rank 0 says it at once
    ({"RANK": "9", "TORCHELASTIC_RUN_ID": "r", "GROUP_RANK": "1"}, False, False),  # another node: quiet
    ({"RANK": "1"}, False, False),  # another launcher: nothing ties this rank to rank 0; quiet
])
def test_a_shared_error_is_said_by_rank0(args, needle, env, waits, says, monkeypatch, capsys, tmp_path):
    import llama_pretrain.cli as cli

    slept = []
    for k in ("RANK", "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert slept == ([cli.RANK0_GRACE_S] if waits else [])
    err = capsys.readouterr().err
    assert (needle in err) == says, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_ctrl_c_while_waiting_for_rank0_is_a_quiet_130(monkeypatch, capsys):
    import llama_pretrain.cli as cli

    def interrupted(_):
        raise KeyboardInterrupt
    for k, v in {"RANK": "1", "TORCHELASTIC_RUN_ID": "r", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli.time, "sleep", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["model", "info", "--no-such-flag"])
    assert e.value.code == 130
    assert capsys.readouterr().err == ""
