"""Time horizons (METR, 2025): the 212-day doubling time from METR's own per-model fits and release dates."""

from __future__ import annotations

from pathlib import Path

from scalelab.papers.section import Options, Section


def run(out: Path, quick: bool, opts: Options | None = None) -> Section:
    from scalelab.horizon import analyse
    from scalelab.horizon_report import write_report

    title = "Time horizons: Measuring AI Ability to Complete Long Tasks (METR, 2025)"
    claim = "the 50% time horizon of frontier models doubles every ~212 days (11 models, 2019–2025)"
    shared = (opts or Options()).shared_dir()
    metr = shared / "data" / "metr" if shared else None
    if metr is None or not metr.is_dir():
        return Section("horizon", title, claim, "METR data not found (../shared/data/metr)", "not run",
                       "Pass --shared DIR, the folder holding `data/metr`, to run this section.")
    fits = metr / "cross-domain-horizon_7ce143a_2025-04-14" / "horizons_raw.csv"
    dates = metr / "eval-analysis-public_2cd6540_2025-03-18" / "release_dates.yaml"
    boot = metr / "cross-domain-horizon_e97c024_2025-07-14" / "bootstrap" / "headline.csv"
    result = analyse(fits, dates, models="frontier11", replicates=boot)
    write_report(result, out)
    trend = result.trends[0]
    days, (lo, hi) = trend.doubling_days, trend.ci
    holds = abs(days - 212) <= 2
    body = f"""From METR's own per-model fits (`horizons_raw.csv`, 2025-04-14) and the paper's release dates, \
OLS of ln(p50) on release date over METR's 11 frontier models, with the CI from METR's 1,000 hierarchical \
bootstrap draws. The full report is [horizon/report.md](horizon/report.md).

- Doubling time: **{days:.1f} days** (95% CI {lo:.0f}–{hi:.0f}), R² {trend.r2:.3f}; the paper: 212 days \
(R² 0.98). The remaining day comes from Claude 3.7 Sonnet's p50, 54.2 min in METR's April output against 59 in \
the paper.
- Verdict rule: holds if within 2 days of 212.

![headline](horizon/headline.png)
"""
    return Section("horizon", title, claim, f"{days:.1f} days (95% CI {lo:.0f}–{hi:.0f}), R² {trend.r2:.3f}",
                   "holds" if holds else "does not hold", body, [], threshold="|doubling time − 212 days| ≤ 2",
                   regime={"models": len(trend.models), "data": "METR's per-model fits, 2025-04-14",
                           "bootstrap": "METR's 1,000 draws"},
                   paper_regime={"models": 11, "tasks": "HCAST + RE-Bench + SWAA", "period": "2019-2025"},
                   figures={"doubling_days": days, "ci": [lo, hi], "r2": trend.r2})
