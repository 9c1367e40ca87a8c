"""Migration URIs, parsed once: where a migration stream goes (``tcp:HOST:PORT``, ``unix:PATH``,
``exec:CMD``, ``fd:NAME``, ``rdma:HOST:PORT``, ``file:PATH``), with the host and port of the
network ones (an IPv6 address in brackets) and whether that host is this one. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

URI_SCHEMES = {
    "tcp": "tcp:HOST:PORT - a TCP stream (QEMU's default transport)",
    "unix": "unix:PATH - a unix socket on this host",
    "exec": "exec:COMMAND - pipe the stream through a shell command",
    "fd": "fd:NAME - a file descriptor passed to QEMU with getfd",
    "rdma": "rdma:HOST:PORT - RDMA transport",
    "file": "file:PATH[,offset=N] - to a file (QEMU 8.2 and later)",
}
NETWORK = ("tcp", "rdma")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):(\d+)(,.*)?")
LOCAL_HOSTS = ("", "0", "localhost", "::1", "0.0.0.0", "::")


@dataclass(frozen=True)
class MigrationUri:
    text: str
    scheme: str
    host: str | None = None          # tcp/rdma: the host, without brackets
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> MigrationUri:
        """A URI QEMU would accept, or ValueError naming what is wrong."""
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in URI_SCHEMES:
            raise ValueError(f"{text!r} is not a migration URI (expected tcp:HOST:PORT, unix:PATH, exec:CMD, "
                             "fd:NAME, rdma:HOST:PORT or file:PATH)")
        if scheme in NETWORK:
            m = _HOST_PORT.fullmatch(rest)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise ValueError(f"{text!r}: expected {scheme}:HOST:PORT with a port from 1 to 65535")
            return cls(text, scheme, m.group(1).strip("[]"), int(m.group(2)))
        if not rest:
            raise ValueError(f"{text!r}: {URI_SCHEMES[scheme]}")
        return cls(text, scheme)

    @property
    def tcp(self) -> bool:
        return self.scheme == "tcp"

    @property
    def local(self) -> bool:
        """The stream stays on this host (a local transport, or a loopback or wildcard address)."""
        return is_local_host(self.host)

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str | None) -> MigrationUri | None:
    """The URI, or None for no text or a text that is not a migration URI (for URIs made elsewhere)."""
    try:
        return MigrationUri.parse(text) if text else None
    except ValueError:
        return None


def check_uri(text: str) -> str:
    """``text`` if it is a migration URI (a parser for the command language), else ValueError."""
    MigrationUri.parse(text)
    return text


def is_local_host(host: str | None) -> bool:
    return host is None or host in LOCAL_HOSTS or host.startswith("127.")
