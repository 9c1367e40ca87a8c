"""The destination's images for a libvirt migration without shared storage (``--copy-storage``).

libvirt copies the disks over NBD into images that must exist on the destination: libvirt 9.0
creates a missing one only when a storage pool of the destination has the image's directory as its
target, and fails otherwise ("no storage pool with matching target path"); it does not remove what
it created when the migration fails. So kvmshell creates them itself through the destination's
storage API (the pool that has the directory, else a transient ``dir`` pool over it, gone right
after; the images stay): same path, format and virtual size, and for ``inc`` the same backing file,
which must be there already. What it created, it removes if the migration fails.

``source_disks`` reads the source's disks through its ``LibvirtMonitor``; ``create_destination_images``
and ``remove_destination_images`` open their own connection to the destination's daemon (blocking:
call them in a thread). The binding comes from ``libvirt.binding``.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from kvmshell.core.monitor.libvirt import LibvirtMonitor
from kvmshell.core.monitor.libvirtconn import binding, open_connection
from kvmshell.errors import ConnectFailed, Refused


@dataclass(frozen=True)
class CopiedDisk:
    """A disk libvirt copies: ``target`` (sda...), its image's path, format and virtual size, and its
    backing file (what ``inc`` needs on the destination)."""

    target: str
    path: str
    format: str
    capacity: int
    backing: str | None = None
    backing_format: str | None = None

    def describe(self) -> str:
        back = f" over {self.backing}" if self.backing else ""
        return f"{self.path} ({self.format}, {self.capacity / 2**20:.0f} MiB{back})"


def copied_disks(xml: str) -> tuple[list[CopiedDisk], list[str]]:
    """The disks of a running domain's XML libvirt copies with NON_SHARED_* (writable, not shareable,
    with an image), capacity 0 until read, and what stands in the way (not a file image)."""
    disks, problems = [], []
    for disk in ElementTree.fromstring(xml).iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        if disk.find("readonly") is not None or disk.find("shareable") is not None or source is None:
            continue
        if disk.get("type") != "file" or not source.get("file"):
            problems.append(f"disk {dev} is a {disk.get('type')} disk: kvmshell creates file images only")
            continue
        driver = disk.find("driver")
        back, back_format = disk.find("backingStore/source"), disk.find("backingStore/format")
        disks.append(CopiedDisk(dev, source.get("file", ""), (driver.get("type") if driver is not None else None)
                                or "raw", 0, back.get("file") if back is not None else None,
                                back_format.get("type") if back_format is not None else None))
    return disks, problems


async def source_disks(mon: LibvirtMonitor) -> tuple[list[CopiedDisk], list[str]]:
    """The disks libvirt copies with ``--copy-storage``, with their virtual sizes, and what stands in
    the way of creating their images on the destination."""
    disks, problems = copied_disks(await mon.domain_xml())
    return [replace(d, capacity=await mon.disk_capacity(d.target)) for d in disks], problems


def create_destination_images(uri: str, disks: list[CopiedDisk], inc: bool) -> tuple[list[str], list[str]]:
    """The images ``--copy-storage`` copies into, created on the daemon at ``uri`` (blocking): (created,
    there already). Refused saying why, with nothing left, when one cannot be."""
    libvirt, _ = binding()
    conn = open_connection(uri)
    try:
        return create_images(libvirt, conn, disks, inc)
    except DiskRefused as e:
        raise Refused(f"--copy-storage: {e}; nothing was changed") from None
    finally:
        conn.close()


def remove_destination_images(uri: str, paths: list[str]) -> list[str]:
    """Delete images kvmshell created on the daemon at ``uri`` (blocking); those it could not, and why."""
    if not paths:
        return []
    libvirt, _ = binding()
    try:
        conn = open_connection(uri)
    except ConnectFailed as e:
        return [f"{p} ({e.message})" for p in paths]
    try:
        return remove_images(libvirt, conn, paths)
    finally:
        conn.close()


class DiskRefused(Exception):
    """The destination cannot take an image (the message says why and what to do); nothing is left."""


@contextmanager
def _pool(libvirt: ModuleType, conn: Any, directory: str) -> Iterator[Any]:
    """The active storage pool over ``directory`` on ``conn``: the one libvirt has, else a transient
    ``dir`` pool that goes when done (the images in it stay)."""
    try:
        pool = conn.storagePoolLookupByTargetPath(directory)
        if pool.isActive():
            pool.refresh(0)
            yield pool
            return
        raise DiskRefused(f"the storage pool {pool.name()} over {directory} is not active: `virsh pool-start "
                          f"{pool.name()}` there")
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise DiskRefused(f"{directory}: libvirt: {e.get_error_message()}") from None
    xml = (f"<pool type='dir'><name>kvmshell-{uuid.uuid4().hex[:12]}</name><target><path>{escape(directory)}"
           "</path></target></pool>")
    try:
        pool = conn.storagePoolCreateXML(xml, 0)
    except libvirt.libvirtError as e:
        raise DiskRefused(f"no directory {directory} to put the image in (libvirt: {e.get_error_message()}): "
                          "create it there") from None
    try:
        yield pool
    finally:
        try:
            pool.destroy()
        except libvirt.libvirtError:
            pass


def _volume_xml(disk: CopiedDisk, inc: bool) -> str:
    backing = ""
    if inc and disk.backing:
        fmt = f"<format type='{escape(disk.backing_format)}'/>" if disk.backing_format else ""
        backing = f"<backingStore><path>{escape(disk.backing)}</path>{fmt}</backingStore>"
    return (f"<volume><name>{escape(posixpath.basename(disk.path))}</name><capacity unit='bytes'>{disk.capacity}"
            f"</capacity><allocation>0</allocation><target><format type='{escape(disk.format)}'/></target>"
            f"{backing}</volume>")


def create_images(libvirt: ModuleType, conn: Any, disks: list[CopiedDisk], inc: bool) -> tuple[list[str], list[str]]:
    """Create on ``conn``'s host the images libvirt copies into: (created, there already with that
    format and size: libvirt copies onto them). DiskRefused, with what was created removed again, when
    an image cannot be made or one of another size or format is in the way."""
    created: list[str] = []
    existing: list[str] = []
    try:
        for disk in disks:
            directory, name = posixpath.split(disk.path)
            with _pool(libvirt, conn, directory) as pool:
                try:
                    vol = pool.storageVolLookupByName(name)
                except libvirt.libvirtError:
                    vol = None
                if vol is not None:
                    fmt = ElementTree.fromstring(vol.XMLDesc(0)).find("target/format")
                    there = fmt.get("type") if fmt is not None else "?"
                    capacity = vol.info()[1]
                    if there != disk.format or capacity != disk.capacity:
                        raise DiskRefused(f"{disk.path} is there already ({there}, {capacity} bytes; the source's "
                                          f"is {disk.format}, {disk.capacity} bytes): libvirt would copy onto it; "
                                          "move it away there first")
                    existing.append(disk.path)
                    continue
                try:
                    pool.createXML(_volume_xml(disk, inc), 0)
                except libvirt.libvirtError as e:
                    raise DiskRefused(f"cannot create {disk.describe()}: libvirt: {e.get_error_message()}") from None
                created.append(disk.path)
    except BaseException:
        remove_images(libvirt, conn, created)
        raise
    return created, existing


def remove_images(libvirt: ModuleType, conn: Any, paths: list[str]) -> list[str]:
    """Delete the images at ``paths`` on ``conn``'s host; what could not be deleted, with libvirt's reason."""
    failed = []
    for path in paths:
        directory, name = posixpath.split(path)
        try:
            with _pool(libvirt, conn, directory) as pool:
                pool.storageVolLookupByName(name).delete(0)
        except (DiskRefused, libvirt.libvirtError) as e:
            why = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
            failed.append(f"{path} ({why})")
    return failed
