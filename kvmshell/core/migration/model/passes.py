"""Reading the samples of a running migration (``observe``): the syncs QEMU made and the dirty set each
found, the rate it moves pages at, its dirty rate, and how the excess over theta shrinks between syncs.
Pure: what model/predict.py's ``assess`` reasons from."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvmshell.core.migration.model.samples import Sample
from kvmshell.core.values.models import MigrationStatus


@dataclass(frozen=True)
class Sync:
    t: float
    pass_no: int
    dirty: float          # `remaining` just after the sync: the new dirty set


@dataclass(frozen=True)
class Observed:
    """What the samples of a running migration show."""

    rate: float | None             # bytes/s moved, recent (median of sample throughputs; the last pass's if STALLED)
    dirty_rate: float | None       # bytes/s
    dirty_from_qemu: bool          # QEMU's dirty-pages-rate (else the first sync's dirt over the first pass)
    syncs: tuple[Sync, ...]
    remaining: float
    elapsed: float
    sent: float
    shrink: float | None           # lambda, from the excess over theta between syncs
    sync_time: float | None        # seconds a pass takes beyond sending its excess

    @property
    def first_pass_done(self) -> bool:
        return bool(self.syncs)


# The shrink between syncs and the time a sync adds are read over the last SHRINK_SYNCS syncs (5 pairs),
# once there are that many. Read from the third sync on (2 pairs), the held-out corpus got 5 confident wrong
# verdicts instead of 1 (2 GiB Linux guests said to converge that never did): two pairs are too noisy.
SHRINK_SYNCS = 6


def syncs_of(samples: Sequence[Sample]) -> list[Sync]:
    """The first sample of every pass after the first: the dirty set found at that sync."""
    out: list[Sync] = []
    prev = 1
    for s in samples:
        if s.status not in (MigrationStatus.ACTIVE, MigrationStatus.PRE_SWITCHOVER):
            continue
        if s.pass_no > prev and s.pass_no >= 2:
            out.append(Sync(s.t, s.pass_no, float(s.remaining)))
        prev = max(prev, s.pass_no)
    return out


# A pass moving under this share of QEMU's throughput is read at its own rate: its sync stalls it. Over the
# corpus's 2787 pairs of consecutive syncs (181 runs) the pass's rate is 0.89-1.38x the throughput (p5-p95:
# the dip at each pass change), under 0.8x in 1.1 % of them; s15's Linux guest: 0.55-0.62x. Not fitted.
STALLED = 0.8


def pass_rate(samples: Sequence[Sample], syncs: Sequence[Sync]) -> float | None:
    """Bytes/s over the last whole pass, sync to sync: what QEMU moved, the time its sync took included.
    QEMU's throughput counts only the time it sends. On the 2 GiB Linux guest under TCG (bench s15) each
    sync held QEMU for about 3.3 s (the monitor answered nothing), so a 536 MB pass took 7.2 s: 70 MB/s
    where the throughput said 120 MB/s; QEMU's dirty rate, counted over the whole pass, agrees with the
    former. Elsewhere (the corpus) a sync takes milliseconds and this changes nothing."""
    if len(syncs) < 2 or syncs[-1].pass_no != syncs[-2].pass_no + 1 or syncs[-1].t <= syncs[-2].t:
        return None
    a, b = syncs[-2], syncs[-1]
    moved = sent_at(samples, b.t) - sent_at(samples, a.t)
    return moved / (b.t - a.t) if moved > 0 else None


def observe(samples: Sequence[Sample], downtime_limit_s: float) -> Observed:
    active = [s for s in samples if s.status in (MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE)]
    last = samples[-1]
    rates = [s.throughput for s in active[-10:] if s.throughput > 0]
    rate = statistics.median(rates) if rates else None
    syncs = syncs_of(samples)
    paced = pass_rate(samples, syncs)
    if rate is not None and paced is not None and paced < STALLED * rate:
        rate = paced
    dirty: float | None = None
    qemu_rates = [s.dirty_bytes_rate for s in active if s.dirty_bytes_rate > 0]
    if qemu_rates:
        dirty = float(qemu_rates[-1])
    elif syncs:
        first_pass_time = syncs[0].t - (active[0].t if active else 0.0)
        if first_pass_time > 0:
            dirty = syncs[0].dirty / first_pass_time
    shrink = sync_time = None
    if rate and len(syncs) >= SHRINK_SYNCS:
        theta = rate * downtime_limit_s
        recent = syncs[-SHRINK_SYNCS:]
        pairs = [(a, b) for a, b in zip(recent, recent[1:]) if b.pass_no == a.pass_no + 1]
        pairs = [(a, b) for a, b in pairs if a.dirty - theta > 0.05 * theta]
        if pairs:                                   # a ratio of sums: steadier than a ratio per pass
            shrink = max(0.0, sum(b.dirty - theta for _, b in pairs)) / sum(a.dirty - theta for a, _ in pairs)
        extra = [(b.t - a.t) - (a.dirty - theta) / rate for a, b in pairs]
        if extra:
            sync_time = min(0.5, max(0.0, statistics.median(extra)))
            sync_time = 0.0 if sync_time < 0.01 else sync_time
    return Observed(rate, dirty, bool(qemu_rates), tuple(syncs), float(last.remaining), last.t,
                    float(last.transferred), shrink, sync_time)


def sent_at(samples: Sequence[Sample], t: float) -> float:
    before = [s.transferred for s in samples if s.t <= t]
    return float(before[-1]) if before else 0.0
