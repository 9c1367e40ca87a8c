"""A twin: a QEMU started on another host from a guest's own command line (``cmdline.derive``), in
the background (``-daemonize``), with its monitor sockets, pidfile and log in a run directory there;
attached as a monitor; and its undo. Static migration starts one with ``-loadvm TAG`` (the copy),
``migrate --to-host`` with ``-incoming defer`` (the destination).

``TwinPlan`` is what is known before anything is touched (the paths, the command line, as the user
may have edited it); ``Twin`` is one start of it. Its undo kills the QEMU through the pidfile (TERM,
then KILL) and removes the pidfile; the run directory and the log stay, for what went wrong.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.ledger import Ledger
from kvmshell.core.monitor.base import Monitor, open_monitor
from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget
from kvmshell.core.values.cmdline import Derived, Option, QemuCommand, derive, review
from kvmshell.errors import KvmError

MAX_SOCKET_PATH = 100            # sun_path is 108 bytes
CONNECT_TIMEOUT = 15.0


def socket_name(name: str) -> str:
    """The file name the twin's sockets, pidfile and log are named after (one set per twin)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def sockets_fit(run_dir: str, name: str) -> bool:
    """Whether the twin's monitor sockets in ``run_dir`` fit a unix socket address."""
    return len(f"{run_dir}/{socket_name(name)}-2.hmp") <= MAX_SOCKET_PATH


@dataclass(frozen=True)
class TwinPlan:
    """A QEMU to start on a host: where its files go and the command line that starts it."""

    name: str                    # its name in the fleet
    target: SshTarget            # the host it runs on
    run_dir: str                 # on that host: monitor sockets, pidfile, log
    mode: Option                 # -loadvm TAG (a copy) or -incoming defer (a destination)
    derived: Derived             # the command line as derived, with its monitors and notes
    command: QemuCommand         # what runs: the derived command line, or the user's edit of it

    @classmethod
    def derive(cls, cmd: QemuCommand, *, name: str, target: SshTarget, run_dir: str, mode: Option) -> TwinPlan:
        """The twin of the QEMU that ``cmd`` started: its monitors and pidfile in ``run_dir``, daemonized,
        with ``mode``."""
        sock = socket_name(name)
        d = derive(cmd, socket_dir=run_dir, name=sock, pidfile=f"{run_dir}/{sock}.pid", detach=True,
                   loadvm=mode.value if mode.name == "-loadvm" else None,
                   incoming=mode.value if mode.name == "-incoming" else None)
        return cls(name, target, run_dir, mode, d, d.command)

    def path(self, suffix: str) -> str:
        """A file of the twin's in its run directory (``pid``, ``log``, ``mig``...)."""
        return f"{self.run_dir}/{socket_name(self.name)}.{suffix}"

    @property
    def pidfile(self) -> str:
        return self.path("pid")

    @property
    def address(self) -> Address:
        """Where kvmshell attaches it: its first QMP monitor, else its first one."""
        proto, path = next(((p, s) for p, s in self.derived.monitors if p == "qmp"), self.derived.monitors[0])
        return Address(Protocol(proto), Kind.UNIX, path=path, ssh=self.target)

    async def reviewed(self, edit: Callable[[str], Awaitable[str]], host_label: str) -> TwinPlan:
        """The plan with the command line the user made of it with ``edit`` (Refused if they emptied it
        or removed what kvmshell needs: the mode, -daemonize, the pidfile, the monitor sockets)."""
        edited = await review(self.command, edit, paths=[path for _, path in self.derived.monitors],
                              required=[self.mode, Option("-daemonize"), Option("-pidfile", self.pidfile)],
                              title=f"the command that starts {self.name} on {host_label}")
        return replace(self, command=edited)


class Twin:
    """One start of a TwinPlan on ``shell``'s host, written into ``ledger``; ``undo`` takes it back."""

    def __init__(self, plan: TwinPlan, shell: HostShell, pool: HostPool, ledger: Ledger) -> None:
        self.plan = plan
        self.shell = shell
        self.pool = pool
        self.ledger = ledger
        self.launched = False              # its start command ran: there may be a QEMU behind the pidfile
        self.started = False               # ... and QEMU went to the background
        self.monitor: Monitor | None = None

    async def start(self, command: QemuCommand, story: str, *, timeout: float,
                    progress: Callable[[str], None]) -> None:
        """Run ``command`` (the plan's, maybe with more options) on the host; ``story`` ends the line
        that says it was started. A QEMU that exits raises ``shell.error`` with the last lines of its log."""
        p, sh = self.plan, self.shell
        await sh.check(f"mkdir -p -- {shlex.quote(p.run_dir)}", f"creating {p.run_dir}")
        logfile = p.path("log")
        for _, path in p.derived.monitors:
            await sh.sh(f"rm -f -- {shlex.quote(path)}")
        progress(f"starting {p.name} on {sh.label} with {' '.join(p.mode.argv())}")
        self.launched = True
        r = await sh.sh(f"{command.shell()} </dev/null >{shlex.quote(logfile)} 2>&1", timeout=timeout)
        if not r.ok:
            tail = (await sh.sh(f"tail -n 3 -- {shlex.quote(logfile)}")).text.strip().replace("\n", " | ")
            raise sh.error(f"QEMU on {sh.label} exited with status {r.exit_status}: {tail or '(no output)'}")
        self.started = True
        self.ledger.done.append(f"started {p.name} on {sh.label} {story}")

    async def attach(self) -> Monitor:
        """Open its monitor (through SSH); ``detach`` closes it."""
        self.monitor = await open_monitor(self.plan.name, self.plan.address, hosts=self.pool,
                                          connect_timeout=CONNECT_TIMEOUT)
        return self.monitor

    async def detach(self) -> None:
        if self.monitor is not None:
            mon, self.monitor = self.monitor, None
            try:
                await mon.close()
            except KvmError:
                pass

    async def undo(self) -> None:
        """Kill it (if it was launched) through its pidfile, and say so in the ledger."""
        await self.detach()
        if not self.launched:
            return
        p, label = self.plan, self.shell.label
        try:
            if await self.shell.kill_pidfile(p.pidfile):
                self.ledger.undone.append(f"killed {p.name} on {label}")
            elif self.started:
                self.ledger.undone.append(f"{p.name} on {label} had exited already")
        except KvmError as e:
            self.ledger.kept.append(f"could not kill {p.name} on {label} ({e.message}): its pid is in "
                                    f"{p.pidfile} there")


__all__ = ["MAX_SOCKET_PATH", "Twin", "TwinPlan", "socket_name", "sockets_fit"]
