"""What calc-dirty-rate's windows say about the dirty rate: a range, not a number. Pure.

calc-dirty-rate counts the DISTINCT pages dirtied in its window, N(t), and reports N(t)/t. A guest
that rewrites a working set W faster than the window shows W/t whatever its real rate: 99 MB/s over
1 s and 33 MB/s over 3 s for 100 MB rewritten ten times a second, or a hundred. So:

* N(t) growing in proportion to t (within the sampling noise): a rate; D = N/t, known within its noise.
* N(t) growing less: a working set W ~ N(t_max), and D is only bounded below by N(t0)/t0 (the set
  rewritten in order, once per window). Rewritten at random, N(t) = W (1 - exp(-D t / W)), which
  gives an upper bound; once the shortest window already saw the whole set there is none.

Page sampling reads a few hundred pages per GiB, so each N carries a binomial error (Wilson interval).

And the rate measured before the start is the undisturbed guest's: while it migrates, its vCPUs share
the host with the migration (and with dirty logging), and it may dirty much less. The low end the
model runs is therefore ``lo x MIGRATING_SHARE`` (``while_migrating``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvmshell.core.values.models import wilson_interval

MB = 1e6
SATURATED = 0.8        # N(t_max) below this share of the linear growth from N(t0): a working set
WHOLE_SET = 0.9        # the shortest window saw at least this share of the set: no upper bound
QEMU_STEP = float(1 << 20)   # calc-dirty-rate reports whole MiB/s
PASS_MODE = "migration pass"  # a Window that is a finished pre-copy pass (dirty set found at its sync / its length)
# While migrating, a guest may dirty this share of its undisturbed rate: measured on the Linux lab guest
# (TCG, 2 host cores, 256 MiB rewritten as fast as it goes) >= 256 MB/s before, ~132 MB/s during.
MIGRATING_SHARE = 0.5


@dataclass(frozen=True)
class Window:
    """One calc-dirty-rate result."""

    seconds: float
    bytes_per_s: float
    pages_sampled: int | None = None    # pages page-sampling read over the whole RAM; None: every page counted
    mode: str = "page-sampling"

    @property
    def dirtied(self) -> float:
        return self.bytes_per_s * self.seconds


@dataclass(frozen=True)
class DirtyRange:
    """The guest dirties between ``lo`` and ``hi`` bytes/s (``hi`` None: no upper bound seen), over a
    working set of ``working_set`` bytes (None: no bound seen)."""

    lo: float
    hi: float | None
    working_set: float | None
    windows: tuple[Window, ...] = ()

    @property
    def while_migrating(self) -> float:
        """The lowest rate the guest may dirty at while it migrates (bytes/s): measured before the start
        (windows), the undisturbed rate's ``MIGRATING_SHARE``; a figure given as is (no windows) or read from
        the migration's own passes, itself."""
        before = self.windows and self.windows[0].mode != PASS_MODE
        return self.lo * MIGRATING_SHARE if before else self.lo

    @property
    def narrow(self) -> bool:
        """The ends are close enough that the model gives one answer at the rate's middle."""
        return self.hi is not None and self.hi <= max(self.lo * 1.25, self.lo + MB)

    def text(self) -> str:
        ws = f"a working set of about {self.working_set / MB:.0f} MB" if self.working_set is not None else ""
        if self.hi is None:
            return (f"re-dirties {ws} within the shortest window: at least {self.lo / MB:.0f} MB/s, maybe much "
                    "more (calc-dirty-rate counts a page once per window)")
        span = f"{self.lo / MB:.0f}-{self.hi / MB:.0f} MB/s" if not self.narrow else f"about {self.hi / MB:.0f} MB/s"
        return f"re-dirties {ws} at {span}" if ws else f"dirties {span} without a bounded working set"


def _dirtied_bounds(w: Window, ram: float) -> tuple[float, float]:
    """N of one window within its error: the sampling error, and QEMU's rounding to whole MiB/s."""
    n = w.dirtied
    step = QEMU_STEP * w.seconds
    lo, hi = max(0.0, n - step / 2), n + step / 2
    if w.pages_sampled and ram > 0:
        hits = round(min(1.0, n / ram) * w.pages_sampled)
        p_lo, p_hi = wilson_interval(hits, w.pages_sampled)
        lo, hi = min(lo, p_lo * ram), max(hi, p_hi * ram)
    return lo, hi


def dirty_range(windows: Sequence[Window], ram: float) -> DirtyRange:
    """The range of dirty rates and the working set that calc-dirty-rate's ``windows`` allow."""
    ws = sorted((w for w in windows if w.seconds > 0), key=lambda w: w.seconds)
    if not ws:
        raise ValueError("no dirty-rate windows")
    first, last = ws[0], ws[-1]
    n0_lo, n0_hi = _dirtied_bounds(first, ram)
    nn_lo, nn_hi = _dirtied_bounds(last, ram)
    lo = n0_lo / first.seconds
    if len(ws) == 1:
        return DirtyRange(lo, None, None, tuple(ws))
    growth = last.seconds / first.seconds
    if nn_hi >= SATURATED * n0_lo * growth:          # grows with the window: a rate
        return DirtyRange(min(lo, nn_lo / last.seconds), max(n0_hi / first.seconds, nn_hi / last.seconds), None,
                          tuple(ws))
    W = max(last.dirtied, first.dirtied)
    if n0_hi >= WHOLE_SET * nn_lo:                   # the shortest window saw the whole set already
        return DirtyRange(lo, None, W, tuple(ws))
    hi = -W / first.seconds * math.log(1 - n0_hi / W)
    return DirtyRange(lo, max(hi, lo), W, tuple(ws))
