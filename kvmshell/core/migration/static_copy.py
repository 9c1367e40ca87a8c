"""Static migration, step 3: the files copied from the source host to the destination.

A file is copied as one byte stream: kvmshell relays what a command on the source host reads from
the file (``send_command``) to a pipeline on the destination host (``receive_command``) that appends
it to the .part file and hashes the file's content as it grows; meanwhile CHECKSUM reads the file on
the source. Both hashes are ready when the last byte is written: nothing is read again after the
copy. A ``.part`` left by an interrupted run is continued when its bytes are a prefix of the source;
a file already there with the same checksum is not copied again; copied overlays are pointed at the
copied backing files (``qemu-img rebase -u``, with the rename). Only sh and coreutils are needed on
the hosts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvmshell.core.hosts.shell import CHECKSUM, CHUNK, HASH_RATE_FLOOR, HASH_TIMEOUT, HostShell, Process
from kvmshell.core.values.units import human_bytes
from kvmshell.errors import KvmError

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.5             # seconds between progress messages of a copy (and at least every 5 %)


@dataclass
class ImageFile:
    """One file to copy: a disk image or a file of its backing chain."""

    source: str
    dest: str
    format: str
    size: int = 0
    backing: str | None = None            # the backing file's source path, as the chain resolved it
    backing_format: str | None = None
    top: bool = True                      # named on the command line (not only a backing file)
    outcome: str = ""                     # copied / resumed / already there


def name_copies(files: Iterable[ImageFile], dest_dir: str) -> str | None:
    """Set each file's ``dest`` in ``dest_dir`` under its own base name (``2-NAME`` ... when two share
    one); the source path of a file that would be copied onto itself (nothing else is checked)."""
    used: set[str] = set()
    for f in files:
        base = os.path.basename(f.source)
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{i}-{base}"
        used.add(name)
        f.dest = f"{dest_dir}/{name}"
        if f.dest == f.source:
            return f.source
    return None


def send_command(path: str, offset: int) -> str:
    """Source side: stdout is the file from byte ``offset`` on."""
    return f"tail -c +{offset + 1} -- {shlex.quote(path)}"


def receive_command(part: str, offset: int) -> str:
    """Destination side: stdin is appended to ``part`` (which holds ``offset`` bytes, checked before;
    created or emptied when 0) and CHECKSUM hashes those ``offset`` bytes followed by each byte tee
    writes. stdout: ``written STATUS`` (tee's exit status: 0 when every byte reached the file, and it
    stops at the first write that fails) then the hash."""
    p = shlex.quote(part)
    write = f"head -c {offset} -- {p} && tee --output-error=exit -a -- {p}" if offset else \
        f"tee --output-error=exit -- {p}"
    return f"{{ {{ {write}; echo \"written $?\" >&3; }} | {CHECKSUM}; }} 3>&1"


_HASH_RE = re.compile(rb"^([0-9a-f]{32,}) ", re.M)
_WRITTEN_RE = re.compile(rb"^written (\d+)$", re.M)


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class _Stream:
    """One file on its way: the pipelines on both ends, and the source's checksum of the file."""

    src: Process
    dst: Process
    source_hash: asyncio.Future[str]

    async def close(self) -> None:
        self.src.close()
        self.dst.close()
        self.source_hash.cancel()
        await asyncio.gather(self.source_hash, return_exceptions=True)


def still_to_copy(files: list[ImageFile], there: dict[str, int]) -> int:
    """Bytes still to copy, given the sizes of the files and .part files on the destination."""
    need = 0
    for f in files:
        have = max(there.get(f.dest, 0) if there.get(f.dest) == f.size else 0, there.get(f.dest + ".part", 0))
        need += max(0, f.size - min(have, f.size))
    return need


class FileCopy:
    """Step 3 of a static migration: every file from ``src`` to its ``dest`` on ``dst`` (see the module
    docstring), in order (backing files first). Failures raise ``error``. ``copied_any``: bytes were sent (the files stay; a new run continues)."""

    def __init__(self, src: HostShell, dst: HostShell, files: list[ImageFile], dest_dir: str,
                 progress: Callable[[str], None], *, error: type[KvmError]) -> None:
        self.src = src
        self.dst = dst
        self.files = files
        self.dest_dir = dest_dir
        self.progress = progress
        self.error = error
        self.copied_any = False
        self._total = self._before = 0
        self._finishing: list[str] = []     # the last file's rename (and rebase): run with the next command

    async def run(self) -> int:
        """Copy every file; the bytes sent."""
        paths = [p for f in self.files for p in (f.dest, f.dest + ".part")]
        sizes, there = await asyncio.gather(self.src.sizes([f.source for f in self.files]),   # savevm grew the overlay
                                            self.dst.sizes(paths, free_in=self.dest_dir))
        for f in self.files:
            f.size = sizes.get(f.source, f.size)
        need, avail = still_to_copy(self.files, there), there[self.dest_dir + "/"]
        if avail < need:
            raise self.error(f"not enough space in {self.dest_dir} on {self.dst.label} after savevm: "
                             f"{human_bytes(avail)} free, {human_bytes(need)} to copy")
        self._total, self._before = sum(f.size for f in self.files), 0
        self._finishing = []
        copied = 0
        try:
            for f in self.files:
                copied += await self._copy_one(f, there.get(f.dest), there.get(f.dest + ".part", 0))
                self._before += f.size
        except (KvmError, OSError):
            try:                                # a file checked before the failure keeps its name
                await self._finish_previous()
            except (KvmError, OSError) as e:
                log.debug("after a failed copy: %s", e)
            raise
        await self._finish_previous()
        return copied

    async def _finish_previous(self) -> None:
        """Rename (and rebase) the file copied last, if that is still to do: one command on its own."""
        if self._finishing:
            steps, self._finishing = self._finishing, []
            await self.dst.check(" && ".join(steps), "renaming the copied file" + (" and qemu-img rebase" if
                                                                                   len(steps) > 1 else ""))

    def _rebase(self, f: ImageFile, path: str) -> list[str]:
        """The command that points a copied overlay (at ``path``) at its copied backing file, if needed."""
        if f.backing and f.format == "qcow2":
            new = next((g.dest for g in self.files if g.source == f.backing), None)
            if new and new != f.backing:
                return [f"qemu-img rebase -u -f qcow2 -F {shlex.quote(f.backing_format or 'raw')} "
                        f"-b {shlex.quote(new)} -- {shlex.quote(path)}"]
        return []

    async def _copy_one(self, f: ImageFile, have: int | None, offset: int) -> int:
        """Copy one file to FILE.part (continuing a .part whose bytes are a prefix of the source), compare
        the two hashes made as the bytes flowed, rebase it if it is an overlay, rename it. The bytes sent."""
        name, part = os.path.basename(f.dest), f.dest + ".part"
        if have == f.size or offset:
            await self._finish_previous()               # before looking at the destination's files
        if have == f.size:
            self.progress(f"{name}: already there? comparing checksums")
            a, b = await asyncio.gather(self.src.checksum(f.source, size=f.size),
                                        self.dst.checksum(f.dest, size=f.size))
            if a == b:
                f.outcome = "already there (same checksum)"
                if rebase := self._rebase(f, f.dest):
                    await self.dst.check(rebase[0], f"qemu-img rebase {f.dest}")
                return 0
        if offset > f.size:
            offset = 0
        if offset:
            self.progress(f"{name}: checking the {human_bytes(offset)} copied before")
            a, b = await asyncio.gather(self.src.checksum(f.source, offset), self.dst.checksum(part, size=offset))
            if a != b:
                offset = 0
        f.outcome = f"resumed at {human_bytes(offset)}" if offset else "copied"
        self.copied_any = True
        # the previous file's rename goes first in the receiving command: one round trip less per file
        receive = " && ".join([*self._finishing, receive_command(part, offset)])
        started = await asyncio.gather(self.src.start(send_command(f.source, offset)), self.dst.start(receive),
                                       return_exceptions=True)
        src, dst = started
        if isinstance(src, BaseException) or isinstance(dst, BaseException):
            for p in started:
                if not isinstance(p, BaseException):
                    p.close()
            raise next(p for p in started if isinstance(p, BaseException))
        self._finishing = []
        stream = _Stream(src, dst, asyncio.ensure_future(self.src.checksum(f.source, size=f.size)))  # meanwhile
        try:
            moved = await self._relay(src, dst, f, offset)
            await self._verify(stream, f)
        finally:
            await stream.close()
        self._finishing = [*self._rebase(f, part), f"mv -f -- {shlex.quote(part)} {shlex.quote(f.dest)}"]
        return moved

    async def _relay(self, src: Process, dst: Process, f: ImageFile, offset: int) -> int:
        """Pass the source's stdout to the destination's stdin, with progress; the bytes passed."""
        start, name, t0, last, reported = offset, os.path.basename(f.dest), time.monotonic(), 0.0, offset
        while offset < f.size:
            data = await src.read(min(CHUNK, f.size - offset))
            if not data:
                err = _last_line((await src.finish(10)).stderr)
                raise self.error(f"{f.source} on {self.src.label} ended at {offset} bytes, {f.size} expected"
                                 f"{': ' + err if err else ' (it changed?)'}")
            try:
                await dst.write(data)
            except KvmError:                         # the destination stopped reading: ask it why
                await self._why_not_written(dst, f)
                raise
            offset += len(data)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY or offset - reported >= f.size // 20 or offset == f.size:
                last, reported = now, offset
                rate = (offset - start) / max(now - t0, 1e-6)
                overall = (self._before + offset) * 100 // max(self._total, 1)
                self.progress(f"copying {name}: {human_bytes(offset)} of {human_bytes(f.size)} "
                              f"({offset * 100 // max(f.size, 1)} %; {overall} % of all), {rate / 1e6:.0f} MB/s")
        return offset - start

    async def _verify(self, stream: _Stream, f: ImageFile) -> None:
        """Both ends' checksums: the source's over its file (read there while the bytes flowed),
        the destination's over its .part file's content (the prefix kept and every byte tee wrote).
        They must match, and every byte must have reached the file."""
        src, dst = stream.src, stream.dst
        sent, got = await asyncio.gather(src.finish(30), dst.finish(max(HASH_TIMEOUT, f.size / HASH_RATE_FLOOR)))
        if sent.stdout:
            raise self.error(f"{f.source} on {self.src.label} is longer than {f.size} bytes (it changed?)")
        written, b = _WRITTEN_RE.search(got.stdout), _HASH_RE.search(got.stdout)
        if written is None or written.group(1) != b"0" or b is None:
            raise self.error(f"writing {f.dest}.part on {self.dst.label} failed: "
                             f"{_last_line(got.stderr) or f'exit status {got.exit_status}'}")
        a = await stream.source_hash
        if a != b.group(1).decode():
            raise self.error(f"{f.dest}.part on {self.dst.label} differs from {f.source} after the copy "
                             f"({CHECKSUM} {b.group(1)[:12].decode()}... vs {a[:12]}...)")

    async def _why_not_written(self, dst: Process, f: ImageFile) -> None:
        """Raise what the destination's pipeline said when it stopped taking bytes (a full disk...)."""
        try:
            got = await dst.finish(10)
        except KvmError:
            return
        err = _last_line(got.stderr)
        if not err:
            return
        if "No space left" in err or "Disk quota" in err:
            raise self.error(f"no space left in {self.dest_dir} on {self.dst.label} while copying "
                             f"{os.path.basename(f.dest)} ({err})") from None
        raise self.error(f"writing {f.dest}.part on {self.dst.label} failed: {err}") from None
