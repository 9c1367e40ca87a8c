"""A warning before a live migration that QEMU's TCG dirty-tracking bug can corrupt.

QEMU before 9.0 under TCG loses guest writes during migration when a RAM block's size is a multiple
of 256 KiB: the dirty-bitmap sync clears the bits without re-arming the vCPU's TLB, so later stores
are never sent, and the destination crashes or holds stale pages (fixed upstream by 03bfc2188f
"physmem: Fix migration dirty bitmap coherency with TCG memory access"; Debian 12's 7.2 has it).
The migration still runs; the user is told once, with what avoids it.
"""

from __future__ import annotations

from kvmshell.core.monitor.base import Monitor
from kvmshell.core.values.models import QemuVersion
from kvmshell.errors import CommandFailed, Unsupported

FIXED_IN = (9, 0)
ALIGN = 256 * 1024          # the block sizes that take the buggy path
PAD_KIB = 8                 # one more target page (QEMU rounds -m to 8 KiB) avoids it


def tcg_dirty_warning(name: str, kvm: bool, version: QemuVersion | None, ram_bytes: int) -> str | None:
    """The warning for a guest with this accelerator (``kvm`` false: TCG), QEMU version and base
    memory, or None when its migration is safe from the bug. A bug is not a feature QEMU can be
    asked about, so the version is the only signal; an unknown version gets no warning."""
    if kvm or version is None or (version.major, version.minor) >= FIXED_IN or ram_bytes % ALIGN:
        return None
    padded = ram_bytes // 1024 + PAD_KIB
    return (f"{name}: QEMU {version.major}.{version.minor} under TCG can lose guest writes in migration when RAM "
            f"is a multiple of 256 KiB (fixed in QEMU {FIXED_IN[0]}.{FIXED_IN[1]}): use KVM, QEMU >= "
            f"{FIXED_IN[0]}.{FIXED_IN[1]}, or a RAM size such as {padded}K")


async def tcg_dirty_check(name: str, mon: Monitor) -> str | None:
    """Ask the source guest what the decision needs; a guest that cannot say gets no warning."""
    if mon.version is None or (mon.version.major, mon.version.minor) >= FIXED_IN:
        return None
    try:
        if await mon.uses_kvm():
            return None
        ram = await mon.ram_size()
    except (CommandFailed, Unsupported):
        return None
    return tcg_dirty_warning(name, False, mon.version, ram)
