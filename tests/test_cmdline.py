"""How a guest was started, and its twin's command line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmshell.core.values.address import Address
from kvmshell.core.values.cmdline import derive, images_of, parse_cmdline, rewrite_images
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.job import FINISHED
from kvmshell.core.values.models import Event, RunState
from kvmshell.core.hosts.processes import command_of, pid_listening_on
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory

SEED = ["qemu-system-x86_64", "-enable-kvm", "-m", "2048", "-smp", "4", "/share/xvs/var/rhel7.qcow",
        "-monitor", "pty", "-cpu", "kvm64", "-incoming", "tcp:0:9999"]


def test_parse_the_seed_command_line() -> None:
    cmd = parse_cmdline(SEED)
    assert cmd.values("-m") == ["2048"] and cmd.has("-enable-kvm")
    assert images_of(cmd) == ["/share/xvs/var/rhel7.qcow"]
    assert parse_cmdline(b"\0".join(a.encode() for a in SEED) + b"\0") == cmd
    with pytest.raises(ValueError, match="not a QEMU"):
        parse_cmdline(["bash", "-c", "true"])


def test_derive_live_twin() -> None:
    cmd = parse_cmdline(["qemu-system-x86_64", "-m", "512", "-drive", "file=/img/a.qcow2,if=virtio",
                         "-qmp", "unix:/run/a.qmp,server=on,wait=off", "-monitor", "pty",
                         "-chardev", "socket,id=m2,fd=5,server=on,wait=off", "-mon", "chardev=m2,mode=readline",
                         "-daemonize", "-pidfile", "/run/a.pid", "-incoming", "tcp:0:1"])
    d = derive(cmd, socket_dir="/run/kvmshell", name="a", pidfile="/run/kvmshell/a.pid")
    argv = d.command.argv()
    assert argv[-2:] == ["-incoming", "defer"] and argv.count("-incoming") == 1
    assert "unix:/run/kvmshell/a.qmp,server=on,wait=off" in argv
    assert "socket,id=m2,path=/run/kvmshell/a-2.hmp,server=on,wait=off" in argv
    assert d.monitors == (("qmp", "/run/kvmshell/a.qmp"), ("hmp", "/run/kvmshell/a-2.hmp"))
    assert "-daemonize" in argv and argv[argv.index("-pidfile") + 1] == "/run/kvmshell/a.pid"
    assert d.images == ("/img/a.qcow2",)
    static = derive(cmd, socket_dir="/run/k", name="a", loadvm="snap1")
    assert static.command.argv()[-2:] == ["-loadvm", "snap1"] and not static.command.has("-incoming")
    moved = rewrite_images(cmd, {"/img/a.qcow2": "/data/a.qcow2"})
    assert images_of(moved) == ["/data/a.qcow2"]


@pytest.mark.qemu
async def test_a_derived_twin_receives_a_live_migration(lab: Lab, tmp_path: Path) -> None:
    ws = 1024
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, pace=2)
    assert src.address.path is not None
    pid = pid_listening_on(src.address.path)
    assert pid == src.pid                              # found from the socket, not from our bookkeeping
    derived = derive(command_of(pid), socket_dir=str(tmp_path), name="twin", keep_stdio=True)
    assert derived.images == (str(src.disk),)
    proto, path = derived.monitors[0]
    twin = await lab.start_argv("twin", derived.command.argv(), Address.unix(proto, path), ws_pages=ws,
                                ram_mib=src.ram_mib, disk=src.disk)
    events: asyncio.Queue[Event] = asyncio.Queue()
    async with Fleet() as fleet:
        fleet.subscribe(events.put_nowait)
        fleet.add("src", src.address)
        fleet.add("twin", twin.address)
        await fleet.start()
        assert (await fleet.monitor("twin").status()).state is RunState.INMIGRATE
        session = Session(fleet, default_registry())
        [o] = await session.run_line("@src migrate --to twin")
        assert o.ok, o.error
        async with asyncio.timeout(60):
            while (ev := await events.get()).name != FINISHED:
                pass
        assert ev.data["status"] == "completed", ev.data
        await twin.wait_heartbeats(2)
        check = await check_guest_memory(fleet.monitor("twin"), ws, tmp_path)
        assert check.ok, check.summary()
        await session.aclose()


def test_an_option_unknown_to_kvmshell_does_not_swallow_the_next_one() -> None:
    from kvmshell.core.values.cmdline import parse_cmdline
    cmd = parse_cmdline(["qemu-system-x86_64", "-new-flag-of-qemu-10", "-m", "256", "-append", "-v quiet"])
    assert [o.name for o in cmd.options] == ["-new-flag-of-qemu-10", "-m", "-append"]
    assert cmd.values("-m") == ["256"] and cmd.values("-append") == ["-v quiet"]


def test_an_edited_command_line_is_read_back_and_checked() -> None:
    from kvmshell.core.values.cmdline import Option, editable, missing_after_edit, parse_cmdline, parse_edited
    cmd = parse_cmdline(["/usr/bin/qemu-system-x86_64", "-m", "256", "-qmp", "unix:/run/x/vm.qmp,server=on,wait=off",
                         "-name", "my vm", "-loadvm", "t1"])
    text = editable(cmd, "the command", ["-loadvm t1"])
    assert text.startswith("# the command") and "    -name 'my vm'\n" in text
    assert parse_edited(text) == cmd
    assert parse_edited("# all gone\n\n") is None
    edited = parse_edited(text.replace("-m 256", "-m 512 \\"))
    assert edited is not None and edited.values("-m") == ["512"]
    required = [Option("-loadvm", "t1")]
    assert missing_after_edit(cmd, required, ["/run/x/vm.qmp"]) == []
    broken = parse_edited(text.replace("-loadvm t1", "").replace("/run/x/vm.qmp", "/tmp/other.qmp"))
    assert broken is not None and missing_after_edit(broken, required, ["/run/x/vm.qmp"]) == ["-loadvm t1",
                                                                                            "/run/x/vm.qmp"]
    try:
        parse_edited("qemu-system-x86_64 -name 'unbalanced\n")
    except ValueError as e:
        assert "line 1" in str(e)
    else:
        raise AssertionError("an unbalanced quote was accepted")
