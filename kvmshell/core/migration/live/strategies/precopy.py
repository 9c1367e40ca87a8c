"""Pre-copy with the user's limits, never escalated."""

from __future__ import annotations

from kvmshell.core.migration.live.strategies.base import Strategy


class Precopy(Strategy):
    name = "precopy"
    summary = "QEMU's pre-copy with the given limits"
    rank = 20
