"""TLS for the migration stream: certificates from tls-init, accepted by QEMU; a wrong CA fails cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.live.request import MigrationRequest
from kvmshell.core.values.models import RunState
from kvmshell.core.migration.tls import TlsSetup, init_ca
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory

WS = 1024


def test_tls_init_layout_and_permissions(tmp_path: Path) -> None:
    [host] = init_ca(tmp_path, ["localhost"])
    assert sorted(p.name for p in host.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem",
                                                     "server-cert.pem", "server-key.pem"]
    for key in (tmp_path / "ca-key.pem", host / "server-key.pem", host / "client-key.pem"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    ca = (tmp_path / "ca-cert.pem").read_bytes()
    init_ca(tmp_path, ["other"])                         # a second host: the same CA
    assert (tmp_path / "ca-cert.pem").read_bytes() == ca == (tmp_path / "other" / "ca-cert.pem").read_bytes()


def _certtool(*args: str) -> str:
    r = subprocess.run(["certtool", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("certtool") is None, reason="certtool (gnutls-bin, make system-deps) missing")
def test_tls_init_certificates_pass_gnutls_strict_checks(tmp_path: Path) -> None:
    """GnuTLS's certtool verifies each leaf against the CA; the leaves carry what stricter QEMU builds
    and libvirt want: KeyUsage digitalSignature + keyEncipherment, and the server / client EKU."""
    [name, addr] = init_ca(tmp_path, ["host-a.example", "10.0.0.7"])
    ca = tmp_path / "ca-cert.pem"
    for d in (name, addr):
        assert (d / "ca-cert.pem").read_bytes() == ca.read_bytes()
        for role, eku in (("server", "TLS WWW Server"), ("client", "TLS WWW Client")):
            cert = d / f"{role}-cert.pem"
            out = _certtool("--verify", "--load-ca-certificate", str(ca), "--infile", str(cert),
                            "--verify-profile", "high")
            assert "Chain verification output: Verified" in out, out
            out = _certtool("--verify", "--load-ca-certificate", str(ca), "--infile", str(cert),
                            "--verify-purpose", "1.3.6.1.5.5.7.3.1" if role == "server" else "1.3.6.1.5.5.7.3.2",
                            *(["--verify-hostname", d.name] if role == "server" else []))
            assert "Chain verification output: Verified" in out, out
            info = _certtool("-i", "--infile", str(cert))
            assert "Digital signature." in info and "Key encipherment." in info, info
            assert eku in info, info


async def _migrate(lab: Lab, tmp_path: Path, setup: TlsSetup | None, dst_tls: bool = True):  # type: ignore[no-untyped-def]
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, incoming=True, disk=src.disk)
    fleet = Fleet()
    fleet.add("src", src.address)
    fleet.add("dst", dst.address)
    await fleet.start()
    job = MigrationJob.of(fleet, MigrationRequest("src", "dst", strategy="precopy", tls=setup,
                                               stall_timeout=5))
    return src, dst, fleet, job


async def fails_and_the_source_runs_on(job: MigrationJob, tmp_path: Path) -> None:
    """The migration fails (at once, or once it runs); the source runs on with its memory intact."""
    try:
        await job.start()
        outcome = await asyncio.wait_for(job.run(), 60)
        assert outcome.status == "failed", outcome.message
    except Exception as e:                                          # or it fails at once
        assert "failed at once" in str(e)
    assert (await job.source.status()).state is RunState.RUNNING
    check = await check_guest_memory(job.source, WS, tmp_path)
    assert check.ok, check.summary()


@pytest.mark.qemu
async def test_tls_migration_completes(lab: Lab, tmp_path: Path) -> None:
    [host] = init_ca(tmp_path / "pki", ["localhost"])
    src, dst, fleet, job = await _migrate(lab, tmp_path, TlsSetup(str(host), str(host), "localhost"))
    async with fleet:
        await job.prepare()
        params = await fleet.monitor("src").migrate_parameters()
        assert params.get("tls-creds") == "kvmshell-tls" and params.get("tls-hostname") == "localhost"
        await job.start()
        outcome = await asyncio.wait_for(job.run(), 60)
        assert outcome.status == "completed", outcome.message
        await dst.wait_heartbeats(2)
        check = await check_guest_memory(fleet.monitor("dst"), WS, tmp_path)
        assert check.ok, check.summary()


@pytest.mark.qemu
async def test_wrong_ca_fails_cleanly_and_the_source_runs_on(lab: Lab, tmp_path: Path) -> None:
    [good] = init_ca(tmp_path / "pki-a", ["localhost"])
    [other] = init_ca(tmp_path / "pki-b", ["localhost"])       # another CA: the source must not trust it
    src, dst, fleet, job = await _migrate(lab, tmp_path, TlsSetup(str(good), str(other), "localhost"))
    async with fleet:
        await job.prepare()
        await fails_and_the_source_runs_on(job, tmp_path)
        assert (await job.source.migrate_parameters()).get("tls-creds") == ""          # dropped again


@pytest.mark.qemu
async def test_migrate_to_with_tls_from_the_shell_language(lab: Lab, tmp_path: Path) -> None:
    from kvmshell.core.commands.registry import default_registry
    from kvmshell.core.migration.live.job import FINISHED
    from kvmshell.core.values.models import Event
    from kvmshell.core.commands.session import Session
    src, dst, fleet, _ = await _migrate(lab, tmp_path, None)
    events: asyncio.Queue[Event] = asyncio.Queue()
    fleet.subscribe(events.put_nowait)
    async with fleet:
        session = Session(fleet, default_registry())
        [o] = await session.run_line(f"@src migrate --to dst --tls {tmp_path}/pki")
        assert not o.ok and "tls-init" in (o.error or "")                   # no certificates yet: says how
        init_ca(tmp_path / "pki", ["localhost"])
        [o] = await session.run_line(f"@src migrate --to dst --tls {tmp_path}/pki")
        assert o.ok, o.error
        async with asyncio.timeout(60):
            while (ev := await events.get()).name != FINISHED:
                pass
        assert ev.data["status"] == "completed", ev.data
        assert (await fleet.monitor("src").migrate_parameters()).get("tls-creds") == "kvmshell-tls"
        await session.aclose()


@pytest.mark.qemu
@pytest.mark.timeout(120)
async def test_tls_migration_between_two_ssh_hosts(lab: Lab, tmp_path: Path) -> None:
    """Source on test host a, destination on b (network namespaces with their own sshd); kvmshell
    installs each host's certificates there over SFTP and the stream crosses the a-b link in TLS."""
    import shutil

    from kvmshell.core.commands.registry import default_registry
    from kvmshell.core.hosts.processes import free_port
    from kvmshell.core.migration.live.endpoints import plan
    from kvmshell.core.migration.live.job import FINISHED
    from kvmshell.core.values.models import Event
    from kvmshell.core.commands.session import Session
    from kvmshell.core.migration.tls import REMOTE_ROOT
    from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning
    from tests.test_ssh import pool_for, remote

    if not HAVE_SSHD:
        pytest.skip("OpenSSH server not installed (make test installs it)")
    async with SshTestbed(tmp_path / "ssh", ("a", "b")) as bed:
        if bed.net is None:
            pytest.skip("the test hosts are not network namespaces (not root)")
        bed.trust()
        a, b = bed["a"].addr, bed["b"].addr
        b_link = bed.net.hosts[1].ip                # b as a reaches it (its ssh address is on the uplink)
        installed = [Path(REMOTE_ROOT) / a, Path(REMOTE_ROOT) / b]
        src = await lab.start("tsrc", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, prefix=bed["a"].prefix)
        dst = await lab.start("tdst", MonitorKind.QMP_UNIX, ws_pages=WS, incoming=True, disk=src.disk,
                              prefix=bed["b"].prefix)
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
                fleet.add("tsrc", remote(bed, "a", src.address))
                fleet.add("tdst", remote(bed, "b", dst.address))
                fleet.subscribe(events.put_nowait)
                await fleet.start()
                plain = await plan(fleet, "tsrc", "tdst", None, None)
                assert plain.uri and plain.uri.startswith(f"tcp:{b}:") and plain.tls is None
                assert any("crosses hosts in plain TCP" in w for w in plain.warnings), plain.warnings
                init_ca(tmp_path / "pki", [a, b])
                uri = f"tcp:{b_link}:{await free_port(fleet.hosts, fleet.get('tdst').address.ssh)}"
                session = Session(fleet, default_registry())
                [o] = await session.run_line(f"@tsrc migrate --to tdst {uri} --tls {tmp_path}/pki")
                assert o.ok, o.error
                assert o.result is not None and "plain TCP" not in o.result.text(), o.result
                for d in installed:                          # the keys arrived private
                    assert stat.S_IMODE(os.stat(d / "server-key.pem").st_mode) == 0o600
                    assert (d / "ca-cert.pem").read_bytes() == (tmp_path / "pki" / "ca-cert.pem").read_bytes()
                async with asyncio.timeout(60):
                    while (ev := await events.get()).name != FINISHED:
                        pass
                assert ev.data["status"] == "completed", ev.data
                params = await fleet.monitor("tsrc").migrate_parameters()
                assert params.get("tls-creds") == "kvmshell-tls" and params.get("tls-hostname") == b
                await dst.wait_heartbeats(2)
                check = await check_guest_memory(fleet.monitor("tdst"), WS, tmp_path)
                assert check.ok, check.summary()
                await session.aclose()
        finally:
            for d in installed:
                shutil.rmtree(d, ignore_errors=True)
    assert not processes_mentioning(f"sshd -D -e -f {tmp_path}"), "an sshd outlived its test"


async def test_plain_tcp_across_hosts_is_warned_in_the_live_view() -> None:
    from kvmshell.core.values.address import Address, SshTarget
    from kvmshell.core.commands.steer import live_lines
    from kvmshell.core.migration.live.endpoints import Notices, warnings_for
    from kvmshell.core.migration.live.job import MigrationJob
    from kvmshell.core.values.models import MigrationInfo, MigrationStatus
    from kvmshell.core.hosts.pool import HostPool
    async with HostPool() as pool, Fleet(hosts=pool) as fleet:
        fleet.add("here", Address.unix("qmp", "/run/here.qmp"))
        fleet.add("there", Address(Address.unix("qmp", "/run/there.qmp").protocol,
                                   Address.unix("qmp", "/run/there.qmp").kind, "/run/there.qmp",
                                   ssh=SshTarget("192.0.2.7", "root", 22)))
        fleet.add("open", Address.tcp("qmp", "0.0.0.0", 4444))
        [plain] = warnings_for(fleet, "here", "there", "tcp:192.0.2.7:5000", encrypted=False)
        assert "crosses hosts in plain TCP" in plain and "--tls DIR" in plain
        assert warnings_for(fleet, "here", "there", "tcp:192.0.2.7:5000", encrypted=True) == []
        assert warnings_for(fleet, "here", "there", "unix:/tmp/tunnel.sock", encrypted=False) == []
        [exposed] = warnings_for(fleet, "open", "here", None, encrypted=False)
        assert exposed.startswith("open: its QMP monitor listens on TCP 0.0.0.0:4444")
        # the live view of a job with these warnings (no monitor needed: the view reads only these)
        job = MigrationJob.__new__(MigrationJob)
        job.stages, job.prediction, job.decisions, job.outcome = [Notices([plain])], None, [], None
        job.sampler = type("NoSamples", (), {"ring": type("Ring", (), {"last": None})()})()
        rows = live_lines(MigrationInfo(MigrationStatus.ACTIVE), job)
        assert ("warning", plain) in rows, rows


@pytest.mark.qemu
async def test_tls_authz_admits_only_the_source_hosts_certificate(lab: Lab, tmp_path: Path) -> None:
    from kvmshell.core.migration.tls import client_identity
    [host] = init_ca(tmp_path / "pki", ["localhost"])
    assert client_identity(host) == "CN=localhost"
    # a destination that admits someone else: the handshake is refused, the source runs on
    wrong = TlsSetup(str(host), str(host), "localhost", authz="CN=another-host")
    src, dst, fleet, job = await _migrate(lab, tmp_path, wrong)
    async with fleet:
        await job.prepare()
        assert (await fleet.monitor("dst").migrate_parameters()).get("tls-authz") == "kvmshell-tls-authz"
        await fails_and_the_source_runs_on(job, tmp_path)


@pytest.mark.qemu
async def test_migrate_with_tls_authz_from_the_shell_language(lab: Lab, tmp_path: Path) -> None:
    from kvmshell.core.commands.registry import default_registry
    from kvmshell.core.migration.live.job import FINISHED
    from kvmshell.core.values.models import Event
    from kvmshell.core.commands.session import Session
    src, dst, fleet, _ = await _migrate(lab, tmp_path, None)
    events: asyncio.Queue[Event] = asyncio.Queue()
    fleet.subscribe(events.put_nowait)
    init_ca(tmp_path / "pki", ["localhost"])
    async with fleet:
        session = Session(fleet, default_registry())
        [o] = await session.run_line("@src migrate --to dst --tls-authz")
        assert not o.ok and "--tls-authz goes with --tls DIR" in (o.error or ""), o.error
        [o] = await session.run_line(f"@src migrate --to dst --tls {tmp_path}/pki --tls-authz")
        assert o.ok, o.error
        async with asyncio.timeout(60):
            while (ev := await events.get()).name != FINISHED:
                pass
        assert ev.data["status"] == "completed", ev.data
        assert (await fleet.monitor("dst").migrate_parameters()).get("tls-authz") == "kvmshell-tls-authz"
        await dst.wait_heartbeats(2)
        check = await check_guest_memory(fleet.monitor("dst"), WS, tmp_path)
        assert check.ok, check.summary()
        await session.aclose()


@pytest.mark.qemu
async def test_a_plain_tcp_destination_refuses_a_tls_stream(lab: Lab, tmp_path: Path) -> None:
    """The proof that the stream is encrypted: a destination without TLS cannot read it."""
    from kvmshell.core.migration.tls import disable, enable
    [host] = init_ca(tmp_path / "pki", ["localhost"])
    src, dst, fleet, job = await _migrate(lab, tmp_path, None)          # the destination: plain TCP
    async with fleet:
        mon = fleet.monitor("src")
        await enable(mon, str(host), server=False, hostname="localhost")
        await job.prepare()
        await fails_and_the_source_runs_on(job, tmp_path)
        await disable(mon)
        assert (await mon.migrate_parameters()).get("tls-creds") == ""
