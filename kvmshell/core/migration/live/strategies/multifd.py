"""Pre-copy over several multifd streams (``multifd-channels``), for a path where one TCP stream is the
limit. Never switches to postcopy: QEMU 7.2 sends postcopy's pages on the main stream only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmshell.core.migration.live.strategies.base import Strategy
from kvmshell.core.migration.model.wire import CHANNELS, WireCost, WireOption, multifd

if TYPE_CHECKING:
    from kvmshell.core.migration.model.choice import Choice


class Multifd(Strategy):
    name = "multifd"
    summary = f"pre-copy over {CHANNELS} multifd streams (both sides)"
    rank = 60

    def wire_option(self, costs: Sequence[WireCost] | None, downtime_s: float,
                    choice: Choice | None = None) -> tuple[WireOption, str | None]:
        option = multifd()
        return option, f"sending over several streams: {option.text()}"
