"""The Linux lab guest: a Debian kernel booted with ``-kernel/-initrd/-append``, running the workload
of ``workload.c`` (parts from :mod:`kvmshell.lab.linux`), talked to over its serial console.

QEMU's stdin and stdout are the guest's ttyS0: lines written to stdin are commands to the workload
(``check``, ``hold``, ``run``, ``where K``, ``where gen K``), its answers and its ``kvmshell-pass N``
lines arrive on stdout and are kept in ``LinuxGuest.lines`` (and in ``NAME.console`` in the Lab's directory). Its
heartbeats (``kvmshell-hb SEQ USEC`` every ``beat_ms``) go to ``LinuxGuest.beats`` instead, each
stamped with the host's monotonic clock on arrival (:mod:`kvmshell.lab.blackout` times a blackout
from them).

A stock Debian kernel does not boot under a kvm_pvm ``/dev/kvm``: there the guest runs under TCG, and
a log line says so. Elsewhere it uses KVM when ``/dev/kvm`` opens (KVMSHELL_ACCEL forces either).

Under TCG with QEMU before 9.0 the guest's RAM is 8 KiB larger than asked (see ``ram_option``): with a
size that is a multiple of 256 KiB those QEMUs lose guest writes in migration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmshell.core.values.address import Address
from kvmshell.errors import LabError
from kvmshell.lab.blackout import Beat
from kvmshell.lab.launcher import QEMU, Lab, MonitorKind, die_with_parent, kvm_usable
from kvmshell.lab.linux import LinuxParts, linux_parts

log = logging.getLogger(__name__)

WORKS = ("idle", "ws", "text", "hotcold", "sparse")
KERNEL_ARGS = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off no_timer_check"
"""``no_timer_check``: on a loaded host a TCG guest's boot-time check of the IO-APIC timer can miss its
ticks and panic ("IO-APIC + timer doesn't work!", seen at a load average of 90 on 2 cores)."""
RAM_HEADROOM_MIB = 192
"""Guest RAM beyond the working set: the kernel, the unpacked initramfs, the page tables; plus 1/16 of
the set for the kernel's per-page structures (a 1900 MiB set in 2060 MiB was OOM-killed)."""
PVM_MODULE = Path("/sys/module/kvm_pvm")
_CHECK_RE = re.compile(r"kvmshell-check (?:ok (?P<pages>\d+) pages|BAD page (?P<bad>\d+).*)")
TCG_RAM_PAD_KIB = 8
"""QEMU < 9.0, TCG: when a RAM block's size is a multiple of 64 pages (256 KiB), the migration's dirty
bitmap sync takes a fast path that clears the dirty bits without re-arming the vCPU's TLB, so later
stores through that TLB are never marked dirty and never sent (fixed upstream by 03bfc2188f "physmem: Fix
migration dirty bitmap coherency with TCG memory access", QEMU 9.0; not in Debian's 7.2). One more
target page (QEMU rounds -m to 8 KiB) makes the size unaligned and QEMU takes the path that re-arms it:
a paced workload's destination crashed in 15 of 15 migrations without, 0 of 15 with (bench/RESULTS.md)."""
TCG_DIRTY_FIXED = (9, 0)
_WHERE_RE = re.compile(r"kvmshell-where (page|gen) (\d+) (?:phys (0x[0-9a-f]+)|unknown)")
_BEAT_RE = re.compile(r"kvmshell-hb (\d+) (\d+)")


@dataclass(frozen=True)
class LinuxWork:
    """What the guest's workload does, as knobs on the kernel command line (see workload.c)."""
    work: str = "ws"            # idle | ws | text | hotcold
    ws_mib: int = 64            # working set, MiB
    rate_mb_s: int = 0          # rewrite rate in MB/s; 0 = as fast as the vCPU goes
    seed: int = 1
    hot_pct: int = 10           # hotcold: the share of pages rewritten
    beat_ms: int = 2            # a heartbeat line every beat_ms (0: none)

    def __post_init__(self) -> None:
        if self.work not in WORKS:
            raise LabError(f"unknown Linux guest workload {self.work!r}: one of {', '.join(WORKS)}")
        if not 0 <= self.ws_mib <= 2048:
            raise LabError(f"working set of {self.ws_mib} MiB: 0 to 2048")
        if not 0 <= self.beat_ms <= 10000:
            raise LabError(f"heartbeat every {self.beat_ms} ms: 0 (none) to 10000")

    def append(self) -> str:
        """The kernel command line."""
        return (f"{KERNEL_ARGS} kvmshell.work={self.work} kvmshell.ws_mib={self.ws_mib} "
                f"kvmshell.rate={self.rate_mb_s} kvmshell.seed={self.seed} kvmshell.hot_pct={self.hot_pct} "
                f"kvmshell.beat_ms={self.beat_ms}")

    @property
    def ram_mib(self) -> int:
        return self.ws_mib + RAM_HEADROOM_MIB + self.ws_mib // 16


@dataclass(frozen=True)
class GuestCheck:
    """The guest's own verdict on its working set (one ``kvmshell-check`` line)."""
    ok: bool
    pages: int | None           # pages checked (when ok)
    bad_page: int | None        # the first bad page (when not)
    line: str

    @classmethod
    def parse(cls, line: str) -> GuestCheck:
        m = _CHECK_RE.search(line)
        if m is None:
            raise LabError(f"not a kvmshell-check line: {line!r}")
        if m.group("pages") is not None:
            return cls(True, int(m.group("pages")), None, line)
        return cls(False, None, int(m.group("bad")), line)


_qemu_version: tuple[int, int] | None = None


def qemu_version() -> tuple[int, int]:
    """(major, minor) of the lab's QEMU, asked once; (0, 0) when it cannot tell."""
    global _qemu_version
    if _qemu_version is None:
        try:
            out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"version (\d+)\.(\d+)", out)
        _qemu_version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return _qemu_version


def ram_option(ram_mib: int, accel: str, version: tuple[int, int]) -> str:
    """QEMU's ``-m`` for ``ram_mib``: padded by ``TCG_RAM_PAD_KIB`` under TCG on a QEMU that loses
    dirty pages with a 256 KiB-aligned RAM size."""
    if accel.startswith("tcg") and version < TCG_DIRTY_FIXED:
        return f"{ram_mib * 1024 + TCG_RAM_PAD_KIB}K"
    return f"{ram_mib}M"


def linux_accel() -> str:
    """TCG where a stock kernel cannot run under /dev/kvm (kvm_pvm) or it does not open; else KVM."""
    forced = os.environ.get("KVMSHELL_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if not kvm_usable():
        log.info("Linux lab guest: /dev/kvm does not open here, using TCG")
        return "tcg"
    if PVM_MODULE.exists():
        log.info("Linux lab guest: /dev/kvm is kvm_pvm, where a stock Debian kernel does not boot; using TCG")
        return "tcg"
    return "kvm"


@dataclass
class LinuxGuest:
    """A running Linux lab guest: its QEMU, monitor address and serial console."""
    name: str
    address: Address
    proc: asyncio.subprocess.Process
    work: LinuxWork
    ram_mib: int
    accel: str
    incoming: bool
    log_path: Path
    console_path: Path
    lines: list[str] = field(default_factory=list)
    passes: int = 0
    beats: list[Beat] = field(default_factory=list)
    _console_closed: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
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

    async def wait_line(self, pattern: str | re.Pattern[str], *, start: int = 0,
                        timeout: float = 30.0) -> re.Match[str]:
        """The first console line from index ``start`` on that matches ``pattern`` (waiting for it)."""
        rx = re.compile(pattern)
        i = start
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for i in range(i, len(self.lines)):
                        m = rx.search(self.lines[i])
                        if m:
                            return m
                    i = len(self.lines)
                    if not self.alive or self._console_closed:
                        await self.proc.wait()
                        raise self._gone(f"QEMU exited ({self.proc.returncode}) waiting for {rx.pattern!r}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = " | ".join(self.lines[-3:])
            raise self._gone(f"no {rx.pattern!r} on the console within {timeout} s "
                             f"(last: {tail or 'nothing'})") from None

    def kernel_trouble(self) -> str:
        """The first lines of a kernel oops or panic on the console ("" when there is none)."""
        bad = [line for line in self.lines if re.search(r"BUG:|Oops|Kernel panic|RIP: ", line)]
        return " | ".join(bad[:3])

    def _gone(self, what: str) -> LabError:
        trouble = self.kernel_trouble()
        said = f"; the guest kernel says: {trouble}" if trouble else \
            f"; the console's last lines: {' | '.join(self.lines[-3:])}" if self.lines and "last:" not in what else ""
        return LabError(f"{self.name}: {what}{said} (console: {self.console_path})")

    async def send(self, line: str) -> int:
        """Type a command line on the guest's console; the index of the next console line."""
        assert self.proc.stdin is not None
        if not self.alive:
            raise self._gone(f"QEMU exited ({self.proc.returncode}) before {line!r} could be sent")
        mark = len(self.lines)
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return mark

    async def ask(self, command: str, answer: str, timeout: float = 30.0) -> re.Match[str]:
        mark = await self.send(command)
        return await self.wait_line(answer, start=mark, timeout=timeout)

    async def check(self, timeout: float = 60.0) -> GuestCheck:
        """Have the guest verify every page of its working set."""
        m = await self.ask("check", _CHECK_RE, timeout)
        return GuestCheck.parse(m.group(0))

    async def hold(self) -> None:
        """Stop rewriting pages (the set stays as it is until ``resume``)."""
        await self.ask("hold", r"kvmshell-hold")

    async def resume(self) -> None:
        await self.ask("run", r"kvmshell-run")

    async def where(self, page: int, *, gen: bool = False) -> int:
        """The guest-physical address of a page of the working set (``gen``: of its entry in the
        generation table)."""
        m = await self.ask(f"where gen {page}" if gen else f"where {page}", _WHERE_RE)
        if m.group(3) is None:
            raise LabError(f"{self.name}: the guest cannot tell where {'the generation of ' if gen else ''}"
                           f"page {page} is")
        return int(m.group(3), 16)

    async def wait_passes(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the workload has rewritten its working set ``count`` more times."""
        target = self.passes + count
        try:
            async with asyncio.timeout(timeout):
                while self.passes < target:
                    if not self.alive or self._console_closed:
                        await self.proc.wait()
                        raise self._gone(f"QEMU exited ({self.proc.returncode}) waiting for a pass")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise self._gone(f"{target - self.passes} of {count} passes missing after {timeout} s") from None

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
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()

    async def _read_console(self, stream: asyncio.StreamReader) -> None:
        with open(self.console_path, "ab") as f:
            while raw := await stream.readline():
                line = raw.decode(errors="replace").strip("\r\n")
                beat = _BEAT_RE.fullmatch(line)
                if beat:
                    self.beats.append(Beat(time.monotonic(), int(beat.group(1)), int(beat.group(2)) / 1e6))
                    continue
                f.write(raw)
                f.flush()
                self.lines.append(line)
                if line.startswith("kvmshell-pass "):
                    self.passes += 1
                self._changed.set()
        self._console_closed = True
        self._changed.set()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        with open(self.log_path, "ab") as f:
            while chunk := await stream.read(65536):
                f.write(chunk)
                f.flush()
        self._changed.set()


async def start_linux(lab: Lab, name: str, work: LinuxWork = LinuxWork(), *,
                      monitor: MonitorKind = MonitorKind.QMP_UNIX, incoming: bool = False,
                      parts: LinuxParts | None = None, ram_mib: int | None = None,
                      mem_file: Path | None = None, accel: str | None = None,
                      qemu_args: tuple[str, ...] = (), timeout: float = 60.0,
                      prefix: tuple[str, ...] = ()) -> LinuxGuest:
    """Start a Linux guest in ``lab`` (which kills it on close). Returns once its workload is ready
    (``kvmshell-ready`` on the console), or at once for an ``incoming`` (-incoming defer) guest.
    ``mem_file`` backs guest RAM with a shared file (to corrupt a page from outside); ``qemu_args`` are
    appended to QEMU's command line (experiments: ``-accel``/``-cpu`` options, ``-smp``); ``prefix``
    runs QEMU through a command, e.g. ``ip netns exec NS`` for a test host."""
    parts = parts or await linux_parts()
    accel = accel or linux_accel()
    ram = ram_mib or work.ram_mib
    ram_size = ram_option(ram, accel, qemu_version())
    listener, address, monitor_args = lab.monitor_listener(name, monitor)
    if address is None:
        raise LabError("the Linux lab guest needs a unix or tcp monitor")
    argv = [*prefix, QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35", "-accel", accel, "-cpu", "qemu64" if accel.startswith("tcg") else "host",
            "-m", ram_size, "-kernel", str(parts.kernel), "-initrd", str(parts.initrd),
            "-append", work.append(),
            "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0", *monitor_args]
    if mem_file is not None:
        argv += ["-object", f"memory-backend-file,id=ram0,size={ram_size},mem-path={mem_file},share=on",
                 "-machine", "memory-backend=ram0"]
    argv += qemu_args
    if incoming:
        argv += ["-incoming", "defer"]
    log.info("starting Linux guest %s (%s, %s): %s", name, accel, work.append(), " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(listener.fileno(),) if listener else (),
            preexec_fn=die_with_parent, start_new_session=True)
    finally:
        if listener is not None:
            listener.close()
    assert proc.stdout is not None and proc.stderr is not None
    guest = LinuxGuest(name=name, address=address, proc=proc, work=work, ram_mib=ram, accel=accel,
                       incoming=incoming, log_path=lab.workdir / f"{name}.log",
                       console_path=lab.workdir / f"{name}.console")
    guest._readers = [asyncio.create_task(guest._read_console(proc.stdout)),
                      asyncio.create_task(guest._read_stderr(proc.stderr))]
    lab.own(guest)
    if not incoming:
        await guest.wait_line(r"kvmshell-ready", timeout=timeout)
    return guest
