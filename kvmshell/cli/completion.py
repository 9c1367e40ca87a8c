"""Completion of the `kvmshell` command line in bash and zsh: `kvmshell completion bash|zsh`.

The script is generated from the argument parser by shtab, so every option and subcommand is in it
as soon as it is in the parser. Guest and host names are not known when the script is written: the
script asks `kvmshell [--config FILE] _names guests|hosts|@guests` (a hidden subcommand) at each TAB,
with the `--config` typed on the line, and completes nothing if that fails.
"""

from __future__ import annotations

import argparse
from typing import TextIO

import shtab

from kvmshell.cli.common import Exit
from kvmshell.config import Config

SHELLS = ("bash", "zsh")
KINDS = ("guests", "hosts", "@guests")

# one function per shell that runs the same kvmshell as the line being completed (with its --config)
PREAMBLE = {
    "bash": r'''
_kvmshell_names() {  # $1: guests | hosts | @guests, $2: the word being completed
  local prog=${COMP_WORDS[0]/#\~/$HOME} cfg=() i
  for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
    case ${COMP_WORDS[i]} in
      --config) cfg=(--config "${COMP_WORDS[i+1]/#\~/$HOME}") ;;
      --config=*) cfg=("${COMP_WORDS[i]/#--config=\~/--config=$HOME}") ;;
    esac
  done
  compgen -W "$("$prog" "${cfg[@]}" _names "$1" 2>/dev/null)" -- "$2"
}
_kvmshell_guests() { _kvmshell_names guests "$1"; }
_kvmshell_hosts() { _kvmshell_names hosts "$1"; }
_kvmshell_lines() { _kvmshell_names @guests "$1"; }
''',
    "zsh": r'''
_kvmshell_names() {  # the compadd options _arguments gives, then guests | hosts | @guests
  local -a line_words cfg names
  local i kind=${@[-1]}
  line_words=(${(z)BUFFER})
  i=${line_words[(I)--config]}
  (( i )) && cfg=(--config ${~line_words[i+1]})
  names=(${(f)"$(${~line_words[1]} $cfg _names $kind 2>/dev/null)"})
  compadd "${@[1,-2]}" -a names
}
''',
}

# what an argument completes to: `action.complete = GUESTS`
GUESTS = {"bash": "_kvmshell_guests", "zsh": "_kvmshell_names guests"}
HOSTS = {"bash": "_kvmshell_hosts", "zsh": "_kvmshell_names hosts"}
LINES = {"bash": "_kvmshell_lines", "zsh": "_kvmshell_names @guests"}   # `-c @NAME ...`


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    comp = sub.add_parser("completion", help="print the bash or zsh completion script for kvmshell")
    comp.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    names = sub.add_parser("_names")                        # no help: hidden from --help and completion
    names.add_argument("kind", choices=KINDS)


# what an argument completes to, by its metavar (so options added later complete alike)
BY_METAVAR = {"GUEST": GUESTS, "HOST": HOSTS, "LINE": LINES, "DIR": shtab.DIRECTORY,
              "FILE": shtab.FILE, "TRACE": shtab.FILE, "OUT": shtab.FILE}


def mark(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Tell shtab what each argument of ``parser`` and its subcommands completes to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                mark(subparser)
        elif isinstance(action.metavar, str) and action.metavar in BY_METAVAR:
            action.complete = BY_METAVAR[action.metavar]  # type: ignore[attr-defined]
    return parser


def cmd_completion(parser: argparse.ArgumentParser, shell: str, out: TextIO) -> Exit:
    out.write(shtab.complete(mark(parser), shell, preamble=PREAMBLE[shell]))
    return Exit.OK


def cmd_names(config: Config, kind: str, out: TextIO) -> Exit:
    """The names a completion script offers, one a line."""
    if kind == "hosts":
        names = list(config.hosts)
    else:
        names = list(config.guests)
        if kind == "@guests":
            names = ["@all", *("@" + n for n in names)]
    out.writelines(name + "\n" for name in names)
    return Exit.OK
