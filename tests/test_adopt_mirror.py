"""A kvmshell killed (kill -9) while its disk copy runs, before it sent `migrate` (`--copy-storage`):
the state file was written before its first change to either side, so `migrate --follow` takes the
start over (the mirrors finish, `migrate` is sent, the rest as usual) and `migrate_cancel` undoes it
(the mirrors cancelled, the NBD server stopped, both sides' settings as before). Real `kvmshell`
processes and real lab guests (the pair of tests/test_adopt_stages.py: a second QMP monitor each)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.lab.launcher import Lab
from kvmshell.lab.verify import check_guest_memory
from tests.test_adopt import settings, state_files
from tests.test_adopt_stages import Pair, completed_and_cleaned, copy_pair, kvmshell_nodes
from tests.test_scripts import started
from tests.test_storage import WS, compare
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]
# 2 MB/s per disk: the 8 MiB written to the data disk keep the mirrors busy for seconds, `migrate` unsent
SLOW = "--strategy precopy --bandwidth 4M --stall-timeout 60"


async def kill_9_while_mirroring(p: Pair, tmp_path: Path) -> dict[str, Any]:
    """`kvmshell -c "@src migrate --to dst --copy-storage all"`, killed once both mirrors run (as its
    state file says) and before `migrate` is sent: the state file it left."""
    async def state() -> dict[str, Any]:
        files = state_files(tmp_path)
        return json.loads(files[0].read_text()) if files else {}

    async with started(tmp_path, *p.args, "-c", f"@src migrate --to dst --copy-storage all {SLOW}") as first:
        left = await wait_for(state, lambda d: d.get("phase") == "prepared" and len((d.get("storage") or {})
                                                                                     .get("jobs", ())) == 2,
                              what="the state file of the start, both mirrors running")
        # the state file is written before each change: the second mirror may not be in QEMU yet
        await wait_for(p.side.block_jobs, lambda jobs: len(jobs) == 2, what="both mirrors in QEMU")
        first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL
    assert await p.status() is MigrationStatus.NONE            # `migrate` was never sent
    assert len(await p.side.block_jobs()) == 2 and len(await p.dside.execute("query-block-exports")) == 2
    assert await state() == left
    return left


async def test_kill_9_before_migrate_then_follow_finishes_the_copy_and_migrates(lab: Lab, tmp_path: Path) -> None:
    async with copy_pair(lab) as p:
        src_before, dst_before = await settings(p.side), await settings(p.dside)
        await p.io("write -P 0x11 0 8M")
        state = await kill_9_while_mirroring(p, tmp_path)
        assert state["before"]["source"]["parameters"]["max-bandwidth"] == src_before[1]["max-bandwidth"], state
        assert state["storage"]["server"]["path"] and state["uri"], state
        async with started(tmp_path, *p.args, "-c", "@src migrate --follow") as second:
            await second.line(lambda text: "took over the start" in text)
            await wait_for(p.status, lambda s: s is MigrationStatus.ACTIVE, what="`migrate` sent")
            await p.side.set_parameters({"max-bandwidth": 1 << 30})        # let RAM converge
            rc, out, err = await second.end()
        assert rc == 0, err
        await completed_and_cleaned(p, out)
        assert await settings(p.side) == src_before
        assert (await settings(p.dside))[1] == dst_before[1]
        assert state_files(tmp_path) == []
        assert (await p.dside.status()).state is RunState.RUNNING
        check = await check_guest_memory(p.dside, WS, tmp_path)
        assert check.ok, check.problems
        await p.quit()
        assert await compare(p.src_data, p.dst_data) == (0, "Images are identical.")


async def test_kill_9_before_migrate_then_migrate_cancel_undoes_everything(lab: Lab, tmp_path: Path) -> None:
    async with copy_pair(lab) as p:
        src_before, dst_before = await settings(p.side), await settings(p.dside)
        nodes_before = len(await p.side.execute("query-named-block-nodes"))
        await p.io("write -P 0x11 0 8M")
        await kill_9_while_mirroring(p, tmp_path)
        async with started(tmp_path, *p.args, "-c", "@src migrate_cancel") as second:
            rc, out, err = await second.end()
        assert rc == 0, err
        assert "cancelled" in out and "2 mirror job(s) cancelled" in out and "NBD server on dst stopped" in out, out
        assert await p.side.block_jobs() == () and await kvmshell_nodes(p.side) == []
        assert len(await p.side.execute("query-named-block-nodes")) == nodes_before
        assert await p.dside.execute("query-block-exports") == []
        assert await settings(p.side) == src_before and await settings(p.dside) == dst_before
        assert state_files(tmp_path) == []
        assert (await p.side.status()).state is RunState.RUNNING
        await p.io("read -P 0x11 0 8M")
