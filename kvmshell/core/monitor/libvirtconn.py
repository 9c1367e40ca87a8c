"""libvirt's binding and connections: loading the binding (with libvirt's event loop), opening a
connection, finding and listing domains, what a destination daemon has, and ``LibvirtDaemon``, one
daemon as a static migration uses it. The monitor of a libvirt guest is in ``libvirt.py``; these two
modules are the only ones that touch the binding.

The binding (PyPI ``libvirt-python``, the extra ``kvmshell[libvirt]``) is imported lazily: kvmshell works
without it, and a ``libvirt:`` address then says what to install.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from kvmshell.core.hosts.ssh.libvirt_uri import host_key_failure
from kvmshell.core.values.address import Address
from kvmshell.errors import CommandFailed, ConnectFailed

INSTALL = ("the Python binding of libvirt is not installed: pip install 'kvmshell[libvirt]' (it builds against "
           "libvirt's headers: apt-get install libvirt-dev pkg-config gcc), or run `make deps` as root")
_STATES = ("no state", "running", "blocked", "paused", "shutting down", "shut off", "crashed", "suspended (pm)")
_modules: tuple[ModuleType, ModuleType] | None = None
_loop_lock = threading.Lock()


def binding() -> tuple[ModuleType, ModuleType]:
    """``(libvirt, libvirt_qemu)`` with libvirt's event loop running; ConnectFailed saying what to
    install when the binding is missing."""
    global _modules
    with _loop_lock:
        if _modules is None:
            try:
                import libvirt
                import libvirt_qemu
            except ImportError:
                raise ConnectFailed(INSTALL) from None
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors are raised, not printed
            libvirt.virEventRegisterDefaultImpl()      # before any connection opens

            def run() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()
            threading.Thread(target=run, name="libvirt-events", daemon=True).start()
            _modules = (libvirt, libvirt_qemu)
        return _modules


def default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


def state_name(state: int) -> str:
    return _STATES[state] if 0 <= state < len(_STATES) else f"state {state}"


def open_connection(uri: str | None) -> Any:
    """A read-write ``virConnect`` (blocking: call it in a thread); ConnectFailed with the URI and
    libvirt's reason."""
    libvirt, _ = binding()
    uri = uri or default_uri()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        reason = e.get_error_message()
        raise ConnectFailed(host_key_failure(uri, reason) or f"libvirt {uri}: {reason}") from None


def lookup_domain(conn: Any, name: str) -> Any:
    """The domain called ``name``; ConnectFailed listing those that exist on that connection."""
    libvirt, _ = binding()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise ConnectFailed(f"libvirt {conn.getURI()}: {e.get_error_message()}") from None
    names = sorted(d.name() for d in conn.listAllDomains())
    raise ConnectFailed(f"no libvirt domain {name!r} on {conn.getURI()} (domains there: "
                        f"{', '.join(names) or 'none'})")


def list_domains(uri: str | None) -> list[dict[str, Any]]:
    """Every domain on the connection: name, state, UUID, persistent (blocking)."""
    conn = open_connection(uri)
    try:
        rows = []
        for d in conn.listAllDomains():
            state, _ = d.state()
            rows.append({"name": d.name(), "state": state_name(state), "uuid": d.UUIDString(),
                         "persistent": bool(d.isPersistent()), "address": str(Address.libvirt(d.name(), uri))})
        return sorted(rows, key=lambda r: r["name"])
    finally:
        conn.close()


def host_uuid(conn: Any) -> str:
    """The host UUID libvirt tells two hosts apart by (its capabilities' <host><uuid>)."""
    from xml.etree import ElementTree
    return ElementTree.fromstring(conn.getCapabilities()).findtext("host/uuid") or ""


def destination_facts(uri: str, name: str) -> dict[str, Any]:
    """Whether the daemon at ``uri`` has a domain ``name`` already, and its host UUID (blocking);
    ConnectFailed with the URI and libvirt's reason."""
    libvirt, _ = binding()
    conn = open_connection(uri)
    try:
        try:
            conn.lookupByName(name)
            has = True
        except libvirt.libvirtError:
            has = False
        return {"has_domain": has, "host_uuid": host_uuid(conn)}
    finally:
        conn.close()


def describe_domain(uri: str | None, name: str) -> str:
    """Where libvirt has the domain ``name`` on ``uri``, as `virsh list --all` would say it (blocking)."""
    libvirt, _ = binding()
    try:
        conn = open_connection(uri)
    except ConnectFailed as e:
        return f"unknown ({e.message})"
    try:
        dom = conn.lookupByName(name)
        state, _ = dom.state()
        return f"{state_name(state)}, {'persistent' if dom.isPersistent() else 'transient'}"
    except libvirt.libvirtError:
        return "no such domain"
    finally:
        conn.close()


class LibvirtDaemon:
    """One daemon as a static migration uses it (libvirtsave): its own connection, blocking calls (run
    them in a thread); libvirt's failures raise CommandFailed with the call, the URI and libvirt's reason."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri or default_uri()
        self.conn = open_connection(uri)

    def _do(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        libvirt, _ = binding()
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise CommandFailed(f"{what} ({self.uri}): libvirt: {e.get_error_message()}") from None

    def facts(self, name: str) -> dict[str, Any]:
        """The domain's state, persistence, memory, its XML as it runs and as libvirt would define it
        elsewhere (inactive; secure and migratable), and the host's UUID."""
        libvirt, _ = binding()
        dom = lookup_domain(self.conn, name)
        state, _ = self._do("state", dom.state)
        live = libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE
        return {"state": state, "running": state == libvirt.VIR_DOMAIN_RUNNING,
                "active": state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED),
                "persistent": bool(dom.isPersistent()), "memory": int(dom.maxMemory()) << 10,
                "xml": self._do("XMLDesc", dom.XMLDesc, live),
                "inactive_xml": self._do("XMLDesc", dom.XMLDesc, live | libvirt.VIR_DOMAIN_XML_INACTIVE),
                "host_uuid": host_uuid(self.conn)}

    def has_domain(self, name: str) -> bool:
        libvirt, _ = binding()
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError:
            return False

    def save(self, name: str, path: str) -> None:
        """virDomainSaveFlags: the domain's memory and device state to ``path``; libvirt stops it."""
        self._do(f"saving {name} to {path}", lookup_domain(self.conn, name).saveFlags, path, None, 0)

    def image_xml(self, path: str) -> str:
        """The domain XML the save image at ``path`` holds (virDomainSaveImageGetXMLDesc)."""
        libvirt, _ = binding()
        return str(self._do(f"reading the XML of {path}", self.conn.saveImageGetXMLDesc, path,
                            libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE))

    def restore(self, path: str, xml: str | None = None, paused: bool = False) -> None:
        """virDomainRestoreFlags from ``path`` (``xml``: the image's XML with the paths changed); the
        domain runs again (or stays paused) as it was saved, paused with ``paused``."""
        libvirt, _ = binding()
        self._do(f"restoring from {path}", self.conn.restoreFlags, path, xml,
                 libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0)

    def define(self, xml: str) -> None:
        self._do("defining the domain", self.conn.defineXML, xml)

    def remove(self, name: str) -> None:
        """Destroy the domain if it runs, undefine it if it is defined."""
        dom = lookup_domain(self.conn, name)
        persistent = bool(self._do("isPersistent", dom.isPersistent))
        if self._do("isActive", dom.isActive):
            self._do(f"destroying {name}", dom.destroy)
        if persistent:
            self._do(f"undefining {name}", dom.undefine)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:           # the daemon may be gone already
            pass
