"""Static migration of a libvirt guest (libvirt's save image, the disks, restored by the other host's
libvirt) between two test hosts, each with its own sshd and its own libvirtd; and libvirt over SSH.

The hosts are those of the direct static tests (``SshTestbed``: network namespaces ``a`` and ``b``,
a real sshd in each, reached over their uplinks); a private ``Libvirtd`` runs in each namespace with
its own host UUID and hostname, so that libvirt takes them for two hosts. kvmshell reaches both
daemons over their unix sockets (in the test's tmp dir, which all namespaces share) and copies the
files to host ``b`` over SSH; the source's files are "here" (the source URI is a local socket). Each
sshd runs in its libvirtd's mount namespace (``serve_ssh``), so ``qemu+libssh://root@HOST/system``
reaches that daemon as on a real host.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.monitor.base import open_monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address
from kvmshell.lab.launcher import Lab
from kvmshell.lab.linux import PartsMissing, linux_parts
from kvmshell.lab.verify import check_guest_memory
from tests.libvirtd import (DOMAIN_TYPE, Libvirtd, domain_xml, kvmshell_view, libvirt_agrees, memory_intact,
                            libvirt_ssh_hosts, needs_libvirt, needs_netns, state)
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning, run
from tests.test_cli import env_for
from tests.test_ssh import pool_for
from tests.waiting import wait_for

try:
    import libvirt
except ImportError:
    pass

pytestmark = [needs_libvirt, needs_netns, pytest.mark.qemu, pytest.mark.timeout(180),
              pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)")]

WS = 512


@dataclass
class Hosts:
    bed: SshTestbed
    src: Libvirtd
    dst: Libvirtd
    config: Path          # kvmshell's config: [hosts.a] and [hosts.b], b with its libvirt URI
    home: Path            # HOME whose ~/.ssh/known_hosts knows both hosts
    dest: Path            # the image directory on b


@pytest.fixture
async def hosts(lab: Lab, tmp_path: Path) -> AsyncIterator[Hosts]:
    async with libvirt_ssh_hosts(lab, tmp_path) as (bed, src, dst):
        config = tmp_path / "kvmshell.toml"
        config.write_text(bed.config_toml().replace("[hosts.b]\n", f'[hosts.b]\nlibvirt = "{dst.uri}"\n'))
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "known_hosts").write_text(bed["a"].known_hosts_line() + bed["b"].known_hosts_line())
        yield Hosts(bed, src, dst, config, home, tmp_path / "dest")
    assert not processes_mentioning(f"sshd -D -e -f {tmp_path}"), "an sshd outlived its test"


async def define(lv: Libvirtd, name: str, data: Path | None = None, *, persistent: bool = True,
                 disk_name: str | None = None) -> Any:
    """A running domain of the lab's boot-sector guest (as ``Libvirtd.define``), with a raw data disk."""
    disk = await lv.lab.make_disk(disk_name or name, WS)
    serial = lv.root / f"{name}.serial"
    xml = domain_xml(name, [(str(disk), "qcow2"), *([(str(data), "raw")] if data else [])], serial)
    if persistent:
        dom = await asyncio.to_thread(lv.conn.defineXML, xml)
        await asyncio.to_thread(dom.create)
    else:
        dom = await asyncio.to_thread(lv.conn.createXML, xml, 0)
    await wait_for(lambda: asyncio.sleep(0, serial.exists() and b"KVMSHELL-GUEST" in serial.read_bytes()), bool,
                   timeout=60, what=f"{name}'s banner on its serial port")
    return dom


async def cli(h: Hosts, tmp_path: Path, guest: str, line: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "--config", str(h.config), "--guest", f"{guest}=libvirt:{h.src.uri}#{guest}",
        "-c", line, env=env_for(tmp_path) | {"HOME": str(h.home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def virsh_list(lv: Libvirtd) -> dict[str, str]:
    out = await run("virsh", "-c", lv.uri, "list", "--all")
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*(?:\d+|-)\s+(\S+)\s+(.+)$", out, re.M)}


async def test_static_migration_of_a_libvirt_guest_restores_it_on_the_other_host(hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(2 << 20))
    await define(h.src, "s1", data)
    rc, out, err = await cli(h, tmp_path, "s1", f"static-migrate s1 --to-host b --dir {h.dest}")
    assert rc == 0, err + out
    assert "s1 moved to b through libvirt's save image, attached as s1.b" in out, out
    assert "source: defined, shut off (its disks stay" in out and "libvirt: shut off, persistent" in out, out
    assert re.search(r"kvmshell: s1: copying s1\.save: ", err), err
    # libvirt's view on both hosts: defined and shut off on a, defined and running on b
    assert state(h.src, "s1") == (libvirt.VIR_DOMAIN_SHUTOFF, True)
    assert state(h.dst, "s1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    assert await virsh_list(h.src) == {"s1": "shut off"} and await virsh_list(h.dst) == {"s1": "running"}
    # the destination's definition and the running domain use the copied files; the save images are gone
    dom = h.dst.conn.lookupByName("s1")
    for xml in (dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), dom.XMLDesc(0)):
        assert f"{h.dest}/s1.qcow2" in xml and f"{h.dest}/data.raw" in xml and str(h.src.lab.workdir) not in xml
    assert sorted(p.name for p in h.dest.iterdir()) == ["boot-512-0.raw", "data.raw", "s1.qcow2"]
    assert not list(h.src.lab.workdir.glob("*.save"))
    # the disks hold what the source's hold (the overlay now backed by the copied base)
    assert (h.dest / "data.raw").read_bytes() == data.read_bytes()
    await run("qemu-img", "compare", "-U", str(h.src.lab.workdir / "s1.qcow2"), str(h.dest / "s1.qcow2"))
    assert f"backing file: {h.dest}/boot-512-0.raw" in await run("qemu-img", "info", "-U", str(h.dest / "s1.qcow2"))
    # its memory arrived whole: read on the destination through libvirt's pass-through
    mon = await open_monitor("s1", Address.libvirt("s1", h.dst.uri))
    try:
        check = await check_guest_memory(mon, WS, tmp_path)
        assert check.ok, check.summary()
    finally:
        await mon.close()


async def test_dry_run_shows_the_xml_then_the_move_carries_the_kernel_and_initrd(hosts: Hosts, tmp_path: Path) -> None:
    """A domain that boots the Linux lab guest's kernel and initrd (its disk the boot-sector guest's):
    --dry-run lists them with the disks and changes nothing; the move copies them (checked at both
    ends) and both definitions on b use the copies."""
    h = hosts
    try:
        parts = await linux_parts()
    except PartsMissing as e:
        pytest.skip(str(e))
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel, initrd = boot / "vmlinuz", boot / "initrd.cpio"
    shutil.copyfile(parts.kernel.with_name("vmlinuz"), kernel)       # the bzImage: 8 MiB, not the 64 MiB ELF
    shutil.copyfile(parts.initrd, initrd)
    disk = await h.src.lab.make_disk("d1", WS)
    serial = h.src.root / "d1.serial"
    xml = domain_xml("d1", [(str(disk), "qcow2")], serial).replace(
        "hvm</type></os>", f"hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
                           "<cmdline>console=ttyS0</cmdline></os>").replace(f"<domain type='{DOMAIN_TYPE}'>",
                                                                            "<domain type='qemu'>")  # kvm_pvm: no Linux
    dom = await asyncio.to_thread(h.src.conn.defineXML, xml)
    await asyncio.to_thread(dom.create)
    assert state(h.src, "d1") == (libvirt.VIR_DOMAIN_RUNNING, True)  # QEMU took the files (how far Linux gets in
                                                                      # 32 MiB under TCG does not matter here)
    rc, out, err = await cli(h, tmp_path, "d1", f"static-migrate d1 --to b --dir {h.dest} --dry-run")
    assert rc == 0, err + out
    first, said, *xml_lines = out.strip().splitlines()
    assert first.startswith(f"dry run: libvirt would save d1 to {h.src.lab.workdir}/d1.kvmshell.save, kvmshell would "
                            f"copy it with boot-512-0.raw (1.0 MiB), d1.qcow2 (") and first.endswith("nothing was done")
    assert re.search(r", vmlinuz \([\d.]+ MiB\), initrd\.cpio \([\d.]+ MiB\) to ", first), first
    assert said == "the XML defined on b:", out
    text = "\n".join(xml_lines)
    assert text.startswith("<domain type=\"qemu\">") and f"<source file=\"{h.dest}/d1.qcow2\"" in text, text
    assert f"<kernel>{h.dest}/vmlinuz</kernel>" in text and f"<initrd>{h.dest}/initrd.cpio</initrd>" in text, text
    assert "<name>d1</name>" in text and str(h.src.lab.workdir) not in text and str(boot) not in text, text
    assert state(h.src, "d1") == (libvirt.VIR_DOMAIN_RUNNING, True) and h.dst.domain_names() == []
    assert not h.dest.exists() and not list(h.src.lab.workdir.glob("*.save"))
    # the move: the boot files go with the disks, through the same checked copy
    rc, out, err = await cli(h, tmp_path, "d1", f"static-migrate d1 --to-host b --dir {h.dest}")
    assert rc == 0, err + out
    assert re.search(r"kvmshell: d1: copying vmlinuz: ", err) and re.search(r"kvmshell: d1: copying initrd\.cpio: ", err), err
    assert sorted(p.name for p in h.dest.iterdir()) == ["boot-512-0.raw", "d1.qcow2", "initrd.cpio", "vmlinuz"]
    assert (h.dest / "vmlinuz").read_bytes() == kernel.read_bytes()
    assert (h.dest / "initrd.cpio").read_bytes() == initrd.read_bytes()
    moved = h.dst.conn.lookupByName("d1")
    for x in (moved.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), moved.XMLDesc(0)):
        assert f"<kernel>{h.dest}/vmlinuz</kernel>" in x and f"<initrd>{h.dest}/initrd.cpio</initrd>" in x, x
        assert str(boot) not in x and str(h.src.lab.workdir) not in x
    src, dst = await libvirt_agrees(h.src, h.dst)
    assert src["d1"][0] == "shut off" and dst["d1"][0] == "running", (src, dst)


async def test_a_failure_mid_copy_restores_the_source_and_leaves_the_destination_clean(hosts: Hosts,
                                                                                       tmp_path: Path) -> None:
    h = hosts
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(16 << 20))
    await define(h.src, "f1", data)
    cut: list[str] = []

    def progress(guest: str, message: str) -> None:
        m = re.match(r"copying data\.raw: .* \((\d+) %", message)       # b's sessions killed a quarter in
        if not cut and m and 25 <= int(m.group(1)) < 100:
            cut.append(message)
            h.bed["b"].kill_sessions()

    async with Fleet(hosts=pool_for(h.bed, extra={"libvirt": f'"{h.dst.uri}"'}), backoff=(0.05, 0.5)) as fleet:
        fleet.add("f1", Address.libvirt("f1", h.src.uri))
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True, progress=progress)
        [o] = await session.run_line(f"static-migrate f1 --to-host b --dir {h.dest}")
        await session.aclose()
    assert cut and not o.ok, o.result.text() if o.result else cut
    msg = o.error or ""
    assert "\n" not in msg and msg.startswith("f1: copy failed: SSH connection to host b"), msg
    assert f"done: saved f1 to {h.src.lab.workdir}/f1.kvmshell.save (libvirt stopped it)" in msg, msg
    assert f"undone: removed the files copied to {h.dest} on host b" in msg, msg
    assert "restored f1 from its save image (running again) and removed the image" in msg, msg
    assert state(h.src, "f1") == (libvirt.VIR_DOMAIN_RUNNING, True) and h.dst.domain_names() == []
    assert await virsh_list(h.src) == {"f1": "running"} and await virsh_list(h.dst) == {}
    assert list(h.dest.iterdir()) == [] and not list(h.src.lab.workdir.glob("*.save"))
    mon = await open_monitor("f1", Address.libvirt("f1", h.src.uri))
    try:
        check = await check_guest_memory(mon, WS, tmp_path)
        assert check.ok, check.summary()
    finally:
        await mon.close()


async def test_bad_static_migrations_of_a_libvirt_guest_one_line_nothing_changed(hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    await define(h.src, "t1", persistent=False)
    await define(h.dst, "dup", disk_name="dup-on-b")
    (h.dest).mkdir()
    (h.dest / "t1.qcow2").write_bytes(b"someone's file")
    cases = [
        ("static-migrate t1 --to-host b --undefine-source -y", "kvmshell: t1: --undefine-source: t1 is a transient "
         "domain (libvirt has no definition of it to undefine): drop --undefine-source; nothing was changed"),
        ("static-migrate t1 --to-host b --tag x", "kvmshell: t1: --tag does not go with a libvirt guest (libvirt saves "
         "its state in a save image, not a snapshot); nothing was changed"),
        ("static-migrate t1 --to-host nowhere", "kvmshell: --to nowhere: not a configured host (hosts: a, b); add a "
         "[hosts.nowhere] table"),
        (f"static-migrate t1 --to-host b --dir {h.dest}", f"kvmshell: t1: {h.dest}/t1.qcow2 on host b ({h.bed['b'].ssh}): there already, "
         "and kvmshell never overwrites a file: remove it or pick another --dir"),
        (f"static-migrate t1 --to-host b --dir {h.src.lab.workdir}", f"kvmshell: t1: {h.src.lab.workdir}/t1.qcow2 "
         "would be copied onto itself: pick another --dir"),
    ]
    for line, expected in cases:
        rc, out, err = await cli(h, tmp_path, "t1", line)
        assert rc != 0, line
        [*notes, last] = err.strip().splitlines()
        assert all(n.startswith(("kvmshell: note: t1: libvirt marks the domain tainted", "kvmshell: t1: preflight: "))
                   for n in notes), err
        assert last == expected, last
    # a domain of that name on the destination already
    await define(h.src, "dup")
    rc, out, err = await cli(h, tmp_path, "dup", "static-migrate dup --to-host b")
    assert rc != 0 and err.strip().splitlines()[-1] == (f"kvmshell: dup: b ({h.dst.uri}) has a domain dup already: "
                                                        "undefine it there first; nothing was changed"), err
    assert state(h.src, "t1") == (libvirt.VIR_DOMAIN_RUNNING, False) and state(h.src, "dup")[0] == 1
    assert h.dst.domain_names() == ["dup"] and (h.dest / "t1.qcow2").read_bytes() == b"someone's file"
    assert not list(h.src.lab.workdir.glob("*.save"))


async def test_undefine_source_and_paused_and_a_transient_domain(hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    await define(h.src, "u1")
    await define(h.src, "t2", persistent=False)
    rc, out, err = await cli(h, tmp_path, "u1", f"static-migrate u1 --to-host b --dir {h.dest}/u1 --undefine-source "
                             "--paused")
    assert rc != 0 and err.strip().splitlines()[-1] == ("kvmshell: u1: --undefine-source undefines the source at the "
                                                        "end and there is no one to ask: add -y"), err
    assert state(h.src, "u1") == (libvirt.VIR_DOMAIN_RUNNING, True)
    rc, out, err = await cli(h, tmp_path, "u1", f"static-migrate u1 --to-host b --dir {h.dest}/u1 --undefine-source "
                             "--paused -y")
    assert rc == 0, err + out
    assert "source: undefined (--undefine-source; its disks stay); libvirt: no such domain" in out, out
    assert state(h.src, "u1") is None and state(h.dst, "u1") == (libvirt.VIR_DOMAIN_PAUSED, True)
    assert (h.src.lab.workdir / "u1.qcow2").exists()
    rc, out, err = await cli(h, tmp_path, "t2", f"static-migrate t2 --to-host b --dir {h.dest}/t2")
    assert rc == 0, err + out
    assert "source: gone (a transient domain: libvirt keeps no definition of it); libvirt: no such domain" in out, out
    assert state(h.src, "t2") is None and state(h.dst, "t2") == (libvirt.VIR_DOMAIN_RUNNING, False)
    assert await virsh_list(h.src) == {} and await virsh_list(h.dst) == {"u1": "paused", "t2": "running"}
    mon = await open_monitor("t2", Address.libvirt("t2", h.dst.uri))
    try:
        check = await check_guest_memory(mon, WS, tmp_path)
        assert check.ok, check.summary()
    finally:
        await mon.close()


async def test_ctrl_c_during_the_copy_restores_the_source_and_exits_130(hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(8 << 20))
    await define(h.src, "c1", data)
    for dev in h.bed._uplinks:                            # 8 MiB at 16 Mbit/s: seconds to press Ctrl-C in
        await run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "16mbit", "burst", "32kb", "latency", "50ms")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "--config", str(h.config), "--guest", f"c1=libvirt:{h.src.uri}#c1",
        "-c", f"static-migrate c1 --to-host b --dir {h.dest}", env=env_for(tmp_path) | {"HOME": str(h.home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    err = b""
    async with asyncio.timeout(120):
        while b"copying data.raw" not in err:
            line = await proc.stderr.readline()
            assert line, f"kvmshell ended before the copy: {err.decode()}"
            err += line
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.gather(proc.stderr.read(), proc.stdout.read())
        rc = await proc.wait()
    text = (err + rest).decode()
    assert rc == 130, text
    [said] = [line for line in text.splitlines() if " interrupted: " in line]
    assert said.startswith(f"kvmshell: c1: copy interrupted: Ctrl-C. done: saved c1 to {h.src.lab.workdir}/"
                           "c1.kvmshell.save (libvirt stopped it). undone: removed the files copied to"), said
    assert said.endswith("restored c1 from its save image (running again) and removed the image"), said
    assert "Traceback" not in text and text.endswith("kvmshell: interrupted\n"), text
    assert state(h.src, "c1") == (libvirt.VIR_DOMAIN_RUNNING, True) and h.dst.domain_names() == []
    assert list(h.dest.iterdir()) == [] and not list(h.src.lab.workdir.glob("*.save"))


async def test_libvirt_over_ssh_attach_and_live_migration_to_a_host_with_only_ssh(hosts: Hosts,
                                                                                  tmp_path: Path) -> None:
    """The libssh URI kvmshell builds, to success: attach a domain over it, and migrate live to a host
    whose [hosts.b] has only `ssh` (kvmshell holds both connections, the destination's over libssh)."""
    h = hosts
    await define(h.src, "r1")
    a, b = h.bed["a"], h.bed["b"]
    known = h.home / ".ssh" / "known_hosts"
    over_ssh = {x.name: f"qemu+libssh://{x.user}@{x.addr}:22/system?known_hosts={known}&known_hosts_verify=normal"
                        f"&keyfile={h.bed.client_key}" for x in (a, b)}
    config = tmp_path / "ssh-only.toml"
    config.write_text(h.bed.config_toml())
    assert "libvirt =" not in config.read_text()
    guest = f"r1=libvirt:{over_ssh['a']}#r1"

    async def cli_ssh(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvmshell.cli", "--config", str(config), *args,
            env=env_for(tmp_path) | {"HOME": str(h.home)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    rc, out, err = await cli_ssh("--guest", guest, "-c", "info status")
    assert rc == 0 and out.strip() == "VM status: running", err + out
    rc, out, err = await cli_ssh("--guest", guest, "-c", f"migrate --to-host b --address {h.bed.net.dst.ip} --unsafe "
                                 "--persistent --undefine-source")
    assert rc == 0, err + out
    assert f"kvmshell: r1: migrating r1 through libvirt to b ({over_ssh['b']})" in err, err
    assert "r1 moved live to b through libvirt, attached as r1.b" in out, out
    assert f"libvirt has r1: source {over_ssh['a']}: no such domain; destination {over_ssh['b']}: running, " \
           "persistent" in out, out
    # libvirt's view, read on each daemon's own socket, agrees with kvmshell's over SSH
    src, dst = await libvirt_agrees(h.src, h.dst)
    assert src == {} and dst["r1"][0] == "running" and dst["r1"][2] is True, (src, dst)
    assert await kvmshell_view(over_ssh["b"]) == dst and await kvmshell_view(over_ssh["a"]) == {}
    await memory_intact(h.dst, "r1", WS, tmp_path)
