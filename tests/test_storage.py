"""Migration without shared storage, with real QEMU guests: `migrate --to DEST --copy-storage
all|inc` (NBD + blockdev-mirror) here and between sshd test hosts, `migrate --to-host HOST
--copy-storage`, and QEMU's own block migration (`migrate -b/-i`).

Each guest gets a small qcow2 data disk (id data0) beside its boot disk; data is written through the
source's monitor (qemu-io) before and while the disks are copied, and once both QEMUs have quit
the images are compared with `qemu-img compare`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.storage import StorageStage
from kvmshell.core.values.models import BlockImage, BlockJobStatus, Event, NbdServer, RunState
from kvmshell.core.monitor.base import Monitor, open_monitor
from kvmshell.core.commands.session import Session
from kvmshell.config import parse_config
from kvmshell.errors import CommandFailed, ConfigError, KvmError
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from tests.guests import Lines
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.qemu
WS, PACE = 4096, 8             # 16 MiB working set dirtied at ~33 MB/s: RAM capped below that stays in
RAM = 64                       # pre-copy until the test raises the cap (see HOLD)
MiB = 1 << 20


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {out.decode()}"
    return out.decode()


async def qcow2(path: Path, size: str = "16M", backing: Path | None = None) -> Path:
    extra = ["-F", "qcow2", "-b", str(backing)] if backing else []
    await run("qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), *([] if backing else [size]))
    return path


async def offline_io(path: Path, *commands: str) -> str:
    out = await run("qemu-io", "-f", "qcow2", *(a for c in commands for a in ("-c", c)), str(path))
    assert "fail" not in out.lower(), out
    return out


async def compare(a: Path, b: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("qemu-img", "compare", str(a), str(b),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode().strip()


def data_drive(path: Path) -> tuple[str, ...]:
    return ("-drive", f"file={path},format=qcow2,if=virtio,id=data0")


@dataclass
class Rig(Lines):
    lab: Lab
    session: Session
    guests: dict[str, LabGuest]
    images: dict[str, Path] = field(default_factory=dict)     # (test_faults.py passes it)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def mon(self, name: str) -> Monitor:
        return self.session.fleet.monitor(name)

    async def io(self, guest: str, command: str) -> None:
        out = await self.mon(guest).hmp(f'qemu-io data0 "{command}"')
        assert "fail" not in out.lower(), out

    def stage(self) -> StorageStage:
        stage = next(st for st in self.session.migrations["src"].stages if isinstance(st, StorageStage))
        return stage

    async def quit(self, *names: str) -> None:
        """Quit QEMU cleanly (a kill could lose qcow2 metadata QEMU still caches) and reap it."""
        for name in names:
            try:
                await self.mon(name).execute("quit")
            except KvmError:
                pass
            async with asyncio.timeout(20):
                await self.guests[name].proc.wait()

    async def attach(self, name: str, guest: LabGuest) -> None:
        self.guests[name] = guest
        self.session.fleet.add(name, guest.address)
        await self.session.fleet.start()


@pytest.fixture
async def rig(lab: Lab) -> AsyncIterator[Rig]:
    async with Fleet() as fleet:
        session = Session(fleet, default_registry(), assume_yes=True)
        r = Rig(lab, session, {})
        fleet.subscribe(r.events.put_nowait)
        yield r
        await session.aclose()


async def start_pair(rig: Rig, src_data: Path, dst_data: Path | None, *, dst_monitor: str = "qmp:unix",
                     dst_name: str = "dst") -> None:
    lab = rig.lab
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM,
                          extra_args=data_drive(src_data))
    await rig.attach("src", src)
    await start_dest(rig, dst_data, monitor=dst_monitor, name=dst_name)


async def start_dest(rig: Rig, data: Path | None, *, monitor: str = "qmp:unix", name: str = "dst") -> None:
    guest = await rig.lab.start(name, monitor, ws_pages=WS, pace=PACE, ram_mib=RAM, incoming=True,
                                extra_args=data_drive(data) if data is not None else ())
    await rig.attach(name, guest)


async def dest_running(rig: Rig) -> None:
    await wait_for(lambda: rig.mon("dst").status(), lambda st: st.state is RunState.RUNNING, what="dst runs")


async def no_leftovers_on_source(rig: Rig) -> None:
    src = rig.mon("src")
    assert await src.block_jobs() == ()
    nodes = [n.get("node-name", "") for n in await src.execute("query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("kvmshell-")], nodes


async def ram_phase(rig: Rig) -> None:
    """Wait until RAM migrates: the migration was started with a bandwidth cap below the guest's dirty
    rate, so it stays there (writes through qemu-io now reach a mirror in sync) until ``release``."""
    await wait_for(lambda: rig.mon("src").migration(), lambda m: m.status.value == "active" and m.ram is not None
                   and m.ram.dirty_sync_count >= 2, what="RAM under way")


async def release(rig: Rig) -> None:
    await rig.ok("@src migrate_set_parameter max-bandwidth 1G")


HOLD = "--strategy precopy --bandwidth 16M"     # RAM cannot converge until released; each mirror 8 MB/s


async def test_copy_storage_all_copies_the_disks_written_during_the_migration(rig: Rig) -> None:
    w = rig.lab.workdir
    base = await qcow2(w / "base.qcow2")
    await offline_io(base, "write -P 0x33 8M 4M")                   # `all` copies the backing file's data too
    src_data, dst_data = await qcow2(w / "src-data.qcow2", backing=base), await qcow2(w / "dst-data.qcow2")
    await start_pair(rig, src_data, dst_data)
    await rig.io("src", "write -P 0x11 0 8M")                         # before: 1 s of mirror at 8 MB/s
    text = await rig.ok(f"@src migrate --to dst --copy-storage all {HOLD}")
    assert "preparing (storage)" in text
    await wait_for(lambda: asyncio.sleep(0, rig.stage().disks), lambda ds: len(ds) == 2 and ds[1].offset > 0
                   and not ds[1].ready, what="the mirror under way", every=0.02)
    await rig.io("src", "write -P 0x5a 12M 1M")                      # while the mirror copies
    view = await rig.ok("@src info migrate")
    assert "disk data0: copying" in view, view
    await ram_phase(rig)
    await rig.io("src", "write -P 0x6b 6M 512K")                     # once the mirror is in sync
    view = await rig.ok("@src info migrate")
    assert "disk data0: ready (in sync): " in view and "(100 %), 0 B dirty" in view, view
    await release(rig)
    ev = await rig.finished()
    assert ev.data["status"] == "completed", ev.data
    msg = ev.data["message"]
    assert "in sync on dst" in msg and "NBD server on dst stopped" in msg, msg
    assert (await rig.mon("dst").status()).state is RunState.RUNNING
    assert [d.ended for d in rig.stage().disks] == ["completed", "completed"]
    await no_leftovers_on_source(rig)
    assert await rig.mon("dst").execute("query-block-exports") == []
    await rig.quit("src", "dst")
    assert await compare(src_data, dst_data) == (0, "Images are identical.")
    assert await compare(w / "src.qcow2", w / "dst.qcow2") == (0, "Images are identical.")     # the boot disks
    await offline_io(dst_data, "read -P 0x11 0 2M", "read -P 0x6b 6M 512K", "read -P 0x33 9M 2M",
                     "read -P 0x5a 12M 1M")
    assert "backing-filename" not in await run("qemu-img", "info", "--output=json", str(dst_data))


async def allocated_in_top(path: Path) -> int:
    out = await run("qemu-img", "map", "--output=json", "-f", "qcow2", str(path))
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


async def test_copy_storage_inc_copies_only_the_top_layer(rig: Rig) -> None:
    w = rig.lab.workdir
    base = await qcow2(w / "base.qcow2")
    await offline_io(base, "write -P 0x33 0 16M")
    src_top, dst_top = await qcow2(w / "src-top.qcow2", backing=base), await qcow2(w / "dst-top.qcow2", backing=base)
    await start_pair(rig, src_top, dst_top)
    await rig.io("src", "write -P 0x44 1M 2M")
    # the mode from the config's [guests.src] copy_storage, no flag
    rig.session.config = parse_config({"guests": {"src": {"monitor": str(rig.guests["src"].address),
                                                          "copy_storage": "inc"}}})
    text = await rig.ok(f"@src migrate --to dst {HOLD}")
    assert "preparing (storage)" in text and "dst's top images must be new (empty)" in text, text
    await ram_phase(rig)
    await rig.io("src", "write -P 0x55 10M 256K")
    await release(rig)
    ev = await rig.finished()
    assert ev.data["status"] == "completed", ev.data
    await no_leftovers_on_source(rig)
    await dest_running(rig)
    await rig.quit("src", "dst")
    assert await compare(src_top, dst_top) == (0, "Images are identical.")
    top = await allocated_in_top(dst_top)
    assert top == await allocated_in_top(src_top)
    assert 2 * MiB <= top < 4 * MiB                         # the top layer only, not the 16 MiB base
    await offline_io(dst_top, "read -P 0x44 1M 2M", "read -P 0x55 10M 256K", "read -P 0x33 4M 6M")


async def test_older_commands_drive_mirror_and_nbd_server_add(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a QEMU lacks block-export-add or blockdev-mirror the stage uses nbd-server-add and
    drive-mirror (mode existing, an nbd+unix URI): 7.2 has both kinds, the newer ones are hidden here."""
    from kvmshell.core.monitor.base import Features
    hidden = {"block-export-add", "blockdev-mirror"}
    monkeypatch.setattr(Features, "has_qmp", lambda self, name: name in self.qmp_commands and name not in hidden)
    w = rig.lab.workdir
    src_data, dst_data = await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2")
    await start_pair(rig, src_data, dst_data)
    await rig.io("src", "write -P 0x41 0 4M")
    await rig.ok("@src migrate --to dst --copy-storage all")
    ev = await rig.finished()
    assert ev.data["status"] == "completed", ev.data
    assert "NBD client nodes" not in ev.data["message"], ev.data      # drive-mirror made none
    await no_leftovers_on_source(rig)
    await dest_running(rig)
    await rig.quit("src", "dst")
    assert await compare(src_data, dst_data) == (0, "Images are identical.")


@pytest.mark.parametrize("how", ["blockdev-mirror", "drive-mirror"])
async def test_monitor_block_queries_and_actions(lab: Lab, how: str) -> None:
    """Monitor's typed block queries, and the NBD and mirror actions the disk copy sends, on their own:
    the source's disk (a top image over a base) mirrored into the destination's NBD export and completed."""
    w = lab.workdir
    base = await qcow2(w / "base.qcow2")
    await offline_io(base, "write -P 0x33 0 4M")
    src_data, dst_data = await qcow2(w / "src-data.qcow2", backing=base), await qcow2(w / "dst-data.qcow2")
    await offline_io(src_data, "write -P 0x44 4M 4M")
    guests = [await lab.start("src", MonitorKind.QMP_UNIX, paused=True, extra_args=data_drive(src_data)),
              await lab.start("dst", MonitorKind.QMP_UNIX, incoming=True, extra_args=data_drive(dst_data))]
    src, dst = [await open_monitor(g.name, g.address) for g in guests]
    try:
        data0 = {d.key: d for d in await src.block_devices()}["data0"]
        assert data0.device == "data0" and data0.writable and data0.node_name
        assert data0.image == BlockImage(str(src_data), "qcow2", 16 * MiB)
        assert data0.backing == (BlockImage(str(base), "qcow2", 16 * MiB),)
        target = {d.key: d for d in await dst.block_devices()}["data0"]
        assert target.image == BlockImage(str(dst_data), "qcow2", 16 * MiB) and target.backing == ()
        server = NbdServer(path=str(w / "nbd.sock"))
        await dst.nbd_server_start(server)
        await dst.nbd_export(target.node_name, "e0", writable=True)
        if how == "blockdev-mirror":
            await src.blockdev_add_nbd("client0", server, "e0")
            await src.blockdev_mirror("m0", data0.node_name, "client0", sync="full", speed=MiB, write_blocking=True)
        else:
            await src.drive_mirror("m0", data0.node_name, server.uri("e0"), target_format="raw", sync="full",
                                   speed=MiB, write_blocking=True)
        [job] = await src.block_jobs()
        assert job.id == "m0" and job.type == "mirror" and job.speed == MiB and not job.ready
        assert job.status is BlockJobStatus.RUNNING and job.length >= 8 * MiB and job.error is None
        await src.block_job_set_speed("m0", 0)
        [job] = await wait_for(src.block_jobs, lambda jobs: jobs[0].ready, what="the mirror in sync")
        assert job.status is BlockJobStatus.READY and job.offset == job.length and job.speed == 0
        await src.block_job_cancel("m0")                     # a ready mirror: that completes it
        await wait_for(src.block_jobs, lambda jobs: not jobs, what="the mirror gone")
        with pytest.raises(CommandFailed):
            await src.block_job_cancel("m0", force=True)
        if how == "blockdev-mirror":
            await src.blockdev_del("client0")
        nodes = [n.get("node-name") for n in await src.execute("query-named-block-nodes")]
        assert "client0" not in nodes
        await dst.nbd_server_stop()
        assert await dst.execute("query-block-exports") == []
        for mon, guest in zip((src, dst), guests):
            try:
                await mon.quit()
            except KvmError:
                pass                     # QEMU may close the monitor before it answers
            async with asyncio.timeout(20):
                await guest.proc.wait()
    finally:
        for mon in (src, dst):
            await mon.close()
    assert await compare(src_data, dst_data) == (0, "Images are identical.")
    await offline_io(dst_data, "read -P 0x33 0 4M", "read -P 0x44 4M 4M")


def test_copy_storage_in_the_config() -> None:
    guest = {"monitor": "qmp:unix:/run/vm.qmp"}
    assert parse_config({"guests": {"vm": guest}}).guests["vm"].copy_storage is None
    assert parse_config({"guests": {"vm": guest | {"copy_storage": "all"}}}).guests["vm"].copy_storage == "all"
    with pytest.raises(ConfigError, match=r"\[guests.vm\].copy_storage: expected \"all\""):
        parse_config({"guests": {"vm": guest | {"copy_storage": "yes"}}})


async def test_mismatched_destinations_are_refused_before_anything_starts(rig: Rig) -> None:
    w = rig.lab.workdir
    base = await qcow2(w / "base.qcow2")
    other = await qcow2(w / "other-base.qcow2")
    await start_pair(rig, await qcow2(w / "src-top.qcow2", backing=base), None, dst_name="nodisk")
    await start_dest(rig, await qcow2(w / "small-data.qcow2", "8M"), name="small")
    await start_dest(rig, await qcow2(w / "wrongbase-data.qcow2", backing=other), name="wrongbase")
    await start_dest(rig, await qcow2(w / "hmp-data.qcow2"), monitor="hmp:unix", name="hmp")
    cases = {"@src migrate --to nodisk --copy-storage all": "nodisk has no disk data0",
             "@src migrate --to small --copy-storage all": "small's disk data0 has 8.0 MiB",
             "@src migrate --to wrongbase --copy-storage inc": "the backing files differ (filename",
             "@src migrate --to hmp --copy-storage all": "needs a QMP monitor on both guests (hmp speaks HMP)"}
    for line, why in cases.items():
        o = await rig.run(line)
        assert not o.ok and why in (o.error or ""), (line, o.error)
    src = rig.mon("src")
    assert (await src.status()).state is RunState.RUNNING
    assert (await src.migration()).status.value == "none"
    await no_leftovers_on_source(rig)
    for name in ("nodisk", "small", "wrongbase"):
        dst = rig.mon(name)
        assert (await dst.status()).state is RunState.INMIGRATE
        assert await dst.execute("query-block-exports") == []
        # no NBD server was left: starting one works
        await dst.execute("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                                 "port": str(free_port())}}})
        await dst.execute("nbd-server-stop")


@pytest.mark.parametrize("phase", ["mirror", "ram"])
async def test_destination_killed_leaves_the_source_on_its_own_disks(rig: Rig, phase: str) -> None:
    w = rig.lab.workdir
    src_data = await qcow2(w / "src-data.qcow2")
    expected = await qcow2(w / "expected.qcow2")
    await start_pair(rig, src_data, await qcow2(w / "dst-data.qcow2"))
    await rig.io("src", "write -P 0x21 0 2M")
    if phase == "mirror":
        await rig.ok("@src migrate --to dst --copy-storage all --bandwidth 4M")
        await wait_for(lambda: asyncio.sleep(0, rig.stage().disks), lambda ds: any(d.offset > 0 for d in ds),
                       what="the mirror under way", every=0.02)
    else:
        await rig.ok(f"@src migrate --to dst --copy-storage all {HOLD}")
        await ram_phase(rig)
    await rig.io("src", "write -P 0x22 12M 1M")
    os.kill(rig.guests["dst"].pid, signal.SIGKILL)
    ev = await rig.finished()
    assert ev.data["status"] == "failed", ev.data
    msg = ev.data["message"]
    if phase == "mirror":
        assert "not started" in msg and "the mirror of disk" in msg, msg
    else:
        assert "in sync on dst" in msg, msg
    assert "dst is gone" in msg and "runs on them as before" in msg, msg
    src = rig.mon("src")
    assert (await src.status()).state is RunState.RUNNING
    await no_leftovers_on_source(rig)
    await rig.io("src", "write -P 0x23 14M 64K")                     # its disk works as before
    await rig.io("src", "read -P 0x22 12M 1M")
    await rig.quit("src")
    await offline_io(expected, "write -P 0x21 0 2M", "write -P 0x22 12M 1M", "write -P 0x23 14M 64K")
    assert await compare(src_data, expected) == (0, "Images are identical.")


async def test_kvmshell_closing_mid_migration_cancels_it(rig: Rig) -> None:
    """The session ends (kvmshell quits) while RAM migrates: the mirrors go, and so must the migration
    (it would otherwise wait at pre-switchover with the guest paused, or switch over onto stale disks)."""
    w = rig.lab.workdir
    await start_pair(rig, await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2"))
    await rig.ok(f"@src migrate --to dst --copy-storage all {HOLD}")
    await ram_phase(rig)
    stage = rig.stage()
    await rig.session.aclose()
    assert any("the RAM migration cancelled" in n for n in stage.notes), stage.notes
    src = rig.mon("src")
    await wait_for(lambda: src.migration(), lambda m: not m.status.is_active, what="the migration ended")
    assert (await src.status()).state is RunState.RUNNING
    await no_leftovers_on_source(rig)


@pytest.mark.parametrize("flag", ["-b", "-i"])
async def test_hmp_block_migration_still_copies_and_shows_the_disk(rig: Rig, flag: str) -> None:
    """QEMU's own block migration (7.2 still has it): -b copies whole disks, -i only the top images
    over a backing file both sides have."""
    w = rig.lab.workdir
    if flag == "-b":
        src_data, dst_data = await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2")
    else:
        base = await qcow2(w / "base.qcow2")
        await offline_io(base, "write -P 0x33 0 16M")
        src_data = await qcow2(w / "src-data.qcow2", backing=base)
        dst_data = await qcow2(w / "dst-data.qcow2", backing=base)
    await start_pair(rig, src_data, dst_data)
    await rig.io("src", "write -P 0x71 0 8M")
    port = free_port()
    await rig.ok(f"@dst migrate_incoming tcp:127.0.0.1:{port}")
    await rig.ok("@src migrate_set_speed 1G")          # QEMU would switch over with the disks half-copied
    o = await rig.run(f"@src migrate {flag} tcp:127.0.0.1:{port}")
    assert not o.ok and "may switch over before the disks are copied" in (o.error or ""), o.error
    assert (await rig.mon("src").migration()).status.value == "none"
    await rig.ok("@src migrate_set_speed 8M")
    await rig.ok(f"@src migrate {flag} tcp:127.0.0.1:{port}")
    view = await wait_for(lambda: rig.ok("@src info migrate"), lambda t: "total disk" in t, what="the disk section")
    assert "transferred disk" in view and "remaining disk" in view
    await rig.io("src", "write -P 0x72 10M 1M")                      # block migration tracks it as dirty
    await rig.ok("@src migrate_set_speed 100M")                      # faster than the guest dirties RAM
    await wait_for(lambda: rig.mon("src").migration(), lambda m: m.status.value in ("completed", "failed"),
                   what="the end")
    assert (await rig.mon("src").migration()).status.value == "completed"
    async with asyncio.timeout(10):       # kvmshell followed the plain migration to its end
        assert (await rig.session.migrations["src"].wait()).status == "completed"
    await dest_running(rig)               # the destination may still be loading what the source sent
    await rig.quit("src", "dst")
    assert await compare(src_data, dst_data) == (0, "Images are identical.")
    await offline_io(dst_data, "read -P 0x71 0 8M", "read -P 0x72 10M 1M")
    if flag == "-i":
        await offline_io(dst_data, "read -P 0x33 12M 4M")
        assert await allocated_in_top(dst_data) < 12 * MiB               # not the whole 16 MiB base


# -- to another host: `migrate --to-host HOST --copy-storage inc` --------------------------------

async def test_to_host_copy_storage_creates_the_images_there_and_copies_them(lab: Lab, tmp_path: Path) -> None:
    """Host b is a network namespace with its own sshd (tests/sshd.py) sharing this filesystem: the
    images are created in a directory of their own there, over the same backing files."""
    from kvmshell.lab.launcher import pid_alive
    from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning
    from tests.test_ssh import pool_for
    from tests.test_static import wait_connected
    if not HAVE_SSHD:
        pytest.skip("OpenSSH server not installed (make test installs it)")
    w, run_dir, vm = lab.workdir, tmp_path / "run", "xs"
    base = await qcow2(w / "base.qcow2")
    await offline_io(base, "write -P 0x33 0 16M")
    src_top = await qcow2(w / "src-top.qcow2", backing=base)
    src = await lab.start(vm, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, extra_args=data_drive(src_top))
    try:
        async with SshTestbed(tmp_path / "ssh", ("a", "b")) as bed, \
                Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
            bed.trust()
            fleet.add(vm, src.address)
            await fleet.start()
            session = Session(fleet, default_registry(), assume_yes=True)
            mon = fleet.monitor(vm)
            await mon.hmp('qemu-io data0 "write -P 0x44 1M 2M"')
            [o] = await session.run_line(f"@{vm} migrate --to-host b --dir {run_dir} --copy-storage inc --tunnel")
            assert not o.ok and "--copy-storage does not go through --tunnel" in (o.error or ""), o.error
            run_dir.mkdir()
            (run_dir / "src-top.qcow2").write_bytes(b"not to be overwritten")
            [o] = await session.run_line(f"@{vm} migrate --to-host b --dir {run_dir} --copy-storage inc")
            assert not o.ok and "without --tls" in (o.error or "") and "Nothing was started" in (o.error or ""), \
                o.error
            [o] = await session.run_line(f"@{vm} migrate --to-host b --dir {run_dir} --copy-storage inc "
                                         "--insecure-storage")
            assert not o.ok and f"{run_dir}/src-top.qcow2 already on host b" in (o.error or ""), o.error
            assert (run_dir / "src-top.qcow2").read_bytes() == b"not to be overwritten"
            assert not processes_mentioning(str(run_dir)) and (await mon.status()).running
            (run_dir / "src-top.qcow2").unlink()
            # the destination dies during the disk copy: it is gone, and so are the images made for it
            task = asyncio.create_task(session.run_line(          # (all: empty images of the same size)
                f"@{vm} migrate --to-host b --dir {run_dir} --copy-storage all --bandwidth 2M --insecure-storage"))
            await wait_for(mon.block_jobs, lambda jobs: any(j.offset for j in jobs),
                           what="the mirror under way", timeout=60)
            for pid in processes_mentioning(str(run_dir)):
                os.kill(pid, signal.SIGKILL)
            [o] = await task
            msg = o.error or ""
            assert not o.ok and "the mirror of disk" in msg and "removed the 2 image(s) created" in msg, msg
            assert f"{vm} is running on this host, as before" in msg, msg
            assert not list(run_dir.glob("*.qcow2")) and await mon.block_jobs() == ()
            task = asyncio.create_task(session.run_line(
                f"@{vm} migrate --to-host b --dir {run_dir} --copy-storage inc --strategy precopy --bandwidth 16M "
                "--insecure-storage"))
            await wait_for(lambda: mon.migration(), lambda m: m.status.value == "active" and m.ram is not None
                           and m.ram.dirty_sync_count >= 2, what="RAM under way", timeout=60)
            assert "fail" not in await mon.hmp('qemu-io data0 "write -P 0x55 10M 256K"')
            await mon.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
            [o] = await task
            assert o.ok, o.error
            text = o.result.text() if o.result else ""
            assert f"no shared storage: 2 disk(s) copied over NBD into new images in {run_dir} on host b" in text, text
            assert "disk(s) in sync on" in text and "NBD server on" in text and "source: quit" in text, text
            assert "over NBD on TCP port" in text, text               # the warning: not encrypted
            async with asyncio.timeout(20):
                await src.proc.wait()
            dest = await wait_connected(fleet, f"{vm}.b")
            assert (await dest.status()).state is RunState.RUNNING
            pids = processes_mentioning(str(run_dir))
            try:
                await dest.execute("quit")
            except KvmError:
                pass
            await wait_for(lambda: asyncio.sleep(0, [p for p in pids if pid_alive(p)]), lambda left: not left,
                           what="the destination quit")
            await session.aclose()
    finally:
        for pid in processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
    copy = run_dir / "src-top.qcow2"
    info = json.loads(await run("qemu-img", "info", "--output=json", str(copy)))
    assert info["backing-filename"] == str(base) and info["virtual-size"] == 16 * MiB
    assert await compare(src_top, copy) == (0, "Images are identical.")
    assert await compare(w / f"{vm}.qcow2", run_dir / f"{vm}.qcow2") == (0, "Images are identical.")  # boot disk
    assert 2 * MiB <= await allocated_in_top(copy) < 4 * MiB
    await offline_io(copy, "read -P 0x44 1M 2M", "read -P 0x55 10M 256K", "read -P 0x33 4M 6M")


async def plain_nbd_client_refused(prefix: Sequence[str], uri: str) -> str:
    """A client without TLS (qemu-img, from host a) asks the export: the server must turn it away."""
    proc = await asyncio.create_subprocess_exec(*prefix, "qemu-img", "info", "--image-opts",
                                                f"driver=nbd,{uri}", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode != 0, out.decode()
    return out.decode()


@pytest.mark.parametrize("secure", ["tls", "insecure"])
async def test_to_dest_on_another_ssh_host_copies_over_nbd_on_the_uri_host(lab: Lab, tmp_path: Path,
                                                                           secure: str) -> None:
    """Source on test host a, destination on b (network namespaces with their own sshd): the NBD
    server listens on b where the migration URI points (the a-b link), on a port free there; inc
    checks the backing files there by sha256 (the hosts share this filesystem: the same files).
    Without --tls the copy is refused (nothing started) unless --insecure-storage; with --tls (and
    --tls-authz) the NBD server takes only TLS clients: a plain one is turned away mid-copy."""
    import shutil as sh
    from tests.sshd import HAVE_SSHD, SshTestbed
    from tests.test_ssh import pool_for, remote
    from kvmshell.core.hosts.processes import free_port as free_port_on_host
    from kvmshell.core.migration.tls import REMOTE_ROOT, init_ca
    if not HAVE_SSHD:
        pytest.skip("OpenSSH server not installed (make test installs it)")
    w = lab.workdir
    base = await qcow2(w / "base.qcow2")
    await offline_io(base, "write -P 0x33 0 16M")
    src_data = await qcow2(w / "src-data.qcow2", backing=base)
    dst_data = await qcow2(w / "dst-data.qcow2", backing=base)
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as bed:
        if bed.net is None:
            pytest.skip("the test hosts are not network namespaces (not root)")
        bed.trust()
        b_link = bed.net.hosts[1].ip                # b as a reaches it
        src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM,
                              extra_args=data_drive(src_data), prefix=bed["a"].prefix)
        dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, incoming=True,
                              extra_args=data_drive(dst_data), prefix=bed["b"].prefix)
        async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
            session = Session(fleet, default_registry(), assume_yes=True)
            rig = Rig(lab, session, {"src": src, "dst": dst})
            fleet.subscribe(rig.events.put_nowait)
            fleet.add("src", remote(bed, "a", src.address))
            fleet.add("dst", remote(bed, "b", dst.address))
            await fleet.start()
            await rig.io("src", "write -P 0x61 0 4M")
            uri = f"tcp:{b_link}:{await free_port_on_host(fleet.hosts, fleet.get('dst').address.ssh)}"
            o = await rig.run(f"@src migrate --to dst {uri} --copy-storage inc {HOLD}")
            assert not o.ok and "without --tls" in (o.error or "") and "--insecure-storage" in (o.error or ""), o.error
            assert "\n" not in (o.error or "") and await rig.mon("src").block_jobs() == ()
            assert (await rig.mon("src").status()).running and "src" not in rig.session.migrations
            installed = [Path(REMOTE_ROOT) / bed["a"].addr, Path(REMOTE_ROOT) / bed["b"].addr]
            try:
                if secure == "tls":
                    init_ca(tmp_path / "pki", [bed["a"].addr, bed["b"].addr])
                    text = await rig.ok(f"@src migrate --to dst {uri} --copy-storage inc {HOLD} "
                                        f"--tls {tmp_path}/pki --tls-authz")
                    assert "plain TCP" not in text, text
                else:
                    text = await rig.ok(f"@src migrate --to dst {uri} --copy-storage inc {HOLD} --insecure-storage")
                    assert "over NBD in plain TCP" in text, text
                await ram_phase(rig)
                server = rig.stage()._server
                assert server is not None and server.host == b_link
                if secure == "tls":
                    assert server.tls_creds == "kvmshell-tls" and server.tls_authz == "kvmshell-tls-authz"
                    out = await plain_nbd_client_refused(bed["a"].prefix, f"server.type=inet,server.host={b_link},"
                                                         f"server.port={server.port},export=kvmshell-0")
                    assert "TLS" in out, out
                await rig.io("src", "write -P 0x62 8M 1M")
                await release(rig)
                ev = await rig.finished()
            finally:
                for d in installed:
                    sh.rmtree(d, ignore_errors=True)
            assert ev.data["status"] == "completed", ev.data
            assert f"over NBD (tcp:{b_link}:" in ev.data["message"], ev.data["message"]
            assert (" in TLS)" in ev.data["message"]) == (secure == "tls"), ev.data["message"]
            assert "2 backing file(s) checked on dst's host (sha256)" in ev.data["message"], ev.data["message"]
            await no_leftovers_on_source(rig)
            await dest_running(rig)
            await rig.quit("src", "dst")
            await session.aclose()
    assert await compare(src_data, dst_data) == (0, "Images are identical.")
    await offline_io(dst_data, "read -P 0x61 0 4M", "read -P 0x62 8M 1M", "read -P 0x33 12M 4M")
    assert await allocated_in_top(dst_data) < 8 * MiB                 # the top only
