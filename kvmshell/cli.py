"""The `kvmshell` command: options, inventory, and errors turned into one line and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from kvmshell import __version__
from kvmshell.config import Config, load_config
from kvmshell.core.address import Address, parse_guest_option
from kvmshell.core.fleet import Fleet, GuestState
from kvmshell.errors import ConfigError, KvmError
from kvmshell.logsetup import setup_logging


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1          # a command failed or a guest is unreachable
    USAGE = 2           # bad options, address or config
    INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise ConfigError(f"{message} (see `kvmshell --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmshell", description="Shell and dashboard over the monitors of many QEMU/KVM guests.")
    p.add_argument("--version", action="version", version=f"kvmshell {__version__}")
    p.add_argument("--config", metavar="FILE", help="inventory file (default: $KVMSHELL_CONFIG or "
                   "$XDG_CONFIG_HOME/kvmshell/config.toml)")
    p.add_argument("--guest", "-g", action="append", default=[], metavar="NAME=ADDR",
                   help="attach a guest, e.g. vm1=qmp:unix:/run/vm1.qmp or vm2=hmp:pty:/dev/pts/3 (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--connect-timeout", type=float, metavar="SEC", help="per-guest connect timeout")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("guests", help="list the guests with their state")
    demo = sub.add_parser("demo", help="start local demo guests and attach to them")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--no-ui", action="store_true", help="start the guests, print their addresses, wait for Ctrl-C")
    return p


def inventory(args: argparse.Namespace, config: Config) -> dict[str, Address]:
    guests: dict[str, Address] = {name: g.address for name, g in config.guests.items()}
    for opt in args.guest:
        name, address = parse_guest_option(opt)
        if name in guests:
            raise ConfigError(f"--guest {opt!r}: guest {name!r} is already defined"
                              + (f" in {config.path}" if name in config.guests else ""))
        guests[name] = address
    return guests


def make_fleet(guests: dict[str, Address], config: Config, args: argparse.Namespace, **kw: object) -> Fleet:
    fleet = Fleet(timeout=config.defaults.timeout,
                  connect_timeout=args.connect_timeout or config.defaults.connect_timeout, **kw)  # type: ignore[arg-type]
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
                try:
                    status = str(await g.monitor.status())
                except KvmError as e:
                    status, g.reason = "error", e.message
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
    return Exit.FAILED if bad else Exit.OK


async def cmd_demo(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.lab.demo import run_demo
    return Exit(await run_demo(out))


async def run(argv: Sequence[str], out: TextIO, err: TextIO) -> Exit:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    if args.command == "guests":
        return await cmd_guests(args, config, out, err)
    if args.command == "demo":
        return await cmd_demo(args, config, out, err)
    build_parser().print_help(out)
    return Exit.USAGE


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(asyncio.run(run(argv, sys.stdout, sys.stderr)))
    except ConfigError as e:
        sys.stderr.write(f"kvmshell: {e}\n")
        return Exit.USAGE
    except KvmError as e:
        sys.stderr.write(f"kvmshell: {e}\n")
        return Exit.FAILED
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
