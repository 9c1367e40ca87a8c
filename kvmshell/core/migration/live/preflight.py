"""The pre-flight: an opt-in stage (``MigrationRequest.preflight``) that measures the guest's dirty rate
over the windows of ``model.choice.PREFLIGHT_WINDOWS`` just before `migrate` is sent, and reads random
pages for the zero-page share (as `migrate --estimate` does, live/measure.py), and leaves on the job the
choice auto acts on (``job.preflight``): among pre-copy, each fewer-bytes option and postcopy at once
(when allowed), the fastest whose predicted guest stall fits the downtime limit (model/choice.py). The
job asks for it while it prepares (``measured``, from live/wiredata.py), before the capabilities: the
wire option and postcopy-ram depend on it.

Its cost: the start waits for the windows (4 s); its pages are read while they run (the pre-start stayed
at 4.2 s); calc-dirty-rate's page sampling hashes a few pages per GiB and does not slow the guest
measurably. The job starts the windows (``begin``) before it reads the guest's pages and both hosts' CPU
for the fewer-bytes options (live/wiredata.py), so that the measurements overlap instead of adding up.
A measurement that fails stops nothing: auto then steers as without it (pages that cannot be read:
every page counts as sent), and the job says why.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from kvmshell.core.migration.live.measure import SAMPLED_PAGES
from kvmshell.core.migration.live.stages import BaseStage
from kvmshell.core.migration.model.choice import PREFLIGHT_WINDOWS, Choice, choose, wire_label
from kvmshell.core.migration.model.dirty import DirtyRange, Window, dirty_range
from kvmshell.core.migration.model.wire import PLAIN, WireInputs
from kvmshell.core.values.models import PageSample
from kvmshell.errors import KvmError

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob


class Preflight(BaseStage):
    name = "pre-flight"

    def __init__(self) -> None:
        super().__init__()
        self.choice: Choice | None = None
        self.windows: list[Window] = []
        self.missing: str | None = None          # why there is no choice
        self.dirty: DirtyRange | None = None     # the range measured: what the job's held verdict reads
        self.pages: PageSample | None = None     # the zero-page share: None, not read (all RAM counts as sent)
        self.pages_missing: str | None = None    # why the pages were not read
        self._measuring: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._chosen = False                     # ``measured`` ran

    def begin(self, job: MigrationJob) -> None:
        """Start measuring the windows now (the job goes on preparing); ``before_start`` waits for them."""
        if self._measuring is None:
            self._measuring = asyncio.create_task(self._measure(job))
            self._reading = asyncio.create_task(self._read(job))

    def stop(self) -> None:
        """The migration will not start: stop measuring."""
        for task in (self._measuring, self._reading):
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()                 # seen here: a failure of a migration that will not start

    async def _measure(self, job: MigrationJob) -> None:
        for seconds in PREFLIGHT_WINDOWS:
            self.windows.append(Window(seconds, float((await job.source.measure_dirty_rate(seconds)).bytes_per_s)))

    async def _read(self, job: MigrationJob) -> None:
        try:
            self.pages = await job.source.sample_pages(SAMPLED_PAGES)
        except KvmError as e:                    # the choice goes on, counting every page as sent
            self.pages_missing = f"the zero pages could not be sampled ({e}): all RAM counted as sent"

    async def measured(self, job: MigrationJob, downtime_s: float, wire: WireInputs | None = None) -> Choice | None:
        """Wait for the windows and the pages, then choose (once) among pre-copy, the fewer-bytes options
        costed from ``wire`` (live/wiredata.py) and postcopy at once; None: no choice (``missing`` says
        why). The job calls it while it prepares (auto's wire option and its postcopy-ram depend on it)."""
        if self._chosen:
            return self.choice
        self._chosen = True
        src = job.source
        self.begin(job)
        assert self._measuring is not None and self._reading is not None
        try:
            await self._measuring
            await self._reading
            ram = await src.ram_size()
        except KvmError as e:
            self.missing = f"the dirty rate could not be measured ({e})"
            return None
        self.dirty = dirty_range(self.windows, ram)
        rate = job.req.bandwidth or job.req.link        # the job caps max-bandwidth at one, else the other
        if not rate:
            self.missing = ("no transfer rate is known before the start (neither --bandwidth nor --link, nor a link "
                            "in the config)")
            return None
        self.choice = choose(ram=ram, dirty=self.dirty, rate=rate, link=job.req.link, downtime_limit_s=downtime_s,
                             allow_postcopy=job.req.allow_postcopy,
                             zero_fraction=self.pages.zero_fraction if self.pages is not None else 0.0, wire=wire)
        return self.choice

    async def before_start(self, job: MigrationJob) -> None:
        if not self._chosen:
            try:
                params = await job.source.migrate_parameters()
            except KvmError as e:
                self.missing = f"the downtime limit could not be read ({e})"
                return
            await self.measured(job, (params.downtime_limit_ms or 300) / 1000)

    async def finish(self, job: MigrationJob, outcome: Any) -> None:
        self.stop()

    def said(self) -> str:
        """The decision's reason: the choice with its numbers, or why there is none."""
        cost = f"measured over {' s and '.join(str(s) for s in PREFLIGHT_WINDOWS)} s before the start"
        if self.pages is not None:
            cost += f", {self.pages.pages} random pages read: {100 * self.pages.zero_fraction:.0f} % zero"
        elif self.pages_missing:
            cost += f"; {self.pages_missing}"
        if self.choice is None:
            return f"no pre-flight choice: {self.missing or 'not measured'}; auto steers on verdicts that hold"
        return f"{self.choice.summary()}; {cost}"

    def lines(self) -> list[tuple[str, Any]]:
        if self.choice is None:
            return [("pre-flight", self.missing)] if self.missing else []
        c = self.choice
        lever = "converge from the start" if c.from_start is not None else c.lever
        lever = lever if c.wire == PLAIN else f"{lever} sending {wire_label(c.wire)}"
        return [("pre-flight", f"{lever}, {c.verdict}")]
