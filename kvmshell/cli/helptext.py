"""The examples at the end of `kvmshell --help` and of each `kvmshell COMMAND --help`.

Kept apart from the parser so that options and examples can change apart; `add_examples` puts them
on the parser once it is built, and a subcommand without examples here gets none (a test says so).
"""

from __future__ import annotations

import argparse
import textwrap

from kvmshell.cli.common import Exit
from kvmshell.logsetup import BACKUPS, MAX_BYTES

MAIN = [
    ("kvmshell --guest vm1=qmp:unix:/run/vm1.qmp guests", "list a guest with its state"),
    ("kvmshell shell", "the prompt, on the guests of the config"),
    ("kvmshell -c '@vm1 info status' -c '@all savevm nightly'", "run lines and exit (0: all succeeded)"),
    ("kvmshell --json -c 'info migrate'", "one JSON object per line"),
    ("kvmshell config init", "write a commented config file to start from"),
    ("source <(kvmshell completion bash)", "complete kvmshell's command line (zsh: completion -h)"),
]

MEANINGS = {Exit.OK: "success", Exit.FAILED: "a command failed or a guest is unreachable",
            Exit.USAGE: "bad options, address or config", Exit.INTERRUPTED: "interrupted"}


def notes() -> str:
    """The exit statuses (every one of common.Exit) and where the log is."""
    statuses = ", ".join(f"{e.value} {MEANINGS.get(e, e.name.lower().replace('_', ' '))}" for e in Exit)
    return (textwrap.fill(f"exit status: {statuses}.", 100) + "\nlog: $XDG_STATE_HOME/kvmshell/kvmshell.log "
            f"(rotated at {MAX_BYTES // 2**20} MB, {BACKUPS} old files kept)")

EXAMPLES: dict[str, list[tuple[str, str]]] = {   # subcommand: (command line, what it does)
    "guests": [
        ('kvmshell guests', 'the guests of the config, with their state'),
        ('kvmshell --guest vm1=qmp:unix:/run/vm1.qmp guests', 'one guest given on the command line'),
        ('kvmshell --json guests', 'the same as one JSON document'),
    ],
    "hosts": [
        ('kvmshell hosts', 'each [hosts.NAME]: reachable?, QEMU version, the guests found there'),
        ('kvmshell --json hosts', 'the same as one JSON document'),
    ],
    "shell": [
        ('kvmshell shell', 'the prompt on the guests of the config'),
        ('kvmshell -g vm1=hmp:pty:/dev/pts/3 shell', 'on one more guest, reached by its pty'),
    ],
    "tui": [
        ('kvmshell tui', 'the dashboard on the guests of the config'),
        ('kvmshell --config lab.toml tui', 'on the guests of another config file'),
    ],
    "run": [
        ('kvmshell run nightly.kvm', "one command line per line, '#' comments"),
        ('kvmshell --keep-going run nightly.kvm', 'go on after a failed line'),
        ("echo '@all info status' | kvmshell run -", 'lines from stdin'),
    ],
    "tls-init": [
        ('kvmshell tls-init pki host1 host2', 'a CA, and certificates for migrate --tls between host1 and host2'),
    ],
    "report": [
        ('kvmshell report /tmp/m.trace', 'summary table, plot in /tmp/m.svg'),
        ('kvmshell report /tmp/m.trace --svg plot.svg', 'the plot elsewhere'),
        ('kvmshell --json report /tmp/m.trace', 'the summary as one JSON document'),
    ],
    "demo": [
        ('kvmshell demo', 'local demo guests in the dashboard'),
        ('kvmshell demo --shell', 'the same guests at the prompt'),
        ('kvmshell demo --no-ui', 'start them, print their addresses, wait for Ctrl-C'),
    ],
    "completion": [
        ('source <(kvmshell completion bash)', 'bash: in ~/.bashrc'),
        ('kvmshell completion zsh > ~/.zfunc/_kvmshell', 'zsh: with fpath=(~/.zfunc $fpath) before compinit'),
        ('eval "$(kvmshell completion zsh)"', 'or in ~/.zshrc, after compinit'),
    ],
    "config": [
        ('kvmshell config init', 'write $XDG_CONFIG_HOME/kvmshell/config.toml'),
        ('kvmshell --config lab.toml config init', 'write lab.toml (never over an existing file)'),
    ],
    "man": [
        ('kvmshell man | man -l -', 'read it'),
        ('kvmshell man > ~/.local/share/man/man1/kvmshell.1', 'install it for `man kvmshell`'),
    ],
    "history": [
        ('kvmshell history', 'the migrations kvmshell ran, newest last'),
        ('kvmshell --json history', 'the same as JSON'),
    ],
}


def examples(pairs: list[tuple[str, str]]) -> str:
    """An ``examples:`` section: each command line, and what it does two spaces or more to its right
    (on the next line if the command is long)."""
    width = max((len(c) for c, _ in pairs if len(c) <= 50), default=0)
    lines = ["examples:"]
    for command, what in pairs:
        if len(command) <= 50:
            lines.append(f"  {command.ljust(width)}  {what}")
        else:
            lines += [f"  {command}", f"  {'':{width}}  {what}"]
    return "\n".join(lines)


def add_examples(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Put the examples on ``parser`` and its subcommands, with their line breaks kept."""
    parser.epilog = examples(MAIN) + "\n\n" + notes()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                if name in EXAMPLES:
                    subparser.epilog = examples(EXAMPLES[name])
                    subparser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
