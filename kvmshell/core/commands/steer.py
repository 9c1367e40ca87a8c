"""kvmshell's own migration commands: `migrate --to DEST` with a strategy, `estimate`, `trace`,
`migrate --follow`, and the live view that `info migrate` shows for a migration kvmshell follows."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from kvmshell.core.commands.migrate_request import MigrateRequest
from kvmshell.core.commands.migrate_stages import copy_storage_of, stages_for
from kvmshell.core.commands.results import Done, Result, Table, Text, Watch
from kvmshell.core.values.jsonform import as_json
from kvmshell.core.values.units import human_bytes, parse_rate
from kvmshell.core.migration.live.blockers import explain
from kvmshell.core.migration.live.probe import LinkFigure, probe_path
from kvmshell.core.migration.live import running
from kvmshell.core.migration.live.adopt import adopt, not_followed
from kvmshell.core.migration.live.begin import begin
from kvmshell.core.migration.live.endpoints import warnings_for
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.model.estimate import estimate as estimate_strategies
from kvmshell.core.migration.live.measure import measure
from kvmshell.core.migration.live.wiredata import measure_wire
from kvmshell.core.migration.model.choice import WireRange, wire_label
from kvmshell.core.migration.model.wire import WireInputs
from kvmshell.core.migration.model.predict import Prediction, Verdict
from kvmshell.core.values.models import MigrationInfo
from kvmshell.core.commands.session import Invocation
from kvmshell.core.migration.crosshost import CrossHostRequest, migrate_to_host as run_migration
from kvmshell.errors import CommandFailed, ConfigError, KvmError, Refused
from kvmshell.core.commands.spec import UsageError


def job_request(inv: Invocation, req: MigrateRequest) -> MigrationRequest:
    """What the engine is asked to do, from the typed `migrate` request and the config's defaults."""
    defaults = inv.session.config.defaults
    return MigrationRequest(
        source=req.source, dest=req.dest, uri=req.uri, strategy=req.strategy or defaults.strategy,
        downtime_ms=req.downtime_ms, bandwidth=req.bandwidth, link=req.link or configured_link(inv),
        allow_postcopy=req.allow_postcopy or defaults.allow_postcopy, trace_path=req.trace, preflight=req.preflight,
        stall_timeout=req.stall_timeout or defaults.stall_timeout,
        setup_timeout=req.setup_timeout or defaults.setup_timeout)


async def migrate_steered(inv: Invocation, mreq: MigrateRequest) -> Result:
    """`migrate --to DEST` (or a URI with a kvmshell option): kvmshell runs and steers the migration."""
    s, source, dest = inv.session, mreq.source, mreq.dest
    if dest is not None:
        s.fleet.get(dest)
    mreq.check_steered()
    if mreq.estimate:
        return await _estimate(inv, mreq)
    if s.running_job(source) is not None:
        raise Refused("kvmshell is already migrating this guest", guest=source)
    req = job_request(inv, mreq)
    job = await begin(s.fleet, req, stages_for(inv, mreq), tls_root=mreq.tls, tls_authz=mreq.tls_authz,
                      progress=inv.progress)
    if not job.work:                       # started: its state file now, should kvmshell exit before the job runs
        await running.save(job)
    s.launch(job)                          # with stages, their work and the start run in the background
    if mreq.watch:
        return Watch("info migrate")
    warnings = tuple(w for st in job.stages for w in st.warnings)
    if job.work:
        return Done(f"preparing ({', '.join(st.name for st in job.work)}), then migrating to {req.dest or job.uri} "
                    f"({job.uri}), strategy {req.strategy}; `info migrate` shows progress", warnings)
    return Done(f"migrating to {req.dest or job.uri} ({job.uri}), strategy {req.strategy}; "
                "`info migrate` shows progress and the model's prediction", warnings)


def configured_link(inv: Invocation) -> float | None:
    link = inv.session.config.defaults.link
    return float(parse_rate(link)) if link else None


def track(inv: Invocation) -> None:
    """Follow a plain `migrate URI` (sampling and the model only; nothing is steered)."""
    job = MigrationJob.of(inv.session.fleet, MigrationRequest(inv.guest or "", strategy="none"))
    inv.session.launch(job)


# -- the live view ------------------------------------------------------------------------------

def bar(fraction: float, width: int = 30) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "[" + "#" * full + "." * (width - full) + f"] {fraction * 100:3.0f} %"


def live_lines(info: MigrationInfo, job: MigrationJob | None) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    last = job.sampler.ring.last if job is not None else None
    ram = info.ram
    if ram is not None and info.status.is_active:
        first_pass = ram.dirty_sync_count <= 1
        if first_pass and ram.total:
            items.append(("progress", bar(1 - ram.remaining / ram.total) + " of RAM, first pass"))
        else:
            items.append(("progress", f"pass {ram.dirty_sync_count}: {human_bytes(ram.remaining)} dirty to send"))
        if last is not None:
            items.append(("throughput", f"{last.throughput / 1e6:.0f} MB/s (QEMU: {ram.mbps:.0f} Mbit/s)"))
    if job is not None:
        pred = job.prediction
        if pred is not None:
            items.append(("model", pred.verdict.value))
            if pred.verdict is Verdict.UNCERTAIN:
                items.append(("range", pred.outcomes()))
            if pred.reason:
                items.append(("why", pred.reason))
            if pred.downtime_ms is not None and pred.verdict is Verdict.CONVERGES:
                items.append(("predicted downtime", f"{pred.downtime_ms:.0f} ms"))
            if pred.time_left_s is not None and info.status.is_active:
                items.append(("predicted time left", f"{pred.time_left_s:.1f} s"))
            if pred.verdict is Verdict.WILL_NOT_CONVERGE:
                if pred.downtime_limit_needed_ms:
                    items.append(("would converge with", f"downtime limit >= {pred.downtime_limit_needed_ms:.0f} ms"
                                  + (f", or bandwidth >= {pred.bandwidth_needed / 1e6:.0f} MB/s"
                                     if pred.bandwidth_needed else "")))
        for stage in job.stages:
            items += stage.lines()
        for d in job.decisions[-3:]:
            items.append(("decision", d))
        if job.outcome is not None:
            items.append(("outcome", job.outcome.full_message))
    return items


def live_json(job: MigrationJob) -> dict[str, Any]:
    """What kvmshell adds to `info migrate --json` for a migration it follows."""
    return {"strategy": job.req.strategy, "dest": job.req.dest, "uri": job.uri, "prediction": as_json(job.prediction),
            "decisions": list(job.decisions), "outcome": as_json(job.outcome)}


# -- estimate -----------------------------------------------------------------------------------

async def link_figure(inv: Invocation, req: MigrateRequest) -> LinkFigure:
    """The link speed for the estimate, and how it is known: --link, a probe of the migration path
    (--probe, or by default when no link is configured), the config's [defaults] link, or assumed."""
    source, dest = req.source, req.dest
    if req.link is not None:
        if req.probe:
            raise UsageError("--link gives the link's speed, --probe measures it: pick one", guest=source)
        return LinkFigure(float(req.link), "configured", "configured: --link")
    configured = configured_link(inv)
    why = "--no-probe"
    if req.probe or (configured is None and req.probe is None):
        fleet = inv.session.fleet
        result, why = await probe_path(source, fleet.get(source).address, dest,
                                       fleet.get(dest).address if dest else None, req.uri, inv.progress, fleet.hosts)
        if result is not None:
            extra = f"; the config says {configured / 1e6:.0f} MB/s" if configured else ""
            return LinkFigure(result.rate, "probed", result.describe() + extra)
    if configured is not None:
        return LinkFigure(configured, "configured", "configured: [defaults] link in the config"
                          + (f"; not probed: {why}" if req.probe else ""))
    return LinkFigure(None, "assumed", f"not probed: {why}")


async def _estimate(inv: Invocation, req: MigrateRequest) -> Result:
    source, dest, uri = req.source, req.dest, req.uri
    mon = inv.monitor
    info = await mon.migration()
    if info.status.is_active:
        raise Refused(f"a migration is {info.status}: measuring now would disturb it", guest=source)
    params = await mon.migrate_parameters()
    figure = await link_figure(inv, req)
    link = figure.rate
    cap = float(params.max_bandwidth or 0) or None
    L = (req.downtime_ms or params.downtime_limit_ms or 300) / 1000
    R_link = float(link) if link else (cap or 0.0)
    # the pages for the fewer-bytes options are read while the dirty-rate windows wait
    reading = asyncio.create_task(_fewer_bytes(inv, req), name=f"wire-data-{source}")
    try:
        m = await measure(mon, inv.progress)
        wire, said = await reading
    finally:
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    ram, dirty = m.ram, m.dirty
    D, W = dirty.lo, dirty.working_set
    est = estimate_strategies(ram=ram, dirty_rate=D, working_set=W, link=R_link, cap=cap, downtime_limit_s=L,
                              allow_postcopy=req.allow_postcopy or inv.session.config.defaults.allow_postcopy,
                              bandwidth=req.bandwidth, dirty=dirty, zero_fraction=m.pages.zero_fraction,
                              wire=wire, weigh_wire=bool(req.bandwidth or link))
    rows = [(o.name, o.prediction.verdict.value, o.prediction.total_text(), _downtime(o.prediction),
             f"{o.prediction.bytes_total / 1e6:.0f} MB" if o.prediction.bytes_total is not None else "-", o.note)
            for o in est.options]
    rows += [_wire_row(r) for r in est.fewer]
    if est.postcopy is not None:
        rows.append(("postcopy after the first pass", "will converge", f"{est.postcopy.total_s:.1f} s", "~ 1-10 ms",
                     f"{est.postcopy.bytes_total / 1e6:.0f} MB", est.postcopy.note))
    lines = [f"guest {source}: {human_bytes(ram)} of RAM; {m.pages_text()}",
             f"dirty rate: {m.windows_text()} -> {dirty.text()}"
             + (f" ({m.means.note})" if m.means.note else ""),
             figure.text() if link else (f"link: {R_link / 1e6:.0f} MB/s (assumed: max-bandwidth; {figure.detail}; "
                                         "--link RATE or `link` in the config's [defaults] gives the real one)"),
             f"downtime limit: {L * 1000:.0f} ms"]
    if info.blocked_reasons:
        lines.append("BLOCKED, this guest cannot migrate: " + explain(info.blocked_reasons))
    if dest is not None:
        lines.append(f"destination: {dest}")
        lines += [f"WARNING: {w}" for w in warnings_for(inv.session.fleet, source, dest, uri,
                                                       encrypted=bool(req.tls))]
    table = Table(("STRATEGY", "VERDICT", "TOTAL", "DOWNTIME", "SENT", "NOTE"), tuple(rows))
    lines += ["", table.text(), ""]
    uncertain = [o for o in est.options if o.prediction.verdict is Verdict.UNCERTAIN]
    if uncertain:
        lines.append("UNCERTAIN: the measurement cannot tell whether pre-copy converges:")
        lines += [f"  {o.name}: {o.prediction.outcomes()}" for o in uncertain]
        lines += [f"  ({uncertain[0].prediction.reason})", ""]
    lines += [*said, f"auto would run: {est.auto}. Nothing was started."]
    by_s = {w.seconds: w.bytes_per_s for w in dirty.windows}
    data = {"guest": source, "destination": dest, "ram_bytes": ram,
            "dirty_rate_1s_bytes_per_s": by_s.get(1.0), "dirty_rate_3s_bytes_per_s": by_s.get(3.0),
            "dirty_rate_bytes_per_s": D, "working_set_bytes": W, "link_bytes_per_s": R_link or None,
            "link_known": figure.how, "link_detail": figure.detail, "bandwidth_cap_bytes_per_s": cap,
            "downtime_limit_ms": L * 1000, "blocked": list(info.blocked_reasons),
            "warnings": [line.removeprefix("WARNING: ") for line in lines if line.startswith("WARNING: ")],
            "dirty_low_bytes_per_s": dirty.lo, "dirty_high_bytes_per_s": dirty.hi,
            "zero_pages_percent": 100 * m.pages.zero_fraction, "uncertain": est.uncertain, "started": False}
    # options, postcopy, auto: every field of the model's objects (the range and zero share: just above)
    data |= {k: v for k, v in as_json(est).items() if k not in ("dirty", "zero_fraction", "fewer")}
    data["fewer_bytes"] = [{"strategy": r.high.option.strategy, "settings": r.high.option.text(),
                            "verdict": r.verdict.value, "total_s": r.high.prediction.total_s,
                            "low_end_total_s": r.low.prediction.total_s,
                            "downtime_ms": r.high.prediction.downtime_ms, "wire_bytes": r.high.wire_bytes,
                            "cpu_s": r.high.cpu_s, "rate_bytes_per_s": r.high.rate, "limit": r.high.limit}
                           for r in est.fewer]
    return Text("\n".join(lines), data=data)


async def _fewer_bytes(inv: Invocation, req: MigrateRequest) -> tuple[WireInputs | None, list[str]]:
    """What each way of sending fewer bytes is costed from (model/wire.py): the guest's pages and both
    hosts' CPU; the lines that say what they are (auto's pick: model/choice.py, "auto would run")."""
    fleet = inv.session.fleet
    try:
        wire = await measure_wire(inv.monitor, fleet.monitor(req.dest) if req.dest else None, fleet.hosts)
    except KvmError as e:
        return None, [f"fewer bytes: not estimated ({e})"]
    return wire, [f"fewer bytes: {wire.data.text()}; {wire.room.text()}", ""]


def _wire_row(r: WireRange) -> tuple[str, ...]:
    """One fewer-bytes option at the range's ends: its verdict (uncertain when they differ), its times."""
    p, c = r.high.prediction, r.high
    down = "- / never" if r.verdict is Verdict.UNCERTAIN else (f"{p.downtime_ms:.0f} ms" if p.downtime_ms is not None
                                                             else "-")
    return (wire_label(c.option), r.verdict.value, r.times(), down,
            f"{c.wire_bytes / 1e6:.1f} MB on the wire" if c.wire_bytes is not None else "-",
            f"{c.limit}; {c.cpu_s or 0:.1f} CPU s; {c.option.text()}")


def _downtime(p: Prediction) -> str:
    if p.verdict is Verdict.UNCERTAIN:
        return "- / never"
    return f"{p.downtime_ms:.0f} ms" if p.downtime_ms is not None else "-"


async def estimate(inv: Invocation) -> Result:
    """`estimate [--to DEST] [--link RATE] [--probe|--no-probe] [--downtime MS]`: `migrate --estimate`."""
    req = replace(MigrateRequest.from_parsed(inv.guest or "", inv.values, inv.flags), estimate=True)
    if req.dest is not None:
        inv.session.fleet.get(req.dest)
        if req.dest == req.source:
            raise UsageError("--to names the guest being estimated: pick the destination guest", guest=inv.guest)
    return await _estimate(inv, req)


async def trace(inv: Invocation) -> Result:
    s = inv.session
    path = str(inv.values["file"])
    info = await inv.monitor.migration()
    if not info.status.is_active:
        raise CommandFailed("no migration running to trace; use `migrate ... --trace FILE` to trace one from "
                            "its start", guest=inv.guest)
    if s.running_job(inv.guest or "") is not None:
        raise Refused("kvmshell already follows this migration; give --trace when you start it", guest=inv.guest)
    job = MigrationJob.of(s.fleet, MigrationRequest(inv.guest or "", strategy="none", trace_path=path))
    await job.attach_trace()
    s.launch(job)
    return Done(f"tracing the migration to {path}")


# -- migrate --follow ----------------------------------------------------------------------------

async def follow(inv: Invocation) -> Result:
    """`migrate --follow`: adopt the migration that runs on the guest (``live.adopt``)."""
    s, guest = inv.session, inv.guest or ""
    if s.running_job(guest) is not None:
        raise Refused("this kvmshell follows this migration already: `info migrate` shows it", guest=guest)
    adopted = await adopt(s.fleet, guest)
    s.launch(adopted.job)
    return Done(f"{adopted.message}; `info migrate` shows progress", tuple(adopted.warnings))


def unfollowed_lines(inv: Invocation, info: MigrationInfo) -> list[tuple[str, Any]]:
    """The `info migrate` line of a migration that runs and that this kvmshell does not follow."""
    if inv.session.running_job(inv.guest or "") is not None:
        return []
    said = not_followed(info, running.load(str(inv.monitor.address)) if info.status.is_active else None)
    return [("kvmshell", said)] if said else []


# -- migrate --to-host HOST ---------------------------------------------------------------------

async def migrate_to_host(inv: Invocation, mreq: MigrateRequest) -> Result:
    """`migrate --to-host HOST [--tunnel]`: start the destination there, migrate, quit the source
    (the engine is ``kvmshell.core.migration.crosshost``)."""

    s, source = inv.session, mreq.source
    host = str(mreq.to_host)
    if not (s.assume_yes or mreq.yes or mreq.dry_run) and s.confirmer is None:
        raise UsageError("migrate --to-host quits the source at the end and there is no one to ask: add -y",
                         guest=source)
    if s.running_job(source) is not None:
        raise Refused("kvmshell is already migrating this guest", guest=source)
    pool = s.fleet.hosts
    if pool is None or not pool.hosts:
        raise ConfigError("migrate --to-host needs the destination in the config: add a [hosts.NAME] table")
    req = CrossHostRequest(guest=source, to=host, job=job_request(inv, mreq), tunnel=mreq.tunnel,
                           run_dir=mreq.run_dir, new_name=mreq.name, address=mreq.address,
                           copy_storage=copy_storage_of(inv, mreq), tls_root=mreq.tls, tls_authz=mreq.tls_authz,
                           insecure_storage=mreq.insecure_storage, dry_run=mreq.dry_run)

    def on_job(j: MigrationJob) -> None:
        s.migrations[source] = j            # `info migrate` shows the live view meanwhile

    r = await run_migration(s.fleet, pool, req, progress=inv.progress, confirm=inv.confirm, on_job=on_job,
                            edit=inv.edit if mreq.edit else None)
    o = r.outcome
    if req.dry_run:
        return Done("\n".join([f"dry run: {source} would move live to {host} as {r.new_name}; nothing was started",
                                f"command on {host}: {r.command}", *(f"note: {n}" for n in r.notes)]),
                    tuple(r.warnings))
    lines = [f"{source} moved live to {host} as {r.new_name}",
             f"destination: {r.new_name} ({r.address}), {r.dest_state}",
             f"stream: {r.uri}" + (" (through SSH)" if req.tunnel else ""),
             f"migration: {o.message}",
             f"source: {r.source_state}",
             f"command on {host}: {r.command}",
             *(f"decision: {d}" for d in o.decisions),
             *(f"note: {n}" for n in r.notes)]
    return Done("\n".join(lines), tuple(r.warnings))
