"""Guest monitor addresses.

    ADDR   := [ssh://[USER@]HOST[:PORT]/]PROTO:KIND:TARGET | libvirt:[URI#]DOMAIN
    PROTO  := qmp | hmp
    KIND   := unix (TARGET = socket path) | tcp (TARGET = host:port) | pty (TARGET = /dev/pts/N, hmp only)

A ``libvirt:`` address names a domain that libvirt manages, on libvirt's default connection
(``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``) or on URI (e.g. ``qemu+ssh://root@host2/system``):
libvirt holds that guest's only monitor, so kvmshell goes through libvirt's API.

Parsed once, at the edge, into a frozen ``Address``; nothing else in kvmshell looks at the string.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from kvmshell.errors import ConfigError

GUEST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = frozenset({"all"})


class Protocol(enum.Enum):
    QMP = "qmp"
    HMP = "hmp"
    LIBVIRT = "libvirt"          # libvirt's API (QMP and HMP through its monitor pass-through)


class Kind(enum.Enum):
    UNIX = "unix"
    TCP = "tcp"
    PTY = "pty"
    DOMAIN = "domain"            # a libvirt domain (path: its name, uri: the connection or None)


def uri_host(host: str) -> str:
    """A host as it goes before ``:PORT`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class SshTarget:
    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{uri_host(self.host)}{port}"


@dataclass(frozen=True)
class Address:
    protocol: Protocol
    kind: Kind
    path: str | None = None          # unix socket or pty device
    host: str | None = None          # tcp
    port: int | None = None          # tcp
    ssh: SshTarget | None = None     # remote host the target lives on
    uri: str | None = None           # libvirt: the connection URI (None: libvirt's default)

    @property
    def target(self) -> str:
        if self.kind is Kind.DOMAIN:
            return f"{self.uri}#{self.path}" if self.uri else str(self.path)
        if self.kind is Kind.TCP:
            return f"{uri_host(self.host or '')}:{self.port}"
        assert self.path is not None
        return self.path

    def __str__(self) -> str:
        if self.kind is Kind.DOMAIN:
            return f"libvirt:{self.target}"
        prefix = f"{self.ssh}/" if self.ssh else ""
        return f"{prefix}{self.protocol.value}:{self.kind.value}:{self.target}"

    def same_target(self, other: Address) -> bool:
        """The same monitor, whichever way it is reached (the ssh:// prefix is not compared)."""
        return (self.protocol, self.kind, self.path, self.host, self.port, self.uri) == \
            (other.protocol, other.kind, other.path, other.host, other.port, other.uri)

    def exposure(self) -> str | None:
        """A warning when the monitor listens on TCP beyond loopback (it has no authentication)."""
        if self.kind is not Kind.TCP or self.host is None:
            return None
        host = self.host.strip("[]")
        if host in ("localhost", "::1") or host.startswith("127."):
            return None
        return (f"its {self.protocol.value.upper()} monitor listens on TCP {self.target}, not on loopback: a QEMU "
                "monitor has no authentication, anyone who reaches that port controls the guest; prefer a unix "
                "socket (reached over SSH from elsewhere)")

    @classmethod
    def unix(cls, protocol: Protocol | str, path: str) -> Address:
        return cls(Protocol(protocol), Kind.UNIX, path=path)

    @classmethod
    def tcp(cls, protocol: Protocol | str, host: str, port: int) -> Address:
        return cls(Protocol(protocol), Kind.TCP, host=host, port=port)

    @classmethod
    def pty(cls, path: str) -> Address:
        return cls(Protocol.HMP, Kind.PTY, path=path)

    @classmethod
    def libvirt(cls, domain: str, uri: str | None = None) -> Address:
        return cls(Protocol.LIBVIRT, Kind.DOMAIN, path=domain, uri=uri or None)


_EXAMPLE = ("expected PROTO:KIND:TARGET, e.g. qmp:unix:/run/vm1.qmp, hmp:tcp:127.0.0.1:4444, hmp:pty:/dev/pts/3, "
            "or libvirt:[URI#]DOMAIN")
_LIBVIRT_EXAMPLE = "expected libvirt:DOMAIN or libvirt:URI#DOMAIN, e.g. libvirt:web1 or libvirt:qemu+ssh://root@host2/system#web1"
_DOMAIN_RE = re.compile(r"[^\s/#]+")
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def parse_libvirt(text: str, where: str = "address") -> Address:
    """``libvirt:[URI#]DOMAIN`` (the ``libvirt:`` prefix is optional here: a config's ``libvirt`` key)."""
    whole = text.strip()
    rest = whole[len("libvirt:"):] if whole.startswith("libvirt:") else whole
    uri, hash_, domain = rest.rpartition("#")
    if hash_ and not _URI_RE.fullmatch(uri):
        raise ConfigError(f"{where}: {whole!r}: {uri!r} is not a libvirt URI (e.g. qemu:///system, "
                          "qemu+ssh://root@host2/system)")
    if not _DOMAIN_RE.fullmatch(domain):
        raise ConfigError(f"{where}: {whole!r}: {_LIBVIRT_EXAMPLE}")
    return Address.libvirt(domain, uri or None)


def _port(text: str, where: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ConfigError(f"{where}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _parse_ssh(text: str, where: str) -> tuple[SshTarget, str]:
    rest = text[len("ssh://"):]
    authority, slash, tail = rest.partition("/")
    if not slash or not tail:
        raise ConfigError(f"{where}: {text!r}: expected ssh://[USER@]HOST[:PORT]/PROTO:KIND:TARGET")
    user, at, hostport = authority.rpartition("@")
    if at and not user:
        raise ConfigError(f"{where}: {text!r}: empty user name before '@'")
    host, port = hostport, None
    m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", hostport)
    if m:
        host, port_text = m.group(1), m.group(2)
        port = _port(port_text, where) if port_text is not None else None
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
        port = _port(port_text, where)
    if not host or not re.fullmatch(r"[A-Za-z0-9_.:-]+", host):
        raise ConfigError(f"{where}: {text!r}: {host!r} is not a host name")
    return SshTarget(host=host, user=user or None, port=port), tail


def parse_address(text: str, where: str = "address") -> Address:
    """Parse ADDR; ``where`` names the option or config key in error messages."""
    text = text.strip()
    if text.startswith("libvirt:"):
        return parse_libvirt(text, where)
    ssh = None
    if text.startswith("ssh://"):
        ssh, text = _parse_ssh(text, where)
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ConfigError(f"{where}: {text!r}: {_EXAMPLE}")
    proto_text, kind_text, target = parts
    try:
        protocol = Protocol(proto_text.lower())
    except ValueError:
        raise ConfigError(f"{where}: {text!r}: protocol {proto_text!r} is not qmp or hmp") from None
    try:
        kind = Kind(kind_text.lower())
    except ValueError:
        raise ConfigError(f"{where}: {text!r}: kind {kind_text!r} is not unix, tcp or pty") from None
    if not target:
        raise ConfigError(f"{where}: {text!r}: the target after {proto_text}:{kind_text}: is empty")
    if kind is Kind.TCP:
        m = re.fullmatch(r"\[([^\]]+)\]:(.*)|([^:\[\]]+):(.*)", target)
        if not m:
            raise ConfigError(f"{where}: {text!r}: expected tcp:HOST:PORT, e.g. hmp:tcp:127.0.0.1:4444")
        host = m.group(1) or m.group(3)
        port = _port(m.group(2) if m.group(1) else m.group(4), where)
        return Address(protocol, kind, host=host, port=port, ssh=ssh)
    if kind is Kind.PTY and protocol is not Protocol.HMP:
        raise ConfigError(f"{where}: {text!r}: a pty carries HMP only; use hmp:pty:{target}")
    if "\0" in target:
        raise ConfigError(f"{where}: {text!r}: the path contains a NUL byte")
    return Address(protocol, kind, path=target, ssh=ssh)


# libvirt's own monitor socket: .../qemu/domain-ID-SHORTNAME/monitor.sock (system, session and embed roots)
_LIBVIRT_MONITOR_RE = re.compile(r".*/domain-\d+-([^/]+)/monitor\.sock")


def libvirt_monitor_domain(path: str | None) -> str | None:
    """The domain (as libvirt shortened it for the directory) when ``path`` is a monitor socket libvirt
    holds: QEMU serves one client, and libvirt is that client for as long as the domain runs."""
    m = _LIBVIRT_MONITOR_RE.fullmatch(path or "")
    return m.group(1) if m else None


def held_by_libvirt(address: Address) -> str | None:
    """One line for a QMP/HMP address that is libvirt's own monitor socket, with the address to use."""
    domain = libvirt_monitor_domain(address.path) if address.kind is Kind.UNIX else None
    if domain is None:
        return None
    uri = f"qemu+ssh://{address.ssh.user + '@' if address.ssh.user else ''}{uri_host(address.ssh.host)}" \
          f"{':' + str(address.ssh.port) if address.ssh.port else ''}/system#" if address.ssh else ""
    return (f"{address}: libvirt holds this monitor (domain {domain}; QEMU serves one client): attach it as "
            f"libvirt:{uri}{domain}")


def check_guest_name(name: str, where: str = "guest name") -> str:
    if not GUEST_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a guest name (letters, digits, '_', '.', '-'; at most 64; "
            "starting with a letter or digit)")
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}: {name!r} is reserved (@{name} targets every guest)")
    return name


def parse_guest_option(text: str) -> tuple[str, Address]:
    """Parse ``--guest NAME=ADDR``."""
    name, eq, addr = text.partition("=")
    if not eq:
        raise ConfigError(f"--guest {text!r}: expected NAME=ADDR, e.g. --guest vm1=qmp:unix:/run/vm1.qmp")
    name = check_guest_name(name.strip(), f"--guest {text!r}")
    return name, parse_address(addr, f"--guest {name}")
