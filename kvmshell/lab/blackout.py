"""The blackout a migrated guest sees, timed from its heartbeats on the serial console.

Both lab guests can send heartbeats: the Linux guest a line ``kvmshell-hb SEQ USEC`` every 2 ms
(a sequence number and its own CLOCK_MONOTONIC), the boot-sector guest a ``,`` every
``beat_pages`` pages it dirties (no clock of its own). The host stamps each one with its monotonic
clock when it reads it (:class:`Beat`), from the source QEMU's console and then from the
destination's. :func:`blackout` puts the two streams together:

* ``arrival_gap_ms``: the host's time between the last beat read from the source and the first
  read from the destination. It holds everything: the stop, the last pages, the destination's
  load and resume; it also holds the host's reading jitter (a few ms).
* ``guest_gap_ms``: the largest step of the guest's own clock between consecutive beats (by
  sequence number) around the switch-over. A guest clock that runs on while the guest is stopped
  shows the blackout here; one that stands still while the VM is stopped (TCG's virtual clock,
  KVM's kvmclock: QEMU restores them on the destination) does not.
* ``clock_lost_ms``: how much the guest's clock fell behind the host's across the switch-over:
  the smallest (arrival - guest clock) of the destination's beats minus that of the source's
  (the smallest, because reading only ever adds delay).
* ``ms``, the blackout the guest saw: each beat is put at host time (guest clock + its stream's
  smallest offset), which removes the reading jitter, and ``ms`` is the largest gap between
  consecutive beats (by sequence number) within ``WINDOW`` beats of the switch-over: the guest
  clock's own gap plus the time its clock stood still. Without a guest clock (the boot guest)
  it is the largest arrival gap in that window.

How to read them under TCG (the Linux guest where /dev/kvm is kvm_pvm): the virtual clock stops
while the VM is stopped, so ``clock_lost_ms`` is the time the VM was stopped (QEMU's downtime plus
the destination's load and resume), and ``guest_gap_ms`` the time the guest's clock ran while its
vCPU made no progress (a starved vCPU: TCG's dirty tracking sends every store to a clean page
through the slow path, and a shared host adds its own load). Arrival times also carry the guest's
own output delay: its serial driver writes a line from the UART interrupt, late when the vCPU is.

A beat written by the guest before the stop but sent out by the destination (still in the
guest's tty buffer) only moves the gap by one beat period. The blackout includes the beat period
itself (at most one ``period_ms``); ``ms`` >= QEMU's reported downtime less that and the jitter.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvmshell.errors import LabError

WINDOW = 50
"""Beats on each side of the switch-over that a gap is looked for in (100 ms at one per 2 ms)."""


@dataclass(frozen=True)
class Beat:
    host_s: float               # the host's monotonic clock when the beat was read
    seq: int                    # the guest's sequence number (the boot guest: the host's count)
    guest_s: float | None       # the guest's clock (None: the boot guest has none)


@dataclass(frozen=True)
class Blackout:
    ms: float                   # the blackout the guest saw (see the module docstring)
    arrival_gap_ms: float
    guest_gap_ms: float | None
    clock_lost_ms: float | None
    period_ms: float            # the median gap between the source's beats
    source_beats: int
    dest_beats: int

    def line(self) -> str:
        def opt(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"
        return (f"blackout {self.ms:.1f} ms (arrival gap {self.arrival_gap_ms:.1f} ms, guest clock gap "
                f"{opt(self.guest_gap_ms)}, guest clock lost {opt(self.clock_lost_ms)}, beat every "
                f"{self.period_ms:.1f} ms, {self.source_beats}+{self.dest_beats} beats)")


def blackout(source: Sequence[Beat], dest: Sequence[Beat]) -> Blackout:
    """The blackout between the source's beats and the destination's (each in arrival order)."""
    for name, beats in (("source", source), ("destination", dest)):
        if len(beats) < 2:
            raise LabError(f"{len(beats)} heartbeat(s) from the {name}: start the guests with heartbeats on "
                           "and wait for some on the destination before timing the blackout")
    period = statistics.median(b.host_s - a.host_s for a, b in zip(source, source[1:])) * 1e3
    arrival_gap = (dest[0].host_s - source[-1].host_s) * 1e3
    clocked = all(b.guest_s is not None for b in (*source, *dest))
    if not clocked:
        tail, head = source[-WINDOW:], dest[:WINDOW]
        times = [b.host_s for b in (*tail, *head)]
        ms = max(b - a for a, b in zip(times, times[1:])) * 1e3
        return Blackout(ms, arrival_gap, None, None, period, len(source), len(dest))
    src_off = min(b.host_s - _clock(b) for b in source)
    dst_off = min(b.host_s - _clock(b) for b in dest)
    placed: dict[int, tuple[float, float]] = {}          # seq -> (guest clock, host time)
    for beats, off in ((dest, dst_off), (source, src_off)):   # a seq seen on both: the source's
        for b in beats:
            placed[b.seq] = (_clock(b), _clock(b) + off)
    lo, hi = source[-1].seq - WINDOW, dest[0].seq + WINDOW
    around = [placed[s] for s in sorted(placed) if lo <= s <= hi]
    guest_gap = max(b[0] - a[0] for a, b in zip(around, around[1:])) * 1e3
    ms = max(b[1] - a[1] for a, b in zip(around, around[1:])) * 1e3
    return Blackout(ms, arrival_gap, guest_gap, (dst_off - src_off) * 1e3, period, len(source), len(dest))


def _clock(beat: Beat) -> float:
    assert beat.guest_s is not None
    return beat.guest_s


def blackout_ms(source_guest: object, dest_guest: object) -> float:
    """The blackout (ms) between two guests' recorded heartbeats (``.beats`` of a LinuxGuest or a
    LabGuest started with heartbeats); ``math.inf`` when the destination never sent one."""
    source: Sequence[Beat] = getattr(source_guest, "beats")
    dest: Sequence[Beat] = getattr(dest_guest, "beats")
    if not dest:
        return math.inf
    return blackout(source, dest).ms
