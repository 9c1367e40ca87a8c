"""`migrate` as one typed request: parsed from a line, checked in one place, written back as the
line that parses into the same request."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kvmshell.core.commands.migrate_request import MigrateRequest, Mode
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.spec import split_words
from kvmshell.core.migration.live.strategies import offered
from kvmshell.errors import UsageError

REGISTRY = default_registry()


def request(line: str, source: str = "vm1") -> MigrateRequest:
    words = split_words(line)
    spec, used = REGISTRY.lookup(words)
    assert spec is not None and spec.name == "migrate"
    rest = line.split(None, used)[used] if len(line.split()) > used else ""
    parsed = REGISTRY.parse(spec, words[used:], rest)
    return MigrateRequest.from_parsed(source, parsed.values, parsed.flags)


def test_a_line_becomes_a_typed_request() -> None:
    r = request("migrate --to vm2 --strategy converge --bandwidth 1gbit --downtime 500 --link 10gbit "
                "--allow-postcopy --copy-storage inc --unplug nic0 --unplug nic1 --tls /etc/pki --stall-timeout 5")
    assert r.mode is Mode.STEERED and r.dest == "vm2" and r.strategy == "converge"
    assert (r.bandwidth, r.downtime_ms, r.link) == (125_000_000, 500, 1_250_000_000)
    assert r.allow_postcopy and r.copy_storage == "inc" and r.unplug == ("nic0", "nic1") and r.tls == "/etc/pki"
    assert r.stall_timeout == 5.0 and r.probe is None
    assert request("migrate tcp:10.0.0.2:4444").mode is Mode.PLAIN
    assert request("migrate -b tcp:10.0.0.2:4444").block
    assert request("migrate --to-host b --dry-run --dir /run/x").mode is Mode.TO_HOST
    assert request("migrate --to vm2 --estimate --no-probe").mode is Mode.ESTIMATE


@pytest.mark.parametrize("line", [
    "migrate --to vm2",
    "migrate --to vm2 --strategy auto --downtime 300",
    "migrate --to vm2 --strategy converge --bandwidth 30M --downtime 500 --link 1gbit --allow-postcopy "
    "--copy-storage all --tls '/etc/pki qemu' --tls-authz --stall-timeout 2.5 --trace /tmp/t.jsonl "
    "--unplug nic0 --replug nic0=virtio-net-pci,id=nic0 --watch",
    "migrate --to vm2 --estimate --probe",
    "migrate --to vm2 --copy-storage all --insecure-storage tcp:10.0.0.2:4444",
    "migrate --to-host b --copy-storage inc --insecure-storage --dir /run/k",
    "migrate --to-host b --tunnel --address 10.1.0.2 --dir /run/k --name vm1b --edit --dry-run -y",
    "migrate -d -b tcp:[::1]:4444",
    "migrate -r unix:/run/mig.sock",
])
def test_the_line_a_request_writes_parses_back_into_it(line: str) -> None:
    r = request(line)
    again = request(r.line().split(None, 1)[1])
    assert again == r, r.line()
    assert r.line().startswith("@vm1 migrate")


rates = st.sampled_from([None, 125_000_000, 31_457_280, 1 << 30, 12_345])


@given(dest=st.sampled_from(["vm2", "db-1"]), strategy=st.sampled_from([None, *offered()]),
       bandwidth=rates, link=rates, downtime=st.one_of(st.none(), st.integers(1, 100_000)),
       postcopy=st.booleans(), storage=st.sampled_from([None, "all", "inc"]), watch=st.booleans())
def test_any_steered_request_survives_the_round_trip(dest: str, strategy: str | None, bandwidth: int | None,
                                                      link: int | None, downtime: int | None, postcopy: bool,
                                                      storage: str | None, watch: bool) -> None:
    r = MigrateRequest("vm1", dest=dest, strategy=strategy, bandwidth=bandwidth, link=link, downtime_ms=downtime,
                       allow_postcopy=postcopy, copy_storage=storage, watch=watch)
    assert request(r.line().split(None, 1)[1]) == r


@pytest.mark.parametrize("line, message", [
    ("migrate --to-host b --to vm2", "--to (an attached destination) and --to-host (one kvmshell starts) exclude"),
    ("migrate --to-host b tcp:1.2.3.4:5", "--to-host picks the URI itself: drop the URI"),
    ("migrate --to-host b -b", "-b does not go with --to-host"),
    ("migrate --to-host b --estimate", "--estimate does not go with --to-host"),
    ("migrate --to-host b --unplug nic0", "--unplug/--replug do not go with --to-host yet"),
    ("migrate --to-host b --tls-authz", "--tls-authz goes with --tls DIR"),
    ("migrate --to-host b --tls /x --tunnel", "--tls and --tunnel both encrypt the stream: pick one"),
    ("migrate --to vm2 --copy-storage all --tls /x --insecure-storage", "--insecure-storage is for a disk copy "
     "without --tls"),
    ("migrate --to vm2 --dry-run", "--dry-run goes with --to-host (the destination kvmshell starts)"),
    ("migrate --to vm2 --dir /x", "--dir goes with --to-host"),
])
def test_options_that_do_not_go_together(line: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        request(line).check()
    assert message in info.value.message


@pytest.mark.parametrize("line, message", [
    ("migrate --to vm1", "--to names the guest being migrated"),
    ("migrate --strategy auto", "give a URI or --to DEST"),
    ("migrate --to vm2 -b", "-b/-i (QEMU block migration) go with a plain `migrate -b URI`"),
    ("migrate --to vm2 --probe", "--probe/--no-probe go with --estimate"),
    ("migrate --to vm2 --estimate --probe --link 1gbit", "--link gives the link's speed, --probe measures it"),
    ("migrate --tls /x tcp:1.2.3.4:5", "--tls needs --to DEST"),
    ("migrate --to vm2 --tls-authz", "--tls-authz goes with --tls DIR"),
])
def test_the_checks_of_a_migration_kvmshell_runs(line: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        request(line).check_steered()
    assert message in info.value.message


def test_probe_and_no_probe_exclude_each_other() -> None:
    with pytest.raises(UsageError, match="--probe and --no-probe exclude each other"):
        request("migrate --to vm2 --estimate --probe --no-probe")
