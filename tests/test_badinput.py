"""Every bad input of the foundation issue: one clear error naming guest and address, nothing else hurt."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from kvmshell.core.values.address import Address, Protocol, parse_address
from kvmshell.core.monitor.fleet import Fleet, GuestState
from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import open_monitor
from kvmshell.errors import ConfigError, ConnectFailed
from kvmshell.lab.launcher import Lab, MonitorKind
from tests import fakes

FAST = {"connect_timeout": 1.0}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("proto", ["qmp", "hmp"])
async def test_socket_path_that_does_not_exist(tmp_path: Path, proto: str) -> None:
    addr = parse_address(f"{proto}:unix:{tmp_path}/nope.sock")
    with pytest.raises(ConnectFailed) as info:
        await open_monitor("vm1", addr, **FAST)
    assert one_line(info.value) == f"vm1: {addr}: no such socket (is the guest running, and the path right?)"


@pytest.mark.parametrize("proto", ["qmp", "hmp"])
async def test_a_regular_file_is_not_a_socket(tmp_path: Path, proto: str) -> None:
    f = tmp_path / "notasocket"
    f.write_text("hello")
    with pytest.raises(ConnectFailed, match="is a regular file, not a monitor socket") as info:
        await open_monitor("vm1", parse_address(f"{proto}:unix:{f}"), **FAST)
    assert one_line(info.value).startswith("vm1: ")


@pytest.mark.parametrize("proto", ["qmp", "hmp"])
async def test_unix_socket_nobody_listens_on(tmp_path: Path, proto: str) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()                                  # the file stays, nobody listens
    with pytest.raises(ConnectFailed, match="refused") as info:
        await open_monitor("vm1", parse_address(f"{proto}:unix:{path}"), **FAST)
    one_line(info.value)


@pytest.mark.parametrize("proto", ["qmp", "hmp"])
@pytest.mark.parametrize("handler, reason", [
    (fakes.echo, "(not QEMU|not a QEMU|not a QMP)"),
    (fakes.garbage, "(not QEMU|not a QEMU|not a QMP|not an HMP)"),
    (fakes.endless_line, "(not QEMU|not a QEMU|not a QMP|not an HMP)"),
], ids=["echo", "garbage", "endless-line"])
async def test_peer_that_is_not_qemu(proto: str, handler: fakes.Handler, reason: str) -> None:
    async with fakes.tcp_server(handler) as port:
        addr = Address.tcp(Protocol(proto), "127.0.0.1", port)
        with pytest.raises(ConnectFailed, match=reason) as info:
            await open_monitor("vm1", addr, **FAST)
        text = one_line(info.value)
        assert text.startswith(f"vm1: {addr}: ")


@pytest.mark.parametrize("proto, handler", [("qmp", fakes.qmp_closes_mid_reply),
                                            ("hmp", fakes.hmp_closes_mid_reply)])
async def test_peer_closes_mid_reply(proto: str, handler: fakes.Handler) -> None:
    async with fakes.tcp_server(handler) as port:
        addr = Address.tcp(Protocol(proto), "127.0.0.1", port)
        with pytest.raises(ConnectFailed) as info:
            await open_monitor("vm1", addr, **FAST)
        assert one_line(info.value).startswith(f"vm1: {addr}: ")


async def test_pty_that_is_not_a_monitor() -> None:
    master, slave = os.openpty()
    try:
        addr = Address.pty(os.ttyname(slave))
        with pytest.raises(ConnectFailed, match="no HMP prompt within 1 s: not a QEMU monitor") as info:
            await open_monitor("vm1", addr, **FAST)
        assert one_line(info.value).startswith(f"vm1: {addr}: ")
    finally:
        os.close(master)
        os.close(slave)


def test_two_names_for_one_guest(tmp_path: Path) -> None:
    fleet = Fleet()
    fleet.add("a", parse_address(f"qmp:unix:{tmp_path}/vm.qmp"))
    os.symlink(tmp_path / "vm.qmp", tmp_path / "link.qmp")
    with pytest.raises(ConfigError, match="'a' and 'b' are the same monitor"):
        fleet.add("b", parse_address(f"qmp:unix:{tmp_path}/link.qmp"))
    with pytest.raises(ConfigError, match="defined twice"):
        fleet.add("a", parse_address("hmp:tcp:127.0.0.1:1"))


@pytest.mark.qemu
@pytest.mark.parametrize("kind", [MonitorKind.QMP_UNIX, MonitorKind.HMP_TCP], ids=lambda k: k.value)
async def test_monitor_taken_by_another_client(lab: Lab, kind: MonitorKind) -> None:
    guest = await lab.start("vm", kind, paused=True)
    first = await open_monitor("vm", guest.address)
    try:
        with pytest.raises(ConnectFailed, match="another client holds") as info:
            await open_monitor("vm-again", guest.address, **FAST)
        one_line(info.value)
        assert (await first.status()).state is RunState.PRELAUNCH      # the first client is unharmed
    finally:
        await first.close()


@pytest.mark.qemu
async def test_bad_guests_do_not_stop_the_good_ones(lab: Lab, tmp_path: Path) -> None:
    good = await lab.start("good", MonitorKind.QMP_UNIX, paused=True)
    async with fakes.tcp_server(fakes.garbage) as port:
        async with Fleet(connect_timeout=1.0, reconnect=False) as fleet:
            fleet.add("good", good.address)
            fleet.add("missing", parse_address(f"qmp:unix:{tmp_path}/missing.qmp"))
            fleet.add("garbage", Address.tcp(Protocol.HMP, "127.0.0.1", port))
            await fleet.start()
            assert fleet.get("good").state is GuestState.CONNECTED
            assert (await fleet.monitor("good").status()).state is RunState.PRELAUNCH
            assert fleet.get("missing").state is GuestState.UNREACHABLE
            assert "no such socket" in (fleet.get("missing").reason or "")
            assert fleet.get("garbage").state is GuestState.UNREACHABLE
