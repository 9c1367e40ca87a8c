"""The pre-copy convergence and downtime model. Pure functions: no I/O, no clock, no monitor.

Classic pre-copy (Clark et al. NSDI'05; Liu et al. HPDC'11; Akoush et al. MASCOTS'10): each pass
sends what the previous pass dirtied; with transfer rate R and dirty rate D the passes shrink by
lambda = D/R. The correction that matters for real guests (MIGRATION.md): a guest re-dirties a
working set W, so a window of t seconds dirties N(t) = min(D*t, W) bytes, not D*t. QEMU stops
iterating once what is dirty at a sync fits theta = R * L (R: its measured bandwidth, L: the
downtime limit) and then sends that remainder with the rate limit lifted, at link speed.

So a hot guest (D*T >= W) converges iff W <= theta: raise the bandwidth to B* = W/L, or the limit to
L* = W/R, or throttle, or go postcopy.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvmshell.core.migration.samples import Sample

FIXED_DOWNTIME_S = 0.01        # device state and the switch-over itself, measured ~5-15 ms here
PASS_OVERHEAD_S = 0.02         # per pass: syncing the dirty bitmap, during which the guest dirties on
MAX_PASSES = 60


class Verdict(enum.Enum):
    CONVERGES = "will converge"
    WILL_NOT_CONVERGE = "will not converge"
    UNKNOWN = "too early to tell"
    DONE = "finished"


@dataclass(frozen=True)
class Inputs:
    """What the model reasons about, in bytes and seconds."""

    ram_bytes: int                 # what the first pass has to send (non-zero bytes if known)
    dirty_rate: float              # D, bytes/s the guest dirties while it runs
    working_set: float | None      # W, bytes it keeps re-dirtying (None: unbounded, N(t) = D t)
    rate: float                    # R, bytes/s the migration moves (min of link and max-bandwidth)
    link: float                    # bytes/s of the link (the final copy runs at this speed)
    downtime_limit_s: float        # L
    remaining: float | None = None # bytes still to send now (None: a fresh start, = ram_bytes)
    elapsed_s: float = 0.0
    sent: float = 0.0
    pass_overhead_s: float = PASS_OVERHEAD_S


@dataclass(frozen=True)
class Prediction:
    verdict: Verdict
    reason: str
    time_left_s: float | None = None      # from now to completion
    total_s: float | None = None          # elapsed + time left
    downtime_ms: float | None = None
    bytes_total: float | None = None      # everything sent, from the start
    passes: int | None = None
    working_set: float | None = None
    dirty_rate: float | None = None
    rate: float | None = None
    downtime_limit_needed_ms: float | None = None   # L* = W / R
    bandwidth_needed: float | None = None           # B* = W / L

    def line(self) -> str:
        parts = [self.verdict.value]
        if self.total_s is not None:
            parts.append(f"total {self.total_s:.1f} s")
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms:.0f} ms")
        if self.bytes_total is not None:
            parts.append(f"{self.bytes_total / 1e6:.0f} MB sent")
        return ", ".join(parts) + (f" - {self.reason}" if self.reason else "")


def dirtied(dirty_rate: float, working_set: float | None, seconds: float) -> float:
    """N(t): bytes dirtied in a window of ``seconds``."""
    n = dirty_rate * max(0.0, seconds)
    return n if working_set is None else min(n, working_set)


def predict(inp: Inputs) -> Prediction:
    """Simulate the passes from the current state to completion (or show they never end)."""
    R, L, W, D = inp.rate, inp.downtime_limit_s, inp.working_set, inp.dirty_rate
    if R <= 0 or not math.isfinite(R):
        return Prediction(Verdict.UNKNOWN, "no transfer rate measured yet")
    theta = R * L
    link = max(inp.link, R)
    pending = inp.ram_bytes if inp.remaining is None else inp.remaining
    elapsed, sent = inp.elapsed_s, inp.sent
    knobs = _knobs(W, D, R, L)
    for passes in range(1, MAX_PASSES + 1):
        t_pass = pending / R + inp.pass_overhead_s
        elapsed += t_pass
        sent += pending
        dirty = dirtied(D, W, t_pass)
        if dirty <= theta:
            final = dirty / link + FIXED_DOWNTIME_S
            return Prediction(Verdict.CONVERGES, _why_converges(D, W, R, L, dirty), time_left_s=elapsed + final - inp.elapsed_s,
                              total_s=elapsed + final, downtime_ms=final * 1000, bytes_total=sent + dirty,
                              passes=passes + 1, working_set=W, dirty_rate=D, rate=R, **knobs)
        if dirty >= pending * 0.99 and passes > 1:
            break                       # not shrinking any more: it never ends
        pending = dirty
    stuck = dirtied(D, W, pending / R + inp.pass_overhead_s)
    return Prediction(Verdict.WILL_NOT_CONVERGE, _why_not(D, W, R, L, stuck), working_set=W, dirty_rate=D, rate=R,
                      **knobs)


def _knobs(W: float | None, D: float, R: float, L: float) -> dict[str, float | None]:
    if W is None:
        return {"downtime_limit_needed_ms": None, "bandwidth_needed": D if D > 0 else None}
    return {"downtime_limit_needed_ms": W / R * 1000 if R > 0 else None,
            "bandwidth_needed": W / L if L > 0 else None}


def _mb(x: float) -> str:
    return f"{x / 1e6:.0f} MB"


def _why_converges(D: float, W: float | None, R: float, L: float, final: float) -> str:
    return f"final dirty set {_mb(final)} fits {_mb(R * L)} ({R / 1e6:.0f} MB/s x {L * 1000:.0f} ms)"


def _why_not(D: float, W: float | None, R: float, L: float, stuck: float) -> str:
    ws = f" over a {_mb(W)} working set" if W is not None else ""
    return (f"dirtying {D / 1e6:.0f} MB/s{ws}, link {R / 1e6:.0f} MB/s: the final pass would need "
            f"{stuck / R * 1000:.0f} ms > limit {L * 1000:.0f} ms")


# -- reading the samples ----------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """What the samples of a running migration show."""

    rate: float | None             # bytes/s moved, recent (median of non-zero sample throughputs)
    dirty_rate: float | None       # bytes/s, QEMU's figure at the last sync
    working_set: float | None      # bytes dirtied per pass, at the latest sync
    passes: int
    remaining: float
    elapsed: float
    sent: float
    first_pass_done: bool


def observe(samples: Sequence[Sample]) -> Observed:
    active = [s for s in samples if s.status in ("active", "postcopy-active", "setup")]
    last = samples[-1] if samples else None
    if last is None:
        return Observed(None, None, None, 0, 0.0, 0.0, 0.0, False)
    rates = [s.throughput for s in active[-8:] if s.throughput > 0]
    rate = statistics.median(rates) if rates else None
    first_pass_done = last.pass_no >= 2
    working_set = None
    dirty = None
    if first_pass_done:
        # at a sync, `remaining` jumps to the freshly synced dirty set: the largest value seen since
        # the latest pass began estimates the bytes dirtied per pass
        latest = [s for s in active if s.pass_no == last.pass_no] or [last]
        peak = max(s.remaining for s in latest)
        by_expected = None
        if last.expected_downtime_ms and last.mbps:
            by_expected = last.expected_downtime_ms * last.mbps * 125
        working_set = max(peak, by_expected or 0.0)
        rates_d = [s.dirty_bytes_rate for s in active if s.pass_no >= 2 and s.dirty_bytes_rate > 0]
        dirty = float(rates_d[-1]) if rates_d else None
    return Observed(rate, dirty, working_set, last.pass_no, float(last.remaining), last.t, float(last.transferred),
                    first_pass_done)


def assess(samples: Sequence[Sample], *, downtime_limit_s: float, bandwidth_cap: float | None,
           link: float | None, ram_bytes: int | None = None, dirty_rate: float | None = None,
           working_set: float | None = None) -> Prediction:
    """The model applied to a migration in progress. ``dirty_rate``/``working_set`` from before the
    start (calc-dirty-rate) are used until the samples say better."""
    if not samples:
        return Prediction(Verdict.UNKNOWN, "no samples yet")
    last = samples[-1]
    if last.status == "completed":
        return Prediction(Verdict.DONE, "completed", time_left_s=0.0,
                          total_s=(last.total_time_ms or last.t * 1000) / 1000,
                          downtime_ms=last.downtime_ms, bytes_total=last.transferred)
    if last.status in ("failed", "cancelled"):
        return Prediction(Verdict.DONE, last.status)
    obs = observe(samples)
    if obs.rate is None:
        return Prediction(Verdict.UNKNOWN, "no transfer rate measured yet")
    rate = obs.rate
    if bandwidth_cap:
        rate = min(rate, bandwidth_cap)
    D = obs.dirty_rate if obs.dirty_rate is not None else dirty_rate
    W = obs.working_set if obs.working_set is not None else working_set
    if not obs.first_pass_done and D is None:
        # first pass: how long it takes is known, what it leaves dirty is not
        return Prediction(Verdict.UNKNOWN, f"first pass, {obs.remaining / 1e6:.0f} MB to go at "
                                           f"{rate / 1e6:.0f} MB/s: dirty rate not known yet",
                          time_left_s=obs.remaining / rate, rate=rate)
    if D is None:
        D = 0.0
    inp = Inputs(ram_bytes=ram_bytes or last.total, dirty_rate=D, working_set=W, rate=rate,
                 link=link or rate, downtime_limit_s=downtime_limit_s, remaining=obs.remaining,
                 elapsed_s=obs.elapsed, sent=obs.sent)
    return predict(inp)


def estimate_working_set(windows: Sequence[tuple[float, float]]) -> tuple[float, float | None]:
    """From calc-dirty-rate results [(seconds, bytes/s), ...] over different windows: (D, W).

    calc-dirty-rate counts distinct pages dirtied in its window, N(t)/t: for a hot working set it
    falls as t grows (99, 49, 22 MB/s over 1, 2, 5 s). If N(t) stops growing with t, W = N(t_max)
    and D >= N(t_min)/t_min; if it keeps growing, D = N(t)/t and W is at least N(t_max)."""
    if not windows:
        raise ValueError("no dirty-rate windows")
    pts = sorted((t, rate * t) for t, rate in windows if t > 0)
    t0, n0 = pts[0]
    d = n0 / t0
    if len(pts) == 1:
        return d, None
    tn, nn = pts[-1]
    if nn < n0 * (tn / t0) * 0.8:       # grew clearly less than linearly: saturated
        return d, nn
    return nn / tn, None
