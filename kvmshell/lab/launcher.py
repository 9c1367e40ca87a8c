"""Real QEMU guests on this machine, for the tests, the benchmarks and `kvmshell demo`.

A ``Lab`` owns a work directory and every QEMU process it starts; ``aclose()`` kills and reaps them
all. Monitor sockets are bound here and passed to QEMU as file descriptors, so an address is ready
the moment ``start`` returns (clients wait in the listen backlog until QEMU accepts): no polling for
a socket file, no race for a free TCP port. Guests die with the process that started them
(PR_SET_PDEATHSIG), so not even a killed test run leaves one behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kvmshell.core.values.address import Address, Kind, Protocol
from kvmshell.errors import LabError
from kvmshell.lab import image
from kvmshell.lab.blackout import Beat

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
LAB_DIR_PREFIX = "kvmshell-lab-"
BOOT_TIMEOUT_S = 60         # the banner of a guest booting while tens of others boot on two cores (tests/test_soak.py)
LAUNCH_LOG_ENV = "KVMSHELL_LAUNCH_LOG"     # a file each QEMU launched here is noted in (the tests count them)
_PTY_RE = re.compile(rb"char device redirected to (/dev/pts/\d+) \(label mon0\)")


class Killable(typing.Protocol):
    """A guest process the Lab kills and reaps when it closes."""

    async def kill(self) -> None: ...


class MonitorKind(enum.Enum):
    QMP_UNIX = "qmp:unix"
    QMP_TCP = "qmp:tcp"
    HMP_UNIX = "hmp:unix"
    HMP_TCP = "hmp:tcp"
    HMP_PTY = "hmp:pty"

    @property
    def protocol(self) -> Protocol:
        return Protocol(self.value.split(":")[0])

    @property
    def kind(self) -> Kind:
        return Kind(self.value.split(":")[1])


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel() -> str:
    """KVMSHELL_ACCEL=kvm|tcg forces one; otherwise KVM when /dev/kvm opens, else TCG."""
    forced = os.environ.get("KVMSHELL_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if kvm_usable() else "tcg"


def note_launch(pid: int, accel: str) -> None:
    """Append "PID ACCEL" to each file $KVMSHELL_LAUNCH_LOG names (':' between them), when it is set: the
    tests count the real QEMUs each test started (also those of a kvmshell or a pytest a test runs)."""
    for path in filter(None, os.environ.get(LAUNCH_LOG_ENV, "").split(os.pathsep)):
        try:
            with open(path, "a") as f:
                f.write(f"{pid} {accel}\n")
        except OSError as e:             # a count never stops a guest
            log.warning("cannot note the launch of QEMU %d in %s: %s", pid, path, e)


def _accel_of(argv: list[str]) -> str:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-accel"), "?")


@typing.runtime_checkable
class Launched(typing.Protocol):
    """A guest process that says its pid and accelerator (a Linux guest handed to ``Lab.own``)."""

    pid: int
    accel: str


def die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


@dataclass
class LabGuest:
    name: str
    address: Address
    proc: asyncio.subprocess.Process
    disk: Path
    ws_pages: int
    ram_mib: int
    accel: str
    incoming: bool
    log_path: Path
    heartbeats: int = 0
    beats: list[Beat] = field(default_factory=list)   # one per image.BEAT, stamped on arrival
    banner: asyncio.Event = field(default_factory=asyncio.Event)
    _beat: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def guest_option(self) -> str:
        return f"{self.name}={self.address}"

    async def wait_heartbeats(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the guest has finished ``count`` more passes over its working set."""
        target = self.heartbeats + count
        async with asyncio.timeout(timeout):
            while self.heartbeats < target:
                if not self.alive:
                    raise LabError(f"{self.name}: QEMU exited ({self.proc.returncode}); see {self.log_path}")
                self._beat.clear()
                await self._beat.wait()

    async def kill(self) -> None:
        """Kill QEMU (SIGKILL) and reap it."""
        if self.alive:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        await self.proc.wait()
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._readers.clear()

    async def _read_stdout(self, stream: asyncio.StreamReader, pty: asyncio.Future[str] | None) -> None:
        """Serial console on stdout: banner, then one heartbeat per pass. Also QEMU's pty notice."""
        head = b""
        while chunk := await stream.read(65536):
            if pty is not None and not pty.done():
                head += chunk
                m = _PTY_RE.search(head)
                if m:
                    pty.set_result(m.group(1).decode())
                    chunk = head[m.end():]
                    head = b""
                else:
                    continue
            if not self.banner.is_set():
                head += chunk
                if image.BANNER in head:
                    self.banner.set()
                    chunk = head.split(image.BANNER, 1)[1]
                    head = b""
                else:
                    continue
            if image.BEAT in chunk:
                at = time.monotonic()
                self.beats += [Beat(at, len(self.beats) + k, None) for k in range(chunk.count(image.BEAT))]
            beats = chunk.count(image.HEARTBEAT)
            if beats:
                self.heartbeats += beats
                self._beat.set()
        self._beat.set()
        if pty is not None and not pty.done():
            pty.set_exception(LabError(f"{self.name}: QEMU exited before opening its pty; see {self.log_path}"))

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        with open(self.log_path, "ab") as f:
            while chunk := await stream.read(65536):
                f.write(chunk)
                f.flush()


class Lab:
    """A work directory and the QEMU guests started in it."""

    def __init__(self, workdir: Path | None = None, accel: str | None = None) -> None:
        if shutil.which(QEMU) is None:
            raise LabError(f"{QEMU} not found: install it with `apt-get install qemu-system-x86 qemu-utils` "
                           "(or run `make test`/`make demo` as root, which does)")
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=LAB_DIR_PREFIX))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.accel = accel or choose_accel()
        self.guests: dict[str, LabGuest] = {}
        self._bases: dict[tuple[int, int, str, int], Path] = {}
        self._others: list[Killable] = []

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _base_image(self, ws_pages: int, pace: int, fill: str = "sparse", beat_pages: int = 0) -> Path:
        key = (ws_pages, pace, fill, beat_pages)
        if key not in self._bases:
            extra = "" if (fill, beat_pages) == ("sparse", 0) else f"-{fill}-{beat_pages}"   # the default keeps its name
            path = self.workdir / f"boot-{ws_pages}-{pace}{extra}.raw"
            image.write_disk_image(path, ws_pages, pace, fill, beat_pages)
            self._bases[key] = path
        return self._bases[key]

    async def _run(self, *argv: str) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode:
            raise LabError(f"{argv[0]} failed: {out.decode(errors='replace').strip()}")

    async def make_disk(self, name: str, ws_pages: int, pace: int = 0, fill: str = "sparse",
                        beat_pages: int = 0) -> Path:
        """A qcow2 overlay (so savevm works) on the raw boot image (see ``image.build_boot_sector``)."""
        base = self._base_image(ws_pages, pace, fill, beat_pages)
        disk = self.workdir / f"{name}.qcow2"
        await self._run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(disk))
        return disk

    async def start(self, name: str, monitor: MonitorKind | str = MonitorKind.QMP_UNIX, *,
                    ws_pages: int = 256, pace: int = 0, ram_mib: int | None = None,
                    incoming: bool = False, disk: Path | None = None, mem_file: Path | None = None,
                    accel: str | None = None, extra_args: tuple[str, ...] = (),
                    paused: bool = False, wait_banner: bool = True,
                    prefix: tuple[str, ...] = (), fill: str = "sparse", beat_pages: int = 0) -> LabGuest:
        """Start a guest; return once its monitor address is ready and, unless it is an incoming
        or ``paused`` (-S) guest or ``wait_banner`` is false, once the guest printed its banner
        (under nested KVM the firmware alone takes seconds: skip the wait when you can).
        ``prefix`` runs QEMU through a command, e.g. ``ip netns exec NS`` for a test host.
        ``fill`` and ``beat_pages``: what a pass writes in each page, a heartbeat every that many
        pages (see ``image.build_boot_sector``)."""
        if name in self.guests and self.guests[name].alive:
            raise LabError(f"lab guest {name!r} is already running")
        kind = MonitorKind(monitor)
        accel = accel or self.accel
        ram = ram_mib or max(32, image.min_ram_mib(ws_pages))
        disk = disk or await self.make_disk(name, ws_pages, pace, fill, beat_pages)
        argv = [*prefix, QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", "q35", "-accel", accel, "-cpu", "qemu64" if accel == "tcg" else "kvm64",
                "-m", str(ram),
                "-drive", f"file={disk},format=qcow2,if=ide,cache=unsafe",
                "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0"]
        if mem_file is not None:
            argv += ["-object", f"memory-backend-file,id=ram0,size={ram}M,mem-path={mem_file},share=on",
                     "-machine", "memory-backend=ram0"]
        listener, address, monitor_args = self.monitor_listener(name, kind)
        pass_fds = () if listener is None else (listener.fileno(),)
        argv += monitor_args
        if incoming:
            argv += ["-incoming", "defer"]
        if paused:
            argv += ["-S"]
        argv += list(extra_args)
        log_path = self.workdir / f"{name}.log"
        log.info("starting %s: %s", name, " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds, preexec_fn=die_with_parent,
                start_new_session=True)    # a Ctrl-C at the terminal must not reach the guests
        finally:
            if listener is not None:
                listener.close()      # QEMU holds its own copy now
        note_launch(proc.pid, accel)
        pty: asyncio.Future[str] | None = asyncio.get_running_loop().create_future() if kind is MonitorKind.HMP_PTY else None
        guest = LabGuest(name=name, address=address or Address.pty("?"), proc=proc, disk=disk,
                         ws_pages=ws_pages, ram_mib=ram, accel=accel, incoming=incoming, log_path=log_path)
        assert proc.stdout is not None and proc.stderr is not None
        if incoming:
            guest.banner.set()    # it arrives mid-loop by migration: heartbeats only, no banner
        guest._readers = [asyncio.create_task(guest._read_stdout(proc.stdout, pty)),
                          asyncio.create_task(guest._read_stderr(proc.stderr))]
        self.guests[name] = guest
        try:
            async with asyncio.timeout(BOOT_TIMEOUT_S):
                if pty is not None:
                    guest.address = Address.pty(await pty)
                if wait_banner and not incoming and not paused:
                    done = asyncio.ensure_future(guest.banner.wait())
                    exited = asyncio.ensure_future(proc.wait())
                    await asyncio.wait({done, exited}, return_when=asyncio.FIRST_COMPLETED)
                    done.cancel()
                    exited.cancel()
                    if not guest.banner.is_set():
                        raise LabError(f"{name}: QEMU exited ({proc.returncode}) before the guest booted: "
                                       f"{self._tail(log_path)}")
        except BaseException:
            await guest.kill()
            raise
        return guest

    def monitor_listener(self, name: str, kind: MonitorKind) -> tuple[socket.socket | None, Address | None,
                                                                      list[str]]:
        """The monitor of a guest about to start: a listening socket to pass to QEMU (None for a pty),
        its address (None for a pty: QEMU names it) and QEMU's arguments for it. Close the socket once
        QEMU runs."""
        listener: socket.socket | None = None
        address: Address | None = None
        if kind.kind is Kind.UNIX:
            path = self.workdir / f"{name}.{kind.protocol.value}"
            path.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            address = Address.unix(kind.protocol, str(path))
        elif kind.kind is Kind.TCP:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            address = Address.tcp(kind.protocol, "127.0.0.1", listener.getsockname()[1])
        mode = "control" if kind.protocol is Protocol.QMP else "readline"
        if listener is not None:
            listener.listen(8)
            args = ["-chardev", f"socket,id=mon0,fd={listener.fileno()},server=on,wait=off"]
        else:
            args = ["-chardev", "pty,id=mon0"]
        return listener, address, args + ["-mon", f"chardev=mon0,mode={mode}"]

    def own(self, guest: Killable) -> None:
        """Kill and reap ``guest`` (one this Lab did not start itself, e.g. a Linux guest) in ``aclose``."""
        self._others.append(guest)
        if isinstance(guest, Launched):
            note_launch(guest.pid, guest.accel)

    async def start_argv(self, name: str, argv: list[str], address: Address, *, ws_pages: int, ram_mib: int,
                         disk: Path, incoming: bool = True, timeout: float = 30.0) -> LabGuest:
        """Start a QEMU from a complete command line (e.g. one derived from another guest's) whose
        monitor listens on the unix socket ``address``; return once that socket accepts."""
        if address.path is None:
            raise LabError(f"{name}: start_argv needs a unix socket monitor address")
        log_path = self.workdir / f"{name}.log"
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent, start_new_session=True)
        note_launch(proc.pid, _accel_of(argv))
        guest = LabGuest(name=name, address=address, proc=proc, disk=disk, ws_pages=ws_pages, ram_mib=ram_mib,
                         accel=self.accel, incoming=incoming, log_path=log_path)
        guest.banner.set()
        assert proc.stdout is not None and proc.stderr is not None
        guest._readers = [asyncio.create_task(guest._read_stdout(proc.stdout, None)),
                          asyncio.create_task(guest._read_stderr(proc.stderr))]
        self.guests[name] = guest
        try:
            async with asyncio.timeout(timeout):
                while True:                     # QEMU binds the socket during start-up
                    if not guest.alive:
                        raise LabError(f"{name}: QEMU exited ({proc.returncode}): {self._tail(log_path)}")
                    try:
                        _, w = await asyncio.open_unix_connection(address.path)
                        w.close()
                        await w.wait_closed()
                        break
                    except OSError:
                        await asyncio.sleep(0.02)
        except BaseException:
            await guest.kill()
            raise
        return guest

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            return path.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no output)"

    async def aclose(self) -> None:
        """Kill and reap every guest; remove the work directory if we made it."""
        await asyncio.gather(*(g.kill() for g in [*self.guests.values(), *self._others]),
                             return_exceptions=True)
        self.guests.clear()
        self._others.clear()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    info = _parent_and_state(pid)
    return info is not None and info[1] != "Z"


def leftover_lab_processes(parent: int | None = None) -> list[int]:
    """PIDs of live (not zombie) QEMU processes started by a Lab, optionally only ``parent``'s children."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if not (cmd.startswith(QEMU.encode()) and LAB_DIR_PREFIX.encode() in cmd):
            continue
        info = _parent_and_state(int(entry))
        if info is None or info[1] == "Z" or (parent is not None and info[0] != parent):
            continue
        pids.append(int(entry))
    return pids
