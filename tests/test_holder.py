"""Two kvmshells, one guest: the second says which process holds the monitor, and attaches the others."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from kvmshell.core.hosts.holder import parse_ss, unix_peers
from kvmshell.lab.launcher import Lab, MonitorKind
from tests.test_cli import env_for, kvmshell
from tests.waiting import wait_for

SS = """\
u_str ESTAB 0      0      /run/vm 1.qmp 1648038 * 1648037 users:(("qemu-system-x86",pid=30,fd=5))
u_str ESTAB 0      0      * 1648039 * 0       users:(("python3",pid=41,fd=6))
u_str ESTAB 0      0      * 1648037 * 1648038 users:(("kvmshell",pid=40,fd=4),("kvmshell",pid=42,fd=4))
u_str ESTAB 0      0      * 1648050 * 1648051
"""


def test_peers_of_a_path_from_ss_output() -> None:
    rows = parse_ss(SS)
    assert unix_peers(rows, {"/run/vm 1.qmp"}) == [40, 42]      # the pending connection (peer 0) is nobody
    assert unix_peers(rows, {"/run/other.qmp"}) == []


@pytest.mark.qemu
@pytest.mark.parametrize("kind", [MonitorKind.QMP_UNIX, MonitorKind.HMP_UNIX], ids=lambda k: k.value)
async def test_second_kvmshell_names_the_holder_and_lists_the_others(lab: Lab, tmp_path: Path,
                                                                      kind: MonitorKind) -> None:
    a = await lab.start("a", kind, paused=True)
    b = await lab.start("b", MonitorKind.HMP_UNIX, paused=True)
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", "--guest", f"a={a.address}", "shell", env=env_for(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write(b"info status\n")
        await first.stdin.drain()
        await wait_for(lambda: first.stdout.readline(), lambda line: b"prelaunch" in line or not line,  # type: ignore[union-attr]
                       timeout=30, what="the first kvmshell attached to a")
        rc, out, err = await kvmshell(tmp_path, "--json", "--connect-timeout", "2", "--guest", f"a={a.address}",
                                      "--guest", f"b={b.address}", "guests")
        assert rc == 1
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"kvmshell: a: {a.address}: the monitor is held by pid {first.pid} (")
        assert "kvmshell.cli --guest" in lines[0] and len(lines[0]) < 300
        rows = {r["name"]: r for r in json.loads(out)}
        assert rows["a"]["status"] == "unreachable"
        assert rows["b"]["status"] == "paused (prelaunch)"
    finally:
        if first.returncode is None:
            first.terminate()
        await first.wait()


async def test_no_holder_keeps_the_old_message(tmp_path: Path) -> None:
    """A unix socket nobody else is connected to that never greets: today's message, no pid."""
    path = tmp_path / "mute.qmp"
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_unix_server(lambda r, w: accepted.append(w), path=str(path))
    try:
        rc, _, err = await kvmshell(tmp_path, "--connect-timeout", "1", "--guest", f"m=qmp:unix:{path}", "guests")
        assert rc == 1
        assert "another client holds this monitor" in err and "pid" not in err
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
