"""Figure 5 of the paper: training perplexity against processed tokens, one line per run."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import parse_json
from ..errors import UserError


def run_label(run_dir: Path) -> str:
    """'<preset> (<N>M params)' from the run's run.json, else the directory name."""
    from ..compute.flops import param_counts
    from ..config import ModelConfig

    try:
        run = parse_json((run_dir / "run.json").read_text())
        cfg = ModelConfig.from_dict(run["identity"]["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
        return run_dir.name  # no (or a damaged) run.json: the plot still works
    n = param_counts(cfg).total
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    preset = run.get("config", {}).get("model", {}).get("preset")
    return f"{preset} ({size} params)" if preset else f"{size} params"


def token_count(n: float) -> str:
    """An axis label for a token count: 0, 500k, 1.5M, 2B (no "1e6" offset)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def validation_points(records: list[dict]) -> tuple[list[int], list[float]]:
    """(tokens, validation perplexity) of the steps that ran validation."""
    vals = [r for r in records if r.get("val_loss") is not None and "tokens_seen" in r]
    return [r["tokens_seen"] for r in vals], [r.get("val_perplexity") or math.exp(min(r["val_loss"], 50.0))
                                              for r in vals]


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 1, labels: list[str] | None = None) -> Path:
    """Draw train perplexity vs tokens seen for each run dir into ``out`` (PNG), its validation
    perplexity as dashed points of the same colour; ``labels`` replace the run.json ones. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from ..fsutil import atomic_file
    from .metrics import read_metrics

    out = Path(out)
    fmt = _image_format(out)
    series, val_series = [], []
    for i, d in enumerate(run_dirs):
        d = Path(d)
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"{d}: no metrics.jsonl (not a training run dir)")
        logged = read_metrics(path)
        recs = [r for r in logged if r.get("perplexity") is not None and "tokens_seen" in r]
        if not recs:
            raise UserError(f"{path}: no logged steps yet")
        series.append((labels[i] if labels else run_label(d), [r["tokens_seen"] for r in recs],
                       [r["perplexity"] for r in recs]))
        val_series.append(validation_points(logged))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (label, x, y), (vx, vy) in zip(series, val_series):
        if smooth > 1:
            y = [sum(y[max(0, i - smooth + 1):i + 1]) / len(y[max(0, i - smooth + 1):i + 1]) for i in range(len(y))]
        (line,) = ax.plot(x, y, label=label, linewidth=1.4)
        ax.plot(vx, vy, "o--", color=line.get_color(), markersize=3.5, linewidth=0.9)
    if any(vx for vx, _ in val_series):  # one legend entry explains every dashed curve
        ax.plot([], [], "o--", color="gray", markersize=3.5, linewidth=0.9, label="validation")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: token_count(v)))
    ax.set_xlabel("Processed tokens")
    ax.set_ylabel("Perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Training perplexity vs processed tokens (cf. Llama 2, Figure 5)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format=fmt)
    plt.close(fig)
    return out


def plot_metric(run_dirs: list[Path], out: Path, metric: str) -> Path:
    """Draw one logged metric (``eval/arc_easy/acc``, ``val_loss``, ...) against tokens seen, one
    line per run dir, into ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from ..fsutil import atomic_file

    fmt = _image_format(Path(out))
    series = [(run_label(Path(d)), *_metric_points(Path(d), metric)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, x, y in series:
        ax.plot(x, y, "o-", label=label, linewidth=1.4, markersize=3.5)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: token_count(v)))
    ax.set_xlabel("Processed tokens")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{metric} vs processed tokens")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format=fmt)
    plt.close(fig)
    return Path(out)


def _metric_points(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(tokens seen, value) of every metrics line of ``run_dir`` that logged ``metric``."""
    from .metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a training run dir)")
    recs = [r for r in read_metrics(path) if isinstance(r.get(metric), (int, float)) and "tokens_seen" in r]
    if not recs:
        logged = sorted({k for r in read_metrics(path) for k in r if k.startswith(("eval/", "val_"))})
        raise UserError(f"{path}: no {metric!r} logged; logged here besides the training metrics: "
                        f"{', '.join(logged) or 'none'} (eval/<task>/<metric> needs eval.tasks)")
    return [r["tokens_seen"] for r in recs], [float(r[metric]) for r in recs]


def _image_format(out: Path) -> str:
    """The image format ``out``'s suffix names; a UserError when matplotlib cannot write it."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = out.suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"--out {out}: unsupported image format {fmt!r}; use one of {', '.join(sorted(supported))}")
    return fmt
