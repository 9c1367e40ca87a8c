"""The parts of the Linux lab guest: a Debian kernel, busybox, and an initramfs built here.

Everything comes from Debian packages through ``apt-get download`` (no other download) and is cached
under ``$XDG_CACHE_HOME/kvmshell/lab`` (``~/.cache/kvmshell/lab``; ``KVMSHELL_LAB_CACHE`` overrides):

- ``kernel/vmlinuz``: from the versioned ``linux-image-*`` package that ``linux-image-amd64`` depends on,
  and ``kernel/vmlinux``, the ELF kernel unpacked from it (booted through PVH: no decompression in the guest);
- ``busybox/busybox``: from ``busybox-static``;
- ``work-<hash>``: ``workload.c`` beside this file, linked static with gcc (hash of source and compiler);
- ``initramfs-<hash>.cpio``: a cpio "newc" archive written here: busybox and its applet links, ``/init``,
  the workload as ``/bin/kvmshell-work`` and ``/dev/console``.

Once cached, nothing is fetched again (delete the directory to take a newer kernel). What cannot be
had (no network, no apt, no gcc) raises :class:`PartsMissing`, which says what is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvmshell.errors import LabError

KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
WORKLOAD_SOURCE = Path(__file__).with_name("workload.c")
APPLETS = ("sh", "mount", "echo", "cat", "cut", "poweroff", "sleep")

INIT_SCRIPT = b"""#!/bin/sh
# kvmshell lab guest: mount the pseudo file systems, run the workload on the console, power off after it
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "kvmshell-linux up $(cut -d' ' -f1 /proc/uptime)"
/bin/kvmshell-work </dev/console >/dev/console 2>&1
echo "kvmshell-work exited $?"
poweroff -f
"""


class PartsMissing(LabError):
    """A part of the Linux guest cannot be fetched or built here (the message says which and why)."""


@dataclass(frozen=True)
class LinuxParts:
    """What QEMU needs to boot the Linux lab guest: ``-kernel`` (an ELF vmlinux, or the bzImage) and ``-initrd``."""
    kernel: Path
    initrd: Path
    kernel_package: str


def cache_dir() -> Path:
    """Where the parts are kept: KVMSHELL_LAB_CACHE, else $XDG_CACHE_HOME/kvmshell/lab."""
    forced = os.environ.get("KVMSHELL_LAB_CACHE")
    if forced:
        return Path(forced)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmshell" / "lab"


def _tmp(path: Path) -> Path:
    """A name beside ``path`` for writing it whole before a rename (two test workers may build at once)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


async def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise PartsMissing(f"{argv[0]} not found (the Linux lab guest needs it)") from None
    out, err = await proc.communicate()
    if proc.returncode:
        raise PartsMissing(f"`{' '.join(argv)}` failed: {err.decode(errors='replace').strip()[-300:]}")
    return out.decode(errors="replace")


async def kernel_package() -> str:
    """The versioned kernel package that ``linux-image-amd64`` depends on (e.g. linux-image-6.1.0-57-amd64)."""
    pattern = re.compile(r"Depends:\s*(linux-image-\S+)")
    try:
        m = pattern.search(await _run("apt-cache", "depends", KERNEL_META))
    except PartsMissing:
        m = None
    if m is None and os.geteuid() == 0:         # a machine whose package lists were never fetched
        await _run("apt-get", "update", "-q")
        m = pattern.search(await _run("apt-cache", "depends", KERNEL_META))
    if m is None:
        raise PartsMissing(f"apt-cache knows no dependency of {KERNEL_META} (run `apt-get update` first)")
    return m.group(1)


async def _download(package: str, into: Path) -> Path:
    """``apt-get download`` a package into ``into``; the .deb's path."""
    into.mkdir(parents=True, exist_ok=True)
    await _run("apt-get", "download", "-q", package, cwd=into)
    debs = list(into.glob("*.deb"))
    if len(debs) != 1:
        raise PartsMissing(f"apt-get download {package} left {len(debs)} packages in {into}")
    return debs[0]


def _extract_member(deb: Path, pattern: str, dest: Path) -> None:
    """Copy the first file of the package whose path matches ``pattern`` to ``dest`` (atomically)."""
    import subprocess
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and re.fullmatch(pattern, member.name.lstrip("./")):
                    src = tar.extractfile(member)
                    assert src is not None
                    tmp = _tmp(dest)
                    tmp.write_bytes(src.read())
                    tmp.chmod(0o755)
                    tmp.replace(dest)
                    break
            else:
                raise PartsMissing(f"{deb.name} holds no file matching {pattern}")
        proc.stdout.read()
    if proc.returncode:
        raise PartsMissing(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode})")


async def _fetched(package: str | None, pattern: str, dest: Path) -> Path:
    """``dest`` from the cache, else downloaded (``package``, or the kernel's) and extracted."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = package or await kernel_package()
    deb = await _download(name, dest.parent / f"deb-{os.getpid()}")
    try:
        await asyncio.to_thread(_extract_member, deb, pattern, dest)
        (dest.parent / "PACKAGE").write_text(f"{deb.name}\n")
    finally:
        shutil.rmtree(deb.parent, ignore_errors=True)
    return dest


def _uncompressed(bzimage: Path, dest: Path) -> Path:
    """The ELF kernel inside a bzImage (xz or gzip payload), written to ``dest``; ``bzimage`` itself
    when there is none. QEMU boots the ELF through its PVH entry, which spares the guest the
    decompression: ~3 s of a ~6 s boot under TCG."""
    if dest.exists():
        return dest
    data = bzimage.read_bytes()
    for magic, open_ in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
                         (b"\x1f\x8b\x08\x00", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))):
        at = data.find(magic)
        if at < 0:
            continue
        try:
            elf = open_().decompress(data[at:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf.startswith(b"\x7fELF"):
            tmp = _tmp(dest)
            tmp.write_bytes(elf)
            tmp.replace(dest)
            return dest
    return bzimage


async def build_workload(cache: Path) -> Path:
    """The static workload binary, compiled once per source and compiler version."""
    source = WORKLOAD_SOURCE.read_bytes()
    version = await _run("gcc", "--version")
    key = hashlib.sha256(source + version.encode()).hexdigest()[:16]
    out = cache / f"work-{key}"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(out)
        await _run("gcc", "-static", "-O2", "-Wall", "-o", str(tmp), str(WORKLOAD_SOURCE))
        tmp.replace(out)
    return out


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as an initramfs (no compression)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        self._parts.append(blob + data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def archive(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def initramfs_bytes(busybox: bytes, workload: bytes) -> bytes:
    """The guest's initramfs: busybox, its applet links, /init, the workload, /dev/console."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("bin/kvmshell-work", workload)
    cpio.file("init", INIT_SCRIPT)
    return cpio.archive()


async def linux_parts(cache: Path | None = None) -> LinuxParts:
    """Fetch (or find cached) and build the Linux guest's kernel and initramfs."""
    cache = cache or cache_dir()
    bzimage = await _fetched(None, r"boot/vmlinuz-.*", cache / "kernel" / "vmlinuz")
    kernel = await asyncio.to_thread(_uncompressed, bzimage, bzimage.with_name("vmlinux"))
    busybox = await _fetched(BUSYBOX_PACKAGE, r"bin/busybox", cache / "busybox" / "busybox")
    work = await build_workload(cache)
    data = initramfs_bytes(busybox.read_bytes(), work.read_bytes())
    initrd = cache / f"initramfs-{hashlib.sha256(data).hexdigest()[:16]}.cpio"
    if not initrd.exists():
        tmp = _tmp(initrd)
        tmp.write_bytes(data)
        tmp.replace(initrd)
    package = (cache / "kernel" / "PACKAGE").read_text().strip() if (cache / "kernel" / "PACKAGE").exists() else ""
    return LinuxParts(kernel=kernel, initrd=initrd, kernel_package=package)
