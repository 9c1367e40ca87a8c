"""Adopting a migration that runs without a kvmshell following it (`migrate --follow`).

The kvmshell that started it died (kill -9, a lost terminal) or closed, or someone typed a plain
QMP `migrate`: QEMU goes on migrating, unsteered, without a stall watchdog. Adopting builds a job
around the running migration: the sampler, the model and the watchdog resume. If the state file of a
dead kvmshell (``running``) names this guest, its strategy resumes too, with the destination when it
is attached here, and the settings it changed are put back on both sides at the end; so do its
stages (``resume``): the disk copy completes at the switch-over (or is cancelled), the devices it
unplugged are plugged on the destination (or back on the source), and the TLS it set up is undone.
Without a file the job only observes (strategy "none") and says it cannot put back what it does not know.

A kvmshell that died before it sent `migrate` (its disk copy under way, say) left a file of a start
(``running.RunningFile.starting``): `migrate --follow` takes the start over once its destination
listens (the mirrors finish, `migrate` is sent, the rest as usual), and `migrate_cancel` undoes it
(``undo_start``: the mirrors cancelled, the NBD server stopped, the settings put back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmshell.core.migration.live import running
from kvmshell.core.migration.live.job import UNCAPPED, MigrationJob
from kvmshell.core.migration.live.limits import Limits
from kvmshell.core.migration.live.passthrough import PassthroughStage
from kvmshell.core.migration.live.resume import TlsUndo
from kvmshell.core.migration.live.stages import Stage
from kvmshell.core.migration.live.storage import StorageStage
from kvmshell.core.migration.live.request import MigrationOutcome, MigrationRequest
from kvmshell.core.migration.live.strategies import strategy_named
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import MigrationInfo, MigrationStatus, RunState
from kvmshell.errors import CommandFailed, Refused

NO_FILE = ("no state file from the kvmshell that started it: following it with strategy none (sampler, model, "
           "stall watchdog); its migration settings cannot be put back, kvmshell does not know what they were")

STALE = ("the state file of this guest is about an older migration: following this one with strategy none; its "
         "migration settings cannot be put back, kvmshell does not know what they were")

OBSERVED = ("the kvmshell that started it only observed it: following it with strategy none (sampler, model, "
            "stall watchdog)")


@dataclass
class Adopted:
    """The job that follows the adopted migration, and what to tell the user about it."""

    job: MigrationJob
    message: str
    warnings: list[str] = field(default_factory=list)


def not_followed(info: MigrationInfo, state: running.RunningFile | None) -> str | None:
    """What `info migrate` and the badges say of a migration this kvmshell does not follow; None if idle."""
    if not info.status.is_active:
        return None
    owner = ""
    if state is not None and state.describes(info):
        owner = (f"; kvmshell pid {state.pid} follows it" if state.alive else
                 f"; started by kvmshell pid {state.pid} (gone), strategy {state.strategy}")
    return f"{info.status} and not followed: `migrate --follow` adopts it{owner}"


def _attached(fleet: Fleet, address: str | None) -> Monitor | None:
    """The connected monitor of the guest at ``address`` here, if one is attached."""
    for g in fleet:
        if address is not None and str(g.address) == address and g.monitor is not None and g.monitor.connected:
            return g.monitor
    return None


async def adopt(fleet: Fleet, guest: str) -> Adopted:
    """The job that follows ``guest``'s running migration from now on (not launched yet); Refused when
    none runs, when the guest is the receiving side, or when a live kvmshell follows it."""
    mon = fleet.monitor(guest)
    info = await mon.migration()
    if not info.status.is_active:
        start = _dead_start(mon)
        if start is not None:
            return await _take_over_start(fleet, mon, start)
        raise Refused(f"no migration of this guest is running ({info.status}): nothing to follow", guest=guest)
    if (await mon.status()).state is RunState.INMIGRATE:
        raise Refused("this guest receives the migration: `migrate --follow` on its source", guest=guest)
    state = running.load(str(mon.address))
    stale = state is not None and not state.describes(info)
    if stale:
        state = None                        # a file about an older migration of this guest
    if state is not None and state.alive:
        raise Refused(f"kvmshell pid {state.pid} follows this migration already: adopt it once that kvmshell "
                      "has ended", guest=guest)
    if state is None or state.strategy == "none":
        job = MigrationJob.of(fleet, MigrationRequest(guest, strategy="none"))
        why = OBSERVED if state is not None else STALE if stale else NO_FILE
        return Adopted(job, f"following the {info.status} migration; {why}")
    return await _resume(fleet, mon, info, state)


def _dead_start(mon: Monitor) -> running.RunningFile | None:
    """The file of a start (no `migrate` sent yet) whose kvmshell has died, for this source."""
    state = running.load(str(mon.address))
    return state if state is not None and state.starting and not state.alive else None


async def _take_over_start(fleet: Fleet, mon: Monitor, state: running.RunningFile) -> Adopted:
    """A dead kvmshell's start that had set up both sides (the destination listens): this job goes on
    from its stages' work before `migrate` (``StorageStage.resumed``: the mirrors finish)."""
    by = f"kvmshell pid {state.pid} (gone)"
    if state.phase != "prepared" or state.unplug is not None:
        what = "setting up both sides" if state.phase != "prepared" else "unplugging devices"
        raise Refused(f"{by} was {what} for a migration when it ended, which cannot go on from there: "
                      "`migrate_cancel` undoes what it set up", guest=mon.name)
    warnings: list[str] = []
    job = await _job(fleet, mon, state, warnings)
    if job.dest is None:
        raise Refused(f"{by} was starting a migration to {state.dest_address}, not attached here: attach it "
                      "(-g NAME=ADDRESS) to go on, or `migrate_cancel` to undo it", guest=mon.name)
    _take_stages(job, mon, state, warnings)
    job.uri = state.uri
    running.checkpoint(job, "prepared")          # this kvmshell's file now
    return Adopted(job, f"took over the start of the migration to {job.dest.name} that {by} left before `migrate`: "
                        f"its {', '.join(state.stages) or 'work'} goes on, then `migrate`, strategy {state.strategy}",
                   warnings)


async def undo_start(fleet: Fleet, guest: str) -> tuple[str, list[str]] | None:
    """`migrate_cancel` on a guest whose start a dead kvmshell left (no migration runs): undo what it
    set up on both sides; what was done, and warnings. None when there is no such start."""
    mon = fleet.monitor(guest)
    state = _dead_start(mon)
    if state is None or (await mon.migration()).status.is_active:
        return None
    warnings: list[str] = []
    job = await _job(fleet, mon, state, warnings)
    stages = _take_stages(job, mon, state, warnings)
    running.checkpoint(job, state.phase)         # this kvmshell's file, removed once undone
    why = f"the start kvmshell pid {state.pid} (gone) left, cancelled"
    job.outcome = MigrationOutcome("cancelled", why)     # the TLS is undone too
    await job._unwind(why)
    done = [n for st in stages for n in st.notes] + job._restored
    return f"{why}: " + ("; ".join(done) or "nothing was left to undo"), warnings


def _take_stages(job: MigrationJob, mon: Monitor, state: running.RunningFile, warnings: list[str]) -> list[Stage]:
    stages, _ = _stages(mon, job.dest, state, warnings)
    job.stages += stages
    job._prepared = list(stages)                 # finished (undone) if the start fails or is cancelled
    return stages


async def _resume(fleet: Fleet, mon: Monitor, info: MigrationInfo, state: running.RunningFile) -> Adopted:
    """The dead kvmshell's job again: its strategy, request and the settings to put back."""
    warnings: list[str] = []
    job = await _job(fleet, mon, state, warnings)
    dest = job.dest
    job.postcopy_started = info.status.is_postcopy
    job.throttle_armed = bool(info.cpu_throttle_percentage)
    stages, resumed = _stages(mon, dest, state, warnings)
    left = [name for name in state.stages if name not in resumed and name != "pre-flight"]
    if left:
        warnings.append(f"the stages of the start ({', '.join(left)}) are not resumed: check them by hand")
    if info.status is MigrationStatus.POSTCOPY_PAUSED:
        warnings.append("the migration is paused in postcopy: recover it (migrate_recover on the destination, "
                        "then migrate -r here)")
    job.stages += stages               # last: the disk copy's poller runs from now on
    return Adopted(job, f"adopted the {info.status} migration started by kvmshell pid {state.pid} (gone): strategy "
                        f"{state.strategy} resumes, its settings are put back at the end", warnings)


async def _job(fleet: Fleet, mon: Monitor, state: running.RunningFile, warnings: list[str]) -> MigrationJob:
    """The dead kvmshell's job rebuilt: its strategy, request, TLS and the settings to put back."""
    dest = _attached(fleet, state.dest_address)
    if state.dest_address is not None and dest is None:
        warnings.append(f"the destination {state.dest_address} is not attached here: its migration settings stay "
                        "as kvmshell set them (attach it with -g NAME=ADDRESS before `migrate --follow` to put them "
                        "back)")
    req = MigrationRequest(mon.name, dest=dest.name if dest else None, strategy=state.strategy,
                           **{k: v for k, v in state.request.items() if k in running.REQUEST})
    try:
        strategy_named(req.strategy)
    except ValueError as e:
        raise CommandFailed(f"the state file names a strategy this kvmshell does not have ({e}); "
                            f"remove {running.path_for(state.source_address)} to follow it without", guest=mon.name)
    job = MigrationJob(mon, dest, req, hosts=fleet.hosts, publish=fleet.publish)
    job.tls = dict(state.tls)
    for role, side in (("source", mon), ("dest", dest)):
        saved = state.before.get(role)
        if side is not None and saved:
            b = job.settings.before(side.name)
            b.capabilities.update({k: bool(v) for k, v in saved.get("capabilities", {}).items()})
            b.parameters.update(saved.get("parameters", {}))
    params = await mon.migrate_parameters()
    cap = params.max_bandwidth
    job._limits = Limits((req.downtime_ms or params.downtime_limit_ms or 300) / 1000,
                         float(cap) if cap and cap < UNCAPPED else None)
    return job


def _stages(mon: Monitor, dest: Monitor | None, state: running.RunningFile,
            warnings: list[str]) -> tuple[list[Stage], set[str]]:
    """The stages of the dead kvmshell rebuilt from its records, in the order it ran them (finished in
    reverse: the TLS last), and their names."""
    stages: list[Stage] = []
    if state.tls:
        stages.append(TlsUndo(dict(state.tls)))
    if state.unplug is not None:
        stages.append(PassthroughStage.resumed(state.unplug, mon.name, dest.name if dest else None))
    if state.storage is not None:
        if dest is None:
            warnings.append(f"the NBD server of the disk copy stays on {state.storage.dest} (not attached here): "
                            "stop it there with nbd-server-stop once the migration has ended")
        stages.append(StorageStage.resumed(state.storage, mon, dest))
    return stages, {st.name for st in stages}


__all__ = ["Adopted", "adopt", "not_followed", "undo_start"]
