"""Scripts wait for what they start: `kvmshell -c`/`run` follow a migration to its end (exit status =
outcome, progress on stderr, the outcome on stdout), `--detach` leaves it to QEMU, Ctrl-C stops
following and says how to cancel. Real `kvmshell` processes against real lab guests.

The source gets a second QMP monitor (QEMU's QMP socket takes one client at a time, and kvmshell
holds the first): the test watches and acts on the migration through it, as a second admin would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmshell.core.monitor.base import Monitor
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.address import Address, Protocol
from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.lab.launcher import Lab, LabGuest, MonitorKind
from tests.sshd import HAVE_SSHD, SshTestbed, processes_mentioning
from tests.test_cli import env_for, kvmshell
from tests.test_static import bed  # noqa: F401  (the fixture: hosts a and b)
from tests.waiting import free_port, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]
WS = 4096                      # 16 MiB working set: at 1 MB/s the first pass alone takes seconds
RAM = 64
SLOW = "--bandwidth 1M --stall-timeout 60"


@dataclass
class Guests:
    src: LabGuest
    dst: LabGuest
    side: Monitor                       # the source's second QMP monitor
    tmp: Path

    @property
    def args(self) -> list[str]:
        return ["--guest", f"src={self.src.address}", "--guest", f"dst={self.dst.address}"]

    async def status(self) -> MigrationStatus:
        return (await self.side.migration()).status

    async def until(self, *statuses: MigrationStatus, timeout: float = 60) -> None:
        await wait_for(self.status, lambda s: s in statuses, timeout=timeout, what=f"source in {statuses}")


@asynccontextmanager
async def guests(lab: Lab, tmp_path: Path, ws: int = WS, pace: int = 2) -> AsyncIterator[Guests]:
    side_path = lab.workdir / "src-side.qmp"
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=ws, pace=pace, ram_mib=RAM,
                          extra_args=("-chardev", f"socket,id=side,path={side_path},server=on,wait=off",
                                      "-mon", "chardev=side,mode=control"))
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=ws, ram_mib=RAM, incoming=True, disk=src.disk)
    await src.wait_heartbeats(1)
    async with Fleet() as fleet:
        fleet.add("side", Address.unix(Protocol.QMP, str(side_path)))
        await fleet.start()
        yield Guests(src, dst, fleet.monitor("side"), tmp_path)


@pytest.fixture
async def pair(lab: Lab, tmp_path: Path) -> AsyncIterator[Guests]:
    async with guests(lab, tmp_path) as g:
        yield g


@dataclass
class Running:
    """A `kvmshell` process left running: its stderr read line by line as it comes."""

    proc: asyncio.subprocess.Process
    err: list[str] = field(default_factory=list)

    async def line(self, match: Callable[[str], bool], timeout: float = 60) -> str:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            for seen in self.err:
                if match(seen):
                    return seen
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, f"kvmshell ended first; stderr: {''.join(self.err)}"
                text = raw.decode()
                self.err.append(text)
                if match(text):
                    return text

    async def end(self, timeout: float = 90) -> tuple[int, str, str]:
        try:
            async with asyncio.timeout(timeout):
                out, rest = await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            out, rest = await self.proc.communicate()
            raise AssertionError(f"kvmshell did not end within {timeout} s; stderr: {''.join(self.err)}"
                                 f"{rest.decode()}") from None
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), "".join(self.err) + rest.decode()


@asynccontextmanager
async def started(tmp_path: Path, *args: str, **env: str) -> AsyncIterator[Running]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmshell.cli", *args, env=env_for(tmp_path) | env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield Running(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("kvmshell: src: ")]


# -- the exit status is the outcome ------------------------------------------------------------------

async def test_migrate_to_waits_for_the_end_and_exits_0(lab: Lab, tmp_path: Path) -> None:
    """The issue's line: it used to return at once with 0 while the migration had just begun."""
    async with guests(lab, tmp_path, ws=512) as g:
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c",
                                      "@src migrate --to dst --strategy auto --allow-postcopy --bandwidth 16M",
                                      timeout=120)
        assert rc == 0, err
        assert out.count("\n") == 1 and out.startswith("src: completed in "), out      # only the outcome
        assert "Migration status" not in out and "migrating to dst" not in out
        assert progress_lines(err) and "migrating to dst" in err, err
        assert await g.status() is MigrationStatus.COMPLETED
        assert (await g.side.status()).state is RunState.POSTMIGRATE
        await g.dst.wait_heartbeats(1)                       # the guest runs on the destination


async def test_json_is_one_object_with_the_outcome(lab: Lab, tmp_path: Path) -> None:
    async with guests(lab, tmp_path, ws=512) as g:
        rc, out, err = await kvmshell(tmp_path, *g.args, "--json", "-c",
                                      "@src migrate --to dst --strategy precopy --bandwidth 16M", timeout=120)
        assert rc == 0, err
        [line] = out.splitlines()
        obj = json.loads(line)
        assert obj["ok"] is True and obj["line"].startswith("@src migrate"), obj
        [item] = obj["outcomes"]
        assert item["guest"] == "src" and item["ok"] is True, item
        result = item["result"]
        assert result["status"] == "completed" and isinstance(result["total_s"], float), result
        assert isinstance(result["downtime_ms"], int) and result["sent_bytes"] > 0, result


async def test_destination_killed_mid_way_exits_1_and_the_source_runs_on(pair: Guests, tmp_path: Path) -> None:
    g = pair
    async with started(tmp_path, *g.args, "-c", f"@src migrate --to dst {SLOW}") as k:
        await g.until(MigrationStatus.ACTIVE)
        await k.line(lambda text: "kvmshell: src: active" in text)
        os.kill(g.dst.pid, signal.SIGKILL)
        rc, out, err = await k.end()
    assert rc == 1, err
    assert out.startswith("src: migration failed") and out.count("\n") == 1, out
    assert (await g.side.status()).state is RunState.RUNNING
    await g.src.wait_heartbeats(1)


async def test_a_failed_migrations_json_says_why_and_where_each_side_is(pair: Guests, tmp_path: Path) -> None:
    """--json of a failed migration kept only the error text: a script could not see QEMU's own
    error, nor which side still holds the guest."""
    g = pair
    async with started(tmp_path, *g.args, "--json", "-c", f"@src migrate --to dst --strategy precopy {SLOW}") as k:
        await g.until(MigrationStatus.ACTIVE)
        await k.line(lambda text: "kvmshell: src: active" in text)
        os.kill(g.dst.pid, signal.SIGKILL)
        rc, out, err = await k.end()
    assert rc == 1, err
    [line] = out.splitlines()
    obj = json.loads(line)
    assert obj["ok"] is False, obj
    [item] = obj["outcomes"]
    assert item["ok"] is False and item["title"] == "migration failed" and "failed" in item["error"], item
    result = item["result"]
    assert result["status"] == "failed" and result["sent_bytes"] > 0 and isinstance(result["total_s"], float), result
    assert isinstance(result["qemu_error"], str) and result["qemu_error"], result        # QEMU's error-desc
    assert result["source_state"] == "running" and result["dest_state"] == "unreachable", result


async def test_cancelled_by_someone_else_exits_1(pair: Guests, tmp_path: Path) -> None:
    g = pair
    async with started(tmp_path, *g.args, "-c", f"@src migrate --to dst {SLOW}") as k:
        await g.until(MigrationStatus.ACTIVE)
        await g.side.migrate_cancel()
        rc, out, err = await k.end()
    assert rc == 1, err
    assert out.startswith("src: migration cancelled"), out
    assert (await g.side.status()).state is RunState.RUNNING


async def test_postcopy_left_paused_exits_3(pair: Guests, tmp_path: Path) -> None:
    g = pair
    async with started(tmp_path, *g.args, "-c", "@src migrate_set_parameter max-postcopy-bandwidth 512K",
                       "-c", "@src migrate --to dst --strategy postcopy --bandwidth 4M") as k:
        # the guest runs there once it asks for pages: a pause now is a real split. Waiting for its
        # heartbeat instead let postcopy end first on a loaded machine.
        await wait_for(g.side.migration, lambda m: m.status is MigrationStatus.POSTCOPY_ACTIVE
                       and m.ram is not None and m.ram.postcopy_requests > 0, timeout=60,
                       what="the guest running on dst in postcopy")
        await g.side.migrate_pause()
        rc, out, err = await k.end()
    assert rc == 3, err
    assert "DANGER" in out and "migrate_recover" in out, out
    assert await g.status() is MigrationStatus.POSTCOPY_PAUSED


@pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)")
async def test_to_host_left_paused_in_postcopy_exits_3(lab: Lab, bed: SshTestbed,  # noqa: F811
                                                       tmp_path: Path) -> None:
    """`migrate --to-host` (kvmshell starts the destination on host b) that breaks in postcopy: the exit
    status says the guest is split and recoverable, and both QEMUs are left alone."""
    vm = f"pc{secrets.token_hex(3)}"                # the test hosts share this machine's process table
    side_path = lab.workdir / "pc-side.qmp"
    src = await lab.start(vm, MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=RAM,
                          extra_args=("-chardev", f"socket,id=side,path={side_path},server=on,wait=off",
                                      "-mon", "chardev=side,mode=control"))
    await src.wait_heartbeats(1)
    config = tmp_path / "kvmshell.toml"
    config.write_text(bed.config_toml())
    home = tmp_path / "home"                        # the user's ~/.ssh/known_hosts knows host b
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(bed["b"].known_hosts_line())
    run_dir = tmp_path / "run"

    def dest() -> list[int]:                        # the destination QEMU kvmshell starts on b
        return [pid for pid in processes_mentioning(vm) if pid != src.pid]
    try:
        async with Fleet() as fleet:
            fleet.add("side", Address.unix(Protocol.QMP, str(side_path)))
            await fleet.start()
            side = fleet.monitor("side")
            async with started(tmp_path, "--config", str(config), "--guest", f"{vm}={src.address}", "-y",
                               "-c", f"@{vm} migrate_set_parameter max-postcopy-bandwidth 1M",
                               "-c", f"@{vm} migrate --to-host b --dir {run_dir} --strategy postcopy --bandwidth 4M",
                               HOME=str(home)) as k:
                # the guest runs on b once it asks for pages: a pause before that is another case (the
                # destination has not loaded the device state and QEMU there gives up on its own)
                await wait_for(side.migration, lambda m: m.status is MigrationStatus.POSTCOPY_ACTIVE
                               and m.ram is not None and m.ram.postcopy_requests > 0, timeout=60,
                               what="the guest running on b in postcopy")
                await side.migrate_pause()
                rc, out, err = await k.end()
            assert rc == 3, err
            assert "DANGER" in err and "migrate_recover" in err and "left as it is" in err, err
            assert (await side.migration()).status is MigrationStatus.POSTCOPY_PAUSED
            assert dest(), f"the destination QEMU on b was not left alone; stderr: {err}"
    finally:
        for pid in dest():
            os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: asyncio.sleep(0, dest()), lambda left: not left,
                       timeout=10, what="the destination QEMU exited")
        for moved in Path("/run/kvmshell").glob(f"{vm}.*"):     # sockets moved there when the path is long
            shutil.rmtree(moved, ignore_errors=True)


async def test_run_file_waits_before_the_next_line(lab: Lab, tmp_path: Path) -> None:
    """`run FILE`: a plain `migrate URI` (QEMU's own, not steered) is followed too, so the next line
    sees the migration ended (it used to see it just begun, the source still running)."""
    async with guests(lab, tmp_path, ws=512) as g:
        port = free_port()
        script = tmp_path / "move.kvm"
        script.write_text(f"@dst migrate_incoming tcp:127.0.0.1:{port}\n@src migrate_set_speed 16M\n"
                          f"@src migrate tcp:127.0.0.1:{port}\n@src info status\n")
        rc, out, err = await kvmshell(tmp_path, *g.args, "run", str(script), timeout=120)
        assert rc == 0, err
        assert "src: completed in" in out and out.rstrip().endswith("VM status: paused (postmigrate)"), out
        assert "steering" not in err


async def test_progress_of_a_line_goes_to_stderr(pair: Guests, tmp_path: Path) -> None:
    """`-c` used to drop every progress message (the session had no sink for them)."""
    rc, out, err = await kvmshell(pair.tmp, *pair.args, "-c", "@src estimate --link 1gbit")
    assert rc == 0, err
    assert "kvmshell: src: measuring the dirty rate" in err, err
    assert "measuring" not in out and "Nothing was started." in out, out


# -- --detach and Ctrl-C ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["line", "global"])
async def test_detach_leaves_it_to_qemu_and_says_so(pair: Guests, tmp_path: Path, where: str) -> None:
    g = pair
    line = f"@src migrate --to dst --strategy auto --allow-postcopy {SLOW}"
    args = [*g.args, "-c", line + " --detach"] if where == "line" else [*g.args, "--detach", "-c", line]
    rc, out, err = await kvmshell(tmp_path, *args)
    assert rc == 0, err
    assert "steering" in err and "watchdog" in err and "max-bandwidth" in err, err
    assert await g.status() is MigrationStatus.ACTIVE            # QEMU carries it on
    # the settings the migration runs with are left on both sides (postcopy needs them on both)
    assert (await g.side.migrate_capabilities())["postcopy-ram"] is True
    rc, out, err2 = await kvmshell(tmp_path, *g.args, "-c", "@dst info migrate_capabilities")
    assert rc == 0 and re.search(r"^postcopy-ram: on$", out, re.M), out
    cancel = re.search(r"kvmshell (-g \S+ -c 'migrate_cancel')", err)
    assert cancel, err
    rc, out, _ = await kvmshell(tmp_path, *shlex.split(cancel.group(1)))
    assert rc == 0 and "cancelled" in out, out
    await g.until(MigrationStatus.CANCELLED)


async def test_detach_of_a_plain_migration_does_not_speak_of_steering(pair: Guests, tmp_path: Path) -> None:
    g = pair
    port = free_port()
    rc, out, err = await kvmshell(tmp_path, *g.args, "-c", f"@dst migrate_incoming tcp:127.0.0.1:{port}")
    assert rc == 0, err
    rc, out, err = await kvmshell(tmp_path, *g.args, "--detach", "-c", "@src migrate_set_speed 1M", "-c",
                                  f"@src migrate tcp:127.0.0.1:{port}")
    assert rc == 0, err
    assert "steering" not in err and "migrate_cancel" in err, err
    assert await g.status() is MigrationStatus.ACTIVE
    await g.side.migrate_cancel()


async def test_ctrl_c_stops_following_and_says_how_to_cancel(pair: Guests, tmp_path: Path) -> None:
    g = pair
    async with started(tmp_path, *g.args, "-c", f"@src migrate --to dst --strategy converge {SLOW}") as k:
        await k.line(lambda text: "kvmshell: src: active" in text)
        k.proc.send_signal(signal.SIGINT)
        rc, out, err = await k.end()
    assert rc == 130, err
    assert "Traceback" not in err
    assert "stopped following" in err and "active" in err and "max-bandwidth" in err, err
    assert await g.status() is MigrationStatus.ACTIVE
    cancel = re.search(r"kvmshell (-g \S+ -c 'migrate_cancel')", err)
    assert cancel, err
    rc, out, _ = await kvmshell(tmp_path, *shlex.split(cancel.group(1)))
    assert rc == 0 and "cancelled" in out
    await g.until(MigrationStatus.CANCELLED)


# -- --watch returns at the end, for every strategy and outcome -----------------------------------------

@pytest.mark.parametrize("strategy", ["precopy", "converge", "postcopy", "auto", "auto --allow-postcopy"])
async def test_watch_returns_when_completed(lab: Lab, tmp_path: Path, strategy: str) -> None:
    async with guests(lab, tmp_path, ws=512) as g:
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c",
                                      f"@src migrate --to dst --strategy {strategy} --bandwidth 16M --watch",
                                      timeout=150)
        assert rc == 0, err
        assert "Migration status: completed" in out and out.rstrip().splitlines()[-1].startswith("src: completed"), \
            out[-2000:]


async def test_watch_of_a_plain_migration_returns_when_completed(lab: Lab, tmp_path: Path) -> None:
    """Strategy none: QEMU's own `migrate URI`, left to run by --detach, then watched by the next line."""
    async with guests(lab, tmp_path, ws=512) as g:
        port = free_port()
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c", f"@dst migrate_incoming tcp:127.0.0.1:{port}",
                                      "-c", "@src migrate_set_speed 16M",
                                      "-c", f"@src migrate --detach tcp:127.0.0.1:{port}",
                                      "-c", "@src info migrate --watch", timeout=150)
        assert rc == 0, err
        assert "Migration status: completed" in out, out[-2000:]
        assert "steering" not in err, err


async def test_watch_of_migrate_uri_returns_when_completed(lab: Lab, tmp_path: Path) -> None:
    """Strategy none (observe): `migrate URI --watch`, QEMU's own migration that kvmshell follows."""
    async with guests(lab, tmp_path, ws=512) as g:
        port = free_port()
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c", f"@dst migrate_incoming tcp:127.0.0.1:{port}",
                                      "-c", "@src migrate_set_speed 16M",
                                      "-c", f"@src migrate tcp:127.0.0.1:{port} --watch", timeout=150)
        assert rc == 0, err
        assert "Migration status: completed" in out, out[-2000:]
        assert "steering" not in err, err


@pytest.mark.parametrize(("strategy", "outcome"), [
    ("precopy", "failed"), ("precopy", "cancelled"), ("converge", "cancelled"), ("auto", "cancelled"),
    ("none", "cancelled"), ("postcopy", "postcopy-paused")])
async def test_watch_returns_when_it_breaks(pair: Guests, tmp_path: Path, strategy: str, outcome: str) -> None:
    g = pair
    setup: list[str] = []
    if strategy == "none":                          # QEMU's own `migrate URI`, followed (with --watch it
        port = free_port()                          # would run auto, which uncaps the bandwidth)
        setup = ["-c", f"@dst migrate_incoming tcp:127.0.0.1:{port}", "-c", "@src migrate_set_speed 1M"]
        line = f"@src migrate tcp:127.0.0.1:{port}"
    elif strategy == "postcopy":
        setup = ["-c", "@src migrate_set_parameter max-postcopy-bandwidth 1M"]
        line = "@src migrate --to dst --strategy postcopy --bandwidth 4M --watch"
    else:
        line = f"@src migrate --to dst --strategy {strategy} {SLOW} --watch"
    async with started(tmp_path, *g.args, *setup, "-c", line) as k:
        if outcome == "postcopy-paused":
            await g.until(MigrationStatus.POSTCOPY_ACTIVE)
            await g.dst.wait_heartbeats(1)
            await g.side.migrate_pause()
        else:
            await g.until(MigrationStatus.ACTIVE)
            if outcome == "failed":
                os.kill(g.dst.pid, signal.SIGKILL)
            else:
                await g.side.migrate_cancel()
        rc, out, err = await k.end()
    assert rc == (3 if outcome == "postcopy-paused" else 1), err
    assert (f"Migration status: {outcome}" in out or f"migration {outcome}" in out
            or outcome == "failed"), out[-2000:]


async def test_on_a_terminal_the_progress_is_one_live_line(lab: Lab, tmp_path: Path) -> None:
    """stderr on a terminal: the state is rewritten in place (\\r), only decisions stay as lines."""
    async with guests(lab, tmp_path, ws=512) as g:
        master, slave = os.openpty()
        seen = bytearray()
        loop = asyncio.get_running_loop()

        def drain() -> None:
            try:
                seen.extend(os.read(master, 65536))
            except OSError:                          # EIO: the last writer has gone
                loop.remove_reader(master)
        loop.add_reader(master, drain)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kvmshell.cli", *g.args, "-c",
                "@src migrate --to dst --strategy precopy --bandwidth 16M", env=env_for(tmp_path),
                stdout=asyncio.subprocess.PIPE, stderr=slave)
            os.close(slave)
            try:
                async with asyncio.timeout(120):
                    out, _ = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await wait_for(lambda: asyncio.sleep(0, bytes(seen)), lambda b: b"completed" in b or b.count(b"\r") > 2,
                           timeout=10, what="the terminal's bytes")
        finally:
            loop.remove_reader(master)
            os.close(master)
        text = seen.decode(errors="replace")
        assert proc.returncode == 0, text
        assert out.decode().startswith("src: completed in "), out
        assert "\r\x1b[Kkvmshell: src: active" in text and text.endswith("\r\x1b[K"), text   # cleared at the end
        assert not re.search(r"kvmshell: src: active[^\r\n]*\r?\n", text), text     # never left as a line


async def test_detach_with_what_needs_kvmshell_is_refused_in_one_line(pair: Guests, tmp_path: Path) -> None:
    g = pair
    for extra, why in (("--watch", "--watch"), ("--copy-storage all", "--copy-storage")):
        rc, out, err = await kvmshell(tmp_path, *g.args, "-c", f"@src migrate --to dst --detach {extra}")
        assert rc == 1 and out == "", (out, err)
        assert err.count("\n") == 1 and "--detach" in err and why in err and "Traceback" not in err, err
    assert await g.status() is MigrationStatus.NONE


async def test_ctrl_c_during_a_disk_copy_cancels_it(lab: Lab, tmp_path: Path) -> None:
    """A disk copy completes at the switch-over, with kvmshell: Ctrl-C cannot leave it to QEMU, so it
    cancels it, and the source runs on as before."""
    from tests.test_storage import data_drive, offline_io, qcow2
    src_data, dst_data = await qcow2(lab.workdir / "src-data.qcow2"), await qcow2(lab.workdir / "dst-data.qcow2")
    await offline_io(src_data, "write -P 0x31 0 8M")           # 8 MiB at 1 MB/s: the mirror takes a while
    side_path = lab.workdir / "src-side.qmp"
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, pace=2, ram_mib=RAM,
                          extra_args=(*data_drive(src_data), "-chardev",
                                      f"socket,id=side,path={side_path},server=on,wait=off",
                                      "-mon", "chardev=side,mode=control"))
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True,
                          extra_args=data_drive(dst_data))
    args = ["--guest", f"src={src.address}", "--guest", f"dst={dst.address}"]
    async with Fleet() as fleet:
        fleet.add("side", Address.unix(Protocol.QMP, str(side_path)))
        await fleet.start()
        side = fleet.monitor("side")
        async with started(tmp_path, *args, "-c", "@src migrate --to dst --copy-storage all --bandwidth 1M") as k:
            await k.line(lambda text: "kvmshell: src: starting" in text)
            k.proc.send_signal(signal.SIGINT)
            rc, out, err = await k.end()
        assert rc == 130, err
        assert "Ctrl-C: cancelled" in err and "src runs on as before" in err, err
        assert (await side.status()).state is RunState.RUNNING
        assert (await side.migration()).status is MigrationStatus.NONE          # `migrate` was never sent


async def test_ctrl_c_leaves_a_tls_migration_its_credentials(pair: Guests, tmp_path: Path) -> None:
    """The job used to drop the source's TLS credentials as kvmshell exited, under the running migration."""
    from kvmshell.core.migration.tls import init_ca
    g = pair
    init_ca(tmp_path / "pki", ["localhost"])
    async with started(tmp_path, *g.args, "-c", f"@src migrate --to dst --tls {tmp_path}/pki {SLOW}") as k:
        await k.line(lambda text: "kvmshell: src: active" in text)
        k.proc.send_signal(signal.SIGINT)
        rc, out, err = await k.end()
    assert rc == 130, err
    assert "the TLS credentials (tls-creds) stay set" in err, err
    assert await g.status() is MigrationStatus.ACTIVE
    assert (await g.side.migrate_parameters()).get("tls-creds") == "kvmshell-tls"
    await g.side.migrate_cancel()
