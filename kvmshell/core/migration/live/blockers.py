"""What to do about each reason QEMU gives for refusing to migrate (``blocked-reasons``)."""

from __future__ import annotations

import re

_ADVICE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"ivshmem.*peer mode|peer mode.*ivshmem", re.I),
     "ivshmem in peer mode cannot migrate: give the device master=on (the master migrates the shared "
     "memory), or unplug it first (device_del ID)"),
    (re.compile(r"vfio|passthrough|assigned", re.I),
     "a passthrough (VFIO/SR-IOV) device: unplug it before migrating (device_del ID) and plug one back on "
     "the destination, or pair it with a virtio-net failover device (failover=on)"),
    (re.compile(r"invtsc|tsc", re.I),
     "the CPU model exposes an invariant TSC: start the guest with a CPU model without invtsc"),
    (re.compile(r"replay|record", re.I), "record/replay is on: migration is not possible while it runs"),
    (re.compile(r"only.migratable|non.migratable|not migratable|unmigratable", re.I),
     "a device that cannot migrate: unplug it (device_del ID) or restart the guest without it"),
    (re.compile(r"snapshot|bitmap", re.I), "a block job or dirty bitmap holds the disks: finish or cancel it "
     "(query-block-jobs, block-job-cancel)"),
)
DEFAULT = "unplug or reconfigure what it names, or restart the guest without it"


def advice(reason: str) -> str:
    for pattern, text in _ADVICE:
        if pattern.search(reason):
            return text
    return DEFAULT


def explain(reasons: tuple[str, ...] | list[str]) -> str:
    """One line: each reason with what to do about it."""
    return "; ".join(f"{r} -> {advice(r)}" for r in reasons)
