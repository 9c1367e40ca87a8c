"""Guest control and the raw escape hatches: info status, stop, cont, system_reset, quit, hmp, qmp."""

from __future__ import annotations

import json

from kvmshell.core.commands.results import Done, Json, Result, Text
from kvmshell.core.commands.spec import Arg, CommandSpec, Completer, Flag, UsageError
from kvmshell.core.monitor.guestdata import STATUS
from kvmshell.core.commands.session import Invocation
from kvmshell.errors import Disconnected

YES = Flag(("-y", "--yes"), "do not ask for confirmation")


async def info_status(inv: Invocation) -> Result:
    status = await inv.monitor.status()
    return Text(f"VM status: {status}", data={"status": str(status), "running": status.running,
                                              "state": status.state.value})


async def stop(inv: Invocation) -> Result:
    await inv.monitor.stop()
    inv.session.data.schedule(inv.guest or "", STATUS)
    return Done("stopped")


async def cont(inv: Invocation) -> Result:
    await inv.monitor.cont()
    inv.session.data.schedule(inv.guest or "", STATUS)
    return Done("running")


async def system_reset(inv: Invocation) -> Result:
    await inv.confirm("reset the guest (like pressing its reset button: unsaved guest state is lost)?")
    await inv.monitor.system_reset()
    return Done("reset")


async def quit_guest(inv: Invocation) -> Result:
    mon = inv.monitor
    info = await mon.migration()
    running = "" if not info.status.is_active else f" (a migration is {info.status}: it would be lost too)"
    await inv.confirm(f"quit ends this guest's QEMU process: the guest is gone unless it was migrated{running}. Quit?")
    try:
        await mon.quit()
    except Disconnected:
        pass                      # QEMU may close the monitor before it answers
    return Done("QEMU quit")


async def hmp(inv: Invocation) -> Result:
    line = str(inv.values["line"])
    return Text(await inv.monitor.hmp(line, timeout=60))


async def qmp(inv: Invocation) -> Result:
    command = str(inv.values["command"])
    raw = str(inv.values.get("arguments") or "").strip()
    args = None
    if raw:
        try:
            args = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"arguments are not JSON: {e.msg} at column {e.colno}; "
                             'e.g. qmp migrate-set-parameters {"downtime-limit": 500}') from None
        if not isinstance(args, dict):
            raise UsageError("arguments must be a JSON object, e.g. {\"downtime-limit\": 500}")
    return Json(await inv.monitor.execute(command, args))


SPECS = (
    CommandSpec("info status", "show whether the guest runs", info_status, maps_to="QMP query-status",
                category="guest control"),
    CommandSpec("stop", "pause the guest", stop, maps_to="QMP stop", category="guest control"),
    CommandSpec("cont", "resume the guest", cont, aliases=("c",), maps_to="QMP cont", category="guest control"),
    CommandSpec("system_reset", "reset the guest", system_reset, flags=(YES,), maps_to="QMP system_reset",
                category="guest control"),
    CommandSpec("quit", "end the guest's QEMU process", quit_guest, flags=(YES,), aliases=("q",),
                maps_to="QMP quit", details="The shell itself ends with `exit` or Ctrl-D.", category="guest control"),
    CommandSpec("hmp", "send a raw HMP line through any monitor", hmp,
                args=(Arg("line", "the HMP command line", rest=True, complete=Completer.HMP_COMMAND),),
                maps_to="QMP human-monitor-command (or the HMP monitor itself)", category="raw"),
    CommandSpec("qmp", "send a raw QMP command (QMP guests)", qmp,
                args=(Arg("command", "QMP command name", complete=Completer.QMP_COMMAND),
                      Arg("arguments", "arguments as a JSON object", optional=True, rest=True)),
                maps_to="the command itself", category="raw"),
)
