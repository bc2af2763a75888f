"""Wall-clock model of DP and DiLoCo over a slow link: Charles et al. 2025 ("Scaling Laws for DiLoCo",
arXiv:2503.09799), Appendix A and its Table 6.

Units: bandwidths in **bits** per second, payloads in bytes per parameter (×8 on the wire), times in seconds.

The model (App. A), one training step of compute time C:

- A bandwidth-optimal (ring) all-reduce of N parameters over R nodes moves 2·N·b·(1 − 1/R) bytes per node,
  so it takes 2·N·b·8·(1 − 1/R)/W + ε over a link of W bit/s and latency ε (`allreduce_seconds`).
- DP pays that all-reduce over the slow link W1 every step.
- DiLoCo with M ≥ 2 replicas and H inner steps pays, every step, an all-reduce inside a replica over the
  fast link W0 (R/M nodes: 2·N·b·8·(1 − M/R)/W0 + ε0), and every H steps one over the slow link
  (2·N·b·8·(1 − 1/R)/W1 + ε1). M = 1 pays the DP cost plus that extra all-reduce every H steps.
- Compute utilization = C / wall time per step (`compute_utilization`).

What is deliberately added, as explicit `Assumptions` (defaults = the plain App. A model):

- **Overlap with the backward pass.** The plain model u = C/(C + T) cannot produce Table 6: it predicts
  W(80%)/W(50%) = 4 and W(99%)/W(50%) = 99 where the table has 1.76 and 3.73. The DiLoCo authors' public
  simulator says "the reduction of gradients or outer gradients is overlapped over the backward pass
  computation" (backward = 2/3 of the step there). Here a collective is issued in `buckets` equal parts
  released uniformly over the last `overlap_fraction` of the step and queued FIFO on the link; the step waits
  for the last part. For k buckets of duration d = T/k + ε the exposed time is exactly
  max(d, k·d − f·C·(1 − 1/k)); `buckets=None` is the fluid limit max(0, T + ε − f·C).
- **A bandwidth grid.** Table 6's cells sit on a geometric grid: `infer_geometric_grid` recovers the ratio
  1.2068 = 10^(4/49) from the cells ≥ 5 Gbit/s (where the printed rounding is < 1%) and the grid's phase,
  which puts both 0.1 and 1000 Gbit/s on it: the grid is 50 log-spaced points from 0.1 to 1000 Gbit/s
  (`TABLE6_GRID_BITS_PER_S`), and a cell is the smallest grid value reaching the utilization. 16 of the 20
  distinct printed values are grid values rounded to 0.1; the other four differ by one in the last printed
  digit (grid 2.947/6.251/40.95/86.85 printed 3.0/6.2/41.0/86.8), within 2%.

Table 6 (`table6`, `PAPER_TABLE6`; 10B model, 0.8 s step, DP and DiLoCo M=2 at H ∈ {10, 50, 100, 300}):

- Stated by the paper: N = 10e9 and C = 0.8 s (the table's setting), bf16 weights and gradients (§3).
- Taken from the DiLoCo authors' public bandwidth simulator (arthurdouillard.com/diloco, a later tool, not the
  paper's code): a ring across M = 2 datacenters, so R = 2 and the factor 2(1 − 1/R) = 1 (and no traffic
  inside a replica crosses the slow link); reduction overlapped over the backward pass, 2/3 of the step; no
  latency per collective (ε = 0).
- Fitted: the payload and the bucket count. With the overlap fixed, stall ≈ payload/W − overlap, so each cell
  is an interval for the payload. The stated 10e9 × bf16 (2 bytes, §3) = 160 Gbit matches at most 6 of 25 cells
  for every overlap (0.3–1 of the step) and bucket count (16–128) tried: the low-bandwidth DiLoCo cells, where
  the overlap hardly matters, need 108–112 Gbit. At the stated overlap, the 21 cells kept here intersect in
  114.7–115.3 Gbit: an effective 1.4375 bytes/parameter (115 Gbit) and 40 buckets (37–43 give the same table;
  the 99% DP cell needs payload/buckets in 2.6–3.2 Gbit, so it is not one bucket per each of the 48 layers).
  Freeing the overlap too (best ≈ 0.58–0.65 of the step) also reaches 21 cells, missing four others
  (DP and H=10 at 50%, H=10 and H=50 at 95%), so the stated 2/3 is kept.
- 21 of 25 cells come out within 5% (most exactly, on the grid). Four are one grid step (≈ 20%) off and are
  listed, with the payload each would need, in `TABLE6_EXCEPTIONS`: H=10 at 95% (ours 126.5, paper 152.6),
  H=50 at 95% (49.4 vs 41.0), H=100 at 50% (1.7 vs 1.4) and H=100 at 95% (28.1 vs 23.3).
- Why no fit gets them all: the rows disagree on the payload. Each row alone fits the model, but at the stated
  overlap DP needs 114.6–125.0 Gbit, H=10 119.0–122.4, H=50 99.0–107.5, H=100 106.3–110.2 and H=300
  108.2–116.7. One miss is forced by the table itself, whatever the model (`table6_conflicts`): at 126.5 Gbit/s,
  H=10 below 95% needs a per-sync stall > 0.421 s while H=50 at 99% needs ≤ 0.404 s, and both rows sync the
  same payload over the same link.

`time_to_loss` turns measured steps-to-target into wall-clock at 1, 10 and 100 Gbit/s; `project_time_to_loss`
does it at the paper's sizes (Table 3, D = 20N, Q = 300 TFLOP/s per chip from App. A).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from scalelab.errors import ScalelabError

GBIT = 1e9

# App. A: the networks of the paper's wall-clock figures, (bandwidth bit/s, latency s), and chip FLOP/s.
PAPER_NETWORKS: tuple[tuple[float, float], ...] = ((400 * GBIT, 1e-4), (100 * GBIT, 1e-3), (10 * GBIT, 1e-2))
PAPER_FLOPS_PER_CHIP = 300e12
# Table 3: the model sizes (parameters); the token budget is Chinchilla's D = 20N.
PAPER_MODEL_SIZES: dict[str, float] = {"35M": 35e6, "90M": 90e6, "180M": 180e6, "330M": 330e6, "550M": 550e6,
                                       "1.3B": 1.3e9, "2.4B": 2.4e9, "4B": 4e9, "10B": 10e9}
CHINCHILLA_TOKENS_PER_PARAM = 20

DEFAULT_BANDWIDTHS_BITS_PER_S: tuple[float, ...] = (1 * GBIT, 10 * GBIT, 100 * GBIT)


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def allreduce_seconds(n_params: float, bytes_per_param: float, R: int, bandwidth_bits_per_s: float,
                      latency_s: float = 0.0) -> float:
    """Time of a bandwidth-optimal ring all-reduce of n_params over R nodes: 2·N·b·8·(1 − 1/R)/W + ε.

    `bandwidth_bits_per_s` is per node, in bits/s (hence the ×8 on bytes). R = 1 is no collective: 0 s.
    """
    return _transfer_seconds(n_params, bytes_per_param, R, bandwidth_bits_per_s) + (latency_s if R > 1 else 0.0)


def _transfer_seconds(n_params: float, bytes_per_param: float, R: int, bandwidth_bits_per_s: float) -> float:
    if R < 1:
        raise ScalelabError(f"an all-reduce needs at least one node, got R={R}")
    if not bandwidth_bits_per_s > 0:
        raise ScalelabError(f"bandwidth must be > 0 bit/s, got {bandwidth_bits_per_s}")
    if R == 1:
        return 0.0
    return 2.0 * n_params * bytes_per_param * 8.0 * (1.0 - 1.0 / R) / bandwidth_bits_per_s


def step_compute_seconds(n_params: float, tokens_per_step: float, flops_per_s: float,
                         utilization: float = 1.0) -> float:
    """Compute time of one step: 6·N·tokens FLOPs (forward + backward) at flops_per_s × utilization (MFU)."""
    if not (flops_per_s > 0 and 0 < utilization <= 1):
        raise ScalelabError(f"need flops_per_s > 0 and 0 < utilization ≤ 1, got {flops_per_s}, {utilization}")
    return 6.0 * n_params * tokens_per_step / (flops_per_s * utilization)


def exposed_comm_seconds(transfer_s: float, compute_s: float, overlap_fraction: float = 0.0,
                         buckets: int | None = None, latency_s: float = 0.0) -> float:
    """The part of a collective that the step waits for, after hiding what it can behind compute.

    The collective is `buckets` equal parts, released one by one at equal intervals over the last
    `overlap_fraction`·compute_s of the step (as gradients of successive layers become ready in the backward
    pass) and sent FIFO, each taking transfer_s/buckets + latency_s. The step ends when the last part
    arrives: max(d, k·d − f·C·(1 − 1/k)) with d the part's duration, exactly. `buckets=None` is the fluid
    limit: max(0, transfer + latency − f·C). With no overlap the whole collective is exposed.
    """
    if not 0.0 <= overlap_fraction <= 1.0:
        raise ScalelabError(f"overlap_fraction is a share of the step's compute in [0, 1], got {overlap_fraction}")
    if transfer_s == 0.0 and latency_s == 0.0:
        return 0.0
    window = overlap_fraction * compute_s
    if buckets is None:
        return max(0.0, transfer_s + latency_s - window)
    if buckets < 1:
        raise ScalelabError(f"buckets must be at least 1 (or None for the fluid limit), got {buckets}")
    part = transfer_s / buckets + latency_s
    return max(part, buckets * part - window * (1.0 - 1.0 / buckets))


# ---------------------------------------------------------------------------------------------------------
# Strategies and the per-step wall time


@dataclass(frozen=True)
class Assumptions:
    """Everything the wall-clock model assumes; defaults are the plain App. A model (no overlap)."""

    n_params: float
    step_compute_s: float
    bytes_per_param: float = 2.0                  # bf16 gradients / outer gradients (paper §3)
    nodes: int = 2                                # R: nodes in the all-reduce; across datacenters, the DCs
    latency_s: float = 0.0                        # ε1 per collective on the slow link (per bucket if bucketed)
    fast_bandwidth_bits_per_s: float = math.inf   # W0 inside a DiLoCo replica; inf = free
    fast_latency_s: float = 0.0                   # ε0
    overlap_fraction: float = 0.0                 # share of step compute a collective can hide behind (bwd ≈ 2/3)
    buckets: int | None = None                    # parts a collective is issued in; None = fluid


@dataclass(frozen=True)
class Strategy:
    """`dp`, or `diloco` with M replicas syncing over the slow link every H inner steps."""

    kind: str = "dp"
    H: int = 1
    M: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("dp", "diloco"):
            raise ScalelabError(f"strategy kind must be 'dp' or 'diloco', got {self.kind!r}")
        if self.H < 1 or self.M < 1:
            raise ScalelabError(f"need H ≥ 1 and M ≥ 1, got H={self.H}, M={self.M}")


DP = Strategy("dp")


def diloco(H: int, M: int = 2) -> Strategy:
    return Strategy("diloco", H=H, M=M)


def seconds_per_step(strategy: Strategy, bandwidth_bits_per_s: float, a: Assumptions) -> float:
    """Average wall time of one (inner) step: compute plus the communication it cannot hide (App. A)."""
    C = a.step_compute_s
    slow_transfer = _transfer_seconds(a.n_params, a.bytes_per_param, a.nodes, bandwidth_bits_per_s)
    slow_latency = a.latency_s if a.nodes > 1 else 0.0
    slow = exposed_comm_seconds(slow_transfer, C, a.overlap_fraction, a.buckets, slow_latency)
    if strategy.kind == "dp":
        return C + slow
    if strategy.M == 1:
        # App. A: one replica spanning every node pays DP's per-step all-reduce plus one more every H steps.
        return C + slow + slow / strategy.H
    if a.nodes % strategy.M:
        raise ScalelabError(f"M={strategy.M} replicas must split R={a.nodes} nodes evenly")
    per_replica = a.nodes // strategy.M
    inner = 0.0
    if per_replica > 1:
        # Inside a replica, over the fast link: 2·N·b·8·(1 − M/R)/W0 + ε0 (App. A), a separate link from W1.
        transfer = 0.0 if math.isinf(a.fast_bandwidth_bits_per_s) else _transfer_seconds(
            a.n_params, a.bytes_per_param, per_replica, a.fast_bandwidth_bits_per_s)
        inner = exposed_comm_seconds(transfer, C, a.overlap_fraction, a.buckets, a.fast_latency_s)
    return C + inner + slow / strategy.H


def compute_utilization(bandwidth_bits_per_s: float, strategy: Strategy, a: Assumptions) -> float:
    """Compute time / wall time per step, in (0, 1]."""
    return a.step_compute_s / seconds_per_step(strategy, bandwidth_bits_per_s, a)


def bandwidth_for_utilization(target: float, strategy: Strategy, a: Assumptions,
                              grid: Sequence[float] | np.ndarray | None = None,
                              lo: float = 1e3, hi: float = 1e18, rtol: float = 1e-9) -> float:
    """The smallest slow-link bandwidth (bit/s) whose compute utilization reaches `target`.

    Utilization never decreases with bandwidth, so: with `grid`, the smallest grid value reaching it (how
    Table 6 was made); without, a bisection on log-bandwidth between lo and hi to relative tolerance rtol.
    Raises ScalelabError when even `hi` (or the grid's largest value) cannot reach the target, e.g. because
    latency alone costs more than 1 − target of the step.
    """
    if not 0.0 < target <= 1.0:
        raise ScalelabError(f"target utilization must be in (0, 1], got {target}")
    if grid is not None:
        for w in sorted(float(g) for g in grid):
            if compute_utilization(w, strategy, a) >= target:
                return w
        raise ScalelabError(f"no bandwidth on the grid (max {max(grid):.3g} bit/s) reaches {target:.0%} utilization")
    if compute_utilization(hi, strategy, a) < target:
        raise ScalelabError(f"{target:.0%} utilization is out of reach even at {hi:.3g} bit/s "
                            f"(latency or non-overlapped compute limits it)")
    if compute_utilization(lo, strategy, a) >= target:
        return lo
    log_lo, log_hi = math.log(lo), math.log(hi)
    while log_hi - log_lo > rtol:
        mid = 0.5 * (log_lo + log_hi)
        if compute_utilization(math.exp(mid), strategy, a) >= target:
            log_hi = mid
        else:
            log_lo = mid
    return math.exp(log_hi)


# ---------------------------------------------------------------------------------------------------------
# Table 6

TABLE6_UTILIZATIONS: tuple[float, ...] = (0.50, 0.80, 0.90, 0.95, 0.99)
# Gbit/s to reach each utilization; 10B Chinchilla model, 0.8 s step ([paper-SL] Table 6).
PAPER_TABLE6: dict[str, tuple[float, ...]] = {
    "DP": (104.8, 184.2, 222.3, 222.3, 390.7),
    "H=10": (16.0, 49.4, 86.8, 152.6, 222.3),
    "H=50": (3.0, 11.0, 23.3, 41.0, 126.5),
    "H=100": (1.4, 6.2, 13.3, 23.3, 86.8),
    "H=300": (0.5, 2.0, 4.3, 9.1, 41.0),
}
TABLE6_STRATEGIES: dict[str, Strategy] = {"DP": DP, "H=10": diloco(10), "H=50": diloco(50),
                                          "H=100": diloco(100), "H=300": diloco(300)}
TABLE6_GRID_BITS_PER_S: tuple[float, ...] = tuple(float(g) * GBIT for g in np.logspace(-1, 3, 50))
TABLE6_ASSUMPTIONS = Assumptions(
    n_params=10e9,            # stated: the 10B Chinchilla model
    step_compute_s=0.8,       # stated
    bytes_per_param=1.4375,   # fitted effective payload: 115 Gbit per slow all-reduce (bf16, stated, is 2.0)
    nodes=2,                  # simulator: two datacenters, ring factor 2(1 − 1/2) = 1
    latency_s=0.0,            # simulator: no latency per collective
    overlap_fraction=2 / 3,   # simulator: reduction overlapped over the backward pass, 2/3 of the step
    buckets=40,               # fitted: 37–43 reproduce the same table
)
# The cells this model misses, each one grid step off, with the payload each would need at the fitted overlap
# (bounds from stall = payload/W − overlap; the 21 matched cells need 114.7–115.3 Gbit).
TABLE6_EXCEPTIONS: dict[tuple[str, float], str] = {
    ("H=10", 0.95): "needs > 119.0 Gbit; and no bandwidth-only stall model matches it together with H=50 at 99%",
    ("H=50", 0.95): "needs ≤ 107.5 Gbit, against > 114.6 Gbit for DP at 50%",
    ("H=100", 0.50): "needs ≤ 111.9 Gbit, against > 114.6 Gbit for DP at 50%",
    ("H=100", 0.95): "needs ≤ 110.2 Gbit, against > 114.6 Gbit for DP at 50%",
}


def table6(decimals: int | None = 1, a: Assumptions = TABLE6_ASSUMPTIONS,
           grid: Sequence[float] | None = TABLE6_GRID_BITS_PER_S) -> dict[str, tuple[float, ...]]:
    """Our Table 6: Gbit/s for each row of `TABLE6_STRATEGIES` to reach each of `TABLE6_UTILIZATIONS`.

    Rounded to `decimals` like the paper's printing (None: the raw values); `grid=None` bisects instead.
    """
    out = {}
    for row, strategy in TABLE6_STRATEGIES.items():
        cells = [bandwidth_for_utilization(u, strategy, a, grid=grid) / GBIT for u in TABLE6_UTILIZATIONS]
        out[row] = tuple(round(c, decimals) if decimals is not None else c for c in cells)
    return out


def grid_index(value: float, grid: Sequence[float]) -> int:
    """Index of the grid point nearest to `value` on a log scale."""
    return int(np.argmin(np.abs(np.log(np.asarray(grid, dtype=np.float64)) - math.log(value))))


def table6_conflicts(table: Mapping[str, Sequence[float]] = PAPER_TABLE6,
                     step_s: float = TABLE6_ASSUMPTIONS.step_compute_s) -> list[tuple[tuple[str, float], ...]]:
    """Pairs of cells that no model can match together if a sync's stall depends on the bandwidth only.

    A cell (row with cadence H, utilization u, grid value g_k) says stall(g_k) ≤ y and stall(g_{k−1}) > y with
    y = H·C·(1/u − 1), since u = H·C/(H·C + stall). As the stall cannot grow with bandwidth, cells a and b
    conflict when g_{k_b−1} ≥ g_{k_a} and y_b ≥ y_a. Returns (a, b) pairs of (row, utilization).
    """
    grid = [g / GBIT for g in TABLE6_GRID_BITS_PER_S]
    cells = []
    for row, values in table.items():
        H = TABLE6_STRATEGIES[row].H
        for u, v in zip(TABLE6_UTILIZATIONS, values):
            cells.append(((row, u), grid_index(v, grid), H * step_s * (1.0 / u - 1.0)))
    return [(a[0], b[0]) for a in cells for b in cells
            if a is not b and b[1] - 1 >= a[1] and b[2] >= a[2]]


def infer_geometric_grid(values: Sequence[float], min_value: float = 5.0) -> tuple[float, float]:
    """(ratio, phase) of the geometric grid that the printed values sit on: value ≈ ratio^(k + phase).

    Uses values ≥ min_value, whose one-decimal rounding is < 1%: the smallest gap between distinct log values
    estimates log(ratio), every value gets an integer index, a least-squares line through (index, log value)
    refines the ratio, and the circular mean of log_ratio(value) mod 1 gives the phase. A number x is on the
    grid when log_ratio(x) − phase is an integer.
    """
    logs = np.unique(np.log([v for v in values if v >= min_value]))
    if logs.size < 3:
        raise ScalelabError(f"need at least 3 distinct values ≥ {min_value} to infer a grid")
    step = float(np.diff(logs).min())
    for _ in range(3):
        k = np.round((logs - logs[0]) / step)
        step = float(np.polyfit(k, logs, 1)[0])
    angles = 2 * np.pi * (logs / step)
    phase = float(np.angle(np.exp(1j * angles).mean()) / (2 * np.pi)) % 1.0
    return math.exp(step), phase


# ---------------------------------------------------------------------------------------------------------
# Time to a target loss


def time_to_loss(steps_to_target: int | None, step_compute_s: float, strategy: Strategy, n_params: float,
                 bandwidths_bits_per_s: Sequence[float] = DEFAULT_BANDWIDTHS_BITS_PER_S,
                 assumptions: Assumptions | None = None) -> dict[float, float | None]:
    """Wall-clock seconds to reach a target loss, per slow-link bandwidth (keys in Gbit/s).

    `steps_to_target` is what the strategy needed on a measured loss curve (None: it never got there, and
    neither does its wall clock). `assumptions` supplies everything else (default: the plain App. A model,
    bf16, two nodes); its n_params and step time are replaced by the arguments.
    """
    if steps_to_target is not None and steps_to_target < 0:
        raise ScalelabError(f"steps_to_target must be ≥ 0, got {steps_to_target}")
    base = assumptions if assumptions is not None else Assumptions(n_params=n_params, step_compute_s=step_compute_s)
    a = replace(base, n_params=n_params, step_compute_s=step_compute_s)
    out: dict[float, float | None] = {}
    for w in bandwidths_bits_per_s:
        out[w / GBIT] = None if steps_to_target is None else steps_to_target * seconds_per_step(strategy, w, a)
    return out


def project_time_to_loss(step_ratio: float, n_params: float, tokens_per_step: float, n_chips: int,
                         strategy: Strategy, bandwidths_bits_per_s: Sequence[float] = DEFAULT_BANDWIDTHS_BITS_PER_S,
                         flops_per_chip: float = PAPER_FLOPS_PER_CHIP, mfu: float = 1.0,
                         assumptions: Assumptions | None = None) -> dict[float, float | None]:
    """`time_to_loss` at a paper size: steps = step_ratio × (20·N / tokens_per_step), compute 6·N·B/(chips·Q·MFU).

    `step_ratio` carries the small-scale measurement over: the steps a strategy needed to reach the target,
    as a fraction of DP's full Chinchilla run (1.0 for DP reaching its own final loss). That the ratio stays
    put as N grows is the assumption the projection makes; the paper's scaling laws are the evidence for it.
    """
    if not step_ratio > 0:
        raise ScalelabError(f"step_ratio must be > 0, got {step_ratio}")
    steps = math.ceil(step_ratio * CHINCHILLA_TOKENS_PER_PARAM * n_params / tokens_per_step)
    compute_s = step_compute_seconds(n_params, tokens_per_step, n_chips * flops_per_chip, mfu)
    return time_to_loss(steps, compute_s, strategy, n_params, bandwidths_bits_per_s, assumptions)
