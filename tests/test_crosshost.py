"""Live migration to another host (`migrate --to-host HOST [--tunnel]`) with real sshd test hosts and
real QEMU.

The source runs here (kvmshell's host); host ``b`` is a network namespace with its own sshd
(tests/sshd.py). The two share this machine's filesystem: that is the shared storage live migration
to another host assumes, and pmemsave files written by the destination are read here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.hosts.processes import used_ports
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning
from tests.test_ssh import pool_for, remote
from tests.test_static import bed, counter, wait_connected  # noqa: F401  (bed: the fixture)
from tests.waiting import wait_for

pytestmark = [pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)"),
              pytest.mark.timeout(90), pytest.mark.qemu]

VM = f"xh{secrets.token_hex(3)}"
WS = 1024          # pages of working set: 4 MiB the guest keeps dirtying
PACE = 2
RAM = 64
BIG_WS = 4096      # 16 MiB: more than the socket buffers hold, so a hung destination stalls the source


@pytest.fixture
async def run_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """The destination's run directory on host b; every QEMU started from it is killed afterwards."""
    d = tmp_path / "run"
    yield d
    left = processes_mentioning(str(d))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    await wait_for(lambda: asyncio.sleep(0, processes_mentioning(str(d))), lambda pids: not pids,
                   timeout=10, what="the destinations' QEMU exited")


async def source(lab: Lab, ws: int = WS) -> LabGuest:
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=ws, pace=PACE, ram_mib=RAM)
    await src.wait_heartbeats(2)
    return src


async def moved_and_checked(fleet: Fleet, src: LabGuest, tmp_path: Path) -> None:
    """The source QEMU is gone; the destination runs with the guest's memory intact."""
    async with asyncio.timeout(20):
        await src.proc.wait()
    dest = await wait_connected(fleet, f"{VM}.b")
    assert (await dest.status()).state is RunState.RUNNING
    start = await counter(dest, tmp_path / "c.bin")
    await wait_for(lambda: counter(dest, tmp_path / "c.bin"), lambda c: c != start, what="the guest runs on b")
    check = await check_guest_memory(dest, WS, tmp_path)
    assert check.ok, check.summary()


async def active(mon: Monitor) -> None:
    await wait_for(lambda: mon.migration(), lambda m: m.status.value == "active", timeout=20,
                   what="the migration is under way")


async def gone(run_dir: Path) -> None:
    await wait_for(lambda: asyncio.sleep(0, processes_mentioning(str(run_dir))), lambda pids: not pids,
                   timeout=10, what="no destination QEMU left on b")


def test_used_ports_reads_proc_net_tcp() -> None:
    text = ("  sl  local_address rem_address   st tx_queue rx_queue\n"
            "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000\n"
            "   1: 00000000000000000000000001000000:C350 00000000000000000000000000000000:0000 0A\n")
    assert used_ports(text) == {22, 50000}


async def test_live_migration_to_host_b_keeps_the_memory_and_quits_the_source(
        lab: Lab, bed: SshTestbed, run_dir: Path, tmp_path: Path) -> None:
    src = await source(lab)
    progress: list[str] = []
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, src.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True, progress=lambda g, m: progress.append(m))
        [o] = await session.run_line(f"@{VM} migrate --to-host b --dir {run_dir}")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert f"moved live to b as {VM}.b" in text and "source: quit" in text, text
        assert f"tcp:{bed['b'].addr}:" in text, text
        assert "warning: the migration stream to host b" in text and "not encrypted" in text, text
        assert "shared storage" in text and "-incoming defer" in text and "-daemonize" in text, text
        assert any(m.startswith("starting") for m in progress), progress
        await moved_and_checked(fleet, src, tmp_path)
        await session.aclose()


async def test_live_migration_from_host_a_to_host_b(lab: Lab, bed: SshTestbed, run_dir: Path,
                                                    tmp_path: Path) -> None:
    if bed.net is None:
        pytest.skip("the test hosts are not network namespaces (not root): no host a to migrate from")
    b_link = bed.net.hosts[1].ip                # b's address on the a-b link (its ssh address is on the uplink)
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, prefix=bed["a"].prefix)
    await src.wait_heartbeats(2)
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, remote(bed, "a", src.address))
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        [o] = await session.run_line(f"@{VM} migrate --to-host b --tunnel --dir {run_dir}")
        assert not o.ok and "--tunnel needs the source QEMU on this host" in (o.error or ""), o.error
        [o] = await session.run_line(f"@{VM} migrate --to-host a --dir {run_dir}")
        assert not o.ok and f"{VM} already runs on host a" in (o.error or ""), o.error
        [o] = await session.run_line(f"@{VM} migrate --to-host b --address {b_link} --dir {run_dir}")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert f"tcp:{b_link}:" in text and "source: quit" in text, text
        await moved_and_checked(fleet, src, tmp_path)
        await session.aclose()


async def test_a_destination_that_cannot_start_leaves_the_source_running(
        lab: Lab, bed: SshTestbed, run_dir: Path, tmp_path: Path) -> None:
    src = await source(lab, BIG_WS)
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, src.address)
        await fleet.start()
        mon = fleet.monitor(VM)
        quiet = Session(fleet, default_registry())
        [o] = await quiet.run_line(f"@{VM} migrate --to-host b --dir {run_dir}")
        assert not o.ok and "there is no one to ask: add -y" in (o.error or ""), o.error
        progress: list[str] = []
        session = Session(fleet, default_registry(), assume_yes=True, progress=lambda g, m: progress.append(m))
        # the image is not there (as without shared storage): refused, nothing started
        hidden = src.disk.with_suffix(".hidden")
        src.disk.rename(hidden)
        try:
            [o] = await session.run_line(f"@{VM} migrate --to-host b --dir {run_dir}")
        finally:
            hidden.rename(src.disk)
        assert not o.ok and f"{src.disk}: not on host b" in (o.error or ""), o.error
        assert "needs shared storage" in (o.error or ""), o.error
        # a run directory that cannot be made: nothing started
        blocker = tmp_path / "file"
        blocker.write_text("")
        [o] = await session.run_line(f"@{VM} migrate --to-host b --dir {blocker}/run")
        assert not o.ok and o.error_title == "live migration failed", o.error
        assert "nothing was done" in (o.error or "") and f"{VM} is running" in (o.error or ""), o.error
        assert (o.error or "").startswith(f"start failed: creating {blocker}/run on host b ("), o.error
        # QEMU starts, then the migration is cancelled: the 7.2 destination exits by itself
        task = asyncio.create_task(session.run_line(f"@{VM} migrate --to-host b --dir {run_dir} --bandwidth 1M"))
        await active(mon)
        assert processes_mentioning(str(run_dir)), "no destination QEMU on b"
        [c] = await session.run_line(f"@{VM} migrate_cancel")
        assert c.ok, c.error
        [o] = await task
        msg = o.error or ""
        assert not o.ok and msg.startswith("migration failed: migration cancelled"), msg
        assert f"undone: {VM}.b on host b" in msg and "had exited already" in msg, msg
        assert f"{VM} is running on this host, as before" in msg, msg
        await gone(run_dir)
        # the destination hangs (SIGSTOP): the stalled migration is cancelled and the destination killed
        task = asyncio.create_task(session.run_line(f"@{VM} migrate --to-host b --dir {run_dir} --bandwidth 4M --stall-timeout 1"))
        await active(mon)
        [pid] = processes_mentioning(str(run_dir))
        os.kill(pid, signal.SIGSTOP)
        [o] = await task
        msg = o.error or ""
        assert not o.ok and msg.startswith("migration failed: cancelled: no progress for 1 s"), msg
        assert f"undone: killed {VM}.b on host b" in msg, msg
        assert any(m.startswith("migration active: pass 1,") for m in progress), progress
        assert f"{VM} is running on this host, as before" in msg, msg
        await gone(run_dir)
        assert f"{VM}.b" not in fleet
        assert (await mon.status()).running and src.alive
        await src.wait_heartbeats(2)
        check = await check_guest_memory(mon, BIG_WS, tmp_path)
        assert check.ok, check.summary()
        await session.aclose()


async def test_tunnelled_live_migration_through_ssh(lab: Lab, bed: SshTestbed, run_dir: Path,
                                                    tmp_path: Path) -> None:
    src = await source(lab)
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, src.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        [o] = await session.run_line(f"@{VM} migrate --to-host b --tunnel --dir {run_dir}")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert "(through SSH)" in text and "tunnelling costs throughput" in text, text
        assert "not encrypted" not in text, text
        await moved_and_checked(fleet, src, tmp_path)
        await session.aclose()
    assert not list(Path("/tmp").glob("kvmshell-tunnel-*/mig.sock")), "the tunnel's socket was left behind"


async def test_to_host_dry_run_edit_and_tls(lab: Lab, bed: SshTestbed, run_dir: Path, tmp_path: Path) -> None:
    """--dry-run shows the destination's command line and starts nothing; --edit changes it before it
    runs; --tls puts host b's certificates there and encrypts the stream."""
    import shutil

    from kvmshell.core.migration.tls import REMOTE_ROOT, init_ca
    src = await source(lab)
    b = bed["b"].addr
    uuid = "0e6f7a3c-81b2-4d55-a1d4-5c9e2b7f0a11"

    async def editor(text: str) -> str:
        assert "-incoming defer" in text and text.startswith("# the command that starts"), text
        return text + f"    -uuid {uuid}\n"

    try:
        async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
            fleet.add(VM, src.address)
            await fleet.start()
            session = Session(fleet, default_registry(), assume_yes=True)
            [o] = await session.run_line(f"@{VM} migrate --to-host b --dir {run_dir} --dry-run")
            assert o.ok, o.error
            text = o.result.text() if o.result else ""
            assert "nothing was started" in text and "-incoming defer" in text and f"{run_dir}/" in text, text
            assert not processes_mentioning(str(run_dir)) and (await fleet.monitor(VM).status()).running
            [o] = await session.run_line(f"@{VM} migrate --edit --dir {run_dir}")
            assert not o.ok and "--edit goes with --to-host" in (o.error or ""), o.error
            session.editor = editor
            init_ca(tmp_path / "pki", ["localhost", b])
            [o] = await session.run_line(f"@{VM} migrate --to-host b --dir {run_dir} --edit --tls {tmp_path}/pki")
            assert o.ok, o.error
            text = o.result.text() if o.result else ""
            assert "not encrypted" not in text and "the stream went in TLS" in text, text
            assert "edited before it ran" in text, text
            await moved_and_checked(fleet, src, tmp_path)
            dest = fleet.monitor(f"{VM}.b")
            assert (await dest.execute("query-uuid"))["UUID"] == uuid
            assert (await dest.migrate_parameters()).get("tls-creds") == "kvmshell-tls"
            await session.aclose()
    finally:
        shutil.rmtree(Path(REMOTE_ROOT) / b, ignore_errors=True)


@pytest.mark.parametrize("secure", ["tls", "insecure"])
async def test_copy_storage_from_host_a_to_host_b(lab: Lab, bed: SshTestbed, run_dir: Path, tmp_path: Path,
                                                  secure: str) -> None:
    """A source that itself runs on an SSH host copies its disk to host b (the engine's view of the
    fleet must know the hosts: this died with an AttributeError once); the disk goes in TLS with
    --tls (the NBD server on b uses the migration's credentials), in plain TCP with --insecure-storage."""
    import shutil

    from kvmshell.core.migration.tls import REMOTE_ROOT, init_ca
    if bed.net is None:
        pytest.skip("the test hosts are not network namespaces (not root): no host a to migrate from")
    b_link = bed.net.hosts[1].ip
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, ram_mib=RAM, prefix=bed["a"].prefix)
    await src.wait_heartbeats(2)
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, remote(bed, "a", src.address))
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        installed = [Path(REMOTE_ROOT) / bed["a"].addr, Path(REMOTE_ROOT) / bed["b"].addr]
        try:
            if secure == "tls":
                init_ca(tmp_path / "pki", [bed["a"].addr, bed["b"].addr])
            how = f"--tls {tmp_path}/pki" if secure == "tls" else "--insecure-storage"
            [o] = await session.run_line(f"@{VM} migrate --to-host b --address {b_link} --dir {run_dir} "
                                         f"--copy-storage all {how}")
        finally:
            for d in installed:
                shutil.rmtree(d, ignore_errors=True)
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert ("not encrypted" in text) == (secure == "insecure"), text
        assert (" in TLS)" in text) == (secure == "tls"), text
        assert f"no shared storage: 1 disk(s) copied over NBD into new images in {run_dir} on host b" in text, text
        assert "source: quit" in text, text
        await moved_and_checked(fleet, src, tmp_path)
        assert (run_dir / f"{VM}.qcow2").exists()
        await session.aclose()
