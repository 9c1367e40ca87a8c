"""Real OpenSSH servers for the SSH tests: one ``sshd`` per test host, keys generated per run.

``SshTestbed`` is an async context manager. When root (and iproute2 works) each test host is a
network namespace of a ``kvmshell.lab.netns.TestNetwork`` - host ``a`` in its ``src`` namespace,
host ``b`` in ``dst`` - with its own sshd on port 22 and an "uplink" veth pair to the root
namespace, so this process reaches ``a`` at ``10.214.N.2`` and ``b`` at ``10.214.M.2`` like real
remote hosts (the two hosts also reach each other over the TestNetwork link). QEMU guests of a
host run inside its namespace (``host.prefix`` for ``Lab.start``). Without root, every sshd listens
on 127.0.0.1 on a port of its own.

Per run: a host key per host (ed25519, ``ssh-keygen``), a client key that every host's
authorized_keys holds, a second client key that no host accepts, an empty known_hosts and an
empty ssh_config for the client. sshd is checked with ``sshd -t`` first, started with
``sshd -D -e -f CONFIG``, and is ready once it logs "Server listening on"; nothing waits on time.

Cleanup kills every sshd the testbed started and every process they forked (sessions call
setsid(), so they are found by parent pid, not by process group) and checks they are gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import getpass
import ipaddress
import os
import secrets
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kvmshell.lab.netns import TestNetwork, netns_available

SSHD = "/usr/sbin/sshd"
HAVE_SSHD = os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None
UPLINK_NET = ipaddress.ip_network("10.214.0.0/16")


def _die_with_parent() -> None:  # between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


async def run(*argv: str, check: bool = True) -> str:
    """Run a short command; its stdout. AssertionError with its output when it fails (``check``)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0 or not check, f"`{' '.join(argv)}` failed ({proc.returncode}): {text.strip()}"
    return text


async def keygen(path: Path, comment: str) -> Path:
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    await run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below ``pid``."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (to check nothing outlived a testbed)."""
    pids = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read().replace(b"\0", b" ") and alive(int(entry)):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SshTestHost:
    """One test host: its sshd, its address, and the argv prefix that runs a command on it."""

    __test__ = False

    name: str
    dir: Path
    addr: str
    port: int
    user: str
    authorized_keys: Path
    netns: str | None = None
    password_auth: bool = False
    enter: tuple[str, ...] = ()     # argv sshd runs under (tests/libvirtd.py: a libvirtd's mount namespace)
    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = field(default=None, repr=False)
    _forked: set[int] = field(default_factory=set, repr=False)

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns) if self.netns else ()

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def ssh(self) -> str:
        """The ``ssh = "USER@ADDR:PORT"`` value of a [hosts.NAME] table."""
        return f"{self.user}@{self.addr}:{self.port}"

    @property
    def known_hosts_pattern(self) -> str:
        return self.addr if self.port == 22 else f"[{self.addr}]:{self.port}"

    def known_hosts_line(self) -> str:
        alg, b64 = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{self.known_hosts_pattern} {alg} {b64}\n"

    async def fingerprint(self) -> str:
        """``SHA256:...`` of the host key, as ssh-keygen prints it."""
        return (await run("ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.host_key}.pub")).split()[1]

    async def new_host_key(self) -> None:
        """Regenerate the host key (the host was "reinstalled"); takes effect at the next start."""
        await keygen(self.host_key, f"host-{self.name}")

    def write_config(self) -> None:
        (self.dir / "home").mkdir(exist_ok=True)
        listen = "0.0.0.0" if self.netns else self.addr
        self.config.write_text("\n".join([
            f"Port {self.port}",
            f"ListenAddress {listen}",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            f"PasswordAuthentication {'yes' if self.password_auth else 'no'}",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "Subsystem sftp internal-sftp",
            "MaxStartups 64",
            "LogLevel VERBOSE",
            # a home of its own: the commands run through root's shell, which would read root's
            # ~/.bashrc (Debian's bash does under sshd) - on this machine a pyenv init there can wait
            # 60 s for a lock another session left behind
            f"SetEnv HOME={self.dir / 'home'}",
            "",
        ]))

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None, "sshd already running"
        self.write_config()
        await run(*self.prefix, *self.enter, SSHD, "-t", "-f", str(self.config))
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix, *self.enter, SSHD, "-D", "-e", "-f", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        listening = asyncio.get_running_loop().create_future()
        assert self.proc.stderr is not None
        self._reader = asyncio.create_task(self._log(self.proc.stderr, listening), name=f"sshd-{self.name}-log")
        try:
            async with asyncio.timeout(15):
                await listening
        except BaseException:
            await self.stop()
            raise

    async def _log(self, stream: asyncio.StreamReader, listening: asyncio.Future[None]) -> None:
        with open(self.dir / "sshd.log", "ab") as f:
            while line := await stream.readline():
                f.write(line)
                f.flush()
                if b"Server listening on" in line and not listening.done():
                    listening.set_result(None)
        if not listening.done():
            tail = (self.dir / "sshd.log").read_text(errors="replace").strip().splitlines()[-3:]
            listening.set_exception(AssertionError(f"sshd for {self.name} exited: {' | '.join(tail)}"))

    def sessions(self) -> list[int]:
        """The processes sshd forked for connections (privileged monitor and session)."""
        if self.proc is None or self.proc.returncode is not None:
            return []
        found = descendants(self.proc.pid)
        self._forked.update(found)
        return found

    def kill_sessions(self) -> list[int]:
        """SIGKILL every connection's sshd processes: the clients see their TCP connection close."""
        pids = self.sessions()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    async def stop(self) -> None:
        """Kill sshd, then every session it forked (so that no new one starts meanwhile); wait until
        they are gone."""
        sessions = self.sessions()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            async with asyncio.timeout(10):
                await self.proc.wait()       # also waits for the stderr pipe, which sessions share
        if self._reader is not None:
            async with asyncio.timeout(5):
                await self._reader
            self._reader = None
        async with asyncio.timeout(10):
            while any(alive(p) for p in self._forked):
                await asyncio.sleep(0.02)      # polling the kernel's process table for reaped sessions
        self._forked.clear()


class SshTestbed:
    """Test hosts with their sshd, the client's keys, known_hosts and ssh_config. See the module doc."""

    __test__ = False

    def __init__(self, base: Path, names: tuple[str, ...] = ("a",), *, password_auth: bool = False,
                 netns: bool | None = None) -> None:
        assert 1 <= len(names) <= 2
        self.base = base
        self.names = names
        self.password_auth = password_auth
        if netns is None:       # KVMSHELL_TEST_NETNS=0 tests the loopback set-up as root too
            netns = netns_available() is None and os.environ.get("KVMSHELL_TEST_NETNS", "1") != "0"
        self.use_netns = netns
        self.hosts: dict[str, SshTestHost] = {}
        self.client_key = base / "id_client"
        self.stranger_key = base / "id_stranger"
        self.known_hosts = base / "known_hosts"
        self.ssh_config = base / "ssh_config"
        self.authorized_keys = base / "authorized_keys"
        self.net: TestNetwork | None = None
        self._uplinks: list[str] = []

    def __getitem__(self, name: str) -> SshTestHost:
        return self.hosts[name]

    async def __aenter__(self) -> SshTestbed:
        try:
            await self._setup()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        await keygen(self.client_key, "kvmshell-test-client")
        await keygen(self.stranger_key, "kvmshell-test-stranger")
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.known_hosts.write_text("")
        self.ssh_config.write_text("")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)     # sshd's privilege separation dir
        user = getpass.getuser()
        if self.use_netns:
            self.net = TestNetwork(rate=None, prefix="kvssh")
            await self.net.__aenter__()
        for i, name in enumerate(self.names):
            d = self.base / f"host-{name}"
            d.mkdir()
            if self.net is not None:
                ns = self.net.hosts[i].netns
                addr = await self._uplink(ns)
                host = SshTestHost(name, d, addr, 22, user, self.authorized_keys, ns, self.password_auth)
            else:
                host = SshTestHost(name, d, "127.0.0.1", _free_port(), user, self.authorized_keys,
                                   None, self.password_auth)
            await host.new_host_key()
            self.hosts[name] = host
            await host.start()

    async def _uplink(self, netns: str) -> str:
        """A veth pair from the root namespace into ``netns``: a /30 of 10.214/16; the host's address."""
        used = await run("ip", "-4", "-o", "addr", "show")
        while True:
            block = ipaddress.ip_network(
                (int(UPLINK_NET.network_address) + 4 * secrets.randbelow(UPLINK_NET.num_addresses // 4), 30))
            if f" {block.network_address + 1}/" not in used and f" {block.network_address + 2}/" not in used:
                break
        mine, theirs = str(block.network_address + 1), str(block.network_address + 2)
        dev = f"kvu{secrets.token_hex(5)}"
        await run("ip", "link", "add", dev, "type", "veth", "peer", "name", "uplink", "netns", netns)
        self._uplinks.append(dev)
        await run("ip", "addr", "add", f"{mine}/30", "dev", dev)
        await run("ip", "link", "set", dev, "up")
        await run("ip", "-n", netns, "addr", "add", f"{theirs}/30", "dev", "uplink")
        await run("ip", "-n", netns, "link", "set", "uplink", "up")
        return theirs

    def trust(self, *names: str) -> None:
        """Put these hosts' current keys in the client's known_hosts."""
        with open(self.known_hosts, "a") as f:
            for name in names or self.names:
                f.write(self.hosts[name].known_hosts_line())

    def config_toml(self, *, identity: Path | None = None, extra: dict[str, str] | None = None,
                    user: str | None = None) -> str:
        """[hosts.*] tables for every test host (strings of TOML)."""
        lines = []
        for name, h in self.hosts.items():
            ssh = f"{user}@{h.addr}:{h.port}" if user else h.ssh
            lines += [f"[hosts.{name}]", f'ssh = "{ssh}"', f'identity_file = "{identity or self.client_key}"']
            for k, v in (extra or {}).items():
                lines.append(f"{k} = {v}")
            lines.append("")
        return "\n".join(lines)

    async def aclose(self) -> None:
        errors = []
        for host in self.hosts.values():
            try:
                await host.stop()
            except BaseException as e:   # keep cleaning up
                errors.append(f"{host.name}: {e!r}")
        for dev in self._uplinks:
            await run("ip", "link", "del", dev, check=False)     # usually gone with its namespace
        self._uplinks.clear()
        if self.net is not None:
            await self.net.__aexit__(None, None, None)
            self.net = None
        left = processes_mentioning(f"sshd -D -e -f {self.base}")
        assert not errors and not left, f"sshd cleanup: {errors} still running: {left}"
