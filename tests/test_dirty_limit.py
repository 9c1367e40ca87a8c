"""The converge strategy: dirty-limit where the source's QEMU has it and KVM's dirty ring is on,
auto-converge otherwise, and the decision says which and why. Real QEMU guests.

QEMU 7.2 (Debian 12) has no dirty-limit capability: the fallback is tested with it. The dirty-limit
path needs QEMU >= 8.1: those tests run only when KVMSHELL_QEMU_NEW names such a QEMU binary (or a
wrapper script that passes its arguments on, e.g. adding -L for its firmware).

The one that migrates with KVM's dirty ring on also needs KVMSHELL_DIRTY_RING_OK=1: on the machine
this was written on (KVM is kvm_pvm) the dirty ring is broken. QEMU 10.0 accepts dirty-ring-size and
the dirty-limit capability there, but while dirty logging is on the guest's vCPU barely runs, the
kernel warns in kvm_dirty_ring_push (virt/kvm/dirty_ring.c:225, from pvm_emulate_insn_scrubbed), and
3 of 5 migrations (plain precopy too) arrived with 139-250 of 4096 working-set pages stale.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from kvmshell.core.migration.live.job import MigrationJob
from kvmshell.core.migration.model.samples import load_trace
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.verify import check_guest_memory
from tests.test_live import Pair, attached
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]
WS = 4096                      # 16 MiB working set, rewritten flat out: does not converge at 20 MB/s
RAM = 64
NEW_QEMU = os.environ.get("KVMSHELL_QEMU_NEW", "")
needs_new_qemu = pytest.mark.skipif(not NEW_QEMU, reason="KVMSHELL_QEMU_NEW does not name a QEMU >= 8.1 binary")


@asynccontextmanager
async def make_pair(lab: Lab, prefix: tuple[str, ...] = (), accel: str | None = None) -> AsyncIterator[Pair]:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, prefix=prefix, accel=accel)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ws_pages=WS, ram_mib=RAM, incoming=True, disk=src.disk,
                          prefix=prefix, accel=accel)
    async with attached(src, dst) as p:
        yield p


@pytest.fixture
async def pair(lab: Lab) -> AsyncIterator[Pair]:
    async with make_pair(lab) as p:
        yield p


def new_qemu(lab: Lab) -> tuple[str, ...]:
    """A Lab prefix that runs KVMSHELL_QEMU_NEW in place of the system's qemu-system-x86_64."""
    if lab.accel != "kvm":
        pytest.skip("dirty-limit needs KVM")
    return ("sh", "-c", 'shift; exec "$KVMSHELL_QEMU_NEW" "$@"', "sh")


def decision(job: MigrationJob, name: str) -> str:
    return next((d for d in job.decisions if f" {name}: " in d), "")


async def test_converge_falls_back_to_auto_converge_and_says_why(pair: Pair, tmp_path: Path) -> None:
    src = pair.session.fleet.monitor("src")
    if "dirty-limit" in await src.migrate_capabilities():
        pytest.skip("this QEMU has dirty-limit: the fallback for QEMU < 8.1 cannot be shown with it")
    trace = tmp_path / "run.jsonl"
    await pair.ok(f"@src migrate --to dst --strategy converge --bandwidth 20M --trace {trace}")
    job = pair.job()
    assert "auto-converge: dirty-limit not used, this QEMU has no dirty-limit capability" in \
        decision(job, "converge-with")
    # the model sees it will not converge at 20 MB/s and throttles: with auto-converge, saying why
    await wait_for(lambda: asyncio.sleep(0, decision(job, "throttle")), bool, what="the throttle decision")
    throttle = decision(job, "throttle")
    assert "auto-converge" in throttle and "this QEMU has no dirty-limit capability" in throttle, throttle
    caps = await src.migrate_capabilities()
    assert caps["auto-converge"] and "dirty-limit" not in caps
    await pair.ok("@src migrate_cancel")
    assert (await pair.finished()).data["status"] == "cancelled"
    events = [e for e in load_trace(trace).events if e.source == "kvmshell"]
    assert any(e.name == "converge-with" and "no dirty-limit capability" in e.detail["reason"] for e in events)


@needs_new_qemu
async def test_newer_qemu_without_dirty_ring_refuses_dirty_limit_and_says_so(lab: Lab) -> None:
    async with make_pair(lab, new_qemu(lab), accel="kvm") as pair:
        src = pair.session.fleet.monitor("src")
        assert "dirty-limit" in await src.migrate_capabilities()
        await pair.ok("@src migrate --to dst --strategy converge --bandwidth 20M")
        said = decision(pair.job(), "converge-with")
        assert "auto-converge: dirty-limit not used, QEMU refused it" in said and "dirty-ring-size" in said, said
        caps = await src.migrate_capabilities()
        assert caps["auto-converge"] and not caps["dirty-limit"]
        await pair.ok("@src migrate_cancel")
        assert (await pair.finished()).data["status"] == "cancelled"


@needs_new_qemu
@pytest.mark.skipif(os.environ.get("KVMSHELL_DIRTY_RING_OK") != "1",
                    reason="KVMSHELL_DIRTY_RING_OK=1 not set: KVM's dirty ring is not trusted here (kvm_pvm's "
                           "loses dirtied pages: the destination's memory check fails, with any strategy)")
async def test_newer_qemu_with_dirty_ring_converges_with_dirty_limit(lab: Lab, tmp_path: Path) -> None:
    async with make_pair(lab, new_qemu(lab), accel="kvm,dirty-ring-size=4096") as pair:
        src = pair.session.fleet.monitor("src")
        await pair.ok("@src migrate --to dst --strategy converge --bandwidth 20M")
        said = decision(pair.job(), "converge-with")
        assert "dirty-limit: this QEMU has it and KVM's dirty ring is on" in said, said
        caps = await src.migrate_capabilities()
        assert caps["dirty-limit"] and not caps["auto-converge"]
        params = await src.migrate_parameters()
        assert params.values["vcpu-dirty-limit"] == 10       # half of 20 MiB/s, one vCPU
        ev = await pair.finished()
        assert ev.data["status"] == "completed", ev.data
        await pair.dst.wait_heartbeats(2)
        check = await check_guest_memory(pair.session.fleet.monitor("dst"), WS, tmp_path)
        assert check.ok, check.summary()
