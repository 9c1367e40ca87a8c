"""The pre-flight choice: which lever the auto strategy would use on this guest, decided before the
start from a dirty-rate measurement over several windows and the zero pages sampled, with the numbers
it rests on. Pure: the `migrate --estimate` line "auto would run" and the running job (its pre-flight
stage) both call ``choose``, so the two say the same.

The dirty rate is the range calc-dirty-rate's windows allow (model/dirty.py). The verdict is
"will converge" or "will not converge" only when the model says the same at both ends of that range
(confident); anything else is "uncertain" (predict.Verdict), and auto then waits for a verdict that
holds during the migration (strategies/base.py).

With postcopy allowed, pre-copy's predicted time at each end of the range is weighed against postcopy
started at once (``PostcopyAtOnce``): every non-zero page crosses the link once, the guest running on
the destination and faulting in what it touches before it arrived. Postcopy at once is chosen when it
wins at the range's high end by ``MARGIN`` (or pre-copy will not converge there) and is no slower than
pre-copy at its low end beyond ``LOW_END_TIE``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmshell.core.migration.model.dirty import DirtyRange
from kvmshell.core.migration.model.predict import (
    FIXED_DOWNTIME_S, UNBOUNDED, ZERO_SCAN_RATE, Inputs, Prediction, Verdict, predict, throttle_for,
)

PREFLIGHT_WINDOWS = (1, 3)       # seconds of calc-dirty-rate before the start: the pre-flight costs 4 s

POSTCOPY = "postcopy"            # postcopy at once: migrate-start-postcopy right after `migrate`
CONVERGE = "converge"            # pre-copy, throttled once "will not converge" holds
PRECOPY = "precopy"              # pre-copy, escalating only if a verdict holds during the migration

# Postcopy at once beyond moving the non-zero pages: the switch, the device state and the first faults'
# round trips. Measured on the lab guest (512 MiB, 108 MB non-zero, 1 Gbit/s, QEMU 7.2, quiet machine,
# bench/RESULTS.md "The reduced grid again"): hand:postcopy took 1.12-1.22 s against 0.86 s of non-zero
# pages over the link, 0.26-0.36 s more (9 runs).
POSTCOPY_START_S = 0.3
# Postcopy at once must be predicted this many times faster than pre-copy at the range's high end.
# Why not 1: the pre-flight's pre-copy times are off by p50 47-58 % on the held-out corpus (bench/RESULTS.md,
# "pre-flight, range + zero pages"), and postcopy costs what pre-copy does not: while it runs a network
# failure splits the guest between the hosts, and the guest runs slowed while its pages fault in over the
# link (``faulting_s``, said with the choice). That slowdown is not counted as downtime: the heartbeats of
# the same bench saw a longest gap of 142-184 ms with postcopy at once against 317-337 ms with pre-copy.
# At 1.5 a pre-copy time predicted a third too long still ties; below it pre-copy keeps the guest safe.
MARGIN = 1.5
# ... and it may be up to this many times slower than pre-copy at the range's low end (the guest dirtying
# least): postcopy's own time rests on the non-zero RAM and the link, which the pre-flight measures well,
# while pre-copy's spans the whole range; when the worst case favours postcopy by MARGIN and the best
# case is a tie, postcopy is the smaller risk of a long migration. Replayed on the corpus
# (bench/choice_corpus.py): of the runs converging at the low end and never at the high end, most never
# completed and the rest took 1.6-17.5x postcopy's predicted time.
LOW_END_TIE = 1.1


@dataclass(frozen=True)
class PostcopyAtOnce:
    """Postcopy from the start: the non-zero pages once over the link (the working set is not sent
    twice: it is part of that one pass), the zero pages scanned, plus the switch. The guest runs on the
    destination from the start and stalls on each page it touches before it arrived: at worst until its
    working set (else all its non-zero pages) has crossed, ``faulting_s``."""

    total_s: float
    faulting_s: float
    downtime_s: float
    sent: float                  # bytes: the non-zero pages

    def line(self) -> str:
        return (f"postcopy at once: {self.total_s:.1f} s ({self.sent / 1e6:.0f} MB of non-zero pages once + "
                f"{POSTCOPY_START_S:.1f} s to switch), of which {self.faulting_s:.1f} s with the guest faulting "
                f"pages in, downtime ~{self.downtime_s * 1000:.0f} ms")


def postcopy_at_once(*, sent: float, zero: float, working_set: float | None, rate: float) -> PostcopyAtOnce:
    """Postcopy at once for ``sent`` non-zero bytes and ``zero`` zero bytes at ``rate`` bytes/s."""
    ws = sent if working_set is None else min(working_set, sent)
    return PostcopyAtOnce(sent / rate + zero / ZERO_SCAN_RATE + POSTCOPY_START_S, ws / rate, FIXED_DOWNTIME_S,
                          sent)


def _time(p: Prediction) -> str:
    if p.verdict is Verdict.WILL_NOT_CONVERGE:
        return "never"
    return f"{p.total_s:.1f} s" if p.total_s is not None else "unknown"


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
    postcopy: PostcopyAtOnce | None   # postcopy at once (None: not allowed, or no rate known)
    throttled: Prediction | None # pre-copy with the guest throttled (throttle_for at the highest known rate)
    throttle: float              # the share of CPU that throttle takes
    zero_fraction: float = 0.0   # of the RAM, zero pages (sampled before the start): scanned, not sent

    @property
    def postcopy_s(self) -> float | None:
        return self.postcopy.total_s if self.postcopy is not None else None

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

    def precopy_times(self) -> str:
        """Pre-copy's total time at the range's ends: "5.1-6.0 s", "1.2 s or never"."""
        a, b = _time(self.low), _time(self.high)
        if a == b:
            return a
        if "s" in a and "s" in b and a != "unknown" and b != "unknown":
            return f"{a.removesuffix(' s')}-{b}"
        return f"{a} or {b}"

    def comparison(self) -> str:
        """Postcopy at once against pre-copy, in numbers (empty when postcopy is not weighed)."""
        if self.postcopy is None:
            return ""
        post = self.postcopy.total_s
        ends = []
        for name, p in (("low", self.low), ("high", self.high)):
            if p.verdict is Verdict.CONVERGES and p.total_s is not None:
                ends.append(f"{p.total_s / post:.1f}x at the {name} end")
        ratio = f" (pre-copy / postcopy: {', '.join(ends)}; postcopy needs {MARGIN:g}x at the high end, {1 / LOW_END_TIE:.2f}x at the low)" if ends else ""
        return f"{self.postcopy.line()}; pre-copy: {self.precopy_times()}{ratio}"

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
        zero = f", {100 * self.zero_fraction:.0f} % zero pages" if self.zero_fraction else ""
        head = (f"{self.verdict} (dirty rate {self.dirty.text()}, moving {self.rate / 1e6:.0f} MB/s, downtime limit "
                f"{self.downtime_limit_s * 1000:.0f} ms{zero})")
        if self.confident and self.low.verdict is Verdict.CONVERGES:
            thr = ""                                # nothing to throttle: its cost says nothing
        return "; ".join(x for x in (head, self.comparison(), pre, thr) if x)

    def summary(self) -> str:
        """One line, the lever first: what auto would run."""
        stuck = self.confident and self.low.verdict is Verdict.WILL_NOT_CONVERGE
        if self.lever == POSTCOPY:
            what = ("postcopy at once: pre-copy will not converge" if stuck else
                    f"postcopy at once: {MARGIN:g}x faster than pre-copy or more where the guest dirties most, "
                    f"no more than {100 * (LOW_END_TIE - 1):.0f} % slower where it dirties least")
        elif self.lever == CONVERGE:
            what = "converge: pre-copy, throttled once \"will not converge\" holds"
        elif self.confident:
            what = "precopy: it converges at both ends of the range"
        else:
            what = "precopy, escalating only if a verdict holds during the migration"
        return f"{what} ({self.numbers()})"


def choose(*, ram: float, dirty: DirtyRange, rate: float, link: float | None, downtime_limit_s: float,
           allow_postcopy: bool, zero_fraction: float = 0.0) -> Choice:
    """The lever auto would use on a guest of ``ram`` bytes (``zero_fraction`` of them zero pages, as
    sampled) dirtying ``dirty``, moving ``rate`` bytes/s (the bandwidth cap, else the link) over a link
    of ``link`` (None: ``rate``): postcopy at once when the user allows it, it wins at the range's high
    end (pre-copy will not converge there, or takes MARGIN times longer) and ties at least at the low end; a throttle once "will not
    converge" holds when pre-copy surely will not converge otherwise; plain pre-copy else."""
    link = max(link or rate, rate)
    W = dirty.working_set
    top = dirty.hi if dirty.hi is not None else UNBOUNDED
    zero = ram * min(1.0, max(0.0, zero_fraction))

    def precopy(D: float) -> Prediction:
        return predict(Inputs(ram_bytes=ram - zero, zero_bytes=zero, dirty_rate=D, working_set=W, rate=rate,
                              link=link, downtime_limit_s=downtime_limit_s))

    low, high = precopy(dirty.while_migrating), precopy(top)      # the same ends as predict_range
    stuck = low.verdict is Verdict.WILL_NOT_CONVERGE and high.verdict is Verdict.WILL_NOT_CONVERGE
    fine = low.verdict is Verdict.CONVERGES and high.verdict is Verdict.CONVERGES
    D = dirty.hi if dirty.hi is not None else dirty.lo      # the throttle's rate: the highest known one
    p = throttle_for(D, rate)
    throttled = precopy(D * (1 - p)) if rate > 0 else None
    if throttled is not None and throttled.verdict is not Verdict.CONVERGES:
        throttled = None
    post = postcopy_at_once(sent=ram - zero, zero=zero, working_set=W, rate=rate) if allow_postcopy and rate > 0 \
        else None

    def wins(p: Prediction, by: float) -> bool:
        """Pre-copy at this end of the range takes ``by`` times postcopy at once, or never ends (an
        unknown verdict: postcopy does not win)."""
        if p.verdict is Verdict.WILL_NOT_CONVERGE:
            return True
        return (post is not None and p.verdict is Verdict.CONVERGES and p.total_s is not None
                and p.total_s >= by * post.total_s)

    if post is not None and wins(high, MARGIN) and wins(low, 1 / LOW_END_TIE):
        lever = POSTCOPY
    else:
        lever = CONVERGE if stuck else PRECOPY
    return Choice(lever, lever == POSTCOPY, stuck or fine, low, high, dirty, rate, downtime_limit_s, post,
                  throttled, p, zero_fraction)
