"""How fast is the path the migration stream will take? A short, bounded TCP transfer along it.

The stream goes from the source QEMU's network namespace to where the destination listens (for
`migrate --to DEST` without a URI: tcp:127.0.0.1:PORT, so both QEMUs must share a namespace; with
a URI tcp:HOST:PORT, HOST in the destination's namespace). The probe runs a receiver where the
destination would listen (same namespace, same address, a free port) and a sender where the source
runs, sends zeros for at most ``PROBE_SECONDS`` or ``PROBE_BYTES`` (whichever comes first), and
takes the receiver's figure: bytes received after the first read, over the time from the first to
the last read.

Both ends are small Python processes. Here: this interpreter (``-c``), started through ``nsenter
--net=/proc/PID/ns/net`` when the QEMU's namespace is not kvmshell's own; they die with kvmshell
(PR_SET_PDEATHSIG) and are killed and reaped when the probe ends, whatever happens. On a guest's
SSH host: ``python3 -c`` in kvmshell's SSH session there (the namespace sshd runs in, which is the
QEMU's in the usual case but is not checked); without python3 there, no probe (nc or dd are not
used: their options differ between implementations and they report no timing). A remote end
always ends by itself within ``RECV_WAIT`` s of losing its peer.

Where kvmshell would migrate (no URI): 127.0.0.1 when both QEMUs share a namespace or an SSH host,
the destination host's SSH address when they are on different hosts. Where the path cannot be
known or probed (a monitor whose QEMU cannot be found, two namespaces here and no URI, a source on
another host migrating to this one and no URI), ``plan_probe`` says why in one line instead, and
the caller says "not probed: ..." rather than guessing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmshell.core.values.address import Address, Kind, SshTarget
from kvmshell.core.values.uri import parse_uri
from kvmshell.core.hosts.processes import free_port, pid_listening_on
from kvmshell.errors import KvmError

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool
    from kvmshell.core.hosts.ssh.connection import RemoteResult

PROBE_SECONDS = 2.0
PROBE_BYTES = 64 * 2**20
CHUNK = 256 * 1024
RECV_WAIT = 10.0           # the receiver gives up after this long without a connection or data
CONNECT_WAIT = 5.0         # the sender retries a refused connection this long

# argv: recv HOST WAIT [PORT] | send HOST PORT MAX_BYTES MAX_SECONDS
# The receiver prints its port, then "bytes first_read_bytes seconds"; the sender retries a refused
# connection for CONNECT_WAIT s (a receiver on another host may not listen yet) and prints what it sent.
_PROGRAM = r"""
import socket, sys, time
mode, host = sys.argv[1], sys.argv[2]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "recv":
    wait = float(sys.argv[3])
    s = socket.socket(fam)
    s.bind((host, int(sys.argv[4]) if len(sys.argv) > 4 else 0))
    s.listen(1)
    print(s.getsockname()[1], flush=True)
    s.settimeout(wait)
    c, _ = s.accept()
    c.settimeout(wait)
    buf = bytearray(1 << 20)
    total = first_n = 0
    first = last = None
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        now = time.monotonic()
        if first is None:
            first, first_n = now, k
        total += k
        last = now
    c.close()
    print(total, first_n, (last - first) if first is not None else 0.0, flush=True)
else:
    port, limit, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    until = time.monotonic() + %(connect_wait)f
    while True:
        try:
            c = socket.create_connection((host, port), timeout=seconds + 5)
            break
        except ConnectionRefusedError:
            if time.monotonic() > until:
                raise
            time.sleep(0.05)
    chunk = bytes(%(chunk)d)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < limit and time.monotonic() < deadline:
        n = min(len(chunk), limit - sent)
        c.sendall(chunk[:n] if n < len(chunk) else chunk)
        sent += n
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print(sent, flush=True)
""" % {"chunk": CHUNK, "connect_wait": CONNECT_WAIT}


class ProbeFailed(KvmError):
    """The link probe could not run or did not finish; the message says where it broke."""

    title = "link probe failed"


@dataclass(frozen=True)
class ProbePlan:
    """Where to run the probe: the namespaces here (None: kvmshell's own) or the SSH hosts, and the
    address to listen on."""

    src_netns: str | None
    dst_netns: str | None
    host: str
    path: str                  # the path in words: "loopback in one network namespace", ...
    src_ssh: SshTarget | None = None    # an end on another host: run there, in its SSH session
    dst_ssh: SshTarget | None = None


@dataclass(frozen=True)
class ProbeResult:
    rate: float                # bytes/s
    bytes: int                 # bytes counted (received after the first read)
    seconds: float
    sent: int
    path: str

    def describe(self) -> str:
        return (f"probed: {self.bytes / 2**20:.0f} MiB in {self.seconds:.2f} s over {self.path}")


@dataclass(frozen=True)
class LinkFigure:
    """The link speed the model uses and where it came from (said in the estimate, never silently)."""

    rate: float | None         # bytes/s
    how: str                   # configured | probed | assumed
    detail: str                # one line: the flag or setting, the probe's bytes and time, or why not

    def text(self) -> str:
        head = f"{self.rate / 1e6:.0f} MB/s" if self.rate else "not known"
        return f"link: {head} ({self.detail})"


def _own_netns() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/net")
    return st.st_dev, st.st_ino


def netns_of(pid: int) -> str:
    """The network namespace path of a local process (ProbeFailed if it cannot be read)."""
    path = f"/proc/{pid}/ns/net"
    try:
        os.stat(path)
    except OSError as e:
        raise ProbeFailed(f"cannot read the network namespace of pid {pid}: {e.strerror}") from None
    return path


def same_netns(a: str | None, b: str | None) -> bool:
    def key(p: str | None) -> tuple[int, int]:
        if p is None:
            return _own_netns()
        st = os.stat(p)
        return st.st_dev, st.st_ino
    return key(a) == key(b)


def local_qemu_netns(name: str, address: Address) -> tuple[str | None, str | None]:
    """(namespace path, None) for a guest whose QEMU runs here, else (None, why it cannot be found)."""
    if address.kind is not Kind.UNIX or address.path is None:
        return None, f"cannot tell which process serves {name}'s monitor {address} (only unix sockets are traced)"
    pid = pid_listening_on(address.path)
    if pid is None:
        return None, f"no process found holding {name}'s monitor socket {address.path}"
    return netns_of(pid), None


def _place(name: str, address: Address, pool: HostPool | None) -> tuple[str | None, SshTarget | None, str | None]:
    """Where a guest's QEMU runs: (namespace path here, None, None), (None, its SSH host, None), or why not."""
    if address.ssh is not None:
        if pool is None:
            return None, None, f"{name} is on {address.ssh.host} over SSH and kvmshell has no SSH hosts configured"
        return None, address.ssh, None
    ns, why = local_qemu_netns(name, address)
    return ns, None, why


def plan_probe(source: str, src_addr: Address, dest: str, dst_addr: Address, uri: str | None,
               pool: HostPool | None = None) -> tuple[ProbePlan | None, str | None]:
    """Where the probe must run for a migration from ``source`` to ``dest`` (optionally at ``uri``):
    a plan, or why there is none. Guests on SSH hosts are probed from their host's SSH session."""
    src_ns, src_ssh, why = _place(source, src_addr, pool)
    if why is not None:
        return None, why
    dst_ns, dst_ssh, why = _place(dest, dst_addr, pool)
    if why is not None:
        return None, why
    if src_ssh is None and dst_ssh is None:
        shared = same_netns(src_ns, dst_ns)
        where = "one network namespace" if shared else f"{source}'s network namespace to {dest}'s"
    else:
        assert pool is not None
        shared = src_ssh is not None and dst_ssh is not None and pool.key(src_ssh) == pool.key(dst_ssh)

        def at(ssh: SshTarget | None) -> str:
            return f"{pool.label(ssh)} (its SSH session)" if ssh is not None else "this host"
        where = f"on {at(src_ssh)}" if shared else f"{at(src_ssh)} to {at(dst_ssh)}"
    if uri is not None:
        parsed = parse_uri(uri)
        host = parsed.host if parsed is not None and parsed.tcp else None
        if host is None:
            return None, f"the stream would go over {uri.split(':', 1)[0]}:, not TCP: only TCP paths are probed"
        if host in ("", "0", "0.0.0.0", "::"):
            return None, f"{uri} names no address the source can connect to"
        return ProbePlan(src_ns, dst_ns, host, f"TCP to {host} ({where})", src_ssh, dst_ssh), None
    if shared:
        return ProbePlan(src_ns, dst_ns, "127.0.0.1", f"loopback ({where}; tcp:127.0.0.1, where kvmshell would "
                                                      f"migrate)", src_ssh, dst_ssh), None
    if dst_ssh is not None:          # where kvmshell would migrate: the destination host's SSH address
        return ProbePlan(src_ns, dst_ns, dst_ssh.host, f"TCP to {dst_ssh.host} ({where})", src_ssh, dst_ssh), None
    if src_ssh is not None:
        return None, (f"{dest} runs here and {source} on another host: kvmshell cannot tell which of this host's "
                      f"addresses {source} reaches; give it as the URI (tcp:HOST:PORT)")
    return None, (f"{source} and {dest} run in different network namespaces, and tcp:127.0.0.1 (where kvmshell "
                  f"would migrate) does not join them: give the destination's address as the URI (tcp:HOST:PORT)")


def _die_with_parent() -> None:  # in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _argv(netns: str | None, *args: str) -> list[str]:
    prog = [sys.executable, "-c", _PROGRAM, *args]
    if netns is None or same_netns(netns, None):
        return prog
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise ProbeFailed("nsenter (util-linux) not found: cannot enter the guests' network namespace")
    return [nsenter, f"--net={netns}", *prog]


class _End:
    """One end of the probe, running here (a child process) or on a host (an SSH channel)."""

    async def readline(self) -> bytes:
        raise NotImplementedError

    async def finish(self, timeout: float) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError


class _LocalEnd(_End):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def readline(self) -> bytes:
        assert self.proc.stdout is not None
        return await self.proc.stdout.readline()

    async def finish(self, timeout: float) -> tuple[int, bytes, bytes]:
        async with asyncio.timeout(timeout):
            out, err = await self.proc.communicate()
        return self.proc.returncode or 0, out, err

    async def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        await self.proc.wait()


class _RemoteEnd(_End):
    """An end run on a host through ``HostPool.run``: it ends by itself (the receiver stops waiting
    after ``RECV_WAIT`` s, the sender after its bound), so dropping the command is all ``kill`` does."""

    def __init__(self, task: asyncio.Task[RemoteResult], port: int | None) -> None:
        self.task = task
        self.port = port              # a receiver's port, chosen before it started

    async def readline(self) -> bytes:
        return f"{self.port}\n".encode()

    async def finish(self, timeout: float) -> tuple[int, bytes, bytes]:
        async with asyncio.timeout(timeout):
            r = await self.task
        out = r.stdout.partition(b"\n")[2] if self.port is not None else r.stdout
        return r.exit_status, out, r.stderr

    async def kill(self) -> None:
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                preexec_fn=_die_with_parent)


async def _start(netns: str | None, ssh: SshTarget | None, pool: HostPool | None, *args: str) -> _End:
    if ssh is None:
        return _LocalEnd(await _spawn(_argv(netns, *args)))
    assert pool is not None
    found = await pool.run(ssh, "command -v python3")
    if not found.ok:
        raise ProbeFailed(f"no python3 on {pool.label(ssh)}: the probe runs its two ends with python3 "
                          f"(nc or dd are not used)")
    port = None
    if args[0] == "recv":
        port = await free_port(pool, ssh)
        args = (*args, str(port))
    command = "exec python3 -c " + " ".join(shlex.quote(a) for a in (_PROGRAM, *args))
    task = asyncio.create_task(pool.run(ssh, command, timeout=RECV_WAIT + PROBE_SECONDS + CONNECT_WAIT + 10))
    return _RemoteEnd(task, port)


def _last_error(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


async def run_probe(plan: ProbePlan, *, max_bytes: int = PROBE_BYTES, max_seconds: float = PROBE_SECONDS,
                    timeout: float | None = None, pool: HostPool | None = None) -> ProbeResult:
    """Run the transfer of ``plan``; ProbeFailed (one line) if it cannot."""
    limit = timeout if timeout is not None else max_seconds + RECV_WAIT + 5
    ends: list[_End] = []
    try:
        async with asyncio.timeout(limit):
            recv = await _start(plan.dst_netns, plan.dst_ssh, pool, "recv", plan.host, str(RECV_WAIT))
            ends.append(recv)
            line = await recv.readline()
            if not line.strip().isdigit():
                _, _, err = await recv.finish(limit)
                raise ProbeFailed(f"the receiver could not listen on {plan.host}: {_last_error(err)}")
            port = line.decode().strip()
            send = await _start(plan.src_netns, plan.src_ssh, pool, "send", plan.host, port, str(max_bytes),
                                str(max_seconds))
            ends.append(send)
            s_rc, s_out, s_err = await send.finish(limit)
            if s_rc:
                try:                  # a receiver that failed (could not bind) has the better message
                    r_rc, _, r_err = await recv.finish(0.5)
                except TimeoutError:
                    r_rc, r_err = 0, b""
                raise ProbeFailed(f"the transfer to {plan.host} failed: {_last_error(r_err if r_rc else s_err)}")
            r_rc, r_out, r_err = await recv.finish(limit)
            if r_rc:
                raise ProbeFailed(f"the transfer to {plan.host} failed: {_last_error(r_err)}")
            total, first_n, seconds = r_out.split()
            counted = int(total) - int(first_n)
            secs = float(seconds)
            if counted <= 0 or secs <= 0:
                raise ProbeFailed(f"the transfer to {plan.host} was too short to time ({int(total)} bytes)")
            return ProbeResult(rate=counted / secs, bytes=counted, seconds=secs, sent=int(s_out.split()[0]),
                               path=plan.path)
    except TimeoutError:
        raise ProbeFailed(f"the transfer to {plan.host} did not finish within {limit:.0f} s") from None
    except KvmError as e:
        if isinstance(e, ProbeFailed):
            raise
        raise ProbeFailed(str(e)) from None
    finally:
        await asyncio.shield(asyncio.gather(*(end.kill() for end in ends), return_exceptions=True))


async def probe_path(src_name: str, src_addr: Address, dst_name: str | None, dst_addr: Address | None,
                     uri: str | None, progress: Callable[[str], None] | None = None,
                     pool: HostPool | None = None) -> tuple[ProbeResult | None, str]:
    """Probe the migration path from ``src_name`` to ``dst_name``: (result, "") or (None, why not)."""
    if dst_name is None or dst_addr is None:
        return None, "no destination given (--to DEST) to probe the path to"
    plan, why = plan_probe(src_name, src_addr, dst_name, dst_addr, uri, pool)
    if plan is None:
        return None, why or "no path"
    if progress is not None:
        progress(f"probing the link: up to {PROBE_BYTES // 2**20} MiB or {PROBE_SECONDS:g} s over {plan.path}...")
    try:
        return await run_probe(plan, pool=pool), ""
    except ProbeFailed as e:
        return None, f"the probe failed: {e}"
