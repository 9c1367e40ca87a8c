"""Completion from live guests, and a property test of the parser and completer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmshell.core.values.address import parse_address
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.commands.session import Session
from kvmshell.errors import KvmError
from kvmshell.lab.launcher import Lab, MonitorKind


@pytest.fixture
async def engine(lab: Lab) -> AsyncIterator[CompletionEngine]:
    vm1, vm2 = await asyncio.gather(lab.start("vm1", MonitorKind.QMP_UNIX, paused=True),
                                    lab.start("vm2", MonitorKind.HMP_UNIX, paused=True))
    async with Fleet() as fleet:
        fleet.add("vm1", vm1.address)
        fleet.add("vm2", vm2.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        for line in ("@vm1 savevm alpha", "@vm1 savevm alpine", "@vm2 savevm beta", "use vm1"):
            assert all(o.ok for o in await session.run_line(line))
        await session.data.refresh_all()
        yield CompletionEngine(session)
        await session.aclose()


def texts(engine: CompletionEngine, line: str) -> list[str]:
    return [c.text for c in engine.complete(line)]


@pytest.mark.qemu
async def test_live_candidates(engine: CompletionEngine) -> None:
    assert texts(engine, "loadvm ") == ["alpha", "alpine"]
    assert texts(engine, "loadvm alpi") == ["alpine"]
    assert texts(engine, "@vm2 loadvm ") == ["beta"]              # vm2's tags, not the current guest's
    assert texts(engine, "delvm b") == []
    assert texts(engine, "@") == ["@vm1", "@vm2", "@all"]
    assert texts(engine, "use v") == ["vm1", "vm2"]
    assert texts(engine, "info mig") == ["migrate", "migrate_parameters", "migrate_capabilities"]
    assert texts(engine, "migrate_set_parameter max-b") == ["max-bandwidth"]
    assert texts(engine, "migrate_set_capability postcopy-r") == ["postcopy-ram"]
    assert texts(engine, "migrate_set_capability events ") == ["on", "off"]
    assert texts(engine, "migrate_set_parameter block-incremental ") == ["on", "off"]
    assert texts(engine, "migrate_set_speed 5") == ["5K", "5M", "5G", "5T"]
    assert "tcp:" in texts(engine, "migrate ") and "unix:" in texts(engine, "migrate ")
    assert texts(engine, "migrate tcp:") == ["tcp:127.0.0.1:"]
    assert texts(engine, "migrate -")[:4] == ["-d", "-b", "-i", "-r"] and "--to" in texts(engine, "migrate -")
    assert texts(engine, "migrate --to ") == ["vm1", "vm2"]
    assert texts(engine, "migrate --to vm2 --strategy ") == ["auto", "precopy", "converge", "postcopy", "multifd",
                                                             "compress", "xbzrle"]
    assert "savevm" in texts(engine, "sav") and texts(engine, "sav")[0] == "savevm"
    assert "query-migrate" in texts(engine, "qmp query-mig")
    assert texts(engine, "watch info migrate_c") == ["migrate_capabilities"]
    assert texts(engine, "help savev") == ["savevm"]
    # every candidate carries a description where there is one to give
    metas = {c.text: c.meta for c in engine.complete("loadvm ")}
    assert metas["alpha"].startswith("saved ")


@pytest.mark.qemu
async def test_tags_refresh_after_savevm(engine: CompletionEngine) -> None:
    s = engine.session
    assert all(o.ok for o in await s.run_line("savevm gamma"))
    await asyncio.gather(*[t for (n, _), t in s.data._tasks.items() if n == "vm1"])
    assert texts(engine, "loadvm g") == ["gamma"]


@pytest.fixture(scope="module")
def offline_session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """Guests that are never connected: anything sent to one would fail with its name on it."""
    d: Path = tmp_path_factory.mktemp("offline")
    fleet = Fleet()
    fleet.add("vm1", parse_address(f"qmp:unix:{d}/vm1.qmp"))
    fleet.add("vm2", parse_address(f"hmp:unix:{d}/vm2.hmp"))
    return Session(fleet, default_registry(), current="vm1")


WORDS = st.sampled_from(["savevm", "loadvm", "migrate", "info", "migrate", "@vm1", "@all", "@x", "-d", "-b",
                         "tcp:1.2.3.4:5", "migrate_set_speed", "1G", "-1", "'", '"', "help", "qmp", "{", "hmp",
                         "use", "watch", "migrate_set_parameter", "max-bandwidth", "on", "exit", "@"])
LINES = st.one_of(st.text(max_size=60), st.lists(st.one_of(WORDS, st.text(max_size=8)), max_size=6).map(" ".join))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=LINES)
def test_parser_and_completer_never_raise(offline_session: Session, line: str) -> None:
    engine = CompletionEngine(offline_session)
    for cut in {len(line), len(line) // 2}:
        engine.complete(line[:cut])                       # never raises
    try:
        offline_session.plan(line)
    except KvmError:
        rejected = True
    else:
        rejected = False
    if rejected:
        outcomes = asyncio.run(offline_session.run_line(line))
        # a rejected line yields one error that belongs to no guest: nothing was sent anywhere
        assert len(outcomes) == 1 and not outcomes[0].ok and outcomes[0].guest is None


def test_hosts_complete_from_the_config(tmp_path: Path) -> None:
    from kvmshell.config import parse_config
    cfg = parse_config({"hosts": {"host2": {"ssh": "root@10.0.0.2"}, "host3": {"ssh": "h3:2222"}}})
    fleet = Fleet()
    fleet.add("vm", parse_address(f"qmp:unix:{tmp_path}/vm.qmp"))
    engine = CompletionEngine(Session(fleet, default_registry(), cfg, current="vm"))
    assert [(c.text, c.meta) for c in engine.complete("static-migrate --to ")] == [("host2", "root@10.0.0.2"),
                                                                                 ("host3", "h3")]
    assert texts(engine, "loadvm-on host3") == ["host3"]
