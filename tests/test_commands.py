"""The command language against real guests: snapshots with their safety rules, the legacy commands,
@all over QMP and HMP, a live migration by HMP commands, and bad input rejected before sending."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.qemu


@pytest.fixture
async def two(lab: Lab) -> AsyncIterator[tuple[Session, LabGuest, LabGuest]]:
    """A QMP guest `q` and an HMP guest `h`, paused (-S), attached in one session."""
    q, h = await asyncio.gather(lab.start("q", MonitorKind.QMP_UNIX, paused=True),
                                lab.start("h", MonitorKind.HMP_UNIX, paused=True))
    async with Fleet() as fleet:
        fleet.add("q", q.address)
        fleet.add("h", h.address)
        await fleet.start()
        session = Session(fleet, default_registry())
        yield session, q, h
        await session.aclose()


async def one(session: Session, line: str) -> Outcome:
    outcomes = await session.run_line(line)
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def ok(o: Outcome) -> str:
    assert o.ok, o.error
    assert o.result is not None
    return o.result.text()


@pytest.mark.parametrize("guest", ["q", "h"])
async def test_snapshot_round_trip(two: tuple[Session, LabGuest, LabGuest], guest: str) -> None:
    s, *_ = two
    s.current = guest
    assert "saved snapshot 'before'" in ok(await one(s, "savevm before"))
    assert "saved snapshot 'after'" in ok(await one(s, "savevm after"))
    table = ok(await one(s, "info snapshots"))
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["before", "after"]
    assert "loaded snapshot 'before'" in ok(await one(s, "loadvm before"))
    assert "deleted snapshot 'before'" in ok(await one(s, "delvm before"))
    assert [sn.tag for sn in await s.fleet.monitor(guest).snapshots()] == ["after"]


async def test_savevm_over_an_existing_tag_asks(two: tuple[Session, LabGuest, LabGuest]) -> None:
    s, *_ = two
    s.current = "q"
    ok(await one(s, "savevm t"))
    first = (await s.fleet.monitor("q").snapshots())[0]
    refused = await one(s, "savevm t")            # no way to ask (no confirmer): refused
    assert not refused.ok and "exists" in (refused.error or "") and "-y" in (refused.error or "")
    assert (await s.fleet.monitor("q").snapshots())[0] == first       # untouched
    asked: list[str] = []

    async def say_no(q: str) -> bool:
        asked.append(q)
        return False
    s.confirmer = say_no
    assert not (await one(s, "savevm t")).ok and "replace it?" in asked[0]
    ok(await one(s, "savevm -y t"))              # -y replaces it
    assert len(await s.fleet.monitor("q").snapshots()) == 1


@pytest.mark.parametrize("guest", ["q", "h"])
async def test_loadvm_of_a_missing_tag_sends_nothing(lab: Lab, guest: str) -> None:
    kind = MonitorKind.QMP_UNIX if guest == "q" else MonitorKind.HMP_PTY
    g = await lab.start(guest, kind)
    async with Fleet() as fleet:
        fleet.add(guest, g.address)
        await fleet.start()
        s = Session(fleet, default_registry(), assume_yes=True)
        o = await one(s, "loadvm nosuchtag")
        assert not o.ok and "no snapshot 'nosuchtag'" in (o.error or "") and "nothing was loaded" in (o.error or "")
        # QEMU itself would have left it paused in restore-vm: kvmshell never sent the loadvm
        assert (await fleet.monitor(guest).status()).state is RunState.RUNNING


async def test_failed_load_says_if_cont_is_safe(two: tuple[Session, LabGuest, LabGuest]) -> None:
    """QEMU's own failure (raw HMP loadvm of a missing tag) leaves the guest paused; kvmshell's loadvm
    on a tag that vanished between the check and the load explains the state."""
    s, *_ = two
    mon = s.fleet.monitor("h")
    await mon.hmp("cont")
    o = await one(s, "@h hmp loadvm ghost")
    assert not o.ok and "does not exist" in (o.error or "")
    assert (await mon.status()).state is RunState.RESTORE_VM
    from kvmshell.core.commands.snapshots import _after_failed_load
    msg = await _after_failed_load(mon, "Snapshot 'ghost' does not exist in one or more devices")
    assert "paused (restore-vm)" in msg and "`cont` resumes it as it was" in msg
    msg = await _after_failed_load(mon, "Error -22 while loading VM state")
    assert "do not `cont`" in msg


async def test_at_all_over_qmp_and_hmp(two: tuple[Session, LabGuest, LabGuest]) -> None:
    s, *_ = two
    outcomes = await s.run_line("@all info status")
    assert [(o.guest, ok(o)) for o in outcomes] == [("q", "VM status: paused (prelaunch)"),
                                                    ("h", "VM status: paused (prelaunch)")]


@pytest.mark.parametrize("guest", ["q", "h"])
async def test_removed_commands_still_work(two: tuple[Session, LabGuest, LabGuest], guest: str) -> None:
    s, *_ = two
    s.current = guest
    mon = s.fleet.monitor(guest)
    assert not mon.features.has_hmp("migrate_set_speed")         # QEMU 7.2 has neither...
    ok(await one(s, "migrate_set_speed 1G"))
    assert "max-bandwidth: 1073741824" in ok(await one(s, "info migrate_parameters"))
    ok(await one(s, "migrate_set_speed 100"))                    # bare number: MiB/s, as the old HMP
    assert (await mon.migrate_parameters()).max_bandwidth == 100 << 20
    ok(await one(s, "migrate_set_downtime 0.5"))
    assert "downtime-limit: 500" in ok(await one(s, "info migrate_parameters"))
    assert (await mon.migrate_parameters()).downtime_limit_ms == 500


@pytest.mark.parametrize("line, message", [
    ("savvm x", "unknown command 'savvm' - did you mean 'savevm'?"),
    ("@nobody info status", "no guest named 'nobody' (guests: q, h)"),
    ("migrate tcp:host", "expected tcp:HOST:PORT"),
    ("migrate ftp://x", "is not a migration URI"),
    ("migrate_set_speed -5M", "is negative"),
    ("migrate_set_downtime soon", "'soon' is not a number of seconds"),
    ("migrate_set_downtime -1", "must be a finite number, 0 or more"),
    ("loadvm", "missing TAG; usage: loadvm [-y] TAG"),
    ("info", "info needs a subcommand"),
    ("migrate_set_capability events maybe", "expected on or off"),
    ("savevm 'unterminated", "unbalanced quote"),
])
async def test_bad_lines_rejected_before_sending(two: tuple[Session, LabGuest, LabGuest], line: str,
                                                 message: str) -> None:
    s, *_ = two
    s.current = "q"
    params = await s.fleet.monitor("q").migrate_parameters()
    o = await one(s, line)
    assert not o.ok and message in (o.error or ""), o.error
    assert await s.fleet.monitor("q").migrate_parameters() == params


async def test_qemu_errors_are_failures_with_guest_name(two: tuple[Session, LabGuest, LabGuest]) -> None:
    s, *_ = two
    o = await one(s, "@h migrate_set_parameter max-bandwidth lots")
    assert not o.ok and o.guest == "h"
    o = await one(s, "@q hmp migrate_set_capability nosuchcap on")
    assert not o.ok and o.guest == "q" and "nosuchcap" in (o.error or "")
    o = await one(s, "@h hmp frobnicate")
    assert not o.ok and "unknown command" in (o.error or "")


async def test_feature_discovery_finds_block_migration(two: tuple[Session, LabGuest, LabGuest]) -> None:
    s, *_ = two
    for name in ("q", "h"):
        assert {"blk", "inc", "resume"} <= await s.fleet.monitor(name).migrate_options()   # QEMU 7.2 still has them


async def test_live_migration_by_hmp_commands(lab: Lab, tmp_path: Path) -> None:
    ws = 1024
    src = await lab.start("src", MonitorKind.HMP_PTY, ws_pages=ws)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, incoming=True, disk=src.disk)
    port = free_port()
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        s = Session(fleet, default_registry())
        ok(await one(s, f"@dst migrate_incoming tcp:127.0.0.1:{port}"))
        ok(await one(s, "@src migrate_set_speed 10G"))
        assert "started" in ok(await one(s, f"@src migrate -d tcp:127.0.0.1:{port}"))
        text = await wait_for(lambda: one(s, "@src info migrate"),
                              lambda o: not o.ok or ("Migration status: completed" in ok(o) and "downtime:" in ok(o))
                              or "failed" in ok(o), timeout=60, what="migration end")
        text = ok(text)
        assert "Migration status: completed" in text
        assert "downtime:" in text and "transferred ram:" in text
        await dst.wait_heartbeats(2)
        assert (await fleet.monitor("dst").status()).state is RunState.RUNNING
        check = await check_guest_memory(fleet.monitor("dst"), ws, tmp_path)
        assert check.ok, check.summary()
        assert (await fleet.monitor("src").migration()).status is MigrationStatus.COMPLETED
        await s.aclose()


async def test_snapshot_commands_refused_during_migration(lab: Lab) -> None:
    ws = 4096
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, ram_mib=64)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, ram_mib=64, incoming=True, disk=src.disk)
    port = free_port()
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        s = Session(fleet, default_registry(), assume_yes=True)
        ok(await one(s, "@src savevm base"))
        ok(await one(s, f"@dst migrate_incoming tcp:127.0.0.1:{port}"))
        ok(await one(s, "@src migrate_set_speed 1M"))       # 1 MiB/s: 64 MiB takes a minute
        ok(await one(s, f"@src migrate tcp:127.0.0.1:{port}"))
        for line in ("loadvm base", "savevm other", "delvm base"):
            o = await one(s, f"@src {line}")
            assert not o.ok and "refused" in (o.error or "") and "migration" in (o.error or ""), o.error
        assert (await fleet.monitor("src").status()).state is RunState.RUNNING    # not paused by a loadvm
        second = await one(s, f"@src migrate tcp:127.0.0.1:{port}")
        assert not second.ok and "already" in (second.error or "")
        assert "cancelled" in ok(await one(s, "@src migrate_cancel"))
        await wait_for(fleet.monitor("src").migration, lambda m: m.status is MigrationStatus.CANCELLED,
                       what="cancelled migration")
        assert (await fleet.monitor("src").status()).state is RunState.RUNNING
        await s.aclose()


async def test_block_migration_with_dash_b_on_qemu_72(lab: Lab) -> None:
    """`migrate -b` (QEMU 7.2 still has block migration) copies the disk to a destination that has
    only an empty image of the same size: afterwards the two images are identical."""
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=256)
    empty = lab.workdir / "dst-empty.qcow2"
    await lab._run("qemu-img", "create", "-q", "-f", "qcow2", str(empty), "1M")
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=256, incoming=True, disk=empty)
    port = free_port()
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        s = Session(fleet, default_registry())
        ok(await one(s, f"@dst migrate_incoming tcp:127.0.0.1:{port}"))
        assert "started" in ok(await one(s, f"@src migrate -d -b tcp:127.0.0.1:{port}"))
        info = await wait_for(fleet.monitor("src").migration, lambda m: m.status.is_finished, what="block migration")
        assert info.status is MigrationStatus.COMPLETED, info
        # the source says completed once it has sent the last byte; the destination may still be
        # writing the disk's tail: quit it only once it has left the incoming state
        await wait_for(fleet.monitor("dst").status, lambda st: st.state is not RunState.INMIGRATE,
                       what="the destination loaded the whole stream")
        for name in ("dst", "src"):               # a clean quit writes qcow2's cached metadata out
            ok(await one(s, f"@{name} quit -y"))
        await s.aclose()
    async with asyncio.timeout(30):
        await src.proc.wait()
        await dst.proc.wait()
    proc = await asyncio.create_subprocess_exec("qemu-img", "compare", "-q", str(src.disk), str(empty))
    assert await proc.wait() == 0, "the destination's disk differs from the source's"


async def test_attach_finds_running_guests_on_this_machine(lab: Lab, two: tuple[Session, LabGuest, LabGuest]) -> None:
    import secrets
    s, q, h = two
    name = f"extra-{secrets.token_hex(3)}"        # --match keeps other tests' guests (xdist) out of it
    extra = await lab.start(name, MonitorKind.QMP_UNIX, paused=True)
    [o] = await s.run_line(f"attach --match {name}")
    table = ok(o)
    assert name in table and str(extra.address) in table and "connected" in table
    assert (await s.fleet.monitor(name).status()).state is RunState.PRELAUNCH
    [again] = await s.run_line(f"attach --match {name}")
    assert "not attached already" in ok(again)                                      # nothing new the 2nd time
    assert s.fleet.names.count("q") == 1 and len(s.fleet) == 3
    [bad] = await s.run_line("attach nosuchhost")
    assert not bad.ok and "no host 'nosuchhost' in the config" in (bad.error or "")
