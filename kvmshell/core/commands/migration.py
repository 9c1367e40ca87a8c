"""The HMP migration commands, on any QEMU (the monitor speaks QMP or HMP, whichever the guest has).

Also the two commands QEMU removed in 6.0 and admins still type: migrate_set_speed (-> max-bandwidth)
and migrate_set_downtime (-> downtime-limit).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvmshell.core.commands.results import Done, KeyValues, Result, Watch
from kvmshell.core.values.jsonform import as_json
from kvmshell.core.values.units import human_bytes
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag, UsageError
from kvmshell.core.commands import libvirt_migrate, steer
from kvmshell.core.commands.migrate_request import MigrateRequest, Mode
from kvmshell.core.migration.live.adopt import undo_start
from kvmshell.core.migration.live.blockers import explain
from kvmshell.core.migration.live.strategies import offered, parse_strategy
from kvmshell.core.migration.tcgdirty import tcg_dirty_check
from kvmshell.core.values.uri import MigrationUri, check_uri, is_local_host
from kvmshell.core.values.units import (
    parse_on_off, parse_positive_int, parse_rate, parse_seconds, parse_size,
)
from kvmshell.core.monitor.guestdata import CAPABILITIES, MIGRATION, PARAMETERS
from kvmshell.core.values.models import SIZE_PARAMETERS, MigrationInfo, MigrationStatus, RunState
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.commands.session import Invocation
from kvmshell.errors import CommandFailed, Refused, Unsupported

YES = Flag(("-y", "--yes"), "do not ask for confirmation")
# parameters that hold sizes; the bandwidths take MiB for a bare number, as HMP does
BANDWIDTH_PARAMS = ("max-bandwidth", "max-postcopy-bandwidth", "avail-switchover-bandwidth")
MAX_DOWNTIME_MS = 2_000_000     # QEMU's limit for downtime-limit


async def migrate(inv: Invocation) -> Result:
    req = MigrateRequest.from_parsed(inv.guest or "", inv.values, inv.flags)
    if libvirt_migrate.is_libvirt_guest(inv):
        return await libvirt_migrate.migrate(inv, req)
    req.check()
    libvirt_migrate.refuse_libvirt_flags(req)
    if req.mode is Mode.FOLLOW:
        return await steer.follow(inv)
    if req.mode is Mode.TO_HOST:
        return await steer.migrate_to_host(inv, req)
    guest_cfg = inv.session.config.guests.get(req.source)
    unplugs = guest_cfg is not None and bool(guest_cfg.unplug) and not (req.block or req.inc or req.resume)
    if req.steered or unplugs:                            # [guests.X] unplug: kvmshell runs the migration
        return await steer.migrate_steered(inv, req)
    mon = inv.monitor
    if req.uri is None:
        raise UsageError("missing URI (or --to DEST); usage: " + inv.parsed.spec.usage, guest=inv.guest)
    uri, blk, inc, resume = req.uri, req.block, req.inc, req.resume
    info = await mon.migration()
    if info.status.is_active and not resume:
        raise Refused(f"a migration of this guest is already {info.status}; `migrate_cancel` first", guest=inv.guest)
    if info.blocked_reasons:
        raise Refused("this guest cannot migrate: " + explain(info.blocked_reasons), guest=inv.guest)
    if blk or inc or resume:
        have = await mon.migrate_options()
        for flag, arg, wanted in (("-b", "blk", blk), ("-i", "inc", inc), ("-r", "resume", resume)):
            if wanted and arg not in have:
                hint = ("block migration was removed in QEMU 9.1: use shared storage, or copy the disks "
                        "over NBD with `migrate --to DEST --copy-storage all|inc`") if arg != "resume" \
                    else "this QEMU cannot resume a migration"
                raise Unsupported(f"migrate {flag}: {hint}", guest=inv.guest)
    if blk or inc:
        await _check_block_migration_limits(inv, "-b" if blk else "-i")
    warnings = []
    tcg = None if resume else await tcg_dirty_check(inv.guest or "", mon)
    if tcg is not None:
        warnings.append(tcg)
    host = MigrationUri.parse(uri).host
    if not is_local_host(host):
        params = await mon.migrate_parameters()
        if not params.get("tls-creds"):
            warnings.append(f"the migration stream to {host} is not encrypted (no tls-creds): "
                            "anyone on the path can read the guest's memory")
    await mon.migrate(uri, blk=blk, inc=inc, resume=resume)
    inv.session.data.schedule(inv.guest or "", MIGRATION)
    state = await _first_state(mon)
    if state.status is MigrationStatus.FAILED:
        raise CommandFailed(f"migration to {uri} failed at once: {state.error or 'no reason given'}; "
                            "the guest runs on here as before", guest=inv.guest)
    if state.status.is_active and inv.session.running_job(inv.guest or "") is None:
        steer.track(inv)
    return Done(f"migration to {uri} started ({state.status}); `info migrate` shows its progress",
                tuple(warnings))


# QEMU's block migration switches over once its pending bytes fit max-bandwidth x downtime-limit, and
# during the bulk copy it counts only the blocks in flight: with a large product it switches over with
# the disks half-copied. Measured on QEMU 7.2 here (256 MiB disk, downtime-limit 300 ms): identical at
# 100 and 200 MiB/s, 80 % of the disk never sent at 400 MiB/s.
BLOCK_MIGRATION_MAX_WINDOW = 64 << 20


async def _check_block_migration_limits(inv: Invocation, flag: str) -> None:
    params = await inv.monitor.migrate_parameters()
    bandwidth, downtime_ms = params.max_bandwidth or 0, params.downtime_limit_ms or 0
    window = bandwidth * downtime_ms // 1000
    if window > BLOCK_MIGRATION_MAX_WINDOW:
        raise Refused(f"migrate {flag}: max-bandwidth {human_bytes(bandwidth)}/s x downtime-limit {downtime_ms} ms "
                      f"= {human_bytes(window)}: with that much QEMU's block migration may switch over before the "
                      f"disks are copied (the destination then runs on half-copied disks); lower it first "
                      f"(migrate_set_speed 100M), or use `migrate --to DEST --copy-storage all|inc`",
                      guest=inv.guest)


async def _first_state(mon: Monitor, bound: float = 1.0) -> MigrationInfo:
    """The migration's state once it has left `setup`, or after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        info = await mon.migration()
        if info.status is not MigrationStatus.SETUP or time.monotonic() >= deadline:
            return info
        await asyncio.sleep(0.02)       # QEMU sends no event without the events capability


async def migrate_cancel(inv: Invocation) -> Result:
    mon = inv.monitor
    job = inv.session.running_job(inv.guest or "")
    if job is not None and job.strategy.steers:
        await job.cancel()
        return Done("migration cancelled; the guest keeps running here")
    info = await mon.migration()
    if not info.status.is_active:
        undone = await undo_start(inv.session.fleet, inv.guest or "")     # a dead kvmshell's start
        if undone is not None:
            return Done(undone[0], tuple(undone[1]))
        return Done(f"no migration to cancel (status: {info.status})")
    if info.status.is_postcopy:
        raise Refused(f"cancel refused: the migration is {info.status}, the guest already runs on the destination; "
                      "`migrate_pause` stops the stream so that it can be recovered", guest=inv.guest)
    await mon.migrate_cancel()
    inv.session.data.schedule(inv.guest or "", MIGRATION)
    return Done("migration cancelled; the guest keeps running here")


async def migrate_incoming(inv: Invocation) -> Result:
    mon = inv.monitor
    uri = str(inv.values["uri"])
    status = await mon.status()
    if status.state is not RunState.INMIGRATE:
        raise CommandFailed(f"the guest is {status}, not waiting for a migration: start its QEMU with "
                            "`-incoming defer` to receive one", guest=inv.guest)
    await mon.migrate_incoming(uri)
    return Done(f"listening for the incoming migration on {uri}")


async def migrate_start_postcopy(inv: Invocation) -> Result:
    mon = inv.monitor
    caps = await mon.migrate_capabilities()
    if "postcopy-ram" not in caps or not caps["postcopy-ram"]:
        raise CommandFailed("postcopy-ram is off: set it on both sides before `migrate` "
                            "(migrate_set_capability postcopy-ram on)", guest=inv.guest)
    info = await mon.migration()
    if info.status is not MigrationStatus.ACTIVE:
        raise CommandFailed(f"no active migration to switch to postcopy (status: {info.status})", guest=inv.guest)
    await inv.confirm("switch to postcopy? From now on the guest runs on the destination while its memory "
                      "is still being copied: if the network or the destination fails, the guest is split "
                      "between hosts and can only be recovered with migrate_recover")
    await mon.start_postcopy()
    return Done("switched to postcopy")


async def migrate_recover(inv: Invocation) -> Result:
    mon = inv.monitor
    uri = str(inv.values["uri"])
    await mon.migrate_recover(uri)
    return Done(f"destination listening on {uri} to recover the paused postcopy migration; "
                f"then run `migrate -r URI` on the source")


async def migrate_pause(inv: Invocation) -> Result:
    mon = inv.monitor
    await mon.migrate_pause()
    return Done("postcopy migration paused")


async def set_parameter(inv: Invocation, name: str, value: Any) -> None:
    inv.monitor.refuse_setting("parameter", name)
    await inv.monitor.set_parameters({name: value})
    inv.session.data.schedule(inv.guest or "", PARAMETERS)


async def migrate_set_parameter(inv: Invocation) -> Result:
    name, text = str(inv.values["name"]), str(inv.values["value"])
    inv.monitor.refuse_setting("parameter", name)
    params = await inv.monitor.migrate_parameters()
    if name not in params.values:
        raise UsageError(f"no migration parameter {name!r} on this guest (`info migrate_parameters` lists them)",
                         guest=inv.guest)
    current = params.values[name]
    try:
        if isinstance(current, bool):
            value: Any = parse_on_off(text)
        elif name in SIZE_PARAMETERS:
            value = parse_size(text, bare_unit="M" if name in BANDWIDTH_PARAMS else "B")
        elif isinstance(current, int):
            if not text.strip().isdigit():
                raise ValueError(f"{text!r} is not a whole number of 0 or more")
            value = int(text)
        else:
            value = text
    except ValueError as e:
        raise UsageError(f"{name}: {e}", guest=inv.guest) from None
    await set_parameter(inv, name, value)
    return Done(f"{name} = {value if not isinstance(value, bool) else ('on' if value else 'off')}")


async def migrate_set_capability(inv: Invocation) -> Result:
    mon = inv.monitor
    name, state = str(inv.values["name"]), bool(inv.values["state"])
    caps = await mon.migrate_capabilities()
    if name not in caps:
        raise UsageError(f"no migration capability {name!r} on this guest (`info migrate_capabilities` lists them)",
                         guest=inv.guest)
    if state:
        mon.refuse_setting("capability", name)
    await mon.set_capabilities({name: state})
    inv.session.data.schedule(inv.guest or "", CAPABILITIES)
    return Done(f"{name} {'on' if state else 'off'}")


async def migrate_set_speed(inv: Invocation) -> Result:
    value = int(inv.values["value"])  # type: ignore[call-overload]
    await set_parameter(inv, "max-bandwidth", value)
    return Done(f"max-bandwidth = {value} bytes/s ({human_bytes(value)}/s)")


async def migrate_set_downtime(inv: Invocation) -> Result:
    seconds = float(inv.values["seconds"])  # type: ignore[arg-type]
    ms = round(seconds * 1000)
    if ms > MAX_DOWNTIME_MS:
        raise UsageError(f"{seconds:g} s is more than QEMU's limit of {MAX_DOWNTIME_MS // 1000} s", guest=inv.guest)
    await set_parameter(inv, "downtime-limit", ms)
    return Done(f"downtime-limit = {ms} ms")


def render_migration(info: MigrationInfo) -> KeyValues:
    """`info migrate` as the HMP user knows it, from the typed object (same for QMP and HMP guests)."""
    items: list[tuple[str, Any]] = [("Migration status", info.status.value + (f" ({info.error})" if info.error else ""))]
    for label, v in (("total time", info.total_time_ms), ("expected downtime", info.expected_downtime_ms),
                     ("downtime", info.downtime_ms), ("setup", info.setup_time_ms)):
        if v is not None:
            items.append((label, f"{v} ms"))
    if info.cpu_throttle_percentage is not None:
        items.append(("cpu throttle percentage", info.cpu_throttle_percentage))
    if info.ram is not None:
        r = info.ram
        items += [("transferred ram", human_bytes(r.transferred)), ("remaining ram", human_bytes(r.remaining)),
                  ("total ram", human_bytes(r.total)), ("throughput", f"{r.mbps:.2f} mbps"),
                  ("dirty sync count (pass)", r.dirty_sync_count),
                  ("dirty pages rate", f"{r.dirty_pages_rate} pages/s ({human_bytes(r.dirty_bytes_rate)}/s)"),
                  ("duplicate (zero) pages", r.duplicate), ("normal pages", r.normal)]
        if r.postcopy_requests:
            items.append(("postcopy requests", r.postcopy_requests))
    if info.disk is not None:
        items += [("transferred disk", human_bytes(info.disk.transferred)),
                  ("remaining disk", human_bytes(info.disk.remaining)), ("total disk", human_bytes(info.disk.total))]
    for reason in info.blocked_reasons:
        items.append(("blocked", reason))
    return KeyValues(tuple(items))


async def info_migrate(inv: Invocation) -> Result:
    if inv.flags.get("watch"):
        return Watch("info migrate")
    info = await inv.monitor.migration()
    view = render_migration(info)
    job = inv.session.migrations.get(inv.guest or "")
    extra = steer.live_lines(info, job) + steer.unfollowed_lines(inv, info)
    data = as_json(info) | ({"kvmshell": steer.live_json(job)} if job is not None else {})
    return KeyValues(view.items + tuple(extra), data=data)


async def info_migrate_parameters(inv: Invocation) -> Result:
    params = await inv.monitor.migrate_parameters()
    # JSON: QEMU's own names (what migrate_set_parameter takes), with QEMU's units, under "params"
    return KeyValues(tuple(sorted(params.values.items())), data={"params": dict(params.values)})


async def info_migrate_capabilities(inv: Invocation) -> Result:
    caps = await inv.monitor.migrate_capabilities()
    return KeyValues(tuple(sorted(caps.states.items())), data={"capabilities": dict(caps.states)})


async def calc_dirty_rate(inv: Invocation) -> Result:
    mon = inv.monitor
    seconds = int(inv.values["seconds"])  # type: ignore[call-overload]
    await mon.start_dirty_rate(seconds)
    return Done(f"measuring the dirty rate for {seconds} s; `info dirty_rate` shows the result")


async def info_dirty_rate(inv: Invocation) -> Result:
    d = await inv.monitor.dirty_rate()
    items: list[tuple[str, Any]] = [("status", d.status)]
    if d.dirty_rate_mb is not None:
        items.append(("dirty rate", f"{d.dirty_rate_mb} MB/s"))
    items += [(k, v) for k, v in (("calc-time", d.calc_time_s), ("sample-pages", d.sample_pages),
                                  ("mode", d.mode), ("start-time", d.start_time)) if v is not None]
    return KeyValues(tuple(items), data={"status": d.status, "dirty_rate_mb_per_s": d.dirty_rate_mb,
                                         "dirty_rate_bytes_per_s": d.bytes_per_s, "calc_time_s": d.calc_time_s,
                                         "sample_pages": d.sample_pages, "mode": d.mode,
                                         "start_time_s": d.start_time})


def parse_copy_storage(text: str) -> str:
    if text not in ("all", "inc"):
        raise ValueError(f"{text!r}: expected all (whole disks) or inc (top layer over a shared backing file)")
    return text


def _uri(text: str) -> str:
    return check_uri(text)


SPECS = (
    CommandSpec("migrate", "migrate the guest to URI, or to an attached guest with --to (always detached)", migrate,
                args=(Arg("uri", "tcp:HOST:PORT, unix:PATH, exec:CMD, fd:NAME, rdma:HOST:PORT", parse=_uri,
                          optional=True, complete=Completer.URI),),
                flags=(Flag(("-d",), "detach (accepted; kvmshell never blocks the monitor)"),
                       Flag(("-b",), "copy the disks too (block migration, where QEMU still has it)"),
                       Flag(("-i",), "copy only the top image over a shared backing file"),
                       Flag(("-r",), "resume a paused postcopy migration"),
                       Flag(("--to",), "destination: an attached guest started with -incoming defer", value="GUEST",
                            complete=Completer.GUEST),
                       Flag(("--strategy",), f"{' | '.join(offered())} (default: {offered()[0]})", value="S",
                            parse=parse_strategy, complete=Completer.STRATEGY),
                       Flag(("--downtime",), "downtime limit in ms", value="MS",
                            parse=lambda t: parse_positive_int(t, "the downtime limit")),
                       Flag(("--bandwidth",), "bandwidth cap (1gbit, 100M...); default: uncapped up to the link",
                            value="RATE", parse=parse_rate, complete=Completer.SIZE),
                       Flag(("--link",), "the link's speed, for the model (1gbit, 10gbit...)", value="RATE",
                            parse=parse_rate),
                       Flag(("--allow-postcopy",), "let the auto strategy switch to postcopy (a network failure "
                            "in postcopy can lose the guest)"),
                       Flag(("--preflight",), "auto: measure the dirty rate for 4 s before the start; if pre-copy "
                            "will not converge or postcopy at once is clearly faster, and postcopy is allowed, start postcopy at once"),
                       Flag(("--watch",), "show the live view until Ctrl-C (the migration goes on)"),
                       Flag(("--follow",), "adopt the migration that runs (its kvmshell died, or a plain QMP "
                            "migrate): follow it, and resume the strategy, stages (disk copy, unplugged devices) and undo "
                            "(settings, TLS) of the kvmshell that started it"),
                       Flag(("--detach",), "with -c/run: do not wait for the migration, leave it to QEMU "
                            "(kvmshell's steering and stall watchdog stop when the script ends)"),
                       Flag(("--trace",), "write every sample as JSON lines to FILE", value="FILE"),
                       Flag(("--tls",), "encrypt the stream with the certificates `kvmshell tls-init DIR HOST...` "
                            "made (needs --to; a remote host's are installed into its tls_dir over SFTP); a libvirt guest: "
                            "--tls libvirt (the daemons' migrate_tls_x509_cert_dir)",
                            value="DIR"),
                       Flag(("--tls-authz",), "with --tls: the destination admits only the source host's client "
                            "certificate (an authz-simple object with its DN, tls-authz)"),
                       Flag(("--stall-timeout",), "cancel after this many seconds without progress once data "
                            "moves (default 10)", value="SEC", parse=parse_seconds),
                       Flag(("--setup-timeout",), "cancel if the migration is still in its setup after this many "
                            "seconds (QEMU connecting, libvirt preparing the destination; default 60)",
                            value="SEC", parse=parse_seconds),
                       Flag(("--estimate",), "measure and predict each strategy; start nothing"),
                       Flag(("--probe",), "with --estimate: probe the link with a short transfer (2 s or 64 MiB) "
                            "even if the config gives one (default: probe when no link is configured)"),
                       Flag(("--no-probe",), "with --estimate: do not probe the link"),
                       Flag(("--copy-storage",), "no shared storage: copy the disks over NBD while RAM migrates "
                            "(all: whole disks; inc: the top qcow2 layer over a backing file both hosts have; "
                            "default: the guest's copy_storage in the config)",
                            value="all|inc", parse=parse_copy_storage),
                       Flag(("--insecure-storage",), "with --copy-storage to another host and no --tls: export "
                            "the disks over plain NBD anyway (anyone who reaches the port can write them)"),
                       Flag(("--unplug",), "unplug this device (a passthrough NIC...) before, plug it back after "
                            "(on the destination; on the source if the migration fails)", value="DEVICE_ID",
                            repeat=True),
                       Flag(("--replug",), "plug SPEC (device_add syntax) on the destination instead of the "
                            "unplugged device ID", value="ID=SPEC", repeat=True),
                       Flag(("--to-host",), "live-migrate to another host ([hosts.NAME]): kvmshell starts the "
                            "destination there over SSH (shared storage: same image paths), then quits the source",
                            value="HOST", complete=Completer.HOST),
                       Flag(("--tunnel",), "with --to-host: carry the stream through the SSH connection "
                            "(encrypted; costs throughput; the source must run on this host)"),
                       Flag(("--address",), "with --to-host: HOST's address as the source reaches it (the "
                            "destination listens there; default: the host of its ssh target)", value="ADDR"),
                       Flag(("--dir",), "with --to-host: run directory on HOST for the destination's sockets, "
                            "pidfile and log (default /run/kvmshell/GUEST.HOST); with --copy-storage its new "
                            "images too (default /var/lib/kvmshell/images/GUEST.HOST)", value="DIR"),
                       Flag(("--name",), "with --to-host: the destination's name in kvmshell (default GUEST.HOST)",
                            value="NAME"),
                       Flag(("--edit",), "with --to-host: open the destination's command line in $EDITOR "
                            "before it starts"),
                       Flag(("--dry-run",), "with --to-host: preflight and show the destination's command line; "
                            "start nothing"),
                       Flag(("-y", "--yes"), "with --to-host: do not ask before quitting the source"),
                       Flag(("--persistent",), "libvirt guest: define the domain on the destination"),
                       Flag(("--undefine-source",), "libvirt guest: undefine the domain on the source"),
                       Flag(("--unsafe",), "libvirt guest: the disks are shared, but libvirt cannot tell (not NFS...)"),
                       Flag(("--p2p",), "libvirt guest: the source's libvirtd reaches the destination's itself "
                            "(default: kvmshell holds both connections)")),
                maps_to="QMP migrate (uri, blk, inc, resume) / HMP migrate -d; with --to: migrate-incoming on "
                        "the destination, capabilities on both sides, then migrate; with --to-host: QEMU "
                        "-incoming defer -daemonize on HOST over SSH, then as --to, then quit",
                details="With --to (or any kvmshell option) kvmshell runs the migration: it samples it, predicts "
                        "whether it converges, and the strategy acts on the prediction (auto: precopy, then "
                        "auto-converge, or postcopy if allowed). A stalled migration is cancelled after 10 s "
                        "without progress.", category="migration"),
    CommandSpec("migrate_cancel", "cancel the migration under way", migrate_cancel,
                maps_to="QMP migrate_cancel", category="migration"),
    CommandSpec("migrate_incoming", "start listening for an incoming migration (guest started with -incoming defer)",
                migrate_incoming, args=(Arg("uri", "where to listen, e.g. tcp:0:6666", parse=_uri,
                                            complete=Completer.URI),),
                maps_to="QMP migrate-incoming", category="migration"),
    CommandSpec("migrate_start_postcopy", "switch the running migration to postcopy", migrate_start_postcopy,
                flags=(YES,), maps_to="QMP migrate-start-postcopy", category="migration"),
    CommandSpec("migrate_recover", "destination: listen on URI to recover a paused postcopy migration",
                migrate_recover, args=(Arg("uri", "where to listen", parse=_uri, complete=Completer.URI),),
                maps_to="QMP migrate-recover", category="migration"),
    CommandSpec("migrate_pause", "pause a postcopy migration (to recover it on another path)", migrate_pause,
                maps_to="QMP migrate-pause", category="migration"),
    CommandSpec("migrate_set_parameter", "set a migration parameter", migrate_set_parameter,
                args=(Arg("name", "parameter name", complete=Completer.PARAMETER),
                      Arg("value", "new value (sizes take B K M G T)", complete=Completer.PARAMETER_VALUE)),
                maps_to="QMP migrate-set-parameters", category="migration"),
    CommandSpec("migrate_set_capability", "turn a migration capability on or off", migrate_set_capability,
                args=(Arg("name", "capability name", complete=Completer.CAPABILITY),
                      Arg("state", "on or off", parse=parse_on_off, complete=Completer.ON_OFF)),
                maps_to="QMP migrate-set-capabilities", category="migration"),
    CommandSpec("migrate_set_speed", "cap the migration bandwidth (removed from QEMU 6.0, kept here)",
                migrate_set_speed,
                args=(Arg("value", "bytes/s: a bare number is MiB/s as the old HMP had it; suffixes B K M G T",
                          parse=lambda t: parse_size(t, bare_unit="M"), complete=Completer.SIZE),),
                maps_to="QMP migrate-set-parameters max-bandwidth", category="migration (legacy)"),
    CommandSpec("migrate_set_downtime", "set the maximum downtime (removed from QEMU 6.0, kept here)",
                migrate_set_downtime,
                args=(Arg("seconds", "seconds, e.g. 0.3", parse=parse_seconds),),
                maps_to="QMP migrate-set-parameters downtime-limit (ms)", category="migration (legacy)"),
    CommandSpec("info migrate", "show the migration status and statistics", info_migrate,
                flags=(Flag(("--watch", "-w"), "refresh twice a second until Ctrl-C"),),
                maps_to="QMP query-migrate", category="migration"),
    CommandSpec("estimate", "measure the dirty rate and predict each migration strategy (starts nothing)",
                steer.estimate,
                flags=(Flag(("--link",), "the link's speed (1gbit...)", value="RATE", parse=parse_rate),
                       Flag(("--to",), "the destination guest: probe the link to it (see --probe)", value="GUEST",
                            complete=Completer.GUEST),
                       Flag(("--probe",), "probe the link to --to DEST with a short transfer (2 s or 64 MiB) even "
                            "if the config gives one (default: probe when no link is configured)"),
                       Flag(("--no-probe",), "do not probe the link"),
                       Flag(("--downtime",), "downtime limit in ms", value="MS",
                            parse=lambda t: parse_positive_int(t, "the downtime limit"))),
                maps_to="QMP calc-dirty-rate, query-dirty-rate, query-migrate", category="migration"),
    CommandSpec("trace", "write the running migration's samples to FILE as JSON lines", steer.trace,
                args=(Arg("file", "trace file to write"),), maps_to="QMP query-migrate", category="migration"),
    CommandSpec("info migrate_parameters", "show the migration parameters", info_migrate_parameters,
                maps_to="QMP query-migrate-parameters", category="migration"),
    CommandSpec("info migrate_capabilities", "show the migration capabilities", info_migrate_capabilities,
                maps_to="QMP query-migrate-capabilities", category="migration"),
    CommandSpec("calc_dirty_rate", "measure how fast the guest dirties memory", calc_dirty_rate,
                args=(Arg("seconds", "measuring time", parse=lambda t: parse_positive_int(t, "seconds")),),
                maps_to="QMP calc-dirty-rate", category="migration"),
    CommandSpec("info dirty_rate", "show the last dirty-rate measurement", info_dirty_rate,
                maps_to="QMP query-dirty-rate", category="migration"),
)
