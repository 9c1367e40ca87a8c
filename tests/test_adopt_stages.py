"""Adopting a migration whose kvmshell died (kill -9) with its stages under way: the disk copy
(`--copy-storage`: the destination's NBD server and the source's mirror jobs), the devices it
unplugged (`--unplug`) and its TLS (`--tls`) are finished by the kvmshell that adopts it from the
state file: completed on success (the NBD server stopped), undone on failure (the mirrors
cancelled, the device plugged back), and both sides' settings as they were before in either case.
Also: the line `kvmshell shell` and `-c` print on attach for a migration nobody follows.
Real `kvmshell` processes and real lab guests; each QEMU has a second QMP monitor for the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmshell.core.migration.live import running
from kvmshell.core.migration.live.resume import DiskCopy, StorageRecord, UnpluggedDevice, UnplugRecord
from kvmshell.core.migration.tls import TlsSide, init_ca
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address, Protocol
from kvmshell.core.values.models import MigrationStatus, NbdServer, RunState
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.test_adopt import plain_migration, settings, state_files
from tests.test_cli import env_for, kvmshell
from tests.test_passthrough import TABLET, XHCI, peripherals
from tests.test_scripts import Guests, started
from tests.test_storage import PACE, RAM, WS, compare, data_drive, qcow2
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]
HOLD = "--strategy precopy --bandwidth 16M --stall-timeout 60"   # RAM holds until the test uncaps it


@dataclass
class Pair:
    src: LabGuest
    dst: LabGuest
    side: Monitor                  # the source's second monitor
    dside: Monitor                 # the destination's
    src_data: Path
    dst_data: Path

    @property
    def args(self) -> list[str]:
        return ["--guest", f"src={self.src.address}", "--guest", f"dst={self.dst.address}"]

    async def status(self) -> MigrationStatus:
        return (await self.side.migration()).status

    async def io(self, command: str) -> str:
        out = await self.side.hmp(f'qemu-io data0 "{command}"')
        assert "fail" not in out.lower(), out
        return out

    async def quit(self) -> None:
        """Quit both QEMUs cleanly (qcow2 metadata written) before their images are compared."""
        for mon, guest in ((self.side, self.src), (self.dside, self.dst)):
            if guest.alive:
                await mon.execute("quit")
                await wait_for(lambda g=guest: _value(g.alive), lambda alive: not alive, what=f"{guest.name} quit")


def side_args(path: Path) -> tuple[str, ...]:
    return ("-chardev", f"socket,id=side,path={path},server=on,wait=off", "-mon", "chardev=side,mode=control")


@asynccontextmanager
async def copy_pair(lab: Lab) -> AsyncIterator[Pair]:
    w = lab.workdir
    src_data, dst_data = await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2")
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM,
                          extra_args=(*data_drive(src_data), *side_args(w / "src-side.qmp")))
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, incoming=True,
                          extra_args=(*data_drive(dst_data), *side_args(w / "dst-side.qmp")))
    await src.wait_heartbeats(1)
    await wait_for(lambda: _value((w / "dst-side.qmp").exists()), bool, what="dst's second monitor")
    async with Fleet() as fleet:
        fleet.add("side", Address.unix(Protocol.QMP, str(w / "src-side.qmp")))
        fleet.add("dside", Address.unix(Protocol.QMP, str(w / "dst-side.qmp")))
        await fleet.start()
        yield Pair(src, dst, fleet.monitor("side"), fleet.monitor("dside"), src_data, dst_data)


async def _value(v: object) -> object:
    return v


async def kill_9_once_it_runs(p: Pair, tmp_path: Path, line: str) -> dict[str, object]:
    """Start `kvmshell -c LINE`, kill -9 it once the migration runs (the mirrors in sync, the state
    file written): the state file it left."""
    async with started(tmp_path, *p.args, "-c", line) as first:
        await wait_for(p.status, lambda s: s is MigrationStatus.ACTIVE, what="the migration active")
        await wait_for(lambda: _value(state_files(tmp_path)), bool, what="the state file")
        first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL
    [path] = state_files(tmp_path)
    return dict(json.loads(path.read_text()))


async def kvmshell_nodes(mon: Monitor) -> list[str]:
    return [n for d in await mon.execute("query-named-block-nodes") if (n := d.get("node-name", "")).startswith("kvmshell-")]


async def completed_and_cleaned(p: Pair, out: str) -> None:
    """An adopted disk-copy migration completed and left nothing of its copy on either side."""
    assert out.startswith("src: completed in "), out
    assert "NBD server on dst stopped" in out and "NBD client nodes removed" in out, out
    assert await p.dside.execute("query-block-exports") == []
    assert await p.side.block_jobs() == () and await kvmshell_nodes(p.side) == []


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_kill_9_during_the_disk_copy_then_follow_completes_it(lab: Lab, tmp_path: Path, tls: bool) -> None:
    async with copy_pair(lab) as p:
        src_before, dst_before = await settings(p.side), await settings(p.dside)
        src_objects = await p.side.objects()
        line = f"@src migrate --to dst --copy-storage all {HOLD}"
        if tls:
            init_ca(tmp_path / "pki", ["localhost"])
            line += f" --tls {tmp_path}/pki"
        await p.io("write -P 0x11 0 8M")
        state = await kill_9_once_it_runs(p, tmp_path, line)
        storage = state["storage"]
        assert isinstance(storage, dict) and storage["jobs"] == ["kvmshell-mirror-0", "kvmshell-mirror-1"], state
        assert storage["pause_before_switchover"] is True and storage["server"]["path"], storage
        assert len(storage["disks"]) == 2 and "data0" in [d["key"] for d in storage["disks"]], storage
        if tls:
            assert state["tls"]["source"]["objects"] == ["kvmshell-tls"], state
            assert state["tls"]["source"]["parameters"]["tls-creds"] == "", state
        assert len(await p.dside.execute("query-block-exports")) == 2       # still exported, unsteered
        await p.io("write -P 0x5a 12M 1M")                                 # the mirror carries it on its own
        async with started(tmp_path, *p.args, "-c", "@src migrate --follow") as second:
            notice = await second.line(lambda text: text.startswith("kvmshell: src: "))
            assert notice == "kvmshell: src: running, migration active (not followed: `migrate --follow` " \
                             "adopts it)\n", notice
            await second.line(lambda text: "adopted" in text)
            assert "not resumed" not in "".join(second.err), second.err
            await p.side.set_parameters({"max-bandwidth": 1 << 30})        # let RAM converge
            rc, out, err = await second.end()
        assert rc == 0, err
        await completed_and_cleaned(p, out)
        assert await settings(p.side) == src_before
        assert await p.side.objects() == src_objects
        caps, params = await settings(p.dside)
        assert params == dst_before[1]
        assert {k: v for k, v in caps.items() if k != "events"} == \
            {k: v for k, v in dst_before[0].items() if k != "events"}
        if tls:
            assert "TLS on src: " in out and "kvmshell-tls removed" in out, out
            assert "kvmshell-tls" not in await p.dside.objects()
        assert state_files(tmp_path) == []
        assert (await p.dside.status()).state is RunState.RUNNING
        check = await check_guest_memory(p.dside, WS, tmp_path)
        assert check.ok, check.problems
        await p.quit()
        assert await compare(p.src_data, p.dst_data) == (0, "Images are identical.")
        assert await compare(p.src.disk, p.dst.disk) == (0, "Images are identical.")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_kill_9_during_the_disk_copy_then_a_cancel_after_follow_leaves_the_source_as_before(
        lab: Lab, tmp_path: Path, tls: bool) -> None:
    async with copy_pair(lab) as p:
        src_before, src_objects = await settings(p.side), await p.side.objects()
        nodes_before = await p.side.execute("query-named-block-nodes")
        await p.io("write -P 0x11 0 8M")
        line = f"@src migrate --to dst --copy-storage all {HOLD}"
        if tls:
            init_ca(tmp_path / "pki", ["localhost"])
            line += f" --tls {tmp_path}/pki"
        await kill_9_once_it_runs(p, tmp_path, line)
        await p.io("write -P 0x5a 12M 1M")
        async with started(tmp_path, *p.args, "-c", "@src migrate --follow") as second:
            await second.line(lambda text: "adopted" in text)
            await wait_for(lambda: _value(json.loads(state_files(tmp_path)[0].read_text())["pid"]),
                           lambda pid: pid == second.proc.pid, what="the state file taken over")
            await p.side.migrate_cancel()
            rc, out, err = await second.end()
        assert rc == 1, err
        assert "cancelled" in out and "2 mirror job(s) cancelled" in out, out
        assert "src's own disks were only read" in out, out
        assert (await p.side.status()).state is RunState.RUNNING
        assert await settings(p.side) == src_before
        assert await p.side.objects() == src_objects                  # no kvmshell-tls left
        assert await p.side.block_jobs() == () and await kvmshell_nodes(p.side) == []
        assert len(await p.side.execute("query-named-block-nodes")) == len(nodes_before)
        await p.io("read -P 0x11 0 8M")
        await p.io("read -P 0x5a 12M 1M")
        check = await check_guest_memory(p.side, WS, tmp_path)
        assert check.ok, check.problems
        assert state_files(tmp_path) == []


async def test_kill_9_after_an_unplug_then_follow_plugs_the_device_back_on_failure(lab: Lab, tmp_path: Path) -> None:
    w = lab.workdir
    src = await lab.start("src", ws_pages=256, ram_mib=64, extra_args=(*XHCI, *TABLET, *side_args(w / "src-side.qmp")),
                          wait_banner=False)
    dst = await lab.start("dst", ws_pages=256, ram_mib=64, incoming=True, disk=src.disk, extra_args=XHCI)
    await wait_for(lambda: _value((w / "src-side.qmp").exists()), bool, what="src's second monitor")
    async with Fleet() as fleet:
        fleet.add("side", Address.unix(Protocol.QMP, str(w / "src-side.qmp")))
        await fleet.start()
        side = fleet.monitor("side")
        g = Guests(src, dst, side, tmp_path)
        async with started(tmp_path, *g.args, "-c", "@src migrate --to dst --unplug tab0 --bandwidth 100K "
                                                    "--stall-timeout 60") as first:
            await g.until(MigrationStatus.ACTIVE)
            await wait_for(lambda: _value(state_files(tmp_path)), bool, what="the state file")
            first.proc.send_signal(signal.SIGKILL)
            assert await first.proc.wait() == -signal.SIGKILL
        state = json.loads(state_files(tmp_path)[0].read_text())
        assert state["unplug"]["devices"] == [{"id": "tab0", "spec": "usb-tablet,id=tab0,bus=xhci.0",
                                               "replug": None, "pending": False}], state
        assert "tab0" not in await peripherals(side)
        async with started(tmp_path, *g.args, "-c", "@src migrate --follow") as second:
            await second.line(lambda text: "adopted" in text)
            os.kill(dst.pid, signal.SIGKILL)
            rc, out, err = await second.end()
        assert rc == 1, err
        assert "tab0 plugged back on src" in out, out
        assert (await peripherals(side)).get("tab0") == "usb-tablet"
        assert (await side.status()).state is RunState.RUNNING


async def shell_typing(tmp_path: Path, *args: str, typed: str) -> tuple[int, str, str]:
    """`kvmshell shell` with ``typed`` on its standard input (a pipe: the prompt reads it all the same)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kvmshell.cli", *args, env=env_for(tmp_path),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate(typed.encode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def test_shell_and_c_say_on_attach_a_migration_nobody_follows(lab: Lab, tmp_path: Path) -> None:
    from tests.test_scripts import guests
    async with guests(lab, tmp_path, ws=WS) as g:
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c", "@src info status")
        assert rc == 0 and err == "", err                              # idle: nothing said
        fleet = await plain_migration(g)
        try:
            src = ("--guest", f"src={g.src.address}")
            rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src info status")
            assert rc == 0, err
            assert err == "kvmshell: src: running, migration active (not followed: `migrate --follow` adopts it)\n", err
            rc, out, err = await shell_typing(tmp_path, *src, "shell", typed="exit\n")
            assert rc == 0, err
            assert "kvmshell: src: running, migration active (not followed: `migrate --follow` adopts it)\n" in err, err
            # a live kvmshell (this test's process, by its state file) follows it: nothing to say
            mine = tmp_path / "state" / "kvmshell" / "running" / running.path_for(str(g.src.address)).name
            mine.parent.mkdir(parents=True, exist_ok=True)
            mine.write_text(json.dumps({"source": "src", "source_address": str(g.src.address), "strategy": "auto",
                                        "pid": os.getpid()}))
            rc, out, err = await kvmshell(tmp_path, *src, "-c", "@src info status")
            assert rc == 0 and err == "", err
            await g.side.migrate_cancel()
        finally:
            await fleet.aclose()


# -- the records themselves (no QEMU) ---------------------------------------------------------------

def test_stage_records_round_trip_through_the_state_file(tmp_path: Path) -> None:
    storage = StorageRecord("all", "vm2", NbdServer(path="/tmp/x/nbd.sock"),
                            (DiskCopy("data0", "#block123", "#block456", 16 << 20, 1),), ("kvmshell-mirror-1",),
                            ("kvmshell-nbd-1",), sock_dir="/tmp/x")
    unplug = UnplugRecord("vm2", (UnpluggedDevice("tab0", "usb-tablet,id=tab0,bus=xhci.0", "usb-kbd,id=tab0"),))
    tls = {"source": TlsSide(("kvmshell-tls",), {"tls-creds": "", "tls-hostname": ""}),
           "dest": TlsSide(("kvmshell-tls", "kvmshell-tls-authz"), {"tls-creds": ""})}
    state = running.RunningFile(source="vm1", source_address="qmp:unix:/run/vm1.qmp", strategy="auto",
                                pid=os.getpid(), stages=("unplug", "storage"), storage=storage, unplug=unplug, tls=tls)
    running.write(state)
    assert running.load(state.source_address) == state
    raw = json.loads(running.path_for(state.source_address).read_text())
    assert raw["storage"]["server"] == {"path": "/tmp/x/nbd.sock", "host": None, "port": None, "tls_creds": None,
                                        "tls_authz": None, "tls_hostname": None}, raw
    raw["storage"]["disks"] = "not a list"
    running.path_for(state.source_address).write_text(json.dumps(raw))
    assert running.load(state.source_address) is None                     # unreadable: logged, not raised
