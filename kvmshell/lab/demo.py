"""`kvmshell demo`: local guests to try kvmshell on, stopped again on Ctrl-C.

vm-src dirties a working set at a visible rate, vm-dst waits for an incoming migration, and two
idle guests (one on an HMP monitor) fill the list.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TextIO

from kvmshell.lab import image
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind

SRC_WS_PAGES = 16384                 # 64 MiB working set
SRC_RATE = 20e6                      # bytes/s it dirties


async def start_demo_guests(lab: Lab) -> list[LabGuest]:
    src = await lab.start("vm-src", MonitorKind.QMP_UNIX, ws_pages=SRC_WS_PAGES,
                          pace=image.pace_for_rate(SRC_RATE), ram_mib=128, wait_banner=False)
    dst = await lab.start("vm-dst", MonitorKind.QMP_UNIX, ws_pages=SRC_WS_PAGES, ram_mib=128,
                          incoming=True, disk=src.disk)
    idle1 = await lab.start("vm-idle1", MonitorKind.QMP_UNIX, ws_pages=0, wait_banner=False)
    idle2 = await lab.start("vm-idle2", MonitorKind.HMP_UNIX, ws_pages=0, wait_banner=False)
    return [src, dst, idle1, idle2]


async def run_demo(out: TextIO) -> int:
    """--no-ui: start the guests, print how to attach, wait for Ctrl-C, stop them."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Lab() as lab:
            guests = await start_demo_guests(lab)
            out.write(f"demo guests running ({lab.accel}); attach with:\n\n  kvmshell")
            for g in guests:
                out.write(f" \\\n    --guest {g.guest_option}")
            out.write(" \\\n    guests\n\nvm-dst waits for an incoming migration (-incoming defer). "
                      "Press Ctrl-C to stop every demo guest.\n")
            out.flush()
            await stop.wait()
            out.write("stopping the demo guests\n")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
