"""Training: schedule, weight-decay groups, accumulation, guardrails, checkpoints, config, CLI errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_pretrain.cli import main as cli_main
from llama_pretrain.config import ModelConfig
from llama_pretrain.errors import UserError
from llama_pretrain.model import Transformer
from llama_pretrain.train.config import RunConfig, load_run_config
from llama_pretrain.train.optim import build_optimizer, decayed_parameter_names, lr_at

from helpers.runs import as_overrides, read_metrics, tiny_run
from helpers.train_data import make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data")


def small_cfg(data: Path, **over) -> RunConfig:
    """llama2-debug, seq 32, 256-token global batch; warm-up longer than the run so LRs do not
    depend on max_steps."""
    items = tiny_run({"data.path": str(data), "training.max_steps": 4, "schedule.warmup_steps": 100,
                      "checkpoint.every_steps": 2, **over})
    return load_run_config(None, as_overrides(items))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "final" / "model.safetensors"))


# -- schedule ---------------------------------------------------------------------------------------
def test_schedule_matches_formula():
    peak, warm, total, ratio = 3e-4, 2000, 10000, 0.1
    lr = lambda s: lr_at(s, peak, warm, total, ratio)  # noqa: E731
    assert lr(0) == pytest.approx(peak / warm, rel=1e-12)           # first step: 1/warmup of peak
    assert lr(warm - 1) == pytest.approx(peak, rel=1e-12)           # end of warm-up: the peak
    assert lr(999) == pytest.approx(peak * 1000 / 2000, rel=1e-12)  # linear inside warm-up
    middle = warm - 1 + (total - warm) // 2                         # cosine progress exactly 1/2
    assert lr(middle) == pytest.approx(peak * (ratio + 1) / 2, rel=1e-12)
    assert lr(total - 1) == pytest.approx(ratio * peak, rel=1e-12)  # last step: 10% of peak
    quarter = warm - 1 + (total - warm) // 4
    expected = ratio * peak + (1 - ratio) * peak * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr(quarter) == pytest.approx(expected, rel=1e-12)
    values = [lr(s) for s in range(warm - 1, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))          # monotone decay


# -- weight decay -------------------------------------------------------------------------------------
def test_weight_decay_reaches_exactly_linear_weights():
    model = Transformer(ModelConfig.from_preset("llama2-debug"))
    names = set(decayed_parameter_names(model))
    expected = {"output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert names == expected
    assert set(decayed_parameter_names(model, decay_embeddings=True)) == expected | {"tok_embeddings.weight"}

    # The optimizer really applies it: with zero gradients AdamW's update is pure decay.
    lr, wd = 0.01, 0.1
    opt = build_optimizer(model, lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p, before[n] * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, before[n]), n


# -- loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_reference(dtype):
    from llama_pretrain.losses import chunked_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(300, 97) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (300,))
    targets[::7] = -100
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100)
    ref.backward()
    loss = chunked_cross_entropy(logits, targets, chunk_rows=64)
    loss.backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol * 1e-2)


# -- the loop -----------------------------------------------------------------------------------------
def test_accumulation_equals_large_micro_batch(dataset, tmp_path):
    from llama_pretrain.train.loop import train

    a = small_cfg(dataset, **{"training.micro_batch_size": 2, "training.global_batch_tokens": 256,
                              "training.max_steps": 3, "optimizer.lr": 1e-2})
    b = small_cfg(dataset, **{"training.micro_batch_size": 8, "training.global_batch_tokens": 256,
                              "training.max_steps": 3, "optimizer.lr": 1e-2})
    assert (a.accumulation_steps(), b.accumulation_steps()) == (4, 1)
    train(a, tmp_path / "a")
    train(b, tmp_path / "b")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for s in (1, 2, 3):
        assert la[s] == pytest.approx(lb[s], rel=1e-5, abs=1e-6)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    torch.manual_seed(a.training.seed)  # the trainer's own initialisation, so "moved" means trained
    start = Transformer(ModelConfig.from_preset("llama2-debug")).state_dict()
    assert sorted(start) == sorted(wa)
    for name in ("output.weight", "layers.0.attention.wq.weight", "tok_embeddings.weight"):
        assert (wa[name] - start[name]).abs().max() > 1e-4, name
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_training_learns(dataset, tmp_path):
    # 30 steps of llama2-debug on a learnable Markov-chain corpus: the validation loss must fall
    # well below its start (an untrained model sits near ln(512) = 6.24).
    cfg = small_cfg(dataset, **{"training.max_steps": 30, "optimizer.lr": 1e-2, "schedule.warmup_steps": 5,
                                "training.eval_every_steps": 30, "training.eval_batches": 4,
                                "checkpoint.every_steps": 0})
    from llama_pretrain.train.loop import train

    summary = train(cfg, tmp_path / "r")
    assert summary["first_val_loss"] > 6.0
    assert summary["final_val_loss"] < summary["first_val_loss"] - 1.0, summary


def test_start_weights_are_the_seeded_initialisation(dataset, tmp_path):
    # The weight-moved check above relies on the trainer starting from torch.manual_seed(seed).
    from llama_pretrain.train.loop import train

    cfg = small_cfg(dataset, **{"training.max_steps": 1, "optimizer.lr": 1e-12, "schedule.warmup_steps": 1,
                                "optimizer.weight_decay": 0.0})
    train(cfg, tmp_path / "r")
    torch.manual_seed(cfg.training.seed)
    start = Transformer(ModelConfig.from_preset("llama2-debug")).state_dict()
    for name, w in final_weights(tmp_path / "r").items():
        torch.testing.assert_close(w, start[name], rtol=0, atol=1e-9)


def test_gradient_clipping_matches_torch_and_only_acts_above_the_limit():
    from llama_pretrain.train.loop import clip_gradients_, global_grad_norm

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama2-debug"))
    grads = [torch.randn_like(p) for p in model.parameters()]
    for limit in (0.5, 1e9, 0.0):  # clipped / below the limit / clipping disabled
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        norm = global_grad_norm(list(model.parameters()))
        assert norm == pytest.approx(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item(), rel=1e-5)
        clip_gradients_(list(model.parameters()), norm, limit)
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        if limit:
            torch.nn.utils.clip_grad_norm_(ref, limit)  # the independent reference
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8)
        after = global_grad_norm(list(model.parameters()))
        assert after == pytest.approx(limit if 0 < limit < norm else norm, rel=1e-4)


def test_train_state_round_trips_and_restores_the_loader_and_rng(dataset):
    from llama_pretrain.data.loader import TokenLoader
    from llama_pretrain.train.guards import NonFiniteGuard, SpikeDetector
    from llama_pretrain.train.state import TrainState

    def fresh():
        return TrainState(loader=TokenLoader(dataset, "train", 2, 32, 0), spikes=SpikeDetector(6.0),
                          nonfinite=NonFiniteGuard(5))

    a = fresh()
    for _ in range(3):
        next(a.loader)
        a.spikes.update(5.0)
    a.step, a.tokens_seen, a.elapsed_s, a.nonfinite.in_row = 3, 768, 1.5, 2
    a.energy, a.schedule, a.precision = {"kwh": 0.25, "tco2eq": 0.125}, {"peak_lr": 1e-3, "last_lr": 5e-4}, "bf16"
    torch.manual_seed(123)
    saved = json.loads(json.dumps(a.state_dict()))  # what trainer_state.json holds
    expected_batch, expected_rand = next(a.loader), torch.rand(3)
    b = fresh()
    b.load_state_dict(saved)
    assert json.loads(json.dumps(b.state_dict())) == {**saved, "rng": b.state_dict()["rng"]}
    b.load_state_dict(saved)
    assert torch.equal(next(b.loader), expected_batch) and torch.equal(torch.rand(3), expected_rand)
    assert (b.step, b.tokens_seen, b.nonfinite.in_row, b.spikes.n, b.precision) == (3, 768, 2, 3, "bf16")


def test_keep_last_prunes_old_checkpoints(dataset, tmp_path):
    from llama_pretrain.train.loop import train

    run = tmp_path / "r"
    train(small_cfg(dataset, **{"training.max_steps": 5, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2}), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_same_size_corruption_is_caught_by_the_checksum(dataset, tmp_path, capsys):
    from llama_pretrain.train.loop import train

    ref = tmp_path / "ref"
    train(small_cfg(dataset, **{"training.max_steps": 6}), ref)
    run = tmp_path / "run"
    train(small_cfg(dataset, **{"training.max_steps": 4}), run)
    data_file = next((run / "checkpoints" / "step-0000004").glob("*.distcp"))
    size = data_file.stat().st_size
    with open(data_file, "r+b") as fh:  # flip one byte in the middle: same size, different content
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert data_file.stat().st_size == size
    capsys.readouterr()
    train(small_cfg(dataset, **{"training.max_steps": 6}), run)
    err = capsys.readouterr().err
    assert "step-0000004 is damaged (checksum mismatch" in err and "step 2" in err
    assert losses(run) == losses(ref)


def test_injected_nan_skips_step_and_leaves_weights(dataset, tmp_path):
    from llama_pretrain.train.loop import train

    # bf16 autocast (fp32 master weights) here, to run the mixed-precision path and chunked loss too
    bf16 = {"parallel.mixed_precision": "bf16"}
    train(small_cfg(dataset, **{"training.max_steps": 2}, **bf16), tmp_path / "clean")
    train(small_cfg(dataset, **{"training.max_steps": 3, "training.debug_nan_at_step": 3}, **bf16), tmp_path / "nan")
    wc, wn = final_weights(tmp_path / "clean"), final_weights(tmp_path / "nan")
    for name in wc:
        assert torch.equal(wc[name], wn[name]), name  # step 3 changed nothing
    recs = read_metrics(tmp_path / "nan")
    assert recs[2]["step"] == 3 and recs[2]["loss"] is None and "skipped" in recs[2]
    assert "skipped" not in recs[1]


def test_nonfinite_in_a_row_stops_with_step(dataset, tmp_path):
    from llama_pretrain.errors import UserError
    from llama_pretrain.train.guards import NonFiniteGuard, SpikeDetector

    g = NonFiniteGuard(3)
    g.record(1, True)
    g.record(2, True)
    g.record(3, False)  # a finite step resets the count
    g.record(4, True)
    g.record(5, True)
    with pytest.raises(UserError, match="step 6"):
        g.record(6, True)
    s = SpikeDetector(sigma=4.0, warmup=5)
    flagged = [s.update(v) for v in [3.0, 3.01, 2.99, 3.0, 3.02, 2.98, 3.0, 6.0, 3.0]]
    assert flagged[7] is not None and all(f is None for i, f in enumerate(flagged) if i != 7)
    # Through the CLI: NaN every step for a limit of 1 stops at once, exit 2.
    rc = cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(tmp_path / "r"),
                   "--training.debug_nan_at_step=1", "--training.max_nonfinite_in_row=1"])
    assert rc == 2


def test_truncated_latest_checkpoint_falls_back(dataset, tmp_path, capsys):
    from llama_pretrain.train.loop import train

    ref = tmp_path / "ref"
    train(small_cfg(dataset, **{"training.max_steps": 6}), ref)
    run = tmp_path / "run"
    train(small_cfg(dataset, **{"training.max_steps": 4}), run)
    data_file = next((run / "checkpoints" / "step-0000004").glob("*.distcp"))
    with open(data_file, "r+b") as fh:
        fh.truncate(data_file.stat().st_size // 2)
    capsys.readouterr()
    train(small_cfg(dataset, **{"training.max_steps": 6}), run)
    err = capsys.readouterr().err
    assert "step-0000004 is damaged" in err and "falling back" in err
    assert "resuming from" in err and "step 2" in err
    assert losses(run) == losses(ref)  # steps 3..6 redone exactly, each logged once


def test_checkpoint_has_no_pickled_objects_and_rejects_foreign_metadata(dataset, tmp_path):
    import pickle

    from llama_pretrain.interop.training_checkpoint import MetadataUnpickler

    from llama_pretrain.train.loop import train
    train(small_cfg(dataset, **{"training.max_steps": 2}), tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints" / "step-0000002"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens_seen"] == 512 and state["loader"][0]["position"] == 16
    payload = pickle.dumps(print)  # anything outside DCP's metadata classes is refused
    import io
    with pytest.raises(pickle.UnpicklingError):
        MetadataUnpickler(io.BytesIO(payload)).load()


# -- config -------------------------------------------------------------------------------------------
def test_paper_configs_load_with_table1_values():
    expected_lr = {"7b": 3e-4, "13b": 3e-4, "34b": 1.5e-4, "70b": 1.5e-4}
    for size, lr in expected_lr.items():
        cfg = load_run_config(REPO / "configs" / f"llama2-{size}.toml")
        assert cfg.peak_lr == lr == cfg.model_config().peak_lr
        assert cfg.training.global_batch_tokens == 4_194_304 and cfg.seq_len == 4096
        assert (cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps) == (0.9, 0.95, 1e-5)
        assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.grad_clip == 1.0
        assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.min_lr_ratio == 0.1
        assert cfg.accumulation_steps(8) * 4096 * cfg.training.micro_batch_size * 8 == 4_194_304


def test_demo_toml_mirrors_builtin_demo_config():
    from llama_pretrain.train.demo import DEMO_CONFIG

    from_file = load_run_config(REPO / "configs" / "demo.toml").to_dict()
    builtin = load_run_config(None, [f"data.path={from_file['data']['path']}"], base=DEMO_CONFIG).to_dict()
    assert from_file == builtin


def test_default_lr_is_preset_peak_and_overrides_parse():
    cfg = load_run_config(None, ["model.preset=llama2-70b", "training.seq_len=2048", "model.n_layers=2",
                                 "parallel.compile=true", "data.path=123"])
    assert cfg.peak_lr == 1.5e-4 and cfg.model_config().n_layers == 2 and cfg.parallel.compile is True
    assert cfg.data.path == "123" and cfg.schedule.warmup_steps == 2000


def test_print_config_round_trips(tmp_path, capsys):
    assert cli_main(["train", "--config", str(REPO / "configs" / "llama2-13b.toml"), "--print-config",
                     "--training.max_steps=7", "--data.path=/some/where"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    again = load_run_config(printed)
    assert again.to_dict() == load_run_config(REPO / "configs" / "llama2-13b.toml",
                                              ["training.max_steps=7", "data.path=/some/where"]).to_dict()
    assert again.training.max_steps == 7 and again.data.path == "/some/where"


def test_model_none_override_reaches_config_and_round_trips(tmp_path, capsys):
    # TOML has no null: "none" is how n_kv_heads=None (no GQA) is asked for, and --print-config keeps it
    cfg = load_run_config(None, ["model.preset=llama2-debug", "model.n_kv_heads=none"])
    assert cfg.model_config().n_kv_heads is None and cfg.model_config().kv_heads == 4
    printed = tmp_path / "printed.toml"
    printed.write_text(cfg.to_toml())
    assert load_run_config(printed).model_config().kv_heads == 4
    with pytest.raises(UserError, match="model.dim must be an integer"):
        load_run_config(None, ["model.dim=none"])


def test_demo_sample_without_a_final_model_is_skipped(tmp_path):
    from llama_pretrain.train.demo import demo_sample

    assert demo_sample(tmp_path / "final", 4) is None  # checkpoint.export_final=false: no crash at the end


def test_fused_adamw_matches_foreach():
    import copy

    torch.manual_seed(0)
    a = Transformer(ModelConfig.from_preset("llama2-debug"))
    b = copy.deepcopy(a)
    oa = build_optimizer(a, 1e-2, implementation="foreach")
    ob = build_optimizer(b, 1e-2, implementation="fused")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for m in (a, b):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def _toml(tmp_path: Path, data: Path, extra: str = "") -> Path:
    p = tmp_path / "run.toml"
    p.write_text(f"""
[model]
preset = "llama2-debug"
[data]
path = "{data}"
[training]
max_steps = 2
seq_len = 32
micro_batch_size = 2
global_batch_tokens = 128
eval_every_steps = 0
[schedule]
warmup_steps = 10
[logging]
progress = false
peak_flops = 1e11
[parallel]
mixed_precision = "fp32"
{extra}
""")
    return p


@pytest.mark.parametrize("args, message", [
    (["--data.path=/nonexistent/shards"], "not a prepared dataset"),
    (["--model.vocab_size=1024"], "vocabulary of 512"),
    (["--training.global_batch_tokens=100"], "not a multiple"),
    (["--training.max_steps=abc"], "must be an integer"),
    (["--optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["--training.seq_len=4096"], "exceeds model.max_seq_len"),
    (["--out", "somewhere"], "only go with --export-checkpoint"),
])
def test_bad_input_exits_2_with_one_line(dataset, tmp_path, capsys, args, message):
    rc = cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_bad_toml_type_and_unknown_key(dataset, tmp_path, capsys):
    bad = _toml(tmp_path, dataset, "[checkpoint]\nevery_steps = \"often\"\n")
    assert cli_main(["train", "--config", str(bad), "--print-config"]) == 2
    assert "checkpoint.every_steps must be an integer" in capsys.readouterr().err
    bad.write_text(bad.read_text().replace("every_steps = \"often\"", "evry_steps = 3"))
    assert cli_main(["train", "--config", str(bad), "--print-config"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_run_dir_of_another_run_is_refused_untouched(dataset, tmp_path, capsys):
    run = tmp_path / "r"
    assert cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(run)]) == 0
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(run),
                   "--model.dim=128", "--training.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run" in err and "model.dim" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    # the same run with max_steps below its checkpoint's step would re-export later weights as its own
    rc = cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(run),
                   "--training.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "past training.max_steps=1" in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    # a run dir that is a file is a one-line error
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"
    # --resume without a checkpoint is an error too
    assert cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir",
                     str(tmp_path / "empty"), "--resume"]) == 2


def test_final_export_loads_and_plot(dataset, tmp_path):
    from llama_pretrain.interop import load_model

    run = tmp_path / "r"
    assert cli_main(["train", "--config", str(_toml(tmp_path, dataset)), "--run-dir", str(run),
                     "--training.eval_every_steps=1"]) == 0
    model = load_model(run / "final")
    assert model.config.dim == 64
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_seen"] == 256 and summary["final_val_loss"] is not None
    rec = read_metrics(run)[0]
    for key in ("step", "loss", "perplexity", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "val_loss"):
        assert key in rec
    # export of a training checkpoint gives the same weights as final/
    out = tmp_path / "exported"
    assert cli_main(["train", "--export-checkpoint", str(run / "checkpoints" / "step-0000002"),
                     "--out", str(out)]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(out / "model.safetensors"))
    for k, v in final_weights(run).items():
        assert torch.equal(v, exported[k])
    # an existing --out is not replaced unless --force
    ckpt = str(run / "checkpoints" / "step-0000002")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert cli_main(["train", "--export-checkpoint", ckpt, "--out", str(keep)]) == 2
    assert (keep / "notes.txt").read_text() == "mine" and not (keep / "model.safetensors").exists()
    # --force replaces an earlier export only, never a directory holding the user's files
    assert cli_main(["train", "--export-checkpoint", ckpt, "--out", str(keep), "--force"]) == 2
    assert (keep / "notes.txt").read_text() == "mine" and not (keep / "model.safetensors").exists()
    assert cli_main(["train", "--export-checkpoint", ckpt, "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file()
    png = tmp_path / "fig5.png"
    assert cli_main(["plot", str(run), str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", str(tmp_path / "nope"), "--out", str(png)]) == 2
    # an unknown image format is a one-line error, and nothing is written
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "fig5.txt")]) == 2
    assert not (tmp_path / "fig5.txt").exists()
    # a damaged run.json only costs the label
    (run / "run.json").write_text('{"identity": {}}')
    assert cli_main(["plot", str(run), "--out", str(png)]) == 0


def test_mfu_never_exceeds_one_when_the_startup_peak_was_measured_on_a_busy_machine(dataset, tmp_path, monkeypatch):
    from llama_pretrain.train import metrics
    from llama_pretrain.train.loop import train

    real = metrics.resolve_precision

    def busy_machine(device, requested="auto", configured_peak=0.0):
        precision, _, _ = real(device, requested, 0.0)
        return precision, 1e6, "measured fp32 matmul (1024^3) on this CPU"  # far too low

    monkeypatch.setattr(metrics, "resolve_precision", busy_machine)
    cfg = small_cfg(dataset, **{"logging.peak_flops": 0})
    train(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert records and all(0 < r["mfu"] <= 1.0 for r in records)


def test_tensorboard_mirrors_metrics_and_a_resume_does_not_duplicate_steps(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llama_pretrain.train.loop import train

    run = tmp_path / "run"
    cfg = small_cfg(dataset, **{"logging.tensorboard": "on", "training.max_steps": 4})
    train(cfg, run)
    # As if killed after step 4 was logged but before its checkpoint: the resume re-does 3 and 4.
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    train(cfg, run)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    logged = losses(run)
    for e in events:
        assert e.value == pytest.approx(logged[e.step], rel=1e-6)
