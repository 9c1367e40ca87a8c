"""Many guests at once: concurrent connect, reconnect with backoff, event fan-in.

Each guest has a supervisor task that connects, waits for the monitor to go away, and reconnects
with exponential backoff. One guest's failure never touches the others: its state becomes
UNREACHABLE with the reason, and the fleet carries on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.values.address import Address, Kind, check_guest_name
from kvmshell.core.values.models import Event, QemuVersion
from kvmshell.core.monitor.base import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, Monitor, make_monitor
from kvmshell.errors import ConfigError, Disconnected, KvmError

log = logging.getLogger(__name__)

CONNECTED_EVENT = "kvmshell.CONNECTED"
UNREACHABLE_EVENT = "kvmshell.UNREACHABLE"


class GuestState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"
    CLOSED = "closed"


@dataclass
class Guest:
    """A named guest of the fleet and the state of its monitor connection."""

    name: str
    address: Address
    state: GuestState = GuestState.CONNECTING
    reason: str | None = None               # why it is unreachable
    monitor: Monitor | None = None
    attempts: int = 0
    noticed: bool = False                   # the monitor's notice was said (once per guest)
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    connected: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def version(self) -> QemuVersion | None:
        return self.monitor.version if self.monitor else None

    def require(self) -> Monitor:
        """The connected monitor, or a Disconnected error naming the guest and the reason."""
        if self.monitor is None or not self.monitor.connected:
            reason = self.reason or self.state.value
            where = "" if reason.startswith(str(self.address)) else f"{self.address}: "
            raise Disconnected(f"not connected: {where}{reason}", guest=self.name)
        return self.monitor


def _identity(address: Address) -> tuple[Any, ...]:
    """What makes two addresses the same monitor (symlinks resolved for local paths)."""
    ssh = (address.ssh.host, address.ssh.port) if address.ssh else None
    if address.kind is Kind.DOMAIN:
        return ("libvirt", address.uri, address.path)
    if address.kind is Kind.TCP:
        return (ssh, "tcp", address.host, address.port)
    path = address.path or ""
    return (ssh, address.kind.value, os.path.realpath(path) if ssh is None else path)


class Fleet:
    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect: bool = True, backoff: tuple[float, float] = (0.25, 8.0),
                 hosts: HostPool | None = None) -> None:
        """``hosts``: the SSH host pool for guests on other hosts (``pool.HostPool.from_config``); the
        fleet owns it from then on and closes it in ``aclose``. Without one, the fleet makes a bare
        pool (known_hosts, ~/.ssh/config and the agent only) the first time a guest needs it."""
        self.hosts = hosts
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff = backoff
        self._guests: dict[str, Guest] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._subscribers: list[Callable[[Event], None]] = []
        self._closing = False

    # -- membership --------------------------------------------------------------------------
    def add(self, name: str, address: Address) -> Guest:
        check_guest_name(name)
        if name in self._guests:
            raise ConfigError(f"guest {name!r} is defined twice")
        ident = _identity(address)
        for other in self._guests.values():
            if _identity(other.address) == ident:
                raise ConfigError(f"guests {other.name!r} and {name!r} are the same monitor ({address}): "
                                  "give each guest one name")
        guest = Guest(name, address)
        self._guests[name] = guest
        if self._tasks or self._started:
            self._spawn(guest)
        return guest

    _started = False

    def __iter__(self) -> Iterator[Guest]:
        return iter(self._guests.values())

    def __len__(self) -> int:
        return len(self._guests)

    def __contains__(self, name: object) -> bool:
        return name in self._guests

    @property
    def names(self) -> list[str]:
        return list(self._guests)

    def get(self, name: str) -> Guest:
        try:
            return self._guests[name]
        except KeyError:
            known = ", ".join(self._guests) or "none"
            raise KvmError(f"no guest named {name!r} (guests: {known})", title="unknown guest") from None

    def monitor(self, name: str) -> Monitor:
        return self.get(name).require()

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def publish(self, event: Event) -> None:
        """Give subscribers an event kvmshell made itself (a migration decision, a warning)."""
        self._emit(event)

    def _emit(self, event: Event) -> None:
        for cb in list(self._subscribers):
            try:
                cb(event)
            except Exception:
                log.exception("fleet event subscriber failed on %s", event.name)

    def _emit_state(self, guest: Guest, name: str, **data: Any) -> None:
        self._emit(Event(guest.name, name, data, time.time()))

    # -- connecting --------------------------------------------------------------------------
    async def start(self, wait: bool = True) -> None:
        """Start connecting every guest; with ``wait``, return once each has connected or failed once."""
        self._started = True
        for guest in self._guests.values():
            if guest.name not in self._tasks:
                self._spawn(guest)
        if wait:
            await self.wait_first_attempts()

    async def wait_first_attempts(self, names: Iterable[str] | None = None) -> None:
        guests = [self.get(n) for n in names] if names is not None else list(self._guests.values())
        await asyncio.gather(*(g.first_attempt.wait() for g in guests))

    def _spawn(self, guest: Guest) -> None:
        self._tasks[guest.name] = asyncio.create_task(self._supervise(guest), name=f"fleet-{guest.name}")

    async def _supervise(self, guest: Guest) -> None:
        delay = self.backoff[0]
        while not self._closing:
            guest.state = GuestState.CONNECTING
            guest.attempts += 1
            mon = make_monitor(guest.name, guest.address, timeout=self.timeout,
                               connect_timeout=self.connect_timeout,
                               hosts=self.host_pool() if guest.address.ssh is not None else None)
            try:
                await mon.connect()
            except KvmError as e:
                guest.state, guest.reason, guest.monitor = GuestState.UNREACHABLE, e.message, None
                guest.first_attempt.set()
                self._emit_state(guest, UNREACHABLE_EVENT, reason=e.message)
                if not self.reconnect:
                    return
                await asyncio.sleep(delay)          # backoff between attempts, not a wait for a condition
                delay = min(delay * 2, self.backoff[1])
                continue
            unsubscribe = mon.subscribe(self._emit)
            guest.monitor, guest.state, guest.reason = mon, GuestState.CONNECTED, None
            guest.connected.set()
            guest.first_attempt.set()
            delay = self.backoff[0]
            notice = mon.notice if not guest.noticed else None
            guest.noticed = guest.noticed or notice is not None
            self._emit_state(guest, CONNECTED_EVENT, version=str(mon.version or ""), notice=notice)
            try:
                await mon.wait_closed()
            finally:
                unsubscribe()
                guest.connected.clear()
            if self._closing:
                break
            guest.state, guest.reason = GuestState.UNREACHABLE, mon.disconnect_reason
            await mon.close()
            if not self.reconnect:
                return

    def host_pool(self) -> HostPool:
        if self.hosts is None:
            self.hosts = HostPool(connect_timeout=self.connect_timeout)
        return self.hosts

    async def aclose(self) -> None:
        """Disconnect every monitor, stop every supervisor, close the SSH connections."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(*(g.monitor.close() for g in self._guests.values() if g.monitor),
                             return_exceptions=True)
        if self.hosts is not None:
            await self.hosts.aclose()
        for g in self._guests.values():
            g.state = GuestState.CLOSED

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
