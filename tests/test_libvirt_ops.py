"""The migration commands and the faces during a libvirt migration, between two test hosts
(``two_hosts`` of tests/libvirtd.py: a private libvirtd in each network namespace).

`migrate_set_*` before a migration become libvirt's flags and typed parameters at its start, during
it libvirt's calls (migrateSetMaxSpeed, migrateSetMaxDowntime); what libvirt has no call for is refused
in one line. The TUI runs `migrate --to-host` while `info migrate`, `info migrate --watch`, `guests`,
completion and the pane show it; `migrate_cancel` (the TUI's cancel key) aborts libvirt's job.
The migration lasts: its speed is capped at 2 MiB/s (libvirt's own cap) over a 16 MiB working set.
"""

from __future__ import annotations

import asyncio
import io
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from textual.message import Message

from kvmshell.cli.lines import _watch_plain
from kvmshell.config import parse_config
from kvmshell.core.hosts.pool import HostPool
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.results import Outcome
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.history import History
from kvmshell.tui.messages import CommandFinished
from kvmshell.tui.screens import ConfirmScreen
from kvmshell.tui.source import SessionSource
from kvmshell.tui.views import Badge
from kvmshell.errors import ConfigError
from tests.libvirtd import DOMAIN_TYPE, Libvirtd, TwoHosts, kvmshell, memory_intact, needs_libvirt, needs_netns, state
from tests.sshd import HAVE_SSHD, SshTestbed
from tests.test_tui import screen_text, until
from tests.waiting import wait_for

try:
    import libvirt
except ImportError:
    pass


async def one(session: Session, line: str) -> Outcome:
    [o] = await session.run_line(line)
    return o


async def ok(session: Session, line: str) -> str:
    o = await one(session, line)
    assert o.ok, f"{line}: {o.error}"
    return o.result.text() if o.result is not None else ""


async def refused(session: Session, line: str) -> str:
    o = await one(session, line)
    assert not o.ok and o.error and "\n" not in o.error, f"{line}: {o}"
    return o.error


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_commands_faces_and_cancel_during_a_libvirt_migration(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    dom = await h.src.define("w1", ws_pages=4096)
    config = h.config
    messages: list[Message] = []
    async with Fleet() as fleet:
        fleet.add("w1", Address.libvirt("w1", h.src.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), config, current="w1")
        try:
            # before: what the next libvirt migration starts with; what libvirt cannot take is refused
            assert await ok(session, "migrate_set_capability auto-converge on") == "auto-converge on"
            await ok(session, "migrate_set_speed 2M")
            assert await ok(session, "migrate_set_downtime 0.4") == "downtime-limit = 400 ms"
            assert "auto-converge: on" in (await ok(session, "info migrate_capabilities")).replace("  ", " ")
            assert (await refused(session, "migrate_set_capability zero-blocks on")).startswith(
                "libvirt has no migration flag for the capability zero-blocks")
            assert (await refused(session, "migrate_set_parameter multifd-channels 4")).startswith(
                "libvirt has no call to set multifd-channels at the start of a migration")
            await session.data.refresh_all()
            source = SessionSource(session, history=History.load(tmp_path / "history"))
            app = KvmshellApp(source)

            def row() -> Any:
                return next(r for r in source.rows() if r.name == "w1")

            def finished(prefix: str) -> list[CommandFinished]:
                return [m for m in messages if isinstance(m, CommandFinished) and m.line.startswith(prefix)]

            async with app.run_test(size=(120, 30), message_hook=messages.append) as pilot:
                line = f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe --strategy precopy --bandwidth 2M"
                await pilot.press("slash", *line, "enter")
                try:
                    await until(pilot, lambda: row().badge is Badge.ACTIVE, "the row shows the migration", timeout=60)
                except AssertionError:
                    raise AssertionError(f"{row()} {[(m.line, m.outcomes) for m in finished('')]} "
                                         f"{dom.jobStats()}") from None
                # libvirt took what was set before, at the start
                await wait_for(lambda: asyncio.to_thread(dom.migrateGetMaxDowntime, 0), lambda ms: ms == 400,
                               what="libvirt's max downtime from migrate_set_downtime")
                # during: libvirt's calls; the rest refused in one line, libvirt untouched
                await ok(session, "migrate_set_speed 3M")
                assert dom.migrateGetMaxSpeed(0) == 3
                assert await ok(session, "migrate_set_parameter max-bandwidth 2M") == "max-bandwidth = 2097152"
                assert dom.migrateGetMaxSpeed(0) == 2
                await ok(session, "migrate_set_downtime 0.6")
                assert dom.migrateGetMaxDowntime(0) == 600
                assert (await refused(session, "migrate_set_parameter xbzrle-cache-size 1M")).startswith(
                    "libvirt has no call to set xbzrle-cache-size during a migration")
                assert (await refused(session, "migrate_set_capability auto-converge on")).startswith(
                    "libvirt takes auto-converge only as a flag of the start of a migration")
                # the faces: info migrate, its watch, guests, completion, the pane
                text = await ok(session, "info migrate")
                assert "Migration status: active" in text and "transferred ram" in text, text
                assert "progress" in text and "model" in text, text
                watched = io.StringIO()
                stop = asyncio.Event()
                watch = asyncio.create_task(_watch_plain(session, "info migrate", 0.5, "w1", watched, stop))
                guests = await ok(session, "guests")
                assert "w1" in guests and "libvirt:" in guests, guests
                engine = CompletionEngine(session)
                assert "@w1" in [c.text for c in engine.complete("@")]
                assert [c.text for c in engine.complete("migrate_set_parameter max-b")] == ["max-bandwidth"]
                assert "migrate_cancel" in [c.text for c in engine.complete("migrate_c")]
                pane = app.pane
                await until(pilot, lambda: pane.view and pane.view.migration and
                            pane.view.migration.status == "active", "the pane shows it")
                assert "w1" in screen_text(app)
                # cancel from the TUI: libvirt's job is aborted, kvmshell's job ends cancelled
                await pilot.press("escape", "c")
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
                await pilot.press("y")
                await until(pilot, lambda: finished("@w1 migrate_cancel"), "migrate_cancel")
                assert finished("@w1 migrate_cancel")[0].ok
                await until(pilot, lambda: finished("migrate --to-host"), "the migrate command ends", timeout=60)
                [done] = finished("migrate --to-host")
                [o] = done.outcomes
                assert not o.ok and o.error and "migration through libvirt cancelled" in o.error, o.error
                assert f"libvirt has w1: source {h.src.uri}: running, persistent; destination {h.dst.uri}: " \
                       "no such domain" in o.error, o.error
                await until(pilot, lambda: row().badge is Badge.CANCELLED, "the row says cancelled")
                async with asyncio.timeout(30):
                    await watch
                assert "Migration status: active" in watched.getvalue(), watched.getvalue()
                assert watched.getvalue().rstrip().count("--- ") >= 2
        finally:
            await session.aclose()
    # libvirt's view: the source runs on, persistent; nothing on the destination
    assert state(h.src, "w1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    await wait_for(lambda: asyncio.to_thread(state, h.dst, "w1"), lambda s: s is None, timeout=30,
                   what="the destination's domain gone")


# -- libvirt over SSH: kvmshell's known_hosts policy ---------------------------------------------

def test_built_libvirt_uris_carry_kvmshells_known_hosts_policy(tmp_path: Path) -> None:
    """`[guests.X] libvirt` with `host`, and `[hosts.X]` without `libvirt`: libvirt's libssh transport
    with kvmshell's known_hosts file, strict unless accept_new_host_key, the identity file as keyfile."""
    config = parse_config(tomllib.loads(
        '[hosts.h1]\nssh = "root@10.0.0.1:2222"\nidentity_file = "/k/id"\n'
        '[hosts.h2]\nssh = "h2.example"\naccept_new_host_key = true\n'
        '[hosts.h3]\nssh = "h3"\njump = "h1"\n'
        '[guests.web]\nlibvirt = "web"\nhost = "h1"\n'))
    known = str(Path("~/.ssh/known_hosts").expanduser())
    assert config.guests["web"].address.uri == (f"qemu+libssh://root@10.0.0.1:2222/system?known_hosts={known}"
                                                "&known_hosts_verify=normal&keyfile=/k/id")
    assert config.hosts["h2"].libvirt_uri("/kh") == "qemu+libssh://h2.example/system?known_hosts=/kh" \
                                                    "&known_hosts_verify=auto"
    with pytest.raises(ConfigError, match=r"^\[hosts.h3\] jump: libvirt's SSH transport cannot go through"):
        config.hosts["h3"].libvirt_uri()


async def dry_run_to(libvirtd: Libvirtd, bed: SshTestbed, extra: dict[str, str] | None = None) -> tuple[str, Outcome]:
    """`migrate --to-host a --dry-run` of the domain k1 (checks the destination's daemon, starts nothing):
    the URI kvmshell built for host a, and the outcome."""
    config = parse_config(tomllib.loads(bed.config_toml(extra=extra)))
    pool = HostPool.from_config(config, known_hosts=bed.known_hosts, ssh_config=bed.ssh_config,
                                connect_timeout=5.0, keepalive=None)
    async with Fleet(hosts=pool) as fleet:
        fleet.add("k1", Address.libvirt("k1", libvirtd.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), config, current="k1")
        try:
            return pool.libvirt_uri("a"), await one(session, "migrate --to-host a --unsafe --dry-run")
        finally:
            await session.aclose()


@needs_libvirt
@pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)")
@pytest.mark.qemu
async def test_libvirt_over_ssh_checks_the_host_key_against_kvmshells_known_hosts(libvirtd: Libvirtd,
                                                                                 tmp_path: Path) -> None:
    await libvirtd.define("k1")
    async with SshTestbed(tmp_path / "ssh", ("a",)) as bed:
        a, known = bed["a"], bed.known_hosts
        # known_hosts has no key for a: refused in one line, naming the host and what to do
        uri, o = await dry_run_to(libvirtd, bed)
        assert f"known_hosts={known}&known_hosts_verify=normal&keyfile={bed.client_key}" in uri
        assert not o.ok and o.error == (
            f"libvirt {uri}: the host key of {a.known_hosts_pattern} is not in {known} (libvirt checks it there and "
            f"has no one to ask); check the host's fingerprint (`ssh-keyscan {a.addr} | ssh-keygen -lf -`), then add "
            f"it with `ssh-keyscan {a.addr} >> {known}`, or set accept_new_host_key = true in the host's "
            "[hosts.NAME] table"), o.error
        assert known.read_text() == ""
        # accept_new_host_key: libvirt accepts the new key once and records it in the same file
        uri, o = await dry_run_to(libvirtd, bed, {"accept_new_host_key": "true"})
        assert "known_hosts_verify=auto" in uri
        assert a.known_hosts_line().split()[2] in known.read_text()
        # past the key and the login (the identity file): what fails now is libvirt's end on the test host,
        # which has no daemon at libvirt's default socket
        assert o.ok or "Remote command terminated" in (o.error or ""), o.error
        # a changed key is refused, accept_new_host_key or not
        alg, b64 = Path(f"{bed.stranger_key}.pub").read_text().split()[:2]
        known.write_text(f"{a.known_hosts_pattern} {alg} {b64}\n")
        for extra in (None, {"accept_new_host_key": "true"}):
            uri, o = await dry_run_to(libvirtd, bed, extra)
            assert not o.ok and o.error and o.error.startswith(
                f"libvirt {uri}: HOST KEY CHANGED: the server's key is not the one {known} has for "
                f"{a.known_hosts_pattern}"), o.error
    assert state(libvirtd, "k1") == (libvirt.VIR_DOMAIN_RUNNING, True)


# -- peer-to-peer ---------------------------------------------------------------------------------

@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_p2p_needs_a_uri_the_source_daemon_reaches(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """With --p2p the source's libvirtd opens the destination's URI itself. There, a URI without a
    transport or host (qemu:///system?socket=...) opens that daemon's own driver ("Attempt to migrate guest
    to the same host"): refused before anything starts. qemu+unix with the socket works (both test hosts
    share the filesystem); QEMU's stream needs --address (the test hosts' names resolve nowhere: without
    it libvirt waits on DNS time-outs before it fails - the "hang" seen earlier)."""
    h = two_hosts
    await h.src.define("q1", ws_pages=512)
    g = f"q1=libvirt:{h.src.uri}#q1"
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to-host h2 --address {h.net.dst.ip} "
                                  "--unsafe --p2p")
    assert rc != 0
    assert err.strip().splitlines()[-1] == (
        f"kvmshell: q1: --p2p: the source's libvirtd opens {h.dst.uri} itself, and there a URI without a transport "
        "or host names that daemon: give one it reaches (qemu+unix:///system?socket=PATH on this machine, "
        "qemu+tcp://HOST/system, qemu+ssh://HOST/system), or drop --p2p; nothing was changed"), err
    assert state(h.src, "q1") == (libvirt.VIR_DOMAIN_RUNNING, True) and h.dst.domain_names() == []
    unix = h.dst.uri.replace("qemu:", "qemu+unix:", 1)
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", f"migrate --to libvirt:{unix} --address "
                                  f"{h.net.dst.ip} --unsafe --p2p --persistent --undefine-source", timeout=120)
    assert rc == 0, err + out
    assert f"q1 moved live to {unix} through libvirt" in out and "stays paused" not in out + err, out + err
    assert re.search(r"completed in [\d.]+ s, downtime \d+ ms, \d+ MB sent", out), out
    assert "peer-to-peer" in err
    assert state(h.src, "q1") is None
    assert state(h.dst, "q1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    if DOMAIN_TYPE == "kvm":     # under TCG, QEMU 7.2 loses pre-copy writes of every libvirt domain
        await memory_intact(h.dst, "q1", 512, tmp_path)     # (tests/libvirtd.py)


# -- postcopy, and another kvmshell looking on ----------------------------------------------------

@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_migrate_start_postcopy_through_libvirt_and_info_migrate_from_another_kvmshell(
        two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    await h.src.define("y1", ws_pages=4096)
    config = h.config
    async with Fleet() as fleet:
        fleet.add("y1", Address.libvirt("y1", h.src.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), config, current="y1", assume_yes=True)
        try:
            mon = fleet.monitor("y1")
            migrating = asyncio.create_task(one(session, f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe "
                                                         "--strategy auto --allow-postcopy --bandwidth 2M"))
            await wait_for(mon.migration, lambda i: i.status.value == "active" and i.ram and i.ram.transferred > 0,
                           timeout=60, what="libvirt's migration under way")
            # another kvmshell sees libvirt's job (its statistics: nothing goes through QEMU's monitor)
            rc, out, err = await kvmshell(tmp_path, "--guest", f"y1=libvirt:{h.src.uri}#y1", "-c", "info migrate")
            assert rc == 0 and "Migration status: active" in out and "transferred ram" in out, err + out
            assert await ok(session, "migrate_start_postcopy") == "switched to postcopy"
            await wait_for(mon.migration, lambda i: i.status.is_postcopy or i.status.value == "completed",
                           timeout=60, what="postcopy")
            o = await migrating
            assert o.ok, o.error
            assert "y1 moved live to h2 through libvirt" in o.result.text()
        finally:
            await session.aclose()
    assert state(h.src, "y1") == (libvirt.VIR_DOMAIN_SHUTOFF, True)
    assert state(h.dst, "y1") == (libvirt.VIR_DOMAIN_RUNNING, False)
    await memory_intact(h.dst, "y1", 4096, tmp_path)


@needs_libvirt
@needs_netns
@pytest.mark.qemu
async def test_migrate_cancel_from_another_kvmshell_aborts_libvirts_job(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """A second kvmshell (or `virsh domjobabort`) aborts the libvirt job this one follows: this one's job
    ends cancelled too, not failed, and the source runs on."""
    h = two_hosts
    await h.src.define("z1", ws_pages=4096)
    config = h.config
    async with Fleet() as fleet:
        fleet.add("z1", Address.libvirt("z1", h.src.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), config, current="z1")
        try:
            mon = fleet.monitor("z1")
            migrating = asyncio.create_task(one(session, f"migrate --to-host h2 --address {h.net.dst.ip} --unsafe "
                                                         "--strategy precopy --bandwidth 2M"))
            await wait_for(mon.migration, lambda i: i.status.value == "active" and i.ram and i.ram.transferred > 0,
                           timeout=60, what="libvirt's migration under way")
            rc, out, err = await kvmshell(tmp_path, "--guest", f"z1=libvirt:{h.src.uri}#z1", "-c", "migrate_cancel")
            assert rc == 0 and out.strip() == "migration cancelled; the guest keeps running here", err + out
            o = await migrating
            assert not o.ok and o.error and o.error.startswith("migration through libvirt cancelled"), o.error
            assert session.migrations["z1"].outcome.status == "cancelled"
        finally:
            await session.aclose()
    assert state(h.src, "z1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    await wait_for(lambda: asyncio.to_thread(state, h.dst, "z1"), lambda s: s is None, timeout=30,
                   what="the destination's domain gone")
