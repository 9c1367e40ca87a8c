"""The `kvmshell` command: options, inventory, and errors turned into one line and an exit status.

The composition root, the top tier: it may import every other part of kvmshell. Its modules:
``common`` (exit statuses), ``inventory`` (`guests`, `hosts`), ``lines`` (`-c`, `run`, stdin),
``faces`` (`shell`, `tui`), ``completion`` (`completion bash|zsh`), ``configinit`` (`config init`),
``helptext`` (the examples of --help), ``manpage`` (`man`); this module parses the options and dispatches."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from kvmshell import __version__
from kvmshell.cli import completion, configinit, manpage
from kvmshell.cli.common import Exit
from kvmshell.cli.faces import cmd_shell, cmd_tui
from kvmshell.cli.helptext import add_examples
from kvmshell.cli.inventory import cmd_guests, cmd_hosts
from kvmshell.cli.lines import cmd_lines
from kvmshell.config import Config, load_config
from kvmshell.core.migration.live.strategies import offered
from kvmshell.errors import ConfigError, KvmError
from kvmshell.logsetup import setup_logging


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
    p.add_argument("--detach", action="store_true", help="with -c/run: do not wait for the migrations the lines "
                   "start; leave them to QEMU (kvmshell's steering and stall watchdog stop)")
    p.epilog, p.formatter_class = Exit.help(), argparse.RawDescriptionHelpFormatter
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
    rep = sub.add_parser("report", help="summarize a migration (an ID of `kvmshell history`, or a --trace FILE) "
                         "and plot it as SVG")
    rep.add_argument("trace", metavar="ID|FILE")
    rep.add_argument("--svg", metavar="OUT", help="where to write the plot (default: the trace with .svg)")
    sub.add_parser("history", help="the migrations kvmshell ran (the last 200): guest, from, to, strategy, outcome, "
                   "time, downtime, bytes")
    demo = sub.add_parser("demo", help="start local demo guests and attach to them")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--shell", action="store_true", help="open the prompt on them instead of the dashboard")
    mode.add_argument("--no-ui", action="store_true", help="start the guests, print their addresses, wait for Ctrl-C")
    configinit.add_parsers(sub)
    manpage.add_parsers(sub)
    completion.add_parsers(sub)             # last: its hidden `_names` ends the list of choices
    return add_examples(p)


def read_script(name: str) -> list[str]:
    """The lines of FILE ('-': stdin); a file that is not UTF-8 is refused whole, before any line runs."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ConfigError(f"run {name}: {e.strerror}") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"run {name}: line {line} is not UTF-8 text (byte {data[e.start]:#04x}); "
                          "nothing was run") from None


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

    from kvmshell.core.migration.model.report import (
        summarize,
        summary_json,
        summary_table,
        write_report,
    )
    from kvmshell.core.migration.model.samples import load_trace
    from kvmshell.cli.history import static_summary, trace_file
    path = trace_file(args.trace)
    try:
        trace = load_trace(path)
    except OSError as e:
        raise ConfigError(f"report {args.trace}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"report: {e}") from None
    summary = static_summary(trace, summarize(trace))
    svg = Path(args.svg) if args.svg else path.with_suffix(".svg")
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
    if args.command == "completion":        # these need no config that loads
        return completion.cmd_completion(build_parser(), args.shell, out)
    if args.command == "config":
        return configinit.cmd_config(args, out)
    if args.command == "man":
        return manpage.cmd_man(build_parser(), out)
    if args.command == "_names":
        return completion.cmd_names(load_config(args.config, strategies=offered()), args.kind, out)
    config = load_config(args.config, strategies=offered())
    if args.command == "guests":
        return await cmd_guests(args, config, out, err)
    if args.command == "hosts":
        return await cmd_hosts(args, config, out, err)
    if args.command == "demo":
        return await cmd_demo(args, config, out, err)
    if args.command == "report":
        return cmd_report(args, out)
    if args.command == "history":
        from kvmshell.cli.history import cmd_history
        return cmd_history(args, out)
    if args.command == "tls-init":
        from kvmshell.core.migration.tls import init_ca
        try:
            dirs = init_ca(args.dir, args.hosts)
            for d in dirs if not args.json else ():
                out.write(f"{d}: ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem (keys 0600)\n")
            if args.json:
                out.write(json.dumps([str(d) for d in dirs]) + "\n")
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
