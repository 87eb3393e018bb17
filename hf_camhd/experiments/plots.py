"""PNG plots of a comparison (matplotlib's Agg canvas, no pyplot state): learning curves with s.e. bands
(the paper's Figures 2–4), γ / α trajectories (Figures 5–8), the fixed-γ sweep (Figure 1) and the β
sensitivity study (test accuracy against β)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_path
from .results import arm_order, epoch_curve, finished_runs, hyper_curve, summarize_hypergrad_sweep, summarize_sweep

__all__ = ["write_plots", "plot_learning_curves", "plot_gamma_trajectories", "plot_gamma_sweep",
           "plot_hypergrad_sweep"]


def _figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8, extra_width: float = 0.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols + extra_width, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _band(ax, xs, means, ses, color, label) -> None:
    """A mean line and a ±1 s.e. band (skipping missing points)."""
    pts = [(x, m, s or 0.0) for x, m, s in zip(xs, means, ses) if m is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    m = [p[1] for p in pts]
    lo = [p[1] - p[2] for p in pts]
    hi = [p[1] + p[2] for p in pts]
    ax.plot(x, m, color=color, label=label, marker="o" if len(x) <= 12 else None, markersize=3)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def _log_scale_if_wide(ax, ratio: float = 1e3) -> None:
    """A log y-axis when the plotted values span more than ``ratio`` (a run whose loss blew up would otherwise
    flatten every other curve to a line at 0)."""
    import numpy as np

    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size and ys.max() / ys.min() > ratio:
        ax.set_yscale("log")


def _count_curves(fig) -> int:
    return sum(len(ax.get_lines()) for ax in fig.axes)


def _save(fig, path: Path) -> dict[str, int]:
    info = {"curves": _count_curves(fig), "axes": len([ax for ax in fig.axes if ax.get_visible()])}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return info


def _title(results: Mapping[str, Any]) -> str:
    cfg, data = results.get("config", {}), results.get("data", {})
    n = data.get("train_size")
    return (f"{cfg.get('model')} on {data.get('dataset')} ({n} train), batch {cfg.get('batch_size')}, "
            f"mean ± s.e. over seeds")


def plot_learning_curves(results: Mapping[str, Any], path: Path) -> dict[str, int]:
    """Test accuracy, train loss and test loss per epoch, one mean curve with an s.e. band per series."""
    fig, axes = _figure(3, extra_width=2.2)
    series = [s for s in arm_order(results) if finished_runs(results, s)]
    metrics = [("test_accuracy", "test accuracy (%)"), ("train_loss", "train loss"), ("test_loss", "test loss")]
    for color, s in zip(_colors(len(series)), series):
        runs = finished_runs(results, s)
        label = runs[0].get("display_name", s)
        for ax, (metric, _) in zip(axes[0], metrics):
            _band(ax, *epoch_curve(runs, metric), color=color, label=label)
    for ax, (metric, ylabel) in zip(axes[0], metrics):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if metric.endswith("loss"):
            _log_scale_if_wide(ax)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # note: outside the axes, so a dozen arms never hide the curves
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(_title(results), fontsize=9)
    return _save(fig, path)


def plot_gamma_trajectories(results: Mapping[str, Any], path: Path) -> dict[str, int] | None:
    """For every HD / CAM-HD series: γ per level (top) and mean α per level (bottom; log scale when it
    spans more than 20x) against the iteration."""
    series = [s for s in arm_order(results)
              if any(r.get("hyper_log") for r in finished_runs(results, s))]
    if not series:
        return None
    fig, axes = _figure(len(series), 2, width=4.2, height=3.2)
    for col, s in enumerate(series):
        runs = [r for r in finished_runs(results, s) if r.get("hyper_log")]
        levels = list(runs[0]["hyper_log"][0]["gamma"])
        for color, lv in zip(_colors(len(levels)), levels):
            _band(axes[0][col], *hyper_curve(runs, "gamma", lv), color=color, label=lv)
            _band(axes[1][col], *hyper_curve(runs, "alpha_mean", lv), color=color, label=lv)
        axes[0][col].set_title(runs[0].get("display_name", s), fontsize=9)
        axes[0][col].set_ylabel("γ")
        axes[1][col].set_ylabel("mean α of the level's nodes")
        alphas = [m for lv in levels for m in hyper_curve(runs, "alpha_mean", lv)[1] if m]
        if alphas and min(alphas) > 0 and max(alphas) / min(alphas) > 20:
            axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("combination weights γ and learned rates α, " + _title(results), fontsize=9)
    return _save(fig, path)


def plot_gamma_sweep(results: Mapping[str, Any], path: Path) -> dict[str, int] | None:
    """The paper's Figure 1: last-epoch test accuracy (mean ± s.e.) against the fixed γ_global."""
    rows = summarize_sweep(results)
    if not rows:
        return None
    fig, axes = _figure(1, width=5.5)
    ax = axes[0][0]
    _band(ax, [r["gamma_global"] for r in rows], [r["test_accuracy"] for r in rows],
          [r["test_accuracy_se"] for r in rows], color=_colors(1)[0], label="Adam-CAM-HD, fixed γ")
    levels = results.get("task", {}).get("levels_2") or ["global", "?"]
    for r in results.get("runs", []):
        if r.get("gamma_global") is not None and r.get("optimizer"):
            levels = r["optimizer"]["hyperparameters"].get("levels", levels)
            break
    ax.set_xlabel(f"γ_global (γ_{levels[1]} = 1 − γ_global)")
    ax.set_ylabel(f"test accuracy (%) at epoch {results.get('config', {}).get('epochs')}")
    ax.set_xticks([r["gamma_global"] for r in rows])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(results), fontsize=8)
    return _save(fig, path)


def plot_hypergrad_sweep(results: Mapping[str, Any], path: Path) -> dict[str, int] | None:
    """The β study: last-epoch test accuracy (mean ± s.e.) against β on a log axis, one panel per base optimizer,
    one line per hyper-gradient rule; the base optimizer without adaptation as a horizontal line with its s.e.
    band; points where a run's loss went NaN / inf marked with a red ×."""
    bases = summarize_hypergrad_sweep(results)
    if not bases:
        return None
    fig, axes = _figure(len(bases), width=5.2)
    rules = list(dict.fromkeys(rule for b in bases for rule in b["rules"]))
    colors = dict(zip(rules, _colors(len(rules))))
    for ax, entry in zip(axes[0], bases):
        ref = entry["reference"]
        name = ref["display_name"] if ref else entry["base"]
        if ref and ref["test_accuracy"] is not None:
            m, se = ref["test_accuracy"], ref["test_accuracy_se"] or 0.0
            ax.axhline(m, color="0.3", linestyle="--", linewidth=1, label=f"{name}, no adaptation")
            ax.axhspan(m - se, m + se, color="0.3", alpha=0.12, linewidth=0)
        for rule, rows in entry["rules"].items():
            _band(ax, [r["hypergrad_lr"] for r in rows], [r["test_accuracy"] for r in rows],
                  [r["test_accuracy_se"] for r in rows], color=colors[rule], label=f"{rule} rule")
            bad = [r for r in rows if r["diverged"] and r["test_accuracy"] is not None]
            if bad:
                ax.scatter([r["hypergrad_lr"] for r in bad], [r["test_accuracy"] for r in bad], marker="x", s=40,
                           color="red", zorder=5, label=f"{rule}: a NaN/inf loss")
        ax.set_xscale("log")
        ax.set_xlabel("β (hypergrad_lr)")
        ax.set_ylabel(f"test accuracy (%) at epoch {results.get('config', {}).get('epochs')}")
        ax.set_title(f"{name} base", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("β sensitivity of CAM-HD, " + _title(results), fontsize=9)
    return _save(fig, path)


def write_plots(results: Mapping[str, Any], out_dir: Path) -> dict[str, dict[str, int]]:
    """Write every plot that applies into ``out_dir``; returns ``{file name: {"curves": n, "axes": k}}``
    (``curves`` = the number of plotted mean lines, counted on the figure before saving)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, int]] = {}
    written["learning_curves.png"] = plot_learning_curves(results, out_dir / "learning_curves.png")
    if results.get("kind") == "sweep-gamma":
        info = plot_gamma_sweep(results, out_dir / "sweep_gamma.png")
        if info:
            written["sweep_gamma.png"] = info
    elif results.get("kind") == "sweep-hypergrad-lr":
        info = plot_hypergrad_sweep(results, out_dir / "sweep_hypergrad_lr.png")
        if info:
            written["sweep_hypergrad_lr.png"] = info
    else:
        info = plot_gamma_trajectories(results, out_dir / "gamma_trajectories.png")
        if info:
            written["gamma_trajectories.png"] = info
    return written
