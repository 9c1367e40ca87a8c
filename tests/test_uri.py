"""Migration URIs, parsed once."""

from __future__ import annotations

import pytest

from kvmshell.core.values.uri import MigrationUri, check_uri, is_local_host, parse_uri


@pytest.mark.parametrize("text, scheme, host, port, local", [
    ("tcp:10.0.0.2:4444", "tcp", "10.0.0.2", 4444, False),
    ("tcp:[fd00::2]:4444", "tcp", "fd00::2", 4444, False),
    ("tcp:[::1]:4444", "tcp", "::1", 4444, True),
    ("tcp:127.0.0.1:4444", "tcp", "127.0.0.1", 4444, True),
    ("tcp:0:6666", "tcp", "0", 6666, True),
    ("tcp:host2.example:4444,ipv4=on", "tcp", "host2.example", 4444, False),
    ("rdma:10.0.0.9:5555", "rdma", "10.0.0.9", 5555, False),
    ("unix:/run/mig.sock", "unix", None, None, True),
    ("exec:cat > /tmp/x", "exec", None, None, True),
])
def test_a_uri_gives_its_host_and_port(text: str, scheme: str, host: str | None, port: int | None,
                                       local: bool) -> None:
    u = MigrationUri.parse(text)
    assert (u.scheme, u.host, u.port, u.local, str(u)) == (scheme, host, port, local, text)
    assert u.tcp == (scheme == "tcp") and check_uri(text) == text and parse_uri(text) == u


@pytest.mark.parametrize("text, message", [
    ("10.0.0.2:4444", "is not a migration URI"),
    ("http://x", "is not a migration URI"),
    ("tcp:10.0.0.2", "expected tcp:HOST:PORT with a port from 1 to 65535"),
    ("tcp:10.0.0.2:70000", "port from 1 to 65535"),
    ("unix:", "unix:PATH - a unix socket on this host"),
])
def test_a_bad_uri_says_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MigrationUri.parse(text)
    assert parse_uri(text) is None


def test_local_hosts() -> None:
    assert is_local_host(None) and is_local_host("localhost") and is_local_host("127.0.0.5")
    assert not is_local_host("10.0.0.1") and parse_uri(None) is None
