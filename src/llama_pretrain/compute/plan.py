"""Plan a pretraining run before it starts: FLOPs, GPU-hours, days, energy, carbon, memory and
data-parallel communication.

Time: ``GPU-hours = tokens x FLOPs/token / (peak x MFU) / 3600``, FLOPs per token by torchtitan's
definition (``flops.py``), peak the GPU's bf16 dense figure (``gpus.py``). MFU is the achieved
end-to-end fraction of peak, so ``days = GPU-hours / GPUs / 24`` already includes whatever
communication cost the run had at that MFU. The inverse mode turns GPU-hours into the implied MFU.

Energy and carbon follow the paper (``carbon.py``): GPU-hours x power cap x PUE x intensity.

Communication (``comm_step``): FSDP full sharding moves, per optimizer step and per GPU, the
parameters twice (all-gather before forward and again before backward, since blocks are resharded
after forward) and the gradients once (reduce-scatter). With a ring over N GPUs each collective
on S bytes sends ``(N-1)/N x S`` per GPU. Within a node the ring runs over NVLink; across nodes
NCCL runs one ring per NIC (rail), so a node's NICs together carry the ring's traffic and the
per-GPU bus bandwidth is ``min(NVLink, gpus_per_node x NIC)`` x efficiency. Latency: one hop
latency per ring step (``N-1`` steps, the network hop latency once the ring leaves a node), for
each of the ``n_layers + 2`` FSDP units (blocks, embedding, head) and each of the 3 collectives.

Interconnect assumptions (documented guesses, overridable; not measurements):

    ib-200    NVIDIA Quantum HDR InfiniBand, 200 Gb/s per GPU (RSC): 90% of line rate, 3 us per hop
    roce-200  RoCE on commodity Ethernet, 200 Gb/s per GPU (Meta production): 85%, 5 us per hop
    ib-400 / roce-400   the same at 400 Gb/s (NDR / 400GbE)
    NVLink    80% of the GPU's per-direction NVLink bandwidth, 1 us per hop
    nvlink    single node only (no network)

Overlap: FSDP prefetches the next block's all-gather during the current block's compute, so the
step takes ``max(compute, comm) + comm / units`` (the first gather and last reduce-scatter are
exposed). Scaling efficiency = compute / step. Compute per step is the global batch's FLOPs on N
GPUs at the given MFU, so with a fixed global batch (4M tokens in the paper) compute per GPU shrinks
as N grows while the parameter traffic per GPU does not: that is what limits scaling.

Tensor parallelism (``tp``, ``tp_layout``; the trainer's ``parallel.tp``): the GPUs form a 2-D mesh,
dp = GPUs / tp data-parallel ranks of tp GPUs each inside one node. Memory: ``memory.py``. FSDP
runs over the dp ranks only: the same three collectives on the ``P_tp`` parameters a tensor-parallel
rank holds (about P / tp), ring factor ``(dp-1)/dp``; the tp concurrent dp rings share the node's
NICs, so each gets ``gpus_per_node / tp`` of them (at tp 8 each GPU's own rail, at tp 1 all eight
as above). Tensor-parallel traffic goes over NVLink: with sequence parallelism each block
all-gathers the [tokens, dim] activation before attention and before the FFN and reduce-scatters
after ``wo`` and ``w2`` (4 collectives forward, the same 4 in backward, 4 more when activation
checkpointing recomputes the forward); the embedding adds a reduce-scatter forward and an
all-gather backward, the head the reverse, so ``8 L + 4`` (``12 L + 4`` checkpointed) collectives,
each sending ``(tp-1)/tp x tokens x dim x 2`` bytes (bf16) per GPU at 80% of the per-direction
NVLink bandwidth, plus 1 us per ring step. ``loss_parallel``'s per-token all-reduces (4 bytes a
token) are negligible and not counted. These collectives sit between a matmul and the next that
needs their result, so they are counted as exposed (added to compute; asynchronous TP, which
overlaps them with the matmul's pieces, is not assumed); FSDP's overlap is as above.

Work per step: the global batch is ``S = global_batch_tokens / seq_len`` sequences over dp ranks.
The step lasts as long as its busiest rank, which runs ``ceil(S / (dp x micro)) x micro``
sequences: when S < dp some ranks have nothing to do (data parallelism alone cannot use the GPUs)
and when dp x micro does not divide S the ranks are unequal. Scaling efficiency of a layout =
ideal compute (the batch's FLOPs spread evenly over every GPU at the MFU) / modelled step, so idle
ranks, imbalance, exposed TP traffic and FSDP's exposed part all count against it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import UserError
from .carbon import DEFAULT_INTENSITY, DEFAULT_PUE, energy_kwh, tco2eq
from .flops import flops_per_token, param_counts
from .gpus import GPU
from .memory import dtype_bytes, tp_local_params, training_memory


@dataclass(frozen=True)
class Interconnect:
    name: str
    gbit_per_gpu: float  # network line rate per GPU (one NIC per GPU); 0 = no network
    efficiency: float    # fraction of line rate NCCL reaches on large messages
    hop_latency_s: float  # per ring step across the network
    description: str


INTERCONNECTS: dict[str, Interconnect] = {
    "ib-200": Interconnect("ib-200", 200.0, 0.90, 3e-6, "InfiniBand HDR, 200 Gb/s per GPU"),
    "roce-200": Interconnect("roce-200", 200.0, 0.85, 5e-6, "RoCE Ethernet, 200 Gb/s per GPU"),
    "ib-400": Interconnect("ib-400", 400.0, 0.90, 3e-6, "InfiniBand NDR, 400 Gb/s per GPU"),
    "roce-400": Interconnect("roce-400", 400.0, 0.85, 5e-6, "RoCE Ethernet, 400 Gb/s per GPU"),
    "nvlink": Interconnect("nvlink", 0.0, 1.0, 0.0, "one node, NVLink only"),
}
NVLINK_EFFICIENCY = 0.80
NVLINK_HOP_LATENCY_S = 1e-6
SCALING_GPUS = (64, 128, 256, 512, 1024, 2048)

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text, what: str = "token count") -> int:
    """'2T', '2.0T', '1.4e12', '2e12', '2,000,000,000,000', '500B', '4M' -> a positive integer."""
    s = str(text).strip().replace(",", "").replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([kKmMbBgGtT]?)", s)
    if not m:
        raise UserError(f"cannot parse {what} {text!r}; use e.g. 2T, 2e12, 2000000000000 or 2,000,000,000,000")
    mantissa, exp, suffix = m.groups()
    value = float(mantissa) * 10 ** int(exp or 0) * _SUFFIX[suffix.upper()]
    if not math.isfinite(value) or value < 1:
        raise UserError(f"{what} must be at least 1, got {text!r}")
    return int(round(value))


def get_interconnect(name: str) -> Interconnect:
    key = str(name).strip().lower()
    if key not in INTERCONNECTS:
        raise UserError(f"unknown interconnect {name!r}; known: {', '.join(INTERCONNECTS)}")
    return INTERCONNECTS[key]


def gpu_hours_for(total_flops: float, gpu: GPU, mfu: float) -> float:
    return total_flops / (gpu.bf16_peak_flops * mfu) / 3600.0


def implied_mfu(total_flops: float, gpu: GPU, gpu_hours: float) -> float:
    return total_flops / (gpu.bf16_peak_flops * gpu_hours * 3600.0)


def comm_step(cfg: ModelConfig, gpu: GPU, n_gpus: int, net: Interconnect, *, gpus_per_node: int = 8,
              compute_s: float, param_dtype="bf16", reduce_dtype="fp32", nvlink_gbps: float | None = None,
              efficiency: float | None = None, hop_latency_s: float | None = None, tp: int = 1) -> dict:
    """Per-step FSDP communication time on ``n_gpus`` and the scaling efficiency against ``compute_s``.

    With ``tp`` > 1 FSDP runs over the ``n_gpus / tp`` data-parallel ranks on each tensor-parallel
    rank's parameters, and the node's NICs are shared by the tp concurrent rings."""
    n = tp_local_params(cfg, tp)
    ranks = n_gpus // tp
    nodes = max(1, math.ceil(n_gpus / gpus_per_node))
    if nodes > 1 and net.gbit_per_gpu <= 0:
        raise UserError(f"interconnect {net.name!r} has no network; it covers one node "
                        f"({gpus_per_node} GPUs), not {n_gpus}")
    nvl = (nvlink_gbps or gpu.nvlink_gbps) * 1e9 * NVLINK_EFFICIENCY
    eff = net.efficiency if efficiency is None else efficiency
    lat = net.hop_latency_s if hop_latency_s is None else hop_latency_s
    if nodes > 1:
        bus = min(nvl, min(gpus_per_node, n_gpus) // tp * net.gbit_per_gpu / 8 * 1e9 * eff)
        step_latency = lat
    else:
        bus, step_latency = nvl, NVLINK_HOP_LATENCY_S
    frac = (ranks - 1) / ranks
    gather_bytes = 2 * n * dtype_bytes(param_dtype)     # forward and backward all-gathers
    reduce_bytes = n * dtype_bytes(reduce_dtype)        # gradient reduce-scatter
    units = cfg.n_layers + 2
    bandwidth_s = frac * (gather_bytes + reduce_bytes) / bus if ranks > 1 else 0.0
    latency_s = 3 * units * (ranks - 1) * step_latency
    comm_s = bandwidth_s + latency_s
    step_s = max(compute_s, comm_s) + comm_s / units
    return {"gpus": n_gpus, "nodes": nodes, "interconnect": net.name, "bus_bandwidth_Bps": bus,
            "bytes_per_gpu": frac * (gather_bytes + reduce_bytes), "comm_bandwidth_s": bandwidth_s,
            "comm_latency_s": latency_s, "comm_s": comm_s, "compute_s": compute_s, "step_s": step_s,
            "scaling_efficiency": compute_s / step_s, "tp": tp, "dp": ranks}


def check_tp(cfg: ModelConfig, tp: int, n_gpus: int, gpus_per_node: int, seq_len: int) -> None:
    """One-line UserErrors for a tensor-parallel degree the layout cannot take.

    tp must divide the GPUs per node (so it never exceeds them: tensor parallelism's per-block
    collectives need NVLink, and over the network they would dominate the step), the GPUs, both
    head counts (each rank holds whole heads) and the sequence (sequence parallelism)."""
    if tp < 1:
        raise UserError(f"--tp must be at least 1, got {tp}")
    if gpus_per_node % tp:
        raise UserError(f"--tp {tp} must divide --gpus-per-node ({gpus_per_node}): tensor parallelism "
                        "stays inside a node's NVLink domain")
    if n_gpus % tp:
        raise UserError(f"--tp {tp} must divide --gpus ({n_gpus})")
    for name, heads in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads)):
        if heads % tp:
            raise UserError(f"--tp {tp} must divide the model's {name} ({heads}): each tensor-parallel "
                            "rank holds whole heads")
    if seq_len % tp:
        raise UserError(f"--tp {tp} must divide the sequence length ({seq_len}): sequence parallelism "
                        "splits every sequence evenly")


def tp_comm_step(cfg: ModelConfig, gpu: GPU, tp: int, tokens: int, micro_batches: int, *,
                 activation_checkpointing: bool = False, compute_dtype="bf16",
                 nvlink_gbps: float | None = None) -> dict:
    """Tensor-parallel traffic per GPU for one optimizer step of ``tokens`` (in ``micro_batches``)
    on one data-parallel rank, over NVLink, counted as exposed (module docstring)."""
    per_block = 12 if activation_checkpointing else 8
    collectives = per_block * cfg.n_layers + 4  # + embedding and head, forward and backward
    frac = (tp - 1) / tp
    bytes_per_gpu = collectives * frac * tokens * cfg.dim * dtype_bytes(compute_dtype)
    bus = (nvlink_gbps or gpu.nvlink_gbps) * 1e9 * NVLINK_EFFICIENCY
    bandwidth_s = bytes_per_gpu / bus
    latency_s = collectives * micro_batches * (tp - 1) * NVLINK_HOP_LATENCY_S
    return {"tp": tp, "collectives_per_micro_batch": collectives if tp > 1 else 0,
            "bytes_per_gpu": bytes_per_gpu, "bus_bandwidth_Bps": bus, "comm_bandwidth_s": bandwidth_s,
            "comm_latency_s": latency_s, "comm_s": bandwidth_s + latency_s, "exposed": True,
            "activation_checkpointing": activation_checkpointing}


def tp_layout(cfg: ModelConfig, gpu: GPU, n_gpus: int, tp: int, *, seq_len: int, global_batch_tokens: int,
              micro_batch: int, gpus_per_node: int, mfu: float, networks=("ib-200",)) -> dict:
    """Memory, work per rank, TP and FSDP traffic and scaling efficiency of (dp = n_gpus / tp, tp)."""
    check_tp(cfg, tp, n_gpus, gpus_per_node, seq_len)
    dp = n_gpus // tp
    fpt = flops_per_token(cfg, seq_len)
    mem = {ckpt: training_memory(cfg, seq_len, micro_batch, n_gpus, activation_checkpointing=ckpt, tp=tp)
           for ckpt in (False, True)}
    fit = {ckpt: max(m["total"], m["peak"]) for ckpt, m in mem.items()}
    fits = {ckpt: fit[ckpt] <= gpu.memory_bytes for ckpt in fit}
    ckpt = not fits[False]  # checkpoint only when the layout does not fit without it

    sequences = global_batch_tokens / seq_len
    micro_batches = math.ceil(sequences / (dp * micro_batch))  # on the busiest rank
    busiest_tokens = micro_batches * micro_batch * seq_len
    ideal_s = global_batch_tokens * fpt / (n_gpus * gpu.bf16_peak_flops * mfu)
    compute_s = busiest_tokens * fpt / (tp * gpu.bf16_peak_flops * mfu)
    tpc = {c: tp_comm_step(cfg, gpu, tp, busiest_tokens, micro_batches, activation_checkpointing=c)
           for c in (False, True)}
    busy = compute_s + tpc[ckpt]["comm_s"]
    nets = {}
    for name in networks:
        net = get_interconnect(name)
        fsdp = comm_step(cfg, gpu, n_gpus, net, gpus_per_node=gpus_per_node, compute_s=busy, tp=tp)
        eff = ideal_s / fsdp["step_s"]
        nets[name] = {"fsdp": fsdp, "step_s": fsdp["step_s"], "scaling_efficiency": eff}
    return {
        "tp": tp, "dp": dp, "gpus": n_gpus, "sequences_per_step": sequences,
        "sequences_per_dp_rank": sequences / dp,
        "sequences_below_dp": sequences < dp, "idle_dp_ranks": max(0, dp - math.ceil(sequences)),
        "balanced": sequences == micro_batches * micro_batch * dp,
        # the global batches (in sequences) nearest to this one that every rank divides evenly
        "balanced_batches_sequences": sorted({k * dp * micro_batch for k in (micro_batches - 1, micro_batches) if k}),
        "micro_batches_busiest_rank": micro_batches, "sequences_busiest_rank": micro_batches * micro_batch,
        "memory_per_gpu_bytes": fit[False], "memory_per_gpu_bytes_checkpointing": fit[True],
        "fits": fits[False], "fits_with_checkpointing": fits[True],
        "memory": {"no_checkpointing": mem[False], "checkpointing": mem[True]},
        "activation_checkpointing_assumed": ckpt,
        "ideal_compute_s": ideal_s, "compute_s": compute_s,
        "tp_comm": tpc[False], "tp_comm_checkpointing": tpc[True],
        "tp_comm_to_compute": tpc[ckpt]["comm_s"] / compute_s,
        "networks": nets,
    }


def _check_sizes(tokens: int, n_gpus: int, gpus_per_node: int, global_batch_tokens: int,
                 micro_batch: int, seq: int) -> None:
    if tokens < 1:
        raise UserError(f"tokens must be at least 1, got {tokens}")
    if n_gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {n_gpus}")
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    if global_batch_tokens < 1 or micro_batch < 1:
        raise UserError("global batch and micro batch must be at least 1")
    if seq < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq}")


def _mode(total: float, gpu: GPU, mfu: float | None, gpu_hours: float | None) -> tuple[str, float, float]:
    """("forward" | "inverse", mfu, gpu_hours): whichever of the two was not given, from the other."""
    if gpu_hours is not None:
        if not (gpu_hours > 0 and math.isfinite(gpu_hours)):
            raise UserError(f"--gpu-hours must be a positive number, got {gpu_hours}")
        return "inverse", implied_mfu(total, gpu, gpu_hours), gpu_hours
    if mfu is None or not (0 < mfu <= 1):  # None: plan() already refused it
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    return "forward", mfu, gpu_hours_for(total, gpu, mfu)


def _min_tp_for_every_dp_rank(cfg: ModelConfig, n_gpus: int, gpus_per_node: int, seq: int,
                              sequences: float) -> int | None:
    """The smallest degree whose dp ranks all get a sequence (for the "dp alone" note)."""
    enough = [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0 and n_gpus % t == 0
              and cfg.n_heads % t == 0 and cfg.kv_heads % t == 0 and seq % t == 0 and n_gpus // t <= sequences]
    return enough[0] if enough else None


def _memory_fields(cfg: ModelConfig, gpu: GPU, seq: int, micro_batch: int, n_gpus: int, tp: int) -> dict:
    """Memory per GPU with and without activation checkpointing, and whether each fits."""
    mem = {ckpt: training_memory(cfg, seq, micro_batch, n_gpus, activation_checkpointing=ckpt, tp=tp)
           for ckpt in (False, True)}
    fit = {ckpt: max(m["total"], m["peak"]) for ckpt, m in mem.items()}  # the larger: see memory.py
    return {
        "memory_per_gpu_bytes": fit[False],
        "memory_per_gpu_bytes_checkpointing": fit[True],
        "memory_per_gpu_peak_bytes": mem[False]["peak"],
        "memory_per_gpu_peak_bytes_checkpointing": mem[True]["peak"],
        "memory": {"no_checkpointing": mem[False], "checkpointing": mem[True]},
        "gpu_memory_bytes": gpu.memory_bytes,
        "fits": fit[False] <= gpu.memory_bytes,
        "fits_with_checkpointing": fit[True] <= gpu.memory_bytes,
    }


def plan(cfg: ModelConfig, tokens: int, gpu: GPU, n_gpus: int, *, mfu: float | None = None,
         gpu_hours: float | None = None, seq_len: int | None = None, global_batch_tokens: int = 4 * 2**20,
         micro_batch: int = 1, interconnect: str = "ib-200", gpus_per_node: int = 8,
         power_w: float | None = None, pue: float = DEFAULT_PUE, intensity: float = DEFAULT_INTENSITY,
         scaling_gpus=SCALING_GPUS, tp: int = 1, tp_degrees=None) -> dict:
    """Everything ``llama-pretrain plan`` prints, as a dict (see the module docstring).

    ``tp`` sets the layout of the memory and communication figures; ``tp_layouts`` has one
    ``tp_layout`` per degree in ``tp_degrees`` (default: just ``tp``)."""
    if (mfu is None) == (gpu_hours is None):
        raise UserError("give exactly one of --mfu (forward mode) and --gpu-hours (inverse mode)")
    seq = cfg.max_seq_len if seq_len is None else seq_len
    _check_sizes(tokens, n_gpus, gpus_per_node, global_batch_tokens, micro_batch, seq)
    fpt = flops_per_token(cfg, seq)
    total = float(fpt) * tokens
    mode, mfu, gpu_hours = _mode(total, gpu, mfu, gpu_hours)
    power = gpu.tdp_w if power_w is None else power_w
    net = get_interconnect(interconnect)
    degrees = [tp] if tp_degrees is None else list(tp_degrees)
    for t in [tp, *degrees]:
        check_tp(cfg, t, n_gpus, gpus_per_node, seq)

    def step(n, network, tp=tp):
        compute_s = global_batch_tokens * fpt / (n * gpu.bf16_peak_flops * mfu)
        return comm_step(cfg, gpu, n, network, gpus_per_node=gpus_per_node, compute_s=compute_s, tp=tp)

    comm = step(n_gpus, net)
    others = ("ib-200", "roce-200") if net.gbit_per_gpu else ()
    scaling = {name: [step(n, get_interconnect(name), 1) for n in scaling_gpus] for name in others}
    networks = list(dict.fromkeys([net.name, *others]))
    by_tp = {t: tp_layout(cfg, gpu, n_gpus, t, seq_len=seq, global_batch_tokens=global_batch_tokens,
                          micro_batch=micro_batch, gpus_per_node=gpus_per_node, mfu=mfu, networks=networks)
             for t in dict.fromkeys([tp, *degrees])}
    for lay in by_tp.values():
        for v in lay["networks"].values():
            v["gpu_hours"] = gpu_hours / v["scaling_efficiency"]
            v["days"] = v["gpu_hours"] / n_gpus / 24.0
    sequences = global_batch_tokens / seq
    return {
        "mode": mode, "model_params": param_counts(cfg).total, "tokens": tokens, "seq_len": seq,
        "gpu": gpu.name, "gpus": n_gpus, "mfu": mfu,
        "flops_definition": "6*N_non_embedding + 12*L*H*Q*T (torchtitan); MFU against bf16 dense peak",
        "flops_per_token": fpt, "flops_total": total, "peak_flops": gpu.bf16_peak_flops,
        "gpu_hours": gpu_hours, "days": gpu_hours / n_gpus / 24.0,
        "days_with_modelled_comm": gpu_hours / n_gpus / 24.0 / comm["scaling_efficiency"],
        "power_w": power, "pue": pue, "intensity": intensity, "energy_kwh": energy_kwh(gpu_hours, power, pue),
        "tco2eq": tco2eq(gpu_hours, power, pue, intensity),
        **_memory_fields(cfg, gpu, seq, micro_batch, n_gpus, tp),
        "global_batch_tokens": global_batch_tokens, "micro_batch": micro_batch,
        "sequences_per_gpu_per_step": global_batch_tokens / seq / n_gpus,
        "comm": comm, "scaling": scaling,
        "tp": tp, "dp": n_gpus // tp, "sequences_per_step": sequences,
        "sequences_per_dp_rank_per_step": sequences / (n_gpus // tp),
        "dp_alone_cannot_use_gpus": sequences < n_gpus,
        "min_tp_for_every_dp_rank": _min_tp_for_every_dp_rank(cfg, n_gpus, gpus_per_node, seq, sequences),
        "layout": by_tp[tp], "tp_layouts": [by_tp[t] for t in degrees],
    }
