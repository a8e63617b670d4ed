"""Figure 5 of the paper: training perplexity against processed tokens, one line per run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def run_label(run_dir: Path) -> str:
    """'<preset> (<N>M params)' from the run's run.json, else the directory name."""
    from ..compute.flops import param_counts
    from ..config import ModelConfig

    try:
        run = json.loads((run_dir / "run.json").read_text())
        cfg = ModelConfig.from_dict(run["identity"]["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
        return run_dir.name  # no (or a damaged) run.json: the plot still works
    n = param_counts(cfg).total
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    preset = run.get("config", {}).get("model", {}).get("preset")
    return f"{preset} ({size} params)" if preset else f"{size} params"


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 1) -> Path:
    """Draw train perplexity vs tokens seen for each run dir into ``out`` (PNG); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_file
    from .metrics import read_metrics

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"--out {out}: unsupported image format {fmt!r}; use one of {', '.join(sorted(supported))}")
    series = []
    for d in run_dirs:
        d = Path(d)
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"{d}: no metrics.jsonl (not a training run dir)")
        recs = [r for r in read_metrics(path) if r.get("perplexity") is not None and "tokens_seen" in r]
        if not recs:
            raise UserError(f"{path}: no logged steps yet")
        series.append((run_label(d), [r["tokens_seen"] for r in recs], [r["perplexity"] for r in recs]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, x, y in series:
        if smooth > 1:
            y = [sum(y[max(0, i - smooth + 1):i + 1]) / len(y[max(0, i - smooth + 1):i + 1]) for i in range(len(y))]
        ax.plot(x, y, label=label, linewidth=1.4)
    ax.set_xlabel("Processed tokens")
    ax.set_ylabel("Train perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Training loss (cf. Llama 2, Figure 5)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format=fmt)
    plt.close(fig)
    return out
