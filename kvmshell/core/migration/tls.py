"""TLS for the migration stream: a small CA and per-host certificates (`tls-init`), and the QEMU side
(`tls-creds-x509` objects and the tls-creds/tls-hostname parameters) on both ends of a migration.

Layout written by ``init_ca``, the directory QEMU's tls-creds-x509 reads for each host:

    DIR/ca-cert.pem, DIR/ca-key.pem (0600)
    DIR/HOST/ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem (keys 0600)
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmshell.core.hosts.ssh.sftp import open_sftp
from kvmshell.core.values.address import SshTarget
from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.models import ParamValue
from kvmshell.errors import CommandFailed, ConfigError

if TYPE_CHECKING:
    from kvmshell.core.hosts.pool import HostPool

OBJECT_ID = "kvmshell-tls"
AUTHZ_ID = "kvmshell-tls-authz"
VALID_DAYS = 3650


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
           ca_name: x509.Name, *, server: bool, names: Sequence[str]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(ca_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name (RFC 1123 labels: letters, digits, inner hyphens,
    1-63 characters each, 253 in all), the only things a certificate names and DIR/HOST may be;
    else ConfigError."""
    try:
        if "%" not in host:
            ipaddress.ip_address(host)
            return host
    except ValueError:
        pass
    if 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.split(".")):
        return host
    raise ConfigError(f"tls-init: {host!r} is not a host name or IP address (letters, digits, '-' and '.' "
                      "as in host.example.org, or an address as 10.0.0.2): nothing was written")


def init_ca(directory: str | Path, hosts: Sequence[str]) -> list[Path]:
    """A CA (reused if DIR already has one) and server + client certificates for each host; the
    per-host directories written. Every host is checked (``check_host``) before anything is written."""
    if not hosts:
        raise ConfigError("tls-init needs at least one host name (or address) to certify")
    for host in hosts:
        check_host(host)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = root / "ca-cert.pem", root / "ca-key.pem"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    else:
        ca_key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmshell migration CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_cert_path, _pem_cert(ca_cert))
    written = []
    for host in hosts:
        d = root / host
        d.mkdir(mode=0o755, exist_ok=True)
        _write(d / "ca-cert.pem", _pem_cert(ca_cert))
        for role, server in (("server", True), ("client", False)):
            key = _key()
            cert = _issue(host, key, ca_key, ca_cert.subject, server=server, names=[host])
            _write(d / f"{role}-key.pem", _pem_key(key), private=True)
            _write(d / f"{role}-cert.pem", _pem_cert(cert))
        written.append(d)
    return written


@dataclass(frozen=True)
class TlsSetup:
    source_dir: str        # a host directory written by init_ca, as the source QEMU sees it
    dest_dir: str          # the destination's
    hostname: str          # the name in the destination's server certificate
    authz: str | None = None   # the destination admits only this client (its certificate's DN)


def client_identity(host_dir: str | Path) -> str:
    """The distinguished name of a host's client certificate, as QEMU's authz-simple matches it."""
    cert = x509.load_pem_x509_certificate((Path(host_dir) / "client-cert.pem").read_bytes())
    return cert.subject.rfc4514_string()


TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz")


@dataclass(frozen=True)
class TlsSide:
    """What ``enable`` changed on one side, to undo it later (another kvmshell may: see ``live.running``):
    the objects it created and the TLS parameters as they were before."""

    objects: tuple[str, ...] = ()
    parameters: dict[str, ParamValue] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": list(self.objects), "parameters": dict(self.parameters)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TlsSide:
        return cls(tuple(str(o) for o in d.get("objects") or ()),
                   {str(k): v for k, v in (d.get("parameters") or {}).items() if isinstance(v, (str, int, bool))})


async def enable(mon: Monitor, directory: str, *, server: bool, hostname: str | None = None,
                 authz: str | None = None) -> TlsSide:
    """Create (or replace) kvmshell's tls-creds-x509 object and make migration use it; ``authz``
    (server side): admit only the client whose certificate has this DN (an authz-simple object).
    What it changed (for ``undo``)."""
    before = await mon.migrate_parameters()
    saved = {k: v for k in TLS_PARAMETERS if (v := before.get(k)) is not None}
    objects = await mon.objects()
    if OBJECT_ID in objects:
        await mon.set_parameters({"tls-creds": ""})
        await mon.object_del(OBJECT_ID)
    await mon.object_add("tls-creds-x509", OBJECT_ID, {"dir": directory, "endpoint": "server" if server else "client",
                                                      "verify-peer": True})
    params: dict[str, ParamValue] = {"tls-creds": OBJECT_ID}
    created = [OBJECT_ID]
    if hostname is not None:
        params["tls-hostname"] = hostname
    if authz is not None:
        if AUTHZ_ID in objects:
            await mon.set_parameters({"tls-authz": ""})
            await mon.object_del(AUTHZ_ID)
        await mon.object_add("authz-simple", AUTHZ_ID, {"identity": authz})
        params["tls-authz"] = AUTHZ_ID
        created.append(AUTHZ_ID)
    await mon.set_parameters(params)
    return TlsSide(tuple(created), saved)


async def disable(mon: Monitor) -> None:
    """Migrate in plain TCP again and drop kvmshell's credentials object."""
    await mon.set_parameters({"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
    objects = await mon.objects()
    for ident in (OBJECT_ID, AUTHZ_ID):
        if ident in objects:
            await mon.object_del(ident)


async def undo(mon: Monitor, side: TlsSide) -> list[str]:
    """Put back what ``enable`` changed on ``mon``: the TLS parameters as they were, then its objects
    removed; what was done, for the outcome."""
    now = await mon.migrate_parameters()
    params = {k: was for k in TLS_PARAMETERS if (now.get(k) or "") != (was := side.parameters.get(k, ""))}
    if params:
        await mon.set_parameters(params)
    objects = await mon.objects()
    gone = [ident for ident in side.objects if ident in objects]
    for ident in gone:
        await mon.object_del(ident)
    return ([f"{', '.join(params)} put back"] if params else []) + ([f"{', '.join(gone)} removed"] if gone else [])


# -- certificates on another host ------------------------------------------------------------------

REMOTE_ROOT = "/var/lib/kvmshell/tls"      # + /HOST, unless [hosts.NAME] tls_dir says where
FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def remote_dir(pool: HostPool, host: SshTarget, name: str) -> str:
    """Where a host's certificates live on it: its ``tls_dir``, else REMOTE_ROOT/NAME."""
    return pool.lookup(host).tls_dir or f"{REMOTE_ROOT}/{name}"


async def install(pool: HostPool, host: SshTarget, local: Path, directory: str) -> bool:
    """Put the certificates ``tls-init`` wrote for a host (``local``) into ``directory`` on it, over
    SFTP (keys created 0600 before a byte is written). False if they were there already."""
    here = {f: hashlib.sha256((local / f).read_bytes()).hexdigest() for f in FILES}
    q = shlex.quote(directory)
    r = await pool.run(host, f"cd -- {q} 2>/dev/null && sha256sum -- {' '.join(FILES)} 2>/dev/null; true")
    there = {line.split()[1]: line.split()[0] for line in r.text.splitlines() if len(line.split()) == 2}
    if there == here:
        return False
    keys = " ".join(shlex.quote(f"{directory}/{f}") for f in FILES if f.endswith("-key.pem"))
    r = await pool.run(host, f"umask 077 && mkdir -p -- {q} && chmod 0755 -- {q} && rm -f -- {keys} && "
                             f"touch -- {keys}")
    if not r.ok:
        raise CommandFailed(f"cannot create {directory} on {pool.label(host)}: "
                            f"{r.stderr.decode(errors='replace').strip() or r.exit_status}")
    sftp = await open_sftp(await pool.connection(host))
    try:
        for f in FILES:
            out = await sftp.open(f"{directory}/{f}", "wb")
            try:
                await out.write((local / f).read_bytes(), 0)
            finally:
                await out.close()
    finally:
        await sftp.close()
    return True
