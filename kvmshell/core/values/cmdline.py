"""How a guest was started, and the command line of its twin on another host (pure functions).

kvmshell reads a running QEMU's argv (/proc/PID/cmdline, found from the monitor socket's peer) and
derives the destination's: same machine, memory and devices; monitor sockets moved to new paths
(file descriptors passed by a launcher become paths); `-incoming defer` (live) or `-loadvm TAG`
(static) added; `-pidfile` moved; `-daemonize` kept so the copy outlives the SSH session that starts it.
The user sees the result and may edit it before it runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kvmshell.errors import Refused

# options that take no value (QEMU 7.2); every other -option takes exactly one
FLAG_OPTIONS = frozenset({
    "-daemonize", "-nodefaults", "-no-user-config", "-nographic", "-S", "-snapshot", "-no-reboot",
    "-no-shutdown", "-enable-kvm", "-no-hpet", "-no-acpi", "-full-screen", "-alt-grab", "-ctrl-grab",
    "-no-quit", "-portrait", "-s", "-version", "-help", "-h", "-preconfig", "-only-migratable",
    "-nodefconfig", "-win2k-hack", "-no-fd-bootchk", "-no-frame", "-singlestep", "-enable-fips",
})

# options whose value may itself start with "-"
FREE_TEXT_OPTIONS = frozenset({"-append", "-name", "-smbios", "-fw_cfg", "-global", "-set"})


@dataclass(frozen=True)
class Option:
    name: str                 # "-drive"
    value: str | None = None  # "file=...,if=ide"

    def argv(self) -> list[str]:
        return [self.name] if self.value is None else [self.name, self.value]


@dataclass(frozen=True)
class QemuCommand:
    binary: str
    options: tuple[Option, ...]

    def argv(self) -> list[str]:
        out = [self.binary]
        for o in self.options:
            out += o.argv()
        return out

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv())

    def values(self, name: str) -> list[str]:
        return [o.value or "" for o in self.options if o.name == name]

    def has(self, name: str) -> bool:
        return any(o.name == name for o in self.options)


def parse_cmdline(raw: bytes | Sequence[str]) -> QemuCommand:
    """argv from /proc/PID/cmdline (NUL-separated bytes) or a list."""
    argv = [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a] if isinstance(raw, bytes) \
        else list(raw)
    if not argv or "qemu" not in argv[0].rsplit("/", 1)[-1]:
        raise ValueError(f"not a QEMU command line: {' '.join(argv[:3])!r}")
    binary, rest = argv[0], argv[1:]
    opts: list[Option] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        name = "-" + a.lstrip("-") if a.startswith("-") else None
        if name is None:                               # a bare disk image (legacy `qemu IMG`)
            opts.append(Option("-hda", a))
            i += 1
        elif name in FLAG_OPTIONS or i + 1 >= len(rest) or (
                rest[i + 1].startswith("-") and len(rest[i + 1]) > 1 and name not in FREE_TEXT_OPTIONS):
            # an option missing from FLAG_OPTIONS (a newer QEMU's) still must not swallow the next one
            opts.append(Option(name))
            i += 1
        else:
            opts.append(Option(name, rest[i + 1]))
            i += 2
    return QemuCommand(binary, tuple(opts))


def split_props(value: str) -> list[str]:
    """QEMU's comma-separated properties (',,' escapes a comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == "," and value[i + 1:i + 2] == ",":
            cur += ","
            i += 2
        elif value[i] == ",":
            parts.append(cur)
            cur = ""
            i += 1
        else:
            cur += value[i]
            i += 1
    parts.append(cur)
    return parts


def _join(props: Sequence[str]) -> str:
    return ",".join(p.replace(",", ",,") if "=" not in p else p.split("=", 1)[0] + "=" +
                    p.split("=", 1)[1].replace(",", ",,") for p in props)


@dataclass(frozen=True)
class Derived:
    command: QemuCommand
    monitors: tuple[tuple[str, str], ...]     # (protocol "qmp"/"hmp", new unix socket path)
    images: tuple[str, ...]                   # disk image paths the guest uses
    notes: tuple[str, ...] = field(default_factory=tuple)


def images_of(cmd: QemuCommand) -> list[str]:
    paths = []
    for o in cmd.options:
        if o.name in ("-hda", "-hdb", "-hdc", "-hdd") and o.value:
            paths.append(o.value)
        elif o.name in ("-drive", "-blockdev") and o.value:
            for p in split_props(o.value):
                if p.startswith("file=") and not p.startswith("file=/dev/fd"):
                    paths.append(p.split("=", 1)[1])
                elif p.startswith("filename="):
                    paths.append(p.split("=", 1)[1])
    return paths


def derive(cmd: QemuCommand, *, socket_dir: str, name: str, incoming: str | None = "defer",
           loadvm: str | None = None, keep_stdio: bool = False, pidfile: str | None = None,
           detach: bool = False) -> Derived:
    """The twin's command line: monitors on unix sockets under ``socket_dir`` named after ``name``,
    then `-incoming INCOMING` (live) or `-loadvm TAG` (static)."""
    notes: list[str] = []
    if detach:                    # the twin runs in the background, started over SSH
        opts = [o for o in cmd.options if o.name != "-S"]
        if not cmd.has("-daemonize"):
            opts.append(Option("-daemonize"))
        if cmd.has("-nographic"):                          # QEMU refuses it with -daemonize
            opts = [o for o in opts if o.name != "-nographic"] + [Option("-display", "none")]
            notes.append("-nographic (not allowed with -daemonize) became -display none")
        cmd = QemuCommand(cmd.binary, tuple(opts))
    out: list[Option] = []
    monitors: list[tuple[str, str]] = []
    chardev_mode: dict[str, str] = {}
    for o in cmd.options:                         # which chardevs are monitors, and of what kind
        if o.name == "-mon" and o.value:
            props = dict(p.split("=", 1) for p in split_props(o.value) if "=" in p)
            if "chardev" in props:
                chardev_mode[props["chardev"]] = "qmp" if props.get("mode") == "control" else "hmp"
    daemonize = cmd.has("-daemonize")
    counter = 0

    def sock(proto: str) -> str:
        nonlocal counter
        counter += 1
        path = f"{socket_dir.rstrip('/')}/{name}{'' if counter == 1 else f'-{counter}'}.{proto}"
        monitors.append((proto, path))
        return path

    for o in cmd.options:
        if o.name in ("-incoming", "-loadvm"):
            continue
        if o.name in ("-qmp", "-monitor", "-qmp-pretty") and o.value is not None:
            proto = "hmp" if o.name == "-monitor" else "qmp"
            if o.value in ("stdio", "none", "vc") or o.value.startswith("pty"):
                out.append(o)
                continue
            out.append(Option(o.name, f"unix:{sock(proto)},server=on,wait=off"))
            continue
        if o.name == "-chardev" and o.value:
            props = split_props(o.value)
            backend, rest = props[0], props[1:]
            ident = next((p.split("=", 1)[1] for p in rest if p.startswith("id=")), "")
            if backend == "socket" and ident in chardev_mode:
                keep = [p for p in rest if not p.startswith(("fd=", "path=", "host=", "port=", "server=", "wait=",
                                                             "ipv4", "ipv6", "to="))]
                out.append(Option("-chardev", _join(["socket", *keep, f"path={sock(chardev_mode[ident])}",
                                                     "server=on", "wait=off"])))
                continue
            if backend == "socket" and any(p.startswith("fd=") for p in rest):
                notes.append(f"chardev {ident} was a passed file descriptor: replaced by a null device")
                out.append(Option("-chardev", _join(["null", f"id={ident}"])))
                continue
            if backend == "stdio" and (daemonize or not keep_stdio):
                notes.append(f"chardev {ident} was the terminal of the original QEMU: replaced by a null device")
                out.append(Option("-chardev", _join(["null", *[p for p in rest if p.startswith("id=")]])))
                continue
        if o.name == "-pidfile":
            if pidfile:
                out.append(Option("-pidfile", pidfile))
            continue
        if o.name == "-serial" and o.value == "stdio" and (daemonize or not keep_stdio):
            out.append(Option("-serial", "null"))
            continue
        out.append(o)
    if pidfile and not cmd.has("-pidfile"):
        out.append(Option("-pidfile", pidfile))
    if loadvm is not None:
        out.append(Option("-loadvm", loadvm))
    elif incoming is not None:
        out.append(Option("-incoming", incoming))
    if not monitors:
        out.append(Option("-qmp", f"unix:{sock('qmp')},server=on,wait=off"))
        notes.append("the original had no socket monitor: added a QMP socket")
    return Derived(QemuCommand(cmd.binary, tuple(out)), tuple(monitors), tuple(images_of(cmd)), tuple(notes))


def rewrite_images(cmd: QemuCommand, mapping: dict[str, str]) -> QemuCommand:
    """Point disk image paths elsewhere (after copying them to another directory)."""
    out = []
    for o in cmd.options:
        if o.value and o.name in ("-drive", "-blockdev"):
            props = [re.sub(r"^(file|filename)=(.*)$", lambda m: f"{m.group(1)}={mapping.get(m.group(2), m.group(2))}", p)
                     for p in split_props(o.value)]
            out.append(Option(o.name, _join(props)))
        elif o.value and o.name in ("-hda", "-hdb", "-hdc", "-hdd"):
            out.append(Option(o.name, mapping.get(o.value, o.value)))
        else:
            out.append(o)
    return QemuCommand(cmd.binary, tuple(out))


# -- showing and editing a derived command line ---------------------------------------------------

def editable(cmd: QemuCommand, title: str, keep: Sequence[str]) -> str:
    """``cmd`` as a text to edit: one option per line under a commented header."""
    lines = [f"# {title}",
             "# One option per line, shell quoting; lines starting with # are ignored.",
             "# Save and quit to go on; delete every line to cancel (nothing is done then).",
             f"# kvmshell needs these kept: {'; '.join(keep)}", "",
             shlex.quote(cmd.binary)]
    lines += ["    " + " ".join(shlex.quote(a) for a in o.argv()) for o in cmd.options]
    return "\n".join(lines) + "\n"


def parse_edited(text: str) -> QemuCommand | None:
    """The command line in an edited text (None when it was emptied); ValueError says what is wrong."""
    words: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removesuffix("\\").rstrip()
        try:
            words += shlex.split(line)
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return parse_cmdline(words) if words else None


def missing_after_edit(edited: QemuCommand, required: Sequence[Option], paths: Sequence[str]) -> list[str]:
    """What kvmshell relies on that an edit removed: whole options, and paths (monitor sockets) that
    must still appear in some option's value."""
    missing = [" ".join(o.argv()) for o in required if o not in edited.options]
    text = "\0".join(edited.argv())
    missing += [p for p in paths if p not in text]
    return missing


async def review(argv: QemuCommand, edit: Callable[[str], Awaitable[str]], *, title: str,
                 required: Sequence[Option], paths: Sequence[str]) -> QemuCommand:
    """Let the user edit ``argv`` (``edit`` gets the text of ``editable``); the edited command line.
    Refused, with nothing done, if it was emptied, does not parse, or lacks what kvmshell needs
    (``required`` options, monitor socket ``paths``)."""
    text = editable(argv, title, [" ".join(o.argv()) for o in required] + [f"the monitor socket {p}" for p in paths])
    try:
        edited = parse_edited(await edit(text))
    except ValueError as e:
        raise Refused(f"the edited command line: {e}; nothing was done") from None
    if edited is None:
        raise Refused("the command line was emptied: cancelled, nothing was done")
    missing = missing_after_edit(edited, required, paths)
    if missing:
        raise Refused(f"the edited command line lacks {', '.join(missing)} (kvmshell needs it to start and attach "
                      "the guest); nothing was done")
    return edited
