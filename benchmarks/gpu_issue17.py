"""Issue 17 part 4 in one call on one GPU: our trainer against torchtitan 0.3.0, memory, 7B, float8.

Parts, in order of importance, each in its own process with a time budget (a failed or timed-out
part prints its error and the next one runs); one JSON line per part to stdout and to --out:

  env        nvidia-smi, torch / CUDA versions
  a_ours     `llama-pretrain train` under torchrun: llama2-1b, seq 4096, bf16, FSDP2 + compile
             (synthetic shards; median tokens/s and MFU of the steps after compilation)
  b_titan    torchtitan 0.3.0's Trainer on the same Llama 2 shape (FFN hidden by Meta's rule, vocab
             32000, rope theta 10000, no weight tying, no activation checkpointing), batch and
             sequence, bf16 FSDP + compile, random tokens; both parameter counts
  d_memory   peak max_memory_allocated above the model in one training step: our model vs
             transformers' LlamaForCausalLM (same config, fp32 and bf16 autocast), with full and,
             where `parallelize` offers it, selective activation checkpointing
  c_7b       llama2-7b, all 32 layers, FSDP2 + compile + activation checkpointing (benchmarks/
             gpu_train.py): tokens/s, MFU, peak memory against compute.memory's estimate
  e_float8   torchao float8 linears vs bf16, 50 steps each on the same batches: tokens/s, losses
  f_float8_trainer
             part a again with the trainer's `parallel.float8`: tokens/s, MFU, float8 layer count
  summary    the ratio ours / torchtitan tokens/s, and the elapsed time

    python benchmarks/gpu_issue17.py --out issue17.jsonl            # on the GPU, < 540 s
    python benchmarks/gpu_issue17.py --smoke --out /tmp/s.jsonl     # tiny shapes on the CPU

torchtitan and torchao are not on the device machine: `--download-wheels DIR` fetches them (and
torchtitan's small pure-Python needs) on a machine with the package index, for carrying.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_train, gpu_loop_check

# name: (seconds budget on the GPU, seconds in --smoke)
PARTS = {"a_ours": (150, 120), "b_titan": (170, 120), "d_memory": (80, 120), "c_7b": (150, 120),
         "e_float8": (150, 120), "f_float8_trainer": (120, 120)}
WHEELS = ["torchtitan==0.3.0", "torchdata==0.11.0", "torch_checkpointing==0.1.1", "tyro==1.0.17",
          "docstring-parser==0.18.0", "typeguard==4.6.1", "einops==0.8.2", "spmd_types==0.2.3",
          "torchao==0.18.0"]


def shape(args):
    """The Llama config both trainers build, as our ModelConfig."""
    from llama_pretrain.config import ModelConfig

    if args.smoke:
        return ModelConfig.from_preset("llama2-debug", max_seq_len=64)
    return ModelConfig.from_preset("llama2-1b", max_seq_len=args.seq_len)


def sizes(args) -> tuple[int, int, int]:
    """(seq_len, micro_batch, steps) of parts a and b."""
    return (64, 2, 6) if args.smoke else (args.seq_len, args.micro_batch, args.steps)


def median_after(values: list[float], skip: int) -> float:
    return statistics.median(values[skip:] or values)


# ---------------------------------------------------------------- a: our trainer
def part_a_ours(args) -> dict:
    return _ours(args, "a_ours", [])


def part_f_float8_trainer(args) -> dict:
    """The trainer's own ``parallel.float8`` (as a user runs it), on part a's shape and batch."""
    import torch

    extra = ["--parallel.float8=true"] + ([] if torch.cuda.is_available() else ["--parallel.float8_emulate=true"])
    return _ours(args, "f_float8_trainer", extra)


def _ours(args, name: str, extra: list[str]) -> dict:
    import re

    import torch

    from gpu_loop_check import make_dataset

    cfg = shape(args)
    seq, mb, steps = sizes(args)
    out = Path(args.workdir) / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = make_dataset(out / "data", cfg.vocab_size, seq * mb * (steps + 4) + 10_000)
    (out / "run.toml").write_text(f'[data]\npath = "{data}"\n')
    cuda = torch.cuda.is_available()
    precision = ["--parallel.compile=true", "--parallel.mixed_precision=bf16"] if cuda else [
        f"--parallel.compile={str(args.compile).lower()}", "--parallel.mixed_precision=fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "llama_pretrain", "train", "--config", str(out / "run.toml"), "--run-dir", str(out / "run"),
           f"--model.preset={'llama2-debug' if args.smoke else 'llama2-1b'}",
           f"--model.vocab_size={cfg.vocab_size}", f"--training.seq_len={seq}",
           f"--training.micro_batch_size={mb}", f"--training.global_batch_tokens={seq * mb}",
           f"--training.max_steps={steps}", "--schedule.warmup_steps=2", "--training.eval_every_steps=0",
           "--logging.progress=false", "--checkpoint.every_steps=0", "--checkpoint.export_final=false",
           "--parallel.mode=fsdp", *precision, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-pretrain train failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    float8 = re.search(r"float8 matmuls \(\w+\) in (\d+) linear layers", r.stdout + r.stderr)
    recs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if "tokens_per_s" in x]
    skip = min(3, len(recs) - 1)  # the first steps compile
    return {"preset": "llama2-debug" if args.smoke else "llama2-1b", "seq_len": seq, "micro_batch": mb,
            "steps": len(recs), "timed_steps": len(recs) - skip,
            "tokens_per_s": round(median_after([x["tokens_per_s"] for x in recs], skip)),
            "mfu": round(median_after([x["mfu"] for x in recs], skip), 4),
            "loss_first": round(recs[0]["loss"], 4), "loss_last": round(recs[-1]["loss"], 4),
            "float8_layers": int(float8.group(1)) if float8 else 0}


# ---------------------------------------------------------------- b: torchtitan
def _titan_on_cpu() -> None:
    """Let torchtitan 0.3.0 import and run without a GPU (the --smoke check only; none of this
    runs where CUDA is).

    Its MoE dispatch kernels import triton at module level (the dense Llama never calls them); it
    picks its device once at import, falling back to "cuda", and asks it for memory statistics;
    and its FlexAttention has no CPU backward."""
    import types

    try:
        import triton  # noqa: F401
    except ImportError:
        name = "torchtitan.distributed.minimal_async_ep.kernels"
        stub = types.ModuleType(name)
        stub.__file__ = "<no triton on this machine>"

        def missing(*a, **k):
            raise RuntimeError("needs triton")

        for fn in ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
                   "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
                   "reduce_topk_slots_kernel", "topk_scores_grad_kernel"):
            setattr(stub, fn, missing)
        sys.modules[name] = stub
    import torch
    from torchtitan.tools import utils

    class CPUModule(types.SimpleNamespace):
        """torch.cpu plus the few torch.cuda calls torchtitan makes (no memory statistics)."""

        def __getattr__(self, name):
            return getattr(torch.cpu, name)

        get_device_name = staticmethod(lambda *a: "cpu")
        get_device_properties = staticmethod(lambda *a: types.SimpleNamespace(total_memory=1 << 40))
        memory_stats = staticmethod(lambda *a: {})
        reset_peak_memory_stats = empty_cache = staticmethod(lambda *a: None)
        set_device = staticmethod(lambda *a: None)
        device_count = staticmethod(lambda: 1)
        current_device = staticmethod(lambda: 0)

    utils.device_type, utils.device_module = "cpu", CPUModule()

    # FlexAttention has no backward on the CPU: there, the same causal attention through SDPA
    # (each row is one document, so the block mask is the causal one).
    from torchtitan.models.common.attention import FlexAttention

    def causal_sdpa(q, k, v, *, scale=None, enable_gqa=False, return_aux=None, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                               enable_gqa=enable_gqa)
        return out, None

    FlexAttention.compiled_flex_attn = staticmethod(causal_sdpa)


def titan_config(cfg, seq: int, mb: int, steps: int, workdir: str, compile: bool, cuda_graphs: bool):
    """torchtitan's Trainer.Config for our ModelConfig ``cfg``: same shape, batch and sequence,
    its default bf16 FSDP mixed precision, its chunked cross-entropy, AdamW, no checkpointing,
    no activation checkpointing, random tokens from the loader below."""
    from dataclasses import dataclass

    import torch
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.components.tokenizer import BaseTokenizer
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import _build_llama3_layers, parallelize_llama
    from torchtitan.models.llama3.model import Llama3Model
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    vocab = cfg.vocab_size

    class NoTokenizer(BaseTokenizer):
        """The Trainer builds a tokenizer for its loaders; random tokens need none."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            pass

        def __init__(self, config, tokenizer_path=None, **kwargs):
            super().__init__()

        def encode(self, *a, **k):
            raise NotImplementedError

        def decode(self, *a, **k):
            raise NotImplementedError

        def get_vocab_size(self) -> int:
            return vocab

    class RandomTokens(BaseDataLoader):
        """Batches of uniform random tokens, one document per row (so its block-causal mask is
        the plain causal one that our model uses)."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            pass

        def __init__(self, config, *, seq_len: int, local_batch_size: int, **kwargs):
            self.seq_len, self.batch = seq_len, local_batch_size

        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            positions = torch.arange(self.seq_len).expand(self.batch, -1)
            while True:
                x = torch.randint(0, vocab, (self.batch, self.seq_len + 1), generator=gen)
                yield {"input": x[:, :-1], "positions": positions}, x[:, 1:]

        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass

    norm = {"weight": torch.nn.init.ones_}
    init = {"weight": lambda t: torch.nn.init.normal_(t, std=0.02), "bias": torch.nn.init.zeros_}
    model = Llama3Model.Config(
        dim=cfg.dim, vocab_size=vocab, enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=cfg.dim, param_init=init),
        norm=RMSNorm.Config(normalized_shape=cfg.dim, eps=cfg.norm_eps, param_init=norm),
        lm_head=Linear.Config(in_features=cfg.dim, out_features=vocab, param_init=init),
        layers=_build_llama3_layers(
            n_layers=cfg.n_layers, dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            hidden_dim=cfg.hidden_dim, fuse_qkv=True, attn_backend="flex",
            rope=ComplexRoPE.Config(dim=cfg.dim // cfg.n_heads, max_seq_len=seq, theta=cfg.rope_theta,
                                    scaling="none")))
    for _, layer_norm, _, _ in model.traverse(RMSNorm.Config):
        layer_norm.eps = cfg.norm_eps
    spec = ModelSpec(name="llama3", flavor="llama2-shape", model=model, parallelize_fn=parallelize_llama,
                     pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)
    return Trainer.Config(
        model_spec=spec, dump_folder=workdir, hf_assets_path=workdir,
        tokenizer=NoTokenizer.Config(), dataloader=RandomTokens.Config(),
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab)),
        optimizer=default_adamw(lr=1e-4),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=None),
        training=TrainingConfig(local_batch_size=mb, seq_len=seq, steps=steps,
                                disable_cuda_graphs=not cuda_graphs),
        metrics=MetricsProcessor.Config(log_freq=1, disable_color_printing=True),
        checkpoint=CheckpointManager.Config(enable=False),
        activation_checkpoint=None,
        compile=CompileConfig(enable=compile, components=["model", "loss"]))


def part_b_titan(args) -> dict:
    import torch

    from llama_pretrain.compute.flops import param_counts

    cuda = torch.cuda.is_available()
    if not cuda:
        _titan_on_cpu()
    if not hasattr(torch.distributed, "set_timeout"):
        # torchtitan 0.3.0 calls this newer public name after step 1 (to shorten the collective
        # timeout); released torch (2.11 on the device, 2.13 here) has only the private one.
        from torch.distributed.distributed_c10d import _set_pg_timeout

        torch.distributed.set_timeout = lambda timeout, group=None: _set_pg_timeout(timeout, group)
    import torchtitan
    from torchtitan.trainer import Trainer

    cfg = shape(args)
    seq, mb, steps = sizes(args)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29600 + os.getpid() % 1000)}.items():
        os.environ.setdefault(k, v)
    workdir = str(Path(args.workdir) / "b_titan")
    config = titan_config(cfg, seq, mb, steps, workdir, compile=args.compile or cuda,
                          cuda_graphs=cuda and args.titan_cuda_graphs)
    trainer = Trainer(config)
    logged = []
    mp = trainer.metrics_processor
    inner = mp.logger.log
    mp.logger.log = lambda metrics, step: (logged.append(dict(metrics, step=step)), inner(metrics, step))
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
    skip = min(3, len(logged) - 1)
    ours = param_counts(cfg).total
    return {"torchtitan": getattr(torchtitan, "__version__", "?"), "seq_len": seq, "micro_batch": mb,
            "steps": len(logged), "timed_steps": len(logged) - skip,
            "tokens_per_s": round(median_after([x["throughput(tps)"] for x in logged], skip)),
            "mfu": round(median_after([x.get("mfu(%)", 0.0) for x in logged], skip) / 100, 4),
            "flops_per_token": mp.num_flops_per_token, "peak_flops": mp.gpu_peak_flops,
            "max_reserved_gib": round(max(x["memory/max_reserved(GiB)"] for x in logged), 2),
            "loss_first": round(logged[0]["loss_metrics/global_avg_loss"], 4),
            "loss_last": round(logged[-1]["loss_metrics/global_avg_loss"], 4),
            "params_torchtitan": params, "params_ours": ours, "params_match": params == ours,
            "cuda_graphs": cuda and args.titan_cuda_graphs}


# ---------------------------------------------------------------- d: memory above the model
def _step_memory(model, run, device) -> dict:
    """Bytes above what is allocated before the forward (weights and gradients of an earlier step),
    at the peak of forward + backward, for the second of two steps."""
    import torch

    cuda = device.type == "cuda"
    out = {}
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        loss = run()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        out = {"above_model_bytes": (torch.cuda.max_memory_allocated() - base) if cuda else None,
               "model_bytes": base if cuda else None, "step_s": round(time.perf_counter() - t0, 4),
               "loss": round(float(loss.detach()), 5)}
    return out


def part_d_memory(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_train import ac_modes
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.model import Transformer
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import parallelize

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = ModelConfig.from_preset("llama2-debug" if args.smoke else "llama2-small")
    B, T = (2, 64) if args.smoke else (8, 1024)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max(T, cfg.max_seq_len),
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    result = {"preset": "llama2-debug" if args.smoke else "llama2-small", "batch": B, "seq_len": T,
              "ac_modes_offered": list(ac_modes()), "cases": {}}
    for precision in ("fp32", "bf16-autocast"):
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision != "fp32")
        cases = [("ours", "none"), ("transformers", "none"), ("ours", "full"), ("transformers", "full")]
        cases += [("ours", "selective")] if "selective" in ac_modes() else []
        for who, ac in cases:
            torch.manual_seed(0)
            if who == "ours":
                model = Transformer(cfg).to(dev)
                if ac != "none":
                    from gpu_train import ac_argument
                    model = parallelize(model, ParallelConfig(activation_checkpointing=ac_argument(ac)),
                                        DistInfo(device=dev))

                def run(model=model, amp=amp):
                    with amp:
                        return model(x[:, :-1], x[:, 1:])
            else:
                model = LlamaForCausalLM(hf_cfg).to(dev)
                if ac == "full":
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()

                def run(model=model, amp=amp):
                    with amp:
                        return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            result["cases"][f"{precision}/{who}/ac-{ac}"] = _step_memory(model, run, dev)
            del model
            if cuda:
                torch.cuda.empty_cache()
        c = result["cases"]
        for ac in ("none", "full"):
            a, b = c[f"{precision}/ours/ac-{ac}"], c[f"{precision}/transformers/ac-{ac}"]
            if a["above_model_bytes"] and b["above_model_bytes"]:
                result[f"ratio_{precision}_ac-{ac}"] = round(a["above_model_bytes"] / b["above_model_bytes"], 3)
    if not cuda:
        result["note"] = "no max_memory_allocated on the CPU: steps run, bytes are null"
    return result


# ---------------------------------------------------------------- c: llama2-7b, e: float8
def _gpu_train_args(args, **over):
    import gpu_train

    p = argparse.Namespace(preset="llama2-7b", n_layers=0, seq_len=4096, micro_batch=2, steps=6, warmup=2,
                           mode="fsdp", compile=True, ac="full", vocab_size=0, lr=1e-4, float8=False,
                           losses=False)
    vars(p).update(over)
    if args.smoke:
        p.preset, p.seq_len, p.micro_batch, p.steps, p.warmup, p.compile = "llama2-debug", 64, 2, 3, 1, args.compile
    return gpu_train, p


def part_c_7b(args) -> dict:
    import torch

    from llama_pretrain.compute.memory import training_memory
    from llama_pretrain.config import ModelConfig

    gpu_train, p = _gpu_train_args(args, micro_batch=args.micro_batch_7b)
    for mb in ([p.micro_batch, 1] if p.micro_batch > 1 else [1]):
        p.micro_batch = mb
        try:
            r = gpu_train.run_one(p)
            break
        except torch.OutOfMemoryError as e:  # one smaller try; the budget holds no more
            r = {"oom_at_micro_batch": mb, "error": str(e)[:200]}
        gc.collect()  # the failed try's model and optimizer, held by the traceback until here
        torch.cuda.empty_cache()
    if "tokens_per_s" not in r:
        return r
    cfg = ModelConfig.from_preset(p.preset, max_seq_len=p.seq_len)
    est = training_memory(cfg, p.seq_len, r["micro_batch"], 1, activation_checkpointing=True,
                          param_dtype="fp32", compute_dtype="bf16", autocast=False)
    r["estimate_peak_bytes"], r["estimate_total_bytes"] = est["peak"], est["total"]
    if r.get("peak_memory_bytes"):
        r["measured_to_estimate_peak"] = round(r["peak_memory_bytes"] / est["peak"], 3)
    return r


def part_e_float8(args) -> dict:
    import torch

    seq, mb, _ = sizes(args)
    # 3 untimed steps compile; all 50 losses are reported (same batches, same initial weights)
    gpu_train, p = _gpu_train_args(args, preset="llama2-1b", seq_len=seq, micro_batch=mb,
                                   steps=args.float8_steps - 3, warmup=3, ac="none", losses=True, lr=3e-4)
    if args.smoke:
        p.steps = 4
    runs = {}
    for f8 in (False, True):
        p.float8 = f8
        runs["float8" if f8 else "bf16"] = gpu_train.run_one(p)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    b, f = runs["bf16"], runs["float8"]
    diffs = [abs(x - y) for x, y in zip(b["losses"], f["losses"])]
    return {"steps": len(b["losses"]), "micro_batch": p.micro_batch, "seq_len": p.seq_len,
            "tokens_per_s_bf16": b["tokens_per_s"], "tokens_per_s_float8": f["tokens_per_s"],
            "speedup_float8": round(f["tokens_per_s"] / b["tokens_per_s"], 3),
            "float8_layers": f["float8_layers"], "loss_last_bf16": b["losses"][-1],
            "loss_last_float8": f["losses"][-1], "max_abs_loss_diff": round(max(diffs), 4),
            "losses_bf16": b["losses"], "losses_float8": f["losses"],
            "emulated": not torch.cuda.is_available()}


PART_FNS = {"a_ours": part_a_ours, "b_titan": part_b_titan, "d_memory": part_d_memory, "c_7b": part_c_7b,
            "e_float8": part_e_float8, "f_float8_trainer": part_f_float8_trainer}


# ---------------------------------------------------------------- the driver
def env_line() -> dict:
    import torch

    smi = shutil.which("nvidia-smi")
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()[-300:]
    for mod in ("torchtitan", "torchao", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # reported, not fatal: its part will fail on its own
            out[mod] = f"missing ({type(e).__name__})"
    return out


def run_part(name: str, args, timeout: float, cuda_graphs: bool | None = None) -> dict:
    graphs = args.titan_cuda_graphs if cuda_graphs is None else cuda_graphs
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--workdir", args.workdir,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--micro-batch-7b", str(args.micro_batch_7b), "--float8-steps", str(args.float8_steps)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--compile"] if args.compile else []
    cmd += [] if graphs else ["--no-titan-cuda-graphs"]
    t0 = time.perf_counter()
    log = Path(args.workdir) / f"{name}.log"
    try:
        with open(log, "w") as fh:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode == 0 and lines:
            res = json.loads(lines[-1])
        else:
            res = {"error": f"exit {r.returncode}", "log_tail": log.read_text()[-1500:]}
    except subprocess.TimeoutExpired:
        res = {"error": f"timeout after {timeout:.0f} s", "log_tail": log.read_text()[-800:]}
    return {"part": name, "seconds": round(time.perf_counter() - t0, 1), **res}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--deadline-s", type=float, default=540, help="the whole run; later parts get what is left")
    p.add_argument("--workdir", default="/tmp/gpu_issue17")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=8, help="parts a, b and e (llama2-1b)")
    p.add_argument("--steps", type=int, default=12, help="parts a and b; the first 3 are not timed")
    p.add_argument("--micro-batch-7b", type=int, default=2, help="part c; 1 is tried after an OOM")
    p.add_argument("--float8-steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="compile in --smoke too (always on the GPU)")
    p.add_argument("--titan-cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="torchtitan's default CUDA-graph capture of forward+backward")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--download-wheels", metavar="DIR", default=None,
                   help="fetch torchtitan, torchao and their small needs as wheels for the device machine")
    args = p.parse_args()
    if args.download_wheels:
        return subprocess.call([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "--python-version", "3.12", "--implementation", "cp", "--platform",
                                "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "--platform",
                                "manylinux_2_17_x86_64", "-d", args.download_wheels, *WHEELS])
    if args.part:  # one part, in this process
        print(json.dumps({"part": args.part, **PART_FNS[args.part](args)}), flush=True)
        return 0
    t0 = time.perf_counter()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results = {}

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    emit({"part": "env", **env_line()})
    for name in args.parts:
        budget = PARTS[name][1 if args.smoke else 0]
        left = args.deadline_s - (time.perf_counter() - t0)
        if left < 30:
            emit({"part": name, "skipped": f"{left:.0f} s left of the deadline"})
            continue
        results[name] = run_part(name, args, min(budget, left))
        emit(results[name])
        left = args.deadline_s - (time.perf_counter() - t0)
        if (name == "b_titan" and "error" in results[name] and args.titan_cuda_graphs
                and results[name]["seconds"] < 90 and left > budget + 60):
            # a quick failure is most likely torchtitan's CUDA-graph capture: once more without
            results["b_titan_no_graphs"] = run_part(name, args, min(budget, left), cuda_graphs=False)
            results["b_titan_no_graphs"]["part"] = "b_titan_no_graphs"
            emit(results["b_titan_no_graphs"])
    a = results.get("a_ours", {})
    b = next((results[k] for k in ("b_titan", "b_titan_no_graphs") if "tokens_per_s" in results.get(k, {})), {})
    summary = {"part": "summary", "elapsed_s": round(time.perf_counter() - t0, 1),
               "failed": [n for n, r in results.items() if "error" in r]}
    if b:
        summary["torchtitan_cuda_graphs"] = b.get("cuda_graphs")
    if "tokens_per_s" in a and "tokens_per_s" in b:
        summary["ratio_ours_to_torchtitan"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
        summary["mfu_ours"], summary["mfu_torchtitan"] = a["mfu"], b["mfu"]
    f = results.get("f_float8_trainer", {})
    if "tokens_per_s" in a and "tokens_per_s" in f:
        summary["ratio_trainer_float8_to_bf16"] = round(f["tokens_per_s"] / a["tokens_per_s"], 3)
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
