"""Before a migration: what each strategy would do with this guest on this link, from the measured
dirty rate and working set. Pure: the numbers in, one prediction per strategy out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmshell.core.migration.model.choice import DirtyRange, choose, dirty_range
from kvmshell.core.migration.model.predict import Inputs, Prediction, predict, throttle_for


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


def estimate(*, ram: int, dirty_rate: float, working_set: float | None, link: float, cap: float | None,
             downtime_limit_s: float, allow_postcopy: bool, bandwidth: float | None = None,
             windows: Sequence[tuple[float, float]] = ()) -> Estimate:
    """Each strategy on a link of ``link`` bytes/s, with the source capped at ``cap`` (None: not); what
    auto would run with the request's options (``bandwidth``: its --bandwidth, else auto uncaps to the
    link; ``allow_postcopy``), from the dirty-rate ``windows`` [(seconds, bytes/s)] when given."""
    D, W, R = dirty_rate, working_set, link
    base = Inputs(ram_bytes=ram, dirty_rate=D, working_set=W, rate=min(R, cap or R), link=R,
                  downtime_limit_s=downtime_limit_s)
    uncapped = replace(base, rate=R)
    p_unc = predict(uncapped)
    options = [Option("precopy (current limits)", predict(base), f"bandwidth {min(R, cap or R) / 1e6:.0f} MB/s"),
               Option("precopy, uncapped", p_unc, f"bandwidth {R / 1e6:.0f} MB/s (the link)")]
    if D > 0 and R > 0:
        p = throttle_for(D, R)
        options.append(Option("converge (auto-converge)", predict(replace(uncapped, dirty_rate=D * (1 - p))),
                              f"guest throttled to {100 * (1 - p):.0f} % CPU while it converges"))
    postcopy = None
    if R > 0:
        ws = W if W is not None else D * ram / R
        postcopy = Postcopy(ram / R + ws / R, ram + ws)
    dirty = dirty_range(windows) if windows else DirtyRange(D, D, W)
    auto = choose(ram=ram, dirty=dirty, rate=min(R, bandwidth or R), link=R, downtime_limit_s=downtime_limit_s,
                  allow_postcopy=allow_postcopy)
    return Estimate(tuple(options), postcopy, auto.summary())
