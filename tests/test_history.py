"""The migration history: a real migration leaves its trace and a summary in the state directory;
`kvmshell history` lists it, `kvmshell report ID` reports it, the dashboard shows it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmshell.core.migration.history import HistoryEntry, MigrationHistory
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.errors import KvmError
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.tui.app import KvmshellApp
from kvmshell.tui.replay import ReplaySource
from tests.test_cli import kvmshell
from tests.test_tui import DATA, until


@pytest.mark.qemu
async def test_a_migration_through_c_is_kept_listed_reported_and_replayed(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=512, pace=2, ram_mib=64)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=512, ram_mib=64, incoming=True, disk=src.disk)
    await src.wait_heartbeats(2)
    rc, _, err = await kvmshell(tmp_path, "--guest", f"src={src.address}", "--guest", f"dst={dst.address}",
                                "-c", "@src migrate --to dst --strategy precopy --bandwidth 16M --watch", timeout=90)
    assert rc == 0, err
    history = MigrationHistory(tmp_path / "state" / "kvmshell" / "migrations")
    [entry] = history.entries()
    assert (entry.guest, entry.source, entry.dest, entry.strategy, entry.outcome) == \
        ("src", "local", "dst", "precopy", "completed")
    assert entry.total_s and entry.total_s > 0 and isinstance(entry.downtime_ms, int) and entry.bytes > 2**20
    trace = load_trace(entry.trace)
    assert trace.header.guest == "src" and trace.samples[-1].status.value == "completed"

    rc, out, err = await kvmshell(tmp_path, "history")
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split()[:6] == ["ID", "GUEST", "FROM", "TO", "STRATEGY", "OUTCOME"]
    assert row.split()[:6] == [entry.id, "src", "local", "dst", "precopy", "completed"]

    rc, out, err = await kvmshell(tmp_path, "--json", "history")
    assert rc == 0 and err == "", err
    [doc] = json.loads(out)
    assert doc == entry.to_json() and doc["from"] == "local" and doc["to"] == "dst"

    rc, out, err = await kvmshell(tmp_path, "--json", "report", entry.id)
    assert rc == 0, err
    report = json.loads(out)
    assert report["outcome"] == "completed" and report["sent_bytes"] == entry.bytes
    assert Path(report["plot_svg"]).exists()

    rc, _, err = await kvmshell(tmp_path, "report", "no-such-id")
    assert rc == 2 and err.count("\n") == 1 and "no migration with that ID" in err, err

    # the dashboard opens it in the migration pane (`replay ID` in the command bar)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    app = KvmshellApp(ReplaySource(load_trace(DATA / "traces" / "1gbit-150-auto.jsonl"), 6.0))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("slash", *f"replay {entry.id}", "enter")
        await until(pilot, lambda: entry.id in str(app.pane.border_title), "the pane shows the past migration")
        assert "completed" in str(app.pane.border_title) or app.past is not None and app.past.migration.outcome
        await pilot.press(*"history", "enter")
        await until(pilot, lambda: any(entry.id in line.text for line in app.output.lines),
                    "`history` lists it in the output")


def test_the_history_keeps_the_last_cap_migrations_and_their_traces(tmp_path: Path) -> None:
    history = MigrationHistory(tmp_path, cap=3)
    for i in range(5):
        ident, writer = history.open_trace("vm")  # type: ignore[misc]
        writer.close()
        history.record(HistoryEntry(id=ident, guest="vm", source="local", dest="dst", strategy="auto",
                                    outcome="completed", started_at="2026-12-02T00:00:00Z", total_s=1.0 + i,
                                    downtime_ms=10, bytes=1000, trace=str(tmp_path / f"{ident}.jsonl")))
    entries = history.entries()
    assert [e.total_s for e in entries] == [3.0, 4.0, 5.0]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl") if p.name != "history.jsonl") == \
        sorted(f"{e.id}.jsonl" for e in entries)


def test_a_history_that_cannot_be_written_never_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    history = MigrationHistory(blocked / "migrations")
    assert history.open_trace("vm") is None
    history.record(HistoryEntry(id="x", guest="vm", source="local", dest="d", strategy="auto", outcome="failed",
                                started_at="2026-12-02T00:00:00Z"))
    with pytest.raises(KvmError, match="cannot read the migration history"):
        history.entries()
