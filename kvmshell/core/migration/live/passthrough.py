"""Passthrough devices around a migration: `migrate ... --unplug ID [--replug ID=SPEC]`.

A device that cannot migrate (a VFIO/SR-IOV NIC, a non-migratable USB device) leaves the source
before the migration and comes back after it:

``prepare``       check each device exists on the source and record how to plug it again: the
                  ``-device`` option it was started with (from the QEMU command line), or else its
                  driver, bus and main properties read over QOM. Detect virtio-net failover
                  (``failover=on`` / ``failover_pair_id``): QEMU unplugs and replugs the primary
                  itself there, so kvmshell says so and leaves those devices alone.
``before_start``  ``device_del`` each device and wait for its DEVICE_DELETED event (a timeout when
                  the guest does not release it: nothing is migrated), then check nothing else
                  still blocks the migration.
``finish``        success: ``device_add`` the recorded device (or the ``--replug`` SPEC) on the
                  destination; failure: plug each unplugged device back on the source.

The source needs a QMP monitor (HMP gives no DEVICE_DELETED event); the destination may speak
either. Devices are plugged with the HMP ``device_add`` text, the ``-device`` syntax, on both.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmshell.core.hosts.processes import source_command
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.values.cmdline import QemuCommand
from kvmshell.core.migration.live.blockers import explain
from kvmshell.core.migration.live.resume import UnpluggedDevice, UnplugRecord
from kvmshell.core.migration.live.stages import BaseStage
from kvmshell.core.monitor.base import Monitor
from kvmshell.errors import CommandFailed, ConfigError, Disconnected, KvmError, Refused

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationOutcome

UNPLUG_TIMEOUT = 10.0
PERIPHERAL = "/machine/peripheral"
# properties worth keeping when a device is rebuilt from QOM (no -device option to copy)
_QOM_PROPS = ("addr", "port", "mac", "netdev", "host", "sysfsdev", "chardev", "drive", "audiodev")
_ON = ("on", "true", "yes", "1")


@dataclass
class Device:
    id: str
    driver: str = ""
    spec: str = ""                 # device_add text that plugs it back on the source
    replug: str | None = None      # --replug SPEC for the destination (None: ``spec``)
    origin: str = ""               # where ``spec`` came from
    state: str = "to check"        # the live view's row
    unplugged: bool = False        # DEVICE_DELETED seen
    pending: bool = False          # device_del sent, not (yet) released

    @property
    def dest_spec(self) -> str:
        return self.replug or self.spec


@dataclass
class Failover:
    """What the command line says about virtio-net failover: standby id -> its primaries."""

    standbys: set[str] = field(default_factory=set)
    primaries: dict[str, str] = field(default_factory=dict)   # primary id -> standby id


# -- -device text ------------------------------------------------------------------------------

def split_props(value: str) -> list[str]:
    """QEMU's comma-separated properties; ",," is a comma inside a value."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def device_props(value: str) -> dict[str, str]:
    """A ``-device`` value as {prop: value}, the driver under "driver" (JSON syntax too)."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return {}
        return {str(k): _text(v) for k, v in data.items()} if isinstance(data, dict) else {}
    props: dict[str, str] = {}
    for i, part in enumerate(split_props(value)):
        if "=" in part:
            k, v = part.split("=", 1)
            props[k] = v
        elif i == 0:
            props["driver"] = part
    return props


def _text(v: Any) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def device_text(props: dict[str, str]) -> str:
    """{prop: value} (with "driver") back as device_add text; commas in values are doubled."""
    rest = [f"{k}={v.replace(',', ',,')}" for k, v in props.items() if k != "driver"]
    return ",".join([props.get("driver", ""), *rest])


def parse_replug(item: str, guest: str | None = None) -> tuple[str, str]:
    """``ID=SPEC`` -> (ID, SPEC), SPEC given ``id=ID`` if it names no id."""
    dev_id, sep, spec = item.partition("=")
    dev_id, spec = dev_id.strip(), spec.strip()
    props = device_props(spec) if spec else {}
    if not sep or not dev_id or not props.get("driver"):
        raise ConfigError(f"--replug {item!r}: expected ID=DRIVER[,prop=value...], e.g. "
                          "--replug hostdev0=vfio-pci,host=0000:03:00.1", guest=guest)
    if "id" not in props:
        spec += f",id={dev_id}"
    return dev_id, spec


def failover_of(cmd: QemuCommand | None) -> Failover:
    found = Failover()
    for value in cmd.values("-device") if cmd is not None else ():
        props = device_props(value)
        dev_id = props.get("id")
        if dev_id and props.get("failover", "").lower() in _ON:
            found.standbys.add(dev_id)
        if dev_id and props.get("failover_pair_id"):
            found.primaries[dev_id] = props["failover_pair_id"]
    return found


# -- the monitor side --------------------------------------------------------------------------

async def peripherals(mon: Monitor) -> dict[str, str]:
    """The devices that have an id: {id: type}."""
    entries = await mon.qom_list(PERIPHERAL)
    return {name: kind[6:-1] for name, kind in entries.items() if kind.startswith("child<") and kind.endswith(">")}


async def qom_get(mon: Monitor, dev_id: str, prop: str) -> Any:
    try:
        return await mon.qom_get(f"{PERIPHERAL}/{dev_id}", prop)
    except CommandFailed:
        return None                  # this device has no such property


async def plug(mon: Monitor, spec: str) -> None:
    await mon.hmp(f"device_add {spec}")


async def command_line(job: MigrationJob) -> QemuCommand | None:
    """The source QEMU's command line, or None when it cannot be read (another host unreachable...)."""
    address = job.source.address
    pool = job.hosts if address.ssh is not None else None
    try:
        _, cmd = await source_command(pool, HostShell(pool, address.ssh), address, job.req.source, "the device")
    except (KvmError, OSError):
        return None
    return cmd


# -- the stage ---------------------------------------------------------------------------------

class PassthroughStage(BaseStage):
    name = "unplug"
    clears_blockers = True          # the engine leaves the blocked-reasons check to before_start

    def __init__(self, source: str, dest: str | None, unplug: list[str], replug: dict[str, str],
                 timeout: float = UNPLUG_TIMEOUT) -> None:
        super().__init__()
        self.source, self.dest_name, self.timeout = source, dest, timeout
        self.devices = [Device(d, replug=replug.get(d)) for d in dict.fromkeys(unplug)]
        self.failover: list[str] = []         # rows about failover pairs QEMU handles
        for dev_id in replug:
            if dev_id not in unplug:
                raise Refused(f"--replug {dev_id}=...: {dev_id} is not unplugged; add --unplug {dev_id}",
                              guest=source)

    # -- in the state file, and back in the kvmshell that adopts the migration ---------------------
    def record(self) -> UnplugRecord | None:
        gone = [d for d in self.devices if d.unplugged or d.pending]
        return UnplugRecord(self.dest_name, tuple(UnpluggedDevice(d.id, d.spec, d.replug, d.pending)
                                                  for d in gone)) if gone else None

    @classmethod
    def resumed(cls, rec: UnplugRecord, source: str, dest: str | None) -> PassthroughStage:
        """The stage of the kvmshell that started the migration: its devices are unplugged; ``finish``
        plugs them on the destination (or back on the source) as usual."""
        stage = cls(source, dest or rec.dest, [d.id for d in rec.devices],
                    {d.id: d.replug for d in rec.devices if d.replug})
        for dev, was in zip(stage.devices, rec.devices):
            dev.spec, dev.pending, dev.unplugged = was.spec, was.pending, not was.pending
            dev.origin, dev.state = "the state file", f"unplugged from {source}"
        return stage

    # -- prepare: check and record ---------------------------------------------------------------
    async def prepare(self, job: MigrationJob) -> None:
        mon = job.source
        if not mon.delivers_events:
            raise Refused("--unplug needs the guest's QMP monitor (the unplug ends with a DEVICE_DELETED event "
                          "that HMP does not give): attach it by its QMP socket", guest=self.source)
        have = await peripherals(mon)
        cmd = await command_line(job)
        options = {p["id"]: v if not v.lstrip().startswith("{") else device_text(p)     # JSON: as text
                   for v in (cmd.values("-device") if cmd else ()) if "id" in (p := device_props(v))}
        fo = await self._failover(mon, cmd, have)
        keep: list[Device] = []
        for dev in self.devices:
            standby = fo.primaries.get(dev.id) or await self._pair_of(mon, dev.id, have)
            if standby:
                raise Refused(f"{dev.id} is the primary of the virtio-net failover pair {standby} "
                              f"(failover_pair_id={standby}): QEMU unplugs it during the migration and the guest "
                              f"plugs it back on the destination by itself; drop --unplug {dev.id} (and {dev.id} "
                              "from unplug in the config)", guest=self.source)
            if dev.id not in have:
                ids = ", ".join(sorted(have)) or "none"
                raise Refused(f"no device {dev.id!r} to unplug on this guest (its devices with an id: {ids})",
                              guest=self.source)
            if dev.id in fo.standbys:
                self.warnings.append(f"{dev.id} is a virtio-net failover standby (failover=on): it migrates as "
                                     "it is, QEMU handles its primary; not unplugging it")
                continue
            dev.driver = have[dev.id]
            if dev.id in options:
                dev.spec, dev.origin = options[dev.id], "its -device option"
            else:
                dev.spec, dev.origin = await self._from_qom(mon, dev), "QOM (not on the command line)"
            dev.state = f"recorded from {dev.origin}: {dev.spec}"
            keep.append(dev)
        self.devices = keep

    async def _failover(self, mon: Monitor, cmd: QemuCommand | None, have: dict[str, str]) -> Failover:
        """The failover pairs (from the command line, and QOM for a hot-plugged standby), said in warnings."""
        fo = failover_of(cmd)
        for dev_id, kind in have.items():
            if dev_id not in fo.standbys and kind.startswith("virtio-net") and \
                    await qom_get(mon, dev_id, "failover") is True:
                fo.standbys.add(dev_id)
        for primary, standby in fo.primaries.items():
            self.failover.append(f"{primary} is the primary of {standby}: QEMU unplugs it when the migration "
                                 "starts and the guest takes it back on the destination")
        for standby in sorted(fo.standbys - set(fo.primaries.values())):
            self.failover.append(f"{standby} has failover=on: QEMU unplugs its primary itself during a migration")
        if self.failover:
            self.warnings.append("virtio-net failover: " + "; ".join(self.failover) + ". kvmshell leaves those "
                                 "devices to QEMU and does not unplug them by hand")
        return fo

    async def _pair_of(self, mon: Monitor, dev_id: str, have: dict[str, str]) -> str | None:
        if dev_id not in have:
            return None
        pair = await qom_get(mon, dev_id, "failover_pair_id")
        return str(pair) if pair else None

    async def _from_qom(self, mon: Monitor, dev: Device) -> str:
        """The device as device_add text, rebuilt from what QOM says of it."""
        props = {"driver": dev.driver, "id": dev.id}
        bus = await qom_get(mon, dev.id, "parent_bus")
        if bus:
            props["bus"] = str(bus).rsplit("/", 1)[-1]
        for name in _QOM_PROPS:
            value = await qom_get(mon, dev.id, name)
            if value in (None, "") or isinstance(value, (dict, list)):
                continue
            if name == "addr" and isinstance(value, int):
                value = f"{value >> 3:02x}.{value & 7}"       # devfn -> slot.function
            props[name] = _text(value)
        return device_text(props)

    # -- before_start: unplug --------------------------------------------------------------------
    async def before_start(self, job: MigrationJob) -> None:
        mon = job.source
        for dev in self.devices:
            await self._unplug(mon, dev)
        info = await mon.migration()
        if info.blocked_reasons:
            gone = ", ".join(d.id for d in self.devices)
            raise Refused(f"this guest still cannot migrate{f' after unplugging {gone}' if gone else ''}: "
                          + explain(info.blocked_reasons), guest=self.source)

    async def _unplug(self, mon: Monitor, dev: Device) -> None:
        deleted = asyncio.Event()

        def on_event(ev: Any) -> None:
            if ev.name == "DEVICE_DELETED" and ev.data.get("device") == dev.id:
                deleted.set()

        unsubscribe = mon.subscribe(on_event)
        try:
            try:
                await mon.device_del(dev.id)
            except CommandFailed as e:
                raise CommandFailed(f"cannot unplug {dev.id}: {e.message}; nothing was migrated",
                                    guest=self.source) from None
            dev.pending = True
            dev.state = f"device_del sent: waiting for the guest to release it (up to {self.timeout:g} s)"
            try:
                async with asyncio.timeout(self.timeout):
                    await deleted.wait()
            except TimeoutError:
                if dev.id in await peripherals(mon):
                    dev.state = f"not released by the guest within {self.timeout:g} s, still on {self.source}"
                    raise CommandFailed(
                        f"the guest did not release {dev.id} within {self.timeout:g} s (a PCI device needs the "
                        "guest's cooperation via ACPI hotplug); nothing was migrated", guest=self.source) from None
        finally:
            unsubscribe()
        dev.pending, dev.unplugged = False, True
        dev.state = f"unplugged from {self.source}"

    # -- finish: plug on the destination, or back on the source ----------------------------------
    async def finish(self, job: MigrationJob, outcome: MigrationOutcome) -> None:
        for dev in self.devices:
            if not (dev.unplugged or dev.pending):
                continue
            if outcome.ok:
                await self._plug_on_dest(job, dev)
            elif outcome.status == "postcopy-paused":
                dev.state = "plugged nowhere: the migration is paused in postcopy"
                self.notes.append(f"{dev.id} is plugged nowhere while the migration is paused in postcopy: "
                                  f"after recovering it, plug it on the destination: device_add {dev.dest_spec}")
            else:
                await self._plug_back(job.source, dev)

    async def _plug_on_dest(self, job: MigrationJob, dev: Device) -> None:
        where = self.dest_name
        if job.dest is None:
            dev.state = "to plug on the destination by hand"
            self.notes.append(f"{dev.id} was unplugged; the destination is not attached to kvmshell: plug it "
                              f"there by hand with `device_add {dev.dest_spec}`")
            return
        try:
            if dev.id in await peripherals(job.dest):
                dev.state = f"already on {where}"
                self.notes.append(f"{where} already has a device {dev.id} (started with it): not plugged again")
                return
            await plug(job.dest, dev.dest_spec)
        except Disconnected as e:
            dev.state = f"not plugged on {where}: its monitor is gone"
            self.notes.append(f"{dev.id} not plugged on {where}: its monitor is gone ({e.message}); once it is "
                              f"back: `@{where} device_add {dev.dest_spec}`")
            return
        except KvmError as e:
            dev.state = f"not plugged on {where}: {e.message}"
            self.notes.append(f"{dev.id} could not be plugged on {where} ({e.message}): does that host have "
                              f"the device? Plug it or a replacement by hand: `@{where} device_add {dev.dest_spec}`")
            return
        dev.state = f"plugged on {where}"
        self.notes.append(f"{dev.id} unplugged from {self.source} and plugged on {where} ({dev.dest_spec})")

    async def _plug_back(self, mon: Monitor, dev: Device) -> None:
        try:
            if dev.id in await peripherals(mon):
                dev.state = f"still on {self.source}"
                if dev.pending:
                    self.notes.append(f"{dev.id} stays plugged on {self.source}: the guest did not release it (it "
                                      "may still do so later, then plug it back with "
                                      f"`device_add {dev.spec}`)")
                return
            await plug(mon, dev.spec)
        except KvmError as e:
            dev.state = f"not plugged back on {self.source}: {e.message}"
            self.notes.append(f"{dev.id} could not be plugged back on {self.source} ({e.message}); by hand: "
                              f"`@{self.source} device_add {dev.spec}`")
            return
        dev.state = f"plugged back on {self.source}"
        self.notes.append(f"{dev.id} plugged back on {self.source}")

    def lines(self) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [(f"device {d.id}", d.state) for d in self.devices]
        rows += [("failover", text) for text in self.failover]
        return rows
