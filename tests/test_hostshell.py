"""Commands run on this host (hosts.shell): a command cancelled half-way (Ctrl-C during a copy cancels
the source's checksum) is killed with everything it started and reaped, so that nothing outlives it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from kvmshell.core.hosts.shell import run_here
from tests.waiting import wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _gone(pid: int) -> None:
    async def alive() -> bool:
        return _alive(pid)
    await wait_for(alive, lambda a: not a, timeout=5, what=f"process {pid} gone")


async def _pids(path: Path, n: int) -> list[int]:
    async def read() -> list[int]:
        return [int(p) for p in path.read_text().split()] if path.exists() else []
    return await wait_for(read, lambda p: len(p) == n, timeout=10, what=f"{n} pids in {path}")


async def test_a_cancelled_command_is_killed_with_its_children_and_reaped(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # a pipeline, like the checksum of a prefix (head | b2sum): sh, and two children that would outlive it
    task = asyncio.ensure_future(run_here(f"echo $$ >> {pids}; sleep 30 & echo $! >> {pids}; "
                                          f"sleep 30 | cat; true", 60))
    sh, child = await _pids(pids, 2)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("run_here swallowed the cancellation")
    assert not _alive(sh), "sh still exists (not killed, or not reaped)"
    await _gone(child)


async def test_a_command_that_overruns_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = await run_here(f"sleep 30 & echo $! >> {pids}; wait", 1.0)
    assert result is None
    [child] = await _pids(pids, 1)
    await _gone(child)
