"""The TOML inventory: defaults, hosts, guests. Parsed once into frozen dataclasses.

Located at ``--config FILE``, else ``$KVMSHELL_CONFIG``, else ``$XDG_CONFIG_HOME/kvmshell/config.toml``.
A missing default file is an empty inventory; a missing explicit file is an error. Unknown keys are
rejected with the file and the key named, so a typo never silently changes behaviour.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import platformdirs

from kvmshell.core.values.address import Address, Kind, SshTarget, check_guest_name, parse_address, parse_libvirt
from kvmshell.core.values.units import parse_rate
from kvmshell.errors import ConfigError

APP = "kvmshell"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"      # the file kvmshell checks host keys against (core/hosts/ssh)


@dataclass(frozen=True)
class Defaults:
    downtime_ms: int = 300
    strategy: str = "auto"
    allow_postcopy: bool = False
    connect_timeout: float = 5.0
    timeout: float = 10.0
    link: str | None = None            # e.g. "1gbit": the migration link's speed, for the model
    stall_timeout: float = 10.0        # cancel a migration after this long without progress
    setup_timeout: float = 60.0        # cancel a migration still in its setup after this long


@dataclass(frozen=True)
class HostConfig:
    """``[hosts.NAME]``: how to reach a host over SSH.

    ``jump`` is another host's NAME or ``[USER@]HOST[:PORT]`` to go through (like ``ssh -J``);
    ``accept_new_host_key`` accepts a host key that no known_hosts file has yet on first use and
    records it (a changed key is refused all the same). Nothing here can turn verification off.
    """

    name: str
    ssh: SshTarget
    identity_file: str | None = None
    jump: str | None = None
    accept_new_host_key: bool = False
    tls_dir: str | None = None         # where `migrate --tls` puts this host's certificates (on the host)
    libvirt: str | None = None         # libvirt's URI for this host (default: libssh to its ssh target)

    def libvirt_uri(self, known_hosts: str = DEFAULT_KNOWN_HOSTS) -> str:
        """The libvirt connection to this host: ``libvirt`` as given, else over SSH to ``ssh`` with
        kvmshell's host key policy. libvirt's ``ssh`` transport runs ssh(1), which cannot be told
        which known_hosts file to use, so the URI is libvirt's ``libssh`` transport: ``known_hosts``
        is kvmshell's file, ``known_hosts_verify=normal`` refuses an unknown key (libvirt has no
        one to ask), ``auto`` accepts and records a new one when ``accept_new_host_key`` says so (a
        changed key is refused either way), ``keyfile`` is ``identity_file``."""
        if self.libvirt:
            return self.libvirt
        if self.jump:
            raise ConfigError(f"[hosts.{self.name}] jump: libvirt's SSH transport cannot go through a jump host: "
                              f"give libvirt's URI for this host in [hosts.{self.name}] libvirt = \"URI\" (e.g. "
                              "qemu+ssh://... with ProxyJump in ~/.ssh/config)")
        user = f"{quote(self.ssh.user, safe='')}@" if self.ssh.user else ""
        port = f":{self.ssh.port}" if self.ssh.port else ""
        host = f"[{self.ssh.host}]" if ":" in self.ssh.host else self.ssh.host
        query = {"known_hosts": os.path.expanduser(known_hosts),
                 "known_hosts_verify": "auto" if self.accept_new_host_key else "normal"}
        if self.identity_file:
            query["keyfile"] = os.path.expanduser(self.identity_file)
        return f"qemu+libssh://{user}{host}{port}/system?{urlencode(query, safe='/')}"


@dataclass(frozen=True)
class GuestConfig:
    name: str
    address: Address
    host: str | None = None
    unplug: tuple[str, ...] = ()       # devices to unplug before a migration and plug back after
    copy_storage: str | None = None    # "all" | "inc": no shared storage, migrate --to/--to-host copies the disks


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    defaults: Defaults = Defaults()
    hosts: Mapping[str, HostConfig] = field(default_factory=dict)
    guests: Mapping[str, GuestConfig] = field(default_factory=dict)


def default_path() -> Path:
    env = os.environ.get("KVMSHELL_CONFIG")
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of: {', '.join(allowed)})")
        expected = allowed[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in (
                expected if isinstance(expected, tuple) else (expected,))):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")


def parse_ssh_target(text: str, where: str) -> SshTarget:
    """``[USER@]HOST[:PORT]`` (``[V6ADDR]:PORT`` for IPv6)."""
    user, at, hostport = text.strip().rpartition("@")
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        port = rest[1:] if close and rest.startswith(":") else ""
        bad = not close or (rest and not rest.startswith(":"))
    else:
        host, _, port = hostport.partition(":")
        bad = hostport.count(":") > 1
    if bad or not host or (at and not user) or any(c.isspace() or c in "/@" for c in host) or (
            port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        raise ConfigError(f"{where}: {text!r}: expected [USER@]HOST[:PORT], e.g. root@host2.example:22")
    return SshTarget(host=host, user=user if at else None, port=int(port) if port else None)


def _check_jumps(hosts: Mapping[str, HostConfig], src: str) -> None:
    """A jump names a [hosts] table or is USER@HOST[:PORT]; chains of names must not loop."""
    for name, h in hosts.items():
        if h.jump is None:
            continue
        where = f"{src}: [hosts.{name}] jump"
        if h.jump not in hosts:
            if not any(c in h.jump for c in "@:."):
                raise ConfigError(f"{where}: no [hosts.{h.jump}] in the config (give a host name or "
                                  "USER@HOST[:PORT])")
            parse_ssh_target(h.jump, where)
        seen, cur = [name], h.jump
        while cur in hosts:
            if cur in seen:
                raise ConfigError(f"{where}: jump hosts go round in a loop: {' -> '.join([*seen, cur])}")
            seen.append(cur)
            cur = hosts[cur].jump


def parse_config(data: Mapping[str, Any], path: Path | None = None, *,
                 strategies: Collection[str] | None = None) -> Config:
    """The inventory in ``data``; ``strategies``: the names `[defaults] strategy` may take (the
    migration layer's registry; None: not checked here)."""
    src = str(path) if path else "config"
    _check_keys(data, {"defaults": dict, "hosts": dict, "guests": dict}, src)
    d = data.get("defaults", {})
    _check_keys(d, {"downtime_ms": int, "strategy": str, "allow_postcopy": bool,
                    "connect_timeout": (int, float), "timeout": (int, float), "link": str,
                    "stall_timeout": (int, float), "setup_timeout": (int, float)}, f"{src}: [defaults]")
    defaults = Defaults(**d)
    if defaults.link is not None:
        try:
            parse_rate(defaults.link)
        except ValueError as e:
            raise ConfigError(f"{src}: [defaults] link: {e}") from None
    if strategies is not None and defaults.strategy not in strategies:
        raise ConfigError(f"{src}: [defaults] strategy: {defaults.strategy!r} is not one of {', '.join(strategies)}")
    if min(defaults.downtime_ms, defaults.connect_timeout, defaults.timeout, defaults.stall_timeout,
           defaults.setup_timeout) <= 0:
        raise ConfigError(f"{src}: [defaults]: downtime_ms, connect_timeout, timeout, stall_timeout and "
                          "setup_timeout must be positive")
    hosts: dict[str, HostConfig] = {}
    for name, h in data.get("hosts", {}).items():
        where = f"{src}: [hosts.{name}]"
        if not isinstance(h, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(h, {"ssh": str, "identity_file": str, "jump": str, "accept_new_host_key": bool,
                        "tls_dir": str, "libvirt": str}, where)
        if "libvirt" in h:
            parse_libvirt(f"{h['libvirt']}#-", f"{where} libvirt")        # the URI alone
        if "ssh" not in h:
            raise ConfigError(f"{where}: missing key 'ssh' (e.g. ssh = \"root@host2:22\")")
        hosts[name] = HostConfig(name, parse_ssh_target(h["ssh"], f"{where} ssh"), h.get("identity_file"),
                                 h.get("jump"), h.get("accept_new_host_key", False), h.get("tls_dir"),
                                 h.get("libvirt"))
    _check_jumps(hosts, src)
    guests: dict[str, GuestConfig] = {}
    for name, g in data.get("guests", {}).items():
        where = f"{src}: [guests.{name}]"
        check_guest_name(name, where)
        if not isinstance(g, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(g, {"monitor": str, "libvirt": str, "host": str, "unplug": list, "copy_storage": str}, where)
        if g.get("copy_storage", "all") not in ("all", "inc"):
            raise ConfigError(f"{where}.copy_storage: expected \"all\" (whole disks) or \"inc\" (the top images "
                              "over a backing file both hosts have)")
        unplug = g.get("unplug", [])
        if not all(isinstance(d, str) and d for d in unplug):
            raise ConfigError(f"{where}.unplug: expected a list of device ids, e.g. unplug = [\"hostnet0\"]")
        if "monitor" in g and "libvirt" in g:
            raise ConfigError(f"{where}: give 'monitor' or 'libvirt', not both")
        if "monitor" not in g and "libvirt" not in g:
            raise ConfigError(f"{where}: missing key 'monitor' (e.g. monitor = \"qmp:unix:/run/{name}.qmp\") "
                              f"or 'libvirt' (a domain libvirt manages, e.g. libvirt = \"{name}\")")
        host = g.get("host")
        if host is not None and host not in hosts:
            raise ConfigError(f"{where} host: no [hosts.{host}] in the config")
        if "libvirt" in g:
            address = parse_libvirt(g["libvirt"], f"{where} libvirt")
            if host is not None and address.uri is None:
                address = Address.libvirt(str(address.path), hosts[host].libvirt_uri())
        else:
            address = parse_address(g["monitor"], f"{where} monitor")
        if host is not None and address.kind is not Kind.DOMAIN:
            if address.ssh is None:
                address = Address(address.protocol, address.kind, address.path, address.host,
                                  address.port, hosts[host].ssh)
        guests[name] = GuestConfig(name, address, host, tuple(unplug), g.get("copy_storage"))
    return Config(path, defaults, hosts, guests)


def load_config(path: str | Path | None = None, *, strategies: Collection[str] | None = None) -> Config:
    explicit = path is not None or "KVMSHELL_CONFIG" in os.environ
    p = Path(path) if path is not None else default_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {p} does not exist") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p}: {e}") from None
    return parse_config(data, p, strategies=strategies)
