"""The pre-flight choice: which lever the auto strategy would use on this guest, decided before the
start from a dirty-rate measurement over several windows, with the numbers it rests on. Pure: the
`migrate --estimate` line "auto would run" and the running job (its pre-flight stage) both call
``choose``, so the two say the same.

The dirty rate is the range calc-dirty-rate's windows allow (model/dirty.py). The verdict is
"will converge" or "will not converge" only when the model says the same at both ends of that range
(confident); anything else is "uncertain" (predict.Verdict), and auto then waits for a verdict that
holds during the migration (strategies/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmshell.core.migration.model.dirty import DirtyRange
from kvmshell.core.migration.model.predict import UNBOUNDED, Inputs, Prediction, Verdict, predict, throttle_for

PREFLIGHT_WINDOWS = (1, 3)       # seconds of calc-dirty-rate before the start: the pre-flight costs 4 s

POSTCOPY = "postcopy"            # postcopy right after the first pass
CONVERGE = "converge"            # pre-copy, throttled once "will not converge" holds
PRECOPY = "precopy"              # pre-copy, escalating only if a verdict holds during the migration


@dataclass(frozen=True)
class Choice:
    """What auto would do, and why in numbers."""

    lever: str                   # POSTCOPY, CONVERGE or PRECOPY
    at_once: bool                # the lever is pulled without waiting for a verdict to hold (postcopy only)
    confident: bool              # the model says the same at both ends of the range
    low: Prediction              # pre-copy at the range's low end while migrating (DirtyRange.while_migrating)
    high: Prediction             # ... and at its high end
    dirty: DirtyRange
    rate: float                  # bytes/s the migration will move (the bandwidth cap, else the link)
    downtime_limit_s: float
    postcopy_s: float | None     # postcopy after the first pass: the RAM once, then the working set
    throttled: Prediction | None # pre-copy with the guest throttled (throttle_for at the highest known rate)
    throttle: float              # the share of CPU that throttle takes

    @property
    def outcome(self) -> Verdict:
        """CONVERGES or WILL_NOT_CONVERGE when both ends agree, else UNCERTAIN."""
        return self.low.verdict if self.confident else Verdict.UNCERTAIN

    @property
    def verdict(self) -> str:
        if self.confident:
            return self.low.verdict.value
        return (f"{Verdict.UNCERTAIN.value}: {self.low.verdict.value} at the low end, {self.high.verdict.value} "
                "at the high end")

    def numbers(self) -> str:
        """The verdict, the range and each lever's predicted cost."""
        pre = f"pre-copy at the low end: {self.low.line()}"
        if self.dirty.hi is None:
            pre += f"; re-dirtying the working set faster still: {self.high.verdict.value}"
        elif self.high.line() != self.low.line():
            pre += f"; pre-copy at the high end: {self.high.line()}"
        cpu = f"{100 * (1 - self.throttle):.0f} % CPU"
        thr = (f"throttled to {cpu}: {self.throttled.total_s:.1f} s, "
               f"{self.throttle * self.throttled.total_s:.1f} s of guest CPU lost"
               if self.throttled is not None and self.throttled.total_s is not None
               else f"throttled to {cpu}: would still not converge")
        post = f"postcopy after the first pass: {self.postcopy_s:.1f} s" if self.postcopy_s is not None else ""
        head = (f"{self.verdict} (dirty rate {self.dirty.text()}, moving {self.rate / 1e6:.0f} MB/s, downtime limit "
                f"{self.downtime_limit_s * 1000:.0f} ms)")
        if self.confident and self.low.verdict is Verdict.CONVERGES:
            return f"{head}; {pre}"                 # nothing to escalate to: the levers' costs say nothing
        return "; ".join(x for x in (head, pre, post, thr) if x)

    def summary(self) -> str:
        """One line, the lever first: what auto would run."""
        if self.lever == POSTCOPY:
            what = "postcopy right after the first pass"
        elif self.lever == CONVERGE:
            what = "converge: pre-copy, throttled once \"will not converge\" holds"
        elif self.confident:
            what = "precopy: it converges at both ends of the range"
        else:
            what = "precopy, escalating only if a verdict holds during the migration"
        return f"{what} ({self.numbers()})"


def choose(*, ram: float, dirty: DirtyRange, rate: float, link: float | None, downtime_limit_s: float,
           allow_postcopy: bool) -> Choice:
    """The lever auto would use on a guest of ``ram`` bytes dirtying ``dirty``, moving ``rate`` bytes/s
    (the bandwidth cap, else the link) over a link of ``link`` (None: ``rate``): postcopy right after the
    first pass when the user allows it and pre-copy confidently will not converge; a throttle once that
    holds when postcopy is not allowed; plain pre-copy otherwise."""
    link = max(link or rate, rate)
    W = dirty.working_set
    top = dirty.hi if dirty.hi is not None else UNBOUNDED

    def precopy(D: float) -> Prediction:
        return predict(Inputs(ram_bytes=ram, dirty_rate=D, working_set=W, rate=rate, link=link,
                              downtime_limit_s=downtime_limit_s))

    low, high = precopy(dirty.while_migrating), precopy(top)      # the same ends as predict_range
    stuck = low.verdict is Verdict.WILL_NOT_CONVERGE and high.verdict is Verdict.WILL_NOT_CONVERGE
    fine = low.verdict is Verdict.CONVERGES and high.verdict is Verdict.CONVERGES
    D = dirty.hi if dirty.hi is not None else dirty.lo      # the throttle's rate: the highest known one
    p = throttle_for(D, rate)
    throttled = precopy(D * (1 - p)) if rate > 0 else None
    if throttled is not None and throttled.verdict is not Verdict.CONVERGES:
        throttled = None
    postcopy_s = None
    if allow_postcopy and rate > 0:
        ws = W if W is not None else min(ram, D * ram / rate)
        postcopy_s = ram / rate + ws / rate
    lever = POSTCOPY if stuck and allow_postcopy else CONVERGE if stuck else PRECOPY
    return Choice(lever, lever == POSTCOPY, stuck or fine, low, high, dirty, rate, downtime_limit_s, postcopy_s,
                  throttled, p)
