"""A run's summary: its figures computed from ``metrics.jsonl``, and the table the CLI prints.

Throughput is all tokens over the training wall time (validation and checkpoints included), not
a mean of per-step rates, and MFU is computed from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import read_metrics


def summarize(run_dir: Path, energy: dict | None = None, peak_source: str | None = None) -> dict[str, Any]:
    """Figures of a run from its metrics.jsonl (written to summary.json, printed at the end)."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return {"steps": 0}
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    last = records[-1]
    tokens_per_s = last["tokens_seen"] / last["elapsed_s"] if last.get("elapsed_s") else None
    out = {
        "steps": last["step"], "tokens_seen": last["tokens_seen"], "elapsed_s": last.get("elapsed_s"),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "first_val_loss": vals[0] if vals else None, "final_val_loss": vals[-1] if vals else None,
        "tokens_per_s": tokens_per_s, "mfu": mfu_at(tokens_per_s, records),
        "skipped_steps": sum(1 for r in records if r.get("skipped")),
    }
    if peak_source:
        out["mfu_peak"] = peak_source
    if energy:
        out["energy_kwh"], out["tco2eq"], out["energy_method"] = energy["kwh"], energy["tco2eq"], energy["method"]
    elif last.get("kwh") is not None:
        out["energy_kwh"], out["tco2eq"] = last["kwh"], last.get("tco2eq")
    return out


def mfu_at(tokens_per_s: float | None, records: list[dict[str, Any]]) -> float | None:
    """MFU at ``tokens_per_s`` against the peak of the last logged step (its mfu / its tokens/s is
    FLOPs per token over the peak of all devices)."""
    timed = [r for r in records if r.get("tokens_per_s") and r.get("mfu") is not None]
    if tokens_per_s is None or not timed:
        return None
    return tokens_per_s * timed[-1]["mfu"] / timed[-1]["tokens_per_s"]


def print_summary(s: dict, run_dir: Path) -> None:
    """The summary as an aligned two-column table on stdout."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("run dir", str(run_dir)),
        ("steps", f"{s.get('steps')}"),
        ("tokens", f"{s.get('tokens_seen', 0):,}"),
        ("time", f"{fmt(s.get('elapsed_s'), '.1f')} s"),
        ("train loss", f"{fmt(s.get('first_train_loss'), '.3f')} -> {fmt(s.get('final_train_loss'), '.3f')}"
                       " (first step -> mean of the last 10)"),
        ("val loss", f"{fmt(s.get('first_val_loss'), '.3f')} -> {fmt(s.get('final_val_loss'), '.3f')}"),
        ("throughput", f"{fmt(s.get('tokens_per_s'), ',.0f')} tokens/s (tokens / time)"),
        ("MFU", f"{fmt(100 * s['mfu'] if s.get('mfu') is not None else None, '.1f')}% "
                f"(6N+12LHQT FLOPs/token vs {s.get('mfu_peak', 'peak')})"),
    ]
    if s.get("energy_kwh") is not None:
        rows.append(("energy", f"{s['energy_kwh']:.6f} kWh, {s['tco2eq'] * 1000:.4f} kgCO2eq "
                               f"({s.get('energy_method', 'estimate')})"))
    if s.get("skipped_steps"):
        rows.append(("skipped steps", str(s["skipped_steps"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
