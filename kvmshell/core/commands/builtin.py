"""Commands of kvmshell itself: help, guests, use, watch, exit."""

from __future__ import annotations

import asyncio
import fnmatch
import textwrap

from kvmshell.core.commands.results import Exit, KeyValues, Result, Table, Text, Watch
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag, Scope, UsageError
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import GuestState
from kvmshell.core.commands.session import Invocation
from kvmshell.core.hosts.processes import discover
from kvmshell.core.migration.live import running
from kvmshell.core.values.address import GUEST_NAME_RE
from kvmshell.core.values.models import RunState
from kvmshell.errors import CommandFailed, KvmError


def _two_columns(entries: list[tuple[str, str]], width: int = 100) -> list[str]:
    """Names in a column (a name too long for it gets a line of its own), help wrapped beside them."""
    column = min(22, max((len(name) for name, _ in entries), default=0))
    out: list[str] = []
    for name, text in entries:
        wrapped = textwrap.wrap(text, width - column - 4) or [""]
        if len(name) > column:
            out.append(f"  {name}")
            out += [f"  {'':<{column}}  {line}" for line in wrapped]
        else:
            out.append(f"  {name:<{column}}  {wrapped[0]}")
            out += [f"  {'':<{column}}  {line}" for line in wrapped[1:]]
    return out


async def help_(inv: Invocation) -> Result:
    reg = inv.session.registry
    topic = inv.values.get("command")
    if topic:
        words = str(topic).split()
        spec, used = reg.lookup(words)
        if spec is None or used != len(words):
            raise UsageError(inv.session.unknown_command_message(str(topic)))
        lines = [f"usage: {spec.usage}", "", spec.summary + "."]
        if spec.details:
            lines += ["", spec.details]
        if spec.args or spec.flags:
            lines.append("")
        entries = [(a.name.upper(), a.help) for a in spec.args]
        entries += [(", ".join(f.names) + (f" {f.value}" if f.value else "") + ("..." if f.repeat else ""), f.help)
                    for f in spec.flags]
        lines += _two_columns(entries)
        if spec.maps_to:
            lines += ["", f"QEMU: {spec.maps_to}"]
        if spec.aliases:
            lines.append(f"aliases: {', '.join(spec.aliases)}")
        return Text("\n".join(lines))
    by_cat: dict[str, list[CommandSpec]] = {}
    for spec in reg:
        by_cat.setdefault(spec.category, []).append(spec)
    lines = []
    for cat, specs in by_cat.items():
        lines.append(f"{cat}:")
        lines += [f"  {s.name:<26} {s.summary}" for s in specs]
    lines += ["", "Prefix a command with @NAME to run it on one guest, or @all for every guest.",
              "Other HMP commands of the guest (info block, x, device_del...) are passed through.",
              "`help COMMAND` for details."]
    return Text("\n".join(lines))


async def guests(inv: Invocation) -> Result:
    fleet = inv.session.fleet
    rows = []
    statuses = await asyncio.gather(*(_status(g.name, inv) for g in fleet))
    for g, status in zip(fleet, statuses):
        mark = "*" if g.name == inv.session.current else ""
        state = status if g.state is GuestState.CONNECTED else f"{g.state.value}: {g.reason}"
        rows.append((mark + g.name, str(g.address), state, str(g.version or "")))
    return Table(("NAME", "ADDRESS", "STATUS", "QEMU"), tuple(rows), empty="no guests attached")


async def _status(name: str, inv: Invocation) -> str:
    try:
        mon = inv.session.fleet.monitor(name)
    except KvmError as e:
        return f"error: {e.message}"
    return await guest_status(mon, followed=inv.session.running_job(name) is not None)


async def guest_status(mon: Monitor, *, followed: bool) -> str:
    """The guest's run state, and its migration when one runs from it (followed here or not); raises
    nothing (an error is the status)."""
    return (await _guest_status(mon, followed))[0]


async def unfollowed_status(mon: Monitor) -> str | None:
    """``guest_status`` of a guest whose migration runs (active, paused in postcopy) with no kvmshell
    following it (the caller follows none here); None for any other guest."""
    state = running.load(str(mon.address))
    if state is not None and state.alive:
        return None                      # another kvmshell follows it
    text, migrating = await _guest_status(mon, False)
    return text if migrating else None


async def _guest_status(mon: Monitor, followed: bool) -> tuple[str, bool]:
    try:
        status = await mon.status()
    except KvmError as e:
        return f"error: {e.message}", False
    try:
        info = await mon.migration()
    except KvmError:
        return str(status), False
    if not info.status.is_active or status.state is RunState.INMIGRATE:
        return str(status), False
    who = "followed" if followed else "not followed: `migrate --follow` adopts it"
    return f"{status}, migration {info.status} ({who})", True


async def use(inv: Invocation) -> Result:
    name = str(inv.values["name"])
    inv.session.fleet.get(name)
    inv.session.current = name
    inv.session.data.schedule(name)
    return KeyValues((("current guest", name),))


async def attach(inv: Invocation) -> Result:
    """Attach the QEMU guests running on HOST (or this machine) that are not attached yet."""
    s = inv.session
    host = inv.values.get("host")
    if host is not None and str(host) not in s.config.hosts:
        known = ", ".join(s.config.hosts) or "none configured"
        raise UsageError(f"no host {host!r} in the config (hosts: {known})")
    pool = s.fleet.host_pool() if host is not None else None
    found = await discover(pool, str(host) if host is not None else None)
    have = {str(g.address) for g in s.fleet}
    added: list[str] = []
    pattern = inv.flags.get("match")
    for g in found:
        if str(g.monitor) in have or any(str(m) in have for m in g.monitors):
            continue
        if pattern and not fnmatch.fnmatchcase(g.name, str(pattern)):
            continue
        name = g.name if GUEST_NAME_RE.fullmatch(g.name) and g.name != "all" else f"qemu-{g.pid}"
        if name in s.fleet:
            name = f"{name}-{g.pid}"
        try:
            s.fleet.add(name, g.monitor)
        except KvmError:
            continue                    # the same monitor under another spelling: already attached
        added.append(name)
    if not added:
        where = f"on {host}" if host is not None else "on this machine"
        return Table(("NAME", "ADDRESS", "STATUS"), (), empty=f"no guest {where} that is not attached already")
    await asyncio.wait_for(s.fleet.wait_first_attempts(added), s.fleet.connect_timeout + 5)
    for name in added:
        s.data.schedule(name)
    rows = []
    for name in added:
        g = s.fleet.get(name)
        rows.append((name, str(g.address), g.state.value if g.reason is None else f"{g.state.value}: {g.reason}"))
    failed = [f"{name}: {s.fleet.get(name).reason}" for name in added if s.fleet.get(name).reason is not None]
    if failed:                          # attached all the same: the fleet keeps trying them
        ok = [name for name in added if s.fleet.get(name).reason is None]
        raise CommandFailed(f"could not reach {'; '.join(failed)}"
                            + (f" (attached and reachable: {', '.join(ok)})" if ok else ""))
    return Table(("NAME", "ADDRESS", "STATUS"), tuple(rows))


async def watch(inv: Invocation) -> Result:
    line = str(inv.values["line"])
    plan = inv.session.plan(line)           # check it now, before the face starts redrawing
    if plan is None:
        raise UsageError("watch needs a command, e.g. watch info migrate")
    return Watch(line)


async def exit_(inv: Invocation) -> Result:
    return Exit()


SPECS = (
    CommandSpec("help", "list the commands, or explain one", help_, scope=Scope.SHELL,
                args=(Arg("command", "a command name", optional=True, rest=True, complete=Completer.COMMAND),),
                category="shell"),
    CommandSpec("guests", "list the attached guests with their state", guests, scope=Scope.SHELL, category="shell"),
    CommandSpec("use", "make NAME the current guest (the prompt shows it)", use, scope=Scope.SHELL,
                args=(Arg("name", "guest name", complete=Completer.GUEST),), category="shell"),
    CommandSpec("attach", "attach the QEMU guests running on HOST (default: this machine)", attach,
                scope=Scope.SHELL,
                args=(Arg("host", "a [hosts.NAME] of the config", optional=True, complete=Completer.HOST),),
                flags=(Flag(("--match",), "only guests whose QEMU -name matches GLOB", value="GLOB"),),
                details="Finds QEMU processes and their monitor sockets from /proc (over SSH for a host) and "
                        "attaches those not attached yet, QMP first; a guest whose monitor libvirt holds is "
                        "attached through libvirt (libvirt:NAME). Fails when one it attached does not answer.",
                category="shell"),
    CommandSpec("watch", "show a command's output live, twice a second, until Ctrl-C", watch, scope=Scope.SHELL,
                args=(Arg("line", "the command, e.g. info migrate", rest=True, complete=Completer.COMMAND),),
                details="Ctrl-C returns to the prompt; it does not cancel anything.", category="shell"),
    CommandSpec("exit", "leave kvmshell (the guests keep running)", exit_, scope=Scope.SHELL, category="shell"),
)
