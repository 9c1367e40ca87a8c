"""Fake monitor peers, only for wire faults a real QEMU cannot produce."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _serving(start: Callable[[Handler], Awaitable[asyncio.AbstractServer]], handler: Handler
                   ) -> AsyncIterator[asyncio.AbstractServer]:
    """Serve ``handler``; on exit stop the server and cancel the handlers still running."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    server = await start(wrapped)
    try:
        yield server
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1; yield the port."""
    async with _serving(lambda h: asyncio.start_server(h, "127.0.0.1", 0), handler) as server:
        yield server.sockets[0].getsockname()[1]


@asynccontextmanager
async def unix_server(path: str, handler: Handler) -> AsyncIterator[None]:
    """Serve ``handler`` on a unix socket at ``path``."""
    async with _serving(lambda h: asyncio.start_unix_server(h, path), handler):
        yield


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(4096):
        w.write(data)
        await w.drain()


async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    blob = bytes(range(256)) * 4 + b"\xff\xfe{\x00}\r\n(qemu"
    while True:
        w.write(blob)
        await w.drain()
        await asyncio.sleep(0.01)


async def endless_line(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    chunk = b"x" * 65536
    while True:
        w.write(chunk)
        await w.drain()


GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
                    "capabilities": ["oob"]}}


async def qmp_closes_mid_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A QMP peer that negotiates, then dies halfway through its first real reply."""
    w.write(json.dumps(GREETING).encode() + b"\r\n")
    await w.drain()
    while line := await r.readline():
        msg = json.loads(line)
        if msg["execute"] == "qmp_capabilities":
            w.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
        else:
            w.write(b'{"return": [{"name": "query-st')
            await w.drain()
            return
        await w.drain()


async def hmp_closes_mid_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """An HMP peer that answers the sync nonce like QEMU, then dies in the middle of a reply."""
    w.write(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
    await w.drain()
    line = await r.readline()
    cmd = line.strip().decode()
    w.write(cmd.encode() + b"\r\nunknown command: '" + cmd.encode() + b"'\r\n(qemu) ")
    await w.drain()
    await r.readline()
    w.write(b"info version\r\n7.2.")
    await w.drain()

