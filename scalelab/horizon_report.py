"""The `scalelab horizon` report: report.md, horizons.csv, bootstrap.csv and two PNGs.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend). Every file is written
under a temporary name and moved into place only after all of them were written, so a failed run never leaves
a half-written report over a good one.
"""

from __future__ import annotations

import csv
import io
import datetime as dt
import math
import os
from pathlib import Path

import numpy as np

from scalelab.errors import ScalelabError
from scalelab.report import savefig, write_text
from scalelab.horizon import HorizonResult, ModelFit, Trend, fmt_minutes, p_label, save_replicates


def write_report(result: HorizonResult, out: Path) -> list[Path]:
    """Write the report files into `out` (created if needed); returns their final paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScalelabError(f"{out}: cannot create the report directory ({e.strerror})") from None
    writers = [("horizons.csv", _write_csv), ("success_vs_length.png", _plot_curves), ("report.md", _write_md)]
    if result.reps is not None and result.settings.get("replicates_file") is None:
        writers.insert(1, ("bootstrap.csv", lambda r, p: save_replicates(r.reps, p)))
    if result.trends:
        writers.insert(-1, ("headline.png", _plot_headline))
    done: list[tuple[Path, Path]] = []
    try:
        for name, write in writers:
            tmp = out / f".{name}.tmp-{os.getpid()}"
            done.append((tmp, out / name))
            write(result, tmp)
        for tmp, final in done:
            os.replace(tmp, final)
        written = {final.name for _, final in done}
        for stale in ("bootstrap.csv", "headline.png"):  # from an earlier run with other settings
            if stale not in written:
                (out / stale).unlink(missing_ok=True)
    finally:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
    return [final for _, final in done]


def _ordered(result: HorizonResult) -> list[ModelFit]:
    far = dt.date.max
    return sorted(result.fits, key=lambda f: (result.dates.get(f.model, far), f.model))


def _num(v: float) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.6g}"


def _ci_names(level: float) -> tuple[str, str]:
    return f"q{(1 - level) / 2:g}", f"q{(1 + level) / 2:g}"


def _write_csv(result: HorizonResult, path: Path) -> None:
    """Per-model results with METR's headline.csv column names (plus status, runs, tasks)."""
    lo_name, hi_name = _ci_names(float(result.settings["level"]))  # type: ignore[arg-type]
    buckets = list(next((f.buckets for f in result.fits if f.buckets), {}))
    cols = ["agent", "release_date", "status", "n_runs", "n_tasks", "coefficient", "intercept", "bce_loss", "average"]
    for p in result.ps:
        cols += [p_label(p), p_label(p) + lo_name, p_label(p) + hi_name]
    f = io.StringIO(newline="")
    wr = csv.writer(f)
    wr.writerow(cols + buckets)
    for fit in _ordered(result):
        d = result.dates.get(fit.model)
        row = [fit.model, d.isoformat() if d else "", fit.status, fit.n_runs or "", fit.n_tasks or "",
               _num(fit.slope), _num(fit.intercept), _num(fit.bce_loss), _num(fit.average)]
        for p in result.ps:
            lo, hi = fit.ci.get(p, (math.nan, math.nan))
            row += [_num(fit.horizon(p)), _num(lo), _num(hi)]
        wr.writerow(row + [_num(fit.buckets.get(b, math.nan)) for b in buckets])
    write_text(path, f.getvalue())


def _ci_text(fit: ModelFit, p: float) -> str:
    lo, hi = fit.ci.get(p, (math.nan, math.nan))
    return f"{fmt_minutes(lo)}–{fmt_minutes(hi)}" if math.isfinite(lo) and math.isfinite(hi) else ""


def _command(result: HorizonResult) -> str:
    s = result.settings
    parts = ["scalelab horizon", f"'{result.source}'"]
    if s.get("release_dates"):
        parts.append(f"--release-dates '{s['release_dates']}'")
    if s["models"] != "all":
        parts.append(f"--models '{s['models']}'")
    if result.runs is not None:
        parts += [f"--weighting {s['weighting']}", f"-C {s['C']:g}"]
    parts.append(f"--p {','.join(f'{100 * p:g}' for p in result.ps)}")
    if s.get("replicates_file"):
        parts.append(f"--replicates '{s['replicates_file']}'")
    elif result.runs is not None:
        parts += [f"--bootstrap {s['bootstrap']}", f"--seed {s['seed']}"]
    if s.get("after"):
        parts.append(f"--after {s['after']}")
    return " ".join(parts)


def _write_md(result: HorizonResult, path: Path) -> None:
    s, runs = result.settings, result.runs
    pct = int(round(100 * float(s["level"])))  # type: ignore[arg-type]
    lines = ["# Time horizons (METR method)", ""]
    if runs is not None:
        lines.append(f"Source: `{result.source}`: {len(runs)} runs, {len(runs.models)} models, {len(runs.tasks)} tasks "
                     f"in {len(runs.families)} families.")
        boot = (f"{s['bootstrap']} hierarchical bootstrap replicates (families → tasks → runs, seed {s['seed']})"
                if s["bootstrap"] and not s.get("replicates_file") else
                f"replicates from `{s['replicates_file']}`" if s.get("replicates_file") else "no bootstrap")
        lines += ["", f"Fit: success ~ σ(a + b·log2 minutes), minimising ½b² + C·Σ wᵢℓᵢ with C = {s['C']:g}, "
                      f"weights `{s['weighting']}` summing to 1 per model. Uncertainty: {boot}; {pct}% intervals."]
    else:
        lines.append(f"Source: `{result.source}` (per-model fits; horizons as given"
                     + (f"; CIs from `{s['replicates_file']}`" if s.get("replicates_file") else "") + ").")
    lines += ["", f"Recompute: `{_command(result)}`", ""]
    if result.trends:
        lines += ["## Doubling time", "",
                  f"| horizon | doubling time (days) | {pct}% CI (days) | R² | models | replicates kept |",
                  "|---|---|---|---|---|---|"]
        for t in result.trends:
            lo, hi = t.ci
            ci = f"{lo:.0f}–{hi:.0f}" if math.isfinite(lo) else "n/a"
            kept = f"{t.n_kept}/{t.n_replicates}" if t.n_replicates else "n/a"
            lines.append(f"| {p_label(t.p)} | {t.doubling_days:.1f} | {ci} | {t.r2:.3f} | {len(t.models)} | {kept} |")
        t0 = result.trends[0]
        lines += ["", "OLS of ln(horizon) on release date (days); doubling time = ln 2 / slope. The CI refits the line "
                  "on every replicate, dropping horizons that are NaN, infinite or below 1e-3 min and keeping positive "
                  "doubling times only (as METR).", "", f"Models in the trend: {', '.join(t0.models)}."]
        for m, why in t0.excluded.items():
            lines.append(f"- excluded {m}: {why}")
        lines += ["", "![headline](headline.png)", ""]
    for n in result.notes:
        lines.append(f"Note: {n}")
    lines += ["", "## Per-model horizons", ""]
    head = ["model", "released"] + (["runs", "tasks"] if runs is not None else [])
    for p in result.ps:
        head += [f"{p_label(p)} (min)", f"{pct}% CI"]
    head += ["slope", "intercept", "avg success"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in _ordered(result):
        d = result.dates.get(f.model)
        row = [f.model, d.isoformat() if d else ""] + ([str(f.n_runs), str(f.n_tasks)] if runs is not None else [])
        for p in result.ps:
            row += [f.describe(p), _ci_text(f, p)]
        row += [_num(f.slope), _num(f.intercept), _num(f.average)]
        if f.status == "positive_slope":
            row[0] += " (slope ≥ 0: success does not fall with length; horizon not meaningful)"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![success vs task length](success_vs_length.png)", "", "## Files", "",
              "- `horizons.csv`: per-model results, METR's headline.csv columns plus status, runs and tasks."]
    if result.reps is not None and not s.get("replicates_file"):
        lines.append("- `bootstrap.csv`: every replicate's horizons (METR's `<model>_p50` layout); "
                     "reuse with `--replicates`.")
    lines += ["- `success_vs_length.png`: weighted success rate by task length with each fitted curve."]
    if result.trends:
        lines.append("- `headline.png`: p50 against release date, log scale, with the trend and its band.")
    write_text(path, "\n".join(lines) + "\n")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(result: HorizonResult, path: Path) -> None:
    """One panel per model: weighted success in log-spaced length bins, the fitted curve, its p50."""
    fits, runs = _ordered(result), result.runs
    n = len(fits)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    if runs is not None:
        from scalelab.horizon import run_weights

        w = run_weights(runs, str(result.settings["weighting"]))
        lo, hi = np.log2(runs.minutes.min()), np.log2(runs.minutes.max())
    else:
        lo, hi = math.log2(1 / 60), math.log2(16 * 60)
    grid = np.linspace(lo - 0.5, hi + 0.5, 200)
    edges = np.linspace(lo, hi + 1e-9, 9)
    for ax, f in zip(axes.flat, fits):
        if runs is not None:
            m = runs.model == runs.models.index(f.model)
            x, y, wm = np.log2(runs.minutes[m]), runs.success[m], w[m]
            b = np.clip(np.digitize(x, edges) - 1, 0, len(edges) - 2)
            tot = np.bincount(b, weights=wm, minlength=len(edges) - 1)
            rate = np.bincount(b, weights=wm * y, minlength=len(edges) - 1) / np.where(tot > 0, tot, 1)
            mid = 2 ** ((edges[:-1] + edges[1:]) / 2)
            ax.scatter(mid[tot > 0], rate[tot > 0], s=12 + 80 * tot[tot > 0] / tot.max(), color="0.3", zorder=3)
        if math.isfinite(f.slope):
            ax.plot(2**grid, 1 / (1 + np.exp(-(f.intercept + f.slope * grid))), color="C0")
            h = f.horizon(0.5)
            if 2**lo <= h <= 2**hi:
                ax.axvline(h, color="C3", ls="--", lw=1)
        ax.set_title(f"{f.model}\np50 {f.describe(0.5).split(' (')[0]}", fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("human minutes", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("success", fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


def _plot_headline(result: HorizonResult, path: Path) -> None:
    """p-horizon against release date (log scale) with CIs, the OLS trend and its bootstrap band."""
    from matplotlib.dates import num2date

    t: Trend = next((t for t in result.trends if t.p == 0.5), result.trends[0])
    level = float(result.settings["level"])  # type: ignore[arg-type]
    fig = _figure(9, 5.5)
    ax = fig.subplots()
    by_name = {f.model: f for f in result.fits}
    for name in t.models:
        f, d = by_name[name], result.dates[name]
        h = f.horizon(t.p)
        lo, hi = f.ci.get(t.p, (math.nan, math.nan))
        err = [[max(h - lo, 0)], [max(hi - h, 0)]] if math.isfinite(lo) and math.isfinite(hi) else None
        ax.errorbar([d], [h], yerr=err, fmt="o", color="C0", ecolor="C0", capsize=3, ms=6, zorder=3)
        ax.annotate(name, (d, h), textcoords="offset points", xytext=(6, -3), fontsize=7)
    others = [f for f in result.fits if f.model in result.dates and f.model not in t.models
              and math.isfinite(f.horizon(t.p)) and f.horizon(t.p) > 0]
    if others:
        ax.scatter([result.dates[f.model] for f in others], [f.horizon(t.p) for f in others], facecolors="none",
                   edgecolors="0.5", zorder=2, label=f"not in the trend ({len(others)})")
    days = np.array([(result.dates[m] - dt.date(1970, 1, 1)).days for m in t.models], dtype=float)
    grid = np.linspace(days.min() - 180, days.max() + 180, 300)
    dates = [d.date() for d in num2date(grid)]
    lo, hi = t.ci
    label = f"trend: doubling time {t.doubling_days:.0f} days"
    if math.isfinite(lo):
        label += f" ({100 * level:.0f}% CI {lo:.0f}–{hi:.0f})"
    ax.plot(dates, np.exp(t.intercept + t.slope * grid), color="C1", label=label + f", R² {t.r2:.2f}")
    if t.boot_lines is not None and len(t.boot_lines):
        pred = np.exp(t.boot_lines[:, 1:2] + t.boot_lines[:, :1] * grid)
        band = np.nanpercentile(pred, [50 * (1 - level), 50 * (1 + level)], axis=0)
        ax.fill_between(dates, band[0], band[1], color="C1", alpha=0.15, label=f"{100 * level:.0f}% band of trend")
    ax.set_yscale("log")
    ax.set_xlabel("model release date")
    ax.set_ylabel(f"{100 * t.p:g}% time horizon (human minutes)")
    ax.set_title(f"{100 * t.p:g}% time horizon of {len(t.models)} models")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    savefig(fig, path)

