"""`kvmshell guests` and `kvmshell hosts`: the inventory, what answers, as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from kvmshell.cli.common import Exit
from kvmshell.config import Config
from kvmshell.core.commands.builtin import guest_status
from kvmshell.core.monitor.fleet import Fleet, GuestState
from kvmshell.core.values.address import Address, Kind, SshTarget, parse_guest_option
from kvmshell.errors import ConfigError, KvmError

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool


def inventory(args: argparse.Namespace, config: Config) -> dict[str, Address]:
    guests: dict[str, Address] = {name: g.address for name, g in config.guests.items()}
    for opt in args.guest:
        name, address = parse_guest_option(opt)
        if name in guests:
            raise ConfigError(f"--guest {opt!r}: guest {name!r} is already defined"
                              + (f" in {config.path}" if name in config.guests else ""))
        guests[name] = address
    return guests


def make_host_pool(config: Config, args: argparse.Namespace) -> HostPool:
    """The SSH hosts of the config; a password is asked on the terminal, if there is one."""
    from kvmshell.core.hosts.pool import HostPool, terminal_password_prompt
    return HostPool.from_config(config, connect_timeout=args.connect_timeout or config.defaults.connect_timeout,
                                password_prompt=terminal_password_prompt if sys.stdin.isatty() else None)


def make_fleet(guests: dict[str, Address], config: Config, args: argparse.Namespace, **kw: object) -> Fleet:
    fleet = Fleet(timeout=config.defaults.timeout,
                  connect_timeout=args.connect_timeout or config.defaults.connect_timeout,
                  hosts=make_host_pool(config, args), **kw)  # type: ignore[arg-type]
    for name, address in guests.items():
        fleet.add(name, address)
    return fleet


async def cmd_guests(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    guests = inventory(args, config)
    if not guests:
        raise ConfigError("no guests: give --guest NAME=ADDR or list them in the config file")
    async with make_fleet(guests, config, args, reconnect=False) as fleet:
        await fleet.start()
        rows = []
        for g in fleet:
            status = version = ""
            if g.state is GuestState.CONNECTED and g.monitor is not None:
                status = await guest_status(g.monitor, followed=False)
                if status.startswith("error: "):
                    status, g.reason = "error", status.removeprefix("error: ")
                version = str(g.version or "")
            rows.append({"name": g.name, "address": str(g.address), "protocol": g.address.protocol.value,
                         "status": status or "unreachable", "version": version,
                         "reason": g.reason if status in ("", "error") else None})
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        table = [("NAME", "ADDRESS", "PROTO", "STATUS", "QEMU")] + [
            (r["name"], r["address"], r["protocol"], r["status"] if not r["reason"] else f"unreachable: {r['reason']}",
             r["version"]) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            out.write("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] + "\n")
    bad = [r for r in rows if r["reason"]]
    for r in bad:
        err.write(f"kvmshell: {r['name']}: {r['reason']}\n")
    warn_exposed(guests, err)
    return Exit.FAILED if bad else Exit.OK


def warn_exposed(guests: dict[str, Address], err: TextIO) -> None:
    """One line per guest whose monitor listens on TCP beyond loopback (no authentication there)."""
    for name, address in guests.items():
        exposed = address.exposure()
        if exposed:
            err.write(f"kvmshell: warning: {name}: {exposed}\n")


def libvirt_uris(args: argparse.Namespace, config: Config) -> list[str | None]:
    """The libvirt connections to list: [hosts.X] libvirt, and those of the libvirt guests (None: the
    default connection)."""
    uris: dict[str | None, None] = {h.libvirt: None for h in config.hosts.values() if h.libvirt}
    for address in inventory(args, config).values():
        if address.kind is Kind.DOMAIN:
            uris.setdefault(address.uri)
    return list(uris)


async def libvirt_report(uri: str | None) -> dict[str, Any]:
    """The domains on one libvirt connection (name, state, UUID, persistent), or why not."""
    from kvmshell.core.monitor.libvirtconn import default_uri, list_domains
    try:
        domains = await asyncio.wait_for(asyncio.to_thread(list_domains, uri), 30)
    except KvmError as e:
        return {"libvirt": uri or default_uri(), "reachable": False, "reason": e.message, "domains": []}
    except TimeoutError:
        return {"libvirt": uri or default_uri(), "reachable": False, "reason": "libvirt did not answer within 30 s",
                "domains": []}
    return {"libvirt": uri or default_uri(), "reachable": True, "reason": None, "domains": domains}


def write_libvirt(reports: list[dict[str, Any]], out: TextIO) -> None:
    for r in reports:
        if not r["reachable"]:
            out.write(f"\nlibvirt {r['libvirt']}: unreachable: {r['reason']}\n")
            continue
        out.write(f"\nlibvirt {r['libvirt']} (attach with --guest NAME=ADDRESS):\n")
        rows = [("NAME", "STATE", "UUID", "KIND", "ADDRESS")] + [
            (d["name"], d["state"], d["uuid"], "persistent" if d["persistent"] else "transient", d["address"])
            for d in r["domains"]]
        if len(rows) == 1:
            out.write("  (no domains)\n")
            continue
        w = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            out.write("  " + "  ".join(c.ljust(n) for c, n in zip(row[:4], w)) + "  " + row[4] + "\n")


async def cmd_hosts(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.core.hosts.processes import survey
    uris = libvirt_uris(args, config)
    async with make_host_pool(config, args) as pool:
        targets: dict[object, str | SshTarget] = {pool.key(name): name for name in config.hosts}
        for address in inventory(args, config).values():
            if address.ssh is not None:
                targets.setdefault(pool.key(address.ssh), address.ssh)
        if not targets and not uris:
            raise ConfigError("no hosts: add [hosts.NAME] tables (ssh = \"USER@HOST[:PORT]\") to the config, or give "
                              "--guest NAME=ssh://USER@HOST/PROTO:KIND:TARGET or --guest NAME=libvirt:URI#DOMAIN")
        reports = await asyncio.gather(*(survey(pool, t) for t in targets.values()))
        libvirts = list(await asyncio.gather(*(libvirt_report(u) for u in uris)))
    if args.json:
        json.dump([r.as_dict() for r in reports] + libvirts, out, indent=2)
        out.write("\n")
    elif reports:
        table = [("HOST", "SSH", "STATUS", "QEMU", "GUESTS")] + [
            (r.name, r.ssh, "reachable" if r.reachable and not r.reason else
             f"unreachable: {r.reason}" if not r.reachable else f"error: {r.reason}",
             str(r.qemu) if r.qemu else (r.qemu_note or "-") if r.reachable and not r.reason else "",
             str(len(r.guests)) if r.reachable and not r.reason else "") for r in reports]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            out.write("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] + "\n")
        for r in reports:
            if r.guests:
                out.write(f"\non {r.name} (attach with --guest NAME=MONITOR):\n")
                rows = [("NAME", "PID", "MONITOR")] + [(g.name, str(g.pid), str(g.monitor)) for g in r.guests]
                w = [max(len(row[i]) for row in rows) for i in range(2)]
                for row in rows:
                    out.write(f"  {row[0].ljust(w[0])}  {row[1].ljust(w[1])}  {row[2]}\n")
    if not args.json:
        write_libvirt(libvirts, out)
    bad = [r for r in reports if r.reason]
    for r in bad:
        err.write(f"kvmshell: {r.name}: {r.reason}\n")
    for lv in libvirts:
        if lv["reason"]:
            err.write(f"kvmshell: {lv['reason']}\n")
    return Exit.FAILED if bad or any(lv["reason"] for lv in libvirts) else Exit.OK
