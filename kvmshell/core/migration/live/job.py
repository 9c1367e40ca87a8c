"""A live migration that kvmshell runs and steers: `migrate --to DEST`, and the tracking of a plain
`migrate URI`.

The job prepares both sides (same capabilities, parameters, `migrate-incoming` on a free port),
starts the migration, samples it, asks the model after every sample, lets the strategy act on the
prediction, watches progress, and ends with an outcome that says what happened and what is left
running where. Decisions are published as events with their reasons, and written to the trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import free_port
from kvmshell.core.migration.history import MigrationHistory, TraceTee, open_traces, record
from kvmshell.core.migration.live.blockers import explain
from kvmshell.core.migration.live.endpoints import Notices
from kvmshell.core.migration.live.limits import Limits, Throttling, Watchdog
from kvmshell.core.migration.live.preflight import Preflight
from kvmshell.core.migration.model.hold import HOLD_LOOKBACK, held
from kvmshell.core.migration.model.predict import MAX_THROTTLE, Prediction, Verdict, assess, raised_throttle, throttle_for
from kvmshell.core.migration.live.sampler import Sampler
from kvmshell.core.migration.live.settings import Settings
from kvmshell.core.migration.model.samples import Sample, TraceEvent
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.migration.live import running
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.live.strategies import strategy_named
from kvmshell.core.migration.live.wiredata import wire_option
from kvmshell.core.values.models import Event, MigrationStatus, RunState
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.migration.tls import TlsSide, disable as tls_disable, enable as tls_enable
from kvmshell.errors import CommandFailed, KvmError, Refused

log = logging.getLogger(__name__)

UNCAPPED = 100 * 1000**3 // 8            # 100 Gbit/s: "no cap", the link decides
DECISION = "kvmshell.MIGRATION_DECISION"
FINISHED = "kvmshell.MIGRATION_FINISHED"
DIRTY_LIMIT_INERT = 1_000_000            # MB/s per vCPU: dirty-limit armed, but no vCPU is ever held back


class MigrationJob:
    """One migration between two endpoints: the source's monitor and (for `--to`) the destination's;
    ``hosts`` reaches the hosts they run on, ``publish`` takes the job's events, ``history`` keeps
    its trace and summary (default: the state directory's)."""

    def __init__(self, source: Monitor, dest: Monitor | None, request: MigrationRequest, *,
                 hosts: HostPool | None = None, publish: Callable[[Event], None] = lambda event: None,
                 clock: Callable[[], float] = time.monotonic, stages: Sequence[Stage] = (),
                 history: MigrationHistory | None = None) -> None:
        self.publish = publish
        self.history = history if history is not None else MigrationHistory.default()
        self.hosts = hosts if hosts is not None else source.hosts
        self.req = request
        self.strategy = strategy_named(request.strategy)(request)
        self.preflight = Preflight() if request.preflight and self.strategy.uses_preflight else None   # opt-in, first
        self.stages: list[Stage] = [*([self.preflight] if self.preflight else []), *stages]
        self._prepared: list[Stage] = []      # stages whose prepare() was called: finish() them at the end
        self._started = False                 # `migrate` was sent
        self._starting: asyncio.Task[None] | None = None
        self._cancel_requested = False
        self._switchover: asyncio.Task[None] | None = None
        self.clock = clock
        self.source = source
        self.dest = dest
        self.uri: str | None = request.uri
        self.sampler = Sampler(self.source, interval=request.interval, clock=clock)
        self.prediction: Prediction | None = None
        self._said: deque[tuple[Sample, Prediction]] = deque(maxlen=HOLD_LOOKBACK + 1)  # for the hold
        self.outcome: MigrationOutcome | None = None
        self.decisions: list[str] = []
        self._limits = Limits()
        self.postcopy_started = False
        self.throttle_armed = False
        self.throttle_target = 0                 # the auto-converge percentage last asked for
        self._throttling = Throttling()
        self.marks: dict[str, Prediction] = {}   # "start", "first pass": the predictions scored later
        self._watchdog = Watchdog(request.stall_timeout, request.bandwidth, request.setup_timeout)
        self._done = asyncio.Event()
        self._actions: set[asyncio.Task[None]] = set()
        self._tls_on = False
        self.tls: dict[str, TlsSide] = {}     # what TLS changed, by side ("source", "dest"): for the state file
        self.settings = Settings()            # what the job changes on each side, to put back at the end
        self.start_phase = "preparing"        # in the state file until `migrate` is sent (running.PHASES)
        self._restored: list[str] = []        # what putting it back said, before a start that failed

    @property
    def work(self) -> list[Stage]:
        """The stages with work of their own before `migrate` (the notices have none)."""
        return [st for st in self.stages if not isinstance(st, Notices)]

    @classmethod
    def of(cls, fleet: Fleet, request: MigrationRequest, **kw: Any) -> MigrationJob:
        """The job between two guests of ``fleet``, named by the request."""
        return cls(fleet.monitor(request.source), fleet.monitor(request.dest) if request.dest else None, request,
                   hosts=fleet.hosts, publish=fleet.publish, **kw)

    # -- decisions ------------------------------------------------------------------------------
    def decide(self, name: str, reason: str, **detail: Any) -> None:
        t = self.sampler.now
        self.decisions.append(f"t={t:.1f}s {name}: {reason}")
        self.sampler.record(TraceEvent(t, "kvmshell", name, {"reason": reason, **detail}))
        self.publish(Event(self.req.source, DECISION, {"decision": name, "reason": reason, **detail}, time.time()))

    # -- preparing both sides -------------------------------------------------------------------
    async def prepare(self) -> None:
        """Check and set up both sides; nothing runs yet. A failure leaves both as they were."""
        self.settings.on_change = lambda: running.checkpoint(self)     # the state file before each change
        try:
            await self._prepare()
        except BaseException as e:
            await self._unwind(str(e) if isinstance(e, KvmError) else "interrupted")
            raise

    async def _unwind(self, why: str) -> None:
        """Undo what was set up before `migrate` was sent (or what failed at once): the stages, the
        TLS credentials, the capabilities and parameters."""
        failed = MigrationOutcome("failed", why)
        if self.preflight is not None:
            self.preflight.stop()
        await self._finish_stages(failed)
        if self._tls_on:
            await self._tls_off()
        self._restored.extend(await self.settings.restore(self.source, self.dest, "failed"))
        await self._close_trace(failed)
        running.forget(self)

    async def _finish_stages(self, outcome: MigrationOutcome) -> None:
        for stage in reversed(self._prepared):
            try:
                await stage.finish(self, outcome)
            except KvmError as e:
                stage.notes.append(f"{stage.name}: could not finish: {e}")
            except Exception as e:          # a bug in a stage must not hide the outcome
                log.exception("stage %s failed to finish", stage.name)
                stage.notes.append(f"{stage.name}: could not finish: {e}")
        self._prepared = []

    async def _prepare(self) -> None:
        src = self.source
        info = await src.migration()
        if info.status.is_active:
            raise Refused(f"a migration of this guest is already {info.status}", guest=self.req.source)
        if info.blocked_reasons and not any(getattr(st, "clears_blockers", False) for st in self.stages):
            # a stage that unplugs devices checks what still blocks after the unplug
            raise Refused("this guest cannot migrate: " + explain(info.blocked_reasons), guest=self.req.source)
        params = await src.migrate_parameters()
        downtime_s = (self.req.downtime_ms or params.downtime_limit_ms or 300) / 1000
        strategy = self.strategy
        if self.dest is not None:
            status = await self.dest.status()
            if status.state is not RunState.INMIGRATE:
                raise CommandFailed(f"{self.req.dest} is {status}, not waiting for a migration: start its QEMU with "
                                    "`-incoming defer`", guest=self.req.source)
            dinfo = await self.dest.migration()
            if dinfo.status is not MigrationStatus.NONE:
                raise CommandFailed(f"{self.req.dest} already has an incoming migration ({dinfo.status})",
                                    guest=self.req.source)
        if self.preflight is not None:
            self.preflight.begin(self)                   # its windows run while the pages are read
        wire = await wire_option(self, downtime_s)       # before the capabilities: auto's postcopy depends on it
        caps: dict[str, bool] = {"events": True} | wire.capabilities
        if strategy.steers:
            caps["postcopy-ram"] = strategy.postcopy()
            caps["auto-converge"] = strategy.converge()
            caps["dirty-limit"] = False
            if caps["auto-converge"]:
                await self._throttling.choose(self.settings, src, caps)
        if any(stage.pause_before_switchover for stage in self.stages):
            caps["pause-before-switchover"] = True
        await self.settings.set_capabilities(src, caps)
        if self.dest is not None:
            await self.settings.set_capabilities(self.dest, {k: v for k, v in caps.items()
                                             if k not in ("events", "pause-before-switchover", "dirty-limit")}
                                 | {"events": True})
        if strategy.steers:
            new: dict[str, Any] = {"max-bandwidth": self.req.bandwidth or (int(self.req.link) if self.req.link else UNCAPPED)}
            if self.req.downtime_ms is not None:
                new["downtime-limit"] = self.req.downtime_ms
            new |= strategy.throttle_parameters(bool(caps.get("auto-converge")))
            if caps.get("dirty-limit"):
                known = self.req.bandwidth or self.req.link
                new["vcpu-dirty-limit"] = self._throttling.dirty_limit_mb(known) if strategy.throttles_from_start() and known \
                    else DIRTY_LIMIT_INERT     # inert until the model says how fast the guest may dirty
            await self.settings.set_parameters(src, new)
            for side in [m for m in (src, self.dest) if m is not None and wire.parameters]:
                await self.settings.set_parameters(side, wire.parameters)     # the same on both sides
            params = await src.migrate_parameters()
        # QEMU never sends faster than max-bandwidth: the model must know the cap
        cap = params.max_bandwidth
        self._limits = Limits(downtime_s, float(cap) if cap and cap < UNCAPPED else None)
        if self.req.tls is not None:
            if self.dest is None:
                raise CommandFailed("TLS needs a destination kvmshell attaches (--to DEST)", guest=self.req.source)
            self.tls["dest"] = await tls_enable(self.dest, self.req.tls.dest_dir, server=True, authz=self.req.tls.authz)
            self.tls["source"] = await tls_enable(src, self.req.tls.source_dir, server=False,
                                                  hostname=self.req.tls.hostname)
            self._tls_on = True
        if self.dest is not None and self.uri is None:
            self.uri = f"tcp:127.0.0.1:{await free_port(None, None)}"
        if self.uri is None:
            raise CommandFailed("no URI and no destination guest", guest=self.req.source)
        for stage in self.stages:
            self._prepared.append(stage)
            await stage.prepare(self)
        if self.dest is not None:
            await self.dest.migrate_incoming(self.req.listen_uri or self.uri)
        running.checkpoint(self, "prepared")

    # -- running --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Run the stages' ``before_start``, then send `migrate`; raise CommandFailed if it fails at
        once (nothing listening, refused). A failure undoes the stages."""
        try:
            await self._start()
        except BaseException as e:
            if not self._started:
                await self._unwind(str(e) if isinstance(e, KvmError) else "interrupted")
            raise

    async def _start(self) -> None:
        assert self.uri is not None
        src = self.source
        await self.attach_trace()
        for stage in self.stages:
            await stage.before_start(self)
            running.checkpoint(self)                 # what it did (devices unplugged, say)
        self.sampler.start = self._watchdog.setup_since = self.clock()    # the setup limit counts from here
        await src.migrate(self.uri)
        self._started = True
        running.checkpoint(self, "migrating")        # until ``run`` saves it with QEMU's start
        self.decide("start", f"migrate to {self.uri} with strategy {self.req.strategy}, "
                             f"downtime limit {self._limits.downtime_s * 1000:.0f} ms, "
                             f"bandwidth {'uncapped' if not self.req.bandwidth else f'{self.req.bandwidth / 1e6:.0f} MB/s'}")
        if self._throttling.said is not None:
            self.decide(*self._throttling.said)
        if src.reports_start_failures_at_end:
            return                  # libvirt prepares the destination for seconds: its failures end the job
        first = await self.sampler.sample()
        deadline = self.clock() + 2.0
        while first is not None and first.status is MigrationStatus.SETUP and self.clock() < deadline:
            await asyncio.sleep(0.02)
            first = await self.sampler.sample()
        if first is not None and first.status is MigrationStatus.FAILED:
            info = await src.migration()
            await self._unwind(f"migration to {self.uri} failed at once: {info.error or 'no reason given'}")
            raise CommandFailed("; ".join([f"migration to {self.uri} failed at once: {info.error or 'no reason given'}",
                                           f"{self.req.source} runs on as before", *self._restored]),
                                guest=self.req.source)

    async def attach_trace(self) -> None:
        """Open the trace (the history's copy, and the --trace file if asked for) and write its header."""
        if self.sampler.trace is None:
            self.sampler.trace = await open_traces(self.history, self.source, self.req, self.uri)

    async def run(self) -> MigrationOutcome:
        """Follow the migration to its end (starting it first if ``start`` was not called: stages
        with long work before the start run here, in the background); the outcome."""
        if not self._started and self.uri is None:     # an observer (`migrate URI`, `trace`): the
            self._started = True                       # migration runs already; its stages were set
            self._prepared = list(self.stages)         # up by the caller and are finished at the end
            try:
                await self.attach_trace()
            except KvmError as e:
                log.warning("%s: no trace of the migration: %s", self.req.source, e)
        if not self._started:
            self._starting = asyncio.create_task(self.start())
            try:
                await self._starting
            except (KvmError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not self._cancel_requested:
                    raise                                   # the session is closing
                status, why = ("cancelled", "cancelled by the user before the migration started") \
                    if self._cancel_requested else ("failed", f"not started: {e}")
                self.outcome = MigrationOutcome(status, f"{why}; {self.req.source} runs on as before",
                                                notes=[n for st in self.stages for n in st.notes] + self._restored)
                self._done.set()
                self.publish(Event(self.req.source, FINISHED, {"status": self.outcome.status,
                                                               "message": self.outcome.full_message}, time.time()))
                return self.outcome
        self.sampler.on_sample(self._on_sample)
        try:
            await running.save(self)             # another kvmshell can adopt it if this one dies
            last = await self._follow()
            self.outcome = await self._conclude(last)
        finally:
            for task in list(self._actions):
                task.cancel()
            await asyncio.gather(*self._actions, return_exceptions=True)
            ended = self.outcome or MigrationOutcome("failed", "interrupted")
            if ended.ok and self.dest is not None and self._prepared:
                await self._dest_settled()
            await self._finish_stages(ended)
            if self.outcome is not None:
                self.outcome.notes += [n for st in self.stages for n in st.notes]
            # no outcome: kvmshell closes while the migration runs on, and it needs its credentials
            if self._tls_on and self.outcome is not None and not self.outcome.ok:
                await self._tls_off()
            restored = await self.settings.restore(self.source, self.dest, ended.status if self.outcome else "interrupted")
            if self.outcome is not None:
                self.outcome.notes += restored
            await self._close_trace(self.outcome)
            running.drop(self)
            self._done.set()
        self.publish(Event(self.req.source, FINISHED, {"status": self.outcome.status,
                                                            "message": self.outcome.full_message}, time.time()))
        return self.outcome

    async def _follow(self) -> Sample | None:
        sampler_task = asyncio.create_task(self.sampler.run(), name=f"sampler-{self.req.source}")
        try:
            while not sampler_task.done():
                await asyncio.wait({sampler_task}, timeout=0.25)
                if self._watchdog.stalled is None and (why := self._check_stall()):
                    await self._cancel_stalled(why)
                if self._postcopy_paused():
                    return self.sampler.ring.last      # the finally stops the sampler
            return await sampler_task
        finally:
            if not sampler_task.done():
                sampler_task.cancel()
                try:
                    await sampler_task
                except asyncio.CancelledError:
                    pass

    def _postcopy_paused(self) -> bool:
        last = self.sampler.ring.last
        return last is not None and last.status is MigrationStatus.POSTCOPY_PAUSED

    def _check_stall(self) -> str | None:
        """Why the job is stuck, if it is: setup over its own limit, or no progress for the stall
        timeout (whose clock starts once the job leaves setup)."""
        last = self.sampler.ring.last
        if last is None:
            return None
        if last.status is MigrationStatus.SETUP:
            if not self._watchdog.setup_overdue(self.clock()):
                return None
            doing, why = self.source.setup_phase
            return f"{doing} for {self.req.setup_timeout:g} s: {why} (the limit: --setup-timeout)"
        if last.status not in (MigrationStatus.ACTIVE, MigrationStatus.PRE_SWITCHOVER, MigrationStatus.DEVICE,
                               MigrationStatus.POSTCOPY_ACTIVE):
            return None
        if (self._switchover is not None and not self._switchover.done()) or self.source.finishing:
            return None                      # the stages (or libvirt) finish their work, nothing left to send
        # libvirt copies the disks of --copy-storage inside its migration job, before the RAM
        if not self._watchdog.stuck(last.transferred, self.clock(), last.disk_remaining):
            return None
        return (f"no progress for {self.req.stall_timeout:g} s (transferred frozen at "
                f"{last.transferred / 2**20:.1f} MiB): the destination or the link is stuck")

    async def _cancel_stalled(self, stalled: str) -> None:
        last = self.sampler.ring.last
        self._watchdog.stalled = stalled
        if last is not None and last.status is MigrationStatus.POSTCOPY_ACTIVE:
            # the guest runs on the destination already: cancelling is impossible, waiting for TCP to
            # give up takes many minutes; pausing keeps both halves so the migration can be recovered
            self.decide("pause-stalled", f"{stalled}; pausing the postcopy migration so it can be "
                                         "recovered (migrate_recover on the destination, migrate -r here)")
            try:
                await self.source.migrate_pause()
                self.sampler.wake()
            except KvmError as e:
                log.warning("pausing the stalled postcopy migration failed: %s", e)
            return
        self.decide("cancel-stalled", stalled)
        try:
            await self._cancel()
        except KvmError as e:
            log.warning("cancelling the stalled migration failed: %s", e)

    async def _cancel(self) -> None:
        await self.source.migrate_cancel()
        self.sampler.wake()

    async def cancel(self) -> None:
        """Cancel on the user's request (refused in postcopy: the guest already runs on the destination)."""
        if not self._started and self._starting is not None:
            self._cancel_requested = True            # stages still at work: stop them, they undo
            self._starting.cancel()
            return
        last = self.sampler.ring.last
        if last is not None and last.status.is_postcopy:
            raise Refused("cancel refused: the migration is in postcopy, the guest already runs on the destination",
                          guest=self.req.source)
        self.decide("cancel", "cancelled by the user")
        await self._cancel()

    async def wait(self) -> MigrationOutcome:
        await self._done.wait()
        assert self.outcome is not None
        return self.outcome

    def _on_sample(self, s: Sample) -> None:
        ring = self.sampler.ring.list()
        limits: dict[str, Any] = dict(downtime_limit_s=self._limits.downtime_s,
                                      bandwidth_cap=self._limits.bandwidth_cap, link=self.req.link)
        pred = assess(ring, **limits)          # what the strategy acts on (with its own hold)
        dirty = self.preflight.dirty if self.preflight is not None else None
        self._said.append((s, assess(ring, **limits, dirty=dirty)))
        self.prediction = held(self._said)     # what the user is told: a verdict that held (model.assess_held)
        if pred.verdict is not Verdict.UNKNOWN:
            self.marks.setdefault("start", pred)
        if s.pass_no >= 2 and not pred.rough and \
                pred.verdict in (Verdict.CONVERGES, Verdict.WILL_NOT_CONVERGE):
            self.marks.setdefault("first pass", pred)
        if s.status is MigrationStatus.ACTIVE:
            self.strategy.on_sample(self, s, pred)
        elif s.status is MigrationStatus.PRE_SWITCHOVER and self._switchover is None:
            self._switchover = asyncio.create_task(self._switch_over())
            self._actions.add(self._switchover)

    async def _switch_over(self) -> None:
        """The source is stopped and waits: let every stage finish its part, then continue (or cancel,
        and the source runs on)."""
        try:
            for stage in self.stages:
                await stage.at_switchover(self)
        except Exception as e:
            why = str(e) if isinstance(e, KvmError) else f"{type(e).__name__}: {e}"
            self.decide("cancel", f"switch-over refused: {why}")
            try:
                await self._cancel()
            except KvmError as err:
                log.warning("cancelling at switch-over failed: %s", err)
            return
        try:
            await self.source.migrate_continue("pre-switchover")
        except KvmError as e:
            self.decide("action-failed", f"migrate-continue: {e}")
        self.sampler.wake()

    # -- the levers a strategy pulls ----------------------------------------------------------
    def start_postcopy(self, why: str) -> None:
        """Switch the running migration to postcopy (once), saying why."""
        self.postcopy_started = True
        self.decide("postcopy", f"switching to postcopy: {why}")
        self._spawn(self.source.start_postcopy())

    def arm_throttle(self, pred: Prediction, why: str) -> None:
        """Throttle the guest's vCPUs (once) enough that it dirties at about half the transfer rate."""
        self.throttle_armed = True
        D, R = pred.dirty_rate or 0.0, pred.rate or 0.0
        if self._throttling.dirty_limit:
            limit = self._throttling.dirty_limit_mb(R or self.req.bandwidth or self.req.link or 2**20)
            self.decide("throttle", f"{why}; dirty-limit: each of the {self._throttling.vcpus} vCPU(s) may dirty {limit} MB/s "
                                    f"(half the transfer rate of {R / 1e6:.0f} MB/s)", limit=limit)
            self._spawn(self.settings.set_parameters(self.source, {"vcpu-dirty-limit": limit}))
            return
        target = self.throttle_target = int(round(100 * throttle_for(D, R)))
        said = self._throttling.said
        not_dl = f"; {said[1].split(': ', 1)[1]}" if said else ""
        self.decide("throttle", f"{why}; throttling the guest to {100 - target} % CPU "
                                f"(auto-converge {target} %, then +10 % a pass{not_dl})", target=target)
        params = {"cpu-throttle-initial": target, "cpu-throttle-increment": max(1, target - 1),
                  "max-cpu-throttle": MAX_THROTTLE}
        self._spawn(self._throttle_then_step(params, target))

    def raise_throttle(self, pred: Prediction, applied: int, why: str) -> None:
        """Raise the throttle QEMU applies (``applied`` %) to take ``throttle_for`` of what the guest still
        dirties at it, so that it dirties about half the transfer rate: QEMU adds cpu-throttle-increment at
        its next sync that finds the guest dirtying over half of what was sent (QEMU 7.2 has no other way to
        set the throttle of a running migration), then +10 % a pass again. Nothing where that is no more
        than QEMU's own next step (+10 %)."""
        target = raised_throttle(applied, pred.dirty_rate or 0.0, pred.rate or 0.0)
        if self._throttling.dirty_limit or target <= applied + 10:
            return
        self.throttle_target = target
        self.decide("throttle", f"still will not converge under the throttle: {why}; raising it from {applied} % to "
                                f"{target} % (auto-converge +{target - applied} % at QEMU's next sync, then +10 % a "
                                f"pass)", target=target)
        self._spawn(self._throttle_then_step({"cpu-throttle-increment": target - applied, "max-cpu-throttle": MAX_THROTTLE},
                                             target))

    async def _throttle_then_step(self, params: dict[str, Any], target: int) -> None:
        await self.settings.set_parameters(self.source, params)
        # once at the target, continue in steps of 10 (QEMU adds the increment at every sync)
        for _ in range(200):
            last = self.sampler.ring.last
            if last is None or last.status is not MigrationStatus.ACTIVE or not self.throttle_armed \
                    or self.throttle_target != target:       # raised since: that raise steps down
                return
            if last.cpu_throttle >= target:
                await self.settings.set_parameters(self.source, {"cpu-throttle-increment": 10})
                return
            await asyncio.sleep(self.req.interval)

    def release_throttle(self, why: str) -> None:
        """Put the armed throttle back as the strategy started it, saying why. QEMU lowers auto-converge's
        throttle only when it next raises it (capped by max-cpu-throttle): a trigger threshold of 1 % makes it soon."""
        self.throttle_armed = False
        inert = {"vcpu-dirty-limit": DIRTY_LIMIT_INERT} if self._throttling.dirty_limit else \
            {**self.strategy.throttle_parameters(True), "throttle-trigger-threshold": 1}
        self.decide("release", f"{why}; releasing the throttle ({', '.join(f'{k} {v}' for k, v in inert.items())})")
        self._spawn(self.settings.set_parameters(self.source, inert))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(self._run_action(coro))
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _run_action(self, coro: Any) -> None:
        try:
            await coro
        except KvmError as e:
            self.decide("action-failed", str(e))

    # -- the end ------------------------------------------------------------------------------
    async def _conclude(self, last: Sample | None) -> MigrationOutcome:
        src_name, dst_name = self.req.source, self.req.dest
        base = dict(at_start=self.marks.get("start"), after_first_pass=self.marks.get("first pass"),
                    decisions=list(self.decisions))
        if self.sampler.lost is not None or last is None:
            where = ""
            if self.dest is not None:
                try:
                    st = await self.dest.status()
                    where = (f"; {dst_name} is left waiting ({st}) and holds no running guest: quit it, or start "
                             f"the source again and migrate anew")
                except KvmError:
                    where = (f"; {dst_name} has quit too (QEMU ends an incoming migration that breaks): the guest "
                             f"runs nowhere now, restart it from its disk")
            return MigrationOutcome("source-lost", f"{src_name}'s monitor was lost during the migration "
                                    f"({self.sampler.lost}){where}", **base)
        if last.status is MigrationStatus.POSTCOPY_PAUSED:
            stalled = self._watchdog.stalled
            why = f" ({stalled})" if stalled else ""
            return MigrationOutcome("postcopy-paused",
                                    f"DANGER: the migration broke in postcopy{why}: the guest is split between "
                                    f"{src_name} and {dst_name or 'the destination'} and paused. Do not quit either "
                                    f"QEMU. Recover: `@{dst_name or 'DEST'} migrate_recover URI`, then "
                                    f"`@{src_name} migrate -r URI`", **base)
        if last.status is MigrationStatus.COMPLETED:
            msg = (f"completed in {(last.total_time_ms or 0) / 1000:.2f} s, downtime {last.downtime_ms} ms, "
                   f"{last.transferred / 1e6:.0f} MB sent; {src_name} stays paused with its memory until you quit "
                   f"it (`cont` there brings the guest back if {dst_name or 'the destination'} fails)")
            return MigrationOutcome("completed", msg, total_s=(last.total_time_ms or 0) / 1000,
                                    downtime_ms=last.downtime_ms, bytes_sent=last.transferred, **base)
        src_state = ""
        try:
            st = await self.source.status()
            src_state = f"; {src_name} is {st}"
        except KvmError:
            pass
        if self._watchdog.stalled is not None:
            return MigrationOutcome("stalled", f"cancelled: {self._watchdog.stalled}{src_state}", **base)
        info = await self._info_or_none()
        reason = f" ({info.error})" if info is not None and info.error else ""
        return MigrationOutcome(str(last.status), f"migration {last.status}{reason}{src_state}", **base)

    async def _dest_settled(self, timeout: float = 30.0) -> None:
        """Wait until the destination has loaded the whole stream before the stages finish there: the
        source says `completed` once it has sent the last byte, and a device_add while the destination
        still loads the devices' state has hung QEMU 7.2 (seen under TCG). Polled: an HMP destination
        has no events."""
        assert self.dest is not None
        try:
            async with asyncio.timeout(timeout):
                while (await self.dest.status()).state is RunState.INMIGRATE or \
                        (await self.dest.migration()).status.is_active:
                    await asyncio.sleep(0.05)
        except (TimeoutError, KvmError):
            return              # the stages say what goes wrong there, if anything

    async def _tls_off(self) -> None:
        """A failed TLS migration leaves the source as it was: no tls-creds for the next migration."""
        try:
            await tls_disable(self.source)
        except KvmError as e:
            log.info("%s: could not drop the TLS credentials: %s", self.req.source, e)

    async def _info_or_none(self) -> Any:
        try:
            return await self.source.migration()
        except KvmError:
            return None

    async def _close_trace(self, outcome: MigrationOutcome | None) -> None:
        """Close the trace and keep the migration's summary in the history (never fails)."""
        trace, self.sampler.trace = self.sampler.trace, None
        if trace is not None:
            trace.close()
            if isinstance(trace, TraceTee):
                record(self.history, trace, self, outcome)
