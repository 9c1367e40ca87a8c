"""Before a migration: what the guest's memory looks like to the model. Random pages sampled (the
zero-page share: the first pass only scans those) and calc-dirty-rate over several windows, in the
best mode the guest's QEMU offers (discovered from the guest), turned into a range of dirty rates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from kvmshell.core.migration.model.dirty import DirtyRange, Window, dirty_range
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.models import DirtyRateMeans, PageSample

GIB = float(1 << 30)
SAMPLED_PAGES = 512                 # pages read for the zero share: +-4.3 % at worst (95 %); ~2 s, under the windows
LONG_WINDOWS = (1.0, 3.0)           # seconds; a shorter one first where calc-dirty-rate takes it
SAMPLE_PER_GIB = 4096               # page sampling: QEMU's most (its default 512 leaves +-3 % of RAM unseen)


@dataclass(frozen=True)
class Measurement:
    ram: int
    pages: PageSample
    dirty: DirtyRange
    means: DirtyRateMeans

    @property
    def mode(self) -> str:
        return self.means.modes[0]

    def windows_text(self) -> str:
        shown = ", ".join(f"{w.bytes_per_s / 1e6:.0f} MB/s over {w.seconds:g} s" for w in self.dirty.windows)
        return f"{shown} ({self.mode})"

    def pages_text(self) -> str:
        lo, hi = self.pages.zero_interval
        sent = self.ram * (1 - self.pages.zero_fraction)
        packs = (f"; the others compress to {100 * self.pages.compressed_ratio:.0f} %"
                 if self.pages.compressed_ratio is not None else "")
        return (f"{self.pages.pages} random pages read: {100 * self.pages.zero_fraction:.0f} % zero "
                f"({100 * lo:.0f}-{100 * hi:.0f} %), so the first pass sends about {sent / 1e6:.0f} MB{packs}")


async def measure(mon: Monitor, progress: Callable[[str], None], pages: int = SAMPLED_PAGES) -> Measurement:
    """Pages are read while the dirty-rate windows run (those mostly wait): reading dirties nothing."""
    ram = await mon.ram_size()
    means = await mon.dirty_rate_means()
    mode = means.modes[0]
    seconds = ((means.shortest_s,) if means.shortest_s < LONG_WINDOWS[0] else ()) + LONG_WINDOWS
    progress(f"measuring the dirty rate over {', '.join(f'{s:g}' for s in seconds)} s ({mode}) and reading "
             f"{pages} random pages of the guest's RAM...")

    async def windows() -> list[Window]:
        out = []
        for s in seconds:
            d = await mon.measure_dirty_rate(s, None if mode == "page-sampling" else mode, SAMPLE_PER_GIB)
            sampled = round(d.sample_pages * ram / GIB) if d.mode == "page-sampling" and d.sample_pages else None
            out.append(Window(d.window_s, d.bytes_per_s, sampled, d.mode))
        return out

    reading = asyncio.create_task(mon.sample_pages(pages), name=f"sample-pages-{mon.name}")
    try:
        measured = await windows()
        sample = await reading
    finally:
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    return Measurement(ram, sample, dirty_range(measured, ram), means)
