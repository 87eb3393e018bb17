"""results.json (the schema, atomic incremental writes, resume keys), aggregation (mean ± s.e.) and results.md.

``results.json`` (``schema_version`` 1)::

    {
      "schema_version": 1,
      "kind": "compare" | "sweep-gamma" | "sweep-hypergrad-lr",
      "command": "hf-camhd compare ...",          # how the folder was made
      "config": {...},                             # the CompareConfig (resolved task, arms, seeds, ...)
      "task": {...},                               # the TaskPreset after overrides
      "data": {"dataset", "train_size", "test_size", "source"},
      "environment": {"torch", "hf_camhd", "device", "num_processes", "mixed_precision", "git_commit",
                      "optimizer_packages": {"prodigyopt": "1.1.2", ...}, ...},
                                                   # of the latest invocation (each run keeps its own)
      "runs": [                                    # one per optimizer arm x seed (x fixed gamma / x beta for a sweep)
        {"key": "adam-camhd|seed=0", "arm", "series" (the arm; "arm|gamma_global=0.4" / "arm|hypergrad_lr=1e-08"
         in a sweep), "display_name", "seed", "gamma_global" (γ sweep) or null, "hypergrad_lr" (β sweep) or null,
         "config_hash",                            # hash of everything that decides the run's numbers
         "status": "running" | "finished", "started_at", "finished_at",
         "environment": {"git_commit", "torch", "device", "num_processes", "mixed_precision"},  # when trained
         "optimizer": {"name", "class", "kind", "hyperparameters" (what the arm passed), "settings" (CAM-HD: the
                       β, δ, ρ, r, rule, bounds the optimizer resolved, defaults included), "train_eval_switch"
                       (Schedule-Free: evaluated after optimizer.eval()), "averaging" (DoG: evaluated on the
                       polynomial-decay average), "lr_schedule"},
         "num_parameters", "steps_per_epoch",
         "epochs": [{"epoch", "train_loss" (mean mini-batch loss during the epoch), "test_loss" (mean cross
                     entropy on the test split after the epoch), "test_accuracy" (percent), "test_metrics" (the
                     evaluate modules' results under their names: {"accuracy": fraction}), "lr_factor" (the
                     scheduler's multiplier), "adapted_lr" (Prodigy / D-Adapt: d·lr, DoG / LDoG: mean η; only
                     for them), "wall_time_s" (cumulative)}, ...],
         "hyper_log": [{"step", "epoch" (fractional), "gamma": {level: value},
                        "alpha_mean": {level: value}, "effective_lr_mean"}, ...],   # CAM-HD / HD arms
         "final": {"test_accuracy", "test_metrics", "test_loss", "train_loss", "gamma", "alpha_mean"},
         "diverged" (a train or test loss was NaN / inf), "wall_time_s"}
      ],
      "plots": {"learning_curves.png": {"curves": 12, "axes": 3}, ...}
    }

Non-finite numbers are written as ``null``. The file is rewritten (atomically) after every epoch of
every run, so an interrupted comparison keeps what it finished: a run is reused on resume when a
finished run with the same ``key`` and ``config_hash`` is there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_json, read_json

__all__ = [
    "SCHEMA_VERSION",
    "config_hash",
    "run_key",
    "load_results",
    "save_results",
    "mean_se",
    "arm_order",
    "finished_runs",
    "series_of",
    "summarize",
    "summarize_sweep",
    "summarize_hypergrad_sweep",
    "stable_range",
    "paired_difference",
    "reference_series",
    "epoch_curve",
    "hyper_curve",
    "render_markdown",
]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------- keys & io
def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, tuples -> lists, numbers -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) or hasattr(value, "__float__"):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def config_hash(obj: Any) -> str:
    """A short stable hash of JSON-able ``obj`` (key order does not matter)."""
    text = json.dumps(_clean(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(arm: str, seed: int, gamma_global: float | None = None, hypergrad_lr: float | None = None) -> str:
    """The resume key of one run: ``adam-camhd|seed=0`` (``|gamma_global=0.4`` in a γ sweep,
    ``|hypergrad_lr=1e-08`` in a β sweep)."""
    key = f"{arm}|seed={int(seed)}"
    if gamma_global is not None:
        key += f"|gamma_global={float(gamma_global):g}"
    if hypergrad_lr is not None:
        key += f"|hypergrad_lr={float(hypergrad_lr):g}"
    return key


def load_results(path: str | os.PathLike) -> dict | None:
    """The parsed results.json at ``path``, or ``None`` when absent or of another schema version.

    A file that is not valid JSON (truncated or corrupted) raises
    :class:`~hf_camhd.files.CorruptFileError` naming it and what to do: resuming from it would silently
    drop every run it held."""
    path = Path(path)
    if not path.is_file():
        return None
    data = read_json(path, what="results file",
                     fix="Delete it to rerun every run, or pass --no-resume (it is then kept as results.previous.json).")
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return None
    return data


def save_results(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), non-finite numbers as null."""
    atomic_write_json(path, _clean(data), allow_nan=False)


# --------------------------------------------------------------------------------------------- aggregation
def mean_se(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, standard error, n)`` over the finite values; s.e. = sample std (ddof 1) / sqrt(n), None if n < 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n), n


def series_of(run: Mapping[str, Any]) -> str:
    """The curve / table row a run belongs to: its arm, or ``arm|gamma_global=g`` in a γ sweep."""
    return run.get("series") or run["arm"]


def finished_runs(results: Mapping[str, Any], series: str | None = None) -> list[dict]:
    """Finished runs (of ``series`` when given), in file order."""
    return [r for r in results.get("runs", [])
            if r.get("status") == "finished" and (series is None or series_of(r) == series)]


def arm_order(results: Mapping[str, Any]) -> list[str]:
    """Series (arms; arm × fixed γ in a sweep) in the order of the comparison plan, then any others in the runs."""
    cfg = results.get("config", {})
    order = list(cfg.get("series") or cfg.get("optimizers") or [])
    for r in results.get("runs", []):
        if series_of(r) not in order:
            order.append(series_of(r))
    return order


def _display(results: Mapping[str, Any], series: str) -> str:
    for r in results.get("runs", []):
        if series_of(r) == series:
            return r.get("display_name", series)
    return series


def _level_means(runs: Sequence[Mapping[str, Any]], field: str) -> dict[str, tuple[float | None, float | None]]:
    levels: list[str] = []
    for r in runs:
        for lv in (r.get("final", {}).get(field) or {}):
            if lv not in levels:
                levels.append(lv)
    out = {}
    for lv in levels:
        m, se, _ = mean_se((r.get("final", {}).get(field) or {}).get(lv) for r in runs)
        out[lv] = (m, se)
    return out


def reference_series(results: Mapping[str, Any]) -> str | None:
    """The arm paired differences are taken against: ``adam`` when the comparison has it (not in a sweep: the β
    sweep pairs each base's runs with that base, :func:`summarize_hypergrad_sweep`)."""
    if results.get("kind") in ("sweep-gamma", "sweep-hypergrad-lr"):
        return None
    return "adam" if finished_runs(results, "adam") else None


def paired_difference(runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                      metric: str = "test_accuracy") -> tuple[float | None, float | None, int]:
    """Mean ± s.e. over the seeds both have of ``final[metric]`` minus the reference's (same seed = same
    initial weights and batch order, so the pairing removes most of the seed-to-seed spread)."""
    ref = {r["seed"]: r.get("final", {}).get(metric) for r in reference}
    diffs = [r["final"][metric] - ref[r["seed"]] for r in runs
             if r["seed"] in ref and ref[r["seed"]] is not None and r.get("final", {}).get(metric) is not None]
    return mean_se(diffs)


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per arm (comparison order) over its finished runs: mean ± s.e. of the final-epoch test
    accuracy (%), test loss and train loss; the best epoch's accuracy; mean wall time per run; the
    paired accuracy difference to Adam (``delta_vs_reference``, when Adam is in the comparison); and for
    HD / CAM-HD arms the final γ and mean α per level (means over seeds, with s.e.)."""
    rows = []
    ref_name = reference_series(results)
    ref_runs = finished_runs(results, ref_name) if ref_name else []
    for series in arm_order(results):
        runs = finished_runs(results, series)
        if not runs:
            continue
        final = [r.get("final", {}) for r in runs]
        acc, acc_se, n = mean_se(f.get("test_accuracy") for f in final)
        tl, tl_se, _ = mean_se(f.get("test_loss") for f in final)
        trl, trl_se, _ = mean_se(f.get("train_loss") for f in final)
        best, best_se, _ = mean_se(max((e["test_accuracy"] for e in r["epochs"] if e.get("test_accuracy") is not None),
                                       default=None) for r in runs)
        wall, _, _ = mean_se(r.get("wall_time_s") for r in runs)
        delta, delta_se, _ = paired_difference(runs, ref_runs) if ref_runs else (None, None, 0)
        rows.append({
            "reference": ref_name, "delta_vs_reference": delta, "delta_vs_reference_se": delta_se,
            "series": series, "arm": runs[0]["arm"], "display_name": _display(results, series), "n": n, "seeds": [r["seed"] for r in runs],
            "test_accuracy": acc, "test_accuracy_se": acc_se, "test_loss": tl, "test_loss_se": tl_se,
            "train_loss": trl, "train_loss_se": trl_se, "best_epoch_accuracy": best, "best_epoch_accuracy_se": best_se,
            "diverged": sum(bool(r.get("diverged")) for r in runs), "wall_time_s": wall, "gamma": _level_means(runs, "gamma"), "alpha_mean": _level_means(runs, "alpha_mean"),
        })
    return rows


def summarize_sweep(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per fixed γ_global of a ``--sweep-gamma`` run (ascending): final test accuracy mean ± s.e."""
    by_gamma: dict[float, list[dict]] = {}
    for r in finished_runs(results):
        if r.get("gamma_global") is not None:
            by_gamma.setdefault(float(r["gamma_global"]), []).append(r)
    rows = []
    for g in sorted(by_gamma):
        runs = by_gamma[g]
        acc, se, n = mean_se(r["final"].get("test_accuracy") for r in runs)
        tl, tl_se, _ = mean_se(r["final"].get("test_loss") for r in runs)
        rows.append({"gamma_global": g, "n": n, "test_accuracy": acc, "test_accuracy_se": se,
                     "test_loss": tl, "test_loss_se": tl_se})
    return rows


def _sweep_base_and_rule(run: Mapping[str, Any]) -> tuple[str, str | None]:
    """(base arm, rule) of a β-sweep run: ``adam-camhd-normalized`` → (``adam``, ``normalized``); a reference run
    (no β) → (its arm, None)."""
    if run.get("hypergrad_lr") is None:
        return run["arm"], None
    hp = (run.get("optimizer") or {}).get("hyperparameters") or {}
    return run["arm"].split("-camhd")[0], hp.get("hypergrad_rule") or ("normalized" if run["arm"].endswith(
        "-normalized") else "additive")


def _point(runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    acc, se, n = mean_se(r["final"].get("test_accuracy") for r in runs)
    tl, tl_se, _ = mean_se(r["final"].get("test_loss") for r in runs)
    delta, delta_se, _ = paired_difference(runs, reference) if reference else (None, None, 0)
    return {"n": n, "test_accuracy": acc, "test_accuracy_se": se, "test_loss": tl, "test_loss_se": tl_se,
            "delta_vs_base": delta, "delta_vs_base_se": delta_se,
            "diverged": sum(bool(r.get("diverged")) for r in runs), "display_name": runs[0].get("display_name")}


def summarize_hypergrad_sweep(results: Mapping[str, Any], tolerance: float = 0.5) -> list[dict[str, Any]]:
    """The β study of a ``--sweep-hypergrad-lr`` run, one dict per base optimizer (plan order)::

        {"base": "adam", "reference": {point of the base without adaptation} or None,
         "rules": {"additive": [{"hypergrad_lr": β, **point}, ...ascending β], "normalized": [...]},
         "stable": {rule: stable_range(...)}}

    A point: ``n``, final test accuracy / loss mean ± s.e., ``delta_vs_base`` (paired with the base optimizer on
    the same seed) ± s.e., ``diverged`` (runs whose train or test loss went NaN / inf)."""
    runs = finished_runs(results)
    by_base: dict[str, dict[str, Any]] = {}
    for r in runs:  # plan order: each base's reference first
        base, rule = _sweep_base_and_rule(r)
        entry = by_base.setdefault(base, {"base": base, "references": [], "points": {}})
        if rule is None:
            entry["references"].append(r)
        else:
            entry["points"].setdefault(rule, {}).setdefault(float(r["hypergrad_lr"]), []).append(r)
    out = []
    for base, entry in by_base.items():
        ref = entry["references"]
        rules = {rule: [{"hypergrad_lr": beta, **_point(points[beta], ref)} for beta in sorted(points)]
                 for rule, points in entry["points"].items()}
        out.append({"base": base, "reference": _point(ref, []) if ref else None, "rules": rules,
                    "stable": {rule: stable_range(rows, tolerance) for rule, rows in rules.items()}})
    return out


def stable_range(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.5) -> dict[str, Any] | None:
    """The widest run of neighbouring grid points (ascending β) whose mean test accuracy is within ``tolerance``
    points of the rule's best and where no run went NaN / inf: ``{"best", "best_hypergrad_lr", "low", "high",
    "ratio" (high / low), "points"}``; None without finite accuracies."""
    scored = [r for r in rows if r.get("test_accuracy") is not None]
    if not scored:
        return None
    top = max(scored, key=lambda r: r["test_accuracy"])

    def width(points: Sequence[Mapping[str, Any]]) -> float:
        return points[-1]["hypergrad_lr"] / points[0]["hypergrad_lr"] if points else 0.0

    best_span: list[Mapping[str, Any]] = []
    span: list[Mapping[str, Any]] = []
    for r in rows:
        ok = r.get("test_accuracy") is not None and r["test_accuracy"] >= top["test_accuracy"] - tolerance \
            and not r.get("diverged")
        span = [*span, r] if ok else []
        if width(span) > width(best_span):
            best_span = span
    if not best_span:
        return {"best": top["test_accuracy"], "best_hypergrad_lr": top["hypergrad_lr"], "low": None, "high": None,
                "ratio": None, "points": 0}
    low, high = best_span[0]["hypergrad_lr"], best_span[-1]["hypergrad_lr"]
    return {"best": top["test_accuracy"], "best_hypergrad_lr": top["hypergrad_lr"], "low": low, "high": high,
            "ratio": high / low, "points": len(best_span)}


def epoch_curve(runs: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float | None], list[float | None]]:
    """``(epochs, mean, s.e.)`` of per-epoch ``metric`` across ``runs`` (epochs every run reached)."""
    if not runs:
        return [], [], []
    n_epochs = min(len(r["epochs"]) for r in runs)
    xs, means, ses = [], [], []
    for i in range(n_epochs):
        m, se, _ = mean_se(r["epochs"][i].get(metric) for r in runs)
        xs.append(runs[0]["epochs"][i]["epoch"])
        means.append(m)
        ses.append(se)
    return xs, means, ses


def hyper_curve(runs: Sequence[Mapping[str, Any]], field: str, level: str
                ) -> tuple[list[int], list[float | None], list[float | None]]:
    """``(steps, mean, s.e.)`` of ``hyper_log[*][field][level]`` (``field`` = ``gamma`` or ``alpha_mean``)."""
    logs = [r.get("hyper_log") or [] for r in runs]
    logs = [lg for lg in logs if lg]
    if not logs:
        return [], [], []
    n = min(len(lg) for lg in logs)
    xs, means, ses = [], [], []
    for i in range(n):
        m, se, _ = mean_se((lg[i].get(field) or {}).get(level) for lg in logs)
        xs.append(logs[0][i]["step"])
        means.append(m)
        ses.append(se)
    return xs, means, ses


# --------------------------------------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, se: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    if abs(mean) >= 1e5:  # a loss that blew up: 2.396e+29, not thirty digits
        return f"{mean:.{digits}g}" if se is None else f"{mean:.{digits}g} ± {se:.{digits}g}"
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _signed(mean: float | None, se: float | None, is_reference: bool) -> str:
    if is_reference:
        return "—"
    if mean is None:
        return "n/a"
    return f"{mean:+.2f}" if se is None else f"{mean:+.2f} ± {se:.2f}"


def _bold_if(text: str, cond: bool) -> str:
    return f"**{text}**" if cond else text


def _levels_cell(values: Mapping[str, tuple[float | None, float | None]], digits: str) -> str:
    if not values:
        return "—"
    return ", ".join(f"{lv} {format(m, digits) if m is not None else 'n/a'}" for lv, (m, _) in values.items())


def _beta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _stable_text(rule: str, stable: Mapping[str, Any] | None, tolerance: float) -> str:
    if stable is None:
        return f"{rule}: no finite accuracy"
    if not stable["points"]:
        return f"{rule}: none (every point near the best had a NaN / inf loss)"
    if stable["points"] == 1:
        return f"{rule}: only β = {_beta(stable['low'])}"
    return (f"{rule}: β ∈ [{_beta(stable['low'])}, {_beta(stable['high'])}] ({stable['ratio']:.3g}×, "
            f"{stable['points']} grid points)")


def _hypergrad_sweep_markdown(results: Mapping[str, Any], tolerance: float = 0.5) -> list[str]:
    """The β-sensitivity tables of a ``--sweep-hypergrad-lr`` run (one per base), or nothing."""
    if results.get("kind") != "sweep-hypergrad-lr":
        return []
    bases = summarize_hypergrad_sweep(results, tolerance)
    if not bases:
        return []
    lines = ["## β sensitivity (--sweep-hypergrad-lr)", "",
             "Test accuracy (%) at the last epoch, mean ± s.e. over seeds, per base optimizer, hyper-gradient rule "
             "and β (`hypergrad_lr`); the rest of each arm's settings as in the comparison (the normalized rule: the "
             "optimizer's defaults). Δ: paired difference to the base optimizer without adaptation on the same seed "
             "± its s.e. NaN/inf: runs whose train or test loss became non-finite (their accuracy still counts). "
             "Best mean of each rule in bold.", ""]
    for entry in bases:
        ref = entry["reference"]
        base_name = ref["display_name"] if ref else entry["base"]
        head = f"### {base_name}"
        if ref:
            nonfinite = f", {ref['diverged']} NaN/inf" if ref["diverged"] else ""
            head += f" (no adaptation: {_pm(ref['test_accuracy'], ref['test_accuracy_se'], 2)}, {ref['n']} runs{nonfinite})"
        lines.append(head)
        lines += ["", f"| Rule | β | Test acc (%) | Test S.E | Δ acc vs {base_name} (paired) | Test loss | Runs | "
                      "NaN/inf runs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for rule, rows in entry["rules"].items():
            best = (entry["stable"][rule] or {}).get("best")
            for r in rows:
                is_best = best is not None and r["test_accuracy"] is not None and r["test_accuracy"] == best
                lines.append(f"| {rule} | {_beta(r['hypergrad_lr'])} | {_bold_if(_fmt(r['test_accuracy']), is_best)} | "
                             f"{_fmt(r['test_accuracy_se'])} | "
                             f"{_signed(r['delta_vs_base'], r['delta_vs_base_se'], False) if ref else '—'} | "
                             f"{_pm(r['test_loss'], r['test_loss_se'], 4)} | {r['n']} | {r['diverged']} |")
        lines += ["", f"Widest β range within {tolerance:g} points of the rule's best, with no NaN/inf loss: "
                  + "; ".join(_stable_text(rule, entry["stable"][rule], tolerance) for rule in entry["rules"]) + ".",
                  ""]
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the command, the settings, then the paper-style table (test accuracy %, its s.e.,
    best mean in bold), losses, wall time, the learned γ / α per level and, for a sweep, the γ table."""
    cfg, task, data = results.get("config", {}), results.get("task", {}), results.get("data", {})
    env = results.get("environment", {})
    lines = [f"# hf-camhd compare — {cfg.get('task', '?')}: {task.get('model', '?')} on {data.get('dataset', '?')}", ""]
    if results.get("command"):
        lines += ["Command:", "", "```bash", results["command"], "```", ""]
    lines.append(
        f"Settings: {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, seeds {cfg.get('seeds')}, "
        f"train/test examples {data.get('train_size')}/{data.get('test_size')}"
        + (f" (train subset: --max-train-samples {cfg['max_train_samples']})" if cfg.get("max_train_samples") else "")
        + f"; device {env.get('device', '?')}, {env.get('num_processes', 1)} process(es), "
          f"mixed precision {env.get('mixed_precision', 'no')}.")
    lines.append("Accuracy, losses: the last epoch's, mean ± standard error over seeds (s.e. = sd/√n). "
                 "Best mean test accuracy in bold. Δ vs Adam: the mean over seeds of (this arm − Adam) on the "
                 "same seed (same initial weights and batch order) ± its s.e.; |Δ| > 2 s.e. is a clear "
                 "difference.")
    lines.append("")

    rows = summarize(results)
    if rows:
        best = max((r["test_accuracy"] for r in rows if r["test_accuracy"] is not None), default=None)
        best_loss = min((r["test_loss"] for r in rows if r["test_loss"] is not None), default=None)
        ref = rows[0]["reference"]
        ref_label = next((r["display_name"] for r in rows if r["series"] == ref), ref)
        lines += ["| Optimizer | Test acc (%) | Test S.E | " + (f"Δ acc vs {ref_label} (paired) | " if ref else "")
                  + "Test loss | Train loss | Best-epoch acc (%) | Runs | Time / run (s) |",
                  "|---|---:|---:|" + ("---:|" if ref else "") + "---:|---:|---:|---:|---:|"]
        for r in rows:
            is_best = best is not None and r["test_accuracy"] is not None and round(r["test_accuracy"], 2) == round(best, 2)
            runs_cell = f"{r['n']} ({r['diverged']} diverged)" if r["diverged"] else str(r["n"])
            is_best_loss = (best_loss is not None and r["test_loss"] is not None
                            and round(r["test_loss"], 4) == round(best_loss, 4))
            lines.append(
                f"| {_bold_if(r['display_name'], is_best)} | {_bold_if(_fmt(r['test_accuracy']), is_best)} | "
                f"{_fmt(r['test_accuracy_se'])} | "
                + (f"{_signed(r['delta_vs_reference'], r['delta_vs_reference_se'], r['series'] == ref)} | " if ref else "")
                + f"{_bold_if(_pm(r['test_loss'], r['test_loss_se'], 4), is_best_loss)} | "
                f"{_pm(r['train_loss'], r['train_loss_se'], 4)} | "
                f"{_pm(r['best_epoch_accuracy'], r['best_epoch_accuracy_se'], 2)} | "
                f"{runs_cell} | {_fmt(r['wall_time_s'], 1)} |")
        lines.append("")
        hyper = [r for r in rows if r["gamma"] or r["alpha_mean"]]
        if hyper:
            lines += ["Learned step sizes at the end of training (mean over seeds): γ per level and the mean α "
                      "over each level's nodes.", "",
                      "| Optimizer | γ (final) | mean α per level (final) |", "|---|---|---|"]
            for r in hyper:
                lines.append(f"| {r['display_name']} | {_levels_cell(r['gamma'], '.3f')} | "
                             f"{_levels_cell(r['alpha_mean'], '.3g')} |")
            lines.append("")

    sweep = summarize_sweep(results)
    if sweep:
        best = max((r["test_accuracy"] for r in sweep if r["test_accuracy"] is not None), default=None)
        lv = (task.get("levels_2") or ["global", "?"])
        lines += [f"Fixed-γ sweep (the paper's Figure 1): Adam-CAM-HD with levels {', '.join(lv)}, γ = "
                  f"(γ_global, 1 − γ_global), δ = 0; test accuracy at the last epoch.", "",
                  "| γ_global | Test acc (%) | Test S.E | Test loss | Runs |", "|---:|---:|---:|---:|---:|"]
        for r in sweep:
            is_best = best is not None and r["test_accuracy"] is not None and round(r["test_accuracy"], 2) == round(best, 2)
            lines.append(f"| {r['gamma_global']:.1f} | {_bold_if(_fmt(r['test_accuracy']), is_best)} | "
                         f"{_fmt(r['test_accuracy_se'])} | {_pm(r['test_loss'], r['test_loss_se'], 4)} | {r['n']} |")
        lines.append("")

    lines += _hypergrad_sweep_markdown(results)

    plots = results.get("plots") or {}
    if plots:
        lines += ["Plots: " + ", ".join(f"[{name}]({name})" for name in plots), ""]
    return "\n".join(lines)
