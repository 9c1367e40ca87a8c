"""`static-migrate GUEST --to HOST`: savevm, copy the images, loadvm on the other host (the engine is
``kvmshell.core.migration.static``; this is its command-line face)."""

from __future__ import annotations

import os

from kvmshell.core.commands.results import KeyValues, Result, Text
from kvmshell.core.values.units import human_bytes
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag, Scope, UsageError
from kvmshell.core.commands.session import Invocation
from kvmshell.core.migration.libvirtsave import LibvirtSaveRequest, migrate_libvirt_static
from kvmshell.core.migration.static import StaticRequest, StaticResult, loadvm_on, migrate_static
from kvmshell.core.values.address import Kind
from kvmshell.errors import ConfigError


async def static_migrate(inv: Invocation) -> Result:
    guest = str(inv.values["guest"])
    f = inv.flags
    if not f.get("to_host"):
        raise UsageError("static-migrate needs --to HOST (or --to-host HOST: a [hosts.NAME] of the config)")
    if inv.session.fleet.get(guest).address.kind is Kind.DOMAIN:
        return await _libvirt(inv, guest)
    if f.get("undefine_source"):
        raise UsageError("--undefine-source is for a libvirt guest, and libvirt does not manage this guest",
                         guest=guest)
    if not f.get("keep_source") and not f.get("dry_run") and not (inv.session.assume_yes or f.get("yes")) \
            and inv.session.confirmer is None:
        raise UsageError("static-migrate quits the source at the end and there is no one to ask: add -y, or "
                         "--keep-source")
    fleet = inv.session.fleet
    pool = fleet.hosts
    if pool is None or not pool.hosts:
        raise ConfigError("static-migrate needs the destination in the config: add a [hosts.NAME] table")
    req = StaticRequest(guest=guest, to=str(f["to_host"]), tag=str(f["tag"]) if f.get("tag") else None,
                        keep_source=bool(f.get("keep_source")), dest_dir=str(f["dir"]) if f.get("dir") else None,
                        paused=bool(f.get("paused")), new_name=str(f["name"]) if f.get("name") else None,
                        dry_run=bool(f.get("dry_run")))

    def progress(message: str) -> None:
        inv.session.progress(guest, message)

    r = await migrate_static(fleet, pool, req, progress=progress, confirm=inv.confirm,
                             edit=inv.edit if f.get("edit") else None)
    if req.dry_run:
        return _report(r, f"dry run: {guest} would move to {r.host} as {r.new_name}; nothing was done")
    return _report(r, f"{guest} moved to {r.host} as {r.new_name}")


async def _libvirt(inv: Invocation, guest: str) -> Result:
    """static-migrate of a libvirt guest: libvirt's save image, the disks, restored on the destination."""
    f = inv.flags
    for key, flag in (("tag", "--tag"), ("edit", "--edit")):
        if f.get(key):
            raise UsageError(f"{flag} does not go with a libvirt guest (libvirt saves its state in a save image, "
                             "not a snapshot); nothing was changed", guest=guest)
    if f.get("keep_source") and f.get("undefine_source"):
        raise UsageError("--keep-source and --undefine-source: pick one (the source is kept by default)", guest=guest)
    if f.get("undefine_source") and not f.get("dry_run") and not (inv.session.assume_yes or f.get("yes")) \
            and inv.session.confirmer is None:
        raise UsageError("--undefine-source undefines the source at the end and there is no one to ask: add -y",
                         guest=guest)
    pool = inv.session.fleet.hosts
    if pool is None or not pool.hosts:
        raise ConfigError("static-migrate needs the destination in the config: add a [hosts.NAME] table")
    req = LibvirtSaveRequest(guest, str(f["to_host"]), dest_dir=str(f["dir"]) if f.get("dir") else None,
                             new_name=str(f["name"]) if f.get("name") else None, paused=bool(f.get("paused")),
                             undefine_source=bool(f.get("undefine_source")), dry_run=bool(f.get("dry_run")))
    plan, r = await migrate_libvirt_static(inv.session.fleet, pool, req, confirm=inv.confirm,
                                           progress=lambda m: inv.session.progress(guest, m))
    files = ", ".join(f"{os.path.basename(i.dest)} ({human_bytes(i.size)})" for i in plan.files)
    if r is None:
        lines = [f"dry run: libvirt would save {plan.domain} to {plan.save_source}, kvmshell would copy it with "
                 f"{files} to {plan.dest_dir} on {req.to}, and libvirt there would "
                 + ("define and " if plan.persistent else "") + f"restore it ({plan.dest_uri}); nothing was done",
                 f"the XML {'defined' if plan.persistent else 'restored'} on {req.to}:", plan.xml]
        return Text("\n".join(lines), data={"message": lines[0], "guest": guest, "domain": plan.domain,
                                            "host": req.to, "uri": plan.dest_uri, "xml": plan.xml,
                                            "images": [{"source": i.source, "dest": i.dest, "size_bytes": i.size}
                                                       for i in plan.files]})
    t = r.times
    title = f"{guest} moved to {req.to} through libvirt's save image" + (f", attached as {r.new_name}"
                                                                          if r.new_name else "")
    items: list[tuple[str, object]] = [
        ("domain", f"{r.domain} on {req.to} ({plan.dest_uri}): {r.dest_state}"),
        ("images", f"{files}, and the save image, in {r.dest_dir}"),
        ("copied", f"{human_bytes(r.copied_bytes)} in {t.get('copy', 0):.1f} s"),
        ("times", ", ".join(f"{k} {v:.1f} s" for k, v in t.items())),
        ("source", r.source_state), *(("note", n) for n in r.notes)]
    data = {"message": title, "guest": guest, "domain": r.domain, "destination": r.new_name, "host": req.to,
            "copied_bytes": r.copied_bytes, "times": {f"{k}_s": v for k, v in t.items()},
            "copy_state": r.dest_state, "source_state": r.source_state, "xml": r.xml, "notes": list(r.notes)}
    return KeyValues(tuple(items), title=title, data=data)


def _report(r: StaticResult, title: str) -> KeyValues:
    t = r.times
    items: list[tuple[str, object]] = [
        ("destination", f"{r.new_name} ({r.address})"),
        ("snapshot", r.tag),
        ("images", ", ".join(f"{os.path.basename(i.dest)} ({human_bytes(i.size)}, {i.outcome})" for i in r.files)),
        ("copied", f"{human_bytes(r.copied_bytes)} in {t.get('copy', 0):.1f} s"
                   + (f", {r.throughput / 1e6:.0f} MB/s" if r.throughput else "")),
        ("times", ", ".join(f"{k} {v:.1f} s" for k, v in t.items())),
        ("copy is", r.dest_state),
        ("source", r.source_state),
    ]
    if r.dest_state.startswith("not started"):
        items = [i for i in items if i[0] not in ("copied", "times")]
        items.append(("command", r.command))
    if not r.files or not any(i.outcome for i in r.files):
        items = [i for i in items if i[0] not in ("images", "copied")]
    items += [("note", n) for n in r.notes]
    data = {"message": title, "guest": r.guest, "destination": r.new_name, "host": r.host, "address": str(r.address),
            "snapshot": r.tag, "images": [{"source": i.source, "dest": i.dest, "format": i.format, "size_bytes": i.size,
                                           "outcome": i.outcome} for i in r.files],
            "copied_bytes": r.copied_bytes, "throughput_bytes_per_s": r.throughput,
            "times": {f"{k}_s": v for k, v in t.items()}, "copy_state": r.dest_state, "source_state": r.source_state,
            "command": r.command, "notes": list(r.notes)}
    return KeyValues(tuple(items), title=title, data=data)


async def loadvm_on_(inv: Invocation) -> Result:
    guest, host, tag = str(inv.values["guest"]), str(inv.values["host"]), str(inv.values["tag"])
    f = inv.flags
    pool = inv.session.fleet.hosts
    if pool is None or not pool.hosts:
        raise ConfigError("loadvm-on needs the host in the config: add a [hosts.NAME] table")
    req = StaticRequest(guest=guest, to=host, tag=tag, dest_dir=str(f["dir"]) if f.get("dir") else None,
                        paused=bool(f.get("paused")), new_name=str(f["name"]) if f.get("name") else None,
                        dry_run=bool(f.get("dry_run")))

    def progress(message: str) -> None:
        inv.session.progress(guest, message)

    r = await loadvm_on(inv.session.fleet, pool, req, progress=progress, edit=inv.edit if f.get("edit") else None)
    if req.dry_run:
        return _report(r, f"dry run: would start {r.new_name} on {host} from snapshot {tag!r}; nothing was done")
    return _report(r, f"started {r.new_name} on {host} from snapshot {tag!r}")


SPECS = (
    CommandSpec("static-migrate", "move a guest to another host: stop, savevm, copy its images, loadvm there",
                static_migrate, scope=Scope.SHELL,
                args=(Arg("guest", "the guest to move", complete=Completer.GUEST),),
                flags=(Flag(("--to", "--to-host"), "destination host ([hosts.NAME])", value="HOST",
                            complete=Completer.HOST),
                       Flag(("--tag",), "snapshot tag (default: static-YYYYmmdd-HHMMSS)", value="TAG",
                            complete=Completer.SNAPSHOT_TAG),
                       Flag(("--keep-source",), "leave the source paused instead of quitting it"),
                       Flag(("--dir",), "image directory on the destination (default /var/lib/kvmshell/images/NAME)",
                            value="DIR"),
                       Flag(("--name",), "the copy's guest name in kvmshell (default GUEST.HOST)", value="NAME"),
                       Flag(("--paused",), "start the copy paused (-S): check it before `cont`"),
                       Flag(("--edit",), "open the copy's command line in $EDITOR before anything is done"),
                       Flag(("--dry-run",), "preflight and show the copy's command line; do nothing"),
                       Flag(("--undefine-source",), "libvirt guest: undefine the source domain at the end (default: "
                            "it stays defined, shut off)"),
                       Flag(("-y", "--yes"), "do not ask before quitting the source")),
                maps_to="stop, savevm TAG; copy over SSH checked by b2sum; QEMU -loadvm TAG -daemonize on HOST; quit. "
                        "A libvirt guest: virDomainSaveFlags; the disks and the save image copied the same way; "
                        "virDomainDefineXML and virDomainRestoreFlags (paths rewritten) on HOST's libvirt",
                details="Preflight checks the host, the images and their backing chain, free space and the name "
                        "first. Any failure before the source is quit puts it back (snapshot deleted, resumed) and "
                        "says what was done and undone; copied files stay and a new run continues from them. A libvirt "
                        "guest's source stays defined and shut off (restored and running if anything fails), "
                        "nothing is left on the destination after a failure, and --dry-run shows the XML.",
                category="migration"),
    CommandSpec("loadvm-on", "start a copy of a guest on HOST from its images there that hold TAG (-loadvm)",
                loadvm_on_, scope=Scope.SHELL,
                args=(Arg("host", "a [hosts.NAME] of the config", complete=Completer.HOST),
                      Arg("guest", "the attached guest whose command line the copy uses", complete=Completer.GUEST),
                      Arg("tag", "the snapshot the images on HOST hold")),
                flags=(Flag(("--dir",), "where the images are on HOST (default /var/lib/kvmshell/images/NAME)",
                            value="DIR"),
                       Flag(("--name",), "the copy's guest name in kvmshell (default GUEST.HOST)", value="NAME"),
                       Flag(("--paused",), "start the copy paused (-S)"),
                       Flag(("--edit",), "open the copy's command line in $EDITOR before anything is done"),
                       Flag(("--dry-run",), "preflight and show the copy's command line; do nothing")),
                maps_to="qemu-img info (the tag); QEMU -loadvm TAG -daemonize on HOST",
                details="The images are found in DIR by the names static-migrate gives them; the guest itself "
                        "is not touched (it must be attached: its command line is the template).",
                category="migration"),
)
