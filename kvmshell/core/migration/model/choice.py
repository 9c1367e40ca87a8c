"""The pre-flight choice: which lever the auto strategy would use on this guest, decided before the
start from a dirty-rate measurement over several windows and the zero pages sampled, with the numbers
it rests on. Pure: the `migrate --estimate` line "auto would run" and the running job (its pre-flight
stage) both call ``choose``, so the two say the same.

The dirty rate is the range calc-dirty-rate's windows allow (model/dirty.py). The verdict is
"will converge" or "will not converge" only when the model says the same at both ends of that range
(confident); anything else is "uncertain" (predict.Verdict), and auto then waits for a verdict that
holds during the migration (strategies/base.py).

With postcopy allowed, postcopy started at once (``PostcopyAtOnce``) is a candidate too: every non-zero
page crosses the link once, the guest running on the destination and faulting in what it touches before
it arrived. It is weighed only when it is no slower than pre-copy at the range's low end beyond
``LOW_END_TIE``, and ranked at ``MARGIN`` times its predicted time.

One choice among every option allowed (``pick``): plain pre-copy (its time at the range's high end), each
fewer-bytes option the guest's QEMU has (model/wire.py, when their costs are given) and postcopy at once
(only with postcopy allowed; it runs on the main stream: QEMU 7.2 has no postcopy over multifd). Each has
a predicted total time and a predicted guest-visible stall: pre-copy's downtime, or postcopy at once's
``Stall`` (the guest waits on the pages it faults in over the link: QEMU's downtime says 3-50 ms, the
guest saw 120-1060 ms), whose high end is weighed against the downtime limit. auto takes the fastest
whose stall fits (postcopy at once ranked at ``MARGIN`` times its time); when none fits, the one with
the least stall that converges, and says so in numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmshell.core.migration.model.dirty import DirtyRange
from kvmshell.core.migration.model.predict import (
    FIXED_DOWNTIME_S, UNBOUNDED, ZERO_SCAN_RATE, Inputs, Prediction, Verdict, predict, throttle_for,
)
from kvmshell.core.migration.model.wire import PLAIN, SAME_S, Guest, WireCost, WireInputs, WireOption, cost

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
# Postcopy at once's guest-visible stall: a range over T = non-zero bytes / rate (the time the pages take
# to cross), low STALL_LOW_S + STALL_LOW_PER x T, high STALL_HIGH_S + STALL_HIGH_PER x T: the lines just
# below and just above every blackout of the FIT runs (bench/choice_corpus.py --stall: 32 FIT runs of hand
# and auto postcopy at once in bench/fewer, the lab guest at 512 MiB and 2 GiB, 1 and 10 Gbit/s, the Linux
# guest at 512 MiB, 1 Gbit/s, all on a quiet machine; fitted 0 + 0.145 T and 198 ms + 0.546 T, rounded
# out; the 11 HELD-OUT runs all inside). Few runs of two guests, so a range, and auto holds its high end
# against the limit: the Linux guest (blackout up to 0.67 T) sets the slope, the 10 Gbit/s runs (up to
# 245 ms for T = 0.09 s: QEMU sent slower than the link) the intercept; the lab guest at 1 Gbit/s stayed
# at 0.14-0.28 T. Under load the blackout was larger still (400-900 ms, one 9.4 s, on the lab guest at
# 512 MiB, bench/RESULTS.md): nothing here covers that.
STALL_LOW_S, STALL_LOW_PER = 0.0, 0.14
STALL_HIGH_S, STALL_HIGH_PER = 0.2, 0.55

# The slow rule (strategies/base.py): pre-copy converging but needing more than SLOW_MIN_S while the cheaper
# lever would need less than 1/SLOW_FACTOR of that is too slow. The lab guest at 2 GiB dirtying 110 MB/s
# over a 125 MB/s link (bench/RESULTS.md, issue 15) converged under pre-copy alone after 34 s, where
# defaults+auto-converge took 18 s: the model said "will converge" in under 30 s all along, so auto never
# throttled. At a factor of 2 a pre-copy time predicted twice too long still keeps the guest unthrottled;
# below SLOW_MIN_S a throttle saves too little to be worth the guest's CPU. The pre-flight reads the same
# figures for its throttle from the start (``Choice.from_start``).
SLOW_MIN_S = 10.0
SLOW_FACTOR = 2.0


@dataclass(frozen=True)
class Stall:
    """The longest time the guest is predicted to see no progress: QEMU's downtime plus its waits on
    pages faulted in over the link (the guest's heartbeat gap, bench/bench_fewer.py's blackout)."""

    low_s: float
    high_s: float

    def text(self) -> str:
        return f"{self.low_s * 1000:.0f}-{self.high_s * 1000:.0f} ms"


def postcopy_stall(*, sent: float, rate: float) -> Stall:
    """Postcopy at once's stall for ``sent`` non-zero bytes at ``rate`` bytes/s (``STALL_*``)."""
    t = sent / rate if rate > 0 else 0.0
    return Stall(STALL_LOW_S + STALL_LOW_PER * t, STALL_HIGH_S + STALL_HIGH_PER * t)


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
    stall: Stall

    def line(self) -> str:
        return (f"postcopy at once: {self.total_s:.1f} s ({self.sent / 1e6:.0f} MB of non-zero pages once + "
                f"{POSTCOPY_START_S:.1f} s to switch), of which {self.faulting_s:.1f} s with the guest faulting "
                f"pages in, downtime ~{self.downtime_s * 1000:.0f} ms")


def postcopy_at_once(*, sent: float, zero: float, working_set: float | None, rate: float) -> PostcopyAtOnce:
    """Postcopy at once for ``sent`` non-zero bytes and ``zero`` zero bytes at ``rate`` bytes/s."""
    ws = sent if working_set is None else min(working_set, sent)
    return PostcopyAtOnce(sent / rate + zero / ZERO_SCAN_RATE + POSTCOPY_START_S, ws / rate, FIXED_DOWNTIME_S,
                          sent, postcopy_stall(sent=sent, rate=rate))


AT_ONCE = "postcopy at once"


@dataclass(frozen=True)
class Candidate:
    """One option auto may run: its predicted time and the guest-visible stall held against the limit."""

    name: str                    # AT_ONCE, "precopy", or a fewer-bytes strategy ("compress zstd", ...)
    option: WireOption           # the settings it runs with (postcopy at once: plain, one stream)
    total_s: float | None        # None: it does not surely converge
    stall_s: float               # pre-copy's downtime; postcopy at once's stall at its high end
    ranked_s: float | None       # the time it is ranked by: postcopy at once's x MARGIN
    cpu_s: float = 0.0
    stall_low_s: float | None = None   # postcopy at once: its stall's low end (None: a pre-copy option, whose
                                       # switch-over QEMU holds to the limit: it fits when it converges)

    def line(self) -> str:
        if self.total_s is None:
            return f"{self.name}: may not converge"
        if self.stall_low_s is not None:
            return (f"{self.name} {self.total_s:.2f} s, guest stall {self.stall_low_s * 1000:.0f}-"
                    f"{self.stall_s * 1000:.0f} ms")
        return f"{self.name} {self.total_s:.2f} s, downtime {self.stall_s * 1000:.0f} ms"


TIE_S = 0.05                     # seconds: predicted times closer than this are a tie


def pick(candidates: Sequence[Candidate], downtime_limit_s: float) -> tuple[Candidate | None, str]:
    """The fastest candidate whose stall fits the limit (within SAME_S of the fastest: the fewest CPU
    seconds); none fits: the least stall that converges; none converges: None. And why, in numbers."""
    limit = f"{downtime_limit_s * 1000:.0f} ms"
    each = "; ".join(c.line() for c in candidates)
    going = [c for c in candidates if c.ranked_s is not None]
    fits = [c for c in going if c.stall_low_s is None or c.stall_s <= downtime_limit_s + 0.001]
    if fits:
        best = min(c.ranked_s or 0.0 for c in fits)
        near = [c for c in fits if (c.ranked_s or 0.0) <= best * (1 + SAME_S) + 0.01]
        # the fewest CPU seconds (to 0.1 s), then the fastest; under TIE_S apart the simplest, in the
        # candidates' order, plain pre-copy first (an idle guest's 0.02 s must not pick multifd for 0.0001 s)
        cheap = [c for c in near if round(c.cpu_s, 1) == min(round(d.cpu_s, 1) for d in near)]
        fastest = min(c.ranked_s or 0.0 for c in cheap)
        chosen = next(c for c in cheap if (c.ranked_s or 0.0) <= fastest + TIE_S)
        ranked = f" (postcopy at once ranked at {MARGIN:g}x its time)" if any(c.name == AT_ONCE for c in fits) else ""
        return chosen, f"chose {chosen.name}: the fastest whose predicted stall fits the {limit} limit{ranked} [{each}]"
    if going:
        chosen = min(going, key=lambda c: (c.stall_s, c.ranked_s or 0.0))
        return chosen, (f"chose {chosen.name}: no option's predicted stall fits the {limit} limit, it has the least "
                        f"stall that converges ({chosen.stall_s * 1000:.0f} ms) [{each}]")
    return None, f"no option surely converges within {limit}: pre-copy, escalating once a verdict holds [{each}]"


def cheapest(costs: Sequence[WireCost], downtime_limit_s: float) -> WireCost | None:
    """The option auto runs when there is no pre-flight range (its costs rest on the page sample alone):
    ``pick``'s rule among those that converge within the limit. None: none would."""
    ok = [c for c in costs if c.converges and (c.prediction.downtime_ms or 0) <= downtime_limit_s * 1000 + 1]
    cands = [Candidate(wire_label(c.option), c.option, c.prediction.total_s, (c.prediction.downtime_ms or 0) / 1000,
                       c.prediction.total_s, c.cpu_s or 0.0) for c in ok]
    chosen, _ = pick(cands, downtime_limit_s)
    return ok[cands.index(chosen)] if chosen is not None else None


@dataclass(frozen=True)
class WireRange:
    """One fewer-bytes option costed at both ends of the dirty range, as pre-copy is judged."""

    low: WireCost
    high: WireCost

    @property
    def verdict(self) -> Verdict:
        a, b = self.low.prediction.verdict, self.high.prediction.verdict
        return a if a is b else Verdict.UNCERTAIN

    def times(self) -> str:
        """Its total time at the range's ends: "2.1 s", "2.1-2.4 s", "2.1 s or never"."""
        a, b = _time(self.low.prediction), _time(self.high.prediction)
        if a == b:
            return a
        if a.endswith(" s") and b.endswith(" s"):
            return f"{a.removesuffix(' s')}-{b}"
        return f"{a} or {b}"


def wire_costs(wire: WireInputs, *, ram: float, dirty: DirtyRange, rate: float, downtime_limit_s: float,
               zero_fraction: float) -> list[WireRange]:
    """Each fewer-bytes option the guest's QEMU has (plain pre-copy left out: it is judged by itself), at
    the two ends pre-copy is judged at (the range's low end while migrating, its high end; the working set
    the windows bound), with the same zero share and rate: options costed on other figures than
    pre-copy's would be compared unlike with like."""
    data = replace(wire.data, zero_fraction=zero_fraction)
    low = Guest(ram=ram, dirty_rate=dirty.while_migrating, working_set=dirty.working_set, link=rate,
                downtime_limit_s=downtime_limit_s)
    high = replace(low, dirty_rate=dirty.hi if dirty.hi is not None else UNBOUNDED)
    return [WireRange(a, b) for a, b in zip(wire.costs(low, data), wire.costs(high, data)) if a.option != PLAIN]


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
    wire: WireOption = PLAIN     # the settings pre-copy runs with (a fewer-bytes option ``pick`` chose)
    picked: str = ""             # ``pick``'s reason, every candidate in numbers
    options: tuple[WireRange, ...] = ()   # the fewer-bytes options ``pick`` weighed (their high ends)
    from_start: str | None = None   # why auto-converge is armed at ``start_throttle`` before the start
    start_throttle: float = 0.0  # that throttle: ``throttle``, or the one costed on the chosen ``wire`` option

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
        return "; ".join(x for x in (head, self.picked, self.comparison(), pre, thr) if x)

    def summary(self) -> str:
        """One line, the lever first: what auto would run."""
        stuck = self.confident and self.low.verdict is Verdict.WILL_NOT_CONVERGE
        if self.lever == POSTCOPY:
            what = ("postcopy at once: pre-copy will not converge" if stuck else
                    f"postcopy at once: {MARGIN:g}x faster than pre-copy or more where the guest dirties most, "
                    f"no more than {100 * (LOW_END_TIE - 1):.0f} % slower where it dirties least")
        elif self.from_start is not None:
            fewer = f", sending {wire_label(self.wire)} ({self.wire.text()})" if self.wire != PLAIN else ""
            what = (f"converge from the start{fewer}: auto-converge armed at {round(100 * self.start_throttle)} % "
                    f"before the start, applied by QEMU at its second sync if the guest still dirties over half of "
                    f"what was sent ({self.from_start})")
        elif self.wire != PLAIN:
            what = f"{wire_label(self.wire)}: pre-copy sending fewer bytes ({self.wire.text()})"
        elif self.lever == CONVERGE:
            what = "converge: pre-copy, throttled once \"will not converge\" holds"
        elif self.confident:
            what = "precopy: it converges at both ends of the range"
        else:
            what = "precopy, escalating only if a verdict holds during the migration"
        return f"{what} ({self.numbers()})"


def wire_label(o: WireOption) -> str:
    method = o.parameters.get("multifd-compression")
    return o.strategy + (f" {method}" if o.strategy == "compress" else "")


def choose(*, ram: float, dirty: DirtyRange, rate: float, link: float | None, downtime_limit_s: float,
           allow_postcopy: bool, zero_fraction: float = 0.0, wire: WireInputs | None = None) -> Choice:
    """The lever auto would use on a guest of ``ram`` bytes (``zero_fraction`` of them zero pages, as
    sampled) dirtying ``dirty``, moving ``rate`` bytes/s (the bandwidth cap, else the link) over a link
    of ``link`` (None: ``rate``): the lever, and the fewer-bytes settings pre-copy runs with, as ``pick``
    decides among pre-copy (at the range's high end), each fewer-bytes option costed from ``wire`` at the
    same end (``wire_costs``) and postcopy at once (when it ties at the low end), each with its predicted stall; when
    postcopy at once is not chosen, a throttle once "will not converge" holds if pre-copy surely will not
    converge otherwise, plain pre-copy else."""
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

    top_ok = high.verdict is Verdict.CONVERGES and high.total_s is not None
    cands = [Candidate("precopy", PLAIN, high.total_s if top_ok else None, (high.downtime_ms or 0.0) / 1000,
                       high.total_s if top_ok else None)]
    ranges = wire_costs(wire, ram=ram, dirty=dirty, rate=rate, downtime_limit_s=downtime_limit_s,
                        zero_fraction=zero_fraction) if wire is not None else []
    for c in (r.high for r in ranges):
        t = c.prediction.total_s if c.converges else None
        cands.append(Candidate(wire_label(c.option), c.option, t, (c.prediction.downtime_ms or 0.0) / 1000, t,
                               c.cpu_s or 0.0))
    if post is not None and wins(low, 1 / LOW_END_TIE):
        cands.append(Candidate(AT_ONCE, PLAIN, post.total_s, post.stall.high_s, post.total_s * MARGIN,
                               stall_low_s=post.stall.low_s))
    chosen, picked = pick(cands, downtime_limit_s)
    if chosen is not None and chosen.name == AT_ONCE:
        lever = POSTCOPY
    else:
        lever = CONVERGE if stuck else PRECOPY
    c = Choice(lever, lever == POSTCOPY, stuck or fine, low, high, dirty, rate, downtime_limit_s, post,
               throttled, p, zero_fraction, chosen.option if chosen is not None else PLAIN,
               picked if len(cands) > 1 else "", tuple(ranges))
    if c.wire == PLAIN or wire is None:
        share, high_p, thr = p, high, throttled
    else:        # the chosen option, throttled: costed as it was chosen, at the throttle for its own rate
        chose = next(r.high for r in ranges if r.high.option == c.wire)
        share = throttle_for(D, chose.rate)
        guest = Guest(ram=ram, dirty_rate=D * (1 - share), working_set=W, link=rate, downtime_limit_s=downtime_limit_s)
        high_p = chose.prediction
        thr = cost(c.wire, guest, replace(wire.data, zero_fraction=zero_fraction), wire.room).prediction
    why = throttle_from_start(c, high_p, thr, share, allow_postcopy=allow_postcopy)
    return replace(c, from_start=why, start_throttle=share if why is not None else 0.0)


def throttle_from_start(c: Choice, high: Prediction, thr: Prediction | None, share: float, *,
                        allow_postcopy: bool) -> str | None:
    """Why auto arms the throttle ``share`` before the start, in numbers; None to arm it only once a
    verdict holds during the migration. ``high``: pre-copy with the chosen settings (plain or a fewer-bytes
    option) at the range's high end; ``thr``: the same with the guest throttled. Not with postcopy (with
    it, the levers are weighed during the migration). Only where ``high`` will not converge, or converges
    after more than SLOW_MIN_S where the throttle takes SLOW_FACTOR times less (the slow rule's figures),
    and the throttle converges. Waiting costs two syncs: QEMU 7.2 applies auto-converge only at the second
    sync after it is asked for; on the 2 GiB lab guest auto armed it at 7.7 s and it took effect at 13.1 s
    (bench s11), where armed from the start it took effect at 7.6 s (s13)."""
    if allow_postcopy or c.at_once or thr is None or thr.verdict is not Verdict.CONVERGES or thr.total_s is None:
        return None
    name = "pre-copy" if c.wire == PLAIN else f"pre-copy sending {wire_label(c.wire)}"
    if high.verdict is Verdict.CONVERGES:
        if high.total_s is None or high.total_s <= SLOW_MIN_S or SLOW_FACTOR * thr.total_s > high.total_s:
            return None
        pre = f"{name} would take {high.total_s:.1f} s at the range's high end"
    else:
        pre = f"{name} {high.verdict.value} at the range's high end"
    return (f"{pre} (dirty rate {c.dirty.text()}), throttled to {100 - round(100 * share)} % CPU "
            f"{thr.total_s:.1f} s")
