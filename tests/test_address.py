from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget, parse_address, parse_guest_option
from kvmshell.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("qmp:unix:/run/vm1.qmp", Address(Protocol.QMP, Kind.UNIX, path="/run/vm1.qmp")),
    ("hmp:tcp:127.0.0.1:4444", Address(Protocol.HMP, Kind.TCP, host="127.0.0.1", port=4444)),
    ("hmp:tcp:[::1]:4444", Address(Protocol.HMP, Kind.TCP, host="::1", port=4444)),
    ("hmp:pty:/dev/pts/3", Address(Protocol.HMP, Kind.PTY, path="/dev/pts/3")),
    ("QMP:UNIX:/a:b", Address(Protocol.QMP, Kind.UNIX, path="/a:b")),
    ("ssh://root@host2/qmp:unix:/run/vm3.qmp",
     Address(Protocol.QMP, Kind.UNIX, path="/run/vm3.qmp", ssh=SshTarget("host2", "root"))),
    ("ssh://host2:2222/hmp:tcp:localhost:4444",
     Address(Protocol.HMP, Kind.TCP, host="localhost", port=4444, ssh=SshTarget("host2", None, 2222))),
])
def test_parse(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected      # str() round-trips


@pytest.mark.parametrize("text, message", [
    ("qmp:/run/vm.qmp", "expected PROTO:KIND:TARGET"),
    ("xmp:unix:/x", "protocol 'xmp' is not qmp or hmp"),
    ("qmp:udp:/x", "kind 'udp' is not unix, tcp or pty"),
    ("qmp:pty:/dev/pts/1", "a pty carries HMP only"),
    ("qmp:unix:", "is empty"),
    ("hmp:tcp:127.0.0.1", "expected tcp:HOST:PORT"),
    ("hmp:tcp:127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
    ("hmp:tcp:127.0.0.1:http", "port 'http'"),
    ("ssh://host", "expected ssh://"),
    ("ssh://@host/qmp:unix:/x", "empty user name"),
])
def test_bad_addresses_say_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_address(text, "--guest vm1")
    with pytest.raises(ConfigError, match="--guest vm1"):
        parse_address(text, "--guest vm1")


def test_guest_option() -> None:
    assert parse_guest_option("vm1=qmp:unix:/x") == ("vm1", Address.unix("qmp", "/x"))
    with pytest.raises(ConfigError, match="expected NAME=ADDR"):
        parse_guest_option("qmp:unix:/x")
    with pytest.raises(ConfigError, match="is reserved"):
        parse_guest_option("all=qmp:unix:/x")
    with pytest.raises(ConfigError, match="is not a guest name"):
        parse_guest_option("a b=qmp:unix:/x")


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=80))
def test_parser_raises_only_config_errors(text: str) -> None:
    try:
        addr = parse_address(text)
    except ConfigError as e:
        assert "\n" not in str(e).strip() or "\n" in text      # one line, unless the input had one
    else:
        assert parse_address(str(addr)) == addr
