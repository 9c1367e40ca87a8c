"""The warning before a live migration that QEMU's TCG dirty-tracking bug (QEMU < 9.0, RAM a multiple
of 256 KiB) can corrupt: the decision as a pure function, and the warning on stderr of `-c`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.migration.tcgdirty import tcg_dirty_warning
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values.models import QemuVersion
from kvmshell.lab.launcher import Lab, MonitorKind
from kvmshell.lab.linuxguest import qemu_version
from tests.sshd import HAVE_SSHD, SshTestbed
from tests.test_cli import kvmshell
from tests.test_ssh import pool_for
from tests.test_static import bed  # noqa: F401  (the fixture)

MIB = 1024 * 1024
OLD, FIXED = QemuVersion(7, 2, 22), QemuVersion(9, 0, 0)


def test_warns_under_tcg_on_an_old_qemu_with_aligned_ram() -> None:
    w = tcg_dirty_warning("src", False, OLD, 512 * MIB)
    assert w == ("src: QEMU 7.2 under TCG can lose guest writes in migration when RAM is a multiple of 256 KiB "
                 "(fixed in QEMU 9.0): use KVM, QEMU >= 9.0, or a RAM size such as 524296K")
    assert tcg_dirty_warning("src", False, QemuVersion(8, 2, 9), 256 * 1024) is not None


@pytest.mark.parametrize(("kvm", "version", "ram"), [
    (True, OLD, 512 * MIB),                      # KVM tracks dirty pages itself
    (False, FIXED, 512 * MIB),                   # the fix is in
    (False, QemuVersion(10, 1, 0), 64 * MIB),
    (False, OLD, 512 * MIB + 8 * 1024),          # padded by one 8 KiB page: 524296K
    (False, OLD, 65544 * 1024),                  # 65544K
    (False, None, 512 * MIB),                    # version unknown: nothing to say
])
def test_no_warning_where_the_bug_cannot_bite(kvm: bool, version: QemuVersion | None, ram: int) -> None:
    assert tcg_dirty_warning("src", kvm, version, ram) is None


@pytest.fixture
def qemu() -> tuple[int, int]:
    """(major, minor) of the lab's QEMU, asked outside the event loop."""
    return qemu_version()


async def _migrate(lab: Lab, tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    src = await lab.start("src", MonitorKind.QMP_UNIX, ram_mib=64, accel="tcg", extra_args=extra)
    dst = await lab.start("dst", MonitorKind.QMP_UNIX, ram_mib=64, accel="tcg", extra_args=extra,
                          incoming=True, disk=src.disk)
    return await kvmshell(tmp_path, "--guest", f"src={src.address}", "--guest", f"dst={dst.address}",
                          "-c", "@src migrate --to dst", timeout=120)


@pytest.mark.qemu
async def test_a_tcg_guest_with_aligned_ram_is_warned_about(lab: Lab, tmp_path: Path,
                                                            qemu: tuple[int, int]) -> None:
    """64 MiB under TCG: warned about once on a QEMU before 9.0, not at all on a fixed one."""
    rc, _, err = await _migrate(lab, tmp_path)
    assert rc == 0, err
    said = [line for line in err.splitlines() if "under TCG can lose guest writes" in line]
    warnings = [line for line in said if line.startswith("kvmshell: src: warning: src: QEMU ")]
    if qemu >= (9, 0):
        assert said == [], err
    else:       # said before the start; the live view's status line (stage rows) may repeat it
        assert len(warnings) == 1 and warnings[0].endswith("a RAM size such as 65544K"), err


@pytest.mark.qemu
async def test_a_tcg_guest_with_padded_ram_is_not_warned_about(lab: Lab, tmp_path: Path) -> None:
    """-m 65544K (64 MiB and one 8 KiB page, given after the lab's -m 64): no warning."""
    rc, _, err = await _migrate(lab, tmp_path, ("-m", "65544K"))
    assert rc == 0, err
    assert "under TCG" not in err, err


@pytest.mark.qemu
async def test_a_plain_migrate_over_hmp_is_warned_about(lab: Lab, tmp_path: Path, qemu: tuple[int, int]) -> None:
    """`migrate URI` (QEMU runs it alone) from an HMP guest: the same check through `info kvm`."""
    if qemu >= (9, 0):
        pytest.skip(f"QEMU {qemu[0]}.{qemu[1]} has the fix: nothing to warn about")
    src = await lab.start("src", MonitorKind.HMP_UNIX, ram_mib=64, accel="tcg")
    rc, out, err = await kvmshell(tmp_path, "--guest", f"src={src.address}", "-c", "@src migrate exec:cat>/dev/null",
                                timeout=120)
    assert rc == 0, err
    # stderr while kvmshell follows the migration; stdout with the result when it was over at once
    warnings = [line for line in (out + err).splitlines() if "warning: src: QEMU " in line]
    assert len(warnings) == 1 and warnings[0].endswith("a RAM size such as 65544K"), (out, err)


@pytest.mark.qemu
@pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH server not installed (make test installs it)")
async def test_a_dry_run_to_another_host_is_warned_about(lab: Lab, bed: SshTestbed, tmp_path: Path,  # noqa: F811
                                                        qemu: tuple[int, int]) -> None:
    """`migrate --to-host b --dry-run`: the plan carries the warning (nothing is started)."""
    if qemu >= (9, 0):
        pytest.skip(f"QEMU {qemu[0]}.{qemu[1]} has the fix: nothing to warn about")
    src = await lab.start("src", MonitorKind.QMP_UNIX, ram_mib=64, accel="tcg")
    async with Fleet(hosts=pool_for(bed), backoff=(0.05, 0.5)) as fleet:
        fleet.add("src", src.address)
        await fleet.start()
        session = Session(fleet, default_registry(), assume_yes=True)
        try:
            [o] = await session.run_line(f"@src migrate --to-host b --dir {tmp_path}/run --dry-run")
        finally:
            await session.aclose()
    assert o.ok and o.result is not None, o.error
    text = o.result.text()
    tcg = [line for line in text.splitlines() if "under TCG can lose guest writes" in line]
    assert len(tcg) == 1 and tcg[0].startswith("warning: src: QEMU ") and "nothing was started" in text, text
