"""Static migration (savevm, copy, loadvm on another host) between real sshd test hosts, real QEMU.

Host ``a`` and host ``b`` are network namespaces with their own sshd (tests/sshd.py); they share
this machine's filesystem, so pmemsave files written by a QEMU on either are read here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.commands.session import Session
from kvmshell.core.hosts.shell import CHECKSUM, HostShell
from kvmshell.core.migration.history import MigrationHistory
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.core.migration.static_copy import receive_command, send_command
from kvmshell.core.hosts.ssh.connection import RemoteResult
from kvmshell.errors import KvmError
from kvmshell.lab import image
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory, dump_memory
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning, run
from tests.test_ssh import pool_for, remote
from tests.test_cli import env_for, kvmshell
from tests.test_json_contract import units_said
from tests.waiting import wait_for

pytestmark = [pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)"),
              pytest.mark.timeout(90), pytest.mark.qemu]

# the test hosts share this machine's process table, and other tests' guests show on them: a name of
# our own keeps the destination's name check about our guest only
VM = f"st{secrets.token_hex(3)}"
WS = 512          # pages of working set: 2 MiB the guest keeps dirtying
PACE = 2


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[SshTestbed]:
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as testbed:
        testbed.trust()
        yield testbed
    assert not processes_mentioning(f"sshd -D -e -f {tmp_path}"), "an sshd outlived its test"


@pytest.fixture
async def dest_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """The image directory on host b; every QEMU started from it is killed afterwards."""
    d = tmp_path / "dest"
    yield d
    for pid in processes_mentioning(str(d)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    await wait_for(lambda: asyncio.sleep(0, processes_mentioning(str(d))), lambda left: not left,
                   timeout=10, what="the copies' QEMU exited")
    for run_dir in Path("/run/kvmshell").glob(f"{VM}.*"):        # sockets moved there when the path is long
        shutil.rmtree(run_dir, ignore_errors=True)


async def ws_dump(mon: Monitor, path: Path) -> bytes:
    return await dump_memory(mon, image.WS_BASE, WS * image.PAGE_SIZE, path)


async def counter(mon: Monitor, path: Path) -> bytes:
    return await dump_memory(mon, image.PASS_COUNTER_ADDR, 4, path)


async def wait_connected(fleet: Fleet, name: str) -> Monitor:
    async with asyncio.timeout(20):
        await fleet.get(name).connected.wait()
    return fleet.monitor(name)


async def test_static_migration_host_a_to_b_keeps_memory_identical(lab: Lab, bed: SshTestbed, dest_dir: Path,
                                                                   tmp_path: Path) -> None:
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, prefix=bed["a"].prefix)
    await src.wait_heartbeats(2)
    base = lab.workdir / f"boot-{WS}-{PACE}.raw"
    dest_dir.mkdir()
    (dest_dir / base.name).write_bytes(base.read_bytes())      # the backing file is there already
    progress: list[str] = []
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, remote(bed, "a", src.address))
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True, progress=lambda g, m: progress.append(m))
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag t1 --keep-source --paused --dir {dest_dir}")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert f"{VM}.b" in text and "kept, paused" in text, text
        assert f"{base.name} (1.0 MiB, already there (same checksum))" in text, text
        assert any(m.startswith(f"copying {VM}.qcow2") for m in progress), progress
        doc = o.result.to_json() if o.result else {}                 # --json: numbers, units in the keys
        assert doc["copied_bytes"] > 0 and doc["times"]["copy_s"] >= 0 and not units_said(doc), doc
        # the source stays paused since `stop`: its memory is what savevm saved
        assert (await fleet.monitor(VM).status()).state is RunState.PAUSED
        before = await ws_dump(fleet.monitor(VM), tmp_path / "src.bin")
        copy = await wait_connected(fleet, f"{VM}.b")
        assert not (await copy.status()).running                 # -S: loaded, not yet run
        after = await ws_dump(copy, tmp_path / "dst.bin")
        assert after == before, "the working set after -loadvm on b differs from the source's at savevm"
        assert (await check_guest_memory(copy, WS, tmp_path)).ok
        start = await counter(copy, tmp_path / "c.bin")
        await copy.hmp("cont")
        await wait_for(lambda: counter(copy, tmp_path / "c.bin"), lambda c: c != start, what="the copy runs")
        check = await check_guest_memory(copy, WS, tmp_path)
        assert check.ok, check.summary()
        assert src.alive                                          # --keep-source
        # replay: quit the copy, start another from the images on b, which hold t1
        await copy.hmp("quit")
        await wait_for(lambda: asyncio.sleep(0, processes_mentioning(str(dest_dir))), lambda left: not left,
                       timeout=10, what="the copy exited")
        [o] = await session.run_line(f"loadvm-on b {VM} nosuch --dir {dest_dir} --name again")
        assert not o.ok and "has no snapshot 'nosuch'" in (o.error or ""), o.error
        [o] = await session.run_line(f"loadvm-on b {VM} t1 --dir {dest_dir} --name again")
        assert o.ok, o.error
        again = await wait_connected(fleet, "again")
        assert (await again.status()).running
        start = await counter(again, tmp_path / "c.bin")
        await wait_for(lambda: counter(again, tmp_path / "c.bin"), lambda c: c != start, what="the replay runs")
        check = await check_guest_memory(again, WS, tmp_path)
        assert check.ok, check.summary()
        await session.aclose()
    assert (dest_dir / f"{VM}.qcow2").exists() and not (dest_dir / f"{VM}.qcow2.part").exists()


async def test_static_migration_from_here_resumes_after_a_cut_and_quits_the_source(
        lab: Lab, bed: SshTestbed, dest_dir: Path, tmp_path: Path) -> None:
    # a read-only data disk big enough to be copied in several chunks (savevm skips read-only disks)
    data = lab.workdir / "data.raw"
    data.write_bytes(os.urandom(16 << 20))
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE,
                          extra_args=("-drive", f"file={data},format=raw,if=virtio,readonly=on"))
    await src.wait_heartbeats(2)
    cut: list[str] = []

    def progress(guest: str, message: str) -> None:
        # cut host b once a quarter of data.raw is sent: b's sshd took all but its window (2 MiB) of
        # it and passed it to the pipeline that writes the .part file (it gets it all before its EOF)
        m = re.match(r"copying data\.raw: .* \((\d+) %", message)
        if not cut and m and 25 <= int(m.group(1)) < 100:
            cut.append(message)
            bed["b"].kill_sessions()

    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, src.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True, progress=progress)
        [o] = await session.run_line(f"static-migrate {VM} --to b --dir {dest_dir}")
        assert cut and not o.ok, o.result.text() if o.result else cut
        msg = o.error or ""
        assert msg.startswith(f"{VM}: copy failed:") and f"resumed {VM}" in msg and "deleted snapshot" in msg, msg
        assert "a new run continues from them" in msg, msg
        assert (await fleet.monitor(VM).status()).running
        # again: what arrived before the cut is not sent twice
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag move1 --dir {dest_dir}")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert f"boot-{WS}-{PACE}.raw (1.0 MiB, already there (same checksum))" in text, text
        assert "data.raw (16.0 MiB, resumed at " in text, text
        assert (dest_dir / "data.raw").read_bytes() == data.read_bytes()
        async with asyncio.timeout(20):
            await src.proc.wait()                                 # the source was quit
        copy = await wait_connected(fleet, f"{VM}.b")
        assert (await copy.status()).running
        start = await counter(copy, tmp_path / "c.bin")
        await wait_for(lambda: counter(copy, tmp_path / "c.bin"), lambda c: c != start, what="the copy runs")
        check = await check_guest_memory(copy, WS, tmp_path)
        assert check.ok, check.summary()
        assert "move1" in {s.tag for s in await copy.snapshots()}
        await session.aclose()
    # both runs are in the history (they were not), the failed one too, with a trace `report` reads
    failed, done = MigrationHistory.default().entries()
    assert (failed.guest, failed.source, failed.dest, failed.strategy, failed.outcome) == \
        (VM, "local", "b", "static", "failed")
    assert (done.strategy, done.outcome) == ("static", "completed") and done.bytes and done.bytes > 8 << 20, done
    assert done.total_s and done.total_s > 0
    events = [e.name for e in load_trace(done.trace).events]
    assert events[:3] == ["preflight", "savevm", "copy"] and events[-1] == "outcome", events


@pytest.fixture
async def small_dest(dest_dir: Path) -> AsyncIterator[Path]:
    """host b's image directory on a 2 MiB tmpfs: room for the lab images as they are (1.2 MiB), not
    for them plus a savevm's RAM. Mounted before the test hosts start: each sshd gets a copy of this
    machine's mounts when its namespace is made (no mount propagation is assumed)."""
    dest_dir.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(dest_dir))
    try:
        yield dest_dir
    finally:
        await run("umount", "-l", str(dest_dir), check=False)


@pytest.fixture
async def bed_small(small_dest: Path, tmp_path: Path) -> AsyncIterator[SshTestbed]:
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as testbed:
        testbed.trust()
        yield testbed
    assert not processes_mentioning(f"sshd -D -e -f {tmp_path}"), "an sshd outlived its test"


async def test_a_full_destination_disk_leaves_the_source_running(lab: Lab, bed_small: SshTestbed, small_dest: Path,
                                                                 tmp_path: Path) -> None:
    bed = bed_small
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, prefix=bed["a"].prefix)
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, remote(bed, "a", src.address))
        await fleet.start()
        # preflight refusals touch nothing and say what is wrong
        lines = {f"static-migrate {VM} --to nowhere --dir {small_dest}": "--to nowhere: not a configured host",
                 f"static-migrate {VM} --to a --dir {small_dest}": f"{VM} already runs on host a",
                 f"static-migrate {VM} --to b --tag a/b --dir {small_dest}": "snapshot tag 'a/b': use letters",
                 f"static-migrate {VM} --to b --dir {src.disk.parent}": "would be copied onto itself"}
        quiet = Session(fleet, default_registry())
        [o] = await quiet.run_line(f"static-migrate {VM} --to b --dir {small_dest}")
        assert not o.ok and "there is no one to ask: add -y, or --keep-source" in (o.error or ""), o.error
        session = Session(fleet, default_registry(), assume_yes=True)
        for line, expected in lines.items():
            [o] = await session.run_line(line)
            assert not o.ok and expected in (o.error or ""), (line, o.error)
        mon = fleet.monitor(VM)
        assert (await mon.status()).running and not await mon.snapshots()
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag full1 --dir {small_dest}")
        assert not o.ok, o.result.text() if o.result else ""
        assert o.error_title == "static migration failed", o.error
        msg = o.error or ""
        assert msg.startswith(f"{VM}: copy failed: not enough space"), msg
        assert "undone: " in msg and "deleted snapshot 'full1'" in msg and f"resumed {VM}" in msg, msg
        mon = fleet.monitor(VM)
        assert (await mon.status()).running
        assert "full1" not in {s.tag for s in await mon.snapshots()}
        await src.wait_heartbeats(2)
        check = await check_guest_memory(mon, WS, tmp_path)
        assert check.ok, check.summary()
        assert f"{VM}.b" not in fleet
        await session.aclose()


async def test_the_copys_command_line_is_shown_and_edited_before_anything_is_touched(
        lab: Lab, bed: SshTestbed, dest_dir: Path, tmp_path: Path) -> None:
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE, prefix=bed["a"].prefix)
    dest_dir.mkdir()
    uuid = "5f1c0b7e-2a4d-4c1e-9b7a-0d3e8f6a1c22"
    shown: list[str] = []
    plans = iter([
        lambda text: "\n".join(line for line in text.splitlines() if "-loadvm" not in line),   # drops -loadvm
        lambda text: "# nothing left\n",                                                        # emptied
        lambda text: text + f"    -uuid {uuid}\n",                                              # a real change
    ])

    async def editor(text: str) -> str:
        shown.append(text)
        return next(plans)(text)

    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add(VM, remote(bed, "a", src.address))
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        mon = fleet.monitor(VM)
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag e1 --dir {dest_dir} --dry-run")
        assert o.ok, o.error
        text = o.result.text() if o.result else ""
        assert "nothing was done" in text and "-loadvm e1" in text and "-incoming" not in text, text
        assert f"{dest_dir}/{VM}.qcow2" in text and "-daemonize" in text, text
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag e1 --dir {dest_dir} --edit")
        assert not o.ok and "UsageError" not in (o.error or "") and "needs a terminal" in (o.error or ""), o.error
        session.editor = editor
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag e1 --dir {dest_dir} --edit")
        assert not o.ok and "lacks -loadvm e1" in (o.error or "") and "nothing was done" in (o.error or ""), o.error
        assert shown[0].startswith("# the command that starts") and "-loadvm e1" in shown[0], shown[0]
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag e1 --dir {dest_dir} --edit")
        assert not o.ok and "cancelled, nothing was done" in (o.error or ""), o.error
        # nothing was touched by the dry run and the refused edits
        assert (await mon.status()).running and not await mon.snapshots()
        assert not list(dest_dir.iterdir())
        [o] = await session.run_line(f"static-migrate {VM} --to b --tag e1 --dir {dest_dir} --edit --keep-source")
        assert o.ok, o.error
        assert "edited before it ran" in (o.result.text() if o.result else "")
        copy = await wait_connected(fleet, f"{VM}.b")
        assert (await copy.execute("query-uuid"))["UUID"] == uuid
        assert (await copy.status()).running
        await session.aclose()


async def _pass(side: HostShell, source: Path, part: Path, offset: int) -> RemoteResult:
    """Stream ``source`` from ``offset`` into ``part`` with the engine's two pipelines (both here),
    as the engine relays them; what the receiving end said."""
    src = await side.start(send_command(str(source), offset))
    dst = await side.start(receive_command(str(part), offset))
    try:
        while data := await src.read(1 << 20):
            try:
                await dst.write(data)
            except KvmError:
                break
        _, got = await asyncio.gather(src.finish(30), dst.finish(30))
    finally:
        src.close()
        dst.close()
    return got


async def test_the_receiving_pipeline_hashes_the_kept_prefix_and_what_it_writes(tmp_path: Path) -> None:
    side = HostShell(None, None)
    try:
        source = tmp_path / "image.raw"
        source.write_bytes(os.urandom(3 << 20) + b"tail")
        want = hashlib.blake2b(source.read_bytes()).hexdigest()
        assert CHECKSUM == "b2sum"
        part = tmp_path / "image.raw.part"
        # a fresh copy, then one resumed after 1 MiB (the .part holds a prefix, as after a cut)
        for offset in (0, 1 << 20):
            part.write_bytes(source.read_bytes()[:offset] if offset else b"stale bytes, truncated")
            got = await _pass(side, source, part, offset)
            assert got.stdout.decode().split() == ["written", "0", want, "-"], got
            assert part.read_bytes() == source.read_bytes()
        # the hash is over the file's content: a wrong prefix shows
        part.write_bytes(b"x" * (1 << 20))
        got = await _pass(side, source, part, 1 << 20)
        assert want not in got.stdout.decode() and b"written 0" in got.stdout, got
    finally:
        await side.aclose()


async def test_a_write_that_fails_is_reported_not_hashed_over(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small))
    side = HostShell(None, None)
    try:
        source = tmp_path / "image.raw"
        source.write_bytes(os.urandom(4 << 20))
        got = await _pass(side, source, small / "image.raw.part", 0)
        assert b"written 0" not in got.stdout, got
        assert "No space left on device" in got.stderr.decode(), got
    finally:
        await side.aclose()
        await run("umount", "-l", str(small), check=False)


async def test_static_migrate_from_c_says_its_progress_on_stderr_and_is_in_the_history(
        lab: Lab, bed: SshTestbed, dest_dir: Path, tmp_path: Path) -> None:
    """`kvmshell -c 'static-migrate ...'`: a copy of GBs must not be silent (progress on stderr, the
    result on stdout, exit 0), and `kvmshell history` lists it as every other migration."""
    data = lab.workdir / "data.raw"
    data.write_bytes(os.urandom(8 << 20))
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE,
                          extra_args=("-drive", f"file={data},format=raw,if=virtio,readonly=on"))
    await src.wait_heartbeats(2)
    config = tmp_path / "kvmshell.toml"
    config.write_text(bed.config_toml())
    home = tmp_path / "home"                                 # the user's ~/.ssh/known_hosts knows both hosts
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(bed["a"].known_hosts_line() + bed["b"].known_hosts_line())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "--config", str(config), "--guest", f"{VM}={src.address}",
        "-c", f"static-migrate {VM} --to b --tag c1 --keep-source --paused --dir {dest_dir}",
        env=env_for(tmp_path) | {"HOME": str(home)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        stdout, stderr = await proc.communicate()
    rc, out, err = proc.returncode, stdout.decode(), stderr.decode()
    assert rc == 0, err
    assert f"kvmshell: {VM}: savevm c1" in err and f"kvmshell: {VM}: copying data.raw" in err, err
    assert "Traceback" not in err and "copying" not in out and f"{VM}.b" in out, out
    rc, out, err = await kvmshell(tmp_path, "--json", "history")
    assert rc == 0, err
    [entry] = json.loads(out)
    assert (entry["guest"], entry["from"], entry["to"], entry["strategy"], entry["outcome"]) == \
        (VM, "local", "b", "static", "completed"), entry
    rc, out, err = await kvmshell(tmp_path, "--json", "report", entry["id"])
    assert rc == 0, err
    report = json.loads(out)
    assert report["outcome"] == "completed" and report["sent_bytes"] == entry["bytes"] > 8 << 20, report


async def test_ctrl_c_during_the_copy_undoes_and_exits_130(lab: Lab, bed: SshTestbed, dest_dir: Path,
                                                          tmp_path: Path) -> None:
    """Ctrl-C while `-c 'static-migrate ...'` copies: the source runs again as before (its snapshot
    deleted), nothing runs on b, the exit status is 130, and the history says cancelled."""
    data = lab.workdir / "data.raw"
    data.write_bytes(os.urandom(8 << 20))
    src = await lab.start(VM, MonitorKind.QMP_UNIX, ws_pages=WS, pace=PACE,
                          extra_args=("-drive", f"file={data},format=raw,if=virtio,readonly=on"))
    await src.wait_heartbeats(2)
    for dev in bed._uplinks:                               # 8 MiB at 16 Mbit/s: seconds to press Ctrl-C in
        await run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "16mbit", "burst", "32kb", "latency", "50ms")
    config = tmp_path / "kvmshell.toml"
    config.write_text(bed.config_toml())
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(bed["a"].known_hosts_line() + bed["b"].known_hosts_line())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "--config", str(config), "--guest", f"{VM}={src.address}", "-y",
        "-c", f"static-migrate {VM} --to b --tag cc --dir {dest_dir}",
        env=env_for(tmp_path) | {"HOME": str(home)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    err = b""
    async with asyncio.timeout(60):
        while b"copying data.raw" not in err:
            line = await proc.stderr.readline()
            assert line, f"kvmshell ended before the copy: {err.decode()}"
            err += line
        proc.send_signal(signal.SIGINT)
        rest, stdout = await asyncio.gather(proc.stderr.read(), proc.stdout.read())
        rc = await proc.wait()
    err += rest
    assert rc == 130, err.decode()
    [said] = [line for line in err.decode().splitlines() if " interrupted: " in line]   # undone, kept where
    assert said.startswith(f"kvmshell: {VM}: copy interrupted: Ctrl-C. done: stopped {VM}; saved snapshot 'cc'"), said
    assert f"undone: deleted snapshot 'cc'; resumed {VM} (it is running again)" in said, said
    assert "Traceback" not in err.decode() and err.decode().endswith("kvmshell: interrupted\n"), err.decode()
    async with Fleet() as fleet:
        fleet.add(VM, src.address)
        await fleet.start()
        mon = await wait_connected(fleet, VM)
        assert (await mon.status()).running, "the source was left paused"
        assert "cc" not in await mon.hmp("info snapshots"), "the snapshot was left on the source"
    await src.wait_heartbeats(1)
    assert not processes_mentioning(str(dest_dir)), "a copy runs on b"
    rc, out, _ = await kvmshell(tmp_path, "--json", "history")
    [entry] = json.loads(out)
    assert (entry["guest"], entry["outcome"]) == (VM, "cancelled"), entry
