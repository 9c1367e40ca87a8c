from __future__ import annotations

from pathlib import Path

import pytest

from kvmshell.config import load_config
from kvmshell.core.address import Kind, SshTarget
from kvmshell.errors import ConfigError

GOOD = """
[defaults]
downtime_ms = 500
strategy = "converge"

[hosts.host2]
ssh = "root@host2.example:2222"

[guests.web1]
monitor = "qmp:unix:/run/web1.qmp"

[guests.web2]
monitor = "hmp:tcp:127.0.0.1:4444"
host = "host2"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_good_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.defaults.downtime_ms == 500 and cfg.defaults.strategy == "converge"
    assert cfg.guests["web1"].address.kind is Kind.UNIX and cfg.guests["web1"].address.ssh is None
    assert cfg.guests["web2"].address.ssh == SshTarget("host2.example", "root", 2222)


@pytest.mark.parametrize("text, message", [
    ("[guests.a]\nmonitor = 'qmp:unix:/x'\nmonitr = 1\n", r"\[guests.a\]: unknown key 'monitr'"),
    ("[guests.a]\n", r"\[guests.a\]: missing key 'monitor'"),
    ("[guests.a]\nmonitor = 'qmp:pty:/dev/pts/1'\n", r"\[guests.a\] monitor: .*a pty carries HMP only"),
    ("[guests.a]\nmonitor = 3\n", r"\[guests.a\].monitor: expected str, got 3"),
    ("[defaults]\nstrategy = 'fast'\n", "strategy: 'fast' is not one of"),
    ("[defaults]\ndowntime_ms = true\n", "downtime_ms: expected int"),
    ("[guests.a]\nmonitor = 'qmp:unix:/x'\nhost = 'nohost'\n", r"no \[hosts.nohost\]"),
    ("[guest.a]\n", "unknown key 'guest'"),
    ("[guests.a\n", "config file"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_missing_default_file_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMSHELL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_config().guests == {}
