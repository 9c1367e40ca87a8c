"""Command specs and the one registry. A command is defined once here; the shell, the TUI command
bar, the palette, `help` and completion all read it.

A spec says: the name (``info migrate`` is a two-word name), its flags and positional arguments
(each with a value parser and a completer key), a summary, what QEMU call it maps to, and the
async handler. Handlers return results and never print.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmshell.errors import UsageError

if TYPE_CHECKING:
    from kvmshell.core.commands.results import Result
    from kvmshell.core.commands.session import Invocation


class Scope(enum.Enum):
    GUEST = "guest"      # runs on a target guest (or each, with @all)
    SHELL = "shell"      # runs in kvmshell itself (help, use, guests...)


class Completer(enum.Enum):
    """What an argument completes from (the completion engine maps each to live data)."""

    NONE = "none"
    GUEST = "guest"
    SNAPSHOT_TAG = "snapshot-tag"
    URI = "uri"
    PARAMETER = "parameter"
    PARAMETER_VALUE = "parameter-value"
    CAPABILITY = "capability"
    ON_OFF = "on-off"
    SIZE = "size"
    COMMAND = "command"
    HMP_COMMAND = "hmp-command"
    QMP_COMMAND = "qmp-command"
    STRATEGY = "strategy"
    HOST = "host"


@dataclass(frozen=True)
class Arg:
    name: str
    help: str
    parse: Callable[[str], Any] = str
    optional: bool = False
    rest: bool = False                   # takes the rest of the line verbatim
    complete: Completer = Completer.NONE


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]               # ("-d",) or ("--to",)
    help: str
    value: str | None = None             # metavar when the flag takes a value
    parse: Callable[[str], Any] = str
    complete: Completer = Completer.NONE
    repeat: bool = False                 # may be given more than once: the values form a list

    @property
    def key(self) -> str:
        return max(self.names, key=len).lstrip("-").replace("-", "_")


Handler = Callable[["Invocation"], Awaitable["Result"]]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    flags: tuple[Flag, ...] = ()
    scope: Scope = Scope.GUEST
    maps_to: str = ""                    # the QMP/HMP call(s) behind it, for `help CMD`
    details: str = ""
    aliases: tuple[str, ...] = ()
    category: str = "other"

    @property
    def usage(self) -> str:
        parts = [self.name]
        for f in self.flags:
            parts.append(f"[{f.names[0]}{' ' + f.value if f.value else ''}]{'...' if f.repeat else ''}")
        for a in self.args:
            parts.append(f"[{a.name.upper()}]" if a.optional else a.name.upper())
        return " ".join(parts)

    def flag(self, token: str) -> Flag | None:
        for f in self.flags:
            if token in f.names:
                return f
        return None


@dataclass(frozen=True)
class Parsed:
    """A command line checked against its spec: values are parsed, nothing has been sent."""

    spec: CommandSpec
    values: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    text: str = ""                       # the command's own text (without the @target)


def split_words(text: str) -> list[str]:
    """Words as HMP users expect: whitespace separated, quotes allowed."""
    try:
        return shlex.split(text, posix=True)
    except ValueError as e:
        raise UsageError(f"cannot split the line: {e} (unbalanced quote?)") from None


class Registry:
    def __init__(self, specs: Sequence[CommandSpec] = ()) -> None:
        self._specs: dict[str, CommandSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: CommandSpec) -> None:
        for name in (spec.name, *spec.aliases):
            if name in self._specs:
                raise ValueError(f"command {name!r} registered twice")
            self._specs[name] = spec

    def __iter__(self) -> Iterator[CommandSpec]:
        seen: set[str] = set()
        for spec in self._specs.values():
            if spec.name not in seen:
                seen.add(spec.name)
                yield spec

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def lookup(self, words: Sequence[str]) -> tuple[CommandSpec | None, int]:
        """The spec for the first one or two words (two-word names first); and how many words it took."""
        if len(words) >= 2 and (spec := self._specs.get(f"{words[0]} {words[1]}")):
            return spec, 2
        if words and (spec := self._specs.get(words[0])):
            return spec, 1
        return None, 0

    def subcommands(self, first: str) -> list[CommandSpec]:
        return [s for s in self if s.name.startswith(first + " ")]

    def parse(self, spec: CommandSpec, words: Sequence[str], raw_rest: str) -> Parsed:
        """Check ``words`` (after the command name) against ``spec``; ``raw_rest`` is the same text
        unsplit, for an argument that takes the rest of the line."""
        values: dict[str, Any] = {}
        flags: dict[str, Any] = {}
        positional: list[str] = []
        i = 0
        rest_arg = spec.args[-1] if spec.args and spec.args[-1].rest else None
        while i < len(words):
            w = words[i]
            f = spec.flag(w) if w.startswith("-") else None
            if f is not None:
                if f.value:
                    if i + 1 >= len(words):
                        raise UsageError(f"{w} needs a value ({f.value}); usage: {spec.usage}")
                    value = self._value(spec, f.parse, words[i + 1], f.names[0])
                    if f.repeat:
                        flags.setdefault(f.key, []).append(value)
                    elif f.key in flags:
                        raise UsageError(f"{w} given twice; usage: {spec.usage}")
                    else:
                        flags[f.key] = value
                    i += 2
                else:
                    flags[f.key] = True
                    i += 1
                continue
            if rest_arg is not None and len(positional) == len(spec.args) - 1:
                values[rest_arg.name] = _rest_after(raw_rest, words, i)
                i = len(words)
                break
            slots = len(spec.args) - (1 if rest_arg is not None else 0)
            if w.startswith("-") and len(w) > 1 and not _numeric(w) and len(positional) >= slots:
                raise UsageError(f"unknown option {w!r}; usage: {spec.usage}")
            positional.append(w)
            i += 1
        fixed = [a for a in spec.args if not a.rest] if rest_arg is not None else list(spec.args)
        if len(positional) > len(fixed):
            raise UsageError(f"too many arguments; usage: {spec.usage}")
        for arg, word in zip(fixed, positional):
            values[arg.name] = self._value(spec, arg.parse, word, arg.name.upper())
        for arg in spec.args:
            if arg.name not in values and not arg.optional:
                raise UsageError(f"missing {arg.name.upper()}; usage: {spec.usage}")
        return Parsed(spec, values, flags)

    @staticmethod
    def _value(spec: CommandSpec, parse: Callable[[str], Any], word: str, what: str) -> Any:
        try:
            return parse(word)
        except ValueError as e:
            raise UsageError(f"{what}: {e}; usage: {spec.usage}") from None


def _numeric(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _rest_after(raw: str, words: Sequence[str], index: int) -> str:
    """The raw text from the ``index``-th word on (quotes kept, as the user typed them)."""
    pos = 0
    for w in words[:index]:
        # find each earlier word in the raw text; quoting may differ, so skip by tokens
        pos = _skip_token(raw, pos)
    return raw[pos:].strip()


def _skip_token(raw: str, pos: int) -> int:
    while pos < len(raw) and raw[pos].isspace():
        pos += 1
    quote = None
    while pos < len(raw):
        c = raw[pos]
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c.isspace():
            break
        pos += 1
    return pos
