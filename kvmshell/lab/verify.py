"""Check that a guest's working set survived (a migration, a loadvm): the "nothing lost" test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kvmshell.core.values.models import RunState
from kvmshell.core.monitor.base import Monitor
from kvmshell.lab import image
from kvmshell.lab.memcheck import MemCheck, check_working_set


async def dump_memory(monitor: Monitor, address: int, size: int, path: Path) -> bytes:
    """pmemsave through any monitor (QEMU writes the file: the guest must be on this host)."""
    await monitor.hmp(f'pmemsave {address:#x} {size} "{path}"', timeout=60)
    try:
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


async def check_guest_memory(monitor: Monitor, ws_pages: int, workdir: Path | None = None) -> MemCheck:
    """Pause the guest (if it runs), dump its working set, resume it, and check the dump."""
    was_running = (await monitor.status()).state is RunState.RUNNING
    fd, name = tempfile.mkstemp(prefix="ws-", suffix=".bin", dir=workdir)
    os.close(fd)
    if was_running:
        await monitor.hmp("stop")
    try:
        data = await dump_memory(monitor, image.WS_BASE, ws_pages * image.PAGE_SIZE, Path(name))
    finally:
        if was_running:
            await monitor.hmp("cont")
    return check_working_set(data)
