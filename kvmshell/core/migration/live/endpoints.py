"""Where a migration's stream goes between two attached guests, and whether it is encrypted.

For ``migrate SRC --to DEST`` kvmshell picks the URI the destination listens on and the source
connects to: a free port on 127.0.0.1 when both QEMUs run on one host (here or the same SSH host),
else a free port on the destination host's address (its SSH target's host). With ``--tls DIR`` each
side's certificates (written by ``kvmshell tls-init DIR HOST...``) are used from DIR/HOST here, or
installed into the host's ``tls_dir`` (default /var/lib/kvmshell/tls/HOST) over SFTP for a guest on
another host. A stream that crosses hosts in plain TCP is warned about, and so is a monitor that
listens on TCP beyond loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmshell.core.values.address import Address, uri_host
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.stages import BaseStage
from kvmshell.core.hosts.processes import free_port
from kvmshell.core.migration.tls import TlsSetup, client_identity, install, remote_dir
from kvmshell.errors import ConfigError, Refused

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool


@dataclass
class Endpoints:
    uri: str | None                   # None: the engine picks a free port on 127.0.0.1 here
    tls: TlsSetup | None = None
    crosses_hosts: bool = False
    warnings: list[str] = field(default_factory=list)


def host_name(address: Address) -> str:
    """A guest's host as `tls-init` names it: its SSH target's host, or localhost."""
    return address.ssh.host if address.ssh is not None else "localhost"


def same_host(hosts: HostPool | None, a: Address, b: Address) -> bool:
    if a.ssh is None or b.ssh is None:
        return a.ssh is None and b.ssh is None
    return hosts is not None and hosts.key(a.ssh) == hosts.key(b.ssh)


async def plan(fleet: Fleet, source: str, dest: str, uri: str | None, tls_root: str | None,
               progress: Callable[[str], None] = lambda message: None, *, tls_authz: bool = False) -> Endpoints:
    src, dst = fleet.get(source).address, fleet.get(dest).address
    crosses = not same_host(fleet.hosts, src, dst)
    ends = Endpoints(uri, crosses_hosts=crosses)
    if uri is None and dst.ssh is not None:
        host = "127.0.0.1" if not crosses else uri_host(dst.ssh.host)
        ends.uri = f"tcp:{host}:{await free_port(fleet.hosts, dst.ssh)}"
    elif uri is None and crosses:
        raise Refused(f"{dest} runs here and {source} on another host: give the URI the source reaches this host "
                      f"at (e.g. tcp:ADDR:PORT), kvmshell cannot tell which of this host's addresses that is",
                      guest=source)
    if tls_root is not None:
        ends.tls = await tls_between(fleet.hosts, (source, src), (dest, dst), tls_root, progress,
                                     only_source=tls_authz)
    ends.warnings = warnings_for(fleet, source, dest, ends.uri, encrypted=ends.tls is not None)
    return ends


def warnings_for(fleet: Fleet, source: str, dest: str, uri: str | None, *, encrypted: bool) -> list[str]:
    """What is unsafe about this migration's path: plain TCP across hosts, monitors open on TCP."""
    src, dst = fleet.get(source).address, fleet.get(dest).address
    warnings = []
    if not same_host(fleet.hosts, src, dst) and not encrypted and (uri is None or uri.startswith("tcp:")):
        warnings.append(f"the migration stream from {source} to {dest}{f' ({uri})' if uri else ''} crosses hosts in "
                        "plain TCP: anyone on the path can read the guest's memory; --tls DIR (certificates from "
                        "`kvmshell tls-init`) encrypts it")
    for name, address in ((source, src), (dest, dst)):
        exposed = address.exposure()
        if exposed:
            warnings.append(f"{name}: {exposed}")
    return warnings


class Notices(BaseStage):
    """The warnings of a migration, shown by the live view for as long as it runs."""

    name = "notices"

    def __init__(self, warnings: list[str]) -> None:
        super().__init__()
        self.warnings = list(warnings)

    def lines(self) -> list[tuple[str, Any]]:
        return [("warning", w) for w in self.warnings]


async def tls_between(pool: HostPool | None, source: tuple[str, Address], dest: tuple[str, Address],
                      tls_root: str, progress: Callable[[str], None] = lambda message: None, *,
                      only_source: bool = False) -> TlsSetup:
    """Each side's certificate directory as its QEMU sees it (installed there first if remote);
    ``only_source``: the destination admits only the source host's client certificate (tls-authz)."""
    root = Path(tls_root).expanduser()
    (_, src), (_, dst) = source, dest
    dirs = []
    for name, address in (source, dest):
        host = host_name(address)
        local = root / host
        if not (local / "ca-cert.pem").exists():
            raise ConfigError(f"--tls {root}: no certificates for {host} ({name}'s host) there; run `kvmshell "
                              f"tls-init {root} {host_name(src)} {host_name(dst)}` first")
        if address.ssh is None:
            dirs.append(str(local))
            continue
        assert pool is not None
        target = remote_dir(pool, address.ssh, host)
        if await install(pool, address.ssh, local, target):
            progress(f"installed the certificates for {host} in {target} on {pool.label(address.ssh)}")
        dirs.append(target)
    authz = client_identity(root / host_name(src)) if only_source else None
    return TlsSetup(dirs[0], dirs[1], host_name(dst), authz)
