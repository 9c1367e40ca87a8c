"""Completion: the line before the cursor -> a typed context -> candidates from cached live data.

Pure over what ``GuestData`` holds: it never waits for a guest. When data it needs is missing it asks
for a background refresh, so the next TAB has it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kvmshell.core.values.units import human_bytes
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag
from kvmshell.core.values.uri import URI_SCHEMES
from kvmshell.core.monitor.guestdata import CAPABILITIES, PARAMETERS, SNAPSHOTS
from kvmshell.core.migration.live.strategies import summaries
from kvmshell.core.commands.session import Session

SIZE_EXAMPLES = ("100M", "512M", "1G", "10G")
ENUM_VALUES = {
    "multifd-compression": ("none", "zlib", "zstd"),
}
INFO_META = "show information: info <TAB> lists what"


@dataclass(frozen=True)
class Candidate:
    text: str                 # replaces the word being typed
    meta: str = ""            # one-line description shown in the menu
    display: str | None = None
    start: int = 0            # where the replaced word starts, relative to the cursor (<= 0)


@dataclass(frozen=True)
class Context:
    """Where the cursor is in the command language."""

    target: str | None                    # the guest the line applies to
    word: str                             # the partial word under the cursor
    completing_target: bool = False       # the word is @NAME
    command: CommandSpec | None = None
    first_word: str | None = None         # set while the command name itself is being typed ("info")
    arg: Arg | None = None                # the positional argument being typed
    flag: Flag | None = None              # the flag whose value is being typed
    previous: tuple[str, ...] = field(default_factory=tuple)   # words after the command, before the cursor
    rest_text: str = ""                   # for rest-of-line arguments: the text typed so far


class CompletionEngine:
    def __init__(self, session: Session) -> None:
        self.session = session

    # -- context ------------------------------------------------------------------------------
    def context(self, text: str) -> Context:
        s = self.session
        target = s.current if s.current is not None else (s.fleet.names[0] if len(s.fleet) == 1 else None)
        stripped = text.lstrip()
        if stripped.startswith("@"):
            head, sep, rest = stripped.partition(" ")
            if not sep:
                return Context(target, head[1:], completing_target=True)
            name = head[1:]
            if name in s.fleet:
                target = name
            stripped = rest.lstrip()
        words = stripped.split()
        ends_with_space = not stripped or stripped[-1].isspace()
        done, word = (words, "") if ends_with_space else (words[:-1], words[-1])
        if not done:
            return Context(target, word, first_word="")
        spec, used = s.registry.lookup(done)
        if spec is None:
            if done == ["info"] and len(done) == 1:
                return Context(target, word, first_word="info")
            return Context(target, word)                 # an unknown command: nothing to offer
        after = tuple(done[used:])
        if spec.args and spec.args[-1].rest:
            fixed = len([a for a in spec.args if not a.rest])
            positional = [w for w in after if not w.startswith("-")]
            if len(positional) >= fixed:
                skip = len(after) - (len(positional) - fixed)
                rest_words = after[skip:]
                rest_text = " ".join(rest_words) + (" " if rest_words else "") + word
                return Context(target, word, command=spec, arg=spec.args[-1], previous=after, rest_text=rest_text)
        expecting: Flag | None = None
        npos = 0
        for w in after:
            if expecting is not None:
                expecting = None
                continue
            f = spec.flag(w)
            if f is not None:
                expecting = f if f.value else None
            else:
                npos += 1
        if expecting is not None:
            return Context(target, word, command=spec, flag=expecting, previous=after)
        arg = spec.args[npos] if npos < len(spec.args) else None
        return Context(target, word, command=spec, arg=arg, previous=after)

    # -- candidates ---------------------------------------------------------------------------
    def complete(self, text: str) -> list[Candidate]:
        """Candidates for the word before the cursor, each knowing how much of the line it replaces."""
        ctx = self.context(text)
        start = -(len(ctx.word) + (1 if ctx.completing_target else 0))
        return [replace(c, start=start) for c in self._complete(ctx)]

    def _complete(self, ctx: Context) -> list[Candidate]:
        s = self.session
        if ctx.completing_target:
            return _match(ctx.word, [Candidate("@" + n, self._guest_meta(n)) for n in s.fleet.names]
                          + [Candidate("@all", "every attached guest")], strip="@")
        if ctx.first_word is not None:
            return _match(ctx.word, self._command_names(ctx.first_word, ctx.target))
        if ctx.command is None:
            return []
        if ctx.word.startswith("-") and ctx.flag is None and (ctx.arg is None or not ctx.arg.rest):
            return _match(ctx.word, [Candidate(n, f.help) for f in ctx.command.flags for n in f.names])
        which = ctx.flag.complete if ctx.flag else ctx.arg.complete if ctx.arg else Completer.NONE
        if ctx.arg is not None and ctx.arg.rest and which is Completer.COMMAND:
            if " " in ctx.rest_text.strip() or ctx.rest_text.endswith(" "):
                return self._complete(self.context(ctx.rest_text))
            return _match(ctx.word, self._command_names("", ctx.target))
        return _match(ctx.word, self._values(which, ctx))

    def _command_names(self, first: str, target: str | None) -> list[Candidate]:
        reg = self.session.registry
        if first == "info":
            return [Candidate(spec.name.split(" ", 1)[1], spec.summary) for spec in reg.subcommands("info")]
        seen: dict[str, Candidate] = {}
        for spec in reg:
            head = spec.name.split(" ", 1)[0]
            if head == "info":
                seen.setdefault("info", Candidate("info", INFO_META))
            else:
                seen.setdefault(head, Candidate(head, spec.summary))
        extra = []
        if target is not None and target in self.session.fleet:
            mon = self.session.fleet.get(target).monitor
            if mon is not None:
                extra = [Candidate(n, "HMP command (passed through)") for n in sorted(mon.features.hmp_commands)
                         if n not in seen]
        return list(seen.values()) + extra

    def _guest_meta(self, name: str) -> str:
        g = self.session.fleet.get(name)
        status = self.session.data.get(name).status
        state = str(status) if status and g.monitor else g.state.value
        return f"{g.address.protocol.value}, {state}"

    def _values(self, which: Completer, ctx: Context) -> list[Candidate]:
        s = self.session
        t = ctx.target
        data = s.data.get(t) if t else None
        if which is Completer.GUEST:
            return [Candidate(n, self._guest_meta(n)) for n in s.fleet.names]
        if which is Completer.SNAPSHOT_TAG:
            if t is None:
                return []
            if data is None or data.snapshots is None:
                s.data.schedule(t, SNAPSHOTS)
                return []
            from datetime import datetime
            return [Candidate(sn.tag, f"saved {datetime.fromtimestamp(sn.date_sec):%Y-%m-%d %H:%M}, "
                                      f"{human_bytes(sn.vm_state_size)}") for sn in data.snapshots]
        if which is Completer.URI:
            return self._uris(ctx.word)
        if which is Completer.PARAMETER:
            if data is None or data.parameters is None:
                if t:
                    s.data.schedule(t, PARAMETERS)
                return []
            return [Candidate(k, f"now {_show(v)}") for k, v in sorted(data.parameters.values.items())]
        if which is Completer.PARAMETER_VALUE:
            name = ctx.previous[0] if ctx.previous else ""
            current = data.parameters.values.get(name) if data and data.parameters else None
            if isinstance(current, bool):
                return [Candidate("on"), Candidate("off")]
            if name in ENUM_VALUES:
                return [Candidate(v) for v in ENUM_VALUES[name]]
            if name.endswith("bandwidth") or name.endswith("size"):
                return self._sizes(ctx.word)
            return [Candidate(_show(current), "current value")] if current is not None else []
        if which is Completer.CAPABILITY:
            if data is None or data.capabilities is None:
                if t:
                    s.data.schedule(t, CAPABILITIES)
                return []
            return [Candidate(k, f"now {'on' if v else 'off'}") for k, v in sorted(data.capabilities.states.items())]
        if which is Completer.HOST:
            return [Candidate(name, f"{h.ssh.user + '@' if h.ssh.user else ''}{h.ssh.host}")
                    for name, h in s.config.hosts.items()]
        if which is Completer.STRATEGY:
            return [Candidate(name, summary) for name, summary in summaries()]
        if which is Completer.ON_OFF:
            return [Candidate("on"), Candidate("off")]
        if which is Completer.SIZE:
            return self._sizes(ctx.word)
        if which is Completer.COMMAND:
            return self._command_names("", t)
        if which in (Completer.HMP_COMMAND, Completer.QMP_COMMAND) and t is not None:
            mon = s.fleet.get(t).monitor
            if mon is None:
                return []
            names = mon.features.hmp_commands if which is Completer.HMP_COMMAND else mon.features.qmp_commands
            return [Candidate(n) for n in sorted(names)]
        return []

    def _sizes(self, word: str) -> list[Candidate]:
        digits = word.rstrip("bBkKmMgGtT")
        if digits and digits.replace(".", "", 1).isdigit():
            return [Candidate(digits + u, f"{digits} {name}/s") for u, name in
                    (("K", "KiB"), ("M", "MiB"), ("G", "GiB"), ("T", "TiB"))]
        return [Candidate(x) for x in SIZE_EXAMPLES]

    def _uris(self, word: str) -> list[Candidate]:
        if ":" not in word:
            return [Candidate(f"{scheme}:", meta) for scheme, meta in URI_SCHEMES.items()]
        scheme = word.split(":", 1)[0]
        if scheme not in ("tcp", "rdma"):
            return []
        hosts = {"127.0.0.1": "this host"}
        for h in self.session.config.hosts.values():
            hosts[h.ssh.host] = f"host {h.name} from the config"
        for g in self.session.fleet:
            if g.address.host:
                hosts.setdefault(g.address.host, f"host of {g.name}'s monitor")
            if g.address.ssh:
                hosts.setdefault(g.address.ssh.host, f"host of {g.name}")
        return [Candidate(f"{scheme}:{h}:", meta) for h, meta in hosts.items()]


def _show(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _match(word: str, candidates: Iterable[Candidate], strip: str = "") -> list[Candidate]:
    """Prefix matches first, then substring matches (a small fuzzy bonus); each text once."""
    key = word.lower().lstrip(strip) if strip else word.lower()
    prefix, inner, seen = [], [], set()
    for c in candidates:
        if c.text in seen:
            continue
        t = c.text.lower().lstrip(strip) if strip else c.text.lower()
        if t.startswith(key):
            prefix.append(c)
            seen.add(c.text)
        elif key and key in t:
            inner.append(c)
            seen.add(c.text)
    return prefix + inner
