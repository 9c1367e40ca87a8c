"""The `kvmshell` command as a user runs it: real processes, exit statuses, one-line errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from kvmshell.lab.launcher import Lab, MonitorKind, leftover_lab_processes, pid_alive


def env_for(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("KVMSHELL_CONFIG", None)
    return env


async def kvmshell(tmp_path: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", *args, env=env_for(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.qemu
async def test_guests_lists_a_qmp_and_a_pty_guest(lab: Lab, tmp_path: Path) -> None:
    a = await lab.start("a", MonitorKind.QMP_UNIX, paused=True)
    b = await lab.start("b", MonitorKind.HMP_PTY)
    rc, out, err = await kvmshell(tmp_path, "--guest", f"a={a.address}", "--guest", f"b={b.address}", "guests")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "PROTO", "STATUS", "QEMU"]
    assert re.match(rf"a\s+{re.escape(str(a.address))}\s+qmp\s+paused \(prelaunch\)\s+\d+\.\d+\.\d+$", lines[1])
    assert re.match(r"b\s+hmp:pty:/dev/pts/\d+\s+hmp\s+running\s+\d+\.\d+\.\d+$", lines[2])
    assert err == ""


@pytest.mark.qemu
async def test_unreachable_guest_one_line_and_failure_status(lab: Lab, tmp_path: Path) -> None:
    good = await lab.start("good", MonitorKind.HMP_UNIX, paused=True)
    rc, out, err = await kvmshell(tmp_path, "--json", "--guest", f"good={good.address}",
                                  "--guest", f"gone=qmp:unix:{tmp_path}/gone.qmp", "guests")
    assert rc == 1
    assert err == f"kvmshell: gone: qmp:unix:{tmp_path}/gone.qmp: no such socket (is the guest running, and the path right?)\n"
    import json
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["good"]["status"] == "paused (prelaunch)" and rows["good"]["reason"] is None
    assert rows["gone"]["status"] == "unreachable"


async def test_a_line_on_a_guest_never_reached_says_the_cause_once(tmp_path: Path) -> None:
    """One cause, one line: the line that failed on the guest says why; a guest no line reached gets its
    own line at the end."""
    gone, other = tmp_path / "gone.qmp", tmp_path / "other.qmp"
    cause = "no such socket (is the guest running, and the path right?)"
    rc, out, err = await kvmshell(tmp_path, "--guest", f"gone=qmp:unix:{gone}", "-c", "info status")
    assert (rc, out) == (1, "")
    assert err == f"kvmshell: gone: not connected: qmp:unix:{gone}: {cause}\n"
    rc, out, err = await kvmshell(tmp_path, "--guest", f"gone=qmp:unix:{gone}", "--guest", f"other=qmp:unix:{other}",
                                  "-c", "@gone info status")
    assert rc == 1
    assert err.splitlines() == [f"kvmshell: gone: not connected: qmp:unix:{gone}: {cause}",
                                f"kvmshell: other: qmp:unix:{other}: {cause}"]


@pytest.mark.parametrize("args, message", [
    (["--guest", "vm1", "guests"], "--guest 'vm1': expected NAME=ADDR"),
    (["--guest", "vm1=qmp:tcp:localhost", "guests"], "--guest vm1: 'qmp:tcp:localhost': expected tcp:HOST:PORT"),
    (["--guest", "a=qmp:unix:/x", "--guest", "a=qmp:unix:/y", "guests"], "guest 'a' is already defined"),
    (["--guest", "a=qmp:unix:/x", "--guest", "b=qmp:unix:/x", "guests"], "'a' and 'b' are the same monitor"),
    (["guests"], "no guests: give --guest NAME=ADDR"),
    (["--config", "/nonexistent.toml", "guests"], "config file /nonexistent.toml does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
async def test_bad_input_exit_2_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    rc, out, err = await kvmshell(tmp_path, *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("kvmshell: ") and message in err, err
    assert "Traceback" not in err


async def test_bad_config_key_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[guests.web1]\nmonitor = "qmp:unix:/run/web1.qmp"\nprotocol = "qmp"\n')
    rc, _, err = await kvmshell(tmp_path, "--config", str(cfg), "guests")
    assert rc == 2 and f"kvmshell: {cfg}: [guests.web1]: unknown key 'protocol'" in err


@pytest.mark.qemu
async def test_demo_no_ui_starts_prints_and_stops(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "demo", "--no-ui", env=env_for(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        text = ""
        async with asyncio.timeout(60):
            while "Ctrl-C" not in text:
                line = await proc.stdout.readline()
                assert line, "demo exited early"
                text += line.decode()
        options = re.findall(r"--guest (\S+)", text)
        assert [o.split("=")[0] for o in options] == ["vm-src", "vm-dst", "vm-idle1", "vm-idle2"]
        args = [a for o in options for a in ("--guest", o)]
        rc, out, err = await kvmshell(tmp_path, *args, "guests")
        assert rc == 0, err
        assert "paused (inmigrate)" in out and out.count("running") == 3
        pids = leftover_lab_processes(parent=proc.pid)
        assert len(pids) == 4
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
        assert not [p for p in pids if pid_alive(p)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()



@pytest.mark.qemu
async def test_replay_script_with_run(lab: Lab, tmp_path: Path) -> None:
    vm = await lab.start("vm", MonitorKind.QMP_UNIX)
    script = tmp_path / "replay.kvm"
    script.write_text("# a savevm/loadvm sequence, replayed\n"
                      "migrate_set_speed 1G\n"
                      "savevm before\n"
                      "\n"
                      "loadvm -y before\n"
                      "info snapshots\n"
                      "delvm before\n")
    rc, out, err = await kvmshell(tmp_path, "--guest", f"vm={vm.address}", "run", str(script))
    assert rc == 0, err
    assert "saved snapshot 'before'" in out and "loaded snapshot 'before'" in out
    assert "deleted snapshot 'before'" in out and err == ""
    # the first failure stops the script: exit 1, one line naming the file, the line and the guest
    script.write_text("info status\nloadvm missing\ninfo status\n")
    rc, out, err = await kvmshell(tmp_path, "--guest", f"vm={vm.address}", "run", str(script))
    assert rc == 1 and out.count("VM status: running") == 1
    assert err == f"kvmshell: {script}:2: vm: no snapshot 'missing' on this guest (snapshots: none); nothing was loaded\n"
    rc, out, err = await kvmshell(tmp_path, "--guest", f"vm={vm.address}", "--keep-going", "run", str(script))
    assert rc == 1 and out.count("VM status: running") == 2


@pytest.mark.qemu
async def test_dash_c_json_and_confirmation(lab: Lab, tmp_path: Path) -> None:
    vm = await lab.start("vm", MonitorKind.HMP_UNIX)
    g = ["--guest", f"vm={vm.address}"]
    rc, out, err = await kvmshell(tmp_path, *g, "--json", "-c", "info status", "-c", "migrate_set_downtime 0.5")
    assert rc == 0, err
    import json
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {"line": "info status", "ok": True, "outcomes": [
        {"guest": "vm", "ok": True, "result": {"status": "running", "running": True, "state": "running"}}]}
    assert second["outcomes"][0]["result"]["message"] == "downtime-limit = 500 ms"
    rc, out, err = await kvmshell(tmp_path, *g, "-c", "system_reset")
    assert rc == 1 and "not confirmed (run with -y/--yes to confirm)" in err
    rc, out, err = await kvmshell(tmp_path, *g, "-y", "-c", "system_reset")
    assert rc == 0 and out == "reset\n"


async def test_report_of_a_recorded_trace(tmp_path: Path) -> None:
    trace = Path(__file__).parent / "data" / "traces" / "1gbit-150-auto+postcopy.jsonl"
    svg = tmp_path / "plot.svg"
    rc, out, err = await kvmshell(tmp_path, "report", str(trace), "--svg", str(svg))
    assert rc == 0, err
    assert re.search(r"outcome\s+completed", out) and re.search(r"postcopy\s+yes", out)
    assert f"plot: {svg}" in out
    import xml.etree.ElementTree as ET
    assert ET.parse(svg).getroot().tag.endswith("svg")
    rc, out, err = await kvmshell(tmp_path, "report", str(trace), "--svg", str(tmp_path / "plot.png"))
    assert rc == 2 and "only SVG" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    rc, out, err = await kvmshell(tmp_path, "report", str(bad))
    assert rc == 2 and "not a kvmshell trace" in err


async def test_tls_init(tmp_path: Path) -> None:
    rc, out, err = await kvmshell(tmp_path, "tls-init", str(tmp_path / "pki"), "host2", "10.0.0.2")
    assert rc == 0, err
    assert out.count("keys 0600") == 2
    assert (tmp_path / "pki" / "10.0.0.2" / "server-key.pem").stat().st_mode & 0o777 == 0o600
    rc, out, err = await kvmshell(tmp_path, "tls-init", str(tmp_path / "pki2"))
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize("host", ["/ABS", "../x", "a/b", "", "a\x1bb", "a\nb", "a-", "a..b", "a_b", "x" * 64,
                                  ".", ".."])
async def test_tls_init_refuses_a_host_that_is_not_a_name_or_address(tmp_path: Path, host: str) -> None:
    """HOST becomes a directory under DIR: only a DNS name (RFC 1123 labels) or an IP address is one.
    An absolute HOST (/etc in the issue) is one under tmp_path here: a regression must not write /etc."""
    host = str(tmp_path / "abs") if host == "/ABS" else host
    rc, out, err = await kvmshell(tmp_path, "tls-init", str(tmp_path / "pki"), "good.example", host)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and "not a host name or IP address" in err and "Traceback" not in err, err
    assert not (tmp_path / "pki").exists() and not (tmp_path / "x").exists()     # nothing written
    assert not (tmp_path / "abs").exists()


async def test_a_monitor_on_tcp_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    from tests.waiting import free_port
    port = free_port()                                # nothing listens: unreachable, and warned about
    rc, _, err = await kvmshell(tmp_path, "--guest", f"open=qmp:tcp:0.0.0.0:{port}",
                                "--guest", f"lo=qmp:tcp:127.0.0.1:{port}", "guests")
    assert rc == 1
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kvmshell: warning: open: its QMP monitor listens on TCP "
                                                         f"0.0.0.0:{port}, not on loopback"), err
    assert "no authentication" in warnings[0]


async def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`kvmshell ... | head`: the pipe closes before kvmshell has written everything (here 170 kB of
    help); it stops with status 1 and nothing on stderr."""
    read, write = os.pipe()
    args = [a for _ in range(60) for a in ("-c", "help")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", *args, env=env_for(tmp_path), stdout=write,
        stderr=asyncio.subprocess.PIPE)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        assert reader.read(100)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 1 and err == b"", err


@pytest.mark.qemu
@pytest.mark.parametrize("strategy", ["postcopy", "precopy"])
async def test_watch_returns_when_the_migration_ends(lab: Lab, tmp_path: Path, strategy: str) -> None:
    """`-c 'migrate --to DST --watch'` prints the live view until the migration is over, then exits -
    after a postcopy too (whose final view says "postcopy requests": it used to loop there)."""
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=512, pace=2, ram_mib=64)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=512, ram_mib=64, incoming=True, disk=src.disk)
    await src.wait_heartbeats(2)
    rc, out, err = await kvmshell(tmp_path, "--guest", f"src={src.address}", "--guest", f"dst={dst.address}",
                                  "-c", f"@src migrate --to dst --strategy {strategy} --bandwidth 16M --watch",
                                  timeout=90)
    assert rc == 0, err
    assert "Migration status: completed" in out and out.count("--- ") >= 2, out[-2000:]
    if strategy == "postcopy":
        assert "postcopy" in out


async def test_report_json_is_one_document(tmp_path: Path) -> None:
    """`--json report TRACE`: only JSON on stdout, numbers as numbers, every decision kept."""
    import json
    trace = Path(__file__).parent / "data" / "traces" / "1gbit-150-auto.jsonl"
    rc, out, err = await kvmshell(tmp_path, "--json", "report", str(trace), "--svg", str(tmp_path / "r.svg"))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["outcome"] == "completed" and isinstance(doc["total_s"], float) and doc["sent_bytes"] > 0
    assert len(doc["decisions"]) >= 2 and doc["plot_svg"] == str(tmp_path / "r.svg")
    assert (tmp_path / "r.svg").exists()
