"""Waiting on conditions (never on time): poll a condition until it holds, within a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(probe: Callable[[], Awaitable[T]], until: Callable[[T], bool], *, timeout: float = 30,
                   every: float = 0.05, what: str = "condition") -> T:
    """Call ``probe`` until ``until(value)`` holds; the value. AssertionError after ``timeout`` s."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = await probe()
                if until(value):
                    return value
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a migration URI)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
