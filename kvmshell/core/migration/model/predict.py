"""The pre-copy convergence and downtime model. Pure functions: no I/O, no clock, no monitor.

The classic pre-copy model (Clark et al. NSDI'05; Liu et al. HPDC'11; Akoush et al. MASCOTS'10): each
pass sends what the previous one dirtied; with transfer rate R and dirty rate D it shrinks by
lambda = D/R. Two corrections make it fit what QEMU 7.2 really does (traces in tests/data/traces):

* QEMU syncs the dirty bitmap as soon as what is left of the current pass drops below
  theta = R x L (L: the downtime limit), not at the end of the pass. So a pass starts with the
  leftover (~theta) plus what the guest dirtied meanwhile: N' = theta + N(T), T = (N - theta) / R.
  The excess x = N - theta shrinks by lambda each pass; QEMU completes once the fresh dirt is lost
  in the noise of its own bandwidth estimate (x < a few % of theta), and sends the last ~theta at
  link speed: downtime ~ theta / link.
* A guest re-dirties a working set W, so a window of t seconds dirties N(t) = min(D t, W) bytes,
  not D t, and the dirty set never exceeds W. A hot guest (D >= R) therefore converges iff W <= theta:
  raise the bandwidth to B* = W/L or the limit to L* = W/R, throttle it, or go postcopy.

Before the start D is a range (model/dirty.py): ``predict_range`` runs the model at both ends and says
"uncertain" when they disagree. Zero pages cost the first pass a scan, not a send.

With samples, D comes from QEMU's dirty-pages-rate or from the dirt found at the first sync, and
lambda from the shrinking of the excess between syncs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmshell.core.migration.model.dirty import PASS_MODE, DirtyRange, Window, dirty_range
from kvmshell.core.migration.model.passes import Observed, Sync, observe, sent_at
from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import MigrationStatus, wilson_interval

FIXED_DOWNTIME_S = 0.01        # device state and the switch itself (~5-15 ms measured here)
SYNC_TIME_S = 0.0              # per pass beyond sending; included in R once R is measured over passes
LATER_PASSES = 0.97            # later passes move ~3 % less than the streaming first pass (bitmap syncs; fitted on the traces)
NOISE = 0.02                   # QEMU completes once the fresh dirt is below this share of theta
MAX_PASSES = 400
ZERO_SCAN_RATE = 3e10          # bytes/s of zero pages the first pass gets through (found zero, sent as a header;
                               # fitted on the corpus's fit set: bench/score_corpus.py --fit)
UNBOUNDED = 1e13               # bytes/s standing for "no upper bound seen" (10 TB/s: every page at once)
PAGE = 4096
# The dirty rate read from the passes is widened by this factor both ways: pass lengths come from 0.5 s
# samples and the leftover at a sync is only ~theta (fitted on the corpus's fit set: bench/score_corpus.py --fit)
PASS_SPREAD = 1.25
# Until this many syncs the rate is the first pass's own rate of non-zero pages, not the median of the
# recent samples' throughput (0: never; fitted on the corpus's fit set: bench/score_corpus.py --fit)
FIRST_PASS_SYNCS = 2.0


class Verdict(enum.Enum):
    CONVERGES = "will converge"
    WILL_NOT_CONVERGE = "will not converge"
    UNKNOWN = "too early to tell"
    UNCERTAIN = "uncertain"        # the measurement allows both outcomes: see Prediction.outcomes()
    DONE = "finished"


@dataclass(frozen=True)
class Inputs:
    """What the model reasons about, in bytes and seconds."""

    ram_bytes: float               # what the first pass sends (non-zero bytes if known)
    dirty_rate: float              # D, bytes/s the guest dirties while it runs
    working_set: float | None      # W, bytes it keeps re-dirtying (None: unbounded, N(t) = D t)
    rate: float                    # R, bytes/s the migration moves (min of link and max-bandwidth)
    link: float                    # bytes/s of the link (the final copy runs at this speed)
    downtime_limit_s: float        # L
    dirty_set: float | None = None # N at the latest sync (None: the first pass is still to go)
    first_pass_left: float | None = None   # bytes of the first pass still to send (None: all of it)
    elapsed_s: float = 0.0
    sent: float = 0.0
    shrink: float | None = None    # lambda observed between syncs, when known
    sync_time_s: float = SYNC_TIME_S
    zero_bytes: float = 0.0        # zero pages the first pass still has to get through (scanned, not sent)


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
    rough: bool = False           # the dirty rate is only the first sync's estimate (QEMU's comes a pass later)
    total_range_s: tuple[float, float] | None = None   # over the dirty rates the measurement allows
    converges_below: float | None = None    # UNCERTAIN: it converges if the guest dirties under this (bytes/s)
    # UNCERTAIN only because the passes allow a faster rate: the time left at the dirty rate QEMU measured,
    # where it converges (what "will converge" would have said)
    point_left_s: float | None = None

    def total_text(self) -> str:
        """The total time as a figure or a range: "5.2 s", "4.1-6.0 s", "5.2 s or never"."""
        if self.total_range_s is not None:
            a, b = self.total_range_s
            span = f"{a:.1f} s" if f"{a:.1f}" == f"{b:.1f}" else f"{a:.1f}-{b:.1f} s"
            return span + (" or never" if self.verdict is Verdict.UNCERTAIN else "")
        return f"{self.total_s:.1f} s" if self.total_s is not None else "-"

    def outcomes(self) -> str:
        """For an UNCERTAIN verdict, what happens at either end of the dirty rate."""
        if self.verdict is not Verdict.UNCERTAIN or self.converges_below is None:
            return ""
        span = self.total_text().removesuffix(" or never")
        return (f"converges in {span} if the guest dirties under {_mbs(self.converges_below)}, "
                "never if more")

    def line(self) -> str:
        parts = [self.verdict.value + (" (rough)" if self.rough else "")]
        if self.verdict is Verdict.UNCERTAIN:
            parts += [self.outcomes()] if self.outcomes() else []
        elif self.total_range_s is not None:
            parts.append(f"total {self.total_text()}")
        elif self.total_s is not None:
            parts.append(f"total {self.total_s:.1f} s")
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms:.0f} ms")
        if self.bytes_total is not None:
            parts.append(f"{self.bytes_total / 1e6:.0f} MB sent")
        return ", ".join(parts) + (f" - {self.reason}" if self.reason else "")


def dirtied(dirty_rate: float, working_set: float | None, seconds: float) -> float:
    """N(t): distinct bytes dirtied in a window of ``seconds``."""
    if seconds <= 0:
        return 0.0
    n = dirty_rate * seconds
    return n if working_set is None else min(n, working_set)


def throttle_for(dirty_rate: float, rate: float) -> float:
    """The share of the vCPUs' time to take away (0.2 to 0.99) so that the guest dirties at about half
    the transfer rate; 0.5 when either rate is unknown. One formula for the estimate and the steering."""
    if dirty_rate <= 0 or rate <= 0:
        return 0.5
    return min(0.99, max(0.2, 1 - 0.5 * rate / dirty_rate))


MAX_THROTTLE = 99              # auto-converge's highest percentage (QEMU's max-cpu-throttle)


def raised_throttle(applied: int, dirty_rate: float, rate: float) -> int:
    """The auto-converge percentage that takes ``throttle_for`` of the CPU a guest throttled at ``applied`` %
    still has (it dirties ``dirty_rate`` there): 41 % applied, still 85 MB/s at 87 MB/s -> 70 %. At most 99."""
    return min(MAX_THROTTLE, int(round(100 - (100 - applied) * (1 - throttle_for(dirty_rate, rate)))))


def predict(inp: Inputs) -> Prediction:
    """Run the passes forward from the current state to completion, or show they never end."""
    R, L, W = inp.rate, inp.downtime_limit_s, inp.working_set
    if R <= 0 or not math.isfinite(R):
        return Prediction(Verdict.UNKNOWN, "no transfer rate measured yet")
    D = inp.dirty_rate if inp.shrink is None else max(0.0, inp.shrink) * R
    theta = R * L
    link = max(inp.link, R)
    t, sent = inp.elapsed_s, inp.sent
    knobs = _knobs(W, D, R, L)
    if inp.dirty_set is None:                      # the first pass: everything, at R
        first = inp.ram_bytes if inp.first_pass_left is None else inp.first_pass_left
        T = first / R + inp.zero_bytes / ZERO_SCAN_RATE
        t += T
        sent += first
        N = dirtied(D, W, T + (inp.elapsed_s if inp.first_pass_left is not None else 0.0))
        if W is not None:
            N = min(N, W)
    else:
        N = inp.dirty_set
    for passes in range(1, MAX_PASSES + 1):
        if N <= theta * (1 + NOISE):
            final = N / link + FIXED_DOWNTIME_S
            return Prediction(Verdict.CONVERGES, f"final dirty set {_mb(N)} fits {_mb(theta)} ({_mbs(R)} x "
                                                 f"{L * 1000:.0f} ms)",
                              time_left_s=t + final - inp.elapsed_s, total_s=t + final, downtime_ms=final * 1000,
                              bytes_total=sent + N, passes=passes, working_set=W, dirty_rate=D, rate=R, **knobs)
        T = (N - theta) / R
        t += T + inp.sync_time_s
        sent += N - theta
        fresh = dirtied(D, W, T)
        nxt = theta + fresh
        if W is not None:
            nxt = min(nxt, max(W, theta))
        if fresh <= theta * NOISE:
            N = min(nxt, theta)
            continue
        if nxt >= N * 0.999:                        # not shrinking any more: it never ends
            return Prediction(Verdict.WILL_NOT_CONVERGE, _why_not(D, W, R, L, nxt), working_set=W, dirty_rate=D,
                              rate=R, **knobs)
        N = nxt
    return Prediction(Verdict.WILL_NOT_CONVERGE, _why_not(D, W, R, L, N) + f" (still {_mb(N)} after "
                      f"{MAX_PASSES} passes)", working_set=W, dirty_rate=D, rate=R, **knobs)


BEFORE_THE_START = ("measured before the start", "calc-dirty-rate counts a page once per window")
BY_THE_PASSES = ("the passes so far show", "a pass counts a page once")


def predict_range(inp: Inputs, dirty: DirtyRange, seen: tuple[str, str] = BEFORE_THE_START) -> Prediction:
    """The model at both ends of the dirty rates the measurement allows. Ends that agree: that
    verdict, with the range of total times. Ends that disagree: UNCERTAIN, with the rate where the
    outcome flips and the times on the converging side; never a confident verdict the other end denies."""
    hi = dirty.hi if dirty.hi is not None else UNBOUNDED
    lo = dirty.while_migrating
    at = lambda d: predict(replace(inp, dirty_rate=d, working_set=dirty.working_set))   # noqa: E731
    p_lo, p_hi = at(lo), at(hi)
    if p_lo.verdict is Verdict.UNKNOWN:
        return p_lo
    if p_lo.verdict is p_hi.verdict is Verdict.WILL_NOT_CONVERGE:
        return p_lo
    if p_lo.verdict is p_hi.verdict is Verdict.CONVERGES:
        assert p_lo.total_s is not None and p_hi.total_s is not None
        return replace(p_hi, dirty_rate=lo, total_range_s=(min(p_lo.total_s, p_hi.total_s),
                                                                  max(p_lo.total_s, p_hi.total_s)))
    good, bad = (lo, hi) if p_lo.verdict is Verdict.CONVERGES else (hi, lo)
    for _ in range(60):                            # where the verdict flips (geometric bisection)
        mid = math.sqrt(good * bad) if good > 0 else bad / 2
        if at(mid).verdict is Verdict.CONVERGES:
            good = mid
        else:
            bad = mid
        if bad <= good * 1.01:
            break
    p_good = at(good)
    totals = [p.total_s for p in (p_lo, p_hi, p_good) if p.total_s is not None]
    ws = f" of a {_mb(dirty.working_set)} working set" if dirty.working_set is not None else ""
    why = (f"{seen[0]}: {_mbs(dirty.lo)}" + (f" to {_mbs(dirty.hi)}" if dirty.hi is not None else
           f" or more ({seen[1]}, so a faster rewrite{ws} looks the same)")
           + f"; while migrating the guest may dirty as little as {_mbs(lo)}; at {_mbs(inp.rate)} x "
           f"{inp.downtime_limit_s * 1000:.0f} ms the final pass must fit {_mb(inp.rate * inp.downtime_limit_s)}")
    return Prediction(Verdict.UNCERTAIN, why, working_set=dirty.working_set, dirty_rate=lo, rate=inp.rate,
                      total_range_s=(min(totals), max(totals)) if totals else None, converges_below=good,
                      **_knobs(dirty.working_set, lo, inp.rate, inp.downtime_limit_s))


def _knobs(W: float | None, D: float, R: float, L: float) -> dict[str, float | None]:
    if W is None:
        return {"downtime_limit_needed_ms": None, "bandwidth_needed": D if D > 0 else None}
    return {"downtime_limit_needed_ms": W / R * 1000 if R > 0 else None,
            "bandwidth_needed": W / L if L > 0 else None}


def _mb(x: float) -> str:
    return f"{x / 1e6:.0f} MB"


def _mbs(x: float) -> str:
    return f"{x / 1e6:.0f} MB/s"


def _why_not(D: float, W: float | None, R: float, L: float, stuck: float) -> str:
    ws = f" over a {_mb(W)} working set" if W is not None else ""
    return (f"dirtying {_mbs(D)}{ws}, link {_mbs(R)}: the final pass would need "
            f"{stuck / R * 1000:.0f} ms > limit {L * 1000:.0f} ms")


def assess(samples: Sequence[Sample], *, downtime_limit_s: float, bandwidth_cap: float | None,
           link: float | None, ram_bytes: int | None = None, dirty_rate: float | None = None,
           working_set: float | None = None, zero_fraction: float | None = None,
           zero_sampled: int | None = None, dirty: DirtyRange | None = None) -> Prediction:
    """The model applied to a migration in progress, from the latest sample alone (``assess_held``: its
    verdict held). ``dirty_rate``/``working_set`` from before the start (calc-dirty-rate) are used until
    the samples say better. ``dirty``, the range measured before the start, stands for the dirty rate
    until QEMU's: both ends are run. During the first pass ``zero_fraction`` (of ``zero_sampled`` guest
    pages read before the start) gives the zero share of the pages not processed yet (``first_pass``)."""
    if not samples:
        return Prediction(Verdict.UNKNOWN, "no samples yet")
    last = samples[-1]
    if last.status is MigrationStatus.COMPLETED:
        return Prediction(Verdict.DONE, "completed", time_left_s=0.0,
                          total_s=(last.total_time_ms or last.t * 1000) / 1000,
                          downtime_ms=last.downtime_ms, bytes_total=last.transferred)
    if last.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
        return Prediction(Verdict.DONE, str(last.status))
    if last.status.is_postcopy:
        return Prediction(Verdict.CONVERGES, "postcopy: the destination pulls what is left", rate=None)
    obs = observe(samples, downtime_limit_s)
    if obs.rate is None:
        return Prediction(Verdict.UNKNOWN, "no transfer rate measured yet")
    rate = min(obs.rate, bandwidth_cap) if bandwidth_cap else obs.rate
    D = obs.dirty_rate if obs.dirty_rate is not None else dirty_rate
    W = working_set
    if not obs.first_pass_done:
        if dirty is None and D is not None:
            dirty = DirtyRange(D, D, W)
        return first_pass(samples, obs, downtime_limit_s=downtime_limit_s, bound=min((x for x in (bandwidth_cap, link)
                          if x), default=None), link=link, dirty=dirty, zero_fraction=zero_fraction,
                          zero_sampled=zero_sampled)
    stuck = _stuck(obs.syncs, rate, downtime_limit_s)
    if stuck is not None:
        return Prediction(Verdict.WILL_NOT_CONVERGE, stuck, working_set=max(s.dirty for s in obs.syncs),
                          dirty_rate=D, rate=rate, **_knobs(max(s.dirty for s in obs.syncs), D or 0.0, rate,
                                                            downtime_limit_s))
    if W is None:
        # the dirty set never grows past the working set: the largest seen bounds it from below
        W = max(s.dirty for s in obs.syncs) if D is not None and D >= rate else None
    first_sync = len(obs.syncs) < FIRST_PASS_SYNCS and not obs.dirty_from_qemu
    seen = first_pass_rate(samples) if first_sync else None
    if seen is not None:
        # the rough estimate, at the first sync: the samples just after it span the pass change's dip (and
        # the setup, the first pass's zero pages): the first pass's own rate of non-zero pages says the rate
        rate = min(seen, bandwidth_cap) if bandwidth_cap else seen
    if len(obs.syncs) < 3:
        rate *= LATER_PASSES            # measured on the first pass only
    inp = Inputs(ram_bytes=ram_bytes or last.total, dirty_rate=D or 0.0, working_set=W, rate=rate,
                 link=link or rate, downtime_limit_s=downtime_limit_s, dirty_set=obs.remaining
                 if last.pass_no == obs.syncs[-1].pass_no and obs.remaining >= obs.syncs[-1].dirty * 0.999
                 else obs.syncs[-1].dirty,
                 elapsed_s=obs.syncs[-1].t, sent=sent_at(samples, obs.syncs[-1].t), shrink=obs.shrink,
                 sync_time_s=obs.sync_time if obs.sync_time is not None else SYNC_TIME_S)
    p = predict(inp)
    passes = pass_windows(samples, obs.syncs, rate * downtime_limit_s)
    if passes and p.verdict is Verdict.CONVERGES:
        # the passes read as windows (widened by PASS_SPREAD) must allow the same verdict at both ends,
        # else the evidence disagrees with itself: UNCERTAIN, never a confident verdict it denies
        seen = dirty_range(passes, float(last.total))
        if seen.working_set is not None:        # the set is what a sync found dirty, leftover included
            seen = replace(seen, working_set=max(seen.working_set, max(s.dirty for s in obs.syncs)))
        hi = seen.hi * PASS_SPREAD if seen.hi is not None else None
        ranged = predict_range(inp, replace(seen, lo=seen.lo / PASS_SPREAD, hi=hi), BY_THE_PASSES)
        if ranged.verdict is not p.verdict:
            p = replace(ranged, verdict=Verdict.UNCERTAIN, point_left_s=p.time_left_s,
                        reason=f"{p.verdict.value} at QEMU's dirty rate, but the passes so far allow {seen.text()}: "
                        f"{ranged.verdict.value} there" if ranged.verdict is not Verdict.UNCERTAIN else
                        f"{ranged.reason}; at QEMU's dirty rate ({_mbs(inp.dirty_rate)}) it converges in "
                        f"{p.time_left_s:.0f} s more" if p.time_left_s is not None else ranged.reason)
    if first_sync and seen is None and p.verdict is Verdict.WILL_NOT_CONVERGE:
        # as inside the first pass: "will not converge" only on a rate measured. A first pass seen too briefly
        # (a short one, mostly zero pages) leaves only the samples' throughput, which spans the setup and the
        # zero pages' scan, and a link many times faster is as likely as the one they say
        return replace(p, verdict=Verdict.UNCERTAIN, total_s=None, time_left_s=None, rough=True,
                       reason=f"{p.verdict.value} at {rate / 1e6:.0f} MB/s ({p.reason}), but that rate is not "
                              f"measured yet: the first pass was seen for under {FIRST_PASS_SPAN_S:.1f} s")
    if not obs.dirty_from_qemu:
        p = replace(p, rough=True)
    return p


# The first pass sends its non-zero pages at about RATE_POINT of the link or bandwidth cap (between RATE_LO
# and 1 of it) when that is what limits it (a sample came within LINK_BOUND of it), or at what it has been seen to send them at, once it has run FIRST_PASS_SPAN_S (the first
# samples' throughput spans the setup and the first zero pages: it says nothing yet); that rate is known
# within RATE_SPREAD either way. Nothing seen and no bound: UNBOUND_LO to UNBOUND_HI times the samples'
# throughput, UNBOUND_POINT of it at the point (the first samples of a pass no link limits run in bursts:
# on the fit set the pass moved about 0.5-0.6 of their throughput). The zero pages still to come are the
# share of the pages sampled before the start, within
# ZERO_Z standard deviations (Wilson). A time is given when its range is within TIGHT (high / low).
# Fitted on the corpus's fit set (bench/score_corpus.py --fit).
RATE_POINT = 0.9
RATE_LO = 0.6
RATE_SPREAD = 1.25
LINK_BOUND = 1.5
FIRST_PASS_SPAN_S = 0.3
UNBOUND_LO, UNBOUND_HI = 0.25, 2.0
UNBOUND_POINT = 0.6
ZERO_Z = 1.0
TIGHT = 2.0


def first_pass_rate(samples: Sequence[Sample]) -> float | None:
    """Bytes/s of non-zero pages the first pass has sent since its first sample, its zero pages' scan
    time taken out (None: under FIRST_PASS_SPAN_S seen, or nothing sent)."""
    act = [s for s in samples if s.status is MigrationStatus.ACTIVE and s.pass_no <= 1]
    if len(act) < 2:
        return None
    a, b = act[0], act[-1]
    busy = (b.t - a.t) - (b.duplicate_pages - a.duplicate_pages) * PAGE / ZERO_SCAN_RATE
    sent = b.normal_bytes - a.normal_bytes
    if b.t - a.t < FIRST_PASS_SPAN_S or sent <= 0 or busy <= 0:
        return None
    return sent / busy


def first_pass_rates(samples: Sequence[Sample], obs: Observed,
                     bound: float | None) -> tuple[tuple[float, float, float], bool]:
    """The first pass's rate of non-zero pages from here, (slow end, point, fast end), and whether it is
    measured (its own rate seen, or a sample near the bound) rather than guessed from the first samples."""
    fastest = max((s.throughput for s in samples if s.status is MigrationStatus.ACTIVE), default=0.0)
    if bound is not None and bound > LINK_BOUND * fastest:
        bound = None                           # a bound far above anything seen: the CPU, not the link, limits
    seen = first_pass_rate(samples)
    if seen is not None:
        point = min(seen, bound) if bound else seen
        return (point / RATE_SPREAD, point, min(point * RATE_SPREAD, bound) if bound else point * RATE_SPREAD), True
    if bound:
        return (RATE_LO * bound, RATE_POINT * bound, bound), True
    assert obs.rate is not None
    return (UNBOUND_LO * obs.rate, UNBOUND_POINT * obs.rate, UNBOUND_HI * obs.rate), False


def first_pass(samples: Sequence[Sample], obs: Observed, *, downtime_limit_s: float, bound: float | None,
               link: float | None, dirty: DirtyRange | None, zero_fraction: float | None,
               zero_sampled: int | None) -> Prediction:
    """The total time from inside the first pass: what is left of it (its non-zero pages at the rate,
    its zero pages scanned), then the passes the dirty range allows, at the fast and the slow end of the
    rate and the zero share; a time when those ends are within TIGHT, else their range."""
    last = samples[-1]
    rates, measured = first_pass_rates(samples, obs, bound)
    left, total = float(obs.remaining), float(last.total)
    if zero_fraction is not None:              # the zero pages not seen yet, by the pages sampled before the start
        lo, hi = wilson_interval(round(zero_fraction * zero_sampled), zero_sampled, ZERO_Z) if zero_sampled else (
            zero_fraction, zero_fraction)
        share = [min(1.0, max(0.0, (f * total - last.duplicate_pages * PAGE) / left)) if left > 0 else 0.0
                 for f in (lo, zero_fraction, hi)]
    else:
        z = zero_share(last)
        share = [0.0, z or 0.0, 1.0]           # nothing says what the rest holds
    pace = f"{rates[0] / 1e6:.0f}-{rates[2] / 1e6:.0f} MB/s"
    what = (f"first pass, {left / 1e6:.0f} MB to go ({100 * share[0]:.0f}-{100 * share[2]:.0f} % of it zero pages) "
            f"at {pace}")
    time_left = (left * (1 - share[2]) / rates[2], left * (1 - share[0]) / rates[0])
    if dirty is None:
        return Prediction(Verdict.UNKNOWN, f"{what}: the dirty rate shows at the first sync",
                          time_left_s=left * (1 - share[1]) / rates[1],     # of the first pass: the pane adds "+"
                          total_range_s=(last.t + time_left[0], last.t + time_left[1]),
                          rate=rates[1])

    def at(i: int, d: float | None) -> Prediction:
        inp = Inputs(ram_bytes=total, dirty_rate=0.0, working_set=dirty.working_set, rate=rates[i],
                     link=link or rates[i], downtime_limit_s=downtime_limit_s, first_pass_left=left * (1 - share[i]),
                     zero_bytes=left * share[i], elapsed_s=obs.elapsed, sent=obs.sent)
        return predict(replace(inp, dirty_rate=d)) if d is not None else predict_range(inp, dirty)
    middle = at(1, None)
    if middle.verdict is Verdict.WILL_NOT_CONVERGE and (not measured or at(2, None).verdict is not middle.verdict):
        # the first samples' throughput spans the setup: "will not converge" only on a rate measured, at its fast end too
        return replace(middle, verdict=Verdict.UNCERTAIN, reason=f"{what}; {middle.verdict.value} at {pace} "
                       f"({middle.reason}), but that rate is " + ("not measured yet" if not measured else
                                                                   "only its slow end"))
    if middle.verdict is not Verdict.CONVERGES:
        return replace(middle, reason=f"{what}; then {middle.reason}")
    fast, slow = at(2, dirty.while_migrating), at(0, dirty.hi if dirty.hi is not None else UNBOUNDED)
    if slow.verdict is not Verdict.CONVERGES or fast.total_s is None or slow.total_s is None:
        return replace(middle, verdict=Verdict.UNCERTAIN, total_s=None, time_left_s=None,
                       reason=f"{what}: at the slow end it would not converge ({slow.reason})")
    lo_s, hi_s = min(fast.total_s, slow.total_s), max(fast.total_s, slow.total_s)
    tight = hi_s <= TIGHT * lo_s
    mid = at(1, math.sqrt(dirty.while_migrating * dirty.hi) if dirty.hi is not None else dirty.while_migrating)
    return replace(mid, total_s=mid.total_s if tight else None, time_left_s=mid.time_left_s if tight else None,
                   total_range_s=(lo_s, hi_s), reason=f"{what}; then {mid.reason}"
                   + ("" if tight else f" (the time is only a range: {lo_s:.1f}-{hi_s:.1f} s)"))


def pass_windows(samples: Sequence[Sample], syncs: Sequence[Sync], theta: float) -> list[Window]:
    """Each finished pass as a calc-dirty-rate window: the fresh dirt found at its end (the dirty set
    less the ~``theta`` QEMU left unsent when it synced) over its length.
    A set re-dirtied within a pass shows as W/T whatever the real rate, exactly as in a window, so
    the passes give the same kind of range (model/dirty.py): one pass only bounds the rate from below,
    and passes of different lengths tell a rate from a working set."""
    active = [s.t for s in samples if s.status is MigrationStatus.ACTIVE]
    start = active[0] if active else 0.0
    out, prev = [], start
    for s in syncs:
        if s.t > prev:
            fresh = s.dirty - (theta if out else 0.0)          # the first pass leaves nothing behind
            out.append(Window(s.t - prev, max(0.0, fresh) / (s.t - prev), mode=PASS_MODE))
        prev = s.t
    return out


STUCK_WINDOW = 4


def _stuck(syncs: Sequence[Sync], rate: float, limit_s: float) -> str | None:
    """The evidence that pre-copy is going nowhere: over the last passes the dirty set found at a
    sync has reached no new low (in a converging migration every few passes brings one)."""
    theta = rate * limit_s
    if len(syncs) < 2 * STUCK_WINDOW:
        return None
    recent, before = syncs[-STUCK_WINDOW:], syncs[:-STUCK_WINDOW]
    low_recent = min(s.dirty for s in recent) - theta
    low_before = min(s.dirty for s in before) - theta
    if low_recent <= theta * NOISE or low_recent < 0.95 * low_before:
        return None
    lo, hi = min(s.dirty for s in syncs[-2 * STUCK_WINDOW:]), max(s.dirty for s in syncs[-2 * STUCK_WINDOW:])
    return (f"no progress over {len(syncs)} passes: the dirty set stays at {_mb(lo)}-{_mb(hi)}, above the "
            f"{_mb(theta)} that fits the limit ({_mbs(rate)} x {limit_s * 1000:.0f} ms); the final pass would need "
            f"{lo / rate * 1000:.0f} ms or more > limit {limit_s * 1000:.0f} ms")


ZERO_SHARE_MIN_PAGES = 256     # pages the first pass must have processed before their zero share counts


def zero_share(s: Sample) -> float | None:
    """The share of zero pages in what the first pass has processed so far (None: too few pages yet)."""
    pages = s.duplicate_pages + s.normal_bytes / PAGE
    return s.duplicate_pages / pages if pages >= ZERO_SHARE_MIN_PAGES else None


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
