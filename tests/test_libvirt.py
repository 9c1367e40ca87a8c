"""Guests that libvirt manages, with a real libvirt daemon of the tests' own (tests/libvirtd.py).

Each test that needs one starts a private ``libvirtd`` (Debian 12 ships the monolithic daemon, no
virtqemud) in its own mount namespace: tmpfs over /run, /var/lib, /var/cache and /etc/libvirt, so its
state, domain XML and monitor sockets are its own and vanish with it; its socket lives in the test's
tmp dir and is reached with ``qemu:///system?socket=...``. Why not ``qemu:///embed``: the embed driver
runs QEMU inside the one process that opened it, so the kvmshell a test starts could not reach the
same domains. libvirt resolves its compiled-in user ``libvirt-qemu`` at start even when qemu.conf says
root, so the namespace also gets /etc/passwd and /etc/group with that user mapped to root.

Domains are the lab's boot-sector guest (its qcow2 overlay) under TCG, the serial port to a file where
the guest's banner shows it booted. Every fixture destroys and undefines its domains and stops the
daemon in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from kvmshell.config import parse_config
from kvmshell.core.migration.libvirtsave import boot_files, rewrite_paths
from kvmshell.core.monitor.libvirt import TAINT
from kvmshell.core.values.address import Address, parse_address
from kvmshell.errors import ConfigError
from tests.libvirtd import Libvirtd, kvmshell, needs_libvirt
from tests.waiting import wait_for

try:
    import libvirt
except ImportError:
    pass


@pytest.mark.parametrize("text, domain, uri", [
    ("libvirt:web1", "web1", None),
    ("libvirt:qemu+ssh://root@host2/system#web1", "web1", "qemu+ssh://root@host2/system"),
    ("libvirt:qemu:///system?socket=/tmp/x/libvirt-sock#vm.2", "vm.2", "qemu:///system?socket=/tmp/x/libvirt-sock"),
])
def test_libvirt_addresses_parse_and_print_back(text: str, domain: str, uri: str | None) -> None:
    a = parse_address(text)
    assert (a.path, a.uri) == (domain, uri)
    assert str(a) == text
    assert a == Address.libvirt(domain, uri)


@pytest.mark.parametrize("text, message", [
    ("libvirt:", "expected libvirt:DOMAIN or libvirt:URI#DOMAIN"),
    ("libvirt:web 1", "expected libvirt:DOMAIN"),
    ("libvirt:host2#web1", "'host2' is not a libvirt URI"),
    ("libvirt:qemu:///system#", "expected libvirt:DOMAIN"),
])
def test_bad_libvirt_addresses_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_address(text, "--guest x")


def test_config_libvirt_keys() -> None:
    config = parse_config({
        "hosts": {"h2": {"ssh": "root@host2:2222"}, "h3": {"ssh": "h3", "libvirt": "qemu+tls://h3/system"}},
        "guests": {"a": {"libvirt": "web1"}, "b": {"libvirt": "web2", "host": "h2"},
                   "c": {"libvirt": "web3", "host": "h3"}, "d": {"libvirt": "qemu:///session#web4", "host": "h2"}}})
    assert config.guests["a"].address == Address.libvirt("web1")
    known = Path("~/.ssh/known_hosts").expanduser()      # libvirt's SSH under kvmshell's host key policy
    assert config.guests["b"].address == Address.libvirt(
        "web2", f"qemu+libssh://root@host2:2222/system?known_hosts={known}&known_hosts_verify=normal")
    assert config.guests["c"].address == Address.libvirt("web3", "qemu+tls://h3/system")
    assert config.guests["d"].address == Address.libvirt("web4", "qemu:///session")
    with pytest.raises(ConfigError, match="give 'monitor' or 'libvirt', not both"):
        parse_config({"guests": {"a": {"libvirt": "web1", "monitor": "qmp:unix:/x"}}})
    with pytest.raises(ConfigError, match=r"\[hosts.h\] libvirt: .*not a libvirt URI"):
        parse_config({"hosts": {"h": {"ssh": "h", "libvirt": "nonsense"}}})


def test_static_migration_rewrites_the_boot_files_with_the_disks() -> None:
    """<loader>, <nvram> (both forms; not its template), <kernel>, <initrd>, <dtb>: found and rewritten
    as the disks are; what is not copied stays."""
    xml = """<domain type='kvm'><name>b1</name><os><type>hvm</type>
    <loader readonly='yes' type='pflash'>/fw/CODE.fd</loader><nvram template='/fw/VARS.fd'>/nv/b1_VARS.fd</nvram>
    <kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd.img</initrd><dtb>/boot/b1.dtb</dtb><cmdline>ro</cmdline></os>
    <devices><disk type='file' device='disk'><source file='/img/b1.qcow2'/><target dev='sda'/></disk></devices>
    </domain>"""
    assert boot_files(xml) == ["/fw/CODE.fd", "/nv/b1_VARS.fd", "/boot/vmlinuz", "/boot/initrd.img", "/boot/b1.dtb"]
    dest = {p: "/d/" + p.rsplit("/", 1)[1] for p in [*boot_files(xml), "/img/b1.qcow2"]}
    out = rewrite_paths(xml, dest)
    assert boot_files(out) == ["/d/CODE.fd", "/d/b1_VARS.fd", "/d/vmlinuz", "/d/initrd.img", "/d/b1.dtb"]
    assert "<source file=\"/d/b1.qcow2\"" in out and "template=\"/fw/VARS.fd\"" in out and "<cmdline>ro<" in out
    newer = "<domain><os><nvram type='file'><source file='/nv/x.fd'/></nvram></os></domain>"
    assert boot_files(newer) == ["/nv/x.fd"] and boot_files(rewrite_paths(newer, {"/nv/x.fd": "/d/x.fd"})) == ["/d/x.fd"]


# -- a real daemon --------------------------------------------------------------------------------

@needs_libvirt
@pytest.mark.qemu
async def test_guests_and_raw_commands_through_libvirt(libvirtd: Libvirtd, tmp_path: Path) -> None:
    await libvirtd.define("lv1")
    addr = f"libvirt:{libvirtd.uri}#lv1"
    rc, out, err = await kvmshell(tmp_path, "--json", "--guest", f"lv1={addr}", "guests")
    assert rc == 0, err
    [row] = json.loads(out)
    assert (row["name"], row["address"], row["protocol"], row["status"]) == ("lv1", addr, "libvirt", "running")
    assert row["version"].count(".") == 2
    rc, out, err = await kvmshell(tmp_path, "--guest", f"lv1={addr}", "-c", "info status", "-c", "info migrate",
                                  "-c", "hmp info name", "-c", "qmp query-name")
    assert rc == 0, err
    assert err.splitlines() == [f"kvmshell: note: lv1: {TAINT}"]            # said once, on stderr
    assert "VM status: running" in out
    assert "Migration status: none" in out or "status: none" in out.lower()
    assert out.count("lv1") >= 2          # `info name` (HMP) and query-name (QMP) both answer the name
    assert '"name": "lv1"' in out
    # a guest like the others: @all reaches it beside a direct QMP guest
    other = await libvirtd.lab.start("direct", paused=True)
    rc, out, err = await kvmshell(tmp_path, "--guest", f"lv1={addr}", "--guest", other.guest_option,
                                  "-c", "@all info status")
    assert rc == 0, err
    assert re.search(r"── lv1 ──\nVM status: running\n", out) and re.search(r"── direct ──\nVM status: paused", out), out


@needs_libvirt
@pytest.mark.qemu
async def test_unknown_domain_and_dead_connection_one_line_each(libvirtd: Libvirtd, tmp_path: Path) -> None:
    await libvirtd.define("lv1", persistent=False)
    rc, out, err = await kvmshell(tmp_path, "--guest", f"x=libvirt:{libvirtd.uri}#nope", "guests")
    assert rc != 0
    assert err.strip().splitlines() == [f"kvmshell: x: no libvirt domain 'nope' on {libvirtd.uri} (domains there: lv1)"]
    bad = f"qemu:///system?socket={tmp_path}/none"
    rc, out, err = await kvmshell(tmp_path, "--guest", f"x=libvirt:{bad}#lv1", "guests")
    assert rc != 0
    [line] = err.strip().splitlines()
    assert line.startswith(f"kvmshell: x: libvirt {bad}: ") and "No such file" in line
    assert "Traceback" not in err
    assert libvirtd.domain_names() == ["lv1"]           # nothing changed in libvirt


@needs_libvirt
@pytest.mark.qemu
async def test_monitor_delivers_qemu_and_lifecycle_events(libvirtd: Libvirtd) -> None:
    from kvmshell.core.monitor.base import open_monitor
    from kvmshell.core.values.models import Event
    dom = await libvirtd.define("lv1")
    mon = await open_monitor("lv1", Address.libvirt("lv1", libvirtd.uri))
    events: list[Event] = []
    mon.subscribe(events.append)
    try:
        assert mon.notice and "tainted" in mon.notice
        assert mon.features.has_qmp("query-migrate") and mon.features.has_hmp("info")
        await mon.stop()
        await wait_for(lambda: asyncio.sleep(0, [e.name for e in events]), lambda n: "STOP" in n,
                       timeout=20, what="QEMU's STOP event through libvirt")
        assert str((await mon.status())).startswith("paused")
        await wait_for(lambda: asyncio.sleep(0, events), lambda ev: any(
            e.name == "libvirt.LIFECYCLE" and e.data["event"] == "suspended" for e in ev),
            timeout=20, what="libvirt's suspended life-cycle event")
        await asyncio.to_thread(dom.destroy)
        await asyncio.wait_for(mon.wait_closed(), 20)
        assert "stopped" in (mon.disconnect_reason or "")
        assert any(e.name == "kvmshell.DISCONNECTED" for e in events)
    finally:
        await mon.close()


@needs_libvirt
@pytest.mark.qemu
async def test_hosts_lists_domains_and_never_libvirts_monitor_socket(libvirtd: Libvirtd, tmp_path: Path) -> None:
    from kvmshell.core.hosts.processes import discover
    await libvirtd.define("lvp")
    await libvirtd.define("lvt", persistent=False)
    rc, out, err = await kvmshell(tmp_path, "--json", "--guest", f"x=libvirt:{libvirtd.uri}#lvp", "hosts")
    assert rc == 0, err
    [report] = json.loads(out)
    by_name = {d["name"]: d for d in report["domains"]}
    assert report["libvirt"] == libvirtd.uri and sorted(by_name) == ["lvp", "lvt"]
    for name, dom in by_name.items():
        assert dom["state"] == "running"
        assert dom["uuid"] == (await asyncio.to_thread(libvirtd.conn.lookupByName, name)).UUIDString()
        assert dom["address"] == f"libvirt:{libvirtd.uri}#{name}"
    assert (by_name["lvp"]["persistent"], by_name["lvt"]["persistent"]) == (True, False)
    rc, out, err = await kvmshell(tmp_path, "--guest", f"x=libvirt:{libvirtd.uri}#lvp", "hosts")
    assert rc == 0, err
    assert re.search(r"lvt\s+running\s+[0-9a-f-]{36}\s+transient\s+libvirt:", out), out
    # this machine's processes: the domains are offered through libvirt, their monitor socket never
    found = {g.name: g for g in await discover(None, None)}
    assert found["lvp"].monitors == (Address.libvirt("lvp"),) and found["lvt"].monitor == Address.libvirt("lvt")
    assert "monitor.sock" not in json.dumps([g.as_dict() for g in found.values()])


@needs_libvirt
@pytest.mark.qemu
async def test_libvirts_monitor_socket_explained_and_attach_goes_through_libvirt(libvirtd: Libvirtd,
                                                                               tmp_path: Path) -> None:
    await libvirtd.define("att1")
    sock = "/var/lib/libvirt/qemu/domain-1-att1/monitor.sock"       # libvirt's socket, as /proc shows it
    rc, out, err = await kvmshell(tmp_path, "--guest", f"a=qmp:unix:{sock}", "guests", timeout=30)
    assert rc != 0
    assert err.splitlines() == [f"kvmshell: a: qmp:unix:{sock}: libvirt holds this monitor (domain att1; QEMU "
                                "serves one client): attach it as libvirt:att1"]
    # `attach` finds the domain among this machine's processes and attaches it through libvirt's
    # default connection (here the test's daemon); when that connection fails, attach fails
    env = os.environ.copy()
    try:
        os.environ["LIBVIRT_DEFAULT_URI"] = libvirtd.uri
        rc, out, err = await kvmshell(tmp_path, "-c", "attach --match att1", "-c", "info status")
        assert rc == 0, err
        assert re.search(r"att1\s+libvirt:att1\s+connected", out), out
        assert "VM status: running" in out
        os.environ["LIBVIRT_DEFAULT_URI"] = f"qemu:///system?socket={tmp_path}/nothing"
        rc, out, err = await kvmshell(tmp_path, "-c", "attach --match att1")
        assert rc != 0
        [line] = err.splitlines()
        assert line.startswith("kvmshell: could not reach att1: libvirt qemu:///system?socket=") and "No such" in line
    finally:
        os.environ.clear()
        os.environ.update(env)


@needs_libvirt
@pytest.mark.qemu
async def test_snapshots_go_through_libvirt_and_virsh_agrees(libvirtd: Libvirtd, tmp_path: Path) -> None:
    dom = await libvirtd.define("snap1")
    g = f"snap1=libvirt:{libvirtd.uri}#snap1"

    def libvirt_list() -> list[str]:
        return sorted(s.getName() for s in dom.listAllSnapshots())
    rc, out, err = await kvmshell(tmp_path, "-y", "--guest", g, "-c", "savevm s1", "-c", "savevm s2", "-c",
                                  "loadvm s1", "-c", "info status", "-c", "info snapshots")
    assert rc == 0, err
    assert "loaded snapshot 's1'" in out and "VM status: running" in out
    assert re.search(r"^s1\s", out, re.M) and re.search(r"^s2\s", out, re.M)
    assert await asyncio.to_thread(libvirt_list) == ["s1", "s2"]
    assert (await asyncio.to_thread(dom.state))[0] == libvirt.VIR_DOMAIN_RUNNING
    rc, out, err = await kvmshell(tmp_path, "--guest", g, "-c", "delvm s2")
    assert rc == 0, err
    assert await asyncio.to_thread(libvirt_list) == ["s1"]
    # the same safety checks as for other guests: an unknown tag is one line, nothing loaded
    rc, out, err = await kvmshell(tmp_path, "-y", "--guest", g, "-c", "loadvm nope")
    assert rc != 0 and "no snapshot 'nope'" in err and "Traceback" not in err
    assert await asyncio.to_thread(libvirt_list) == ["s1"]


@needs_libvirt
@pytest.mark.qemu
async def test_what_libvirt_must_do_itself_is_refused_in_one_line(libvirtd: Libvirtd, tmp_path: Path) -> None:
    dom = await libvirtd.define("ref1")
    g = f"ref1=libvirt:{libvirtd.uri}#ref1"
    for line in ("quit", "migrate_pause"):
        rc, out, err = await kvmshell(tmp_path, "-y", "--guest", g, "-c", line)
        assert rc != 0, line
        [*_, last] = err.splitlines()
        word = line.split()[0]
        assert last == (f"kvmshell: ref1: {word}: libvirt manages this guest and kvmshell does not do that through "
                        "libvirt yet (use virsh: migrate, destroy...); nothing was changed"), err
    # the migration commands go through libvirt (tests/test_libvirt_ops.py): with no migration, nothing
    # to cancel, and a speed is kept for the next migration (libvirt's own default is untouched)
    speed = await asyncio.to_thread(dom.migrateGetMaxSpeed, 0)
    rc, out, err = await kvmshell(tmp_path, "-y", "--guest", g, "-c", "migrate_cancel", "-c", "migrate_set_speed 1g")
    assert rc == 0 and "no migration to cancel (status: none)" in out, err + out
    assert await asyncio.to_thread(dom.migrateGetMaxSpeed, 0) == speed
    # `migrate` goes through libvirt (tests/test_libvirt_migrate.py), never to a QEMU URI behind its back
    rc, out, err = await kvmshell(tmp_path, "-y", "--guest", g, "-c", "migrate tcp:127.0.0.1:1")
    assert rc != 0 and err.splitlines()[-1] == ("kvmshell: ref1: migrate: libvirt manages this guest: migrate it "
                                                "through libvirt with --to-host HOST ([hosts.HOST] libvirt = URI) or "
                                                "--to libvirt:URI; nothing was changed"), err
    assert (await asyncio.to_thread(dom.state))[0] == libvirt.VIR_DOMAIN_RUNNING
    rc, out, err = await kvmshell(tmp_path, "--json", "--guest", g, "-c", "info migrate_parameters")
    assert rc == 0, err
    assert json.loads(out)      # reading is fine: nothing changes in libvirt's back
