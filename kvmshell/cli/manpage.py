"""`kvmshell man`: the manual page, made from the argument parser and the examples of helptext.

So the page has every option and subcommand the parser has, with the help the parser shows:
`kvmshell man | man -l -`, or `kvmshell man > ~/.local/share/man/man1/kvmshell.1`.
"""

from __future__ import annotations

import argparse
import re
from typing import TextIO

from kvmshell import __version__
from kvmshell.cli.common import Exit
from kvmshell.cli.helptext import EXAMPLES, MAIN, notes


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("man", help="print the manual page (kvmshell man | man -l -)")


def roff(text: str) -> str:
    """``text`` as roff text: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def public_subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand --help lists, in its order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._get_subactions():
                found.append((choice.dest, choice.help or "", action.choices[choice.dest]))
    return found


def options(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._SubParsersAction,
                                                                   argparse._HelpAction)):
            continue
        invocation = formatter._format_action_invocation(action)
        lines += [".TP", f".B {roff(invocation)}", roff(formatter._expand_help(action) if action.help else "")]
    return lines


def examples(pairs: list[tuple[str, str]]) -> list[str]:
    lines = [".PP", "Examples:", ".RS"]
    for command, what in pairs:
        lines += [".TP", f".B {roff(command)}", roff(what)]
    return [*lines, ".RE"]


def manpage(parser: argparse.ArgumentParser) -> str:
    lines = [f'.TH KVMSHELL 1 "" "kvmshell {__version__}" "User Commands"',
             ".SH NAME", f"kvmshell \\- {roff(parser.description or '')}",
             ".SH SYNOPSIS", roff(" ".join(parser.format_usage().removeprefix("usage: ").split())),
             ".SH OPTIONS", *options(parser),
             ".SH COMMANDS"]
    for name, what, sub in public_subcommands(parser):
        usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        lines += [f'.SS "{roff(name)}"', roff(what[:1].upper() + what[1:] + "."), ".PP", f".B {roff(usage)}"]
        lines += options(sub)
        if name in EXAMPLES:
            lines += examples(EXAMPLES[name])
    lines += [".SH EXAMPLES", *examples(MAIN)[3:-1],
              ".SH EXIT STATUS AND FILES", roff(notes()).replace("\n", "\n.br\n"),
              ".PP", ("The config: \\fB\\-\\-config\\fR FILE, else $KVMSHELL_CONFIG, else "
                      "$XDG_CONFIG_HOME/kvmshell/config.toml (\\fBkvmshell config init\\fR writes a commented one)."),
              ".SH SEE ALSO", "qemu\\-system\\-x86_64(1), the README of kvmshell"]
    return "\n".join(lines) + "\n"


def cmd_man(parser: argparse.ArgumentParser, out: TextIO) -> Exit:
    out.write(manpage(parser))
    return Exit.OK
