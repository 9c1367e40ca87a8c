"""Pre-copy over multifd with zstd compression (level 1): each page costs its compressed size on the
wire; the source's cores compress and the destination's decompress, competing with the vCPUs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy
from kvmshell.core.migration.model.wire import WireCost, WireOption, compress

if TYPE_CHECKING:
    from kvmshell.core.migration.model.choice import Choice


class Compress(Strategy):
    name = "compress"
    summary = "pre-copy over multifd with zstd compression (both sides; costs CPU on both hosts)"
    rank = 61

    def wire_option(self, costs: Sequence[WireCost] | None, downtime_s: float,
                    choice: Choice | None = None) -> tuple[WireOption, str | None]:
        option = compress("zstd", 1)
        return option, f"compressing the pages: {option.text()}"
