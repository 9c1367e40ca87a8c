"""`migrate` on a libvirt guest: through libvirt's API, steered by kvmshell
(the engine is ``kvmshell.core.migration.libvirtmove``).

`migrate GUEST --to-host HOST` (HOST's ``[hosts.HOST] libvirt`` URI, else over SSH to its ssh target)
or `migrate GUEST --to libvirt:URI`; ``--persistent``, ``--undefine-source``, ``--unsafe``, ``--p2p``,
``--copy-storage all|inc`` and ``--tls libvirt`` are libvirt's choices. Anything else is refused in one line.

``--tls libvirt``: the daemons' own migration TLS (qemu.conf's ``migrate_tls_x509_cert_dir``, certificates
from `kvmshell tls-init`); kvmshell installs nothing for a libvirt guest. A daemon without it fails the
migration at its start (QEMU cannot read the credentials): one line saying what to set in qemu.conf.
``--copy-storage`` without it needs ``--insecure-storage`` (libvirt's NBD in plain TCP).
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

from kvmshell.core.commands.migrate_request import MigrateRequest
from kvmshell.core.commands.results import Done, Result
from kvmshell.core.commands.session import Invocation
from kvmshell.core.commands.spec import UsageError
from kvmshell.core.commands import steer
from kvmshell.core.migration.libvirtmove import LibvirtMoveRequest, check, disks_to_copy, migrate_libvirt
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.monitor.libvirt import LibvirtMigrationPlan
from kvmshell.core.values.address import Kind
from kvmshell.errors import CommandFailed, ConfigError, Refused, Unsupported

LIBVIRT_ONLY = (("persistent", "--persistent"), ("undefine_source", "--undefine-source"), ("unsafe", "--unsafe"),
                ("p2p", "--p2p"))
NOT_WITH_LIBVIRT = (("block", "-b"), ("inc", "-i"), ("resume", "-r"), ("unplug", "--unplug"), ("replug", "--replug"),
                    ("tunnel", "--tunnel"), ("edit", "--edit"), ("estimate", "--estimate"), ("preflight", "--preflight"),
                    ("leave_to_qemu", "--detach"), ("tls_authz", "--tls-authz"), ("run_dir", "--dir"))


def is_libvirt_guest(inv: Invocation) -> bool:
    return inv.guest is not None and inv.session.fleet.get(inv.guest).address.kind is Kind.DOMAIN


def refuse_libvirt_flags(req: MigrateRequest) -> None:
    """The libvirt choices on a guest that libvirt does not manage: one line."""
    for name, flag in LIBVIRT_ONLY:
        if getattr(req, name):
            raise UsageError(f"{flag} is a libvirt migration choice, and libvirt does not manage this guest",
                             guest=req.source)


def destination(inv: Invocation, req: MigrateRequest) -> tuple[str, str]:
    """(how the user named it, libvirt URI) of the destination."""
    g = req.source
    if req.to_host is not None:
        host = inv.session.config.hosts.get(req.to_host)
        if host is None:
            known = ", ".join(sorted(inv.session.config.hosts)) or "none"
            raise ConfigError(f"--to-host {req.to_host}: no [hosts.{req.to_host}] in the config (hosts: {known})")
        pool = inv.session.fleet.hosts
        return req.to_host, pool.libvirt_uri(req.to_host) if pool is not None and req.to_host in pool.hosts \
            else host.libvirt_uri()
    if req.dest is not None:
        uri = req.dest.removeprefix("libvirt:")
        if "://" in uri:
            return uri, uri
        raise UsageError(f"--to {req.dest}: a libvirt guest migrates to another libvirt daemon: --to-host HOST or "
                         "--to libvirt:URI (qemu+ssh://HOST/system...)", guest=g)
    raise Unsupported("migrate: libvirt manages this guest: migrate it through libvirt with --to-host HOST "
                      "([hosts.HOST] libvirt = URI) or --to libvirt:URI; nothing was changed", guest=g)


TLS_SETUP = ("set migrate_tls_x509_cert_dir = \"DIR\" (a host directory of `kvmshell tls-init DIR HOST...`: "
             "ca-cert.pem, server-*.pem, client-*.pem) and default_tls_x509_verify = 1 in /etc/libvirt/qemu.conf on "
             "both hosts, and restart libvirtd")
TLS_FAILURES = ("tls-creds", "x509", "credentials", "certificate", "gnutls", "tls")


def tls_not_set_up(message: str) -> bool:
    """libvirt's words when a daemon's migration TLS is missing or broken."""
    low = message.lower()
    return any(word in low for word in TLS_FAILURES)


async def migrate(inv: Invocation, mreq: MigrateRequest) -> Result:
    s, g = inv.session, mreq.source
    replace(mreq, dry_run=False, address=None, name=None).check()   # these three go with --to libvirt:URI too
    for name, flag in NOT_WITH_LIBVIRT:
        if getattr(mreq, name):
            raise UsageError(f"{flag} does not go with a libvirt guest (libvirt runs the migration); nothing was "
                             "changed", guest=g)
    if mreq.tls is not None and mreq.tls != "libvirt":
        raise UsageError(f"--tls {mreq.tls}: a libvirt guest migrates in the daemons' own TLS (qemu.conf's "
                         "migrate_tls_x509_cert_dir): say --tls libvirt; nothing was changed", guest=g)
    to, uri = destination(inv, mreq)
    if mreq.p2p and "+" not in (urlsplit(uri).scheme or "") and not urlsplit(uri).hostname:
        # inside libvirtd such a URI opens the daemon's own driver: "Attempt to migrate guest to the same host"
        raise UsageError(f"--p2p: the source's libvirtd opens {uri} itself, and there a URI without a transport or "
                         "host names that daemon: give one it reaches (qemu+unix:///system?socket=PATH on this "
                         "machine, qemu+tcp://HOST/system, qemu+ssh://HOST/system), or drop --p2p; nothing was "
                         "changed", guest=g)
    if s.running_job(g) is not None:
        raise Refused("kvmshell is already migrating this guest", guest=g)
    address = mreq.address or urlsplit(uri).hostname or None
    plan = LibvirtMigrationPlan(uri, address=address, p2p=mreq.p2p, persistent=mreq.persistent,
                                undefine_source=mreq.undefine_source, unsafe=mreq.unsafe, tls=mreq.tls is not None,
                                copy_storage=mreq.copy_storage)
    req = LibvirtMoveRequest(g, plan, replace(steer.job_request(inv, replace(mreq, dest=None)), uri=uri), to,
                             new_name=mreq.name, insecure_storage=mreq.insecure_storage)
    flags = " ".join(f for on, f in ((plan.p2p, "peer-to-peer"), (plan.persistent, "persistent"),
                                    (plan.undefine_source, "undefine-source"), (plan.unsafe, "unsafe"),
                                    (plan.tls, "tls"), (bool(plan.copy_storage), f"copy-storage {plan.copy_storage}"))
                     if on) or "live"
    if mreq.dry_run:
        mon, domain = await check(s.fleet, req)
        disks = [f"\ncreate on {to}: {d.describe()}" for d in await disks_to_copy(mon, req)]
        return Done(f"dry run: libvirt would migrate {domain} to {to} ({uri}; {flags}; stream to "
                    f"{address or 'the destination host name'}), strategy {req.job.strategy}; nothing was started"
                    + "".join(disks))

    def on_job(job: MigrationJob) -> None:
        s.migrations[g] = job              # `info migrate` shows the live view meanwhile

    r = await migrate_libvirt(s.fleet, req, on_job=on_job, progress=lambda m: inv.progress(f"{m}; {flags}"))
    o = r.outcome
    where = f"libvirt has {r.domain}: source {r.source_where}; destination {r.dest_where}"
    if not r.ok:
        if plan.tls and tls_not_set_up(o.full_message):
            raise CommandFailed(f"--tls libvirt: libvirt could not set up the migration's TLS ({o.full_message}): "
                                f"{TLS_SETUP}; {where}", guest=g)
        raise CommandFailed(f"migration through libvirt {o.status}: {o.full_message}; {where}", guest=g)
    lines = [f"{g} moved live to {to} through libvirt" + (f", attached as {r.new_name}" if r.new_name else ""),
             f"migration: completed in {o.total_s or 0:.2f} s, downtime "
             f"{'not reported (postcopy)' if o.downtime_ms is None else f'{o.downtime_ms} ms'}, "
             f"{(o.bytes_sent or 0) / 1e6:.0f} MB sent",
             where, *(f"decision: {d}" for d in r.decisions), *(f"note: {n}" for n in o.notes)]
    return Done("\n".join(lines))
