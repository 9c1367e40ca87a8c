"""A guest's disk images as the migrations to another host see them: the absolute paths its command
line names, and the backing chain of each, read on a host with ``qemu-img info -U --backing-chain
--output=json`` through a HostShell (``-U``: the running QEMU holds the image lock). Static migration
copies every file of the chains; crosshost checks them on the destination or creates new images
over them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from kvmshell.core.hosts.shell import HostShell
from kvmshell.core.values.cmdline import QemuCommand, images_of


@dataclass(frozen=True)
class ChainFile:
    """One file of a backing chain: the image itself first, then what it is backed by."""

    path: str                             # as qemu-img opened it (backing files: the resolved path)
    format: str
    virtual_size: int
    backing: str | None = None            # the next file of the chain, if any
    backing_format: str | None = None


def parse_chain(text: str) -> list[ChainFile]:
    """qemu-img's JSON answer (a list with --backing-chain, one object without); ValueError if it is not one."""
    data = json.loads(text)
    infos = data if isinstance(data, list) else [data]
    try:
        files = []
        for i, info in enumerate(infos):
            nxt = infos[i + 1] if i + 1 < len(infos) else None
            files.append(ChainFile(str(info.get("filename", "")), str(info.get("format", "raw")),
                                   int(info.get("virtual-size", 0)),
                                   backing=str(nxt.get("filename", "")) if nxt else None,
                                   backing_format=str(nxt.get("format")) if nxt else None))
    except (AttributeError, TypeError) as e:
        raise ValueError(f"not an image description: {e}") from None
    return files


async def backing_chain(shell: HostShell, path: str) -> list[ChainFile]:
    """The backing chain of the image at ``path`` on ``shell``'s host; its failures raise ``shell.error``."""
    text = await shell.check(f"qemu-img info -U --backing-chain --output=json -- {shlex.quote(path)}",
                             f"qemu-img info {path}")
    try:
        return parse_chain(text)
    except ValueError:
        raise shell.error(f"qemu-img info {path}: unreadable answer") from None


async def absolute_images(shell: HostShell, pid: int, cmd: QemuCommand) -> dict[str, str]:
    """Each image path of ``cmd`` as its command line has it -> the absolute path (a relative one is
    relative to where the QEMU of pid ``pid`` on ``shell``'s host was started)."""
    given = images_of(cmd)
    cwd = ""
    if any(not p.startswith("/") for p in given):
        cwd = (await shell.check(f"readlink /proc/{pid}/cwd", "the QEMU's directory")).strip()
    return {p: p if p.startswith("/") else f"{cwd.rstrip('/')}/{p}" for p in given}


__all__ = ["ChainFile", "absolute_images", "backing_chain", "parse_chain"]
