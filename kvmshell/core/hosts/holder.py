"""Who holds a unix monitor socket on this host: the processes connected to the socket bound at a path,
as ``ss -xp`` shows them (the peer of each connection QEMU accepted there), with their command lines."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from kvmshell.core.hosts.shell import run_here

SS_TIMEOUT = 2.0
COMMAND_CHARS = 60                 # of a holder's command line, in a message

# u_str ESTAB RECV-Q SEND-Q LOCAL-PATH|* INODE PEER-PATH|* PEER-INODE [users:(("cmd",pid=N,fd=N),...)]
_ROW = re.compile(r"^u_str\s+\S+\s+\d+\s+\d+\s+(?P<local>.+?)\s+(?P<inode>\d+)\s+(?P<peer>\S+)\s+"
                  r"(?P<peer_inode>\d+)\s*(?P<users>users:.*)?$")
_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class UnixRow:
    local: str                     # the bound path, or "*"
    inode: int
    peer_inode: int                # 0: not connected yet (in the listener's backlog)
    pids: tuple[int, ...]          # the processes holding this socket (those ss may see)


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str                   # its command line, truncated

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def parse_ss(text: str) -> list[UnixRow]:
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows.append(UnixRow(m["local"], int(m["inode"]), int(m["peer_inode"]),
                                tuple(int(p) for p in _PID.findall(m["users"] or ""))))
    return rows


def unix_peers(rows: list[UnixRow], paths: set[str]) -> list[int]:
    """The pids at the other end of the connections accepted on a socket bound at one of ``paths``."""
    peers = {r.peer_inode for r in rows if r.local in paths and r.peer_inode}
    return sorted({pid for r in rows if r.inode in peers for pid in r.pids})


def command_line(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not argv:
        return None                # a zombie, or a kernel thread
    text = " ".join([os.path.basename(argv[0]), *argv[1:]])
    return text if len(text) <= COMMAND_CHARS else text[:COMMAND_CHARS - 3] + "..."


async def holders(path: str) -> list[Holder]:
    """The other processes connected to the unix socket bound at ``path`` here ([] if none is seen:
    ``ss`` missing, or the processes belong to another user)."""
    result = await run_here("ss -xpnH", SS_TIMEOUT)      # no ss: sh says so on stderr, stdout is empty
    if result is None:
        return []
    out = result.stdout
    pids = unix_peers(parse_ss(out.decode(errors="replace")), {path, os.path.realpath(path)})
    found = []
    for pid in pids:
        command = command_line(pid)
        if pid != os.getpid() and command is not None:
            found.append(Holder(pid, command))
    return found
