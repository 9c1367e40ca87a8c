"""One JSON contract: every command that takes --json prints only JSON on stdout - one object per
line for `-c`/`run`, one document for `guests`, `hosts`, `report`, `history` - with numbers as numbers
and the unit of each quantity in its key's name. Errors and warnings go to stderr only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kvmshell.core.values.jsonform import says_unit
from kvmshell.core.values.units import parse_rate
from kvmshell.lab.launcher import Lab, MonitorKind
from tests.test_cli import kvmshell
from tests.waiting import free_port

QUANTITY_TEXT = re.compile(r"^-?\d+(\.\d+)?\s*(B|KiB|MiB|GiB|kB|MB|GB|ms|s|%|MB/s|MiB/s|Mbit/s|mbps)$")
QEMU_NAMED = ("params", "capabilities")     # QEMU's own parameter names are kept as they are


def units_said(value: Any, where: str = "$") -> list[str]:
    """Where a number's key does not say its unit, or a quantity is a string ("12 MB")."""
    bad: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not says_unit(str(k)):
                bad.append(f"{where}.{k} = {v!r}: the key does not say the unit")
            if k not in QEMU_NAMED:
                bad += units_said(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad += units_said(v, f"{where}[{i}]")
    elif isinstance(value, str) and QUANTITY_TEXT.match(value.strip()):
        bad.append(f"{where} = {value!r}: a quantity as text")
    return bad


def documents(out: str, *, lines: int | None = None) -> list[Any]:
    """Every stdout line parsed (with ``lines``: exactly that many objects, one per line)."""
    parsed = [json.loads(line) for line in out.splitlines()] if lines is not None else [json.loads(out)]
    if lines is not None:
        assert len(parsed) == lines, out
    for doc in parsed:
        assert not units_said(doc), units_said(doc)
    return parsed


@pytest.mark.qemu
async def test_every_json_output_parses_and_says_its_units(lab: Lab, tmp_path: Path) -> None:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=512, pace=2, ram_mib=64)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=512, ram_mib=64, incoming=True, disk=src.disk)
    hmp = await lab.start("h", MonitorKind.HMP_UNIX, paused=True)
    g = ["--guest", f"src={src.address}", "--guest", f"dst={dst.address}", "--guest", f"h={hmp.address}"]
    await src.wait_heartbeats(2)

    rc, out, err = await kvmshell(tmp_path, *g, "--json", "guests")
    assert rc == 0, err
    [rows] = documents(out)
    assert {r["name"] for r in rows} == {"src", "dst", "h"}

    config = tmp_path / "hosts.toml"
    down = free_port()
    config.write_text(f'[hosts.gone]\nssh = "root@127.0.0.1:{down}"\n')
    rc, out, err = await kvmshell(tmp_path, "--config", str(config), "--json", "hosts")
    assert rc == 1 and err.startswith("kvmshell: gone: ") and err.count("\n") == 1, err
    [hosts] = documents(out)
    assert hosts[0]["name"] == "gone" and hosts[0]["reachable"] is False

    # the estimate: one object, the model's figures as numbers
    rc, out, err = await kvmshell(tmp_path, *g, "--json", "-c", "@src estimate --to dst --link 1G", timeout=90)
    assert rc == 0, err
    [line] = documents(out, lines=1)
    est = line["outcomes"][0]["result"]
    assert est["ram_bytes"] == 64 * 2**20 and est["link_bytes_per_s"] == parse_rate("1G") and est["started"] is False
    assert est["auto"] and est["options"] and isinstance(est["options"][0]["prediction"]["total_s"], float)
    assert isinstance(est["dirty_rate_bytes_per_s"], float) and est["downtime_limit_ms"] > 0

    # `run FILE`: one object per line, a failed line too (its error also on stderr), a migration
    # followed to its end (its live view on stderr), the history and the report of it
    script = tmp_path / "lines.kvm"
    script.write_text("@h info status\n@src savevm t1\n@src info snapshots\n@src loadvm nosuch\n"
                      "@src calc_dirty_rate 1\n@src info dirty_rate\n@src info migrate_parameters\n"
                      "@src migrate --to dst --strategy precopy --bandwidth 16M --watch\n@src info migrate\n")
    rc, out, err = await kvmshell(tmp_path, *g, "--json", "--keep-going", "run", str(script), timeout=120)
    assert rc == 1, err                                             # the loadvm line failed
    objs = documents(out, lines=9)
    assert [o["line"] for o in objs] == script.read_text().splitlines()
    assert objs[0]["outcomes"][0]["result"]["state"] == "prelaunch"
    snaps = objs[2]["outcomes"][0]["result"]
    assert snaps[0]["tag"] == "t1" and snaps[0]["vm_state_bytes"] > 0
    assert objs[3]["ok"] is False and "nosuch" in objs[3]["outcomes"][0]["error"]
    assert f"{script}:4: src:" in err and "nosuch" in err
    migrated = objs[7]["outcomes"][0]["result"]
    assert migrated["status"] == "completed" and migrated["sent_bytes"] > 2**20
    assert isinstance(migrated["total_s"], float) and isinstance(migrated["downtime_ms"], int)
    assert objs[8]["outcomes"][0]["result"]["downtime_ms"] >= 0

    rc, out, err = await kvmshell(tmp_path, "--json", "history")
    assert rc == 0 and err == "", err
    [history] = documents(out)
    entry = history[-1]
    assert entry["outcome"] == "completed" and entry["bytes"] > 2**20 and isinstance(entry["total_s"], float)

    rc, out, err = await kvmshell(tmp_path, "--json", "report", entry["id"])
    assert rc == 0, err
    [report] = documents(out)
    assert report["outcome"] == "completed" and report["sent_bytes"] == entry["bytes"]


async def test_tls_init_json_is_one_document(tmp_path: Path) -> None:
    rc, out, err = await kvmshell(tmp_path, "--json", "tls-init", str(tmp_path / "pki"), "host2")
    assert rc == 0, err
    [dirs] = documents(out)
    assert dirs == [str(tmp_path / "pki" / "host2")] and (tmp_path / "pki" / "host2" / "ca-cert.pem").exists()


def test_the_unit_check_catches_what_it_must() -> None:
    assert units_said({"total": 3}) and units_said({"sent": "12 MB"}) and units_said([{"a": {"rate": 1.5}}])
    assert not units_said({"total_s": 1.5, "downtime_ms": 3, "ram_bytes": 1, "rate_bytes_per_s": 2.0,
                           "message": "sent 12 MB", "ok": True, "params": {"max-bandwidth": 1}})
