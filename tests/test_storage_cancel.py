"""A cancel (Ctrl-C) that lands while QEMU carries out one of the disk copy's commands: QEMU made the
node or the mirror job, kvmshell never saw the answer. Real QEMU; the cancel is made to land at that
moment by cancelling the job right after the real command returns, before kvmshell records it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvmshell.core.values.models import RunState
from tests.test_storage import Rig, no_leftovers_on_source, qcow2, rig, start_pair  # noqa: F401 (rig: a fixture)

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("command", ["blockdev_add_nbd", "blockdev_mirror"])
async def test_a_cancel_as_qemu_answers_a_disk_copy_command_still_undoes_it(
        rig: Rig, command: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (rig: the fixture)
    w = rig.lab.workdir
    await start_pair(rig, await qcow2(w / "src-data.qcow2"), await qcow2(w / "dst-data.qcow2"))
    src = rig.mon("src")
    real = getattr(src, command)
    landed = asyncio.Event()

    async def then_cancelled(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)      # QEMU did it ...
        if not landed.is_set():
            landed.set()
            await rig.session.migrations["src"].cancel()    # ... and the user's Ctrl-C lands now
            await asyncio.sleep(0)                          # where the cancel reaches the starting stages
        return result

    monkeypatch.setattr(src, command, then_cancelled)
    await rig.ok("@src migrate --to dst --copy-storage all --strategy precopy --bandwidth 1M")
    job = rig.session.migrations["src"]
    outcome = await asyncio.wait_for(job.wait(), 20)      # the bug: 30 s waiting for a job it never cancelled
    assert landed.is_set()
    assert outcome.status == "cancelled", outcome.full_message
    assert "runs on as before" in outcome.full_message
    assert (await src.status()).state is RunState.RUNNING
    await no_leftovers_on_source(rig)
