from __future__ import annotations

from pathlib import Path

import pytest

from kvmshell.config import load_config
from kvmshell.core.migration.live.strategies import offered
from kvmshell.core.values.address import Kind, SshTarget
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
        load_config(path, strategies=offered())
    assert str(path) in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_missing_default_file_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMSHELL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_config().guests == {}


SSH_HOSTS = """
[hosts.bastion]
ssh = "admin@bastion.example"

[hosts.host2]
ssh = "root@10.0.0.2:2222"
identity_file = "~/.ssh/kvm_ed25519"
jump = "bastion"
accept_new_host_key = true

[hosts.host3]
ssh = "[fd00::3]:22"
jump = "ops@gw.example:2200"
"""


def test_ssh_host_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SSH_HOSTS))
    h2 = cfg.hosts["host2"]
    assert h2.ssh == SshTarget("10.0.0.2", "root", 2222)
    assert h2.identity_file == "~/.ssh/kvm_ed25519" and h2.jump == "bastion" and h2.accept_new_host_key is True
    assert cfg.hosts["bastion"].accept_new_host_key is False and cfg.hosts["bastion"].jump is None
    assert cfg.hosts["host3"].ssh == SshTarget("fd00::3", None, 22)
    assert cfg.hosts["host3"].jump == "ops@gw.example:2200"


@pytest.mark.parametrize("text, message", [
    ("[hosts.h]\nssh = 'root@h'\naccept_new_host_key = 'yes'\n", r"\[hosts.h\].accept_new_host_key: expected bool"),
    ("[hosts.h]\nssh = 'root@h'\nstrict_host_key_checking = false\n",
     r"\[hosts.h\]: unknown key 'strict_host_key_checking'"),
    ("[hosts.h]\nssh = 'root@h'\npassword = 'x'\n", r"\[hosts.h\]: unknown key 'password'"),
    ("[hosts.h]\nssh = 'root@h:99999'\n", r"\[hosts.h\] ssh: 'root@h:99999': expected \[USER@\]HOST\[:PORT\]"),
    ("[hosts.h]\nssh = '@h'\n", "expected .USER@.HOST"),
    ("[hosts.h]\nssh = 'root@h'\njump = 'bastoin'\n", r"\[hosts.h\] jump: no \[hosts.bastoin\]"),
    ("[hosts.h]\nssh = 'root@h'\njump = 'h'\n", r"\[hosts.h\] jump: jump hosts go round in a loop: h -> h"),
    ("[hosts.a]\nssh = 'a'\njump = 'b'\n[hosts.b]\nssh = 'b'\njump = 'a'\n", "loop: a -> b -> a"),
    ("[hosts.h]\nssh = 'root@h'\njump = 'x@y:port'\n", r"\[hosts.h\] jump: 'x@y:port': expected"),
])
def test_bad_ssh_host(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)
