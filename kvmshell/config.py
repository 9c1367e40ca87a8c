"""The TOML inventory: defaults, hosts, guests. Parsed once into frozen dataclasses.

Located at ``--config FILE``, else ``$KVMSHELL_CONFIG``, else ``$XDG_CONFIG_HOME/kvmshell/config.toml``.
A missing default file is an empty inventory; a missing explicit file is an error. Unknown keys are
rejected with the file and the key named, so a typo never silently changes behaviour.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from kvmshell.core.address import Address, SshTarget, check_guest_name, parse_address
from kvmshell.errors import ConfigError

APP = "kvmshell"
STRATEGIES = ("precopy", "converge", "postcopy", "auto")


@dataclass(frozen=True)
class Defaults:
    downtime_ms: int = 300
    strategy: str = "auto"
    allow_postcopy: bool = False
    connect_timeout: float = 5.0
    timeout: float = 10.0
    link: str | None = None            # e.g. "1gbit": the migration link's speed, for the model
    stall_timeout: float = 10.0        # cancel a migration after this long without progress


@dataclass(frozen=True)
class HostConfig:
    name: str
    ssh: SshTarget
    identity_file: str | None = None


@dataclass(frozen=True)
class GuestConfig:
    name: str
    address: Address
    host: str | None = None


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


def _parse_ssh(text: str, where: str) -> SshTarget:
    user, at, hostport = text.rpartition("@")
    host, _, port = hostport.partition(":")
    if not host or (port and not port.isdigit()):
        raise ConfigError(f"{where}: {text!r}: expected [USER@]HOST[:PORT]")
    return SshTarget(host=host, user=user if at else None, port=int(port) if port else None)


def parse_config(data: Mapping[str, Any], path: Path | None = None) -> Config:
    src = str(path) if path else "config"
    _check_keys(data, {"defaults": dict, "hosts": dict, "guests": dict}, src)
    d = data.get("defaults", {})
    _check_keys(d, {"downtime_ms": int, "strategy": str, "allow_postcopy": bool,
                    "connect_timeout": (int, float), "timeout": (int, float), "link": str,
                    "stall_timeout": (int, float)}, f"{src}: [defaults]")
    defaults = Defaults(**d)
    if defaults.link is not None:
        from kvmshell.core.commands.values import parse_rate
        try:
            parse_rate(defaults.link)
        except ValueError as e:
            raise ConfigError(f"{src}: [defaults] link: {e}") from None
    if defaults.strategy not in STRATEGIES:
        raise ConfigError(f"{src}: [defaults] strategy: {defaults.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if min(defaults.downtime_ms, defaults.connect_timeout, defaults.timeout, defaults.stall_timeout) <= 0:
        raise ConfigError(f"{src}: [defaults]: downtime_ms, connect_timeout, timeout and stall_timeout must be "
                          "positive")
    hosts: dict[str, HostConfig] = {}
    for name, h in data.get("hosts", {}).items():
        where = f"{src}: [hosts.{name}]"
        if not isinstance(h, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(h, {"ssh": str, "identity_file": str}, where)
        if "ssh" not in h:
            raise ConfigError(f"{where}: missing key 'ssh' (e.g. ssh = \"root@host2:22\")")
        hosts[name] = HostConfig(name, _parse_ssh(h["ssh"], f"{where} ssh"), h.get("identity_file"))
    guests: dict[str, GuestConfig] = {}
    for name, g in data.get("guests", {}).items():
        where = f"{src}: [guests.{name}]"
        check_guest_name(name, where)
        if not isinstance(g, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(g, {"monitor": str, "host": str}, where)
        if "monitor" not in g:
            raise ConfigError(f"{where}: missing key 'monitor' (e.g. monitor = \"qmp:unix:/run/{name}.qmp\")")
        address = parse_address(g["monitor"], f"{where} monitor")
        host = g.get("host")
        if host is not None:
            if host not in hosts:
                raise ConfigError(f"{where} host: no [hosts.{host}] in the config")
            if address.ssh is None:
                address = Address(address.protocol, address.kind, address.path, address.host,
                                  address.port, hosts[host].ssh)
        guests[name] = GuestConfig(name, address, host)
    return Config(path, defaults, hosts, guests)


def load_config(path: str | Path | None = None) -> Config:
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
    return parse_config(data, p)
