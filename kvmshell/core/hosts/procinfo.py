"""Which QEMU process serves a monitor socket on this host, and how it was started.

The listening unix socket shows in /proc/net/unix with its path and inode; the process holding that
inode among its file descriptors is the QEMU. No connection is needed (a monitor serves one client
at a time, and kvmshell already is that client).
"""

from __future__ import annotations

import os

from kvmshell.core.values.cmdline import QemuCommand, parse_cmdline


def socket_inodes(path: str, net_unix: str = "/proc/net/unix") -> set[int]:
    inodes = set()
    real = os.path.realpath(path)
    with open(net_unix, encoding="utf-8", errors="replace") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] in (path, real):
                inodes.add(int(fields[6]))
    return inodes


def pid_listening_on(path: str, proc: str = "/proc") -> int | None:
    """The pid of the process holding the unix socket bound at ``path`` (None if none is found)."""
    wanted = {f"socket:[{i}]" for i in socket_inodes(path, f"{proc}/net/unix")}
    if not wanted:
        return None
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = f"{proc}/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") in wanted:
                        return int(entry)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def command_of(pid: int, proc: str = "/proc") -> QemuCommand:
    with open(f"{proc}/{pid}/cmdline", "rb") as f:
        return parse_cmdline(f.read())
