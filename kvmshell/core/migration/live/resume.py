"""What the stages of a migration leave to finish, recorded in its state file (``running``) so that
the kvmshell that adopts it (``adopt``) can finish them: the records, and the TLS undo.

``StorageRecord``  the destination's NBD server and exports, the mirror jobs and NBD client nodes
                   on the source, and that ``pause-before-switchover`` is on (its value before is in
                   the file's settings): ``StorageStage.resumed`` rebuilds the stage from it.
``UnplugRecord``   the devices unplugged from the source and their device_add text (and --replug):
                   ``PassthroughStage.resumed`` rebuilds the stage.
``TlsUndo``        the stage an adopted job gets for the TLS the dead kvmshell set up (``tls.TlsSide``
                   by side): at the end the parameters go back as they were and the objects go.

Each record is a small frozen dataclass, written with ``to_dict`` and read back with ``from_dict``
(which raises KeyError/TypeError/ValueError for a file it cannot read: ``running.load`` logs it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from kvmshell.core.migration.live.stages import BaseStage
from kvmshell.core.migration.tls import TlsSide, undo as tls_undo
from kvmshell.core.values.models import NbdServer
from kvmshell.errors import KvmError

if TYPE_CHECKING:
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.migration.live.request import MigrationOutcome


@dataclass(frozen=True)
class DiskCopy:
    """One disk being mirrored: its drive id, the nodes on each side, its size and its index (the
    export, client node and job id are named after it)."""

    key: str
    source_node: str
    dest_node: str
    size: int
    index: int


@dataclass(frozen=True)
class StorageRecord:
    mode: str                         # all | inc
    dest: str                         # the destination's name in the kvmshell that started it
    server: NbdServer                 # where the destination's NBD server listens
    disks: tuple[DiskCopy, ...]
    jobs: tuple[str, ...]             # mirror job ids on the source
    clients: tuple[str, ...]          # NBD client nodes on the source (blockdev-mirror)
    blockdev: bool = True             # blockdev-mirror (else drive-mirror)
    sock_dir: str | None = None       # the private directory of the unix socket, removed at the end
    pause_before_switchover: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StorageRecord:
        known = {f.name for f in fields(NbdServer)}
        return cls(mode=str(d["mode"]), dest=str(d["dest"]),
                   server=NbdServer(**{k: v for k, v in dict(d["server"]).items() if k in known}),
                   disks=tuple(DiskCopy(str(x["key"]), str(x["source_node"]), str(x["dest_node"]), int(x["size"]),
                                        int(x["index"])) for x in d["disks"]),
                   jobs=tuple(str(j) for j in d["jobs"]), clients=tuple(str(c) for c in d.get("clients") or ()),
                   blockdev=bool(d.get("blockdev", True)), sock_dir=d.get("sock_dir"),
                   pause_before_switchover=bool(d.get("pause_before_switchover", True)))


@dataclass(frozen=True)
class UnpluggedDevice:
    id: str
    spec: str                         # device_add text that plugs it back on the source
    replug: str | None = None         # --replug SPEC for the destination
    pending: bool = False             # device_del sent, the guest had not released it yet


@dataclass(frozen=True)
class UnplugRecord:
    dest: str | None
    devices: tuple[UnpluggedDevice, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnplugRecord:
        return cls(dest=d.get("dest"), devices=tuple(
            UnpluggedDevice(str(x["id"]), str(x["spec"]), x.get("replug"), bool(x.get("pending")))
            for x in d["devices"]))


def tls_from_dict(d: dict[str, Any]) -> dict[str, TlsSide]:
    return {str(role): TlsSide.from_dict(side) for role, side in d.items()}


class TlsUndo(BaseStage):
    """The TLS of an adopted migration, undone on both sides once it has ended (kept while it is paused
    in postcopy, or when this kvmshell closes first: the recovery and the next adopter need it)."""

    name = "tls"

    def __init__(self, sides: dict[str, TlsSide]) -> None:
        super().__init__()
        self.sides = sides

    async def finish(self, job: MigrationJob, outcome: MigrationOutcome) -> None:
        if job.outcome is None or outcome.status == "postcopy-paused":
            return
        for role, mon in (("source", job.source), ("dest", job.dest)):
            side = self.sides.get(role)
            if side is None:
                continue
            if mon is None:
                self.notes.append(f"TLS on the destination left as it was set (not attached here): remove "
                                  f"{', '.join(side.objects)} there with object_del")
                continue
            try:
                done = await tls_undo(mon, side)
            except KvmError as e:
                self.notes.append(f"TLS on {mon.name} not undone ({e.message}): remove {', '.join(side.objects)} "
                                  "with object_del")
                continue
            if done:
                self.notes.append(f"TLS on {mon.name}: {'; '.join(done)}")


__all__ = ["DiskCopy", "StorageRecord", "TlsUndo", "UnplugRecord", "UnpluggedDevice", "tls_from_dict"]
