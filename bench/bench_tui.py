"""The dashboard with 50 real guests: its CPU use idle and with 5 migrations running, and the time
from a key press to the next frame.

    .venv/bin/python bench/bench_tui.py [--guests 50] [--pairs 5] [--seconds 60] [--write bench/RESULTS-tui.md]

The real `kvmshell tui` runs in a pseudo-terminal (120x40) attached to GUESTS real QEMU guests: PAIRS
sources that dirty memory, PAIRS destinations waiting with -incoming defer, and the rest paused
(-S, small RAM). CPU is the TUI process's own (utime + stime from /proc) over SECONDS. A key's
latency runs from writing the key to the pty until the frame that shows its effect has been read
back (the pane's title naming the newly selected guest, or the events log's new title). The
migrations are started by typing into the TUI's command bar, like a user would.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import fcntl
import os
import platform
import pty
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmshell.lab import image  # noqa: E402
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLS, ROWS = 120, 40
ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1bP.*?\x1b\\", re.S)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Tui:
    """`kvmshell tui` in a pty; everything it writes is kept (ANSI codes dropped) for searching."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.raw = bytearray()
        self.text = bytearray()
        self.changed = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.master = -1

    def start(self) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave, env=self.env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        os.set_blocking(master, False)
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
            self.changed.set()
            return
        self.raw += chunk
        self.text += ANSI.sub(b"", chunk)
        self.changed.set()

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def wait_for(self, needle: bytes, start: int = 0, timeout: float = 60) -> float:
        """Wait until ``needle`` appears in the output after offset ``start``; when it did."""
        try:
            async with asyncio.timeout(timeout):
                while needle not in self.text[start:]:
                    self.changed.clear()
                    if self.proc is not None and self.proc.poll() is not None:
                        raise SystemExit(f"the TUI exited ({self.proc.returncode}):\n"
                                         f"{self.text[-2000:].decode(errors='replace')}")
                    await self.changed.wait()
        except TimeoutError:
            raise SystemExit(f"{needle.decode()!r} not shown within {timeout} s; the TUI wrote last:\n"
                             f"{self.text[-3000:].decode(errors='replace')}") from None
        return time.perf_counter()

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    async def type(self, text: str, pause: float = 0.01) -> None:
        for ch in text:
            self.write(ch.encode())
            await asyncio.sleep(pause)      # a person types; textual reads keys one at a time anyway

    async def stop(self) -> None:
        if self.proc is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self.master)
        except (ValueError, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        os.close(self.master)


async def measure_cpu(tui: Tui, seconds: float) -> float:
    """Percent of one core the TUI used over ``seconds``."""
    c0, t0 = tui.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)          # a measuring window, not a wait for a condition
    c1, t1 = tui.cpu_seconds(), time.perf_counter()
    return 100 * (c1 - c0) / (t1 - t0)


async def key_latencies(tui: Tui, here: str, below: str, samples: int) -> list[float]:
    """Down/Up in the guest list between two neighbours: from the key to the frame whose pane title
    names the newly selected guest. Starts and ends with ``here`` selected."""
    out = []
    for i in range(samples + samples % 2):
        down = i % 2 == 0
        marker = f"migration: {below if down else here}".encode()
        start = len(tui.text)
        t0 = time.perf_counter()
        tui.write(b"\x1b[B" if down else b"\x1b[A")
        t1 = await tui.wait_for(marker, start, timeout=10)
        out.append((t1 - t0) * 1000)
        await asyncio.sleep(0.13 + 0.07 * (i % 5))     # spread the presses over the timers' phases
    return out


async def toggle_latencies(tui: Tui, selected: str, samples: int) -> list[float]:
    """`e` switches the events log between all guests and the selected one: key to the new title.
    Ends showing all guests (an even number of presses)."""
    out = []
    for i in range(samples + samples % 2):
        marker = f"events: {selected}".encode() if i % 2 == 0 else b"events: all guests"
        start = len(tui.text)
        t0 = time.perf_counter()
        tui.write(b"e")
        t1 = await tui.wait_for(marker, start, timeout=10)
        out.append((t1 - t0) * 1000)
        await asyncio.sleep(0.13 + 0.07 * (i % 5))
    return out


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return f"median {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"


async def start_guests(lab: Lab, total: int, pairs: int) -> tuple[list[LabGuest], list[tuple[str, str]]]:
    guests: list[LabGuest] = []
    couples = []
    pace = image.pace_for_rate(8e6)
    for i in range(pairs):
        src = await lab.start(f"src{i}", MonitorKind.QMP_UNIX, ws_pages=4096, pace=pace, ram_mib=48, wait_banner=False)
        dst = await lab.start(f"dst{i}", MonitorKind.QMP_UNIX if i % 2 else MonitorKind.HMP_UNIX, ws_pages=4096,
                              ram_mib=48, incoming=True, disk=src.disk)
        guests += [src, dst]
        couples.append((src.name, dst.name))
    idle = total - 2 * pairs
    for base in range(0, idle, 10):
        batch = [lab.start(f"g{n:02d}", MonitorKind.HMP_UNIX if n % 10 == 9 else MonitorKind.QMP_UNIX,
                           ws_pages=0, ram_mib=32, paused=True) for n in range(base, min(idle, base + 10))]
        guests += await asyncio.gather(*batch)
    return guests, couples


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    import textual
    return (f"{os.cpu_count()} x {cpu}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"Linux {platform.release()}, {qemu}, Python {platform.python_version()}, textual {textual.__version__}")


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", type=int, default=50)
    p.add_argument("--pairs", type=int, default=5, help="migrations to run (each takes two of the guests)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each CPU window")
    p.add_argument("--keys", type=int, default=40, help="key presses per latency measurement")
    p.add_argument("--write", metavar="FILE", help="write the figures to FILE (markdown)")
    p.add_argument("--profile", metavar="FILE", help="run the TUI under cProfile, writing FILE")
    args = p.parse_args()
    kvmshell = shutil.which("kvmshell", path=str(ROOT / ".venv" / "bin")) or "kvmshell"
    async with Lab() as lab:
        t0 = time.perf_counter()
        guests, couples = await start_guests(lab, args.guests, args.pairs)
        print(f"{len(guests)} guests started in {time.perf_counter() - t0:.1f} s ({lab.accel})", flush=True)
        state = tempfile.mkdtemp(prefix="kvmshell-bench-tui-")
        cfg = Path(state) / "config.toml"
        cfg.write_text("")
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor", "XDG_STATE_HOME": state,
               "KVMSHELL_CONFIG": str(cfg), "LINES": str(ROWS), "COLUMNS": str(COLS)}
        argv = [kvmshell] if not args.profile else [sys.executable, "-m", "cProfile", "-o", args.profile, kvmshell]
        for g in guests:
            argv += ["--guest", g.guest_option]
        tui = Tui(argv + ["tui"], env)
        tui.start()
        try:
            t0 = time.perf_counter()
            await tui.wait_for(f"guests {len(guests)}".encode(), timeout=120)
            started = time.perf_counter() - t0
            names = sorted(g.name for g in guests)
            await tui.wait_for(f"migration: {names[0]}".encode(), timeout=30)
            print(f"TUI up with {len(guests)} guests in {started:.1f} s", flush=True)
            await asyncio.sleep(3)            # let the first polls and the RAM queries settle before measuring
            idle_cpu = await measure_cpu(tui, args.seconds)
            print(f"idle: {idle_cpu:.1f} % of one core over {args.seconds:.0f} s", flush=True)
            idle_keys = await key_latencies(tui, names[0], names[1], args.keys)
            idle_toggle = await toggle_latencies(tui, names[0], args.keys // 2)
            print(f"idle key->frame (select): {summary(idle_keys)}; (events toggle): {summary(idle_toggle)}", flush=True)

            tui.write(b"/")                    # the command bar stays open between commands
            await tui.wait_for(b"info migrate (TAB completes", timeout=10)
            for src, dst in couples:
                await tui.type(f"@{src} migrate --to {dst} --strategy precopy --bandwidth 2M --stall-timeout 600")
                start = len(tui.text)
                tui.write(b"\r")
                await tui.wait_for(f"migrating to {dst}".encode(), start, timeout=30)
            # show a migrating guest's pane (it redraws twice a second) while measuring
            here, below = names[-2], names[-1]
            start = len(tui.text)
            await tui.type(f"use {here}")
            tui.write(b"\r")
            await tui.wait_for(f"migration: {here} ->".encode(), start, timeout=30)
            tui.write(b"\x1b")
            await tui.wait_for(f"{len(couples)} migrating".encode(), timeout=30)
            print(f"{len(couples)} migrations running; {here} selected", flush=True)
            busy_cpu = await measure_cpu(tui, args.seconds)
            print(f"{len(couples)} migrations: {busy_cpu:.1f} % of one core over {args.seconds:.0f} s", flush=True)
            busy_keys = await key_latencies(tui, here, below, args.keys)
            busy_toggle = await toggle_latencies(tui, here, args.keys // 2)
            print(f"busy key->frame (select): {summary(busy_keys)}; (events toggle): {summary(busy_toggle)}",
                  flush=True)
            still = f"{len(couples)} migrating".encode() in tui.text[-20000:]
            tui.write(b"q")
            await tui.wait_for(b"Quit anyway?", timeout=10)
            tui.write(b"y")
            assert tui.proc is not None
            for _ in range(200):
                if tui.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            exit_status = tui.proc.poll()
        finally:
            await tui.stop()
            shutil.rmtree(state, ignore_errors=True)
    report = f"""# The dashboard under load (`bench/bench_tui.py`)

Measured {datetime.date.today().isoformat()} on {machine()}.

`kvmshell tui` in a 120x40 pseudo-terminal, attached to {len(guests)} real QEMU guests ({len(guests) - 2 * len(couples)}
paused with 32 MiB of RAM, {len(couples)} sources dirtying a 16 MiB working set at about 8 MB/s, {len(couples)}
destinations waiting with `-incoming defer`; one in ten on an HMP monitor). Status polled at 1 Hz for every guest,
migrating guests shown at 2 Hz from their samplers. CPU is the TUI process's own (utime + stime) over
{args.seconds:.0f} s; a key's latency runs from writing it to the pty until the frame showing its effect has been
read back from the pty.

| | target | measured |
|---|---|---|
| CPU, {len(guests)} guests idle | < 10 % of one core | **{idle_cpu:.1f} %** |
| CPU, {len(couples)} migrations running (pre-copy capped at 2 MB/s{', still running at the end' if still else ''}), one shown in the pane | - | **{busy_cpu:.1f} %** |
| key to frame, idle: Down/Up in the guest list (the pane follows) | < 100 ms | {summary(idle_keys)} |
| key to frame, idle: `e` (events log scope) | < 100 ms | {summary(idle_toggle)} |
| key to frame, {len(couples)} migrations: Down/Up between two migrating guests | < 100 ms | {summary(busy_keys)} |
| key to frame, {len(couples)} migrations: `e` | < 100 ms | {summary(busy_toggle)} |

Startup: the TUI listed the {len(guests)} guests {started:.1f} s after it was started (connecting every monitor and
fetching each guest's data once). `q` with migrations running asked first; the TUI exited with status {exit_status}.

A key's latency is mostly two frames: the list's cursor moves in the first frame (about 4 ms after the key),
the pane follows in the next one (textual paces frames at 60 per second); `e` changes one widget and shows in
the first frame. Regenerate with `.venv/bin/python bench/bench_tui.py --write bench/RESULTS-tui.md`.
"""
    print(report)
    if args.write:
        Path(args.write).write_text(report)
        print(f"written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
