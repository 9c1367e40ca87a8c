"""Before a migration: what each strategy would do with this guest on this link, from the measured
dirty rate and working set. Pure: the numbers in, one prediction per strategy out.

With ``dirty`` (the range the dirty-rate windows allow, model/dirty.py) each prediction is run at
both ends and says "uncertain" when they disagree; with ``zero_fraction`` (sampled guest pages) the
first pass sends only the non-zero pages."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmshell.core.migration.model.choice import WireRange, choose, wire_costs
from kvmshell.core.migration.model.dirty import DirtyRange
from kvmshell.core.migration.model.wire import STREAM_RATE, WireInputs
from kvmshell.core.migration.model.predict import (
    ZERO_SCAN_RATE, Inputs, Prediction, Verdict, predict, predict_range, throttle_for,
)


@dataclass(frozen=True)
class Option:
    """One strategy's prediction, with what it assumes."""

    name: str
    prediction: Prediction
    note: str


@dataclass(frozen=True)
class Postcopy:
    """Postcopy after the first pass: the RAM once, then the working set on demand."""

    total_s: float
    bytes_total: float
    note: str = "the guest stalls on page faults while its working set follows"


@dataclass(frozen=True)
class Estimate:
    options: tuple[Option, ...]
    postcopy: Postcopy | None
    auto: str                            # what auto would run (choice.Choice.summary: the lever first)
    dirty: DirtyRange | None = None      # the dirty rates the measurement allows (None: one figure)
    zero_fraction: float = 0.0           # of the RAM, zero pages the first pass only scans
    fewer: tuple[WireRange, ...] = ()    # each fewer-bytes option at both ends of the range

    @property
    def uncertain(self) -> bool:
        """Some strategy's outcome depends on what the measurement cannot tell."""
        return any(o.prediction.verdict is Verdict.UNCERTAIN for o in self.options)


def estimate(*, ram: int, dirty_rate: float, working_set: float | None, link: float, cap: float | None,
             downtime_limit_s: float, allow_postcopy: bool, bandwidth: float | None = None,
             dirty: DirtyRange | None = None, zero_fraction: float = 0.0,
             wire: WireInputs | None = None, weigh_wire: bool = True) -> Estimate:
    """Each strategy on a link of ``link`` bytes/s, with the source capped at ``cap`` (None: not); what
    auto would run with the request's options (``bandwidth``: its --bandwidth, else auto uncaps to the
    link; ``allow_postcopy``), from the range ``dirty`` when given; each fewer-bytes option costed from
    ``wire`` (model/wire.py) at the same ends, weighed as auto's pre-flight does when ``weigh_wire`` (a
    link of unknown speed: costed as one stream's top rate, and not weighed)."""
    D, W, R = dirty_rate, working_set, link
    zero = ram * min(1.0, max(0.0, zero_fraction))
    base = Inputs(ram_bytes=ram - zero, zero_bytes=zero, dirty_rate=D, working_set=W, rate=min(R, cap or R),
                  link=R, downtime_limit_s=downtime_limit_s)
    uncapped = replace(base, rate=R)

    def run(inp: Inputs, scale: float = 1.0) -> Prediction:
        if dirty is None:
            return predict(inp)
        hi = dirty.hi * scale if dirty.hi is not None else None
        return predict_range(inp, replace(dirty, lo=dirty.lo * scale, hi=hi))

    p_unc = run(uncapped)
    options = [Option("precopy (current limits)", run(base), f"bandwidth {min(R, cap or R) / 1e6:.0f} MB/s"),
               Option("precopy, uncapped", p_unc, f"bandwidth {R / 1e6:.0f} MB/s (the link)")]
    if D > 0 and R > 0:
        p = throttle_for(D, R)
        options.append(Option("converge (auto-converge)", run(replace(uncapped, dirty_rate=D * (1 - p)), 1 - p),
                              f"guest throttled to {100 * (1 - p):.0f} % CPU while it converges"))
    postcopy = None
    if R > 0:
        first = ram - zero
        ws = W if W is not None else D * first / R
        postcopy = Postcopy(first / R + zero / ZERO_SCAN_RATE + ws / R, first + ws)
    span = dirty if dirty is not None else DirtyRange(D, D, W)
    rate = min(R, bandwidth or R)
    auto = choose(ram=ram, dirty=span, rate=rate, link=R, downtime_limit_s=downtime_limit_s,
                  allow_postcopy=allow_postcopy, zero_fraction=zero_fraction, wire=wire if weigh_wire else None)
    fewer = auto.options if weigh_wire or wire is None else tuple(
        wire_costs(wire, ram=ram, dirty=span, rate=rate or STREAM_RATE, downtime_limit_s=downtime_limit_s,
                   zero_fraction=zero_fraction))
    return Estimate(tuple(options), postcopy, auto.summary(), dirty, zero_fraction, fewer)
