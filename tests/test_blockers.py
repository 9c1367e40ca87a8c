"""Guests that cannot migrate: the reason QEMU gives, and what to do about it, before anything starts."""

from __future__ import annotations

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.migration.live.blockers import DEFAULT, advice
from kvmshell.core.values.models import MigrationStatus, RunState
from kvmshell.core.commands.session import Session
from kvmshell.lab.launcher import Lab, MonitorKind


def test_advice() -> None:
    assert "master=on" in advice("Migration is disabled when using feature 'peer mode' in device 'ivshmem'")
    assert "device_del" in advice("VFIO device doesn't support migration")
    assert advice("something new") == DEFAULT


@pytest.mark.qemu
async def test_ivshmem_peer_mode_is_reported_before_starting(lab: Lab) -> None:
    """QEMU 7.2 blocks migration of ivshmem-plain without master=on."""
    shm = lab.workdir / "shm"
    src = await lab.start("src", MonitorKind.QMP_UNIX, paused=True, extra_args=(
        "-object", f"memory-backend-file,id=hm,size=1M,mem-path={shm},share=on",
        "-device", "ivshmem-plain,memdev=hm,id=ivs0"))
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, incoming=True)
    async with Fleet() as fleet:
        fleet.add("src", src.address)
        fleet.add("dst", dst.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        for line in ("migrate --to dst", "migrate tcp:127.0.0.1:4444"):
            [o] = await session.run_line(f"@src {line}")
            assert not o.ok and "cannot migrate" in (o.error or "") and "peer mode" in (o.error or "")
            assert "master=on" in (o.error or "")
        assert (await fleet.monitor("src").migration()).status is MigrationStatus.NONE      # nothing started
        assert (await fleet.monitor("dst").status()).state is RunState.INMIGRATE            # still waiting
        assert (await fleet.monitor("dst").migration()).status is MigrationStatus.NONE
        await session.aclose()
