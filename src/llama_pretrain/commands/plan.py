"""`llama-pretrain plan`: GPU-hours, days, energy, carbon, memory and communication of a run."""

from __future__ import annotations

import argparse
import json
import re


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="plan a pretraining run: GPU-hours, days, kWh, tCO2eq, memory, communication",
        description="Forward mode (--mfu): GPU-hours = tokens x FLOPs/token / (bf16 dense peak x MFU), "
                    "FLOPs/token = 6*N_non_embedding + 12*L*H*Q*T (torchtitan). Inverse mode "
                    "(--gpu-hours): the MFU those hours imply. Memory per GPU is for FSDP full "
                    "sharding with fp32 master weights, gradients and AdamW state and bf16 compute. "
                    "Communication: FSDP all-gather x2 + reduce-scatter per step over the "
                    "interconnect (assumed efficiencies and latencies in docs/compute-and-carbon.md). "
                    "--tp N: tensor parallelism inside a node (dp = GPUs / N), sequence parallelism, "
                    "TP traffic over NVLink; --tp 1,2,4,8 compares the degrees.")
    p.add_argument("--preset", help="model preset (llama2-7b, llama2-70b, ...)")
    p.add_argument("--config", help="model config file instead of --preset")
    p.add_argument("--tokens", default="2T", help="training tokens: 2T, 2e12, 2,000,000,000,000 (default 2T)")
    p.add_argument("--gpu", default="a100-80gb", help="GPU: a100-40gb, a100-80gb, h100, h200 (default a100-80gb)")
    p.add_argument("--gpus", type=int, default=2048, help="number of GPUs (default 2048)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--mfu", type=float, help="model FLOPs utilisation, 0..1 or a percent (default 0.45)")
    mode.add_argument("--gpu-hours", type=float, help="inverse mode: GPU-hours of the run -> implied MFU")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the model's context)")
    p.add_argument("--global-batch-tokens", default="4M",
                   help="tokens per optimizer step across all GPUs (default 4M = 4,194,304, the paper's)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward (default 1)")
    p.add_argument("--interconnect", default="ib-200",
                   help="ib-200, roce-200, ib-400, roce-400, nvlink (default ib-200)")
    p.add_argument("--power-w", type=float, help="power per GPU for energy and carbon (default: the GPU's TDP)")
    p.add_argument("--pue", type=float, default=1.1, help="power usage effectiveness (default 1.1)")
    p.add_argument("--intensity", type=float, default=0.385, help="kgCO2eq per kWh (default 0.385)")
    p.add_argument("--tp", default="1",
                   help="tensor-parallel degree inside a node (default 1), or a comma-separated list "
                        "(1,2,4,8) to compare; the summary rows use the first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _tp_degrees(text: str) -> list[int]:
    from ..errors import UserError

    parts = [t.strip() for t in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", t) for t in parts):
        raise UserError(f"--tp takes a degree or a comma-separated list of degrees, e.g. 8 or 1,2,4,8; got {text!r}")
    return list(dict.fromkeys(int(t) for t in parts))


def run(args) -> int:
    from ..compute.carbon import positive_number
    from ..compute.gpus import get_gpu
    from ..compute.plan import parse_count, plan
    from ..config import ModelConfig
    from ..errors import UserError

    if bool(args.preset) == bool(args.config):
        raise UserError("give one of --preset and --config")
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset)
    else:  # imported here: the interop package imports torch, which --preset does not need
        from ..interop.config_files import model_config_from_file
        cfg = model_config_from_file(args.config)
    gpu = get_gpu(args.gpu)
    tokens = parse_count(args.tokens)
    gbt = parse_count(args.global_batch_tokens, "global batch tokens")
    whole_m = re.fullmatch(r"\s*(\d+)\s*[mM]\s*", args.global_batch_tokens)
    if whole_m:  # the paper's "4M tokens" is 4 x 2^20 = 1024 sequences of 4096
        gbt = int(whole_m.group(1)) * 2**20
    mfu, hours = args.mfu, None
    if args.gpu_hours is not None:
        hours = positive_number("--gpu-hours", args.gpu_hours)
    elif mfu is None:
        mfu = 0.45
    if mfu is not None:
        mfu = positive_number("--mfu", mfu)
        if 1 < mfu <= 100:
            mfu /= 100  # a percentage
    power = None if args.power_w is None else positive_number("--power-w", args.power_w)
    degrees = _tp_degrees(args.tp)
    r = plan(cfg, tokens, gpu, args.gpus, mfu=mfu, gpu_hours=hours, seq_len=args.seq_len,
             global_batch_tokens=gbt, micro_batch=args.micro_batch, interconnect=args.interconnect,
             gpus_per_node=args.gpus_per_node, power_w=power, pue=positive_number("--pue", args.pue),
             intensity=positive_number("--intensity", args.intensity, allow_zero=True),
             tp=degrees[0], tp_degrees=degrees)
    r["model"] = args.preset or args.config
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    _print(r)
    return 0


def _print(r: dict) -> None:
    mode = "implied by the GPU-hours" if r["mode"] == "inverse" else "given"
    m0, m1 = r["memory"]["no_checkpointing"], r["memory"]["checkpointing"]
    c = r["comm"]
    lay = r["layout"]
    fsdp_over = "" if r["tp"] == 1 else ("no FSDP (dp 1): " if r["dp"] == 1 else
                                         f"FSDP over {r['dp']} data-parallel ranks: ")
    rows = [
        ("model", f"{r['model']} ({r['model_params']:,} parameters), seq {r['seq_len']}"),
        ("tokens", f"{r['tokens']:,}"),
        ("FLOPs/token", f"{r['flops_per_token']:.4e}  ({r['flops_definition']})"),
        ("FLOPs total", f"{r['flops_total']:.4e}"),
        ("GPU", f"{r['gpus']} x {r['gpu']} (bf16 dense peak {r['peak_flops'] / 1e12:g} TFLOP/s)"),
        ("MFU", f"{100 * r['mfu']:.2f}% ({mode})"),
        ("GPU-hours", f"{r['gpu_hours']:,.0f}"),
        ("days", f"{r['days']:,.2f} on {r['gpus']} GPUs at this MFU "
                 f"({r['days_with_modelled_comm']:,.2f} if the MFU excluded the modelled communication)"),
        ("energy", f"{r['energy_kwh']:,.0f} kWh ({r['power_w']:g} W x PUE {r['pue']:g})"),
        ("carbon", f"{r['tco2eq']:,.2f} tCO2eq at {r['intensity']:g} kgCO2eq/kWh"),
        ("memory/GPU", f"{_gib(r['memory_per_gpu_bytes'])} ({'fits' if r['fits'] else 'does NOT fit'} in "
                       f"{_gib(r['gpu_memory_bytes'])}): weights {_gib(m0['weights'])}, gradients "
                       f"{_gib(m0['gradients'])}, AdamW {_gib(m0['optimizer'])}, activations "
                       f"{_gib(m0['activations'])} (micro batch {r['micro_batch']}); "
                       f"modelled step peak {_gib(m0['peak'])}"),
        ("  checkpointed", f"{_gib(r['memory_per_gpu_bytes_checkpointing'])} "
                           f"({'fits' if r['fits_with_checkpointing'] else 'does NOT fit'}) "
                           f"with activation checkpointing: activations {_gib(m1['activations'])}; "
                           f"peak {_gib(m1['peak'])}"),
        ("comm/step", f"{fsdp_over}{c['comm_s']:.3f} s on {c['interconnect']} "
                      f"({c['bytes_per_gpu'] / 1e9:.1f} GB per GPU, "
                      f"latency {c['comm_latency_s']:.3f} s) vs compute {c['compute_s']:.3f} s; "
                      f"scaling efficiency {100 * c['scaling_efficiency']:.1f}%"),
    ]
    if r["tp"] > 1:
        t, t1 = lay["tp_comm"], lay["tp_comm_checkpointing"]
        rows.append(("TP comm/step", f"tp {r['tp']} x dp {r['dp']}: {t['comm_s']:.3f} s over NVLink "
                                     f"({t['bytes_per_gpu'] / 1e9:.1f} GB per GPU at "
                                     f"{t['bus_bandwidth_Bps'] / 1e9:.0f} GB/s, "
                                     f"exposed) vs compute {lay['compute_s']:.3f} s; {t1['comm_s']:.3f} s "
                                     "with activation checkpointing (forward recomputed)"))
    net0 = next(iter(lay["networks"]))
    v = lay["networks"][net0]
    ckpt = " with activation checkpointing" if lay["activation_checkpointing_assumed"] else ""
    rows.append(("layout", f"tp {r['tp']} x dp {r['dp']}, {lay['sequences_per_dp_rank']:.2f} sequences per "
                           f"data-parallel rank per step (busiest {lay['sequences_busiest_rank']}); step "
                           f"{v['step_s']:.2f} s on {net0}{ckpt}: "
                           f"scaling efficiency {100 * v['scaling_efficiency']:.1f}% ({v['days']:,.2f} days "
                           "if the MFU excluded these overheads)"))
    if r["sequences_per_gpu_per_step"] < 1 and lay["sequences_below_dp"]:
        rows.append(("note", f"global batch gives {r['sequences_per_gpu_per_step']:.2f} sequences per GPU "
                             "per step: needs tensor/sequence parallelism or a larger batch"))
    rows += [("note", n) for n in _layout_notes(r, lay)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if r["scaling"]:
        print(f"\nscaling efficiency (global batch {r['global_batch_tokens']:,} tokens, FSDP full sharding):")
        nets = list(r["scaling"])
        print(f"{'GPUs':>6} " + " ".join(f"{n:>10}" for n in nets) + "   comm s (" + ", ".join(nets) + ")  compute s")
        for i, row in enumerate(r["scaling"][nets[0]]):
            effs = " ".join(f"{100 * r['scaling'][n][i]['scaling_efficiency']:>9.1f}%" for n in nets)
            comms = ", ".join(f"{r['scaling'][n][i]['comm_s']:.2f}" for n in nets)
            print(f"{row['gpus']:>6} {effs}   {comms}  {row['compute_s']:.2f}")
    if len(r["tp_layouts"]) > 1:
        _print_tp_table(r)


def _layout_notes(r: dict, lay: dict) -> list[str]:
    """Why a layout leaves GPUs idle or unequal (empty when every rank gets the same work)."""
    seqs = r["sequences_per_step"]
    if lay["sequences_below_dp"]:
        better = r["min_tp_for_every_dp_rank"]
        fix = (f"; tp {better} or more gives dp <= {r['gpus'] // better}" if better and better > lay["tp"]
               else "; use fewer GPUs or a larger batch")
        idle = f" ({lay['idle_dp_ranks']:,} idle)" if lay["idle_dp_ranks"] else ""
        return [f"data parallelism alone cannot use the GPUs given: {seqs:,.{0 if seqs == int(seqs) else 2}f} "
                f"sequences per step for {lay['dp']:,} data-parallel ranks at tp {lay['tp']}{idle}{fix}"]
    if not lay["balanced"]:
        even = " or ".join(f"{b:,}" for b in lay["balanced_batches_sequences"])
        return [f"{seqs:,.0f} sequences do not divide over {lay['dp']:,} data-parallel ranks x micro batch "
                f"{r['micro_batch']}: the busiest rank runs {lay['sequences_busiest_rank']} sequences "
                f"({lay['sequences_per_dp_rank']:.2f} on average); {even} sequences divide evenly"]
    return []


def _print_tp_table(r: dict) -> None:
    lays = r["tp_layouts"]
    nets = list(lays[0]["networks"])
    nvl = lays[0]["tp_comm"]["bus_bandwidth_Bps"] / 1e9
    print(f"\ntensor parallelism ({r['gpus']} x {r['gpu']}; global batch {r['sequences_per_step']:,.0f} sequences "
          f"of {r['seq_len']}; TP over NVLink at {nvl:.0f} GB/s, exposed; AC = activation checkpointing, "
          "used only where needed to fit):")
    head = (f"{'tp':>3} {'dp':>5} {'seq/rank (max)':>14}  {'memory GiB (AC)':>16}  {'fits (AC)':>9}  {'TP s':>5}  "
            f"{'compute s':>9}  {'FSDP s ' + ', '.join(nets):>24}  {'efficiency ' + ', '.join(nets):>28}  "
            f"GPU-hours (days) {nets[0]}")
    print(head)
    for lay in lays:
        tpc = lay["tp_comm_checkpointing" if lay["activation_checkpointing_assumed"] else "tp_comm"]
        fits = f"{'yes' if lay['fits'] else 'no'} ({'yes' if lay['fits_with_checkpointing'] else 'no'})"
        mem = f"{lay['memory_per_gpu_bytes'] / 2**30:.1f} ({lay['memory_per_gpu_bytes_checkpointing'] / 2**30:.1f})"
        fsdp = ", ".join(f"{lay['networks'][n]['fsdp']['comm_s']:.2f}" for n in nets)
        eff = ", ".join(f"{100 * lay['networks'][n]['scaling_efficiency']:.1f}%" for n in nets)
        ac = "*" if lay["activation_checkpointing_assumed"] else " "
        per_rank = f"{lay['sequences_per_dp_rank']:.2f} ({lay['sequences_busiest_rank']})"
        print(f"{lay['tp']:>3} {lay['dp']:>5} {per_rank:>14}  {mem:>16}  {fits:>9}  "
              f"{tpc['comm_s']:>5.2f}{ac} {lay['compute_s']:>9.2f}  {fsdp:>24}  {eff:>28}  "
              f"{lay['networks'][nets[0]]['gpu_hours']:,.0f} ({lay['networks'][nets[0]]['days']:,.1f})")
    if any(lay["activation_checkpointing_assumed"] for lay in lays):
        print("* with activation checkpointing (does not fit without): TP traffic includes the recomputed forward")
