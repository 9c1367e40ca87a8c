"""Pre-copy with XBZRLE: a re-dirtied page the source's cache holds goes as its delta to the cached
copy. The cache is sized for the working set measured on sampled pages before the start (live/wiredata.py);
it costs the source that much memory while the migration runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy
from kvmshell.core.migration.model.wire import WireCost, WireOption, xbzrle

if TYPE_CHECKING:
    from kvmshell.core.migration.live.request import MigrationRequest
    from kvmshell.core.migration.model.choice import Choice

DEFAULT_CACHE = 64 << 20         # QEMU's own, when nothing was measured


class Xbzrle(Strategy):
    name = "xbzrle"
    summary = "pre-copy sending re-dirtied pages as deltas (XBZRLE; a cache sized for the working set)"
    rank = 62

    def wants_wire_data(self, request: MigrationRequest) -> bool:
        return True

    def wire_option(self, costs: Sequence[WireCost] | None, downtime_s: float,
                    choice: Choice | None = None) -> tuple[WireOption, str | None]:
        mine = [c for c in costs or () if c.option.strategy == "xbzrle"]
        if not mine:
            option = xbzrle(DEFAULT_CACHE)
            return option, f"deltas of re-dirtied pages: {option.text()} (QEMU's default: nothing was measured)"
        return mine[0].option, f"deltas of re-dirtied pages: {mine[0].line()}"
