"""A private libvirt daemon for the tests, and two of them as two hosts (pytest plugin: conftest.py).

``Libvirtd`` starts a real ``libvirtd`` in its own mount namespace: tmpfs over /run, /var/lib,
/var/cache and /etc/libvirt, so its state, domain XML and monitor sockets are its own and vanish with
it; its socket lives in the test's tmp dir and is reached with ``qemu:///system?socket=...``; inside the
namespace /run/libvirt/libvirt-sock links to it, so an sshd started there (``serve_ssh``) takes
``qemu+libssh://root@HOST/system`` to this daemon as on a real host. Why not
``qemu:///embed``: the embed driver runs QEMU inside the one process that opened it, so the kvmshell a
test starts could not reach the same domains. libvirt resolves its compiled-in user ``libvirt-qemu``
at start even when qemu.conf says root, so the namespace also gets /etc/passwd and /etc/group with
that user mapped to root.

``two_hosts``: each test host is a network namespace of a ``TestNetwork`` (a veth pair) with a private
``libvirtd`` in it, in its own mount and UTS namespaces (hostnames ``lv-src`` and ``lv-dst``) and with
its own ``host_uuid``, so that libvirt treats them as two hosts.

Domains are the lab's boot-sector guest (its qcow2 overlay) under TCG, the serial port to a file where
the guest's banner shows it booted. Every fixture destroys and undefines its domains and stops the
daemon in ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmshell.cli.inventory import libvirt_report
from kvmshell.core.monitor.base import open_monitor
from kvmshell.config import Config, HostConfig
from kvmshell.core.values.address import Address, SshTarget
from kvmshell.lab.launcher import Lab, die_with_parent
from kvmshell.lab.netns import TestNetwork, netns_available
from tests.accel import KVM_FOR_MARKED
from kvmshell.lab.verify import check_guest_memory
from tests.sshd import SshTestbed, SshTestHost, run
from tests.waiting import wait_for

try:
    import libvirt
    HAVE_BINDING = True
except ImportError:
    HAVE_BINDING = False

LIBVIRTD = "/usr/sbin/libvirtd"
needs_libvirt = pytest.mark.skipif(
    not (HAVE_BINDING and os.path.exists(LIBVIRTD) and shutil.which("unshare") and os.geteuid() == 0),
    reason="needs root, libvirtd and the binding (make deps as root installs them: libvirt-daemon, "
           "libvirt-daemon-driver-qemu, libvirt-dev, pip kvmshell[libvirt])")

_SETUP = """set -e
cp /etc/passwd "$D/passwd"; cp /etc/group "$D/group"
echo 'libvirt-qemu:x:0:0::/var/lib/libvirt:/usr/sbin/nologin' >> "$D/passwd"
printf 'libvirt-qemu:x:0:\\nkvm:x:0:\\n' >> "$D/group"
mount --bind "$D/passwd" /etc/passwd
mount --bind "$D/group" /etc/group
if [ -n "$HOSTNAME_OF_HOST" ]; then hostname "$HOSTNAME_OF_HOST"; fi
for dir in /run /var/lib /var/cache /etc/libvirt; do mount -t tmpfs tmpfs $dir; done
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /run/sshd
ln -s "$D/sock/libvirt-sock" /run/libvirt/libvirt-sock
ln -s "$D/sock/libvirt-sock-ro" /run/libvirt/libvirt-sock-ro
cat > /etc/libvirt/qemu.conf <<EOF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
EOF
printf '%s\\n' "$QEMU_CONF_EXTRA" >> /etc/libvirt/qemu.conf
if [ -n "$QEMU_HOOK" ]; then mkdir /etc/libvirt/hooks; printf '%s\\n' "$QEMU_HOOK" > /etc/libvirt/hooks/qemu; chmod +x /etc/libvirt/hooks/qemu; fi
exec /usr/sbin/libvirtd -f "$D/libvirtd.conf"
"""


# KVM where /dev/kvm opens (tests/accel.py: also where the lab's guests run under TCG, kvm_pvm): under TCG, QEMU before 9.0 loses guest writes in pre-copy when RAM
# is a multiple of 256 KiB (core/migration/tcgdirty.py), and libvirt rounds <memory> up to whole MiB on
# x86, so no libvirt domain escapes it there. kvm_pvm has no svm: libvirt's CPU check wants it off.
DOMAIN_TYPE = "kvm" if KVM_FOR_MARKED else "qemu"


def domain_xml(name: str, disks: list[tuple[str, str]], serial: Path) -> str:
    """The XML of a domain of the lab's boot-sector guest: ``disks`` [(path, format)], sda first."""
    devices = "".join(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}' cache='unsafe'/>
      <source file='{path}'/>
      <target dev='sd{chr(ord("a") + i)}' bus='sata'/>
    </disk>""" for i, (path, fmt) in enumerate(disks))
    return f"""<domain type='{DOMAIN_TYPE}'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <cpu mode='custom'><model>qemu64</model><feature policy='disable' name='svm'/></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}
    <serial type='file'><source path='{serial}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


class Libvirtd:
    """A private libvirt daemon and the domains the test defined on it."""

    def __init__(self, root: Path, lab: Lab, *, prefix: tuple[str, ...] = (), host_uuid: str | None = None,
                 hostname: str | None = None, qemu_conf: str = "", libvirtd_conf: str = "",
                 qemu_hook: str = "") -> None:
        self.root = root
        self.lab = lab
        self.prefix = prefix            # `ip netns exec NS`: the daemon of a test host
        self.host_uuid = host_uuid      # libvirt takes two daemons with one UUID for the same host
        self.hostname = hostname        # with it, the daemon gets a UTS namespace of its own
        self.qemu_conf = qemu_conf      # lines added to the daemon's qemu.conf (TLS, ...)
        self.libvirtd_conf = libvirtd_conf  # lines added to its libvirtd.conf (listen_tcp, ...)
        self.qemu_hook = qemu_hook      # a script for /etc/libvirt/hooks/qemu (libvirt runs it as QEMUs start)
        self.uri = f"qemu:///system?socket={root}/sock/libvirt-sock"
        self.proc: asyncio.subprocess.Process | None = None
        self.conn: Any = None

    async def start(self) -> None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)     # raised, not printed too
        (self.root / "sock").mkdir(parents=True)
        (self.root / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.root}/sock"\nlisten_tls = 0\nlisten_tcp = 0\n'
            + (f'host_uuid = "{self.host_uuid}"\n' if self.host_uuid else '') + self.libvirtd_conf)
        uts = ("--uts",) if self.hostname else ()
        log = open(self.root / "libvirtd.log", "wb")
        with log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.prefix, "unshare", "--mount", *uts, "--propagation", "private", "sh", "-c", _SETUP,
                env={**os.environ, "D": str(self.root), "HOSTNAME_OF_HOST": self.hostname or "",
                     "QEMU_CONF_EXTRA": self.qemu_conf, "QEMU_HOOK": self.qemu_hook}, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent, start_new_session=True)

        async def probe() -> Any:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"libvirtd exited: {(self.root / 'libvirtd.log').read_text()[-800:]}")
            try:
                return await asyncio.to_thread(libvirt.open, self.uri)
            except libvirt.libvirtError:
                return None
        self.conn = await wait_for(probe, lambda c: c is not None, timeout=30, every=0.1, what="libvirtd answers")

    async def define(self, name: str, *, persistent: bool = True, ws_pages: int = 256) -> Any:
        """A running domain of the lab's boot-sector guest, once the guest printed its banner."""
        disk = await self.lab.make_disk(name, ws_pages)
        serial = self.root / f"{name}.serial"
        xml = domain_xml(name, [(str(disk), "qcow2")], serial)
        if persistent:
            dom = await asyncio.to_thread(self.conn.defineXML, xml)
            await asyncio.to_thread(dom.create)
        else:
            dom = await asyncio.to_thread(self.conn.createXML, xml, 0)

        async def banner() -> bool:
            return serial.exists() and b"KVMSHELL-GUEST" in serial.read_bytes()
        await wait_for(banner, bool, timeout=60, what=f"{name}'s banner on its serial port")
        return dom

    def domain_names(self) -> list[str]:
        return sorted(d.name() for d in self.conn.listAllDomains())

    async def _clear(self) -> None:
        for dom in await asyncio.to_thread(self.conn.listAllDomains):
            persistent = dom.isPersistent()        # a transient one is gone once destroyed
            if dom.isActive():
                await asyncio.to_thread(dom.destroy)
            if persistent:
                await asyncio.to_thread(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        left = await asyncio.to_thread(self.conn.listAllDomains)
        await asyncio.to_thread(self.conn.close)
        assert not left, f"domains left on the test's libvirtd: {[d.name() for d in left]}"

    async def stop(self) -> None:
        """Check that virsh and kvmshell agree on the domains (``libvirt_agrees``), destroy and undefine
        every domain (their QEMUs outlive libvirtd otherwise), stop libvirtd."""
        try:
            if self.conn is not None:
                try:
                    await libvirt_agrees(self)
                finally:
                    await self._clear()
        finally:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(20):
                        await self.proc.wait()
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()


@pytest.fixture
async def libvirtd(lab: Lab, tmp_path: Path) -> AsyncIterator[Libvirtd]:
    daemon = Libvirtd(tmp_path / "libvirtd", lab)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.stop()


async def kvmshell(tmp_path: Path, *args: str, timeout: float = 90) -> tuple[int, str, str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("KVMSHELL_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kvmshell.cli", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- addresses and config (no daemon) ------------------------------------------------------------


needs_netns = pytest.mark.skipif(netns_available() is not None, reason=f"{netns_available()}")


@dataclass
class TwoHosts:
    net: TestNetwork
    src: Libvirtd
    dst: Libvirtd

    @property
    def config(self) -> Config:
        """kvmshell's config naming the destination ``h2`` (as the TOML written under the hosts' root)."""
        return Config(hosts={"h2": HostConfig("h2", SshTarget(self.net.dst.ip, "root"), libvirt=self.dst.uri)})


@asynccontextmanager
async def two_libvirt_hosts(lab: Lab, root: Path, *, dst_hook: str = "") -> AsyncIterator[TwoHosts]:
    """Two test hosts under ``root`` (``dst_hook``: the destination's /etc/libvirt/hooks/qemu), and
    kvmshell's config there (``root``/config) naming the destination ``h2``."""
    async with TestNetwork(rate=None, prefix="kvlv") as net:
        src = Libvirtd(root / "src", lab, prefix=tuple(net.exec_prefix(net.src)), host_uuid=str(uuid.uuid4()),
                       hostname="lv-src")
        dst = Libvirtd(root / "dst", lab, prefix=tuple(net.exec_prefix(net.dst)), host_uuid=str(uuid.uuid4()),
                       hostname="lv-dst", qemu_hook=dst_hook)
        try:
            await src.start()
            await dst.start()
            config = root / "config" / "kvmshell"
            config.mkdir(parents=True)
            (config / "config.toml").write_text(f'[hosts.h2]\nssh = "root@{net.dst.ip}"\nlibvirt = "{dst.uri}"\n')
            yield TwoHosts(net, src, dst)
        finally:
            try:
                await dst.stop()
            finally:
                await src.stop()


@pytest.fixture
async def two_hosts(lab: Lab, tmp_path: Path) -> AsyncIterator[TwoHosts]:
    async with two_libvirt_hosts(lab, tmp_path) as hosts:
        yield hosts


def state(lv: Libvirtd, name: str) -> tuple[int, bool] | None:
    """(libvirt's state, persistent) of ``name`` on that daemon, None if it has no such domain."""
    try:
        dom = lv.conn.lookupByName(name)
    except libvirt.libvirtError:
        return None
    return dom.state()[0], bool(dom.isPersistent())


async def virsh_view(uri: str) -> dict[str, tuple[str, str, bool]]:
    """{name: (state, UUID, persistent)} from `virsh list --all` and `virsh dominfo` on ``uri``."""
    listed = await run("virsh", "-c", uri, "list", "--all")
    view = {}
    for m in re.finditer(r"^\s*(?:\d+|-)\s+(\S+)\s+(.+?)\s*$", listed, re.M):
        info = dict(re.findall(r"^([^:\n]+):\s*(.*?)\s*$", await run("virsh", "-c", uri, "dominfo", m[1]), re.M))
        view[m[1]] = (m[2], info["UUID"], info["Persistent"] == "yes")
    return view


async def kvmshell_view(uri: str) -> dict[str, tuple[str, str, bool]]:
    """The same, as `kvmshell hosts` reads it (its libvirt report of that connection)."""
    report = await libvirt_report(uri)
    assert report["reachable"], report["reason"]
    return {d["name"]: (d["state"], d["uuid"], d["persistent"]) for d in report["domains"]}


async def libvirt_agrees(*daemons: Libvirtd) -> list[dict[str, tuple[str, str, bool]]]:
    """`virsh list --all`/`dominfo` on each daemon and kvmshell's `hosts` agree (name, state, UUID,
    persistent): each daemon's view, after up to 10 s for a domain still changing state. Every libvirt
    test checks this: ``Libvirtd.stop`` calls it first."""
    views = []
    for lv in daemons:
        async def both() -> tuple[dict[str, tuple[str, str, bool]], dict[str, tuple[str, str, bool]]]:
            return await virsh_view(lv.uri), await kvmshell_view(lv.uri)
        virsh, _ = await wait_for(both, lambda v: v[0] == v[1], timeout=10, every=0.2,
                                  what=f"virsh and kvmshell agree on {lv.uri}")
        views.append(virsh)
    return views


@asynccontextmanager
async def libvirt_ssh_hosts(lab: Lab, root: Path) -> AsyncIterator[tuple[SshTestbed, Libvirtd, Libvirtd]]:
    """Two SSH test hosts a and b under ``root`` (both trusted), each with its own libvirt daemon that
    its sshd serves (``serve_ssh``): (the testbed, a's daemon, b's daemon)."""
    async with SshTestbed(root / "ssh", ("a", "b")) as bed:
        bed.trust()
        src = Libvirtd(root / "lv-a", lab, prefix=bed["a"].prefix, host_uuid=str(uuid.uuid4()), hostname="lv-a")
        dst = Libvirtd(root / "lv-b", lab, prefix=bed["b"].prefix, host_uuid=str(uuid.uuid4()), hostname="lv-b")
        try:
            await src.start()
            await dst.start()
            await serve_ssh(bed["a"], src)
            await serve_ssh(bed["b"], dst)
            yield bed, src, dst
        finally:
            try:
                await dst.stop()
            finally:
                await src.stop()


async def serve_ssh(host: SshTestHost, lv: Libvirtd) -> None:
    """Restart the test host's sshd in the mount and UTS namespaces of ``lv`` (which runs in that host's
    network namespace): an SSH session's ``qemu:///system`` is then that daemon, as on a real host."""
    assert lv.proc is not None
    await host.stop()
    host.enter = ("nsenter", "-t", str(lv.proc.pid), "--mount", "--uts")
    await host.start()


async def memory_intact(lv: Libvirtd, name: str, ws_pages: int, workdir: Path) -> None:
    """The domain's working set checked on that daemon through libvirt's pass-through (AssertionError
    with the check's summary when a page is wrong)."""
    mon = await open_monitor(name, Address.libvirt(name, lv.uri))
    try:
        check = await check_guest_memory(mon, ws_pages, workdir)
        assert check.ok, check.summary()
    finally:
        await mon.close()
