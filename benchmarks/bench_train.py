"""Training-step throughput: llama-pretrain vs transformers.LlamaForCausalLM on CPU, same run.

Both models have the same shape (preset llama2-small: dim 512, 8 layers, GQA 8/4, FFN 1536, vocab
32000) and are trained on the same batches at sequence 512 with the same step: forward, mean
cross-entropy in fp32, backward, clip to 1.0, fused AdamW (0.9, 0.95, eps 1e-5, wd 0.1 on linear
weights; the default of our loop and of the HF Trainer). Each precision is compared like for like:
fp32 for both, then bf16 autocast for both. Our side uses the trainer's loss entry point,
``model(inputs, targets)`` (``losses.py``: the output head fused with the cross-entropy, no
logits kept), theirs the upcast-then-CE of LlamaForCausalLM. Steps alternate between the two models
so machine noise hits both alike; the median step time is reported. MFU uses FLOPs/token =
6*N_non_embedding + 12*L*H*Q*T against the best matmul rate of the same precision measured here at
start-up. Besides wall time, the ratio of median CPU time per step (all threads) is printed, which
waiting for a core on a shared machine does not inflate.

``--compile ours`` adds a row for our model compiled per block as the trainer does with
``parallel.compile=true`` (``apply_compile``, Inductor), a copy of the same weights, so its first
loss must equal the eager one; ``--compile both`` adds transformers' decoder layers compiled the
same way. Every ratio is against eager transformers; the compilation (warm-up step minus median
step) is printed apart. ``--profile`` first prints the top non-matmul ops of one eager step of ours.
``--trainer`` times the trainer itself (``Trainer.train_step``: its loader, non-finite guard,
global-norm clip and schedule around the same model step, on a synthetic dataset) in place of
the bare model step. ``--isolated N`` runs the two sides of ``--trainer`` in separate fresh
processes instead (transformers, then the trainer, N rounds): no model's memory churn can slow the
other's step, as a user runs one of them.

    python benchmarks/bench_train.py [--steps 4] [--batch 4] [--seq 512] [--precision both]
        [--compile none|ours|both] [--profile] [--trainer] [--isolated N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg)
    model.config.use_cache = False
    return model


def make_step(model, loss_of, precision: str):
    """One optimizer step as the training loop does it: forward and fp32 loss (under bf16 autocast
    when asked), backward, clip 1.0, fused AdamW (the default of our loop and of the HF Trainer)."""
    from llama_pretrain.train.optim import build_optimizer

    opt = build_optimizer(model, 1e-3, implementation="fused")
    params = list(model.parameters())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            loss = loss_of(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainer_step(args, precision: str, stack):
    """The trainer's own ``Trainer.train_step`` (the loop's step: loader, accumulation, non-finite
    guard, global-norm clip, fused AdamW, LR schedule) on a synthetic prepared dataset of the same
    shape; the benchmark's batch is ignored (the trainer reads its own)."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_loop_check import make_dataset  # random-token shards

    from llama_pretrain.train.config import load_run_config
    from llama_pretrain.train.loop import Trainer, preflight
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.runlock import RunLock

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
    tokens = args.batch * args.seq
    data = make_dataset(tmp / "data", 32000, tokens * (args.steps + 3))
    cfg = load_run_config(None, [f"{k}={v}" for k, v in {
        "model.preset": "llama2-small", "data.path": str(data), "training.seq_len": args.seq,
        "training.micro_batch_size": args.batch, "training.global_batch_tokens": tokens,
        "training.max_steps": args.steps + 1, "training.device": "cpu", "training.eval_every_steps": 0,
        "checkpoint.every_steps": 0, "logging.progress": False, "logging.tensorboard": "off",
        "logging.peak_flops": 1e11, "parallel.mixed_precision": precision}.items()])
    info = DistInfo()
    run_dir = tmp / "run"
    lock = stack.enter_context(RunLock(run_dir, info))
    trainer = Trainer(cfg, preflight(cfg, run_dir, info, False, lock), info)
    return lambda batch: trainer.train_step().loss


def hf_loss(logits, targets):  # what LlamaForCausalLM's loss does: upcast the logits, then CE
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def compile_blocks(model) -> None:
    """Compile each block in place: for ours the trainer's ``parallel.compile=true``
    (``apply_compile``), for transformers its decoder layers the same way. Compilation itself
    happens lazily, in the first (warm-up) step, which is timed separately."""
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import apply_compile

    if hasattr(model, "layers"):
        apply_compile(model, ParallelConfig(compile=True), DistInfo())
    else:
        for layer in model.model.layers:
            layer.compile(fullgraph=False)


def compare(precision: str, args, cfg, peak: float, fpt: float) -> float:
    import contextlib

    with contextlib.ExitStack() as stack:
        return _compare(precision, args, cfg, peak, fpt, stack)


def _compare(precision: str, args, cfg, peak: float, fpt: float, stack) -> float:
    import copy

    from llama_pretrain.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(cfg)
    theirs = hf_model(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    # --trainer: the trainer's own step instead of the bare model step, so that two models are alive
    # as without it: with a third one alive, transformers' step (which allocates ~1 GB of fresh
    # logits buffers each step) took 3-6 s of kernel time instead of 0.6 s on the 2-core sandbox.
    models = {"transformers": theirs} if args.trainer else {"llama-pretrain": ours, "transformers": theirs}
    if args.trainer:
        del ours
    if args.side == "trainer":  # --isolated: only the trainer's model alive in this process
        models = {}
        del theirs
    # Compiled rows are copies of the same weights, so their first loss must equal the eager one.
    if args.compile in ("ours", "both"):
        models["llama-pretrain compiled"] = copy.deepcopy(ours)
    if args.compile == "both":
        models["transformers compiled"] = copy.deepcopy(theirs)
    steps = {}
    for name, m in models.items():
        if name.endswith("compiled"):
            compile_blocks(m)
        if name.startswith("llama-pretrain"):
            steps[name] = make_step(m, m, precision)  # the trainer's loss entry point
        else:
            steps[name] = make_step(m, lambda x, y, m=m: hf_loss(m(input_ids=x).logits, y), precision)
    if args.trainer and args.side != "transformers":
        steps["llama-pretrain Trainer.train_step"] = trainer_step(args, precision, stack)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(args.steps + 1)]
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    first, warm = {}, {}
    for i, batch in enumerate(batches):
        for name, fn in steps.items():  # alternate, so machine noise hits all alike
            t0, c0 = time.perf_counter(), time.process_time()
            loss = fn(batch)
            if i:  # the first step of each is warm-up (for the compiled rows: the compilation)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            else:
                first[name], warm[name] = loss, time.perf_counter() - t0
    tokens = args.batch * args.seq
    if args.side != "both":  # one side of --isolated: its medians for the parent process
        name, = times
        print("RESULT " + json.dumps({"name": name, "step_s": statistics.median(times[name]),
                                      "cpu_s": statistics.median(cpu[name]), "first_loss": first[name]}))
        return 0.0
    rates = {}
    print(f"[{precision}] MFU against the measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name in times:
        med = statistics.median(times[name])
        rates[name] = tokens / med
        print(f"  {name:>23}: {rates[name]:7.0f} tokens/s  (median step {med:.2f} s of {len(times[name])})  "
              f"MFU {100 * rates[name] * fpt / peak:5.1f}%  first loss {first[name]:.6f}  "
              f"warm-up step {warm[name]:.1f} s")
    base = "transformers"
    for name in times:
        if name == base:
            continue
        ratio = rates[name] / rates[base]
        # CPU seconds per step (all threads) as well: on a machine shared with other jobs, wall time
        # also counts the time this process waited for a core; CPU time counts only the work.
        cpu_ratio = statistics.median(cpu[base]) / statistics.median(cpu[name])
        print(f"  ratio {name} / {base}: {ratio:.2f}x  (by median CPU time per step: "
              f"{statistics.median(cpu[name]):.2f} s vs {statistics.median(cpu[base]):.2f} s, "
              f"{cpu_ratio:.2f}x; load average {os.getloadavg()[0]:.2f})")
    for name in times:
        if name.endswith("compiled"):
            eager = name.removesuffix(" compiled")
            compile_s = warm[name] - statistics.median(times[name])
            print(f"  {name}: compilation ~{compile_s:.1f} s (its warm-up step minus its median step); "
                  f"first loss minus the eager one's {first[name] - first[eager]:+.2e}")
    if "transformers compiled" in rates:
        print(f"  ratio llama-pretrain compiled / transformers compiled: "
              f"{rates['llama-pretrain compiled'] / rates['transformers compiled']:.2f}x")
    return rates["llama-pretrain Trainer.train_step" if args.trainer else "llama-pretrain"] / rates[base]


def profile(args, cfg) -> None:
    """Where one eager fp32 step of ours spends its time outside the matmuls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from llama_pretrain.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg)
    step = make_step(model, model, "fp32")
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    step(batch)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    # addmm_: the fused head's weight-gradient accumulation (losses.py), a matmul at full rate.
    matmul = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
    mm = sum(e.self_cpu_time_total for e in events if e.key in matmul)
    print(f"profile, one eager fp32 step of ours: self CPU {total / 1e6:.2f} s, matmuls + SDPA "
          f"{100 * mm / total:.0f}%; top 10 other ops by self CPU time:")
    rest = sorted((e for e in events if e.key not in matmul), key=lambda e: -e.self_cpu_time_total)
    for e in rest[:10]:
        print(f"  {e.key:<45} {e.self_cpu_time_total / 1e3:8.1f} ms  {100 * e.self_cpu_time_total / total:5.1f}%"
              f"  {e.count:5d} calls")


def parts(args) -> None:
    """The pieces our step chose by measurement: the AdamW kernel and the loss."""
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.model import Transformer
    from llama_pretrain.losses import chunked_cross_entropy, linear_cross_entropy
    from llama_pretrain.train.optim import build_optimizer

    model = Transformer(ModelConfig.from_preset("llama2-small"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for impl in ("for-loop", "foreach", "fused"):
        opt = build_optimizer(model, 1e-3, implementation=impl)
        ts = []
        for _ in range(4):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        print(f"AdamW {impl:>8} step, 57.9M params: {statistics.median(ts[1:]):.3f} s")
    targets = torch.randint(0, 32000, (2048,))
    # The output head and the loss together: nn.Linear's logits then the chunked loss, or fused.
    h = torch.randn(2048, 512, requires_grad=True)
    w = (torch.randn(32000, 512) * 0.02).requires_grad_()
    for dtype in (torch.float32, torch.bfloat16):
        res = {"linear + chunked loss": [], "fused (linear_cross_entropy)": []}
        for _ in range(6):
            for name in res:
                h.grad = w.grad = None
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    if name.startswith("linear"):
                        loss = chunked_cross_entropy(F.linear(h, w), targets)
                    else:
                        loss = linear_cross_entropy(h, w, targets)
                loss.backward()
                res[name].append(time.perf_counter() - t0)
        for name, ts in res.items():
            print(f"head + loss fwd+bwd 2048 x 512 -> 32000 {str(dtype)[6:]:>8} {name}: "
                  f"{statistics.median(ts[1:]):.3f} s")
    for dtype in (torch.float32, torch.bfloat16):
        res = {"F.cross_entropy(logits.float())": [], "chunked (64 rows)": []}
        for _ in range(6):
            for name in res:
                logits = torch.randn(2048, 32000).to(dtype).requires_grad_()
                t0 = time.perf_counter()
                if name.startswith("F."):
                    F.cross_entropy(logits.float(), targets).backward()
                else:
                    chunked_cross_entropy(logits, targets, chunk_rows=64).backward()
                res[name].append(time.perf_counter() - t0)
        for name, ts in res.items():
            print(f"loss fwd+bwd 2048 x 32000 {str(dtype)[6:]:>8} {name}: {statistics.median(ts[1:]):.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                    help="compute precision of both models (bf16: autocast, fp32 master weights)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--parts", action="store_true", help="also time the AdamW kernels and the two losses")
    ap.add_argument("--compile", choices=["none", "ours", "both"], default="none",
                    help="add rows compiled per block (inductor, the trainer's parallel.compile=true): "
                         "ours, or ours and transformers' decoder layers; the eager rows stay")
    ap.add_argument("--profile", action="store_true", help="profile one eager fp32 step of ours first")
    ap.add_argument("--trainer", action="store_true",
                    help="time the trainer's own Trainer.train_step (its loader, guards and schedule; "
                         "eager, the default parallel settings) on a synthetic dataset instead of the "
                         "bare model step")
    ap.add_argument("--isolated", type=int, default=0, metavar="N",
                    help="with --trainer: each side in its own fresh process, N rounds, alternating")
    ap.add_argument("--side", choices=["both", "transformers", "trainer"], default="both",
                    help=argparse.SUPPRESS)  # one side of --isolated
    args = ap.parse_args()
    if args.trainer and args.compile != "none":
        ap.error("--trainer times the eager trainer; drop --compile (or run them separately)")
    if (args.isolated or args.side != "both") and not (args.trainer and args.precision != "both"):
        ap.error("--isolated needs --trainer and one --precision")
    if args.isolated:
        return isolated(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parts:
        parts(args)

    from llama_pretrain.compute.flops import flops_per_token
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.train.metrics import measure_matmul_peak

    cfg = ModelConfig.from_preset("llama2-small")
    fpt = flops_per_token(cfg, args.seq)
    print(f"config: llama2-small (dim {cfg.dim}, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.kv_heads}, "
          f"FFN {cfg.hidden_dim}, vocab {cfg.vocab_size}), batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads; FLOPs/token {fpt / 1e6:.1f}M (6N+12LHQT)")
    if args.profile:
        profile(args, cfg)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = measure_matmul_peak("cpu", 1024, dtype)
        compare(precision, args, cfg, peak, fpt)


def isolated(args) -> None:
    """--isolated: transformers' step and the trainer's, each in a fresh process, alternating."""
    import subprocess
    import sys

    base = [sys.executable, __file__, "--trainer", "--precision", args.precision, "--steps", str(args.steps),
            "--batch", str(args.batch), "--seq", str(args.seq)]
    base += ["--threads", str(args.threads)] if args.threads else []
    ratios, cpu_ratios = [], []
    for r in range(args.isolated):
        res = {}
        for side in ("transformers", "trainer"):
            out = subprocess.run(base + ["--side", side], capture_output=True, text=True, check=True).stdout
            res[side] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        t, o = res["transformers"], res["trainer"]
        ratios.append(t["step_s"] / o["step_s"])
        cpu_ratios.append(t["cpu_s"] / o["cpu_s"])
        print(f"round {r + 1}: transformers {t['step_s']:.2f} s/step (CPU {t['cpu_s']:.2f} s), trainer "
              f"{o['step_s']:.2f} s/step (CPU {o['cpu_s']:.2f} s): {ratios[-1]:.2f}x (CPU {cpu_ratios[-1]:.2f}x); "
              f"first losses {t['first_loss']:.6f} / {o['first_loss']:.6f}; load average {os.getloadavg()[0]:.2f}")
    print(f"[{args.precision}, separate processes] trainer / transformers: {min(ratios):.2f}-{max(ratios):.2f}x "
          f"(median {statistics.median(ratios):.2f}x; by CPU time {statistics.median(cpu_ratios):.2f}x) "
          f"over {args.isolated} rounds of {args.steps} timed steps")


if __name__ == "__main__":
    main()
