"""The `kvmshell` command: options, inventory, and errors turned into one line and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from kvmshell import __version__
from kvmshell.config import Config, load_config
from kvmshell.core.values.address import Address, SshTarget, parse_guest_option
from kvmshell.core.values.models import MigrationStatus
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.migration.live.strategies import offered
from kvmshell.core.monitor.fleet import Fleet, GuestState
from kvmshell.core.commands.session import Session
from kvmshell.errors import ConfigError, KvmError
from kvmshell.logsetup import setup_logging

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool


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
    p.add_argument("-y", "--yes", action="store_true", help="confirm destructive commands without asking")
    p.add_argument("-c", dest="lines", action="append", default=[], metavar="LINE",
                   help="run one command line and exit (repeatable)")
    p.add_argument("--keep-going", action="store_true", help="with -c/run: go on after a failed line")
    p.add_argument("--connect-timeout", type=float, metavar="SEC", help="per-guest connect timeout")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("guests", help="list the guests with their state")
    sub.add_parser("hosts", help="list the SSH hosts: reachable?, QEMU version, the QEMU guests found there")
    sub.add_parser("shell", help="the interactive prompt (default on a terminal)")
    sub.add_parser("tui", help="the dashboard")
    run_p = sub.add_parser("run", help="run monitor command lines from FILE ('-' for stdin)")
    run_p.add_argument("file", metavar="FILE")
    tls = sub.add_parser("tls-init", help="create a CA and TLS certificates for migration between HOSTs")
    tls.add_argument("dir", metavar="DIR")
    tls.add_argument("hosts", metavar="HOST", nargs="+", help="host names or addresses, as the source will "
                     "name the destination (tls-hostname)")
    rep = sub.add_parser("report", help="summarize a migration trace (from --trace) and plot it as SVG")
    rep.add_argument("trace", metavar="TRACE")
    rep.add_argument("--svg", metavar="OUT", help="where to write the plot (default: TRACE with .svg)")
    demo = sub.add_parser("demo", help="start local demo guests and attach to them")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--shell", action="store_true", help="open the prompt on them instead of the dashboard")
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
    warn_exposed(guests, err)
    return Exit.FAILED if bad else Exit.OK


def warn_exposed(guests: dict[str, Address], err: TextIO) -> None:
    """One line per guest whose monitor listens on TCP beyond loopback (no authentication there)."""
    for name, address in guests.items():
        exposed = address.exposure()
        if exposed:
            err.write(f"kvmshell: warning: {name}: {exposed}\n")


async def cmd_hosts(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.core.hosts.processes import survey
    async with make_host_pool(config, args) as pool:
        targets: dict[object, str | SshTarget] = {pool.key(name): name for name in config.hosts}
        for address in inventory(args, config).values():
            if address.ssh is not None:
                targets.setdefault(pool.key(address.ssh), address.ssh)
        if not targets:
            raise ConfigError("no hosts: add [hosts.NAME] tables (ssh = \"USER@HOST[:PORT]\") to the config, or give "
                              "--guest NAME=ssh://USER@HOST/PROTO:KIND:TARGET")
        reports = await asyncio.gather(*(survey(pool, t) for t in targets.values()))
    if args.json:
        json.dump([r.as_dict() for r in reports], out, indent=2)
        out.write("\n")
    else:
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
    bad = [r for r in reports if r.reason]
    for r in bad:
        err.write(f"kvmshell: {r.name}: {r.reason}\n")
    return Exit.FAILED if bad else Exit.OK


async def open_session(args: argparse.Namespace, config: Config, err: TextIO, *, interactive: bool) -> Session:
    guests = inventory(args, config)
    warn_exposed(guests, err)
    fleet = make_fleet(guests, config, args)
    await fleet.start()
    if fleet.hosts is not None:
        fleet.hosts.password_prompt = None      # asked before the UI starts, never under it
    for g in fleet:
        if g.state is not GuestState.CONNECTED:
            err.write(f"kvmshell: {g.name}: {g.reason} (retrying in the background)\n" if interactive
                      else f"kvmshell: {g.name}: {g.reason}\n")
    current = fleet.names[0] if len(fleet) == 1 else None
    return Session(fleet, default_registry(), config, assume_yes=args.yes, current=current)


async def close_session(session: Session) -> None:
    await session.aclose()
    await session.fleet.aclose()


async def cmd_shell(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.config import state_dir
    from kvmshell.shell.app import Shell, history_file
    session = await open_session(args, config, err, interactive=True)
    try:
        await session.data.refresh_all()
        return Exit(await Shell(session, history=history_file(state_dir()), json_output=args.json).run())
    finally:
        await close_session(session)


async def cmd_tui(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO, hint: str | None = None,
                  select: str | None = None) -> Exit:
    from kvmshell.tui.app import run_tui
    session = await open_session(args, config, err, interactive=True)
    if select is not None:
        session.current = select
    try:
        await session.data.refresh_all()
        return Exit(await run_tui(session, hint=hint))
    finally:
        await close_session(session)


async def run_lines(session: Session, lines: Sequence[str], args: argparse.Namespace, out: TextIO,
                    err: TextIO, source: str) -> Exit:
    """Non-interactive: run each line, print its outcomes, stop at the first failure unless --keep-going."""
    from kvmshell.core.commands.results import Watch
    from kvmshell.shell.render import outcome_lines, outcomes_json
    status = Exit.OK
    if source == "-c" and sys.stdin.isatty() and sys.stdout.isatty() and session.editor is None:
        from kvmshell.core.commands.editor import edit_text

        async def edit(text: str) -> str:
            return await asyncio.to_thread(edit_text, text)
        session.editor = edit              # `-c "static-migrate ... --edit"` from a terminal
    for number, line in enumerate(lines, 1):
        outcomes = await session.run_line(line)
        if not outcomes:
            continue
        for o in outcomes:
            if o.ok and isinstance(o.result, Watch):
                outcomes = await _watch_plain(session, o.result.line, o.result.interval, o.guest, out)
        if args.json:
            out.write(outcomes_json(outcomes) + "\n")
        else:
            grouped = len(outcomes) > 1
            for style, text in outcome_lines([o for o in outcomes if o.ok], grouped):
                out.write(text + "\n")
        failed = [o for o in outcomes if not o.ok]
        for o in failed:
            where = f"{o.guest}: " if o.guest else ""
            loc = f"{source}:{number}: " if source != "-c" else ""
            err.write(f"kvmshell: {loc}{where}{o.error}\n")
        out.flush()
        if failed:
            status = Exit.FAILED
            if not args.keep_going:
                break
    return status


async def _watch_plain(session: Session, line: str, interval: float, guest: str | None, out: TextIO) -> list:
    """Without a prompt: print the watched output until the migration ends (or Ctrl-C)."""
    from kvmshell.shell.render import outcome_lines
    target_line = f"@{guest} {line}" if guest else line
    while True:
        outcomes = await session.run_line(target_line)
        out.write(f"--- {time.strftime('%H:%M:%S')}\n")
        for _, text in outcome_lines(outcomes, len(outcomes) > 1):
            out.write(text + "\n")
        out.flush()
        if not all(o.ok for o in outcomes) or not any([await _under_way(session, o.guest) for o in outcomes]):
            return []
        await asyncio.sleep(interval)


async def _under_way(session: Session, guest: str | None) -> bool:
    """The guest's migration goes on by itself: kvmshell still follows it, or QEMU still moves it (a
    postcopy paused waits for the user, and is not watched further)."""
    if guest is None:
        return False
    if session.running_job(guest) is not None:
        return True
    try:
        status = (await session.fleet.monitor(guest).migration()).status
    except KvmError:
        return False
    return status.is_active and status is not MigrationStatus.POSTCOPY_PAUSED


async def cmd_lines(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO,
                    lines: Sequence[str], source: str) -> Exit:
    session = await open_session(args, config, err, interactive=False)
    try:
        return await run_lines(session, lines, args, out, err, source)
    finally:
        await close_session(session)


def read_script(name: str) -> list[str]:
    if name == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(name, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"run {name}: {e.strerror}") from None


async def cmd_demo(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> Exit:
    from kvmshell.lab.demo import run_demo, start_demo_guests
    from kvmshell.lab.launcher import Lab
    if args.no_ui:
        return Exit(await run_demo(out))
    async with Lab() as lab:
        out.write("starting the demo guests...\n")
        out.flush()
        guests = await start_demo_guests(lab)
        for g in guests:
            args.guest.append(g.guest_option)
        if not args.shell:
            return await cmd_tui(args, config, out, err, hint="press m to migrate vm-src to vm-dst",
                                 select="vm-src")
        out.write("demo guests: " + ", ".join(g.name for g in guests) +
                  " - vm-src dirties memory, vm-dst waits with -incoming defer. Try `help`, `@all info status`, "
                  "`use vm-src`. `exit` stops the demo guests.\n")
        return await cmd_shell(args, config, out, err)


def cmd_report(args: argparse.Namespace, out: TextIO) -> Exit:
    from pathlib import Path

    from kvmshell.core.migration.model.report import summarize, summary_json, summary_table, write_report
    from kvmshell.core.migration.model.samples import load_trace
    try:
        trace = load_trace(args.trace)
    except OSError as e:
        raise ConfigError(f"report {args.trace}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"report: {e}") from None
    summary = summarize(trace)
    svg = Path(args.svg) if args.svg else Path(args.trace).with_suffix(".svg")
    try:
        write_report(trace, svg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"report: cannot write {svg}: {e.strerror}") from None
    if args.json:                           # one JSON document, nothing else on stdout
        json.dump(summary_json(summary) | {"plot_svg": str(svg)}, out, indent=2)
        out.write("\n")
        return Exit.OK
    rows = summary_table(summary)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k.ljust(width)}  {v}\n")
    out.write(f"plot: {svg}\n")
    return Exit.OK


async def run(argv: Sequence[str], out: TextIO, err: TextIO) -> Exit:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, strategies=offered())
    if args.command == "guests":
        return await cmd_guests(args, config, out, err)
    if args.command == "hosts":
        return await cmd_hosts(args, config, out, err)
    if args.command == "demo":
        return await cmd_demo(args, config, out, err)
    if args.command == "report":
        return cmd_report(args, out)
    if args.command == "tls-init":
        from kvmshell.core.migration.tls import init_ca
        try:
            for d in init_ca(args.dir, args.hosts):
                out.write(f"{d}: ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem (keys 0600)\n")
        except OSError as e:
            raise ConfigError(f"tls-init {args.dir}: {e.strerror}") from None
        return Exit.OK
    if args.lines:
        if args.command not in (None,):
            raise ConfigError(f"-c runs lines by itself; drop the {args.command!r} command")
        return await cmd_lines(args, config, out, err, args.lines, "-c")
    if args.command == "run":
        return await cmd_lines(args, config, out, err, read_script(args.file), args.file)
    if args.command == "tui":
        return await cmd_tui(args, config, out, err)
    if args.command == "shell" or (args.command is None and sys.stdin.isatty()):
        return await cmd_shell(args, config, out, err)
    if args.command is None:
        return await cmd_lines(args, config, out, err, read_script("-"), "stdin")
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
    except BrokenPipeError:                 # `kvmshell ... | head`: the reader has gone, say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return Exit.FAILED


if __name__ == "__main__":
    sys.exit(main())
