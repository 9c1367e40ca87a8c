"""libvirt's SSH under kvmshell's host key policy: what a host key failure of libvirt's ``libssh``
transport means, for a URI built by ``config.HostConfig.libvirt_uri`` (``known_hosts=`` kvmshell's file,
``known_hosts_verify=normal``), in kvmshell's words (those of ``connection``'s own refusals)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

_UNKNOWN = ("Can't verify the session host key", "was not found")
_CHANGED = ("HOST KEY VERIFICATION FAILED", "differs from stored identity")


def host_key_failure(uri: str, reason: str) -> str | None:
    """One line for libvirt's ``reason`` when it is a host key refusal on ``uri``; None otherwise."""
    parts = urlsplit(uri)
    if not parts.scheme.endswith("+libssh") or not parts.hostname:
        return None
    known = parse_qs(parts.query).get("known_hosts", ["~/.ssh/known_hosts"])[0]
    host, port = parts.hostname, parts.port
    pattern = host if port in (None, 22) else f"[{host}]:{port}"
    if any(s in reason for s in _CHANGED):
        return (f"libvirt {uri}: HOST KEY CHANGED: the server's key is not the one {known} has for {pattern} - "
                f"someone may be intercepting the connection, or the host was reinstalled; if you know why it "
                f"changed, remove the old key with `ssh-keygen -R '{pattern}' -f {known}` and accept the new one")
    if any(s in reason for s in _UNKNOWN):
        keyscan = f"ssh-keyscan{f' -p {port}' if port not in (None, 22) else ''} {host}"
        return (f"libvirt {uri}: the host key of {pattern} is not in {known} (libvirt checks it there and has no "
                f"one to ask); check the host's fingerprint (`{keyscan} | ssh-keygen -lf -`), then add it with "
                f"`{keyscan} >> {known}`, or set accept_new_host_key = true in the host's [hosts.NAME] table")
    return None
