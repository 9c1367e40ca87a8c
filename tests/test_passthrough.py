"""`migrate ... --unplug ID [--replug ID=SPEC]` and virtio-net failover, with real QEMU guests.

The boot-sector test guest takes part in no hotplug: a USB device on an xhci controller is a device
it loses without cooperation (QEMU removes it at once), a PCI device behind a root port one it never
releases."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmshell.config import Config, GuestConfig
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.endpoints import Notices
from kvmshell.core.migration.live.job import FINISHED, MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.migration.live.passthrough import PassthroughStage, device_props, device_text, parse_replug, peripherals
from kvmshell.core.values.models import Event, RunState
from kvmshell.core.commands.session import Session
from kvmshell.errors import ConfigError, Refused
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.qemu
WS = 256                        # 1 MiB working set
RAM = 64
XHCI = ("-device", "qemu-xhci,id=xhci")
TABLET = ("-device", "usb-tablet,id=tab0,bus=xhci.0")
# (guests that need no running code are not waited for: the firmware alone takes seconds)
# usb-audio cannot migrate: QEMU lists it in blocked-reasons until it is unplugged
AUDIO = ("-audiodev", "none,id=snd0", "-device", "usb-audio,id=aud0,audiodev=snd0,bus=xhci.0")
ROOT_PORT_NIC = ("-device", "pcie-root-port,id=rp0,chassis=1", "-device", "e1000e,id=nic0,bus=rp0")
FAILOVER = ("-netdev", "user,id=hn0", "-device", "virtio-net-pci,netdev=hn0,id=net1,failover=on,mac=52:54:00:00:00:01",
            "-device", "pcie-root-port,id=rp0,chassis=1", "-netdev", "user,id=hn1",
            "-device", "e1000e,netdev=hn1,id=hostdev0,bus=rp0,failover_pair_id=net1,mac=52:54:00:00:00:01")


@dataclass
class Run:
    session: Session
    events: list[Event]
    finished: asyncio.Queue[Event]

    async def line(self, line: str) -> Outcome:
        [outcome] = await self.session.run_line(line)
        return outcome

    async def outcome(self, timeout: float = 60) -> Event:
        async with asyncio.timeout(timeout):
            return await self.finished.get()

    def deleted(self, guest: str) -> list[str]:
        return [str(e.data.get("device")) for e in self.events if e.guest == guest and e.name == "DEVICE_DELETED"]


Maker = Callable[..., Awaitable[Run]]


@pytest.fixture
async def run_in() -> AsyncIterator[Maker]:
    """run_in(guests..., config=None): a Session over the lab guests given, its fleet's events kept."""
    fleets: list[Fleet] = []
    sessions: list[Session] = []

    async def make(*guests: LabGuest, config: Config | None = None) -> Run:
        fleet = Fleet()
        fleets.append(fleet)
        events: list[Event] = []
        finished: asyncio.Queue[Event] = asyncio.Queue()
        fleet.subscribe(events.append)
        fleet.subscribe(lambda e: finished.put_nowait(e) if e.name == FINISHED else None)
        for g in guests:
            fleet.add(g.name, g.address)
        await fleet.start()
        session = Session(fleet, default_registry(), config, assume_yes=True)
        sessions.append(session)
        return Run(session, events, finished)

    yield make
    for s in sessions:
        await s.aclose()
    for f in fleets:
        await f.aclose()


@pytest.mark.kvm
async def test_unplug_migrate_replug_on_the_destination(lab: Lab, run_in: Maker) -> None:
    if lab.accel == "tcg":
        # measured here: under TCG, QEMU 7.2's main loop hangs (monitor dead, process alive) after a
        # USB device is hot-plugged on an xhci controller of a guest that just came in by migration
        # (~1 run in 8, and every run once the destination has settled); under KVM it never did
        pytest.skip("USB hotplug on a migrated-in guest hangs QEMU 7.2 under TCG; runs with KVM")
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, extra_args=(*XHCI, *TABLET, *AUDIO), wait_banner=False)
    # the destination has the controller but not the devices: after the unplug the source has none
    dst = await lab.start("dst", MonitorKind.HMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk,
                          extra_args=XHCI)                        # HMP: plugged there with HMP's device_add
    r = await run_in(src, dst)

    blocked = await r.line("@src migrate --to dst")
    assert not blocked.ok and "usb-audio" in (blocked.error or "") and "cannot migrate" in (blocked.error or "")

    started = await r.line("@src migrate --to dst --unplug tab0 --unplug aud0 "
                           "--replug aud0=usb-kbd,bus=nosuch.0")
    assert started.ok, started.error
    ev = await r.outcome()
    assert ev.data["status"] == "completed", ev.data
    assert sorted(r.deleted("src")) == ["aud0", "tab0"]
    dmon = r.session.fleet.monitor("dst")
    on_dst = await peripherals(dmon)
    assert on_dst.get("tab0") == "usb-tablet"
    assert "aud0" not in on_dst                        # the replacement's bus does not exist there
    assert (await dmon.status()).state is RunState.RUNNING
    msg = ev.data["message"]
    assert "tab0 unplugged from src and plugged on dst (usb-tablet,id=tab0,bus=xhci.0)" in msg
    assert "aud0 could not be plugged on dst" in msg and "nosuch.0" in msg
    view = (await r.line("@src info migrate")).result
    assert view is not None and "plugged on dst" in view.text()


async def test_guest_that_never_releases_the_device_is_not_migrated(lab: Lab, run_in: Maker, tmp_path: Path) -> None:
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, extra_args=ROOT_PORT_NIC)
    r = await run_in(src)
    smon = r.session.fleet.monitor("src")
    job = MigrationJob.of(r.session.fleet, MigrationRequest("src", uri=f"tcp:127.0.0.1:{free_port()}"),
                       stages=[PassthroughStage("src", None, ["nic0"], {}, timeout=1.0)])
    await job.prepare()
    outcome = await job.run()
    assert outcome.status == "failed"
    assert ("the guest did not release nic0 within 1 s (a PCI device needs the guest's cooperation via ACPI "
            "hotplug); nothing was migrated") in outcome.message
    assert "nic0 stays plugged on src" in outcome.full_message
    assert (await smon.migration()).status.value == "none"           # `migrate` was never sent
    assert (await smon.status()).state is RunState.RUNNING
    assert "nic0" in await peripherals(smon)
    assert (await check_guest_memory(smon, WS, tmp_path)).ok


async def test_failed_migration_plugs_the_device_back_on_the_source(lab: Lab, run_in: Maker) -> None:
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, extra_args=(*XHCI, *TABLET), wait_banner=False)
    dst = await lab.start("dst", ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk, extra_args=XHCI)
    r = await run_in(src, dst)
    smon = r.session.fleet.monitor("src")
    # the firmware's pages alone (about 1 MB) take seconds at 100 KiB/s: time to kill the destination
    assert (await r.line("@src migrate --to dst --unplug tab0 --bandwidth 100K --stall-timeout 60")).ok
    await wait_for(smon.migration, lambda m: m.status.value == "active", what="migration active")
    assert "tab0" not in await peripherals(smon)
    os.kill(dst.pid, signal.SIGKILL)
    ev = await r.outcome()
    assert ev.data["status"] == "failed", ev.data
    assert "tab0 plugged back on src" in ev.data["message"]
    assert (await peripherals(smon)).get("tab0") == "usb-tablet"
    assert (await smon.status()).state is RunState.RUNNING


async def test_config_unplug_list_and_a_destination_kvmshell_does_not_attach(lab: Lab, run_in: Maker) -> None:
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, extra_args=(*XHCI, *TABLET, *AUDIO), wait_banner=False)
    dst = await lab.start("dst", ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk, extra_args=XHCI)
    config = Config(guests={"src": GuestConfig("src", src.address, unplug=("tab0",))})
    r = await run_in(src, dst, config=config)
    smon = r.session.fleet.monitor("src")

    # a plain `migrate URI`: the config's list (tab0) is used; usb-audio still blocks after it: tab0 comes back
    o = await r.line(f"@src migrate tcp:127.0.0.1:{free_port()}")
    assert o.ok, o.error
    assert [type(st) for st in r.session.migrations["src"].stages if not isinstance(st, Notices)] == [PassthroughStage]
    ev = await r.outcome()
    assert ev.data["status"] == "failed"
    msg = ev.data["message"]
    assert "still cannot migrate after unplugging tab0" in msg and "usb-audio" in msg
    assert "tab0 plugged back on src" in msg
    assert r.deleted("src") == ["tab0"]
    assert (await peripherals(smon)).get("tab0") == "usb-tablet"
    assert (await smon.migration()).status.value == "none"

    # the flags replace the config's list; to a plain URI, the destination is left to plug by hand
    port = free_port()
    assert (await r.line(f"@dst migrate_incoming tcp:127.0.0.1:{port}")).ok
    o = await r.line(f"@src migrate tcp:127.0.0.1:{port} --unplug tab0 --unplug aud0 --strategy precopy")
    assert o.ok, o.error
    ev = await r.outcome()
    assert ev.data["status"] == "completed", ev.data
    assert "the destination is not attached to kvmshell: plug it there by hand with " \
           "`device_add usb-tablet,id=tab0,bus=xhci.0`" in ev.data["message"]
    assert "tab0" not in await peripherals(r.session.fleet.monitor("dst"))


async def test_virtio_net_failover_is_left_to_qemu(lab: Lab, run_in: Maker) -> None:
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, extra_args=(*FAILOVER, *XHCI, *TABLET),
                          wait_banner=False)
    r = await run_in(src)
    smon = r.session.fleet.monitor("src")
    port = free_port()

    primary = await r.line(f"@src migrate tcp:127.0.0.1:{port} --unplug hostdev0")
    assert not primary.ok
    assert "hostdev0 is the primary of the virtio-net failover pair net1" in (primary.error or "")
    assert "QEMU unplugs it during the migration" in (primary.error or "")

    missing = await r.line(f"@src migrate tcp:127.0.0.1:{port} --unplug nosuch")
    assert not missing.ok and missing.error is not None and "\n" not in missing.error
    assert missing.guest == "src" and missing.error.startswith("no device 'nosuch'")
    assert "(its devices with an id: net1, rp0, tab0, xhci)" in missing.error
    assert (await smon.migration()).status.value == "none"

    # the standby, asked for by name: a warning, and it is not unplugged
    stage = PassthroughStage("src", None, ["net1", "tab0"], {})
    job = MigrationJob.of(r.session.fleet, MigrationRequest("src", uri=f"tcp:127.0.0.1:{port}"), stages=[stage])
    await stage.prepare(job)
    text = " ".join(stage.warnings)
    assert "virtio-net failover" in text and "hostdev0 is the primary of net1" in text
    assert "net1 is a virtio-net failover standby (failover=on)" in text
    assert [d.id for d in stage.devices] == ["tab0"]
    assert stage.devices[0].spec == "usb-tablet,id=tab0,bus=xhci.0"      # its -device option, as given
    assert any(k == "failover" for k, _ in stage.lines())


async def test_a_hot_plugged_device_is_recorded_from_qom(lab: Lab, run_in: Maker) -> None:
    src = await lab.start("src", ws_pages=WS, ram_mib=RAM, wait_banner=False, extra_args=(
        *XHCI, "-device", "pcie-root-port,id=rp1,chassis=2", "-netdev", "user,id=hn5"))
    r = await run_in(src)
    smon = r.session.fleet.monitor("src")
    await smon.hmp("device_add usb-kbd,id=kbd0,bus=xhci.0,port=2")          # on no command line
    await smon.hmp("device_add e1000e,id=nic9,bus=rp1,netdev=hn5,mac=52:54:00:00:00:09")
    stage = PassthroughStage("src", None, ["kbd0", "nic9"], {})
    await stage.prepare(MigrationJob.of(r.session.fleet, MigrationRequest("src", uri="tcp:127.0.0.1:1"), stages=[stage]))
    kbd, nic = stage.devices
    assert kbd.spec == "usb-kbd,id=kbd0,bus=xhci.0,port=2" and "QOM" in kbd.origin
    assert nic.spec == "e1000e,id=nic9,bus=rp1,addr=00.0,mac=52:54:00:00:00:09,netdev=hn5"
    # the rebuilt text plugs it back: a migration to where nothing listens fails after the unplug
    job = MigrationJob.of(r.session.fleet, MigrationRequest("src", uri=f"tcp:127.0.0.1:{free_port()}"),
                       stages=[PassthroughStage("src", None, ["kbd0"], {})])
    await job.prepare()
    outcome = await job.run()
    assert outcome.status == "failed" and "kbd0 plugged back on src" in outcome.full_message
    assert r.deleted("src") == ["kbd0"]
    assert (await peripherals(smon)).get("kbd0") == "usb-kbd"
    assert await smon.execute("qom-get", {"path": "/machine/peripheral/kbd0", "property": "port"}) == "2"


async def test_hmp_source_refused_and_replug_needs_an_unplug(lab: Lab, run_in: Maker) -> None:
    src = await lab.start("src", MonitorKind.HMP_UNIX, ws_pages=WS, ram_mib=RAM, extra_args=(*XHCI, *TABLET),
                          wait_banner=False)
    r = await run_in(src)
    o = await r.line(f"@src migrate tcp:127.0.0.1:{free_port()} --unplug tab0")
    assert not o.ok and "needs the guest's QMP monitor" in (o.error or "")
    o = await r.line(f"@src migrate tcp:127.0.0.1:{free_port()} --replug tab0=usb-kbd")
    assert not o.ok and "tab0 is not unplugged; add --unplug tab0" in (o.error or "")
    o = await r.line("@src migrate --to-host h1 --unplug tab0 -y")          # refused, not ignored
    assert not o.ok and "--unplug/--replug do not go with --to-host" in (o.error or "")
    assert (await r.session.fleet.monitor("src").status()).state is RunState.RUNNING


def test_device_text_round_trip_and_replug_parsing() -> None:
    props = device_props("vfio-pci,host=0000:03:00.1,id=hostdev0,romfile=a,,b")
    assert props == {"driver": "vfio-pci", "host": "0000:03:00.1", "id": "hostdev0", "romfile": "a,b"}
    assert device_text(props) == "vfio-pci,host=0000:03:00.1,id=hostdev0,romfile=a,,b"
    assert device_props('{"driver": "e1000", "id": "n0", "x": true}') == {"driver": "e1000", "id": "n0", "x": "on"}
    assert parse_replug("nic0=e1000,mac=52:54:00:00:00:02") == ("nic0", "e1000,mac=52:54:00:00:00:02,id=nic0")
    assert parse_replug("nic0=e1000,id=nic0") == ("nic0", "e1000,id=nic0")
    for bad in ("nic0", "=e1000", "nic0=mac=1"):
        with pytest.raises(ConfigError):
            parse_replug(bad)
    with pytest.raises(Refused):
        PassthroughStage("src", None, ["a"], {"b": "e1000,id=b"})
