"""Static migration of a libvirt guest: libvirt's save image, copied with the disks to another host,
restored there by that host's libvirt.

Why ``virDomainSaveFlags`` to a file of kvmshell's choosing and not a managed save: a managed save
image lives in libvirt's own directory (/var/lib/libvirt/qemu/save), tied to the domain's definition
on that host, and libvirt starts from it only on its own host; a plain save image is a file kvmshell
can copy like the disks, whose embedded XML it can read (``virDomainSaveImageGetXMLDesc``) and hand
back with the paths changed (``virDomainRestoreFlags`` with ``dxml``), and which restores the
source by itself if anything fails.

The steps (``LibvirtStatic``: ``preflight`` returns a ``LibvirtSavePlan``, ``run`` carries it out):

1. preflight - nothing is touched: the guest is a running (or paused) libvirt domain; the
   destination host is configured, its libvirt answers, is another host (host UUID) and has no
   domain of that name; the domain's disks are files, with their backing chains (``qemu-img info
   -U``), and so are its boot files (``<loader>``, ``<nvram>``, ``<kernel>``, ``<initrd>``, ``<dtb>``,
   copied and rewritten like the disks); no file is there already on the destination (kvmshell never overwrites one); room for
   the files and the saved RAM. The XML that will be defined there is the domain's definition with
   every disk and boot file path rewritten to ``--dir``.
2. save the domain to ``DIR-OF-ITS-FIRST-DISK/DOMAIN.kvmshell.save`` (libvirt stops it: a
   persistent domain stays defined, shut off).
3. copy the disks (backing files first), the boot files and the save image over SSH (``static_copy``: checksums on
   both ends, overlays rebased onto the copied backing files).
4. define the domain on the destination (a persistent source), restore it there from the copied
   image with the image's XML rewritten the same way, check that it runs (or is paused, as it was
   or with ``--paused``); remove both save images.
5. the source stays defined and shut off (what an admin expects: it can be started again from its
   own disks), or is undefined with ``--undefine-source`` after confirmation.

A failure before the end undoes, in reverse: the destination's domain destroyed and undefined, the
files this run copied removed, the source restored from its save image (running again, or paused
as it was) and the image removed; the error says what was done, undone and kept (``ledger.Ledger``).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from io import StringIO
from urllib.parse import urlsplit
from xml.etree import ElementTree

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.migration.history import MigrationHistory, record_static
from kvmshell.core.migration.images import backing_chain
from kvmshell.core.migration.ledger import Ledger
from kvmshell.core.migration.static import DEFAULT_DIR, StaticFailed
from kvmshell.core.migration.static_copy import FileCopy, ImageFile, name_copies, still_to_copy
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.monitor.libvirtconn import LibvirtDaemon, default_uri, describe_domain, host_uuid, state_name
from kvmshell.core.values.address import Address, Kind, SshTarget, check_guest_name
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import ConfigError, KvmError, Refused

Progress = Callable[[str], None]
Confirm = Callable[[str], Awaitable[None]]     # raises Refused when not confirmed
SAVE_SUFFIX = ".kvmshell.save"


@dataclass(frozen=True)
class LibvirtSaveRequest:
    guest: str                    # the fleet's name of the source (a libvirt guest)
    to: str                       # [hosts.NAME] of the destination
    dest_dir: str | None = None   # default: DEFAULT_DIR/DOMAIN
    new_name: str | None = None   # the destination's name in kvmshell (default GUEST.HOST)
    paused: bool = False          # restore it paused
    undefine_source: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class LibvirtSavePlan:
    req: LibvirtSaveRequest
    domain: str
    source_uri: str
    dest_uri: str
    persistent: bool
    running: bool
    dest_dir: str
    files: tuple[ImageFile, ...]  # the disks' files, backing files first
    save_source: str              # the save image on the source host
    save_dest: str                # and its copy on the destination
    xml: str                      # what is defined on the destination (transient: what it restores with)
    new_name: str
    preflight_s: float = 0.0


@dataclass
class LibvirtSaveResult:
    guest: str
    domain: str
    new_name: str | None
    host: str
    dest_dir: str
    files: list[ImageFile]
    xml: str
    times: dict[str, float] = field(default_factory=dict)
    copied_bytes: int = 0
    source_state: str = ""
    dest_state: str = ""
    notes: list[str] = field(default_factory=list)


# == the domain XML ==================================================================================

def _parse(xml: str) -> ElementTree.Element:
    for _event, (prefix, uri) in ElementTree.iterparse(StringIO(xml), events=("start-ns",)):
        ElementTree.register_namespace(prefix, uri)       # <metadata> keeps its prefixes when written back
    return ElementTree.fromstring(xml)


def disk_files(xml: str, guest: str) -> list[str]:
    """The files of the domain's disks (empty drives left out); Refused for a disk that is not a file."""
    paths = []
    for disk in _parse(xml).findall("devices/disk"):
        source = disk.find("source")
        if source is None or not source.attrib:
            continue                                    # an empty CD-ROM drive
        kind = disk.get("type", "file")
        path = source.get("file")
        if kind != "file" or not path:
            what = source.get("dev") or source.get("name") or source.get("volume") or kind
            raise Refused(f"{what}: a {kind} disk; static-migrate copies disk image files only", guest=guest)
        paths.append(path)
    return paths


BOOT_FILES = ("os/loader", "os/nvram", "os/kernel", "os/initrd", "os/dtb")
"""The files a domain boots from besides its disks: firmware, its variables, a kernel, its initrd and
device tree (``<nvram>``'s ``template`` is the destination's own firmware: not copied)."""


def _boot_elements(root: ElementTree.Element) -> list[tuple[ElementTree.Element, str | None]]:
    """(element, path) of each boot file: the element's text, or its ``<source file=...>`` (libvirt's
    newer form of ``<nvram>``)."""
    found = []
    for tag in BOOT_FILES:
        for e in root.findall(tag):
            source = e.find("source")
            found.append((e, source.get("file") if source is not None else (e.text or "").strip() or None))
    return found


def boot_files(xml: str) -> list[str]:
    """The paths of the domain's boot files (``BOOT_FILES``), in that order."""
    return [path for _, path in _boot_elements(_parse(xml)) if path]


def rewrite_paths(xml: str, dest_of: dict[str, str]) -> str:
    """``xml`` with every disk file (backing stores too) and boot file in ``dest_of`` replaced by its
    destination path."""
    root = _parse(xml)
    for disk in root.findall("devices/disk"):
        for source in disk.iter("source"):
            path = source.get("file")
            if path in dest_of:
                source.set("file", dest_of[path])
    for e, path in _boot_elements(root):
        if path in dest_of:
            source = e.find("source")
            if source is not None:
                source.set("file", dest_of[path])
            else:
                e.text = dest_of[path]
    return ElementTree.tostring(root, encoding="unicode")


def source_host(address: Address) -> SshTarget | None:
    """Where the domain's files are: the guest's SSH host, the host of a ``qemu+ssh`` URI, else here."""
    if address.ssh is not None:
        return address.ssh
    u = urlsplit(address.uri or default_uri())
    if u.scheme.endswith("+ssh") and u.hostname:
        return SshTarget(u.hostname, u.username, u.port)
    return None


# == the engine ======================================================================================

class LibvirtStatic:
    """See the module docstring: ``preflight()`` (nothing touched) returns the plan, ``run(plan)`` the
    result or StaticFailed after undoing; ``aclose()`` at the end, whatever happened."""

    def __init__(self, fleet: Fleet, pool: HostPool, req: LibvirtSaveRequest, *, progress: Progress | None = None,
                 confirm: Confirm | None = None, history: MigrationHistory | None = None) -> None:
        self.fleet, self.pool, self.req = fleet, pool, req
        self.progress = progress or (lambda message: None)
        self.confirm = confirm
        self.history = history if history is not None else MigrationHistory.default()
        self.ledger = Ledger()
        self.src: HostShell | None = None
        self.dst: HostShell | None = None
        self.lv_src: LibvirtDaemon | None = None
        self.lv_dst: LibvirtDaemon | None = None
        self.copy: FileCopy | None = None
        self.copied: int | None = None
        self.saved = self.defined = self.restored = False

    async def _lv(self, fn: Callable[..., object], *args: object) -> object:
        return await asyncio.to_thread(fn, *args)

    # -- 1. preflight ------------------------------------------------------------------------
    async def preflight(self) -> LibvirtSavePlan:
        t0 = time.monotonic()
        req, pool = self.req, self.pool
        address = self.fleet.get(req.guest).address
        if address.kind is not Kind.DOMAIN:
            raise Refused("not a libvirt guest", guest=req.guest)
        if req.to not in pool.hosts:
            known = ", ".join(pool.hosts) or "none configured"
            raise ConfigError(f"--to {req.to}: not a configured host (hosts: {known}); add a [hosts.{req.to}] table")
        domain, dest_uri = str(address.path), pool.lookup(req.to).libvirt_uri()
        new_name = check_guest_name(req.new_name or f"{req.guest}.{req.to}", "name of the copy")
        if new_name in self.fleet:
            raise Refused(f"a guest named {new_name!r} is already attached", guest=req.guest)
        self.progress(f"preflight: connecting to libvirt on {req.to} ({dest_uri})")
        self.lv_src = await asyncio.to_thread(LibvirtDaemon, address.uri)
        self.lv_dst = await asyncio.to_thread(LibvirtDaemon, dest_uri)
        facts = await asyncio.to_thread(self.lv_src.facts, domain)
        if not facts["active"]:
            raise Refused(f"{domain} is {state_name(int(facts['state']))} (libvirt): there is no running state to "
                          "save; copy its disks and define it there instead", guest=req.guest)
        if req.undefine_source and not facts["persistent"]:
            raise Refused(f"--undefine-source: {domain} is a transient domain (libvirt has no definition of it to "
                          "undefine): drop --undefine-source; nothing was changed", guest=req.guest)
        if facts["host_uuid"] == await asyncio.to_thread(host_uuid, self.lv_dst.conn):
            raise Refused(f"{req.to} ({dest_uri}) is the host {domain} runs on (libvirt host UUID "
                          f"{facts['host_uuid']}): static-migrate moves a guest to another host", guest=req.guest)
        if await asyncio.to_thread(self.lv_dst.has_domain, domain):
            raise Refused(f"{req.to} ({dest_uri}) has a domain {domain} already: undefine it there first; nothing "
                          "was changed", guest=req.guest)
        self.src = HostShell(pool, source_host(address), error=StaticFailed)
        self.dst = HostShell(pool, req.to, error=StaticFailed)
        await pool.connection(req.to)                     # reachable, or the SSH error says why
        dest_dir = (req.dest_dir or f"{DEFAULT_DIR}/{domain}").rstrip("/") or "/"
        files = await self._files(disk_files(str(facts["xml"]), req.guest), boot_files(str(facts["xml"])), dest_dir)
        save_source = f"{os.path.dirname(next(f.source for f in files if f.top))}/{domain}{SAVE_SUFFIX}"
        save_dest = f"{dest_dir}/{domain}.save"
        if save_source in await self.src.sizes([save_source]):
            raise Refused(f"{save_source} is there already on {self.src.label}: kvmshell never overwrites a file; "
                          "remove it (`virsh restore` it, if it is a domain's save image) and try again",
                          guest=req.guest)
        await self._check_destination(files, save_dest, dest_dir, int(facts["memory"]))
        dest_of = {f.source: f.dest for f in files}
        xml = rewrite_paths(str(facts["inactive_xml" if facts["persistent"] else "xml"]), dest_of)
        return LibvirtSavePlan(req, domain, self.lv_src.uri, dest_uri, bool(facts["persistent"]), bool(facts["running"]),
                               dest_dir, tuple(files), save_source, save_dest, xml, new_name, time.monotonic() - t0)

    async def _files(self, disks: list[str], boot: list[str], dest_dir: str) -> list[ImageFile]:
        """Every file of the disks' backing chains, then the boot files, each with its place in
        ``dest_dir``; backing files first."""
        assert self.src is not None
        if not disks:
            raise Refused(f"{self.req.guest} has no disk image file to copy", guest=self.req.guest)
        files: dict[str, ImageFile] = {}
        for top in disks:
            for i, info in enumerate(await backing_chain(self.src, top)):
                if not info.path.startswith("/") or info.path.startswith("/dev/"):
                    raise Refused(f"{info.path or top}: only image files can be copied (not devices or network "
                                  "disks)", guest=self.req.guest)
                if info.path in files:
                    files[info.path].top = files[info.path].top or i == 0
                else:
                    files[info.path] = ImageFile(info.path, "", info.format, top=(i == 0), backing=info.backing,
                                                 backing_format=info.backing_format)
        for path in boot:
            files.setdefault(path, ImageFile(path, "", "raw"))     # copied as bytes: no chain, no rebase
        onto_itself = name_copies(files.values(), dest_dir)
        if onto_itself:
            raise Refused(f"{onto_itself} would be copied onto itself: pick another --dir", guest=self.req.guest)
        sizes = await self.src.sizes(list(files))
        for f in files.values():
            if f.source not in sizes:
                raise Refused(f"{f.source}: not a regular file on {self.src.label}", guest=self.req.guest)
            f.size = sizes[f.source]
        return sorted(files.values(), key=lambda f: f.top)

    async def _check_destination(self, files: list[ImageFile], save_dest: str, dest_dir: str, ram: int) -> None:
        """No file of the copy there already (never overwritten), and room for them with the saved RAM
        (``df`` of the nearest directory that exists: nothing is created before the run)."""
        assert self.dst is not None
        dst, guest = self.dst, self.req.guest
        there = await dst.sizes([*(f.dest for f in files), save_dest])
        if there:
            raise Refused(f"{', '.join(sorted(there))} on {dst.label}: there already, and kvmshell never overwrites "
                          "a file: remove it or pick another --dir", guest=guest)
        out = await dst.check(f"d={shlex.quote(dest_dir)}; while [ ! -d \"$d\" ]; do d=$(dirname -- \"$d\"); done; "
                              "df -B1 --output=avail -- \"$d\"", f"df {dest_dir}")
        nums = [int(w) for w in out.split() if w.isdigit()]
        if not nums:
            raise StaticFailed(f"df {dest_dir} on {dst.label}: unreadable answer {out.strip()!r}", guest=guest)
        need = still_to_copy(files, {})
        if nums[-1] < need + ram:
            raise Refused(f"not enough space in {dest_dir} on {dst.label}: {human_bytes(nums[-1])} free, the disks "
                          f"need {human_bytes(need)} and the save image up to {human_bytes(ram)}", guest=guest)

    # -- 2.-5. the run -----------------------------------------------------------------------
    async def run(self, plan: LibvirtSavePlan) -> LibvirtSaveResult:
        started, t0 = time.time(), time.monotonic()
        times = {"preflight": plan.preflight_s}
        outcome = "cancelled"
        try:
            result = await self._run(plan, times)
            outcome = "completed"
        except StaticFailed:
            outcome = "failed"
            raise
        finally:
            steps, t = [], 0.0
            for name, took in times.items():
                t += took
                steps.append((t, name, f"{name} took {took:.2f} s"))
            source = self.src.host if self.src is not None and self.src.host is not None else "local"
            record_static(self.history, guest=self.req.guest, source=str(source), dest=self.req.to, outcome=outcome,
                          started=started, total_s=time.monotonic() - t0, sent_bytes=self.copied, steps=steps)
        return result

    async def _run(self, plan: LibvirtSavePlan, times: dict[str, float]) -> LibvirtSaveResult:
        assert self.lv_src is not None and self.lv_dst is not None and self.src is not None and self.dst is not None
        req, ledger, domain = plan.req, self.ledger, plan.domain
        files = [replace(f) for f in plan.files]
        ledger.step = "save"
        async with ledger.undone_on_failure(lambda: self._undo(plan), self.progress, StaticFailed, req.guest):
            t = time.monotonic()
            self.progress(f"saving {domain} to {plan.save_source} (libvirt stops it)")
            await self._lv(self.lv_src.save, domain, plan.save_source)
            self.saved = True
            ledger.done.append(f"saved {domain} to {plan.save_source} (libvirt stopped it)")
            image_xml = str(await self._lv(self.lv_src.image_xml, plan.save_source))
            times["save"] = time.monotonic() - t
            ledger.step, t = "copy", time.monotonic()
            await self.dst.check(f"mkdir -p -- {shlex.quote(plan.dest_dir)}", f"creating {plan.dest_dir}")
            image = ImageFile(plan.save_source, plan.save_dest, "raw")
            self.copy = FileCopy(self.src, self.dst, [*files, image], plan.dest_dir, self.progress, error=StaticFailed)
            self.copied = await self.copy.run()
            ledger.done.append(f"copied {len(files) + 1} file(s) to {plan.dest_dir} on {self.dst.label}")
            times["copy"] = time.monotonic() - t
            ledger.step, t = "restore", time.monotonic()
            if plan.persistent:
                await self._lv(self.lv_dst.define, plan.xml)
                self.defined = True
                ledger.done.append(f"defined {domain} on {req.to}")
            self.progress(f"restoring {domain} on {req.to} from {plan.save_dest}")
            dxml = rewrite_paths(image_xml, {f.source: f.dest for f in files})
            await self._lv(self.lv_dst.restore, plan.save_dest, dxml, req.paused)
            self.restored = True
            ledger.done.append(f"restored {domain} on {req.to}")
            facts = await asyncio.to_thread(self.lv_dst.facts, domain)
            if not facts["active"] or (facts["running"] != (plan.running and not req.paused)):
                raise StaticFailed(f"{domain} on {req.to} is {describe_domain(plan.dest_uri, domain)} after the "
                                   "restore, not as it was saved")
            times["restore"] = time.monotonic() - t
        return await self._finish(plan, files, times)

    async def _finish(self, plan: LibvirtSavePlan, files: list[ImageFile], times: dict[str, float]) -> LibvirtSaveResult:
        assert self.lv_src is not None and self.src is not None and self.dst is not None
        req, domain = plan.req, plan.domain
        result = LibvirtSaveResult(req.guest, domain, None, req.to, plan.dest_dir, files, plan.xml, times,
                                   self.copied or 0)
        for shell, path in ((self.dst, plan.save_dest), (self.src, plan.save_source)):
            try:
                await shell.check(f"rm -f -- {shlex.quote(path)}", f"removing {path}")
            except KvmError as e:
                result.notes.append(f"the save image {path} stays on {shell.label}: {e.message}")
        if not plan.persistent:
            result.source_state = "gone (a transient domain: libvirt keeps no definition of it)"
        elif req.undefine_source:
            try:
                if self.confirm is not None:
                    await self.confirm(f"{domain} runs on {req.to}; undefine it on the source?")
                await self._lv(self.lv_src.remove, domain)
                result.source_state = "undefined (--undefine-source; its disks stay)"
            except Refused:
                result.source_state = "defined, shut off (undefining it was not confirmed)"
            except KvmError as e:
                result.source_state = f"defined, shut off (undefining it failed: {e.message})"
        else:
            result.source_state = "defined, shut off (its disks stay; --undefine-source removes the definition)"
        source, dest = await asyncio.gather(asyncio.to_thread(describe_domain, plan.source_uri, domain),
                                            asyncio.to_thread(describe_domain, plan.dest_uri, domain))
        result.source_state += f"; libvirt: {source}"
        result.dest_state = dest
        try:
            self.fleet.add(plan.new_name, Address.libvirt(domain, plan.dest_uri))
            result.new_name = plan.new_name
        except KvmError as e:
            result.notes.append(f"not attached: {e.message}")
        return result

    async def _undo(self, plan: LibvirtSavePlan) -> None:
        """Put the source back as it was; leave nothing of this run on the destination."""
        assert self.lv_src is not None and self.lv_dst is not None and self.src is not None and self.dst is not None
        ledger, domain = self.ledger, plan.domain
        if self.restored or self.defined:
            try:
                await self._lv(self.lv_dst.remove, domain)
                ledger.undone.append(f"removed {domain} from libvirt on {self.req.to}")
            except KvmError as e:
                ledger.kept.append(f"{domain} on {self.req.to} ({e.message}): `virsh destroy/undefine` it there")
        if self.copy is not None and self.copy.copied_any:
            paths = [p for f in (*plan.files, ImageFile(plan.save_source, plan.save_dest, "raw"))
                     for p in (f.dest, f.dest + ".part")]
            try:
                await self.dst.check("rm -f -- " + " ".join(shlex.quote(p) for p in paths), "removing the copies")
                ledger.undone.append(f"removed the files copied to {plan.dest_dir} on {self.dst.label}")
            except KvmError as e:
                ledger.kept.append(f"the files copied to {plan.dest_dir} on {self.dst.label} ({e.message})")
        if self.saved:
            try:
                await self._lv(self.lv_src.restore, plan.save_source)
            except KvmError as e:
                ledger.kept.append(f"the save image {plan.save_source} ({e.message}): `virsh restore` it")
                return
            state = "running again" if plan.running else "paused, as before"
            try:
                await self.src.check(f"rm -f -- {shlex.quote(plan.save_source)}", "removing the save image")
                ledger.undone.append(f"restored {domain} from its save image ({state}) and removed the image")
            except KvmError as e:
                ledger.undone.append(f"restored {domain} from its save image ({state})")
                ledger.kept.append(f"the save image {plan.save_source} ({e.message})")

    async def aclose(self) -> None:
        await asyncio.gather(*(s.aclose() for s in (self.src, self.dst) if s is not None), return_exceptions=True)
        for lv in (self.lv_src, self.lv_dst):
            if lv is not None:
                await asyncio.to_thread(lv.close)


async def migrate_libvirt_static(fleet: Fleet, pool: HostPool, req: LibvirtSaveRequest, *,
                                 progress: Progress | None = None, confirm: Confirm | None = None
                                 ) -> tuple[LibvirtSavePlan, LibvirtSaveResult | None]:
    """Preflight, then (unless ``req.dry_run``) run; the plan and the result (None for a dry run)."""
    engine = LibvirtStatic(fleet, pool, req, progress=progress, confirm=confirm)
    try:
        plan = await engine.preflight()
        return plan, None if req.dry_run else await engine.run(plan)
    finally:
        await engine.aclose()


__all__ = ["LibvirtSavePlan", "LibvirtSaveRequest", "LibvirtSaveResult", "LibvirtStatic",
           "boot_files", "disk_files", "migrate_libvirt_static", "rewrite_paths", "source_host"]
