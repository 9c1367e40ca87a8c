"""Guests on other hosts over SSH: real OpenSSH sshd servers (tests/sshd.py), real QEMU, nothing mocked.

Each test host has its own sshd, host key and network namespace (when root; see tests/sshd.py); its
guests run inside that namespace. The client (this process) trusts nothing but the test's own
known_hosts file, reads an empty ssh_config and offers the test's own keys.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from kvmshell import cli
from kvmshell.config import parse_config
from kvmshell.core.values.address import Address, Protocol, SshTarget, parse_address
from kvmshell.core.monitor.fleet import CONNECTED_EVENT, Fleet, GuestState
from kvmshell.core.values.models import Event, RunState
from kvmshell.core.monitor.base import open_monitor
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.processes import discover, parse_qemu_cmdline
from kvmshell.errors import AuthFailed, ConfigError, ConnectFailed, HostKeyChanged, HostKeyUnknown, HostUnreachable
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from tests import fakes
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning

pytestmark = [pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)"),
              pytest.mark.timeout(60)]

FAST = {"connect_timeout": 5.0, "backoff": (0.05, 0.5), "keepalive": None}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[SshTestbed]:
    async with SshTestbed(tmp_path / "ssh", ("a",)) as testbed:
        yield testbed
    assert not processes_mentioning(f"sshd -D -e -f {tmp_path}"), "an sshd outlived its test"


def pool_for(bed: SshTestbed, extra: dict[str, str] | None = None, **kw: object) -> HostPool:
    """A pool over the testbed's hosts, from a parsed [hosts.*] config, with the test's own files."""
    config = parse_config(tomllib.loads(bed.config_toml(extra=extra, **kw)))  # type: ignore[arg-type]
    return HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config, **FAST)


def remote(bed: SshTestbed, host: str, address: Address) -> Address:
    h = bed[host]
    return Address(address.protocol, address.kind, address.path, address.host, address.port,
                   SshTarget(h.addr, h.user, h.port))


def accepted(bed: SshTestbed, host: str) -> int:
    """How many SSH connections the host's sshd has authenticated so far."""
    return (bed[host].dir / "sshd.log").read_text().count("Accepted publickey")


class EventLog:
    """Every fleet event, kept; wait for one (of a guest, by name) from a mark on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    async def wait(self, name: str, guest: str, since: int = 0, timeout: float = 20,
                   data: Callable[[Mapping[str, Any]], bool] = lambda d: True) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events[since:]:
                    if ev.name == name and ev.guest == guest and data(ev.data):
                        return ev
                self._changed.clear()
                await self._changed.wait()


async def start_remote_guest(lab: Lab, bed: SshTestbed, host: str, name: str = "vm") -> tuple[LabGuest, int]:
    """A paused guest inside the test host with three monitors: the Lab's QMP socket (handed to QEMU
    as a descriptor), an HMP unix socket and an HMP TCP port that QEMU binds inside the host."""
    port = 4444 if bed[host].netns else _free_port()
    guest = await lab.start(name, MonitorKind.QMP_UNIX, paused=True, prefix=bed[host].prefix, extra_args=(
        "-chardev", f"socket,id=hmp1,path={lab.workdir}/{name}.hmp,server=on,wait=off",
        "-mon", "chardev=hmp1,mode=readline",
        "-monitor", f"tcp:127.0.0.1:{port},server=on,wait=off"))
    # The Lab binds the QMP socket before QEMU runs, so it answers at once; QEMU greets only from its
    # main loop, once every monitor on its command line is bound. Wait for that greeting, then let go.
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(guest.address.path), 30)
    try:
        assert b'"QMP"' in await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    return guest, port


def _free_port() -> int:
    from tests.waiting import free_port
    return free_port()


# -- monitors through SSH ------------------------------------------------------------------------

@pytest.mark.qemu
async def test_qmp_and_hmp_through_one_ssh_connection(lab: Lab, bed: SshTestbed) -> None:
    bed.trust("a")
    guest, port = await start_remote_guest(lab, bed, "a")
    qmp = remote(bed, "a", guest.address)
    hmp_unix = remote(bed, "a", Address.unix(Protocol.HMP, f"{lab.workdir}/vm.hmp"))
    hmp_tcp = remote(bed, "a", Address.tcp(Protocol.HMP, "127.0.0.1", port))
    assert str(qmp) == f"ssh://{bed['a'].ssh}/qmp:unix:{guest.address.path}"
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add("vm-qmp", qmp)
        fleet.add("vm-hmp", hmp_unix)
        fleet.add("vm-tcp", hmp_tcp)
        await fleet.start()
        assert [g.state for g in fleet] == [GuestState.CONNECTED] * 3, [g.reason for g in fleet]
        for name in fleet.names:
            mon = fleet.monitor(name)
            assert (await mon.status()).state is RunState.PRELAUNCH
            assert "VM status: paused (prelaunch)" in await mon.hmp("info status")
            assert mon.version is not None and mon.version.major >= 7
        assert (await fleet.monitor("vm-qmp").execute("query-name")) == {"name": "vm"}
        await fleet.monitor("vm-qmp").execute("cont")
        assert (await fleet.monitor("vm-tcp").status()).state is RunState.RUNNING
        # QEMU serves one client per monitor: a second one through SSH hears what it would hear locally
        with pytest.raises(ConnectFailed, match="another client holds") as info:
            await open_monitor("again", qmp, hosts=fleet.hosts, connect_timeout=1)
        assert one_line(info.value).startswith(f"again: {qmp}: no QMP greeting within 1 s")
    assert accepted(bed, "a") == 1          # one connection served all three monitors


async def test_monitor_errors_through_ssh_are_those_of_a_local_one(bed: SshTestbed, tmp_path: Path) -> None:
    bed.trust("a")
    async with pool_for(bed) as pool:
        missing = remote(bed, "a", parse_address(f"qmp:unix:{tmp_path}/nope.qmp"))
        with pytest.raises(ConnectFailed, match=r"no such socket on host a .*is the guest running") as info:
            await open_monitor("vm1", missing, hosts=pool, connect_timeout=2)
        assert one_line(info.value).startswith(f"vm1: {missing}: ")
        (tmp_path / "file").write_text("x")
        with pytest.raises(ConnectFailed, match="is a regular file on host a .*not a monitor socket"):
            await open_monitor("vm1", remote(bed, "a", parse_address(f"hmp:unix:{tmp_path}/file")), hosts=pool,
                               connect_timeout=2)
        port = 4445 if bed["a"].netns else _free_port()
        with pytest.raises(ConnectFailed, match="connection refused on host a"):
            await open_monitor("vm1", remote(bed, "a", Address.tcp(Protocol.QMP, "127.0.0.1", port)), hosts=pool,
                               connect_timeout=2)
        # the SSH connection the failures went through is still there, and it was the only one
        assert pool.connected(bed["a"].ssh)
    assert accepted(bed, "a") == 1


def unix_fake(path: Path, handler: fakes.Handler) -> Any:
    """A fake monitor peer (tests/fakes.py) on a unix socket: reachable from every test host by path."""
    return fakes.unix_server(str(path), handler)


@pytest.mark.parametrize("proto", ["qmp", "hmp"])
@pytest.mark.parametrize("handler, reason", [
    (fakes.echo, "(not QEMU|not a QEMU|not a QMP)"),
    (fakes.garbage, "(not QEMU|not a QEMU|not a QMP|not an HMP)"),
], ids=["echo", "garbage"])
async def test_peer_that_is_not_qemu_through_ssh(bed: SshTestbed, tmp_path: Path, proto: str,
                                                 handler: fakes.Handler, reason: str) -> None:
    bed.trust("a")
    async with pool_for(bed) as pool, unix_fake(tmp_path / "fake.sock", handler):
        addr = remote(bed, "a", parse_address(f"{proto}:unix:{tmp_path}/fake.sock"))
        with pytest.raises(ConnectFailed, match=reason) as info:
            await open_monitor("vm1", addr, hosts=pool, connect_timeout=1)
        assert one_line(info.value).startswith(f"vm1: {addr}: ")
        assert pool.connected("a")


# -- host keys -----------------------------------------------------------------------------------

async def test_unknown_host_key_refused_then_accepted_and_recorded(bed: SshTestbed) -> None:
    fingerprint = await bed["a"].fingerprint()
    async with pool_for(bed) as pool:
        with pytest.raises(HostKeyUnknown) as info:
            await pool.connection("a")
        text = one_line(info.value)
        assert text.startswith(f"host a ({bed['a'].ssh}): host key not known")
        assert fingerprint in text and "accept_new_host_key = true in [hosts.a]" in text
        assert "ssh-keyscan" in text and str(bed.known_hosts) in text
        # through a monitor: the same line, with the guest's name in front (the pool, in backoff after
        # the refusal, gives the same error again without connecting)
        addr = remote(bed, "a", parse_address("qmp:unix:/run/vm.qmp"))
        with pytest.raises(HostKeyUnknown) as info:
            await open_monitor("vm1", addr, hosts=pool)
        assert one_line(info.value).startswith("vm1: host a (") and fingerprint in str(info.value)
    assert bed.known_hosts.read_text() == ""             # refusing records nothing
    async with pool_for(bed, {"accept_new_host_key": "true"}) as pool:
        conn = await pool.connection("a")
        assert (await conn.run("echo hello", 5)).text == "hello\n"
    line = bed.known_hosts.read_text()
    assert line == bed["a"].known_hosts_line()            # recorded, as OpenSSH writes it
    async with pool_for(bed) as pool:                     # and from now on trusted without the option
        await pool.connection("a")
    # OpenSSH's own client agrees with what was recorded
    h = bed["a"]
    proc = await asyncio.create_subprocess_exec(
        "ssh", "-F", str(bed.ssh_config), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={bed.known_hosts}", "-i", str(bed.client_key), "-p", str(h.port),
        f"{h.user}@{h.addr}", "true", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(15):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out


async def test_changed_host_key_refused_even_with_accept_new(bed: SshTestbed) -> None:
    bed.trust("a")
    trusted = bed.known_hosts.read_text()
    async with pool_for(bed) as pool:
        conn = await pool.connection("a")
        old = await bed["a"].fingerprint()
        await bed["a"].stop()
        await bed["a"].new_host_key()                     # the host was "reinstalled"
        await bed["a"].start()
        new = await bed["a"].fingerprint()
        async with asyncio.timeout(10):
            await conn.wait_lost()
        with pytest.raises(HostKeyChanged) as info:           # the same pool reconnects: and refuses
            await pool.connection("a")
        text = one_line(info.value)
        assert text.startswith(f"host a ({bed['a'].ssh}): HOST KEY CHANGED") and new in text and old not in text
        assert "ssh-keygen -R" in text
    async with pool_for(bed, {"accept_new_host_key": "true"}) as pool:
        with pytest.raises(HostKeyChanged):
            await pool.connection("a")
    assert bed.known_hosts.read_text() == trusted           # nothing recorded over the old key


# -- authentication and reachability -------------------------------------------------------------

async def test_wrong_user_or_key_is_a_clear_error(bed: SshTestbed) -> None:
    bed.trust("a")
    h = bed["a"]
    async with pool_for(bed, user="nosuchuser") as pool:
        with pytest.raises(AuthFailed) as info:
            await pool.connection("a")
        text = one_line(info.value)
        assert f"authentication failed for nosuchuser@{h.addr}" in text and "refused the keys" in text
        assert str(bed.client_key) in text and "there is no terminal" not in text
    async with pool_for(bed, identity=bed.stranger_key) as pool:
        with pytest.raises(AuthFailed, match=f"failed for {h.user}@{h.addr}: the server refused the keys") as info:
            await pool.connection("a")
        assert str(bed.stranger_key) in one_line(info.value)
    # an identity file that is not there is the config's fault
    async with pool_for(bed, identity=bed.base / "nokey") as pool:
        with pytest.raises(ConfigError, match="identity_file .*nokey does not exist"):
            await pool.connection("a")


async def test_password_is_asked_through_the_callback_never_stored(tmp_path: Path) -> None:
    async with SshTestbed(tmp_path / "ssh", ("a",), password_auth=True) as bed:
        bed.trust("a")
        h = bed["a"]
        asked: list[str] = []

        async def prompt(text: str) -> str | None:
            asked.append(text)
            return "not-the-password"
        config = parse_config(tomllib.loads(bed.config_toml(identity=bed.stranger_key)))
        async with HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config,
                                        password_prompt=prompt, **FAST) as pool:
            with pytest.raises(AuthFailed, match="refused the keys and the password"):
                await pool.connection("a")
        assert asked and asked[0] == f"{h.user}@{h.addr}'s password: "
        async with HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config,
                                        **FAST) as pool:
            with pytest.raises(AuthFailed, match="it would take a password, but there is no terminal") as info:
                await pool.connection("a")
            one_line(info.value)


async def test_host_unreachable(bed: SshTestbed) -> None:
    bed.trust("a")
    await bed["a"].stop()
    async with pool_for(bed) as pool:
        with pytest.raises(HostUnreachable) as info:
            await pool.connection("a")
        assert one_line(info.value) == (f"host a ({bed['a'].ssh}): connection refused (no SSH server listening on "
                                        f"port {bed['a'].port})")


# -- the connection dies while guests are attached -----------------------------------------------

@pytest.mark.qemu
async def test_ssh_connection_killed_then_restored_and_the_fleet_reconnects(lab: Lab, bed: SshTestbed) -> None:
    bed.trust("a")
    guest, _ = await start_remote_guest(lab, bed, "a")
    log = EventLog()
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.subscribe(log)
        fleet.add("qmp", remote(bed, "a", guest.address))
        fleet.add("hmp", remote(bed, "a", Address.unix(Protocol.HMP, f"{lab.workdir}/vm.hmp")))
        await fleet.start()
        assert [g.state for g in fleet] == [GuestState.CONNECTED] * 2

        # 1. the SSH session dies (sshd still listens): both monitors notice, both come back
        mark = log.mark()
        assert bed["a"].kill_sessions()
        for name in ("qmp", "hmp"):
            ev = await log.wait("kvmshell.DISCONNECTED", name, mark)
            assert ev.data["reason"].startswith(f"SSH connection to host a ({bed['a'].ssh}) lost"), ev.data
        for name in ("qmp", "hmp"):
            await log.wait(CONNECTED_EVENT, name, mark)
        assert (await fleet.monitor("qmp").status()).state is RunState.PRELAUNCH
        assert accepted(bed, "a") == 2                     # one new connection for both

        # 2. the whole sshd goes away: the guests are unreachable, saying why; then it is back
        mark = log.mark()
        await bed["a"].stop()
        refused = f"host a ({bed['a'].ssh}): connection refused (no SSH server listening on port {bed['a'].port})"
        for name in ("qmp", "hmp"):
            await log.wait("kvmshell.DISCONNECTED", name, mark)
            await log.wait("kvmshell.UNREACHABLE", name, mark, data=lambda d: d["reason"] == refused)
        assert fleet.get("hmp").state is not GuestState.CONNECTED
        mark = log.mark()
        await bed["a"].start()
        for name in ("qmp", "hmp"):
            await log.wait(CONNECTED_EVENT, name, mark)
        assert "paused (prelaunch)" in await fleet.monitor("hmp").hmp("info status")
        assert (await fleet.monitor("qmp").status()).state is RunState.PRELAUNCH
        assert accepted(bed, "a") == 3
    assert guest.alive                                     # nothing happened to the guest itself


# -- kvmshell hosts, discovery -------------------------------------------------------------------

def test_pool_finds_the_host_settings_of_an_address() -> None:
    config = parse_config(tomllib.loads(
        '[hosts.h2]\nssh = "root@10.0.0.2"\nidentity_file = "/k"\naccept_new_host_key = true\n'
        '[hosts.h3]\nssh = "10.0.0.3:2222"\njump = "h2"\n'))
    pool = HostPool.from_config(config)
    assert pool.lookup(SshTarget("10.0.0.2", "root", 22)) is config.hosts["h2"]
    assert pool.lookup(SshTarget("10.0.0.2")) is config.hosts["h2"]
    assert pool.lookup(SshTarget("h2")).ssh == SshTarget("10.0.0.2", "root")     # by its name
    h3 = pool.lookup(SshTarget("10.0.0.3", "ops", 2222))
    assert (h3.name, h3.ssh.user, h3.jump) == ("h3", "ops", "h2")                # the address's user wins
    assert pool.lookup(SshTarget("10.0.0.2", "admin")).name == "admin@10.0.0.2"  # another user: not h2's key
    assert pool.lookup(SshTarget("10.0.0.3")).name == "10.0.0.3"                 # another port
    assert pool.label("h3") == "host h3 (10.0.0.3:2222)"
    assert pool.key(SshTarget("10.0.0.2", "root")) == pool.key("h2") == ("root", "10.0.0.2", 22)


def test_monitors_read_from_qemu_command_lines() -> None:
    name, mons = parse_qemu_cmdline([
        "/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on",
        "-chardev", "socket,id=charmonitor,fd=35,server=on,wait=off", "-mon", "chardev=charmonitor,mode=control",
        "-chardev", "socket,id=h,path=/run/a,,b.hmp,server=on,wait=off", "-mon", "chardev=h",
        "-chardev", "socket,id=serial,path=/run/serial,server=on", "-serial", "chardev:serial",
        "-chardev", "socket,id=client,path=/run/client", "-mon", "chardev=client,mode=control",
        "--qmp", "unix:/run/web1.qmp,server,nowait", "-monitor", "tcp::4444,server=on,wait=off",
        "-qmp", "tcp:127.0.0.1:5555", "-monitor", "stdio"])
    assert name == "web1"
    got = [(m.protocol.value, m.kind.value, m.path or m.fd or f"{m.host}:{m.port}") for m in mons]
    assert got == [("qmp", "unix", 35), ("hmp", "unix", "/run/a,b.hmp"), ("qmp", "unix", "/run/web1.qmp"),
                   ("hmp", "tcp", "127.0.0.1:4444")]
    assert parse_qemu_cmdline(["qemu-system-x86_64", "-name", "vm2,process=x"])[0] == "vm2"


@pytest.mark.qemu
async def test_kvmshell_hosts_lists_qemu_and_the_guests_found(lab: Lab, bed: SshTestbed, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    guest, port = await start_remote_guest(lab, bed, "a", "web")
    # the user's own ~/.ssh: known_hosts with host a, a config naming the key; no agent
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(bed["a"].known_hosts_line())
    shutil.copy(bed.client_key, home / ".ssh" / "id_ed25519")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    down = _free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[hosts.a]\nssh = "{bed["a"].ssh}"\n\n[hosts.h2]\nssh = "root@127.0.0.1:{down}"\n')
    out, err = io.StringIO(), io.StringIO()
    status = await cli.run(["--config", str(config), "--json", "hosts"], out, err)
    assert status == cli.Exit.FAILED                        # one host is down
    assert err.getvalue() == (f"kvmshell: h2: host h2 (root@127.0.0.1:{down}): connection refused (no SSH "
                              f"server listening on port {down})\n")
    reports = {r["name"]: r for r in json.loads(out.getvalue())}
    a = reports["a"]
    assert a["reachable"] and a["reason"] is None and a["ssh"] == bed["a"].ssh
    local = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    assert re.search(rf"version {re.escape(a['qemu'])}\b", local)
    found = [g for g in a["guests"] if g["pid"] == guest.pid]
    assert len(found) == 1, a["guests"]
    target = f"ssh://{bed['a'].ssh}"
    assert found[0]["monitor"] == f"{target}/qmp:unix:{guest.address.path}"   # the one QEMU got as a descriptor
    assert found[0]["monitors"] == [f"{target}/qmp:unix:{guest.address.path}",
                                    f"{target}/hmp:unix:{lab.workdir}/web.hmp", f"{target}/hmp:tcp:127.0.0.1:{port}"]
    assert found[0]["name"].startswith("web")
    assert not reports["h2"]["reachable"] and reports["h2"]["guests"] == []
    # the table, and attaching what was found without typing a path
    out = io.StringIO()
    await cli.run(["--config", str(config), "hosts"], out, io.StringIO())
    text = out.getvalue()
    assert re.search(rf"^a +{re.escape(bed['a'].ssh)} +reachable +{re.escape(a['qemu'])} +\d+$", text, re.M), text
    assert re.search(rf"^  web\S* +{guest.pid} +{re.escape(f'{target}/qmp:unix:{guest.address.path}')}$", text, re.M)
    out = io.StringIO()
    status = await cli.run(["--config", str(config), "--guest", f"web={found[0]['monitor']}", "-c", "info status"],
                           out, io.StringIO())
    assert status == cli.Exit.OK and "paused (prelaunch)" in out.getvalue()
    # a monitor opened on its own (no pool given) makes, and closes, its own SSH connection
    mon = await open_monitor("web", parse_address(found[0]["monitors"][1]))
    try:
        assert "paused (prelaunch)" in await mon.hmp("info status")
    finally:
        await mon.close()
    assert mon.hosts is None


@pytest.mark.qemu
async def test_discover_here_and_through_a_jump_host(lab: Lab, tmp_path: Path) -> None:
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as bed:
        if bed.net is None:
            pytest.skip("jump hosts are tested between network namespaces (root)")
        bed.trust("a")
        # b as seen from a only: its address on the link between the two namespaces
        inner = bed.net.dst.ip
        with open(bed.known_hosts, "a") as f:
            f.write(bed["b"].known_hosts_line().replace(bed["b"].addr, inner, 1))
        guest = await lab.start("behind", MonitorKind.QMP_UNIX, paused=True, prefix=bed["b"].prefix)
        config = parse_config(tomllib.loads(
            f'[hosts.a]\nssh = "{bed["a"].ssh}"\nidentity_file = "{bed.client_key}"\n\n'
            f'[hosts.b]\nssh = "{bed["b"].user}@{inner}"\nidentity_file = "{bed.client_key}"\njump = "a"\n'))
        async with HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config,
                                        **FAST) as pool:
            found = [g for g in await discover(pool, "b") if g.pid == guest.pid]
            assert [str(g.monitor) for g in found] == [f"ssh://{bed['b'].user}@{inner}/qmp:unix:{guest.address.path}"]
            mon = await open_monitor("behind", found[0].monitor, hosts=pool)
            try:
                assert (await mon.status()).state is RunState.PRELAUNCH
            finally:
                await mon.close()
        assert accepted(bed, "a") == 1 and accepted(bed, "b") == 1
        here = [g for g in await discover(None, None) if g.pid == guest.pid]
        assert here and here[0].monitor == guest.address      # the same scan on this machine, no SSH
    await asyncio.wait_for(guest.proc.wait(), 10)      # the test host's end took its QEMU along
